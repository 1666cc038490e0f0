"""The offline demo behind `make demo`: a tiny GPT and a tiny BERT on real English text.

Both train on fmjax_corpus (CPython's reference documentation and standard-library
docstrings, which every Python install carries), then the held-out loss is printed beside
the unigram baseline of the same tokenizer, with a generated sample, a fill-mask and the GPT's
zero-shot multiple choice on its own held-out passages (`fmjax eval --task=continuation`).

  python -m fmjax.demo [--workdir=DIR] [--steps=N]
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time

import jax

from fmjax import config_lib, data, generate, train, zeroshot


def main(argv: list[str] | None = None) -> int:
  """Trains the tiny GPT and BERT, then prints their samples and held-out losses."""
  from fmjax.cli import ArgumentParser
  p = ArgumentParser(prog="python -m fmjax.demo")  # `fmjax` has no demo command: name the one that runs it
  p.add_argument("--workdir", default=os.path.join("workdirs", "demo"))
  p.add_argument("--steps", type=int, default=0, help="override train.steps for both models")
  args = p.parse_args(argv)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  rows = []
  t_start = time.time()
  for family in ("gpt", "bert"):
    workdir = os.path.join(args.workdir, family)
    if os.path.exists(workdir):  # the demo shows training, so it always starts fresh
      shutil.rmtree(workdir)
    overrides = [f"train.steps={args.steps}"] if args.steps else []
    config = config_lib.load_config(os.path.join(root, "configs", f"{family}.py") + ":tiny", overrides)
    print(f"\n=== {family.upper()} tiny: {config.model.num_layers} layers, d={config.model.d_model}, "
          f"{config.train.steps} steps of {config.train.batch_size}x{config.data.seq_len} tokens on "
          f"{config.data.dataset} ===", flush=True)
    result = train.run(config, workdir)
    baseline = data.unigram_baseline(config)
    rows.append((family, config.train.objective, result["eval"]["loss"], baseline, result["eval"]["accuracy"]))
    model, config, tok = generate.load_run(workdir)
    if family == "gpt":
      prompt = "The for statement is used to"
      out = generate.generate(model, [tok.encode_opening(prompt)], 40, temperature=0.8, top_k=40, seed=0,
                              eos_id=tok.eos_id, max_len=config.model.max_len)[0]
      print(f"\nGPT sample (temperature 0.8, top-k 40):\n  {prompt}{tok.decode(out)}")
      choice = zeroshot.run(workdir, "continuation")
      print(f"\nGPT zero-shot, which of 4 spans continues a held-out passage: acc {choice['acc']:.3f} over "
            f"{choice['items']} passages (chance {choice['chance']:.2f})")
    else:
      text = "The [MASK] statement is used to iterate over the elements of a sequence."
      preds = generate.fill_mask(model, tok, text, top_k=5)
      print(f"\nBERT fill-mask: {text}")
      for i, cands in enumerate(preds):
        print("  [MASK] -> " + ", ".join(f"{w!r} {p:.2g}" for w, p in cands))
  print("\nHeld-out loss (nats/token) vs the unigram baseline of the same tokenizer:")
  print(f"  {'model':<6} {'objective':<9} {'held-out':>9} {'unigram':>9} {'ppl':>8} {'accuracy':>9}")
  for family, obj, loss, base, acc in rows:
    print(f"  {family:<6} {obj:<9} {loss:>9.3f} {base:>9.3f} {math.exp(loss):>8.1f} {acc:>9.3f}")
  print(f"\ndemo finished in {time.time() - t_start:.0f} s on {jax.device_count()} {jax.devices()[0].platform} device(s)")
  return 0


if __name__ == "__main__":
  try:
    raise SystemExit(main())
  except config_lib.ConfigError as e:  # one line, as `fmjax` ends a user mistake
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
