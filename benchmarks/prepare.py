"""Throughput of `fmjax data prepare` (tokenise and pack), in one process and in a pool of processes.

  python benchmarks/prepare.py                        # GPT (BPE, CLM), 40k synthetic documents
  python benchmarks/prepare.py --config=configs/bert.py:tiny --docs=20000 --workers=4

Writes a synthetic .jsonl corpus (Zipf-distributed words, 50-400 per document) to a temporary
directory, trains the config's tokenizer on it once, then prepares the same cache twice from
scratch: with data.prepare_workers=1 and with --workers processes (default: one per core, at most
32), in parts of --shard_docs documents. Prints documents/s and tokens/s for each, and checks that
both caches hold the same bytes.
"""

import argparse
import glob
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fmjax import config_lib  # noqa: E402
import fmjax.data as data  # noqa: E402


def write_corpus(path: str, docs: int) -> None:
  rng = np.random.default_rng(0)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  words = ["".join(rng.choice(letters, size=int(rng.integers(2, 10)))) for _ in range(20000)]
  p_W = 1.0 / np.arange(1, len(words) + 1)
  p_W /= p_W.sum()
  with open(path, "w") as f:
    for _ in range(docs):
      f.write(json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(50, 400)), p=p_W))}) + "\n")


def arrays(path: str) -> dict[str, bytes]:
  return {os.path.relpath(f, path): open(f, "rb").read()
          for f in sorted(glob.glob(f"{path}/*/**/*.bin", recursive=True))}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/gpt.py:tiny")
  parser.add_argument("--docs", type=int, default=40000)
  parser.add_argument("--shard_docs", type=int, default=4000)
  parser.add_argument("--workers", type=int, default=0)
  args = parser.parse_args()

  root = tempfile.mkdtemp(prefix="fmjax_prepare_bench_")
  corpus = os.path.join(root, "corpus.jsonl")
  write_corpus(corpus, args.docs)
  results = {}
  for workers in (1, args.workers):
    cache = os.path.join(root, f"cache_{workers}")
    config = config_lib.load_config(args.config, [
        "data.dataset=text_files", f"data.files={corpus}", f"data.cache_dir={cache}",
        f"data.shard_docs={args.shard_docs}", f"data.prepare_workers={workers}"])
    tok = data.get_tokenizer(config)  # trained on the corpus; not what is timed
    t0 = time.perf_counter()
    path = data.prepare(config, tok)
    seconds = time.perf_counter() - t0
    meta = json.load(open(os.path.join(path, "meta.json")))["splits"]
    docs = sum(s["num_docs"] for s in meta.values())
    tokens = sum(s["num_text_tokens"] for s in meta.values())
    parts = sum(len(s["parts"]) for s in meta.values())
    label = "1 process" if workers == 1 else f"prepare_workers={workers or 'auto'}"
    print(f"{label}: {parts} parts, {docs} documents, {tokens / 1e6:.1f}M tokens in {seconds:.1f} s: "
          f"{docs / seconds:,.0f} documents/s, {tokens / seconds / 1e6:.2f}M tokens/s", flush=True)
    results[workers] = (seconds, arrays(path))
  (one, a), (many, b) = results[1], results[args.workers]
  print(f"speed-up {one / many:.2f}x on {len(os.sched_getaffinity(0))} cores; the caches are "
        f"{'byte for byte the same' if a == b else 'DIFFERENT'}")


if __name__ == "__main__":
  main()
