"""Checkpoints: async Orbax saves, keep-last-K, torn-checkpoint cleanup, elastic restore, preemption,
and the workdir lock that lets one training process at a time write a workdir.

A step directory holds three items saved separately, so a fine-tuning run can read the trunk
without touching the optimizer state:

  <directory>/<step>/params      model parameters (a nested dict of arrays)
  <directory>/<step>/opt_state   optax state
  <directory>/<step>/meta        JSON: step, config, tokenizer, data position, version, metrics

Restores take an abstract state whose leaves are `jax.ShapeDtypeStruct(..., sharding=s)`; each
leaf is read straight into the requested sharding, so a checkpoint written on one mesh (or by
several processes) restores onto any other mesh, and into either layer layout (a scanned
model's stacked blocks or an unrolled model's per-layer ones, `model.scan_layers`). All
processes call every method here in the same order: saves, time-based save decisions and
preemption checks are collective.

Only the training process that owns a directory (`owner=True`, under the workdir lock) removes
unfinished saves; every other reader (eval, generate, export, release, init_from) ignores them
and deletes nothing, since they may be the save a running training is writing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import logging as std_logging
import math
import os
import re
import signal
import socket
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

import fmjax
from fmjax import config_lib, files
from fmjax.models import ARCHITECTURE_DEFAULTS, ROPE_SCALING_READS, STACK_KEY, architecture

ITEMS = ("params", "opt_state")
# Orbax (>= 0.12) writes this file last into every step it finalises, on local disks (before the
# atomic rename) and on GCS alike; a step directory without it was never finished.
COMMIT_MARKER = "commit_success.txt"
_TMP_MARKER = ".orbax-checkpoint-tmp"
_MAX_LISTED = 10
LOCK_FILE = ".lock"  # in the workdir; hidden, so listings of a workdir's files pass it by
# Tensorstore's status codes for files that are missing, cut short or unreadable.
_DAMAGE_CODES = re.compile(r"^\s*(NOT_FOUND|DATA_LOSS|FAILED_PRECONDITION|OUT_OF_RANGE)\b")


class CheckpointMismatchError(ValueError):
  """A checkpoint whose parameter paths or shapes do not fit the model being restored."""


# On several hosts, `checkpoint.every_minutes` and (without JAX's preemption service) a stop signal are
# checked at multiples of this step: each check is a collective that waits for the steps before it.
TIME_CHECK_STEPS = 10
# Model settings that decide the parameter arrays (not scan_layers: either layer layout restores).
SHAPE_KEYS = ("family", "num_layers", "d_model", "num_heads", "d_ff", "vocab_size", "max_len", "type_vocab_size")
# Not shapes, but the source's numbers depend on them: a run started from it (init_from) takes them; and
# the architecture choices (rotary positions, RMSNorm ...), which decide its parameter tree and its numbers
# both: a classifier config for a Llama trunk need not repeat them.
ADOPTED_MODEL_KEYS = ("layer_norm_eps", *ARCHITECTURE_DEFAULTS)
# How a rotary model reads positions, which no parameter holds: a run from a rotary source may read them anew
# (extending its context: position interpolation, a larger theta, with a larger model.max_len). A group of these
# that this config names (any of it off its default) is this config's; the others are adopted.
ROTARY_READING = (("rope_theta",), ("rope_scaling", *ROPE_SCALING_READS["llama3"]))


def adopt_model_settings(config, saved: Mapping, source: str = "init_from") -> list[str]:
  """Sets `config.model`'s ADOPTED_MODEL_KEYS to those of `saved` (the config.json of the run it
  starts from, `source`); returns `model.KEY=VALUE` for each one that changed. An architecture choice
  this config names (not GPT-2's) that differs from the source's is refused (CheckpointMismatchError),
  as another size is: the run would silently train the source's architecture instead. The rotary
  settings this config names (ROTARY_READING) are kept, with a warning: the source's outputs change."""
  theirs = saved.get("model") if isinstance(saved, Mapping) else None
  if isinstance(theirs, Mapping):
    _refuse_other_architecture(config.model, theirs, source)
  named = lambda k: config.model.get(k, ARCHITECTURE_DEFAULTS[k]) != ARCHITECTURE_DEFAULTS[k]
  ours = {k for group in ROTARY_READING if any(map(named, group)) for k in group}
  changed = []
  for key in ADOPTED_MODEL_KEYS if isinstance(theirs, Mapping) else ():
    # A run saved before an architecture choice existed had GPT-2's.
    value = theirs.get(key, ARCHITECTURE_DEFAULTS.get(key, config.model.get(key)))
    if key in ours:
      # A setting the named scaling does not read (linear's rope_original_max_len) changes no position: unsaid.
      scaling = config.model.get("rope_scaling", "none")
      read = key in ("rope_theta", "rope_scaling") or key in ROPE_SCALING_READS[scaling]
      if value != config.model[key] and read:
        std_logging.getLogger("fmjax").warning(
            "model.%s=%s, where %s has %s: positions are read anew, so its outputs change until the run adapts to "
            "them (extending its context); drop the setting to read them as it did", key,
            config_lib.setting(config.model[key]), source, config_lib.setting(value))
      continue
    if value != config.model.get(key):
      changed.append(f"model.{key}={value!r}")
      with config.unlocked():
        config.model[key] = value
  if isinstance(theirs, Mapping):  # e.g. the source's key/value heads against this config's mesh.tensor
    config_lib.validate(config, jax.device_count(), adopted=True)
  return changed


def _refuse_other_architecture(model_cfg, theirs: Mapping, source: str) -> None:
  ours, other = architecture(model_cfg, canonical=True), architecture(theirs, canonical=True)
  rotary = {k for group in ROTARY_READING for k in group}
  named = [k for k, v in ARCHITECTURE_DEFAULTS.items()
           if k not in rotary and model_cfg.get(k, v) != v and ours[k] != other[k]]
  if named:
    fmt = lambda arch: ", ".join(f"model.{k}={config_lib.setting(arch[k])}" for k in named)
    raise CheckpointMismatchError(f"{source} holds a model with {fmt(other)} but this config sets {fmt(ours)}; a run "
                                  "from its params takes its architecture: drop those settings, or start from a "
                                  "checkpoint of this architecture")


def check_same_model(saved: Mapping, model_cfg, source: str) -> None:
  """One line when `source` (an init_from, whose config.json is `saved`) holds another model than
  `model_cfg` builds: the family and sizes that differ, before any array is read."""
  from fmjax.config_lib import ConfigError
  if "model" not in saved and ("model_type" in saved or "architectures" in saved):
    raise ConfigError(f"init_from={source} is a Hugging Face model directory; import it first (`fmjax import-hf "
                      f"--model_dir={source} --workdir=W`) and pass --config.init_from=W")
  theirs = {k: saved.get("model", {}).get(k) for k in SHAPE_KEYS}
  ours = {k: model_cfg.get(k) for k in SHAPE_KEYS}
  # A rotary model has no position table: max_len is only how far it reads (a run may extend it).
  rotary = all(architecture(m)["positions"] == "rope" for m in (saved.get("model", {}), model_cfg))
  diff = [k for k in SHAPE_KEYS if theirs[k] != ours[k] and not (rotary and k == "max_len")]
  if diff:
    fmt = lambda d: ", ".join(f"{k}={d[k]}" for k in diff)
    # Another family is another config: setting model.family alone keeps this one's objective and tokenizer.
    fix = ("set those model.* values" if "family" not in diff or theirs["family"] not in ("gpt", "bert") else
           f"start from a {theirs['family']} config (configs/{theirs['family']}.py for `fmjax train`, "
           f"configs/finetune_cls.py:model={theirs['family']} for `fmjax finetune`)")
    raise CheckpointMismatchError(f"init_from={source} holds a {theirs['family']} model ({fmt(theirs)}) but this "
                                  f"config builds {ours['family']} ({fmt(ours)}); {fix} or use a checkpoint of this "
                                  "model")


class CheckpointSaveError(RuntimeError):
  """A save that did not reach disk."""


class CheckpointDamagedError(ValueError):
  """A committed step whose files are missing, cut short or unreadable."""


class RunInterrupted(KeyboardInterrupt):
  """Ctrl-C stopped a run at a step boundary after saving that step; rerunning it resumes."""


def _now() -> float:
  return time.monotonic()


def _is_primary() -> bool:
  return jax.process_index() == 0


def _scan(directory: epath.Path) -> tuple[dict[int, epath.Path], list[epath.Path]]:
  """Splits the entries of `directory` into committed steps and torn (unfinished) saves.

  Torn: Orbax's temporary directories, and step directories without a commit marker newer than
  every committed step (a save cut short; on GCS Orbax writes into the step's own directory).
  Older step directories without a marker are no save in flight (one an Orbax before 0.12 wrote
  without it, say): they are neither listed nor torn, so nobody deletes them.
  """
  committed, unmarked, torn = {}, [], []
  if not directory.exists():
    return committed, torn
  for path in directory.iterdir():
    name = path.name
    if _TMP_MARKER in name:
      torn.append(path)
    elif name.isdigit() and path.is_dir():
      if (path / COMMIT_MARKER).exists():
        committed[int(name)] = path
      else:
        unmarked.append(path)
  newest = max(committed, default=-1)
  torn += [path for path in unmarked if int(path.name) > newest]
  return committed, torn


def _torn(directory: epath.Path) -> list[epath.Path]:
  """The unfinished saves an owner removes (`_scan`'s torn).

  One save is in flight at a time, so a save cut short leaves at most one step directory without
  the commit marker past the committed ones. Several such are no interrupted save (checkpoints
  copied without their markers, say), and are refused rather than deleted.
  """
  torn = _scan(directory)[1]
  steps = sorted(int(p.name) for p in torn if p.name.isdigit())
  if len(steps) > 1:
    raise CheckpointDamagedError(
        f"{directory} holds steps {steps} without Orbax's commit marker ({COMMIT_MARKER}) after every committed "
        f"step; a save cut short leaves one such step, not {len(steps)}, so none was deleted: if they are complete "
        f"copies, put the marker back in each (touch {directory}/STEP/{COMMIT_MARKER}), else delete them")
  return torn


def pick_source_step(saved: Sequence[int], step: int, source: str) -> int:
  """The step to read from another run (`init_from`) that saved `saved`: `step`, or the newest when
  it is 0. Raises ConfigError (one line) when that run holds no checkpoint or not that step."""
  from fmjax.config_lib import ConfigError
  if not saved:
    raise ConfigError(f"init_from={source} holds no checkpoint; train there first or point at another run")
  if step and step not in saved:
    raise ConfigError(f"init_from={source} has no checkpoint at init_from_step={step}; it holds steps "
                      f"{list(saved)} (0 takes the newest)")
  return step or max(saved)


def saved_steps(directory: str) -> list[int]:
  """Committed checkpoint steps under `directory` (a run's `checkpoints/`), ascending; [] when none."""
  return sorted(_scan(files.path(directory))[0])


def _remove(paths: Iterable[epath.Path], directory: epath.Path) -> None:
  paths = list(paths)
  if not paths:
    return
  for path in paths:
    if path.is_dir():
      path.rmtree(missing_ok=True)
    else:
      path.unlink(missing_ok=True)
  logging.warning("Removed %d unfinished checkpoint(s) from %s: %s", len(paths), directory,
                  ", ".join(sorted(p.name for p in paths)))


def _first_line(e: BaseException, limit: int = 200) -> str:
  line = next((l.strip() for l in str(e).splitlines() if l.strip()), "")
  return line[:limit] + ("..." if len(line) > limit else "")


def _write_error(e: BaseException) -> str | None:
  """What went wrong in a failed save (an OSError, or tensorstore's status); None: not a write error."""
  seen = e
  while seen is not None:
    if isinstance(seen, CheckpointSaveError):
      return None
    if isinstance(seen, OSError):
      return f"{type(seen).__name__}: {_first_line(seen)}"
    status = re.match(r"^\s*([A-Z_]+): ", str(seen))
    if status and isinstance(seen, (ValueError, RuntimeError)):
      # Tensorstore's line names its database and files first, the OS error last: "No space left on device".
      code = re.search(r"\[os_error_code='(\d+)'\]", str(seen))
      return f"{status.group(1)}: {os.strerror(int(code.group(1)))}" if code else _first_line(seen)
    seen = seen.__cause__ or seen.__context__
  return None


def _add_filter_once(kind: type[std_logging.Filter], *loggers: str) -> None:
  """Installs a `kind` filter on each named logger that has none yet (each save or read asks again)."""
  for logger in map(std_logging.getLogger, loggers):
    if not any(isinstance(f, kind) for f in logger.filters):
      logger.addFilter(kind())


_logged_write_error: str | None = None  # the last write error Orbax logged (and `_OrbaxWriteErrors` dropped)
_saving_into: set[str] = set()  # the directories Checkpointers in this process save into


class _OrbaxWriteErrors(std_logging.Filter):
  """Drops the error logs of a failed Orbax write (a traceback from each thread the save ran in,
  asyncio's "Task exception was never retrieved" for its writes) and keeps their reason: the failed
  save's CheckpointSaveError says it in one line, naming the step."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    global _logged_write_error
    exc = record.exc_info[1] if record.exc_info else None
    reason = _write_error(exc) if exc is not None else None
    if reason is None:
      return True
    # Orbax's code logged it, or its text names a checkpoint directory (a tensorstore future has no traceback).
    text = f"{record.pathname} {record.getMessage()} {exc}"
    if f"{os.sep}orbax{os.sep}" not in text and not any(d in text for d in _saving_into):
      return True
    _logged_write_error = reason
    return False


def _quiet_failed_writes(directory: epath.Path) -> None:
  """Orbax's error logs of a failed save into `directory` become its one-line CheckpointSaveError
  (`_OrbaxWriteErrors`), and the writes still in flight when Orbax closed their event loop end silently."""
  _saving_into.add(str(directory))
  _add_filter_once(_OrbaxWriteErrors, "absl", "asyncio")
  for logger in map(std_logging.getLogger, ("absl", "asyncio")):  # it keeps a write error's reason, after a
    logger.filters.sort(key=lambda f: not isinstance(f, _OrbaxWriteErrors))  # damaged read too (`_DamagedStepReads`)
  _quiet_closed_event_loops()


_reading_from: set[str] = set()  # the directories Checkpointers in this process read steps from
_failed_reads: set[str] = set()  # those where a read failed on a damaged (or removed) step
_READERS = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorstore{os.sep}")  # the code whose reads outlive a failed one


def _from_readers(exc: BaseException | None, obj: Any = None, text: str = "") -> bool:
  """Whether an error came out of Orbax's or tensorstore's code: a frame of its traceback or its causes',
  the coroutine or task it was collected with, or a log line's text (a task's repr names its coroutine's file)."""
  coro = obj.get_coro() if hasattr(obj, "get_coro") else obj
  files = [text, getattr(getattr(coro, "cr_code", None), "co_filename", "")]
  seen = set()
  while exc is not None and id(exc) not in seen and len(seen) < 20:
    seen.add(id(exc))
    tb = exc.__traceback__
    while tb is not None:
      files.append(tb.tb_frame.f_code.co_filename)
      tb = tb.tb_next
    exc = exc.__cause__ or exc.__context__
  return any(marker in f for f in files for marker in _READERS)


def _leftover_read(exc: BaseException | None, obj: Any = None, text: str = "") -> bool:
  """Whether an error nobody retrieved belongs to a damaged step's reads: it names the damage of a
  directory being read (at times before the first error reaches `_reading`), or, once a read failed on
  a damaged step, it came out of Orbax's or tensorstore's code. Any other error is someone else's to see."""
  seen = exc
  for _ in range(20):
    if seen is None:
      break
    if any(d in str(seen) and _damage(seen, epath.Path(d)) for d in _reading_from):
      return True
    seen = seen.__cause__ or seen.__context__
  return bool(_failed_reads) and _from_readers(exc, obj, text)


class _DamagedStepReads(std_logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" (and "Task was destroyed but it is pending")
  for the reads of a damaged step: Orbax reads a step's arrays in concurrent tasks, and when one fails
  the others' errors are collected unretrieved, at times before the first one reaches `_reading`, which
  names the damage in one line. Other tasks' errors are still logged (`_leftover_read`)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not _leftover_read(exc, text=record.getMessage())


def _quiet_damaged_reads(directory: epath.Path) -> None:
  """Before a read of `directory`'s steps: a damaged step's other failed reads say nothing (`_DamagedStepReads`)."""
  _reading_from.add(str(directory))
  _add_filter_once(_DamagedStepReads, "asyncio")
  _quiet_closed_event_loops()


class _UnreadableStepMetadata(std_logging.Filter):
  """Drops Orbax's error, logged at every listing, that a step's _CHECKPOINT_METADATA (its save and
  commit times) does not parse: the step's arrays and fmjax's own `meta` are read apart from it,
  and a step that cannot be read is named in one line by `_reading`."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to json parse Metadata file")


_add_filter_once(_UnreadableStepMetadata, "absl")


def _no_tensorstore_byte_counts() -> None:
  """Orbax reads tensorstore's byte counters before and after each item it writes or reads, for an I/O
  throughput line logged at INFO (which fmjax quietens); tensorstore's `experimental_collect_matching_metrics`
  leaks the lists it returns (0.1.86: about 30 KB a save of a tiny model on a local disk, more with a bucket's
  metrics), so a run that saves every few minutes for days grew by them without bound. Orbax skips the count
  (and its log line) when it reads None."""
  try:
    from orbax.checkpoint._src.serialization import tensorstore_utils
  except ImportError:  # another Orbax layout: nothing to turn off here
    return
  if hasattr(tensorstore_utils, "get_tensorstore_raw_bytes"):
    tensorstore_utils.get_tensorstore_raw_bytes = lambda direction=None: None


_no_tensorstore_byte_counts()


def _quiet_closed_event_loops() -> None:
  """Once a restore or a save fails, Orbax closes its event loop while tensorstore still completes
  the other reads or writes: their callbacks print "Event loop is closed" tracebacks through
  sys.excepthook, and their coroutines, collected unawaited, print through sys.unraisablehook (at
  exit too). After the one-line damage or save error those say nothing more, nor do the leftovers of a
  damaged step's reads (`_leftover_read`); every other error reaches the previous hooks, also in a
  notebook long after a damaged read."""
  previous = sys.excepthook
  if getattr(previous, "fmjax_quiet", False):
    return

  def hook(kind, value, tb):
    if kind is RuntimeError and str(value) == "Event loop is closed":
      return
    previous(kind, value, tb)

  previous_unraisable = sys.unraisablehook

  def unraisable(info):
    if isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == "Event loop is closed":
      return
    if _leftover_read(info.exc_value, info.object, info.err_msg or ""):
      return
    previous_unraisable(info)

  hook.fmjax_quiet = True
  sys.excepthook, sys.unraisablehook = hook, unraisable


def _damage(e: BaseException, step_dir: epath.Path) -> str | None:
  """What a failed read says about a committed step's files; None for errors that are no damage."""
  if isinstance(e, (CheckpointMismatchError, CheckpointDamagedError)):
    return None
  text = str(e)
  if isinstance(e, json.JSONDecodeError):
    return f"a JSON file is cut short or garbled: {e.msg}"
  if isinstance(e, FileNotFoundError):
    return f"missing {os.path.relpath(e.filename, step_dir) if e.filename else _first_line(e)}"
  if isinstance(e, KeyError) and "not found in the checkpoint" in text:
    return _first_line(e).strip("'\"")
  match = _DAMAGE_CODES.match(text) if isinstance(e, ValueError) else None
  if match is None:
    return None
  # The most specific file of the step it names (the error also quotes the spec it opened).
  named = [f.rstrip("\\") for f in re.findall(r'"([^"]+)"', text) if f.startswith(str(step_dir) + "/")]
  where = os.path.relpath(max(named, key=len), str(step_dir)) if named else _first_line(e, 120)
  return f"{match.group(1)} reading {where}"


def _jsonable(value: Any, where: str = "meta") -> Any:
  """Converts numpy/jax scalars and tuples to JSON types; fails early on anything else."""
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
  if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
    return np.asarray(value).item()
  if isinstance(value, np.generic):
    return value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(f"checkpoint metadata {where} has a {type(value).__name__}, which JSON cannot hold; "
                  "pass plain numbers, strings, lists and dicts")


def _abstract_leaf(x: Any) -> jax.ShapeDtypeStruct:
  sharding = getattr(x, "sharding", None)
  if sharding is None:
    if jax.process_count() > 1:
      raise ValueError("restore needs a sharding on every abstract leaf in a multi-process run; "
                       "build the abstract state with jax.ShapeDtypeStruct(shape, dtype, sharding=...)")
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _is_abstract_leaf(x: Any) -> bool:
  return isinstance(x, (jax.ShapeDtypeStruct, jax.Array))


class _KeepScheduled:
  """Orbax preservation policy: the newest `n` scheduled checkpoints (None: all), and the newest
  checkpoint whatever made it.

  Steps in `at_stop` were saved only because the run stopped early (Ctrl-C, a preemption). They
  do not count toward `n`, and one goes once a newer save lands: stopping a run again and again
  never evicts its periodic checkpoints.
  """

  def __init__(self, n: int | None, at_stop: set[int]):
    self.n, self.at_stop = n, at_stop

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
    del context
    scheduled = [c.step for c in checkpoints if c.step not in self.at_stop]
    kept = set(scheduled if self.n is None else scheduled[-self.n:])
    return [c.step in kept or i == len(checkpoints) - 1 for i, c in enumerate(checkpoints)]


class Checkpointer:
  """Async Orbax checkpoints of `{"step", "params", "opt_state"}` plus JSON metadata.

  Args:
    directory: where step directories live (local path or gs://).
    every_steps: `should_save` is true at multiples of this (0: off).
    every_minutes: `should_save` is also true once this many minutes passed since the last save
      (0: off). Process 0's clock decides and its decision is broadcast.
    keep: how many of the newest scheduled checkpoints to keep (0 or less: keep all); a save made
      only because the run stops early (`save(at_stop=True)`) is not counted, see `_KeepScheduled`.
    keep_period: also keep every checkpoint whose step is a multiple of this (0: off).
    async_save: write in a background thread; `save` returns once arrays are on the host.
    owner: this process trains in `directory` and holds its workdir lock (`lock_workdir`): it
      removes the unfinished saves of an earlier run. Without it (eval, generate, export,
      init_from) nothing is deleted: an unfinished save may be one a running training writes.
  """

  def __init__(self, directory: str, *, every_steps: int = 0, every_minutes: float = 0.0,
               keep: int = 3, keep_period: int = 0, async_save: bool = True, owner: bool = False):
    self.directory = files.path(directory)
    self.every_steps = int(every_steps)
    self.every_minutes = float(every_minutes)
    self._decision: tuple[int, bool] | None = None
    self._last_save_time = _now()
    self._unverified: list[int] = []
    self._listed: set[int] = set()  # committed steps this Checkpointer has seen (`_removed`)
    self._closed = False
    self._owner = bool(owner)
    self._interrupted_step: int | None = None  # a Ctrl-C stopped the run here (`close` raises)
    # Every process looks (a refusal must stop all of a pod's hosts, not leave them waiting below);
    # process 0 cleans up.
    torn = _torn(self.directory) if self._owner else []
    if _is_primary():
      self.directory.mkdir(parents=True, exist_ok=True)
      _remove(torn, self.directory)
    if self._owner and jax.process_count() > 1:  # others must not list the directory while process 0 cleans it
      multihost_utils.sync_global_devices("fmjax_checkpointer_init")
    # All processes must remove the same steps: process 0's reading of the newest step decides.
    at_stop = self._newest_if_saved_at_stop() if self._owner else []
    if self._owner and jax.process_count() > 1:
      newest = int(multihost_utils.broadcast_one_to_all(np.int64(at_stop[0] if at_stop else -1)))
      at_stop = [newest] if newest >= 0 else []
    self._at_stop = set(at_stop)
    policies = [_KeepScheduled(keep if keep > 0 else None, self._at_stop)]
    if keep_period > 0:
      policies.append(ocp.checkpoint_managers.EveryNSteps(keep_period))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        create=True)
    # Registering the handlers up front lets a fresh manager read item metadata and restore a
    # subset of items (a manager that only learns handlers from `save` cannot).
    handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    make = lambda: ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    try:
      self._manager = make()
    except FileNotFoundError as e:
      # A reader beside a training: a step Orbax listed was deleted (checkpoint.keep) before it read
      # the step's time. Listing again sees the steps as they are now.
      if self._owner or not str(e.filename or "").startswith(str(self.directory)):
        raise
      self._manager = make()

  @classmethod
  def of_run(cls, config, workdir: str) -> "Checkpointer":
    """The checkpoints a training run (`train`, `finetune`, `sft`) writes in `workdir`, as its
    `checkpoint` section says."""
    c = config.checkpoint
    return cls(os.path.join(workdir, "checkpoints"), every_steps=c.every_steps, every_minutes=c.every_minutes,
               keep=c.keep, keep_period=c.keep_period, async_save=c.async_save, owner=True)

  def _newest_if_saved_at_stop(self) -> list[int]:
    """The newest committed step if a stop saved it (`save(at_stop=True)`), else []. Older ones went
    when a newer save landed; one that a kill in between left behind counts as scheduled."""
    steps = self.all_steps()
    if not steps:
      return []
    try:
      meta = ocp.JsonCheckpointHandler().restore(self.directory / str(steps[-1]) / "meta")
    except Exception:  # pylint: disable=broad-except  # damaged: the restore says so; here it only counts
      return []
    return steps[-1:] if isinstance(meta, Mapping) and meta.get("saved_at_stop") else []

  # --------------------------------------------------------------------------- listing

  def all_steps(self) -> list[int]:
    """Committed checkpoint steps, ascending."""
    steps = saved_steps(self.directory)
    self._listed.update(steps)
    return steps

  def source_step(self, step: int, source: str) -> int:
    """`pick_source_step` over this directory's steps; the newest is process 0's on every host."""
    saved = self.all_steps()
    if not step and jax.process_count() > 1:
      # `source` may still be training: hosts that list it moments apart would each read their shards
      # of another step, and train on params no checkpoint holds.
      newest = int(multihost_utils.broadcast_one_to_all(np.int64(max(saved, default=-1))))
      saved = [newest] if newest >= 0 else []
    return pick_source_step(saved, step, source)

  def latest_step(self) -> int | None:
    """The newest committed step, or None; an owner also removes unfinished saves."""
    committed, torn = _scan(self.directory)
    self._listed.update(committed)
    # A save in flight looks torn until it commits: only clean up when none is running.
    if torn and self._owner and _is_primary() and not self._manager.is_saving_in_progress():
      _remove(_torn(self.directory), self.directory)
    return max(committed) if committed else None

  # --------------------------------------------------------------------------- saving

  def should_save(self, step: int) -> bool:
    """Whether `step` is due for a save (every_steps and/or every_minutes); same on all hosts."""
    if self._decision is not None and self._decision[0] == step:
      return self._decision[1]  # `save` asks again for the same step: don't re-broadcast
    due = self.every_steps > 0 and step > 0 and step % self.every_steps == 0
    if not due and self.every_minutes > 0:
      due = _now() - self._last_save_time >= self.every_minutes * 60
      if jax.process_count() > 1:
        # Clocks differ between hosts: process 0 decides for all. Its broadcast waits for the step
        # before it, so the host could not queue the next one while this one runs: asked every
        # TIME_CHECK_STEPS steps only, a time-based save is a few steps late, never a step slower.
        due = step % TIME_CHECK_STEPS == 0 and bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
    self._decision = (step, due)
    return due

  def save(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any], *,
           force: bool = False, at_stop: bool = False, unscheduled: bool = False) -> bool:
    """Starts saving `state` ("params", optionally "opt_state") and `meta` at `step`.

    Returns False when `step` is not due (see `should_save`) or already saved. Errors of an
    earlier async save are raised here or by `wait`. `at_stop=True` (implies `force`): the run
    stops early here (Ctrl-C, preemption); unless the step is due anyway, the save is out of
    schedule: kept only while it is the newest, and not counted toward `keep`. `unscheduled=True`
    (with `force` or `at_stop`): out of schedule even when due, for params that must not evict
    the checkpoints before them (those of updates skipped as non-finite).
    """
    if self._closed:
      raise RuntimeError("Checkpointer.save called after close()")
    if step == _ctrl_c_step:
      self._interrupted_step = step
    if not (force or at_stop) and not self.should_save(step):
      return False
    if step in self._manager.all_steps():
      logging.info("Checkpoint for step %d already exists in %s; not saving again", step, self.directory)
      return False
    if "params" not in state:
      raise ValueError(f"the state to save has no 'params' (keys: {sorted(state)})")
    out_of_schedule = unscheduled or (at_stop and not self.should_save(step))
    meta = _jsonable({"step": int(step), "fmjax_version": fmjax.__version__, **meta,
                      **({"saved_at_stop": True} if out_of_schedule else {})})
    args = {"params": ocp.args.StandardSave(state["params"]), "meta": ocp.args.JsonSave(meta)}
    if "opt_state" in state:
      args["opt_state"] = ocp.args.StandardSave(state["opt_state"])
    _quiet_failed_writes(self.directory)
    self._check_unverified()  # a step written earlier that did not commit fails the run here
    global _logged_write_error
    _logged_write_error = None
    if out_of_schedule:
      self._at_stop.add(step)  # before Orbax's save, which applies the preservation policy
    with self._writing([*self._unverified, step]):  # Orbax raises an earlier async save's error here
      self._manager.save(step, args=ocp.args.Composite(**args), force=True)
    self._last_save_time = _now()
    self._unverified.append(step)
    return True

  def wait(self) -> None:
    """Blocks until pending saves are on disk; raises CheckpointSaveError if any of them failed."""
    with self._writing(self._unverified):
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    self._check_unverified(finished=True)

  @contextlib.contextmanager
  def _writing(self, steps: Sequence[int]):
    """Turns a failed write (disk full, no permission) into a one-line CheckpointSaveError."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      reason = _write_error(e)
      if reason is None:
        raise
      self._unverified = []
      raise self._save_failed(steps, reason) from e

  def _save_failed(self, steps: Sequence[int], reason: str) -> CheckpointSaveError:
    failed = sorted(set(steps))
    which = f"step {failed[-1]}" if len(failed) == 1 else f"steps {failed}" if failed else "a step"
    intact = [s for s in self.all_steps() if s not in failed]
    if intact:
      kept = (f"the older steps {intact} are intact; free space or fix the permissions, then rerun the same "
              f"command to resume from step {intact[-1]}")
    else:
      kept = "no earlier checkpoint exists; free space or fix the permissions, then rerun the same command"
    return CheckpointSaveError(f"saving checkpoint {which} to {self.directory} failed ({reason}); {kept}")

  def _check_unverified(self, finished: bool = False) -> None:
    """Raises for saved steps that finished without committing.

    Orbax logs some finalisation errors instead of raising them; a missing commit marker
    catches those too.
    """
    if not finished and self._manager.is_saving_in_progress():
      pending = self._unverified[-1:]
      done = self._unverified[:-1]
    else:
      pending, done = [], self._unverified
    self._unverified = pending
    kept = set(self._manager.all_steps())
    # Steps the keep policy already deleted were committed before (it only drops old ones).
    failed = [step for step in done if step in kept and not (self.directory / str(step) / COMMIT_MARKER).exists()]
    if failed:
      with self._writing(failed):  # the write error itself, where Orbax kept it to raise
        self._manager.wait_until_finished()
        self._manager.check_for_errors()
      raise self._save_failed(failed, _logged_write_error or "it was not committed; the log above names the error")

  def close(self) -> None:
    """Waits for pending saves (raising their errors) and releases the manager.

    Raises RunInterrupted once the save of a step a Ctrl-C stopped the run at is on disk.
    """
    if self._closed:
      return
    try:
      self.wait()
    finally:
      self._closed = True
      self._manager.close()
    if self._interrupted_step is not None:
      _set_ctrl_c_step(None)
      raise RunInterrupted(f"saved step {self._interrupted_step} to {self.directory}; rerun the same command "
                           "to resume from there")

  # --------------------------------------------------------------------------- restoring

  def _require(self, step: int) -> None:
    if not (self.directory / str(step) / COMMIT_MARKER).exists():
      if step in self._listed:
        raise self._removed(step)
      steps = self.all_steps()
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} "
                              f"(available: {steps if steps else 'none'})")

  def _removed(self, step: int) -> CheckpointDamagedError:
    """The one-line error for a step that was committed when this listed it, and is gone: nothing is
    damaged, a run still training there deleted it (its checkpoint.keep) before or while it was read."""
    newest = self.all_steps()
    return CheckpointDamagedError(
        f"checkpoint step {step} in {self.directory} was removed while it was read, by the run still training "
        f"there (its checkpoint.keep); rerun to read its newest step{f' (now step {newest[-1]})' if newest else ''}"
        ", or read a step that run keeps (checkpoint.keep_period)")

  def _damaged(self, step: int, reason: str) -> CheckpointDamagedError:
    """The one-line error for a committed `step` that cannot be read; no silent fallback to another."""
    if not (self.directory / str(step) / COMMIT_MARKER).exists():  # it had one when the read began
      return self._removed(step)
    others = [s for s in self.all_steps() if s != step]
    where = self.directory / str(step)
    if others:
      todo = (f"move {where} out of {self.directory} to resume from step {others[-1]}, or read that step "
              f"instead (--step={others[-1]}, init_from_step={others[-1]}); the other committed steps are {others}")
    else:
      todo = f"no other committed step is there; restore {where} from a copy or start over in a new --workdir"
    return CheckpointDamagedError(f"checkpoint step {step} in {self.directory} is damaged ({reason}); {todo}")

  @contextlib.contextmanager
  def _reading(self, step: int):
    """Turns Orbax's and tensorstore's errors about missing or broken files of `step` into `_damaged`."""
    _quiet_damaged_reads(self.directory)
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  # Orbax wraps tensorstore's errors in a bare Exception
      reason = None
      cause = e
      while cause is not None and reason is None:  # the first error in the chain that names the damage
        reason = _damage(cause, self.directory / str(step))
        cause = cause.__cause__
      # Once the step is gone any error may come out of the read (Orbax's of a half-deleted tree, say).
      if reason is None and (self.directory / str(step) / COMMIT_MARKER).exists():
        raise
      _failed_reads.add(str(self.directory))  # its other reads' leftovers say nothing more (`_leftover_read`)
      raise self._damaged(step, reason) from e

  def _saved_items(self, step: int) -> set[str]:
    """The items Orbax recorded saving in `step` (empty when its metadata cannot be read)."""
    try:
      return set(json.loads((self.directory / str(step) / "_CHECKPOINT_METADATA").read_text())["item_handlers"])
    except (OSError, ValueError, KeyError, TypeError):
      return set()

  def restore(self, step: int, abstract_state: Mapping[str, Any], *,
              items: Sequence[str] = ITEMS, partial: bool = False) -> dict:
    """Reads `items` of `step` into the shardings of `abstract_state`'s leaves.

    `abstract_state` holds the items as trees of `jax.ShapeDtypeStruct` (or arrays) with
    `.sharding`; a "step" leaf, if present, comes back as an int32 array with its sharding.
    With `partial=True` arrays saved but absent from `abstract_state` are skipped: fine-tuning
    passes its trunk's abstract params and initialises the new head itself.
    """
    self._require(step)
    missing = [name for name in items if name not in abstract_state]
    if missing:
      raise ValueError(f"restore asked for {missing} but the abstract state only has {sorted(abstract_state)}")
    plans = check_compatible(self, step, abstract_state, items=items, partial=partial)
    targets = {}
    for name in items:
      target = jax.tree.map(_abstract_leaf, abstract_state[name], is_leaf=_is_abstract_leaf)
      # Orbax reads whole saved trees: a partial or relaid restore names every saved array.
      targets[name] = self._full_target(step, name, target, plans[name]) if partial or plans[name] else target
    with self._reading(step):
      restored = self._manager.restore(step, args=ocp.args.Composite(
          **{name: ocp.args.StandardRestore(target) for name, target in targets.items()}))
    out = {name: restored[name] for name in items}
    for name in items:
      if partial or plans[name]:
        out[name] = _pick(out[name], abstract_state[name], plans[name])
    if "step" in abstract_state:
      leaf = _abstract_leaf(abstract_state["step"])
      out["step"] = jax.make_array_from_callback((), leaf.sharding, lambda _: np.asarray(step, np.int32))
    return out

  def _full_target(self, step: int, item: str, target: Any, plan: Mapping[tuple, tuple]) -> Any:
    """The saved tree of `item`, with `target`'s leaves where it has them.

    Orbax's StandardRestore reads whole trees only; the arrays nobody asked for are read
    replicated and dropped by `_pick`. Arrays saved in the other layer layout (`plan`) are read
    sharded as their layers will be, plus or minus the leading layer axis.
    """
    wanted = dict(_flat_keys(target))
    relaid = {}  # saved path: (dtype, sharding) of the arrays read for the other layout
    for keys, (kind, source, *_) in plan.items():
      leaf = wanted.pop(keys)
      for src in _sources(source):
        relaid[src] = (leaf.dtype, _layer_axis(leaf.sharding, add=kind == "take"))
    first = next(iter(wanted.values()), None)
    if first is not None and isinstance(first.sharding, jax.sharding.NamedSharding):
      spare = jax.sharding.NamedSharding(first.sharding.mesh, jax.sharding.PartitionSpec())
    else:
      spare = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(path, meta):
      keys = _path_keys(path)
      if keys in wanted:
        return wanted[keys]
      dtype, where = relaid.get(keys, (meta.dtype, spare))
      return jax.ShapeDtypeStruct(meta.shape, dtype, sharding=where)

    return jax.tree_util.tree_map_with_path(leaf, self.item_metadata(step, item), is_leaf=_has_shape)

  def restore_meta(self, step: int) -> dict:
    """The JSON metadata saved with `step`."""
    self._require(step)
    if not (self.directory / str(step) / "meta").exists():
      raise self._damaged(step, "its 'meta' item is missing")
    with self._reading(step):
      return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def item_metadata(self, step: int, item: str) -> Any:
    """Orbax's metadata tree (shapes, dtypes; no array data) of one item of `step`, or None if never saved.

    Raises CheckpointDamagedError for an item that was saved (params always is) but is gone or unreadable.
    """
    self._require(step)
    if not (self.directory / str(step) / item).exists():
      if item == "params" or item in self._saved_items(step):
        raise self._damaged(step, f"its {item!r} item is missing")
      return None
    with self._reading(step):
      metadata = self._manager.item_metadata(step)[item]
    tree = getattr(metadata, "tree", metadata)
    if tree is None:
      raise self._damaged(step, f"the metadata of its {item!r} item is missing")
    return tree


# ----------------------------------------------------------------------------- compatibility


def _key_str(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _has_shape(x: Any) -> bool:
  return hasattr(x, "shape")


def _path_keys(path: tuple) -> tuple[str, ...]:
  """A key path as strings: Orbax saves namedtuples as dicts of their fields, tuples as lists."""
  return tuple(map(_key_str, path))


def _flat_keys(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
  return [(_path_keys(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_has_shape)[0]]


def _pick(restored: Any, abstract: Any, plan: Mapping[tuple, tuple]) -> Any:
  """The leaves of `abstract`'s paths from the (larger) `restored` tree, in `abstract`'s structure.

  Leaves in `plan` are built from the restored arrays of the other layer layout (a layer taken
  out of a stacked array, or the layers stacked), in one jitted program that writes them
  straight into `abstract`'s shardings.
  """
  def lookup(keys):
    node = restored
    for key in keys:
      node = node[key] if isinstance(node, Mapping) else node[int(key)]
    return node

  flat = _flat_keys(abstract)
  if plan:
    relaid = [(keys, leaf) for keys, leaf in flat if keys in plan]
    sources = {src: lookup(src) for _, source, *_ in plan.values() for src in _sources(source)}

    def relayout(sources):
      out = []
      for keys, _ in relaid:
        kind, source, *index = plan[keys]
        out.append(sources[source][index[0]] if kind == "take" else jnp.stack([sources[s] for s in source]))
      return out
    shardings = [getattr(leaf, "sharding", None) for _, leaf in relaid]
    built = dict(zip([keys for keys, _ in relaid], jax.jit(relayout, out_shardings=shardings)(sources)))
  treedef = jax.tree_util.tree_structure(abstract, is_leaf=_has_shape)
  return jax.tree_util.tree_unflatten(treedef, [built[keys] if keys in plan else lookup(keys) for keys, _ in flat])


def _shapes(tree: Any) -> dict[tuple[str, ...], tuple]:
  """`{("blocks", "0", "kernel"): shape}` for every array leaf; namedtuple fields count as keys."""
  return {keys: tuple(getattr(leaf, "shape", ())) for keys, leaf in _flat_keys(tree)}


# ----------------------------------------------------------------------------- layer layouts


def _relayout_plan(saved: Mapping[tuple, tuple], expected: Iterable[tuple]) -> dict[tuple, tuple]:
  """Where the expected arrays lie in a checkpoint saved in the other layer layout.

  A scanned model holds its blocks stacked (`.../blocks/kernel`, a leading axis of layers), an
  unrolled one a subtree per layer (`.../blocks/3/kernel`). Each expected path that the
  checkpoint holds only in the other layout maps to `("take", saved path, i)` (layer i of a
  stacked array) or `("stack", [saved paths of layers 0, 1, ...])`; the rest are left out.
  """
  plan = {}
  for keys in expected:
    if keys in saved or STACK_KEY not in keys:
      continue
    cut = keys.index(STACK_KEY) + 1
    head, tail = keys[:cut], keys[cut:]
    if tail and tail[0].isdigit() and head + tail[1:] in saved:
      plan[keys] = ("take", head + tail[1:], int(tail[0]))
    elif head + ("0",) + tail in saved:
      layers = itertools.takewhile(saved.__contains__, (head + (str(i),) + tail for i in itertools.count()))
      plan[keys] = ("stack", list(layers))
  return plan


def _sources(source: tuple | list) -> list[tuple]:
  """The saved paths a plan entry reads: one stacked array, or a list of per-layer ones."""
  return source if isinstance(source, list) else [source]


def _in_layout(saved: dict[tuple, tuple], plan: Mapping[tuple, tuple]) -> tuple[dict[tuple, tuple], list[str]]:
  """The saved shapes as the expected layout sees them, and what does not fit: a stacked array
  whose layers the model does not take one for one (another number of layers)."""
  out, taken = dict(saved), {}
  for keys, (kind, source, *index) in plan.items():
    if kind == "take":
      out[keys] = saved[source][1:]
      taken.setdefault(source, set()).add(index[0])
    else:
      out[keys] = (len(source),) + saved[source[0]]
      for src in source:
        out.pop(src, None)
  problems = []
  for source, layers in taken.items():
    out.pop(source, None)
    if layers != set(range(saved[source][0])):
      problems.append(f"{'/'.join(source)}: saved with {saved[source][0]} layers stacked, the model has "
                      f"{len(layers)}")
  return out, problems


def _layer_axis(where: Any, *, add: bool) -> Any:
  """`where` (a sharding) with a leading layer axis added (unsharded) or removed."""
  if not isinstance(where, jax.sharding.NamedSharding):
    return where
  spec = tuple(where.spec)
  return jax.sharding.NamedSharding(where.mesh, jax.sharding.PartitionSpec(*((None,) + spec if add else spec[1:])))


def _fmt(shape: tuple) -> str:
  return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def check_compatible(checkpointer: Checkpointer, step: int, abstract_state: Mapping[str, Any], *,
                     items: Sequence[str] | None = None, partial: bool = False) -> dict[str, dict]:
  """Raises CheckpointMismatchError unless the saved items have the model's paths and shapes.

  Reads only Orbax's metadata files, so a wrong checkpoint fails before any array is read.
  Dtypes may differ (restore casts). `partial=True` allows saved arrays the model lacks. Returns
  each item's `_relayout_plan` (empty where the checkpoint has the model's layer layout).
  """
  if items is None:
    items = [name for name in ITEMS if name in abstract_state]
  details, summaries, total, plans = [], [], 0, {}
  for name in items:
    saved_tree = checkpointer.item_metadata(step, name)
    if saved_tree is None:
      if name == "opt_state":  # params alone (a release's or an import's checkpoint): nothing to resume
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {checkpointer.directory} holds no optimizer state, so a run cannot resume "
            "it; to train from its params, start a new --workdir with --config.init_from=<the workdir it is in> "
            "(in Python: restore items=('params',))")
      raise CheckpointMismatchError(f"checkpoint step {step} in {checkpointer.directory} has no {name!r} "
                                    "item; restore only the items it has (e.g. items=('params',))")
    expected = _shapes(abstract_state[name])
    saved = _shapes(saved_tree)
    plans[name] = _relayout_plan(saved, expected)
    saved, problems = _in_layout(saved, plans[name])
    problems = [] if partial else [f"{name}/{p}" for p in problems]  # partial: any subset of layers
    for keys in sorted(saved.keys() | expected.keys()):
      path = "/".join((name, *keys))
      if keys not in saved:
        problems.append(f"{path}: not in checkpoint, model expects {_fmt(expected[keys])}")
      elif keys not in expected:
        if partial:
          continue
        problems.append(f"{path}: in checkpoint {_fmt(saved[keys])}, not in model")
      elif saved[keys] != expected[keys]:
        problems.append(f"{path}: saved {_fmt(saved[keys])}, model expects {_fmt(expected[keys])}")
    if problems and details:
      # The optimizer's moments mirror the parameters: one line says so without repeating them.
      summaries.append(f"{name}: {len(problems)} mismatched array(s) as well")
    else:
      details = problems
    total += len(problems)
  if total:
    lines = details[:_MAX_LISTED]
    if len(details) > len(lines):
      lines.append(f"... and {len(details) - len(lines)} more")
    raise CheckpointMismatchError(
        f"checkpoint step {step} in {checkpointer.directory} does not fit this model "
        f"({total} mismatched array(s)); use the model config it was saved with "
        "(see its meta/config) or another checkpoint:\n  " + "\n  ".join(lines + summaries))
  return plans


# ----------------------------------------------------------------------------- config changes

# Keys that change the meaning or shape of the saved state, or which batches come next.
_BREAKING_PREFIXES = ("model.", "data.", "optim.", "train.objective", "train.batch_size", "train.seed",
                      "task.", "finetune.", "sft.", "dpo.", "init_from", "init_from_step")  # fine-tuning: its setup
# Exceptions to the above: where things run, how fast, or optimizer hyperparameters that leave the
# state's structure alone (reported to the user, not refused).
_HARMLESS = {
    "data.prefetch", "data.cache_dir", "data.data_dir", "data.bucket_reads", "data.prepare_workers",
    "model.attention", "model.remat", "model.scan_layers",  # restore converts the layer layout
    "model.fused_loss_chunk",  # the same loss, computed in chunks
    "model.dtype",  # the compute dtype: the parameters keep model.param_dtype (bf16 to float32 to chase a NaN)
    "optim.lr", "optim.schedule", "optim.warmup_steps", "optim.min_lr_ratio", "optim.decay_fraction",
    "optim.weight_decay", "optim.b1", "optim.b2", "optim.eps", "optim.clip_norm",  # but turning clipping on or off breaks
}


# Where a pretraining run's text files are: a corpus that moved resumes from its new place. Its
# cache is keyed by the files' contents, and `train` warns when the rows it reads differ from
# those the run trained on. (An SFT, DPO or fine-tuning run's files are its examples: breaking there.)
_WHERE_THE_TEXT_IS = ("data.files",)


# Keys added to a breaking section since fmjax's first runs, and the value that does what a run
# saved before the key did, so that such a run resumes (a new key needs its entry here; a test
# holds the list). Classifier heads all had a bias; F1's class came from the labels. The default
# data.shard_docs keeps the cache key, so such a run goes on with the cache it made; where that
# cache was made again since, in parts, `train` says its rows past the first part differ.
_BEFORE_THE_KEY = {
    "finetune.head_bias": True, "task.positive_label": "", "task.max_train_examples": 0,
    "finetune.pooling": "auto", "optim.mu_dtype": "float32", "model.attention_dropout": 0.0,
    "init_from_step": 0, "data.shard_docs": 65536, "optim.decay_fraction": 0.2,
    # Runs saved before the decoder's architecture choices had GPT-2's (and BERT's).
    **{f"model.{k}": v for k, v in ARCHITECTURE_DEFAULTS.items()},
    # An SFT run saved before SFT had a `finetune` section trained every parameter (classifiers always had one).
    **{f"finetune.{k}": v for k, v in config_lib.peft_section().items()},
    # An SFT run saved before conversations read (prompt, completion) rows alone.
    "sft.messages_key": "messages", "sft.chat_template": "",
}


def _normalise(value: Any) -> Any:
  # Saved configs went through JSON: tuples came back as lists.
  return json.loads(json.dumps(value, default=str))


def _same_mixture(old: Any, new: Any, *, but_files: bool = False) -> bool:
  """Whether two data.dataset values are one mixture written two ways (`a=6,b=2` and `a=3, b=1`);
  `but_files`: one whose items' own `files` may name other paths (text that moved)."""
  from fmjax.config_lib import ConfigError
  from fmjax.data import sources

  def items(dataset: str):
    parts = sources.mixture(dataset)
    if parts is None or not but_files:
      return parts
    return [((name, {k: v for k, v in settings.items() if k != "files"}), share)
            for (name, settings), share in ((sources.item_settings(item), share) for item, share in parts)]

  if not (isinstance(old, str) and isinstance(new, str)):
    return False
  try:
    parts = items(new)
    return parts is not None and items(old) == parts
  except ConfigError:
    return False


def _before_kv_heads(rules: Any) -> Any:
  """A rule list saved before grouped-query attention, as the defaults now write it: with the kv_heads rule
  (the heads' mesh axes) after the heads' own, which no model of such a run read."""
  if not isinstance(rules, list) or any(r[0] == "kv_heads" for r in rules) or \
      not any(r[0] == "heads" for r in rules):
    return rules
  i = next(i for i, r in enumerate(rules) if r[0] == "heads")
  return rules[:i + 1] + [["kv_heads", rules[i][1]]] + rules[i + 1:]


def _clips(clip_norm: Any) -> bool:
  """Whether `optim.clip_norm` puts a clipping stage (a slot of the optimizer state) in the chain."""
  return isinstance(clip_norm, (int, float)) and clip_norm > 0


def _is_breaking(key: str) -> bool:
  if key in _HARMLESS:
    return False
  return any(key == p or key.startswith(p if p.endswith(".") else p + ".") for p in _BREAKING_PREFIXES)


def config_changes(saved_cfg: Mapping[str, Any], new_cfg: Mapping[str, Any]) -> tuple[list[str], list[str]]:
  """Compares a checkpoint's config with a resuming run's: `(breaking, harmless)`.

  Each entry reads `key: old -> new`. Breaking changes alter the model, the data stream or the
  optimizer state's structure (model.*, data.*, optim.* beyond hyperparameters, train.objective,
  train.batch_size, train.seed), or make a fine-tuning run another experiment (task.*,
  finetune.*, sft.*, dpo.*, init_from); everything else (steps, logging, eval, checkpoint, mesh, lr) is
  harmless and only worth reporting.
  """
  from fmjax import config_lib
  saved, new = config_lib.flatten(saved_cfg), config_lib.flatten(new_cfg)
  breaking, harmless = [], []
  for key in sorted(saved.keys() | new.keys()):
    old_v = _normalise(saved.get(key, _BEFORE_THE_KEY.get(key, "<unset>")))
    new_v = _normalise(new.get(key, "<unset>"))
    if old_v == new_v or (isinstance(old_v, float) and isinstance(new_v, float)
                          and math.isnan(old_v) and math.isnan(new_v)):
      continue
    if key == "data.dataset" and _same_mixture(old_v, new_v):
      continue
    if key == "logical_axis_rules" and _before_kv_heads(old_v) == new_v:
      continue
    moved = ((key in _WHERE_THE_TEXT_IS or key == "data.dataset" and _same_mixture(old_v, new_v, but_files=True))
             and not any(k.split(".")[0] in ("sft", "dpo", "task") for k in new))
    change = f"{key}: {old_v!r} -> {new_v!r}"
    if key == "optim.clip_norm" and _clips(old_v) != _clips(new_v):
      breaking.append(f"{change} (clipping turned {'on' if _clips(new_v) else 'off'}: the optimizer state "
                      "has another structure)")
      continue
    (breaking if _is_breaking(key) and not moved else harmless).append(change)
  return breaking, harmless


# ----------------------------------------------------------------------------- preemption

# The step a Ctrl-C stopped the step loop at: the Checkpointer that saves it raises RunInterrupted
# from `close`, once the save is on disk, so `fmjax` exits 130 and says where the run stands.
_ctrl_c_step: int | None = None


def _set_ctrl_c_step(step: int | None) -> None:
  global _ctrl_c_step
  _ctrl_c_step = step


class Terminated(KeyboardInterrupt):
  """SIGTERM while a run was starting (its data, restore or compile), before a step loop could take it."""
  exit_code = 143  # as for a preemption that saved: a rerun goes on


@contextlib.contextmanager
def sigterm_stops_the_start():
  """Within it, SIGTERM raises `Terminated` at once, where the run is, so a preemption or a scheduler
  that stops a run before its step loop begins ends it as a Ctrl-C would: a workdir it created and
  saved nothing in is removed, and the command says so in one line. The step loop's
  PreemptionWatcher takes SIGTERM over while it runs, to save first. Where JAX's preemption service
  owns SIGTERM (a pod), or off the main thread, nothing changes.
  """
  global _step_loop_began
  if PreemptionWatcher._jax_owns_sigterm():
    yield
    return
  def stop(signum, frame):
    if _step_loop_began:  # the loop ended (it saved its last step): let the save in flight land
      logging.warning("SIGTERM after the step loop: finishing the last save first (a second SIGTERM stops at once)")
      signal.signal(signal.SIGTERM, signal.SIG_DFL)
      return
    raise Terminated("SIGTERM before the step loop could save: nothing new was saved; rerun the same command "
                     "to go on")
  try:
    previous = signal.signal(signal.SIGTERM, stop)
  except ValueError:  # not the main thread
    yield
    return
  _step_loop_began = False
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


_step_loop_began = False  # set by a PreemptionWatcher: SIGTERM is the step loop's to take from then on


class PreemptionWatcher:
  """Turns SIGTERM and a first Ctrl-C (SIGINT) into a clean stop at the next step boundary.

  Call `should_stop(step)` once per step on every process, from the same first step. With a
  `jax.distributed` client JAX's own preemption service catches SIGTERM and
  `reached_preemption_sync_point` picks a step all hosts agree on; otherwise a Python handler
  sets a flag (shared across processes by an all-gather at every TIME_CHECK_STEPS-th step if there
  are several). A second SIGTERM kills the process as usual; a second Ctrl-C raises
  KeyboardInterrupt at once. After a Ctrl-C stop the Checkpointer that saved the step raises
  RunInterrupted from `close`.
  """

  def __init__(self):
    global _step_loop_began
    self.received: list[int] = []  # the signals caught, in order
    self._previous: dict[int, Any] = {}
    _set_ctrl_c_step(None)
    _step_loop_began = True
    # JAX's preemption notifier owns SIGTERM once a distributed client exists: a Python handler
    # would replace it and the hosts would never learn of the notice. A Ctrl-C there reaches only
    # the hosts it is typed into, which could not agree on a step: it interrupts as usual.
    signums = [] if self._jax_owns_sigterm() else [signal.SIGTERM, signal.SIGINT]
    try:
      for signum in signums:
        self._previous[signum] = signal.signal(signum, self._handle)
    except ValueError:  # not the main thread: signals cannot be caught here
      logging.warning("PreemptionWatcher created off the main thread; SIGTERM and Ctrl-C will not be caught")

  @staticmethod
  def _jax_owns_sigterm() -> bool:
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)

  def _handle(self, signum, frame):
    if signum in self.received:  # asked twice: stop waiting for a step boundary
      if signum == signal.SIGINT:
        raise KeyboardInterrupt
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    first = not self.received
    self.received.append(signum)
    if not first:
      return  # e.g. `fmjax sweep` sends SIGTERM to runs a Ctrl-C already stops: they save either way
    if signum == signal.SIGINT:
      logging.warning("Ctrl-C: will save and stop at the next step boundary; press Ctrl-C again to abort at "
                      "once without saving")
    else:
      logging.warning("Received signal %d: will save and stop at the next step boundary", signum)

  def should_stop(self, step: int) -> bool:
    """True on every process at the same step once any of them got SIGTERM (or Ctrl-C)."""
    local = max(self.received, default=0)  # SIGTERM (15) wins over SIGINT (2): a preemption, not a user
    if self._jax_owns_sigterm():
      stop = multihost_utils.reached_preemption_sync_point(int(step))
      reason = signal.SIGTERM
    elif jax.process_count() > 1:
      # Every TIME_CHECK_STEPS steps: the all-gather waits for the steps before it on the devices, and
      # asked each step it would stop the host from dispatching ahead. The stop is a few steps late.
      if step % TIME_CHECK_STEPS:
        return False
      reason = int(np.max(multihost_utils.process_allgather(np.int32(local))))
      stop = reason > 0
    else:
      reason, stop = local, bool(local)
    if stop:
      logging.warning("%s: stopping at step %d", "Ctrl-C" if reason == signal.SIGINT else "Preemption", step)
      _set_ctrl_c_step(int(step) if reason == signal.SIGINT else None)
    return bool(stop)

  def close(self) -> None:
    """Puts back the signal handlers that were there before."""
    for signum, previous in self._previous.items():
      signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    self._previous = {}


# ----------------------------------------------------------------------------- workdir lock


class WorkdirLock:
  """An exclusive `flock` on a workdir's `.lock` file; `release` (or leaving a `with`) lets it go."""

  def __init__(self, file=None):
    self._file = file

  def release(self) -> None:
    """Unlocks the workdir for the next training (empties the holder's name first)."""
    if self._file is not None:
      self._file.truncate(0)
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def __enter__(self) -> "WorkdirLock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def lock_workdir(workdir: str) -> WorkdirLock:
  """Locks `workdir` for one training run (train, finetune, sft) until `release()`.

  A second run on the same workdir would delete the first one's newest save and interleave its
  metrics: it fails at once with a ConfigError naming the holder. The lock file stays (deleting
  it would let a third run lock a new file while the second holds the old one); the lock itself
  goes with the process, however it ends. Only process 0 locks: the hosts of a pod share one
  workdir. Object stores (gs://) have no locks, so such workdirs are not locked.
  """
  from fmjax.config_lib import ConfigError
  lock, holder = WorkdirLock(), None
  if _is_primary() and "://" not in str(workdir):
    try:
      got = files.try_lock(os.path.join(workdir, LOCK_FILE), f"pid {os.getpid()} on {socket.gethostname()}\n")
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise
      logging.warning("%s cannot be locked (%s); make sure no other run trains there", workdir, e.strerror)
    else:
      if isinstance(got, str):
        holder = got or "pid unknown"
      else:
        lock = WorkdirLock(got)
  busy = holder is not None
  if jax.process_count() > 1:  # every host stops, not only process 0
    busy = bool(multihost_utils.broadcast_one_to_all(np.int32(busy)))
  if busy:
    raise ConfigError(f"another fmjax process is training in {workdir} ({holder or 'see process 0'}); "
                      "wait for it or use another --workdir")
  return lock
