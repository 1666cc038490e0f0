"""Metric logging: JSONL and TensorBoard in the workdir, a progress bar or log lines.

Only process 0 writes. Interactive single-host runs get a tqdm bar with loss, tokens/s,
MFU and ETA; everything else (pods, CI, pipes) gets one log line per logging step.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import uuid

import jax

from fmjax import files, report

log = logging.getLogger("fmjax")

# Per device: (pattern, peak dense bf16 FLOP/s for MFU, HBM GiB a program can use), matched in
# order against jax's device_kind ("TPU v5 lite", "NVIDIA H100 80GB HBM3") or an accelerator or
# topology name ("v5litepod-16", "v5p:2x2x1", "h100x8"), so the more specific names come first.
# JAX names v5p "TPU v5"; on v2 and v3 a device is one of a chip's two cores.
DEVICES = (
    (r"v6 lite|v6e", 918e12, 32), (r"v5 lite|v5e|v5litepod", 197e12, 16), (r"v5p|tpu v5\b", 459e12, 95),
    (r"\bv4\b", 275e12, 32), (r"\bv3\b", 61.5e12, 16), (r"\bv2\b", 22.5e12, 8),
    (r"h100 pcie", 756e12, 79.1), (r"h100 nvl", 835e12, 87.5), (r"\bh200", 989e12, 139), (r"\bh100", 989e12, 79.1),
    (r"a100.*40gb", 312e12, 39.4), (r"\ba100", 312e12, 79.1), (r"\bl40s\b", 362e12, 44.4), (r"\bl4\b", 121e12, 22),
)


def device_spec(kind: str) -> tuple[float, float] | None:
  """(peak bf16 FLOP/s, HBM GiB) of a device kind or accelerator name; None when unknown (CPU)."""
  low = kind.lower()
  return next(((flops, gib) for pattern, flops, gib in DEVICES if re.search(pattern, low)), None)


def peak_flops_per_device() -> float | None:
  """Dense bf16 peak FLOP/s of this host's device kind, for MFU; None when unknown."""
  spec = device_spec(jax.devices()[0].device_kind)
  return spec and spec[0]


class _StdoutHandler(logging.StreamHandler):
  """Writes each record to `sys.stdout` (or `sys.stderr`) as it is then, so a redirect made after
  setup (a notebook, a test's capture) is followed and a stream closed since is never written to."""

  def __init__(self, name: str = "stdout"):
    self.name_of_stream = name
    super().__init__()

  @property
  def stream(self):
    return getattr(sys, self.name_of_stream)

  @stream.setter
  def stream(self, value):
    del value  # always the current sys.stdout / sys.stderr


def setup_logging(stream: str = "stdout") -> None:
  """fmjax's own log lines go to stdout (or `stream="stderr"`, for a command whose stdout is its
  result) with a time stamp; library chatter is quietened."""
  ours = [h for h in log.handlers if isinstance(h, _StdoutHandler)]
  for handler in ours:
    handler.name_of_stream = stream
  if not log.handlers:
    handler = _StdoutHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log.addHandler(handler)
    log.propagate = False
  # Each run calls this: a level someone set (a notebook quietening fmjax, or asking absl for more) is kept.
  levels = {"fmjax": logging.INFO, "absl": logging.WARNING, "jax._src": logging.WARNING, "orbax": logging.WARNING,
            "tensorflow": logging.WARNING,
            # A non-finite loss is the step loop's to report (nan_policy), once, not a warning per scalar.
            "tensorboardX.x2num": logging.ERROR}
  for name, level in levels.items():
    if logging.getLogger(name).level == logging.NOTSET:
      logging.getLogger(name).setLevel(level)
  absl = logging.getLogger("absl")
  if not any(isinstance(f, _UnpreparedDatasetNote) for f in absl.filters):
    absl.addFilter(_UnpreparedDatasetNote())


class _UnpreparedDatasetNote(logging.Filter):
  """Drops TFDS's warning that a dataset not prepared yet has no dataset_info.json (fmjax prepares
  it, or says in one line why it cannot), and its note that text_files' config is a custom one."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    # The second: text_files' own files are a BuilderConfig TFDS calls custom, which it is by design.
    return "has no dataset_info.json" not in message and not message.startswith("Using custom data configuration")


def _tensorboard_writer(logdir: str, start_step: int):
  """A tensorboardX writer, imported without dragging in PyTorch (seconds per run start).

  It opens with a session start at `start_step + 1`, from which TensorBoard drops what earlier
  runs logged (as `report.read_metrics` does for metrics.jsonl)."""
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # makes tensorboardX's optional `import torch` fail fast
  try:
    from tensorboardX import SummaryWriter
  finally:
    if blocked:
      del sys.modules["torch"]
  return SummaryWriter(logdir, flush_secs=30, purge_step=start_step + 1)


def _ends_mid_line(path: str) -> bool:
  """Whether the file at `path` exists and its last line has no newline."""
  try:
    with open(path, "rb") as f:
      if f.seek(0, os.SEEK_END) == 0:
        return False
      f.seek(-1, os.SEEK_END)
      return f.read(1) != b"\n"
  except FileNotFoundError:
    return False


def format_duration(seconds: float) -> str:
  """`HH:MM:SS`, after the days when there are any (`3d 04:05:06`: a pretraining run's ETA is often
  days, which a time of day would wrap); `?` when not known."""
  if seconds != seconds:
    return "?"
  days, rest = divmod(int(round(seconds)), 86400)
  hms = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
  return f"{days}d {hms}" if days else hms


WANDB_ID_FILE = "wandb_run_id"  # in the workdir: the W&B run a resume goes on logging to


def _wandb_run_id(root: str) -> tuple[str, bool]:
  """The workdir's W&B run id and whether it had one; a new workdir gets a random one, kept in
  `root/wandb_run_id` (a hash of the path would join two users' `/tmp/gpt` runs in one project)."""
  path = os.path.join(root, WANDB_ID_FILE)
  try:
    with open(path) as f:
      run_id = f.read().strip()
    if run_id:
      return run_id, True
  except FileNotFoundError:
    pass
  run_id = uuid.uuid4().hex[:12]
  with open(path, "w") as f:
    f.write(run_id + "\n")
  return run_id, False


class MetricsWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard; shows progress."""

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0, *, progress_bar: bool = True,
               use_wandb: bool = False, run_name: str = "", config_dict: dict | None = None):
    self.is_chief = jax.process_index() == 0
    self.total_steps = total_steps
    self.start_time, self.start_step = time.time(), start_step
    self._jsonl = self._tb = self._bar = self._wandb = self._mirror = None
    if not self.is_chief:
      return
    # A bucket workdir gets these files whole every 30 s and at close (`files.Mirror`).
    self._mirror = files.Mirror(workdir, names=("metrics.jsonl", WANDB_ID_FILE))
    path = os.path.join(self._mirror.root, "metrics.jsonl")
    # A line an earlier run's kill cut short is ended first: appended to it, this run's start record
    # would be as unreadable as it, and the rows that record drops would stay in the history.
    cut = _ends_mid_line(path)
    self._jsonl = open(path, "a")
    # Where this run took over: rows an earlier run logged past it (a kill after the last save, or a
    # resume from an older checkpoint) are not this run's history (`report.read_metrics`).
    self._jsonl.write(("\n" if cut else "") + json.dumps({report.START_KEY: int(start_step)}) + "\n")
    self._jsonl.flush()
    try:
      self._tb = _tensorboard_writer(os.path.join(self._mirror.root, "tb"), start_step)
    except ImportError:  # TensorBoard is optional; JSONL is the record
      self._tb = None
    interactive = sys.stderr.isatty() and jax.process_count() == 1 and not os.environ.get("CI")
    if progress_bar and interactive:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step")
    if use_wandb:
      try:
        try:
          import wandb
        except ImportError:
          raise ImportError("wandb is not installed here; `pip install wandb` to log to W&B") from None
        mode = os.environ.get("WANDB_MODE", "offline")
        # One W&B run per workdir: a resume appends to it, as it does to metrics.jsonl. Steps the
        # W&B run already holds (logged after the last save by the run that was stopped) W&B keeps.
        run_id, resumed = _wandb_run_id(self._mirror.root)
        self._wandb = wandb.init(name=run_name, config=config_dict, dir=self._mirror.root, mode=mode, id=run_id,
                                 resume="allow")
        log.info("W&B run %s %s (%s)", run_id, "resumed" if resumed else "started", mode)
      except Exception as e:  # W&B must never stop a run
        log.warning("W&B disabled: %s", e)

  def write(self, step: int, scalars: dict, *, prefix: str = "") -> None:
    """Appends one step's scalars to metrics.jsonl, TensorBoard and W&B (chief host only)."""
    if not self.is_chief:
      return
    scalars = {f"{prefix}{k}": float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
    if self._wandb is not None:
      self._wandb.log(scalars, step=step)
    self._mirror.sync()

  def pace_from(self, step: int) -> None:
    """Times the ETA from now and `step` on: the loop calls it once the run's first update, which
    compiled (minutes for a large model), is done, as it does for tokens/s."""
    self.start_time, self.start_step = time.time(), step

  def eta_seconds(self, step: int) -> float:
    """Seconds left to `total_steps` at the pace since `pace_from`; NaN before a step is done."""
    done = step - self.start_step
    if done <= 0:
      return float("nan")
    return (time.time() - self.start_time) / done * (self.total_steps - step)

  def progress(self, step: int, scalars: dict) -> None:
    """Updates the bar, or prints one log line (step, loss, tokens/s, MFU, ETA)."""
    if not self.is_chief:
      return
    eta = self.eta_seconds(step)
    parts = [f"loss {scalars['loss']:.4f}"]
    if "tokens_per_sec" in scalars:
      parts.append(f"{scalars['tokens_per_sec']:,.0f} tok/s")
    if scalars.get("mfu") is not None:
      parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_postfix_str(", ".join(parts))
      self._bar.refresh()
    else:
      log.info("step %d/%d  %s  ETA %s", step, self.total_steps, "  ".join(parts), format_duration(eta))

  def message(self, text: str) -> None:
    """Logs a line without breaking the progress bar (chief host only)."""
    if not self.is_chief:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      log.info(text)

  def sync(self) -> None:
    """Copies the logs to a bucket workdir now (`files.Mirror`); nothing for a local one."""
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()
    if self._mirror is not None:
      self._mirror.sync(force=True)

  def close(self) -> None:
    """Closes the bar and the writers, and copies the logs to a bucket workdir."""
    if self._bar is not None:
      self._bar.close()
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()
    if self._mirror is not None:
      self._mirror.close()


class StepProfiler:
  """Traces `count` updates of a run with `jax.profiler`, from the one that starts at step `first`.

  Each host writes its trace under `logdir` (the workdir's `tb/`), where TensorBoard's Profile
  tab and XProf find it beside the scalars. The window never holds the run's first update, which
  compiles: it starts at `first` or one step after `start`, whichever is later. Each update is a
  `StepTraceAnnotation`, so the trace viewer shows step boundaries and per-step times. The device
  is drained at both ends of the window, so the trace holds exactly its updates; tokens/s logged
  over that window is lower for it.
  """

  def __init__(self, logdir: str, first: int, count: int, start: int, say=log.info):
    self.logdir, self.say = logdir, say
    self.first = max(first, start + 1) if count > 0 else None
    self.last = self.first + count if count > 0 else None  # the step the last traced update makes
    self.done = start  # the step of the state last seen, for the closing message
    self.active = False

  def before_update(self, step: int, state) -> None:
    """Called with the state at `step`, before the update that makes step + 1 is queued."""
    if step == self.first and not self.active:
      jax.block_until_ready(state)
      self._mirror = files.Mirror(self.logdir)  # a bucket's trace is copied there once it is written
      jax.profiler.start_trace(self._mirror.root)
      self.active = True

  def after_update(self, step: int, state) -> None:
    """Called with the new state at `step` once its update is queued."""
    self.done = step
    if self.active and step == self.last:
      jax.block_until_ready(state)
      self.stop()

  def stop(self) -> None:
    """Ends an open trace (at the window's end, or when the run stops inside it)."""
    if not self.active:
      return
    self.active = False
    jax.profiler.stop_trace()
    self._mirror.close()
    self.say(f"profile of updates {self.first + 1}-{self.done} written to {self.logdir}; view it in "
             f"TensorBoard's Profile tab (tensorboard --logdir {self.logdir}) or XProf")
