"""The `fmjax` command: thin wrappers over plain functions.

  fmjax train --config=configs/gpt.py:tiny,runlocal --config.train.steps=50 --workdir=/tmp/gpt
  fmjax data prepare --config=configs/bert.py:tiny
  fmjax bench --config=configs/gpt.py:small --config.train.batch_size=16

A user mistake ends in one line on stderr (`error: ...`) and exit code 2. A run stopped by
SIGTERM saves, then exits with code 143 (128 + SIGTERM, as a shell reports a process the signal
ended): it is not finished, and rerunning the same command resumes it. A SIGTERM before the step
loop begins (preparing data, restoring, compiling) stops the run at once, with the same code.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import os
import re
import sys

from fmjax.config_lib import ConfigError

PREEMPTED_EXIT_CODE = 143  # saved and stopped on SIGTERM: rerun the same command to resume
INTERRUPTED_EXIT_CODE = 130  # stopped by Ctrl-C (SIGINT), saved first when it came in the step loop
BROKEN_PIPE_EXIT_CODE = 141  # 128 + SIGPIPE: what reads stdout stopped reading


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage mistakes (a misspelt flag, a value of the wrong type) end in one `error: ...` line
  and exit code 2, as every other bad input does, rather than the usage text and a line after it."""

  def error(self, message: str):
    """Raises the usage mistake as a ConfigError: one `error:` line, exit code 2."""
    raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")


def _parser(prog: str, needs_workdir: bool) -> argparse.ArgumentParser:
  p = ArgumentParser(prog=prog)
  p.add_argument("--config", required=True, help="configs/NAME.py[:args]")
  if needs_workdir:
    p.add_argument("--workdir", required=True, help="where checkpoints, metrics and config.json go")
  return p


def _load(prog: str, argv: list[str], needs_workdir: bool, extra=None):
  from fmjax import config_lib
  rest, overrides = config_lib.split_overrides(argv)
  p = _parser(prog, needs_workdir)
  if extra:
    extra(p)
  args = p.parse_args(rest)
  workdir = getattr(args, "workdir", None)
  if workdir is not None and (not workdir.strip() or os.path.isfile(workdir)):
    raise config_lib.ConfigError(f"--workdir={workdir!r} must name a directory (new or a run's); pass e.g. "
                                 "--workdir=/tmp/run")
  return args, config_lib.load_config(args.config, overrides)


def maybe_initialize_distributed() -> None:
  """Joins the other processes of a run when FMJAX_DISTRIBUTED=1 (the launcher sets it on a pod).

  On Cloud TPU and in a Slurm job step `jax.distributed.initialize()` finds the coordinator and
  process ids itself; elsewhere JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID give them.
  """
  if os.environ.get("FMJAX_DISTRIBUTED") != "1":
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "1")  # set by srun for its step's tasks, not in a batch script
    if tasks.isdigit() and int(tasks) > 1:
      print(f"warning: this is task {os.environ.get('SLURM_PROCID', '?')} of a Slurm step of {tasks}, and each "
            "task trains on its own; set FMJAX_DISTRIBUTED=1 (srun --export=ALL,FMJAX_DISTRIBUTED=1) for one run "
            "over all of them", file=sys.stderr)
    return
  import jax
  kwargs = {}
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)


def _exit_code(result: dict) -> int:
  """0 for a finished run; PREEMPTED_EXIT_CODE for one that saved and stopped on SIGTERM."""
  return PREEMPTED_EXIT_CODE if result.get("preempted") else 0


def _train(run, config, workdir: str) -> int:
  """`run(config, workdir)` (train, finetune, sft, dpo) stopped cleanly by a SIGTERM at any point."""
  from fmjax import checkpoint
  with checkpoint.sigterm_stops_the_start():
    return _exit_code(run(config, workdir))


def cmd_train(argv):
  """`fmjax train`: pretraining (`train.run`)."""
  from fmjax import train
  maybe_initialize_distributed()
  args, config = _load("fmjax train", argv, True)
  return _train(train.run, config, args.workdir)


def cmd_data(argv):
  """`fmjax data prepare`: tokenises, packs and caches a config's dataset; prints the cache path."""
  from fmjax import data
  usage = "usage: fmjax data prepare --config=configs/NAME.py[:args] [--config.a.b=v ...]"
  if argv and argv[0] in ("-h", "--help"):
    print(f"{usage}\n\ntokenise, pack and cache the dataset a config names (train and eval splits); prints the "
          "cache directory")
    return 0
  if not argv or argv[0] != "prepare":
    raise ConfigError(usage)
  _, config = _load("fmjax data prepare", argv[1:], False)
  from fmjax.data import sources
  sources.check_held_out_apart(config)  # what it prepares is for training
  sources.check_files_read(config)
  from fmjax import checkpoint, metrics
  metrics.setup_logging("stderr")  # its notes (parts kept, waiting for another process); stdout: the path
  try:
    with checkpoint.sigterm_stops_the_start():  # SIGTERM: as Ctrl-C, with exit code 143
      path = data.prepare(config)
  except KeyboardInterrupt as e:
    stopped = KeyboardInterrupt("the parts made so far are kept: rerun the same command to go on")
    stopped.exit_code = getattr(e, "exit_code", INTERRUPTED_EXIT_CODE)
    raise stopped from None
  meta = json.load(open(os.path.join(path, "meta.json")))
  for split in ("train", "eval"):  # what the cache holds, beside its path (stdout: the path alone)
    s = meta["splits"][split]
    print(f"{split}: {s['num_docs']:,} documents, {s['num_text_tokens']:,} tokens, {s['num_rows']:,} rows of "
          f"{meta['seq_len']} in {len(s.get('parts') or [0])} part(s)", file=sys.stderr)
  if meta.get("mixture"):
    shares = [(m["dataset"], m["share"]) for m in meta["mixture"]]
    rows = sources.batch_rows(config.train.batch_size, shares)
    print(f"mixture: each batch of {config.train.batch_size} rows holds "
          + ", ".join(f"{k} of {label} (weight {share:.1%})"
                      for k, label, (_, share) in zip(rows, sources.labels(shares), shares)), file=sys.stderr)
  print(path)


def cmd_bench(argv):
  """`fmjax bench`: the real train step on synthetic data (`bench.run`)."""
  from fmjax import bench

  def extra(p):
    p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--segments", type=int, default=1, help="packed documents per row (attention masks them apart)")
    p.add_argument("--json", default="", help="also write the result as JSON here")
    p.add_argument("--profile", default="", metavar="DIR",
                   help="then trace --steps more steps with jax.profiler into DIR (TensorBoard, XProf, Perfetto)")
  args, config = _load("fmjax bench", argv, False, extra)
  bench.run(config, steps=args.steps, warmup=args.warmup, segments=args.segments, json_path=args.json,
            profile_dir=args.profile)


def cmd_launch(argv):
  """`fmjax launch`: Cloud TPU / GKE commands (`launch.cli`)."""
  from fmjax import launch
  return launch.cli(argv)


def cmd_import_hf(argv):
  """`fmjax import-hf`: a Hugging Face directory to an fmjax workdir (`interop.cli_import`)."""
  from fmjax import interop
  return interop.cli_import(argv)


def cmd_export(argv):
  """`fmjax export`: an fmjax checkpoint to a Hugging Face directory (`interop.cli_export`)."""
  from fmjax import interop
  return interop.cli_export(argv)


def cmd_release(argv):
  """`fmjax release`: a release bundle (`release.cli`)."""
  from fmjax import release
  return release.cli(argv)


def cmd_sweep(argv):
  """`fmjax sweep`: a config's `get_sweep()` as runs (`sweep.cli`)."""
  from fmjax import sweep
  return sweep.cli(argv)


def cmd_plan(argv):
  """`fmjax plan`: the ahead-of-time report (`plan.cli`)."""
  from fmjax import plan
  return plan.cli(argv)


def cmd_report(argv):
  """`fmjax report`: workdir metrics to a table and plots (`report.cli`)."""
  from fmjax import report
  return report.cli(argv)


def cmd_finetune(argv):
  """`fmjax finetune`: classification from a pretrained trunk, or SFT (`finetune.run`)."""
  from fmjax import finetune
  maybe_initialize_distributed()
  args, config = _load("fmjax finetune", argv, True)
  return _train(finetune.run, config, args.workdir)


def cmd_sft(argv):
  """`fmjax sft`: GPT supervised fine-tuning (`sft.run`)."""
  from fmjax import sft
  maybe_initialize_distributed()
  args, config = _load("fmjax sft", argv, True)
  return _train(sft.run, config, args.workdir)


def cmd_dpo(argv):
  """`fmjax dpo`: GPT preference tuning, Direct Preference Optimization (`dpo.run`)."""
  from fmjax import dpo
  maybe_initialize_distributed()
  args, config = _load("fmjax dpo", argv, True)
  return _train(dpo.run, config, args.workdir)


def cmd_generate(argv):
  """`fmjax generate`: GPT sampling or BERT fill-mask (`generate.cli`)."""
  from fmjax import generate
  return generate.cli(argv)


def cmd_eval(argv):
  """`fmjax eval`: held-out or task metrics of a workdir (`evaluate.cli`)."""
  from fmjax import evaluate
  return evaluate.cli(argv)


COMMANDS = {
    "train": (cmd_train, "pretrain a GPT (causal LM) or BERT (masked LM)"),
    "data": (cmd_data, "`data prepare`: tokenise, pack and cache a dataset"),
    "bench": (cmd_bench, "time the real train step on synthetic data: tokens/s, MFU, memory"),
    "launch": (cmd_launch, "Cloud TPU / GKE launch commands (dry-run unless --execute)"),
    "import-hf": (cmd_import_hf, "Hugging Face BERT / GPT-2 / Llama / Qwen directory -> fmjax workdir (step-0 "
                  "checkpoint)"),
    "export": (cmd_export, "fmjax checkpoint -> Hugging Face directory (safetensors, config, tokenizer)"),
    "release": (cmd_release, "release bundle: HF weights, checkpoint, model card, PII report, SHA256SUMS"),
    "sweep": (cmd_sweep, "expand a config's get_sweep() into runs: run them locally or print the commands"),
    "plan": (cmd_plan, "ahead-of-time plan on a mesh or TPU topology: params, FLOPs, per-device memory, shardings"),
    "report": (cmd_report, "workdir metrics to a Markdown table, CSV and PNG plots"),
    "finetune": (cmd_finetune, "fine-tune a pretrained trunk with a new head on a task (full or PEFT); an SFT or DPO "
                 "config: as `sft` or `dpo`"),
    "sft": (cmd_sft, "GPT supervised fine-tuning / continued pretraining on JSONL (prompt, completion; messages)"),
    "dpo": (cmd_dpo, "GPT preference tuning (DPO) on JSONL pairs (prompt, chosen, rejected; text or messages)"),
    "eval": (cmd_eval, "held-out perplexity / MLM accuracy (or task metrics) of a workdir's checkpoint"),
    "generate": (cmd_generate, "GPT sampling with a KV cache (greedy, temperature, top-k, top-p); BERT fill-mask"),
}


def _user_errors() -> tuple[type, ...]:
  """Exceptions that a user causes and that end in one line, not a traceback."""
  errors = [ConfigError, FileNotFoundError]
  mods = sys.modules
  if "fmjax.checkpoint" in mods:
    ckpt = mods["fmjax.checkpoint"]
    # A full disk or a damaged checkpoint is the user's to fix; the message says how.
    errors += [ckpt.CheckpointMismatchError, ckpt.CheckpointDamagedError, ckpt.CheckpointSaveError]
  if "fmjax.train" in mods:
    errors.append(mods["fmjax.train"].NonFiniteLossError)
  if "fmjax.attention" in mods:
    errors.append(mods["fmjax.attention"].AttentionError)
  return tuple(errors)


def out_of_memory_message(e: BaseException) -> str | None:
  """One line for XLA's out-of-memory error (at compile or run time); None for any other error."""
  if not isinstance(e, RuntimeError):
    return None
  # GPU: "RESOURCE_EXHAUSTED: Out of memory while trying to allocate N bytes."; TPU: "... Ran out
  # of memory in memory space hbm ..."; CPU: "INTERNAL: Error dispatching computation: Out of
  # memory allocating N bytes."
  line = next((l for l in str(e).splitlines() if re.search(r"RESOURCE_EXHAUSTED|out of memory", l, re.I)), None)
  if line is None:
    return None
  detail = re.sub(r"^\s*(RESOURCE_EXHAUSTED|INTERNAL):\s*", "", line).strip()
  detail = detail[:200] + ("..." if len(detail) > 200 else "")
  gpu = ""
  if "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ and "jax" in sys.modules:
    if sys.modules["jax"].default_backend() == "gpu":
      gpu = ", or let XLA take more than its default 75% of the GPU (XLA_PYTHON_CLIENT_MEM_FRACTION=0.95)"
  return (f"out of device memory ({detail}); raise train.grad_accum (train.batch_size is the global batch: "
          "batch_size / grad_accum rows go through at once, and the batch stays), set model.remat=dots_no_batch "
          f"or full, or shard the state over more devices with mesh.fsdp{gpu}; `fmjax plan` shows what a step "
          "needs per device before a run")


COMPILING = ("train", "finetune", "sft", "dpo", "bench", "eval", "generate", "plan")  # commands that compile steps
CACHE_MAX_BYTES = 16 * 2**30  # least recently used entries go beyond this


def use_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache; returns its directory (None when off).

  A rerun, a resumed run or a sweep run whose programs were compiled before loads them instead
  of compiling again, and on a GPU XLA's autotuning results are kept there too. A directory the
  user chose (JAX_COMPILATION_CACHE_DIR, as the pod launcher sets, or JAX's config) wins;
  otherwise FMJAX_COMPILATION_CACHE names one, or `off` turns it off; the default is
  ~/.cache/fmjax/jax_compilation_cache.
  """
  import jax
  chosen = os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir
  if chosen:
    return chosen
  path = os.environ.get("FMJAX_COMPILATION_CACHE", "~/.cache/fmjax/jax_compilation_cache")
  if path.lower() in ("", "0", "off", "none", "false"):
    return None
  path = os.path.expanduser(path)
  jax.config.update("jax_compilation_cache_dir", path)
  if jax.config.jax_compilation_cache_max_size < 0 and importlib.util.find_spec("filelock"):
    # A size bound also makes JAX lock the directory (with filelock), so concurrent runs (a
    # sweep) never read a half-written entry.
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
  return path


def usage() -> str:
  """The `fmjax --help` text: the commands and what each does."""
  lines = ["usage: fmjax COMMAND [--config=configs/X.py[:args]] [--config.a.b=v ...] [--workdir=DIR]", "", "commands:"]
  lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  """The `fmjax` program: runs one command; returns its exit code (2 for a user mistake)."""
  try:
    code = _main(argv)
    sys.stdout.flush()  # here, where a broken pipe can still be told apart from an error
    return code
  except BrokenPipeError:  # stdout's reader left (`fmjax sweep --print_commands | head`): stop quietly, as `cat` does
    if not stdout_is_gone():
      raise
    return BROKEN_PIPE_EXIT_CODE


def _main(argv: list[str] | None) -> int:
  own_process = argv is None  # the `fmjax` program itself, not a caller in Python (a test, a notebook)
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    import difflib
    close = difflib.get_close_matches(name, COMMANDS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    print(f"error: unknown command {name!r}{hint} (`fmjax --help` lists the commands)", file=sys.stderr)
    return 2
  try:
    if name in COMPILING and not any(a in ("-h", "--help") for a in rest):
      use_compilation_cache()
    code = COMMANDS[name][0](rest)
  except _user_errors() as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:  # 130 = 128 + SIGINT; a first Ctrl-C in a step loop saves first (RunInterrupted)
    code = getattr(e, "exit_code", INTERRUPTED_EXIT_CODE)  # 143 for a SIGTERM (checkpoint.Terminated)
    what = "stopped" if code == PREEMPTED_EXIT_CODE else "interrupted"
    print(f"{what}: {e}" if str(e) else what, file=sys.stderr)
    if own_process:
      exit_at_once(code)
    return code
  except Exception as e:  # XLA's errors are RuntimeErrors: only running out of memory is the user's
    message = (out_of_memory_message(e) or storage_error_message(e) or file_error_message(e)
               or bucket_library_message(e))
    if message is None:
      raise
    print(f"error: {message}", file=sys.stderr)
    return 2
  return int(code or 0)


def exit_at_once(code: int) -> None:
  """Ends the process with `code` without Python's teardown. A signal can stop a command while XLA still
  compiles its step on a thread of its own (JAX lets Ctrl-C interrupt the wait for a compile); the teardown
  would free the devices under that thread, and the process would die of a segmentation fault (exit 139)
  instead of the 130 or 143 it reports. What the run keeps (its checkpoints, its logs) was closed before."""
  import logging
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  logging.shutdown()
  try:  # the one part of the teardown a pod needs: each host leaves the coordination service, as at a normal exit
    import jax
    if jax.distributed.is_initialized():
      jax.distributed.shutdown()
  except Exception:  # pylint: disable=broad-except  # exiting all the same
    pass
  os._exit(code)


def stdout_is_gone() -> bool:
  """True when what reads stdout has closed it (a pipe with no reader polls as an error); stdout then writes to
  /dev/null, so that the interpreter's last flush does not fail too. False for a broken pipe elsewhere."""
  import select
  try:
    fd = sys.stdout.fileno()
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    if not any(events & select.POLLERR for _, events in poll.poll(0)):
      return False
  except (AttributeError, OSError, ValueError):  # no real stdout (a test's capture): not a pipe that broke
    return False
  os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
  return True


def file_error_message(e: BaseException) -> str | None:
  """One line for a path the system refused (read-only, not a directory, no permission, disk full);
  None for any other error, an OSError with no path included (that one is not the user's to fix)."""
  if not isinstance(e, OSError) or not e.filename:
    return None
  fix = {errno.ENOSPC: "free space there, or pass a path on another disk",
         errno.EDQUOT: "free space there, or pass a path on another disk",
         errno.ENOTDIR: "a part of the path is a file: pass a path under a directory",
         errno.EISDIR: "pass a file's path, not a directory's"}.get(e.errno, "pass a path this user can write "
                                                                              "(--workdir, --out, data.cache_dir)")
  return f"{e.strerror or type(e).__name__}: {e.filename}; {fix}"


def bucket_library_message(e: BaseException) -> str | None:
  """One line for a bucket path on a machine with no library to reach it (no TensorFlow, as on an ARM
  host, and no gcsfs): fsspec says "Please install gcsfs to access Google Storage"; None otherwise."""
  if not isinstance(e, ImportError) or not re.match(r"Please install \S+ to access", str(e)):
    return None
  return f"{e} (`pip install 'fmjax[gcs]'` brings gcsfs, for gs:// paths), or pass a local path"


def storage_error_message(e: BaseException) -> str | None:
  """One line for a bucket path that cannot be read or written (no network, no credentials, no such
  bucket): TensorFlow's file system, which gs:// paths go through, raises an OpError; None otherwise."""
  tf = sys.modules.get("tensorflow")
  errors = getattr(tf, "errors", None)
  if errors is None or not isinstance(e, errors.OpError):
    return None
  text = str(getattr(e, "message", "") or e)
  remote = any(s in text for s in ("gs://", "s3://", "libcurl", "HTTP request", "metadata.google"))
  access = isinstance(e, (errors.UnavailableError, errors.PermissionDeniedError, errors.UnauthenticatedError))
  if not (remote or access):  # a local file's error (a damaged TFRecord, say) is not the network's
    return None
  first = (text.strip().splitlines() or [""])[0]
  first = first[:300] + ("..." if len(first) > 300 else "")
  return (f"a bucket path failed ({type(e).__name__}: {first}); check the path, this machine's network and its "
          "credentials (`gcloud auth application-default login`, or the VM's service account)")


if __name__ == "__main__":
  sys.exit(main())
