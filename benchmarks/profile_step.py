"""Profiles a few train steps and prints the GPU kernels that take the most time.

  python benchmarks/profile_step.py --config=configs/gpt.py:small --config.train.batch_size=16 [--top=40] [--segments=4]

Runs `fmjax bench` with `--profile` (the same step, batch and timing), then sums the device-kernel
durations of its Perfetto trace by kernel name.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile

from fmjax import bench, config_lib


def main() -> int:
  argv, overrides = config_lib.split_overrides(sys.argv[1:])
  p = argparse.ArgumentParser()
  p.add_argument("--config", required=True)
  p.add_argument("--top", type=int, default=40)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--segments", type=int, default=1, help="packed documents per row, as in fmjax bench")
  p.add_argument("--out", default=os.environ.get("OUT", tempfile.mkdtemp()))
  args = p.parse_args(argv)
  config = config_lib.load_config(args.config, overrides)
  trace_dir = os.path.join(args.out, "trace")
  bench.run(config, steps=args.steps, warmup=3, segments=args.segments, profile_dir=trace_dir)
  path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  pids = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpu_pids = {pid for pid, name in pids.items() if "/device:GPU" in name or "gpu" in name.lower()}
  totals, counts = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e:
      totals[e["name"]] += e["dur"]
      counts[e["name"]] += 1
  total = sum(totals.values())
  print(f"device time per step: {total / args.steps / 1e3:.2f} ms over {len(totals)} kernels "
        f"(pids: {[pids[p] for p in gpu_pids][:4]})")
  for name, us in totals.most_common(args.top):
    print(f"{us / args.steps / 1e3:8.3f} ms {100 * us / total:5.1f}%  x{counts[name] // args.steps:<3d} {name[:110]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
