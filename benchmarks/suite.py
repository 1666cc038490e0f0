"""Runs `fmjax bench` for a list of variants, each in its own process, and prints a table.

  python benchmarks/suite.py gpt2_small_b16 gpt2_small_b32 ... [--out=DIR] [--steps=N]
  python benchmarks/suite.py --list

Each variant is a config spec, overrides and optional `fmjax bench` flags (e.g. --segments=4:
that many packed documents a row); results go to DIR/<variant>.json. Used for the
figures in benchmarks/README.md (one H100 80GB, bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GPT = "configs/gpt.py:{}"
BERT = "configs/bert.py:{}"
COMMON = ["train.grad_accum=1", "model.dtype=bfloat16", "train.steps=1000"]
UNROLL = "model.scan_layers=false"
# XLA's default of 75% of GPU memory leaves GPT-2 XL without remat short (17.4 GiB of state
# plus 42 GiB of temporaries at 16 x 1024); the bench process is the only one on the device.
MEM_FRACTION = "0.95"
LLAMA32_1B = ["model.num_layers=16", "model.d_model=2048", "model.num_heads=32", "model.num_kv_heads=8",
              "model.d_ff=8192", "model.vocab_size=128256", "model.tie_embeddings=true", "model.rope_theta=500000",
              "model.rope_scaling=llama3", "model.rope_factor=32"]

VARIANTS = {
    # GPT-2 124M at seq 1024
    "gpt2_small_b16": (GPT.format("small"), ["train.batch_size=16"]),
    "gpt2_small_b32": (GPT.format("small"), ["train.batch_size=32"]),
    "gpt2_small_b16_logits": (GPT.format("small"), ["train.batch_size=16", "model.fused_loss_chunk=0"]),
    "gpt2_small_b16_chunk2k": (GPT.format("small"), ["train.batch_size=16", "model.fused_loss_chunk=2048"]),
    "gpt2_small_b16_scan": (GPT.format("small"), ["train.batch_size=16", "model.scan_layers=true"]),
    "gpt2_small_b16_xla": (GPT.format("small"), ["train.batch_size=16", "model.attention=xla"]),
    "gpt2_small_b32_dots": (GPT.format("small"), ["train.batch_size=32", "model.remat=dots_no_batch"]),
    "gpt2_small_b16_seg4": (GPT.format("small"), ["train.batch_size=16"], ["--segments=4"]),
    "gpt2_small_b32_seg4": (GPT.format("small"), ["train.batch_size=32"], ["--segments=4"]),
    "gpt2_small_b32_mubf16": (GPT.format("small"), ["train.batch_size=32", "optim.mu_dtype=bfloat16"]),
    # float16 compute with its dynamic loss scale (for GPUs without bfloat16); the H100 tells its cost.
    "gpt2_small_b16_fp16": (GPT.format("small"), ["train.batch_size=16", "model.dtype=float16"]),
    # Llama's architecture at GPT-2 124M's width (162M: untied head, SwiGLU, RMSNorm, rotary positions;
    # configs/gpt.py:small,llama); kv4: grouped-query attention, 4 key/value heads for 12 query heads.
    "llama_small_b16": (GPT.format("small,llama"), ["train.batch_size=16"]),
    "llama_small_b16_kv4": (GPT.format("small,llama"), ["train.batch_size=16", "model.num_kv_heads=4"]),
    "llama_small_b16_scan": (GPT.format("small,llama"), ["train.batch_size=16", "model.scan_layers=true"]),
    # Llama 3.2 1B's shape (what `fmjax import-hf` makes of it; 1.24B, 128256-token vocabulary, tied, 8 kv heads
    # for 32), to fine-tune at seq 1024: a model of the size researchers take from the Hub.
    "llama32_1b_b8": (GPT.format("small,llama"), ["train.batch_size=8", *LLAMA32_1B]),
    "llama32_1b_b8_dots": (GPT.format("small,llama"), ["train.batch_size=8", "model.remat=dots_no_batch",
                                                      *LLAMA32_1B]),
    # GPT-2 XL 1.5B at seq 1024; names without `_scan` unroll the 48 layers (its config scans).
    "gpt2_xl_b8_full": (GPT.format("xl"), ["train.batch_size=8", "model.remat=full", UNROLL]),
    "gpt2_xl_b8_dots": (GPT.format("xl"), ["train.batch_size=8", "model.remat=dots_no_batch", UNROLL]),
    "gpt2_xl_b16_full": (GPT.format("xl"), ["train.batch_size=16", "model.remat=full", UNROLL]),
    "gpt2_xl_b8_none": (GPT.format("xl"), ["train.batch_size=8", "model.remat=none", UNROLL]),
    "gpt2_xl_b16_none": (GPT.format("xl"), ["train.batch_size=16", "model.remat=none", UNROLL]),
    "gpt2_xl_b16_dots": (GPT.format("xl"), ["train.batch_size=16", "model.remat=dots_no_batch", UNROLL]),
    "gpt2_xl_b8_dots_scan": (GPT.format("xl"), ["train.batch_size=8", "model.remat=dots_no_batch", "model.scan_layers=true"]),
    "gpt2_xl_b8_none_scan": (GPT.format("xl"), ["train.batch_size=8", "model.remat=none", "model.scan_layers=true"]),
    "gpt2_xl_b16_dots_scan": (GPT.format("xl"), ["train.batch_size=16", "model.remat=dots_no_batch", "model.scan_layers=true"]),
    "gpt2_xl_b8_full_scan": (GPT.format("xl"), ["train.batch_size=8", "model.remat=full", "model.scan_layers=true"]),
    "gpt2_xl_b16_dots_scan_mubf16": (GPT.format("xl"), ["train.batch_size=16", "model.remat=dots_no_batch",
                                                        "model.scan_layers=true", "optim.mu_dtype=bfloat16"]),
    # BERT-base
    "bert_base_s128_b256": (BERT.format("base"), ["train.batch_size=256", "data.seq_len=128", "data.max_predictions=20"]),
    "bert_base_s128_b256_seg2": (BERT.format("base"), ["train.batch_size=256", "data.seq_len=128",
                                                      "data.max_predictions=20"], ["--segments=2"]),
    "bert_base_s512_b32": (BERT.format("base"), ["train.batch_size=32", "data.seq_len=512", "data.max_predictions=80"]),
    "bert_base_s512_b64": (BERT.format("base"), ["train.batch_size=64", "data.seq_len=512", "data.max_predictions=80"]),
}


def main() -> int:
  p = argparse.ArgumentParser()
  p.add_argument("variants", nargs="*")
  p.add_argument("--out", default=os.environ.get("OUT", "/tmp/fmjax_bench"))
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--list", action="store_true")
  p.add_argument("--timeout", type=int, default=300)
  args = p.parse_args()
  if args.list or not args.variants:
    print("\n".join(VARIANTS))
    return 0
  unknown = [v for v in args.variants if v not in VARIANTS]
  if unknown:
    print(f"error: unknown variant(s) {', '.join(unknown)}; --list shows them", file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  rows = []
  for name in args.variants:
    spec, overrides, *flags = VARIANTS[name]
    path = os.path.join(args.out, f"{name}.json")
    cmd = [sys.executable, "-m", "fmjax.cli", "bench", f"--config={spec}", f"--steps={args.steps}",
           f"--json={path}", *(flags[0] if flags else [])] + [f"--config.{o}" for o in COMMON + overrides]
    t0 = time.time()
    try:
      # No persistent compilation cache unless asked: the compile times in the table are compiles.
      env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": MEM_FRACTION, "FMJAX_COMPILATION_CACHE": "off", **os.environ}
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired as e:
      proc = subprocess.CompletedProcess(cmd, 124, e.stdout or "", f"timed out after {args.timeout} s")
      proc.stdout = proc.stdout.decode() if isinstance(proc.stdout, bytes) else proc.stdout
    with open(os.path.join(args.out, f"{name}.log"), "w") as f:
      f.write(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0 or not os.path.exists(path):
      tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
      rows.append((name, None, f"failed: {' | '.join(tail)[:300]}"))
    else:
      with open(path) as f:
        rows.append((name, json.load(f), f"{time.time() - t0:.0f}s wall"))
    print(name, "done", flush=True)
  print(f"\n{'variant':<24} {'tok/s':>10} {'MFU':>6} {'step ms':>8} {'compile s':>9} {'mem GiB':>8}  note")
  for name, r, note in rows:
    if r is None:
      print(f"{name:<24} {'-':>10} {'-':>6} {'-':>8} {'-':>9} {'-':>8}  {note}")
    else:
      mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
      mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] else "-"
      print(f"{name:<24} {r['tokens_per_sec']:>10,.0f} {mfu:>6} {1e3 * r['step_time_s']:>8.1f} "
            f"{r['compile_time_s']:>9.1f} {mem:>8}  {note}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
