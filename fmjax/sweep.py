"""`fmjax sweep`: a config's `get_sweep()` as named runs, run locally or printed as commands.

  fmjax sweep --config=configs/gpt.py:tiny,runlocal --workdir=/tmp/lr_sweep --parallel=2
  fmjax sweep --config=configs/gpt.py:tiny --workdir=gs://BUCKET/lr --print_commands
  fmjax sweep --config=configs/gpt.py:tiny --workdir=gs://BUCKET/lr --launch='all --tpu=lr --accelerator=v5p-8'

`get_sweep()` returns a list of override dicts, e.g. `[{"optim.lr": 1e-3}, {"optim.lr": 3e-3}]`;
`product` and `zip` build such lists:

  sweep.product({"optim.lr": [1e-3, 3e-3]}, {"train.seed": [0, 1, 2]})   # 6 runs
  sweep.zip({"model.d_model": [64, 128]}, {"model.num_heads": [2, 4]})    # 2 runs

Two keys are not config keys: `config` sets the `get_config` arg of that run (`{"config":
"small"}` runs `configs/gpt.py:small`; its flags replace those of `--config`, its `key=value`
pairs join them, and a key that both give differently is refused) and `command` names the
subcommand (default `train`, e.g. `finetune`). Each run lives in `ROOT/<name>`, where the name
spells its overrides (`optim.lr=0.001,train.seed=1`). A `--config.a.b=v` override of a key the
sweep sets per run is refused, since the run's value would win.

A run that exited cleanly leaves a `SWEEP_DONE` marker holding its command and resolved config,
and is skipped next time while both are the same (an edited config file or another override runs
it again). Any other run is simply started again (losing the markers of its last exit first), and
`train` resumes it from its own checkpoint. One sweep at a time runs in a root. A run that saved
and stopped on SIGTERM (exit code 143) is reported as preempted, not finished; SIGTERM to the
sweep itself is passed on to its runs, which save first, and the runs still queued are reported
as not started.
At the end the final losses go to `ROOT/sweep.md` and `ROOT/sweep.csv` (status done, preempted,
failed, partial or not started; mean ± std over seeds when runs differ only in a `*seed` key) and
eval loss curves to `ROOT/sweep_eval_loss.png`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import difflib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Iterable, Sequence, TextIO

from fmjax import config_lib, files
from fmjax.config_lib import ConfigError

DONE_MARKER = "SWEEP_DONE"
STATUS_MARKER = "SWEEP_STATUS"  # how a run that did not finish last exited: preempted or failed
RUNS_FILE = "sweep.json"
RESERVED_KEYS = ("config", "command")
_MAX_NAME = 180


# ----------------------------------------------------------------------------- building sweeps


def product(*axes: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
  """Cartesian product: each axis is `{key: [values]}`; keys of one axis vary together (zipped)."""
  seen = set()
  for axis in axes:
    if seen & axis.keys():
      raise ConfigError(f"sweep.product: {', '.join(sorted(seen & axis.keys()))} is in more than one axis; give each "
                        "key one axis")
    seen |= axis.keys()
  entries = [{}]
  for axis in axes:
    entries = [{**e, **z} for e in entries for z in zip(axis)]
  return entries


def zip(*axes: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:  # noqa: A001 (sweep.zip reads well)
  """Element-wise: all value lists (across and within the given dicts) must be the same length."""
  merged = {k: list(v) for axis in axes for k, v in axis.items()}
  lengths = {k: len(v) for k, v in merged.items()}
  if len(set(lengths.values())) > 1:
    raise ConfigError(f"sweep.zip needs value lists of one length, got {lengths}")
  n = next(iter(lengths.values()), 0)
  return [{k: v[i] for k, v in merged.items()} for i in range(n)]


def _format_value(value: Any) -> str:
  """The override text for a value, parsed back to the same value by config_lib.parse_value."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value)


def run_name(entry: dict[str, Any]) -> str:
  """`{"optim.lr": 1e-3, "train.seed": 1}` -> `optim.lr=0.001,train.seed=1`, safe as a directory name."""
  if not entry:
    return "base"
  name = ",".join(f"{k}={_format_value(v)}" for k, v in entry.items())
  name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
  if len(name) > _MAX_NAME:  # keep it readable and unique: a prefix plus a hash of the whole
    import hashlib
    name = name[:_MAX_NAME - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
  return name


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep: its name, config spec, `a.b=v` overrides and subcommand."""
  name: str
  spec: str
  overrides: tuple[str, ...]
  entry: tuple[tuple[str, Any], ...]
  command: str = "train"

  def argv(self, root: str, program: Sequence[str] = ("fmjax",)) -> list[str]:
    """The command line that runs this run in `root/name`."""
    return [*program, self.command, f"--config={self.spec}", f"--workdir={os.path.join(root, self.name)}",
            *(f"--config.{o}" for o in self.overrides)]


def launch_argv(launch: str, index: int, run: Run, root: str) -> list[str]:
  """The `fmjax launch` command line of a sweep's `index`th run. `launch` is what follows `fmjax
  launch` for every run: its mode and target (`all --tpu=lr --accelerator=v5p-8 --spot`, `xpk
  --cluster=C --workload=lr ...`); each run gets a target of its own, NAME-<index>, and the run's
  command, config, workdir and overrides."""
  from fmjax import launch as launch_lib
  args = shlex.split(launch)
  modes = (*launch_lib.MODES, "xpk")
  if not args or args[0] not in modes:
    raise ConfigError(f"--launch={launch!r} must start with a launch mode ({', '.join(modes)}), e.g. "
                      "--launch='all --tpu=NAME --accelerator=v5p-8' or --launch='xpk --cluster=C --workload=NAME'")
  flag = "--workload" if args[0] == "xpk" else "--tpu"
  theirs = [a for a in args if a.split("=", 1)[0] in ("--command", "--workdir") or a.startswith("--config")]
  if theirs:
    raise ConfigError(f"--launch sets {theirs[0]}, which the sweep sets per run; give config overrides to "
                      "fmjax sweep itself")
  target = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
  target.add_argument(flag, default="")
  try:
    given, kept = target.parse_known_args(args)
  except argparse.ArgumentError as e:
    raise ConfigError(f"--launch={launch!r}: {e}") from None
  name = getattr(given, flag[2:])
  argv = ["fmjax", "launch", *kept, f"{flag}={name}-{index}", f"--command={run.command}",
          *run.argv(root, program=())[1:]]
  try:
    launch_lib.check_name(flag, name and f"{name}-{index}")
    launch_lib.spec_from_args(argv[2:])
  except launch_lib.LaunchError as e:
    raise ConfigError(f"--launch={launch!r}: {e}") from None
  return argv


def expand(base_spec: str, entries: Iterable[dict[str, Any]], base_overrides: Sequence[str] = (),
           subcommand: str = "train") -> list[Run]:
  """Turns sweep entries into named runs; base overrides (from the command line) apply to all."""
  path, base_arg = config_lib.split_config_spec(base_spec)
  runs, seen, sorted_seen = [], {}, {}
  given = {o.split("=", 1)[0]: o for o in base_overrides}
  for entry in entries:
    if not isinstance(entry, dict):
      raise ConfigError(f"get_sweep() must return a list of dicts of overrides, got an entry {entry!r}")
    for key in entry:
      close = difflib.get_close_matches(key, RESERVED_KEYS, n=1, cutoff=0.8) if "." not in key else []
      if key not in RESERVED_KEYS and close:
        raise ConfigError(f"sweep entry key {key!r} is not a config key; did you mean {close[0]!r}?")
    both = sorted(given.keys() & (entry.keys() - set(RESERVED_KEYS)))
    if both:  # the run's own value would win, silently
      raise ConfigError(f"the sweep sets {', '.join(both)} per run, so --config.{given[both[0]]} would be "
                        f"overridden; drop it from the command line, or change get_sweep()")
    arg = _merge_args(base_arg, entry["config"]) if "config" in entry else base_arg
    spec = path if arg is None else f"{path}:{arg}"
    overrides = tuple(base_overrides) + tuple(
        f"{k}={_format_value(v)}" for k, v in entry.items() if k not in RESERVED_KEYS)
    name = run_name(entry)
    if name in seen:
      raise ConfigError(f"sweep entries {seen[name]} and {entry} share the run name {name!r}; make them differ")
    canonical = json.dumps(entry, sort_keys=True, default=repr)
    if canonical in sorted_seen:
      raise ConfigError(f"sweep entries {sorted_seen[canonical]} and {entry} are the same run with their keys in "
                        "another order; drop one")
    seen[name] = sorted_seen[canonical] = entry
    runs.append(Run(name, spec, overrides, tuple(entry.items()), str(entry.get("command", subcommand))))
  if not runs:
    raise ConfigError("the sweep is empty; get_sweep() returned no entries")
  return runs


def _merge_args(base: str | None, entry: Any) -> str:
  """A run's `get_config` arg: the entry's flags (e.g. a size) replace the command line's, and
  the `key=value` pairs of both join, so `--config=configs/finetune_cls.py:model=gpt,peft=lora`
  keeps them in every run of a sweep over `task=`."""
  base_flags, base_kv = config_lib.parse_arg(base)
  flags, kv = config_lib.parse_arg(str(entry))
  clash = {k for k in kv.keys() & base_kv.keys() if kv[k] != base_kv[k]}
  if clash:
    raise ConfigError(f"the sweep sets {', '.join(f'{k}={kv[k]}' for k in sorted(clash))} per run but --config "
                      f"gives {', '.join(f'{k}={base_kv[k]}' for k in sorted(clash))}; drop it from --config")
  return ",".join((flags or base_flags) + [f"{k}={v}" for k, v in {**base_kv, **kv}.items()])


def check(runs: Sequence[Run], root: str | None = None, running: bool = False) -> dict[str, dict[str, Any]]:
  """Loads every run's config, so a bad key or value fails (with "did you mean") before anything
  runs; returns each run's `flat_config` by name.

  The overrides shared by all runs are checked first, so their error does not name one run. With
  `running` (the runs start now, here), a local init_from must already hold the checkpoint a run
  that has none of its own would read.
  """
  from fmjax import checkpoint
  first = runs[0]
  shared = first.overrides[:len(first.overrides) - sum(k not in RESERVED_KEYS for k, _ in first.entry)]
  config_lib.load_config(first.spec, shared)
  configs = {}
  for run in runs:
    try:
      config = config_lib.load_config(run.spec, run.overrides)
      config_lib.check_command(config, run.command)
    except ConfigError as e:
      raise ConfigError(f"sweep run {run.name}: {e}") from None
    configs[run.name] = flat_config(config)
  # A local init_from that is not there fails every run that reads it, each after the runs before it:
  # say so now (one a run of this sweep makes, or a bucket path, is left to the run). A run with
  # checkpoints of its own resumes them (or is done) and reads init_from no more: it may have moved.
  listed = {}  # init_from -> its saved steps
  for run in runs:
    source = str(configs[run.name].get("init_from") or "")
    inside = root is not None and files.absolute(source).startswith(files.absolute(root).rstrip("/") + "/")
    local = source and not files.is_remote(source) and not inside and root and not files.is_remote(root)
    if local and checkpoint.saved_steps(os.path.join(root, run.name, "checkpoints")):
      continue
    if source and not files.is_remote(source) and not inside and not files.isdir(source):
      raise ConfigError(f"sweep run {run.name}: init_from={source!r} does not exist (read from {os.getcwd()}); "
                        "pass the --workdir of a `fmjax train` run")
    if running and local:
      if source not in listed:
        listed[source] = checkpoint.saved_steps(os.path.join(source, "checkpoints"))
      try:
        checkpoint.pick_source_step(listed[source], int(configs[run.name].get("init_from_step") or 0), source)
      except ConfigError as e:
        raise ConfigError(f"sweep run {run.name}: {e}") from None
  return configs


def _refuse_other_setups(runs: Sequence[Run], root: str, configs: dict[str, dict[str, Any]]) -> None:
  """A config edited so that runs which saved checkpoints now have another model or data setup:
  each would fail as it started, after the ones before it. Said once, before any starts. (Runs
  with init_from take their model and tokenizer from it as they start: they check for themselves.)"""
  from fmjax import checkpoint
  clashes = []
  for run in runs:
    workdir = os.path.join(root, run.name)
    if configs[run.name].get("init_from"):
      continue
    saved = files.read_json(os.path.join(workdir, "config.json")) if os.path.isdir(workdir) else None
    if saved is not None and checkpoint.saved_steps(os.path.join(workdir, "checkpoints")):
      breaking = checkpoint.config_changes(saved, configs[run.name])[0]
      if breaking:
        clashes.append(f"{run.name} ({'; '.join(breaking[:2])})")
  if clashes:
    raise ConfigError(f"{len(clashes)} run(s) in {root} saved checkpoints of another setup than the sweep now "
                      f"gives them: {', '.join(clashes[:3])}{' ...' if len(clashes) > 3 else ''}; use a new "
                      "--workdir for the changed sweep, or put the config back")


def load_sweep(base_spec: str) -> list[dict[str, Any]]:
  """Calls `get_sweep()` next to `get_config` in the config file."""
  path, _ = config_lib.split_config_spec(base_spec)
  module = config_lib.load_module(path)
  if not callable(getattr(module, "get_sweep", None)):
    raise ConfigError(f"{path} has no get_sweep() function; add one that returns a list of override dicts")
  with config_lib._in_config_file(path, "calling get_sweep()"):  # a bug there: one line naming its line
    entries = module.get_sweep()
  if isinstance(entries, (str, bytes, dict)) or not isinstance(entries, Iterable):
    raise ConfigError(f"{path}: get_sweep() returned {type(entries).__name__}, not a list of override dicts; "
                      "return e.g. [{\"optim.lr\": 1e-3}, {\"optim.lr\": 3e-3}]")
  return list(entries)


# ----------------------------------------------------------------------------- running


def flat_config(config) -> dict[str, Any]:
  """`{"a.b": value}` of a config, as JSON gives it back (what a run's done marker records)."""
  return config_lib.flatten(json.loads(json.dumps(config.to_dict(), default=str)))


def is_finished(run: Run, root: str, config: dict[str, Any] | None = None) -> bool:
  """True when the run already exited cleanly in `root/name` with the same command and, where
  `config` (its `flat_config`) is given, the same config: a value changed since (the config file
  edited, an override added) runs it again, while a key that exists only on one side (added by a
  newer fmjax) does not. Markers from before configs were recorded compare the command line."""
  done = _done_record(run, root)
  if done is None:
    return False
  if config is None or "config" not in done:
    return done.get("argv") == run.argv(root)
  return done.get("command") == run.command and not _changed(done["config"], config)


def _done_record(run: Run, root: str) -> dict | None:
  """What a run's SWEEP_DONE marker holds; None without one, or where it is damaged (cut short,
  edited): such a run is started again, and resumes from its own checkpoint."""
  try:
    with open(os.path.join(root, run.name, DONE_MARKER)) as f:
      done = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(done, dict) or not isinstance(done.get("config", {}), dict):
    return None
  return done


def _changed(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
  return [f"{k}: {before[k]!r} -> {now[k]!r}" for k in sorted(before.keys() & now.keys()) if before[k] != now[k]]


def _mark_done(run: Run, root: str, seconds: float, config: dict[str, Any] | None = None) -> None:
  path = os.path.join(root, run.name, DONE_MARKER)
  with open(path + ".tmp", "w") as f:
    json.dump({"argv": run.argv(root), "command": run.command, "seconds": round(seconds, 1),
               **({"config": config} if config is not None else {})}, f)
  os.replace(path + ".tmp", path)


def _mark_status(run: Run, root: str, status: str, returncode: int, reason: str = "") -> None:
  with open(os.path.join(root, run.name, STATUS_MARKER), "w") as f:
    json.dump({"status": status, "exit": returncode, **({"reason": reason} if reason else {})}, f)


def _newest_save(workdir: str) -> int | None:
  """A run's newest committed checkpoint; None when it has none, or they cannot be listed."""
  from fmjax import checkpoint
  try:
    return max(checkpoint.saved_steps(os.path.join(workdir, "checkpoints")), default=None)
  except OSError:
    return None


def _reason(log_path: str, offset: int = 0, limit: int = 300) -> str:
  """Why a run failed, from its log past `offset` (this attempt's part): its last `error: ...` line
  (every user mistake ends in one), else its last line (a traceback's exception)."""
  lines = [line.strip() for line in _tail(log_path, 50, offset).splitlines() if line.strip()]
  line = next((l for l in reversed(lines) if l.startswith("error:")), lines[-1] if lines else "")
  return line[:limit] + ("..." if len(line) > limit else "")


def _clear_markers(run: Run, root: str) -> None:
  """Forgets how the run last ended, so a restart that fails or stops never reads as done."""
  for marker in (DONE_MARKER, STATUS_MARKER):
    try:
      os.remove(os.path.join(root, run.name, marker))
    except FileNotFoundError:
      pass


def _tail(path: str, n: int = 5, offset: int = 0, most: int = 1 << 16) -> str:
  """The last `n` lines of a log past byte `offset`, reading at most its last `most` bytes."""
  try:
    with open(path, "rb") as f:
      size = f.seek(0, os.SEEK_END)
      f.seek(max(offset if offset <= size else 0, size - most))  # a log cut short since: read what it holds
      text = f.read().decode("utf-8", errors="replace")
  except OSError:
    return ""
  return "".join(text.splitlines(keepends=True)[-n:])


def run_sweep(base_spec: str, entries: Iterable[dict[str, Any]], root: str, parallel: int = 1,
              subcommand: str = "train", *, base_overrides: Sequence[str] = (), print_commands: bool = False,
              launch: str = "", out: TextIO | None = None) -> dict:
  """Runs (or prints) a sweep; returns `{"runs", "failed", "preempted", "not_started", "skipped", "table"}`.

  Runs go `parallel` at a time as `python -m fmjax.cli <command> ...` subprocesses, each logging
  to `root/name/log.txt`. Finished runs are skipped; the rest (re)start and resume themselves.
  `print_commands` prints the runs' commands instead, as `fmjax launch` lines with `launch`
  (see `launch_argv`).
  """
  out = out or sys.stdout
  if not root.strip():  # each run's workdir would be a bare name in the current directory
    raise ConfigError(f"--workdir={root!r} must name the sweep's directory; pass e.g. --workdir=/tmp/lr_sweep")
  runs = expand(base_spec, entries, base_overrides, subcommand)
  configs = check(runs, root, running=not (print_commands or launch))  # printed: they start elsewhere
  if print_commands or launch:
    lines = [launch_argv(launch, i, run, root) if launch else run.argv(root) for i, run in enumerate(runs)]
    for argv in lines:
      print(shlex.join(argv), file=out)
    # Where the runs go (a bucket, for launched runs), the sweep's list of them: `fmjax report
    # --workdir=ROOT` builds the results table from it once they ran.
    try:
      files.makedirs(root)
      _write_runs_file(runs, root)
    except OSError as e:  # the commands are what was asked for; the list is a convenience
      print(f"sweep: {root}/{RUNS_FILE} not written ({e}); `fmjax report --workdir={root}` needs it", file=sys.stderr)
    return {"runs": runs, "failed": [], "preempted": [], "not_started": [], "skipped": [], "table": None}
  if parallel < 1:
    raise ConfigError(f"--parallel must be at least 1, got {parallel}")
  if files.is_remote(root):
    raise ConfigError(f"--workdir={root}: the local runner keeps a sweep's logs and state beside its runs on this "
                      "machine; use a local --workdir, or --print_commands to launch the runs into the bucket")
  if os.path.exists(root) and not os.path.isdir(root):
    raise ConfigError(f"--workdir={root} is a file; give a directory for the sweep's runs")
  files_in_the_way = [r.name for r in runs if os.path.isfile(os.path.join(root, r.name))]
  if files_in_the_way:
    raise ConfigError(f"{os.path.join(root, files_in_the_way[0])} is a file, where run {files_in_the_way[0]} keeps its "
                      "workdir; move it away, or use another --workdir")
  os.makedirs(root, exist_ok=True)
  lock = _lock(root)
  try:
    _refuse_other_setups(runs, root, configs)
    _write_runs_file(runs, root)
    skipped = [r for r in runs if is_finished(r, root, configs[r.name])]
    todo = [r for r in runs if r not in skipped]
    again = [r for r in todo if os.path.exists(os.path.join(root, r.name, DONE_MARKER))]
    print(f"sweep: {len(runs)} runs in {root} ({len(skipped)} already finished), {parallel} at a time", file=out)
    for run in again:
      done = _done_record(run, root)
      if done is None:
        print(f"  {run.name} has a damaged {DONE_MARKER} marker: running it again", file=out)
        continue
      why = "; ".join(_changed(done.get("config") or {}, configs[run.name])[:3]) or "another command"
      print(f"  {run.name} finished with another config ({why}): running it again", file=out)
    failed, saved, unsaved, not_started = _run_all(todo, root, parallel, out, configs)
  finally:
    lock.close()
  table = aggregate(root, runs)
  paths = write_outputs(table, root)
  print(format_markdown(table), file=out)
  # Task metrics, mean ± std per task as papers report GLUE (an SFT config run as `finetune` has no task).
  tasks = [r for r in runs if r.command == "finetune" and any(k.startswith("task.") for k in configs[r.name])]
  if tasks:
    from fmjax import finetune
    summary = finetune.summarize(root, tasks)
    print(summary["markdown"], file=out)
    paths += summary["paths"]
  print("wrote " + ", ".join(paths), file=out)
  for run in failed:
    print(f"FAILED {run.name}; see {os.path.join(root, run.name, 'log.txt')}:\n"
          f"{_tail(os.path.join(root, run.name, 'log.txt'))}", file=out)
  stopped = [f"PREEMPTED {', '.join(r.name for r in saved)}: saved, not finished"] if saved else []
  stopped += [f"STOPPED {', '.join(r.name for r in unsaved)} while starting: nothing saved"] if unsaved else []
  stopped += [f"NOT STARTED {', '.join(r.name for r in not_started)}"] if not_started else []
  if stopped:
    print("; ".join(stopped) + "; rerun the same sweep command to resume", file=out)
  return {"runs": runs, "failed": failed, "preempted": saved + unsaved, "not_started": not_started,
          "skipped": skipped, "table": table}


def _lock(root: str):
  """Holds `root/.sweep.lock` for this sweep (released when it exits, however it exits); a second
  sweep into the same root fails in one line rather than restarting the first one's runs."""
  got = files.try_lock(os.path.join(root, ".sweep.lock"), str(os.getpid()))
  if isinstance(got, str):
    raise ConfigError(f"another fmjax sweep (pid {got or '?'}) is running in {root}; wait for it to end or stop it, "
                      "then run this one (finished runs are skipped)")
  return got


def _ended(run: Run, root: str, returncode: int, start: tuple[int, int | None], seconds: float,
           configs: dict[str, dict[str, Any]] | None, stopping: bool) -> str:
  """How a run's process ended, marked in its workdir: done, saved (stopped after a save: a rerun
  resumes it), unsaved (stopped before its step loop could save) or failed. `start`: where this
  attempt's part of its log begins, and its newest save when it started."""
  from fmjax.cli import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE
  workdir = os.path.join(root, run.name)
  if returncode == 0:
    _mark_done(run, root, seconds, (configs or {}).get(run.name))
    return "done"
  if returncode in (PREEMPTED_EXIT_CODE, INTERRUPTED_EXIT_CODE) or (stopping and returncode == -signal.SIGTERM):
    _mark_status(run, root, "preempted", returncode)
    return "saved" if _newest_save(workdir) != start[1] else "unsaved"
  _mark_status(run, root, "failed", returncode, _reason(os.path.join(workdir, "log.txt"), start[0]))
  return "failed"


def _run_all(todo: list[Run], root: str, parallel: int, out: TextIO,
             configs: dict[str, dict[str, Any]] | None = None) -> tuple[list[Run], ...]:
  """Runs `todo`, `parallel` at a time; returns the runs that failed, those preempted (saved), those
  that SIGTERM stopped before they could save, and those it kept from starting."""
  queue, active, failed, preempted, unsaved = list(todo), {}, [], [], []
  stopping = []  # set by SIGTERM: start nothing new, pass it on, wait for the runs to save

  def on_sigterm(signum, frame):
    # Every SIGTERM goes on: the first makes each run save and stop, a second stops it at once.
    if not stopping:
      print("sweep: SIGTERM, passing it on to the running runs", file=out, flush=True)
    stopping.append(signum)
    for proc in active:
      proc.terminate()

  try:
    previous = signal.signal(signal.SIGTERM, on_sigterm)
  except ValueError:  # not the main thread: signals cannot be caught here
    previous = None
  try:
    while (queue and not stopping) or active:
      while queue and not stopping and len(active) < parallel:
        run = queue.pop(0)
        workdir = os.path.join(root, run.name)
        os.makedirs(workdir, exist_ok=True)
        _clear_markers(run, root)
        log = open(os.path.join(workdir, "log.txt"), "a")
        start = (log.tell(), _newest_save(workdir))  # this attempt's part of the log; the save it starts from
        proc = subprocess.Popen(run.argv(root, _program()), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        active[proc] = (run, log, time.time(), start)
        print(f"  started {run.name}", file=out, flush=True)
      time.sleep(0.2)
      for proc in [p for p in active if p.poll() is not None]:
        run, log, t0, start = active.pop(proc)
        log.close()
        how = _ended(run, root, proc.returncode, start, time.time() - t0, configs, stopping=bool(stopping))
        {"failed": failed, "saved": preempted, "unsaved": unsaved}.get(how, []).append(run)
        print({"done": f"  done    {run.name} ({time.time() - t0:.0f} s)",
               "saved": f"  preempted {run.name} (saved; a rerun resumes it)",
               "unsaved": f"  stopped {run.name} (SIGTERM while it was starting; a rerun starts it)",
               "failed": f"  failed  {run.name} (exit {proc.returncode})"}[how], file=out, flush=True)
  except BaseException as e:  # Ctrl-C, or a run that could not start (a full disk): the runs going stop too
    # SIGTERM lets `train` save a checkpoint, so rerunning the sweep resumes every run; none runs on unwatched.
    for proc in active:
      proc.terminate()
    ended = {"saved": [], "unsaved": [], "done": [], "failed": []}
    for proc, (run, log, t0, start) in active.items():
      proc.wait()
      log.close()
      ended[_ended(run, root, proc.returncode, start, time.time() - t0, configs, stopping=True)].append(run.name)
    words = {"saved": "saved and stopped", "unsaved": "stopped while starting (nothing saved)", "done": "finished",
             "failed": "failed"}
    said = [f"{', '.join(names)} {words[how]}" for how, names in ended.items() if names]
    if not isinstance(e, KeyboardInterrupt):
      raise
    raise KeyboardInterrupt("; ".join(said + ["rerun the same sweep command to resume"])) from None
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
  return failed, preempted, unsaved, queue  # what is left in the queue never started: a rerun starts it


def _program() -> tuple[str, ...]:
  """The command each run's arguments follow."""
  return (sys.executable, "-m", "fmjax.cli")


def _write_runs_file(runs: Sequence[Run], root: str) -> None:
  data = [{"name": r.name, "spec": r.spec, "command": r.command, "overrides": list(r.overrides),
           "entry": {k: v for k, v in r.entry}} for r in runs]
  files.write_json(os.path.join(root, RUNS_FILE), data, indent=1, default=repr)


def read_runs_file(root: str) -> list[dict]:
  """The runs a sweep root holds, as written when the sweep started (name, spec, overrides, entry)."""
  runs = files.read_json(os.path.join(root, RUNS_FILE))
  if runs is None:
    raise ConfigError(f"{root} holds no {RUNS_FILE}; pass the --workdir of a `fmjax sweep`")
  return runs


# ----------------------------------------------------------------------------- aggregation


def final_metrics(workdir: str) -> dict:
  """Last logged step, newest saved step (None without a checkpoint), train loss and eval loss of a
  workdir (NaN where missing). After a preemption the two steps differ: a rerun resumes from `saved`."""
  from fmjax import checkpoint, report
  saved = checkpoint.saved_steps(os.path.join(workdir, "checkpoints")) if files.exists(workdir) else []
  result = {"step": 0, "saved": saved[-1] if saved else None, "train_loss": math.nan, "eval_loss": math.nan}
  for record in report.read_metrics(workdir):
    result["step"] = max(result["step"], record["step"])
    if "train/loss" in record:
      result["train_loss"] = record["train/loss"]
    if "eval/loss" in record:
      result["eval_loss"] = record["eval/loss"]
  return result


def is_seed_key(key: str) -> bool:
  """`train.seed`, `data.seed`, `seed`: keys whose runs are repeats to average over."""
  return key.split(".")[-1].endswith("seed")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (n-1), over the finite values; std is NaN for one value."""
  vals = [v for v in values if not math.isnan(v)]
  if not vals:
    return math.nan, math.nan
  mean = sum(vals) / len(vals)
  if len(vals) < 2:
    return mean, math.nan
  return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


@dataclasses.dataclass
class Table:
  """Per-run rows and, when seeds repeat, per-group rows with mean and std."""
  rows: list[dict]
  groups: list[dict]


def aggregate(root: str, runs: Sequence[Run] | Sequence[dict]) -> Table:
  """Final losses of each run, grouped over seed keys when any group holds more than one run."""
  rows = []
  for run in runs:
    name, entry = (run.name, dict(run.entry)) if isinstance(run, Run) else (run["name"], run["entry"])
    workdir = os.path.join(root, name)
    metrics = final_metrics(workdir)
    # A run this sweep did not start (--print_commands: a pod ran it) has no markers: it is done
    # once it saved its last step.
    last = {} if files.exists(os.path.join(workdir, DONE_MARKER)) else _last_status(workdir)
    status = ("done" if files.exists(os.path.join(workdir, DONE_MARKER)) else last.get("status") or
              ("done" if _saved_its_last_step(workdir, metrics["saved"]) else
               "partial" if files.exists(os.path.join(workdir, "metrics.jsonl")) else
               "not started" if not files.exists(workdir) else "missing"))
    reason = last.get("reason", "") if status == "failed" else ""
    rows.append({"name": name, "entry": entry, "status": status, "reason": reason, **metrics})
  by_group: dict[str, list[dict]] = {}
  for row in rows:
    key = run_name({k: v for k, v in row["entry"].items() if not is_seed_key(k)})
    by_group.setdefault(key, []).append(row)
  groups = []
  if any(len(members) > 1 for members in by_group.values()):
    for key, members in by_group.items():
      train_m, train_s = mean_std([m["train_loss"] for m in members])
      eval_m, eval_s = mean_std([m["eval_loss"] for m in members])
      groups.append({"group": key, "n": len(members), "train_loss_mean": train_m, "train_loss_std": train_s,
                     "eval_loss_mean": eval_m, "eval_loss_std": eval_s})
  return Table(rows, groups)


def _saved_its_last_step(workdir: str, saved: int | None) -> bool:
  """Whether a run's newest checkpoint is the train.steps its config.json plans."""
  if saved is None:
    return False
  try:
    planned = ((files.read_json(os.path.join(workdir, "config.json")) or {}).get("train") or {}).get("steps")
  except (OSError, ConfigError, AttributeError):
    return False
  return isinstance(planned, int) and 0 < planned <= saved


def _last_status(workdir: str) -> dict:
  """How the sweep saw the run's last exit: {"status": preempted | failed, "exit", "reason" (failed)};
  {} when it has not seen one."""
  try:
    last = files.read_json(os.path.join(workdir, STATUS_MARKER))
  except (OSError, ConfigError):
    return {}
  return last if isinstance(last, dict) else {}


def _fmt(x: float, std: float | None = None) -> str:
  if math.isnan(x):
    return "–"
  return f"{x:.4f}" if std is None or math.isnan(std) else f"{x:.4f} ± {std:.4f}"


def _saved(row: dict) -> str:
  return "–" if row["saved"] is None else str(row["saved"])


def format_markdown(table: Table) -> str:
  """Markdown: the seed-group table (when there is one), then one row per run."""
  lines = []
  if table.groups:
    lines += ["| group | seeds | final train loss | final eval loss |", "|---|---|---|---|"]
    lines += [f"| {g['group']} | {g['n']} | {_fmt(g['train_loss_mean'], g['train_loss_std'])} | "
              f"{_fmt(g['eval_loss_mean'], g['eval_loss_std'])} |" for g in table.groups]
    lines.append("")
  lines += ["| run | status | step | saved | final train loss | final eval loss |", "|---|---|---|---|---|---|"]
  lines += [f"| {r['name']} | {r['status']} | {r['step']} | {_saved(r)} | {_fmt(r['train_loss'])} | "
            f"{_fmt(r['eval_loss'])} |" for r in table.rows]
  failed = [r for r in table.rows if r.get("reason")]
  if failed:
    lines += ["", "Failed runs, with the last line of each one's log.txt:", ""]
    lines += [f"- {r['name']}: `{r['reason']}`" for r in failed]
  return "\n".join(lines)


def write_outputs(table: Table, root: str, out: str | None = None) -> list[str]:
  """Writes `sweep.md`, `sweep.csv` (one row per run), `sweep_groups.csv` and the eval-loss plot of
  the sweep in `root` into `out` (default: `root`)."""
  from fmjax import report
  out = out or root
  paths = [os.path.join(out, "sweep.md"), os.path.join(out, "sweep.csv")]
  with open(paths[0], "w") as f:
    f.write(format_markdown(table) + "\n")
  keys = list(dict.fromkeys(k for r in table.rows for k in r["entry"]))
  with open(paths[1], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["name", *keys, "status", "step", "saved_step", "train_loss", "eval_loss", "failure"])
    for r in table.rows:
      w.writerow([r["name"], *(r["entry"].get(k, "") for k in keys), r["status"], r["step"],
                  "" if r["saved"] is None else r["saved"], r["train_loss"], r["eval_loss"], r.get("reason", "")])
  if table.groups:
    paths.append(os.path.join(out, "sweep_groups.csv"))
    with open(paths[-1], "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=list(table.groups[0]))
      w.writeheader()
      w.writerows(table.groups)
  curves = {}
  for r in table.rows:
    steps, values = report.series(report.read_metrics(os.path.join(root, r["name"])), "eval/loss")
    if steps:
      curves[r["name"]] = (steps, values)
  if curves:
    paths.append(report.plot_curves(curves, os.path.join(out, "sweep_eval_loss.png"), ylabel="eval loss",
                                    title=f"eval loss: {os.path.basename(os.path.normpath(root))}"))
  return paths


# ----------------------------------------------------------------------------- command line


def cli(argv: list[str]) -> int:
  """`fmjax sweep --config=... --workdir=ROOT [--parallel=N] [--print_commands] [--config.a=b ...]`."""
  from fmjax.cli import ArgumentParser
  rest, overrides = config_lib.split_overrides(argv)
  p = ArgumentParser(prog="fmjax sweep")
  p.add_argument("--config", required=True, help="configs/NAME.py[:args], with a get_sweep() function")
  p.add_argument("--workdir", required=True, help="sweep root: each run goes to WORKDIR/<run name>")
  p.add_argument("--parallel", type=int, default=1, help="runs at a time (local runner)")
  p.add_argument("--print_commands", action="store_true", help="print one command per run instead of running")
  p.add_argument("--launch", default="", metavar="'MODE --tpu=NAME ...'",
                 help="print one `fmjax launch MODE ...` line per run instead, each run on its own NAME-<index>")
  p.add_argument("--command", default="train", help="subcommand for entries that do not name one")
  args = p.parse_args(rest)
  result = run_sweep(args.config, load_sweep(args.config), args.workdir, args.parallel, args.command,
                     base_overrides=overrides, print_commands=args.print_commands, launch=args.launch)
  if result["failed"]:
    return 1
  from fmjax.cli import PREEMPTED_EXIT_CODE
  return PREEMPTED_EXIT_CODE if result["preempted"] or result["not_started"] else 0

