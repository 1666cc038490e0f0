"""Host-side throughput of reading packed batches (no device work): tokens/s on one CPU core.

  python benchmarks/data_loader.py                                  # GPT tiny config, seq 128, batch 16
  python benchmarks/data_loader.py --config=configs/bert.py:tiny --batch_size=256
  python benchmarks/data_loader.py --seq_len=1024 --batch_size=64

Prepares the config's dataset (the offline fmjax_corpus by default) into a temporary cache unless
--cache_dir is given, pins the process to one core, then times `loader.host_batch(step)`: the
shuffled row gather from the memory-mapped cache, segment ids, positions, loss weights and, for
MLM, masking. Goal: at least 2M tokens/s.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fmjax import config_lib  # noqa: E402
import fmjax.data as data  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/gpt.py:tiny")
  parser.add_argument("--batch_size", type=int, default=None)
  parser.add_argument("--seq_len", type=int, default=None)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--cache_dir", default="")
  parser.add_argument("--all_cores", action="store_true", help="do not pin to one core")
  args = parser.parse_args()

  if not args.all_cores and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  path, arg = config_lib.split_config_spec(args.config)
  config = config_lib.load_module(path).get_config(arg) if arg else config_lib.load_module(path).get_config()
  config.data.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="fmjax_bench_")
  if args.seq_len:
    config.data.seq_len = args.seq_len
    config.model.max_len = max(config.model.max_len, args.seq_len)
  t0 = time.perf_counter()
  data.prepare(config)
  prepare_s = time.perf_counter() - t0
  loader = data.make_loader(config, batch_size=args.batch_size)
  B, T = loader.batch_size, loader.seq_len
  for step in range(5):  # warm the page cache and the permutation
    loader.host_batch(step)
  t0 = time.perf_counter()
  for step in range(args.steps):
    loader.host_batch(step)
  seconds = time.perf_counter() - t0
  tokens_per_s = args.steps * B * T / seconds
  print(f"objective={config.train.objective} batch={B} seq_len={T} rows={loader.data.num_rows} "
        f"cores={'all' if args.all_cores else 1} prepare={prepare_s:.2f}s")
  print(f"host_batch: {seconds / args.steps * 1e3:.3f} ms/batch, {tokens_per_s / 1e6:.2f}M tokens/s "
        f"({'meets' if tokens_per_s >= 2e6 else 'BELOW'} the 2M tokens/s goal)")


if __name__ == "__main__":
  main()
