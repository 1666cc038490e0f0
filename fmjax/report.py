"""`fmjax report`: a workdir's metrics.jsonl as a Markdown table, a CSV and PNG plots.

  fmjax report --workdir=/tmp/gpt_tiny                 # writes into the workdir
  fmjax report --workdir=/tmp/lr_sweep --out=/tmp/rep  # a sweep root: the sweep's table and plot

Outputs: `report.md` (final and best figures, then a table of the logged steps), `metrics.csv`
(every scalar at every logged step), `loss.png` (train and eval loss vs step, and a mixture's
held-out loss of each dataset) and `train.png` (the other train scalars: lr, grad norm,
accuracy, tokens/s). A resumed run logs some steps
twice; the last value logged for a step wins. A sweep root gets `sweep.md`, `sweep.csv` and
`sweep_eval_loss.png` instead, and a fine-tuning sweep also `finetune.md` and `finetune.csv`.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Sequence

from fmjax import files
from fmjax.config_lib import ConfigError

METRICS_FILE = "metrics.jsonl"
START_KEY = "run_started_at_step"  # the record each run's writer opens metrics.jsonl with
_MAX_TABLE_ROWS = 25


def read_metrics(workdir: str) -> list[dict]:
  """Records of `workdir/metrics.jsonl` merged per step (last value wins), sorted by step; [] if absent.

  Each run (a start or a resume) opens with where it took over (`START_KEY`): the steps
  logged after that point by an earlier run are dropped, since this run trains them again (a kill
  after the last save) or replaces them (a resume from an older checkpoint, as after a loss spike).
  A line cut short by a kill mid-write is skipped rather than failing the whole report, and so is
  one that is not a record of a step (no integer `step`); scalars that are not numbers are dropped.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not files.exists(path):
    return []
  by_step: dict[int, dict] = {}
  for line in files.read_text(path).splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if not isinstance(record, dict):
      continue
    start = record.get(START_KEY)
    if isinstance(start, int) and not isinstance(start, bool):
      by_step = {step: r for step, r in by_step.items() if step <= start}
      continue
    if not isinstance(record.get("step"), int) or isinstance(record["step"], bool):
      continue
    # Text (a note a notebook added) is no scalar either: the table, the CSV and the plots take floats.
    by_step.setdefault(record["step"], {}).update(
        (k, v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
  return [by_step[s] for s in sorted(by_step)]


def series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one scalar over the records that have it."""
  pairs = [(r["step"], float(r[key])) for r in records if key in r]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_curves(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: str, *, ylabel: str,
                title: str = "") -> str:
  """Line plot of named (x, y) curves into a PNG; returns the path."""
  import matplotlib
  matplotlib.use("Agg")  # files only: never needs a display
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, (x, y) in curves.items():
    ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=label)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  if len(curves) > 1:
    ax.legend(fontsize=7 if len(curves) > 6 else 9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _plot_grid(records: Sequence[dict], keys: list[str], path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cols = min(len(keys), 2)
  rows = math.ceil(len(keys) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    ax.plot(*series(records, key))
    ax.set_title(key, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _cell(value) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
  return str(value)


def _table_steps(steps: list[int]) -> list[int]:
  """At most _MAX_TABLE_ROWS steps, spread evenly, always keeping the last."""
  if len(steps) <= _MAX_TABLE_ROWS:
    return steps
  stride = math.ceil(len(steps) / (_MAX_TABLE_ROWS - 1))
  return steps[::stride] + ([steps[-1]] if (len(steps) - 1) % stride else [])


def format_markdown(records: Sequence[dict], title: str) -> str:
  """A summary (final and best losses) and a table of the logged steps."""
  keys = sorted({k for r in records for k in r if k != "step"},
                key=lambda k: (not k.startswith("train/loss"), not k.startswith("eval/loss"), k))
  lines = [f"# {title}", ""]
  for key in ("train/loss", "eval/loss"):
    steps, values = series(records, key)
    finite = [i for i, v in enumerate(values) if math.isfinite(v)]  # a NaN is never the best
    if values:
      best = min(finite, key=values.__getitem__) if finite else None
      lines.append(f"- {key}: final {values[-1]:.4f} at step {steps[-1]}"
                   + (f"; best {values[best]:.4f} at step {steps[best]}" if best is not None else ""))
  lines += ["", "| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
  by_step = {r["step"]: r for r in records}
  for step in _table_steps(sorted(by_step)):
    lines.append(f"| {step} | " + " | ".join(_cell(by_step[step].get(k)) for k in keys) + " |")
  return "\n".join(lines) + "\n"


def report(workdir: str, out: str | None = None) -> list[str]:
  """Writes the report for a run's workdir (or a sweep root) into `out` (default: the workdir; for a
  bucket workdir, `./<run name>-report`)."""
  if not files.is_remote(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir} is not a directory; pass the --workdir of a train run or a sweep")
  out = out or (f"{os.path.basename(workdir.rstrip('/'))}-report" if files.is_remote(workdir) else workdir)
  if files.is_remote(out):
    raise ConfigError(f"--out={out} is in a bucket; write the report to a local directory (and copy it up)")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ConfigError(f"--out={out} is a file; give a directory for the report")
  records = read_metrics(workdir)
  if not records:
    from fmjax import sweep
    if files.exists(os.path.join(workdir, sweep.RUNS_FILE)):
      return _sweep_report(workdir, out)
    if files.exists(os.path.join(workdir, METRICS_FILE)):
      raise ConfigError(f"{workdir}/{METRICS_FILE} holds no step's record (each line is a JSON object with an "
                        "integer step); pass the --workdir of a train run or a sweep")
    raise ConfigError(f"no {METRICS_FILE} (or {sweep.RUNS_FILE}) in {workdir}; pass the --workdir of a train run "
                      "or a sweep")
  os.makedirs(out, exist_ok=True)
  name = os.path.basename(os.path.normpath(workdir))
  paths = [os.path.join(out, "report.md"), os.path.join(out, "metrics.csv")]
  with open(paths[0], "w") as f:
    f.write(format_markdown(records, name))
  keys = sorted({k for r in records for k in r if k != "step"})
  with open(paths[1], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["step", *keys])
    for r in records:
      w.writerow([r["step"], *(r.get(k, "") for k in keys)])
  # A mixture's datasets each have their own held-out loss (eval/<dataset>_loss), drawn beside the rest.
  mixed = [k for k in keys if k.startswith("eval/") and k.endswith("_loss")]
  curves = {k: series(records, k) for k in ("train/loss", "eval/loss", *mixed)}
  curves = {k: v for k, v in curves.items() if v[0]}
  if curves:
    paths.append(plot_curves(curves, os.path.join(out, "loss.png"), ylabel="loss", title=name))
  flat = ("train/loss", "train/nonfinite", "train/targets", "train/tokens")  # train/tokens: older runs' targets
  others = [k for k in keys if k.startswith("train/") and k not in flat]
  if others:
    paths.append(_plot_grid(records, others, os.path.join(out, "train.png")))
  return paths


def _sweep_report(root: str, out: str) -> list[str]:
  """The sweep's table and plot and, for a fine-tuning sweep, its `finetune.md`, from `root` into `out`."""
  from fmjax import sweep
  os.makedirs(out, exist_ok=True)
  runs = sweep.read_runs_file(root)
  paths = sweep.write_outputs(sweep.aggregate(root, runs), root, out)
  if any(r["command"] == "finetune" for r in runs):
    from fmjax import finetune
    # summarize reads `join(first arg, name)/results.json` and writes into its first arg: absolute
    # run paths make it read the runs in `root` and write into `out`.
    paths += finetune.summarize(out, [{"name": files.absolute(os.path.join(root, r["name"])), "entry": r["entry"]}
                                      for r in runs])["paths"]
  return paths


def cli(argv: list[str]) -> int:
  """`fmjax report --workdir=W [--out=DIR]`."""
  from fmjax.cli import ArgumentParser
  p = ArgumentParser(prog="fmjax report")
  p.add_argument("--workdir", required=True, help="a train run's workdir, or a sweep root")
  p.add_argument("--out", default="", help="a local directory to write to (default: the workdir; for a bucket "
                 "workdir, ./<name>-report)")
  args = p.parse_args(argv)
  for path in report(args.workdir, args.out or None):
    print(path)
  return 0
