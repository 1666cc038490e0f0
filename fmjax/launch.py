"""Cloud TPU launcher: TPU VMs, queued resources (multislice) and GKE through xpk.

Each action becomes a list of exact commands (`gcloud`, `xpk`, `tar`, `bash`). By default
they are only printed, one per line, quoted so that they can be pasted into a shell;
`--execute` runs them in order and stops at the first failure.

  fmjax launch all --tpu=gpt2 --accelerator=v5p-128 --spot --zone=us-east5-a --project=my-proj \\
      --config=configs/gpt.py:small --workdir=gs://my-bucket/gpt2 --execute
  fmjax launch logs --tpu=gpt2 --accelerator=v5p-128 --zone=us-east5-a --project=my-proj \\
      --workdir=gs://my-bucket/gpt2
  fmjax launch delete --tpu=gpt2 --zone=us-east5-a --project=my-proj --execute
  fmjax launch xpk --cluster=my-gke --workload=gpt2 --accelerator=v5p-128 --num-slices=2 \\
      --zone=us-east5-a --project=my-proj --config=configs/gpt.py:small --workdir=gs://my-bucket/gpt2

Modes: `create` (a queued resource for --spot, --queued or --num-slices > 1, else a TPU VM; one
of the name that is already there is reused, so re-running a plan resumes it), `setup` (copy the
code to every worker and install it), `run` (start training on every worker, detached), `logs`
(copy each worker's log to the workdir and show worker 0's tail), `delete` (the queued resource or
TPU VM of the name, whichever is there), `all` (create, setup, run) and `xpk` (GKE workload create,
or `xpk --delete`). The same plan is available from Python: `plan_commands(spec, mode)` and
`run(spec, mode, execute=...)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from typing import Sequence, TextIO

MODES = ("create", "setup", "run", "logs", "delete", "all")
COMMANDS = ("train", "finetune", "sft", "dpo")  # the fmjax subcommands a launch can run on the workers
# Where things live on a worker, relative to its home directory (ssh starts there).
REMOTE_CODE_DIR = "fmjax"
REMOTE_TARBALL = "fmjax.tar.gz"
REMOTE_LOG = "fmjax_logs/train.log"
# What `setup` leaves out of the tarball (checkpoints, wheels, builds, caches), plus the patterns of
# the code's `.dockerignore`, which keeps the same things out of xpk's image.
TAR_EXCLUDES = (".git", ".venv", "__pycache__", "*.egg-info", "workdirs", ".whl", "build", ".pytest_cache", "*.pyc")
# Multislice: the port of the megascale (DCN) coordinator on slice 0's first worker. Ray's
# TPU support and xpk's JobSets use the same default.
MEGASCALE_PORT = 8081
# Waiting for a TPU: seconds between looks at its state, and how many looks in a row may fail (a
# network blip, a laptop that slept through an hours-long spot wait) before the wait gives up.
POLL_S = 60
DESCRIBE_TRIES = 5
RETRY_S = 30


class LaunchError(ValueError):
  """Bad launcher input; the message is one line saying what to do."""


class CommandFailed(RuntimeError):
  """A command of an executed plan exited non-zero; later commands did not run."""

  def __init__(self, command: Sequence[str], returncode: int):
    self.command, self.returncode = list(command), returncode
    super().__init__(f"command failed with exit code {returncode}: {shlex.join(command)}")


# ----------------------------------------------------------------------------------------------
# TPU types.


@dataclasses.dataclass(frozen=True)
class TpuFamily:
  """One TPU generation as Cloud TPU names it (`<prefix>-<size>`)."""
  prefix: str
  # The size in the accelerator name counts TensorCores on v4/v5p (2 per chip) and chips on
  # v5e/v6e (1 per chip). JAX shows one device per chip on all four.
  cores_per_chip: int
  sizes: tuple[int, ...]
  # Slices up to this many chips sit on one host; larger ones have 4 chips per host.
  max_single_host_chips: int
  runtime: str  # default TPU software version (`--version` / `--runtime-version`)


_V5P_SIZES = tuple(sorted({2 ** k for k in range(3, 14)} | {128 * k for k in range(1, 97)}))
TPU_FAMILIES = {
    "v4": TpuFamily("v4", 2, (8, 16, 32, 64, 128, 256, 512, 1024, 1536, 2048, 4096),
                    4, "tpu-ubuntu2204-base"),
    "v5e": TpuFamily("v5litepod", 1, (1, 4, 8, 16, 32, 64, 128, 256), 8, "v2-alpha-tpuv5-lite"),
    "v5p": TpuFamily("v5p", 2, _V5P_SIZES, 4, "v2-alpha-tpuv5"),
    "v6e": TpuFamily("v6e", 1, (1, 4, 8, 16, 32, 64, 128, 256), 8, "v2-alpha-tpuv6e"),
}
ACCELERATOR_TYPES = tuple(f"{f.prefix}-{n}" for f in TPU_FAMILIES.values() for n in f.sizes)


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """A parsed accelerator type such as `v5p-128`."""
  name: str
  family: TpuFamily
  chips: int
  hosts: int


def parse_accelerator(name: str) -> Accelerator:
  """`v5p-128` -> 64 chips on 16 hosts; unknown names fail with the closest known ones."""
  by_prefix = {f.prefix: f for f in TPU_FAMILIES.values()}
  match = re.fullmatch(r"([a-z0-9]+)-(\d+)", name or "")
  family = by_prefix.get(match.group(1)) if match else None
  if family is None or int(match.group(2)) not in family.sizes:
    raise LaunchError(f"unknown TPU accelerator type {name!r}{_accelerator_hint(name, match, family)}")
  chips = int(match.group(2)) // family.cores_per_chip
  hosts = 1 if chips <= family.max_single_host_chips else chips // 4
  return Accelerator(name, family, chips, hosts)


def _accelerator_hint(name: str, match, family: TpuFamily | None) -> str:
  if family is None and match:
    # A misspelt or common generation name (`v6-256`, `v5e-16`): map it to the family gcloud knows.
    names = {**{f.prefix: f for f in TPU_FAMILIES.values()}, **TPU_FAMILIES}
    close = difflib.get_close_matches(match.group(1), names, n=1, cutoff=0.5)
    if close:
      family = names[close[0]]
      alias = f"{family.prefix}-{match.group(2)}"
      if int(match.group(2)) in family.sizes:
        return f"; Cloud TPU calls it {alias!r}" if close[0] == match.group(1) else f"; did you mean {alias!r}?"
  if family is not None and match:
    n = int(match.group(2))
    near = sorted(family.sizes, key=lambda s: (abs(s - n), s))[:3]
    return (f"; {family.prefix} comes in sizes {_short_list(family.sizes)}; "
            f"did you mean {' or '.join(repr(f'{family.prefix}-{s}') for s in sorted(near))}?")
  close = difflib.get_close_matches(name or "", ACCELERATOR_TYPES, n=3, cutoff=0.6)
  known = ", ".join(f"{f.prefix}-N" for f in TPU_FAMILIES.values())
  hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
  return f"{hint} (known types: {known})"


def _short_list(sizes: Sequence[int]) -> str:
  if len(sizes) <= 12:
    return ", ".join(map(str, sizes))
  return ", ".join(map(str, sizes[:8])) + f", ... {sizes[-1]}"


# ----------------------------------------------------------------------------------------------
# What to launch.


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
  """Everything a launch needs; empty strings mean "not given".

  `name` is the TPU VM (or queued resource, or xpk workload). With `num_slices > 1` the slices
  are the queued resource's nodes `<name>-0`, `<name>-1`, ...
  """
  name: str = ""
  accelerator: str = ""
  zone: str = ""
  project: str = ""
  config: str = ""
  workdir: str = ""
  overrides: tuple[str, ...] = ()     # `a.b=v`, passed on as `--config.a.b=v`
  command: str = "train"              # what the workers run: `fmjax train`, `finetune` or `sft`
  capacity: str = "on-demand"         # on-demand | spot | reserved
  queued: bool | None = None          # a queued resource instead of a plain TPU VM; None: for spot / multislice
  num_slices: int = 1                 # > 1: multislice through a queued resource
  runtime: str = ""                   # TPU software version; default per TPU generation
  code_dir: str = "."                 # what `setup` tars and copies (the repository root)
  git_repo: str = ""                  # with git_ref: workers clone this instead of a tarball
  git_ref: str = ""
  libtpu_init_args: str = ""
  compilation_cache: str = ""         # default gs://<workdir bucket>/jax_compilation_cache
  env: tuple[str, ...] = ()           # extra KEY=VALUE for the training process
  log_lines: int = 200
  follow: bool = False                # `logs`: keep tailing worker 0
  # GKE through xpk.
  cluster: str = ""
  docker_image: str = ""              # an image with fmjax[tpu] installed; else base image + code
  base_docker_image: str = "python:3.11"
  max_restarts: int = 0               # restarts of the JobSet after a failure or a preempted (143) exit


def resolve(spec: LaunchSpec) -> LaunchSpec:
  """Fills project and zone, when not given, from gcloud's environment variables, then from gcloud's own
  config (`gcloud config set project ...`), which is where most users keep them."""
  return dataclasses.replace(
      spec,
      project=spec.project or os.environ.get("CLOUDSDK_CORE_PROJECT", "") or _gcloud_config("project"),
      zone=spec.zone or os.environ.get("CLOUDSDK_COMPUTE_ZONE", "") or _gcloud_config("compute/zone"))


def _gcloud_config(key: str) -> str:
  """`gcloud config get-value KEY`, or "" when unset or when gcloud is missing (a dry run needs no gcloud)."""
  if shutil.which("gcloud") is None:
    return ""
  try:
    result = subprocess.run(["gcloud", "config", "get-value", key], capture_output=True, text=True, timeout=60)
  except (OSError, subprocess.SubprocessError):
    return ""
  # An unset key prints nothing on stdout ("(unset)" goes to stderr).
  value = result.stdout.strip() if result.returncode == 0 else ""
  return "" if value == "(unset)" else value


def check_name(what: str, name: str) -> None:
  """A TPU VM's, queued resource's or xpk workload's name, as Cloud TPU and GKE accept them."""
  if not name:
    raise LaunchError(f"{what}=NAME is required")
  if not re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", name):
    raise LaunchError(f"{what}={name!r} is not a valid name: use lower-case letters, digits and "
                      "dashes, starting with a letter (at most 40 characters)")


def validate(spec: LaunchSpec, mode: str) -> Accelerator | None:
  """Checks a resolved spec for `mode`; raises LaunchError before anything is created.

  Returns the parsed accelerator; None for `logs`/`delete` given none (they do not need it).
  """
  if mode not in MODES + ("xpk", "xpk-delete"):
    raise LaunchError(f"unknown launch mode {mode!r}; use one of {', '.join(MODES)} or xpk")
  check_name("--workload" if mode.startswith("xpk") else "--tpu", spec.name)
  optional = mode in ("logs", "delete", "xpk-delete") and not spec.accelerator
  acc = None if optional else parse_accelerator(spec.accelerator)
  # `gcloud config set` is only worth naming where gcloud is there to read it back.
  has_gcloud = shutil.which("gcloud") is not None
  if not spec.project:
    raise LaunchError("no project: pass --project=PROJECT or set CLOUDSDK_CORE_PROJECT"
                      + (" (or run `gcloud config set project PROJECT`)" if has_gcloud else ""))
  if not spec.zone:
    raise LaunchError("no zone: pass --zone=ZONE (e.g. us-east5-a) or set CLOUDSDK_COMPUTE_ZONE"
                      + (" (or run `gcloud config set compute/zone ZONE`)" if has_gcloud else ""))
  if spec.capacity not in ("on-demand", "spot", "reserved"):
    raise LaunchError(f"capacity {spec.capacity!r} is not one of on-demand, spot, reserved")
  if spec.num_slices < 1:
    raise LaunchError(f"--num-slices must be at least 1, got {spec.num_slices}")
  if spec.queued is False and spec.num_slices > 1:
    raise LaunchError(f"--no-queued cannot make --num-slices={spec.num_slices}: Cloud TPU creates multislice only "
                      "through a queued resource; drop --no-queued")
  if spec.max_restarts < 0:
    raise LaunchError(f"--max-restarts must be 0 or more, got {spec.max_restarts}")
  if mode.startswith("xpk") and not spec.cluster:
    raise LaunchError("xpk needs --cluster=GKE_CLUSTER (create one with `xpk cluster create`)")
  if bool(spec.git_repo) != bool(spec.git_ref):
    raise LaunchError("--git-repo and --git-ref go together: workers clone REPO at REF")
  for item in spec.env:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item):
      raise LaunchError(f"--env {item!r} must look like KEY=VALUE")
  for item in spec.overrides:
    if "=" not in item:
      raise LaunchError(f"override --config.{item} needs a value: --config.{item}=VALUE")
  if spec.command not in COMMANDS:
    close = difflib.get_close_matches(spec.command, COMMANDS, n=1)
    raise LaunchError(f"--command={spec.command!r} is not one of {', '.join(COMMANDS)}"
                      + (f"; did you mean {close[0]!r}?" if close else ""))
  if mode in ("run", "all", "xpk"):
    if not spec.config:
      raise LaunchError("--config=configs/NAME.py[:args] is required to run training")
    if not spec.workdir:
      raise LaunchError("--workdir=gs://BUCKET/PATH is required to run training")
    _check_config_path(spec)
  ships_code = (mode in ("setup", "all") and not spec.git_repo) or (mode == "xpk" and not spec.docker_image)
  if ships_code and not all(os.path.exists(os.path.join(spec.code_dir, f)) for f in ("pyproject.toml", "fmjax")):
    raise LaunchError(f"--code-dir={spec.code_dir} is not an fmjax checkout (no pyproject.toml and fmjax/ there), "
                      "and it is what the workers get: run the launcher from the repository or pass --code-dir=REPO")
  hosts = (acc.hosts if acc else 1) * spec.num_slices
  if spec.workdir and not spec.workdir.startswith("gs://") and (hosts > 1 or mode.startswith("xpk")):
    where = "GKE pods" if mode.startswith("xpk") else f"all {hosts} hosts"
    raise LaunchError(f"--workdir={spec.workdir!r} must be a gs:// path: {where} write checkpoints and "
                      "metrics there, so it must be shared storage (e.g. --workdir=gs://BUCKET/run)")
  return acc


def _check_config_path(spec: LaunchSpec) -> None:
  """The workers run `--config` from their copy of --code-dir: it must name a file there, relative."""
  from fmjax import config_lib
  path, arg = config_lib.split_config_spec(spec.config)
  code = os.path.abspath(spec.code_dir)
  if os.path.isabs(path):
    inside = os.path.commonpath([os.path.abspath(path), code]) == code
    rel = os.path.relpath(path, code) + (f":{arg}" if arg is not None else "")
    hint = f"--config={rel}" if inside else f"a config inside --code-dir={spec.code_dir}"
    raise LaunchError(f"--config={path} is a path on this machine; the workers run from their copy of --code-dir, "
                      f"so name it relative to that: {hint}")
  if not spec.git_repo and not spec.docker_image and not os.path.isfile(os.path.join(code, path)):
    raise LaunchError(f"--config={path} is not a file in --code-dir={spec.code_dir}, the code the workers get; "
                      "put the config there and name it relative to it")


def check_config(spec: LaunchSpec) -> None:
  """Loads the config with its overrides and validates it for the target's device count.

  Catches a misspelt key or a batch that does not divide the pod's data-parallel size here,
  before a TPU is paid for.
  """
  from fmjax import config_lib
  acc = parse_accelerator(spec.accelerator)
  path, arg = config_lib.split_config_spec(spec.config)
  local = os.path.join(spec.code_dir, path)  # the file the workers run, where this machine has it
  local = local if os.path.isfile(local) else path
  config = config_lib.load_config(local + (f":{arg}" if arg is not None else ""), _train_overrides(spec))
  try:  # fine-tuning and SFT configs (a GLUE sweep's printed `fmjax finetune` runs) launch with --command
    config_lib.check_command(config, spec.command)
  except config_lib.ConfigError as e:
    kind = config_lib.command_of(config)
    raise LaunchError(f"{e}; to launch it, pass --command={kind}") from None
  config_lib.validate(config, num_devices=acc.chips * spec.num_slices)
  dcn = int(config.mesh.dcn_data)
  if spec.num_slices > 1 and dcn not in (-1, spec.num_slices):  # the run would refuse it on the pod
    raise LaunchError(f"--config.mesh.dcn_data={dcn} but --num-slices={spec.num_slices}: dcn_data spans the "
                      f"slices, one index each; set it to {spec.num_slices} or leave it out")


# ----------------------------------------------------------------------------------------------
# The plan.


def plan_commands(spec: LaunchSpec, mode: str = "all") -> list[list[str]]:
  """The exact commands (argv lists) that `mode` runs, in order. Validates the spec first."""
  spec = resolve(spec)
  acc = validate(spec, mode)
  if mode == "xpk":
    return [_xpk_create(spec)]
  if mode == "xpk-delete":
    return [_xpk_delete(spec)]
  steps = {"create": _create, "setup": _setup, "run": _run, "logs": _logs, "delete": _delete}
  modes = ("create", "setup", "run") if mode == "all" else (mode,)
  return [cmd for m in modes for cmd in steps[m](spec, acc)]


def _queued(spec: LaunchSpec) -> bool:
  """Queued resources for multislice (Cloud TPU makes it no other way) and, unless --no-queued, for spot:
  a plain spot `tpu-vm create` fails at once when capacity is short, a queued request waits for it."""
  if spec.num_slices > 1:
    return True
  return spec.capacity == "spot" if spec.queued is None else spec.queued


def _nodes(spec: LaunchSpec) -> list[str]:
  """TPU VM names: the TPU itself, or a multislice queued resource's `<name>-<i>` nodes."""
  if spec.num_slices == 1:
    return [spec.name]
  return [f"{spec.name}-{i}" for i in range(spec.num_slices)]


def _where(spec: LaunchSpec) -> list[str]:
  return [f"--zone={spec.zone}", f"--project={spec.project}"]


def _capacity_flags(spec: LaunchSpec) -> list[str]:
  return {"on-demand": [], "spot": ["--spot"], "reserved": ["--reserved"]}[spec.capacity]


@dataclasses.dataclass(frozen=True)
class _Lifecycle:
  """The states of what `create` makes, as `gcloud ... describe` names them, grouped by what `create` does."""
  kind: str        # gcloud's group: tpu-vm | queued-resources
  what: str        # its name in messages
  state_format: str
  ready: str       # setup can start
  pending: str     # on its way to `ready`: reused and waited for
  dead: str        # holds the name but will not come back: deleted and created again
  hopeless: str    # a wait ends here: it will not become `ready`


_TPU_VM = _Lifecycle("tpu-vm", "TPU VM", "--format=value(state)", "READY", "CREATING|STARTING|RESTARTING",
                     "PREEMPTED|TERMINATED", "PREEMPTED|TERMINATED|STOPPING|STOPPED|DELETING")
_QUEUED = _Lifecycle("queued-resources", "queued resource", "--format=value(state.state)", "ACTIVE",
                     "CREATING|ACCEPTED|WAITING_FOR_RESOURCES|PROVISIONING", "SUSPENDED|FAILED",
                     "SUSPENDED|FAILED|SUSPENDING|DELETING")


def _create(spec: LaunchSpec, acc: Accelerator) -> list[list[str]]:
  """Creates the TPU VM or queued resource unless one of the name is already there, then waits until it is ready.

  Re-running `create` (or `all`) picks up where an interrupted or preempted plan stopped: one that is live
  (creating, waiting for capacity, ready) is reused; a preempted TPU or a suspended or failed queued
  resource still holds the name until deleted, so it is deleted and created again, which is how spot
  capacity comes back; any other state (stopped, being deleted) stops the plan in one line.
  """
  runtime = spec.runtime or acc.family.runtime
  if not _queued(spec):
    life = _TPU_VM
    create = ["gcloud", "compute", "tpus", "tpu-vm", "create", spec.name, *_where(spec),
              f"--accelerator-type={acc.name}", f"--version={runtime}", *_capacity_flags(spec)]
  else:
    life = _QUEUED
    if spec.num_slices > 1:
      nodes = [f"--node-count={spec.num_slices}", f"--node-prefix={spec.name}"]
    else:
      nodes = [f"--node-id={spec.name}"]
    # `queued-resources create` returns once the request is queued; setup needs ACTIVE nodes.
    create = ["gcloud", "compute", "tpus", "queued-resources", "create", spec.name, *_where(spec),
              f"--accelerator-type={acc.name}", f"--runtime-version={runtime}", *nodes, *_capacity_flags(spec)]
  describe = _script_join(["gcloud", "compute", "tpus", life.kind, "describe", spec.name, *_where(spec),
                           life.state_format])
  delete = _script_join(_delete_argv(spec, life))
  it = f"{life.what} {spec.name}"
  ensure = (f'state=$({describe} 2>/dev/null) || state=""; case $state in "") ;; '
            f'{life.dead}) echo "{it} is $state: deleting it to create it again" >&2; {delete} || exit;; '
            f'{life.pending}) echo "{it} already exists ($state): not creating it again, waiting until it is '
            f'{life.ready}" >&2; exit 0;; '
            f'{life.ready}) echo "{it} already exists and is {life.ready}: using it as it is" >&2; exit 0;; '
            f'*) echo "{it} is $state, which create cannot use: run the same command again once that changes, or '
            f'remove it with fmjax launch delete" >&2; exit 1;; esac; exec {_script_join(create)}')
  wait = (f'fails=0; while true; do if state=$({describe}); then fails=0; else fails=$((fails + 1)); '
          f'if [ $fails -ge {DESCRIBE_TRIES} ]; then echo "could not read the state of {it} {DESCRIBE_TRIES} '
          f'times in a row: run the same command again to go on waiting" >&2; exit 1; fi; '
          f'echo "{it}: describe failed ($fails of {DESCRIBE_TRIES}), trying again in {RETRY_S}s" >&2; '
          f'sleep {RETRY_S}; continue; fi; case $state in {life.ready}) exit 0;; '
          f'{life.hopeless}) echo "{it} is $state, so it will not become {life.ready}: run the same command again '
          f'(a preempted, suspended or failed one is created again)" >&2; exit 1;; esac; '
          f'echo "{it}: $state, waiting"; sleep {POLL_S}; done')
  return [["bash", "-c", ensure], ["bash", "-c", wait]]


def _ssh(spec: LaunchSpec, node: str, remote: str | None, worker: str = "all") -> list[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *_where(spec), f"--worker={worker}"]
  return cmd if remote is None else cmd + [f"--command={remote}"]


def _setup(spec: LaunchSpec, acc: Accelerator) -> list[list[str]]:
  # The worker script makes a Python >= 3.11 venv (TPU VM images ship 3.10); the install itself
  # stays visible here.
  install = f'cd {REMOTE_CODE_DIR} && bash launch/worker_setup.sh && .venv/bin/pip install -e ".[tpu]"'
  commands = []
  if spec.git_ref:
    fetch = (f"(test -d {REMOTE_CODE_DIR}/.git || git clone {shlex.quote(spec.git_repo)} {REMOTE_CODE_DIR})"
             f" && git -C {REMOTE_CODE_DIR} fetch origin {shlex.quote(spec.git_ref)}"
             f" && git -C {REMOTE_CODE_DIR} checkout --force --detach FETCH_HEAD")
  else:
    tarball = f"/tmp/fmjax-{spec.name}.tar.gz"
    commands.append(["tar", "-czf", tarball, *(f"--exclude={p}" for p in _tar_excludes(spec.code_dir)),
                     "-C", spec.code_dir, "."])
    fetch = f"mkdir -p {REMOTE_CODE_DIR} && tar -xzf {REMOTE_TARBALL} -C {REMOTE_CODE_DIR}"
  for node in _nodes(spec):
    if not spec.git_ref:
      commands.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{node}:{REMOTE_TARBALL}",
                       *_where(spec), "--worker=all"])
    commands.append(_ssh(spec, node, f"{fetch} && {install}"))
  return commands


def _tar_excludes(code_dir: str) -> list[str]:
  """TAR_EXCLUDES and the plain patterns of `code_dir/.dockerignore` (not `!` exceptions)."""
  patterns = list(TAR_EXCLUDES)
  try:
    with open(os.path.join(code_dir, ".dockerignore")) as f:
      lines = f.read().splitlines()
  except OSError:
    lines = []
  for line in lines:
    pattern = line.strip().strip("/")
    if pattern and not pattern.startswith(("#", "!")) and pattern not in patterns:
      patterns.append(pattern)
  return patterns


def _compilation_cache(spec: LaunchSpec) -> str:
  if spec.compilation_cache:
    return spec.compilation_cache
  if spec.workdir.startswith("gs://"):
    # Bucket-wide, so later runs and sweep members with the same shapes skip compilation.
    bucket = spec.workdir[len("gs://"):].split("/", 1)[0]
    return f"gs://{bucket}/jax_compilation_cache"
  return ""


def worker_env(spec: LaunchSpec) -> dict[str, str]:
  """Environment of the training process on every worker (before the per-slice settings)."""
  env = {"PYTHONUNBUFFERED": "1",
         # fmjax train calls jax.distributed.initialize(), which on Cloud TPU finds the
         # coordinator, process id and count from the TPU metadata.
         "FMJAX_DISTRIBUTED": "1"}
  cache = _compilation_cache(spec)
  if cache:
    env["JAX_COMPILATION_CACHE_DIR"] = cache
  if spec.libtpu_init_args:
    env["LIBTPU_INIT_ARGS"] = spec.libtpu_init_args
  for item in spec.env:
    key, value = item.split("=", 1)
    env[key] = value
  return env


def _train_overrides(spec: LaunchSpec) -> list[str]:
  overrides = list(spec.overrides)
  keys = {o.split("=", 1)[0].strip().removeprefix("config.") for o in overrides}
  if spec.num_slices > 1 and "mesh.dcn_data" not in keys:
    # The outer mesh axis spans the slices, so only data parallelism crosses the slow DCN.
    overrides.append(f"mesh.dcn_data={spec.num_slices}")
  return overrides


def train_argv(spec: LaunchSpec, fmjax: str = "fmjax") -> list[str]:
  """`fmjax train --config=... --workdir=... --config.a.b=v ...` (or `finetune`, `sft`) as run on each worker."""
  return [fmjax, spec.command, f"--config={spec.config}", f"--workdir={spec.workdir}",
          *(f"--config.{o.removeprefix('config.')}" for o in _train_overrides(spec))]


def _run(spec: LaunchSpec, acc: Accelerator) -> list[list[str]]:
  env = worker_env(spec)
  train = train_argv(spec, fmjax=".venv/bin/fmjax")
  if spec.num_slices == 1:
    remote = f"cd {REMOTE_CODE_DIR} && " + shlex.join(["env", *_env_items(env), "bash", "launch/worker_run.sh",
                                                        *train])
    return [_ssh(spec, spec.name, remote)]
  # Multislice: every slice gets its slice id, and all get slice 0's first worker as the
  # megascale coordinator. Its address exists only once the nodes do, so each line looks it up
  # first; the shell substitutes it into the remote command.
  nodes = _nodes(spec)
  describe = _script_join(["gcloud", "compute", "tpus", "tpu-vm", "describe", nodes[0], *_where(spec),
                            "--format=value(networkEndpoints[0].ipAddress)"])
  commands = []
  for i, node in enumerate(nodes):
    slice_env = dict(env, MEGASCALE_NUM_SLICES=str(spec.num_slices), MEGASCALE_SLICE_ID=str(i),
                     MEGASCALE_PORT=str(MEGASCALE_PORT), MEGASCALE_COORDINATOR_ADDRESS=f"{_COORD}:{MEGASCALE_PORT}")
    remote = f"cd {REMOTE_CODE_DIR} && " + shlex.join(["env", *_env_items(slice_env), "bash", "launch/worker_run.sh",
                                                        *train])
    ssh = _script_join(_ssh(spec, node, remote)).replace(_COORD, "$coordinator")
    script = f'coordinator=$({describe}) && test -n "$coordinator" && exec {ssh}'
    commands.append(["bash", "-c", script])
  return commands


# Stands for slice 0's address in a remote command until the shell fills it in.
_COORD = "@COORDINATOR@"


def _script_join(argv: Sequence[str]) -> str:
  """Like shlex.join, but quotes with double quotes: the line goes inside `bash -c '...'`."""
  def quote(arg: str) -> str:
    if shlex.quote(arg) == arg:
      return arg
    return '"' + re.sub(r'([\\"$`])', r"\\\1", arg) + '"'
  return " ".join(quote(a) for a in argv)


def _env_items(env: dict[str, str]) -> list[str]:
  return [f"{k}={v}" for k, v in env.items()]


def _logs(spec: LaunchSpec, acc: Accelerator) -> list[list[str]]:
  commands = []
  if spec.workdir.startswith("gs://"):
    # One file per worker, named by host, next to the run's metrics.
    dest = shlex.quote(spec.workdir.rstrip("/") + "/logs/") + '"$(hostname)".log'
    copy = f"gcloud storage cp {REMOTE_LOG} {dest}"
    commands += [_ssh(spec, node, copy) for node in _nodes(spec)]
  tail = f"tail -n {int(spec.log_lines)}{' -F' if spec.follow else ''} {REMOTE_LOG}"
  commands.append(_ssh(spec, _nodes(spec)[0], tail, worker="0"))
  return commands


def _delete_argv(spec: LaunchSpec, life: _Lifecycle) -> list[str]:
  # --force deletes a queued resource's nodes with it.
  force = ["--force"] if life is _QUEUED else []
  return ["gcloud", "compute", "tpus", life.kind, "delete", spec.name, *_where(spec), *force, "--quiet"]


def _in_double_quotes(text: str) -> str:
  """`text` as it goes between a shell's double quotes: backslash, quote, $ and backtick escaped."""
  return "".join("\\" + ch if ch in '\\"$`' else ch for ch in text)


def _delete(spec: LaunchSpec, acc: Accelerator) -> list[list[str]]:
  """Deletes what `create` made of the name, whatever flags `create` was given.

  It looks: the queued resource of the name if there is one (with its nodes), else the TPU VM. The
  queued resource goes first because its single node is a TPU VM of the same name, and deleting only
  that would leave the request behind. Deleting by the flags instead would miss a spot TPU made with
  --no-queued (or a queued one made without --spot) and leave it running.
  """
  def found(life: _Lifecycle) -> str:
    describe = ["gcloud", "compute", "tpus", life.kind, "describe", spec.name, *_where(spec), life.state_format]
    return f"{_script_join(describe)} >/dev/null 2>&1"
  vm_describe = _script_join(["gcloud", "compute", "tpus", "tpu-vm", "describe", spec.name, *_where(spec)])
  none = (f"found no queued resource or TPU VM named {spec.name} in {spec.zone} of project {spec.project}, so "
          f"nothing was deleted; if it is there, {vm_describe} says why it could not be read")
  script = (f"if {found(_QUEUED)}; then exec {_script_join(_delete_argv(spec, _QUEUED))}; "
            f"elif {found(_TPU_VM)}; then exec {_script_join(_delete_argv(spec, _TPU_VM))}; fi; "
            f'echo "{_in_double_quotes(none)}" >&2; exit 1')
  return [["bash", "-c", script]]


def _xpk_create(spec: LaunchSpec) -> list[str]:
  cmd = ["xpk", "workload", "create", f"--cluster={spec.cluster}", f"--workload={spec.name}",
         f"--tpu-type={spec.accelerator}", f"--num-slices={spec.num_slices}", *_where(spec)]
  # JobSet gives each pod its MEGASCALE_* and TPU worker settings, so only ours go here.
  cmd += [f"--env={item}" for item in _env_items(worker_env(spec))]
  if spec.max_restarts:
    # A preempted run saves and exits 143; xpk restarts a workload on exit codes 42 and 127-255 by
    # default (its --restart-on-exit-codes), and the restarted run resumes from the workdir.
    cmd += [f"--max-restarts={spec.max_restarts}"]
  train = shlex.join(train_argv(spec))
  if spec.docker_image:
    cmd += [f"--docker-image={spec.docker_image}", f"--command={train}"]
  else:
    # xpk builds an image from the base image plus this directory; install into it at start.
    cmd += [f"--base-docker-image={spec.base_docker_image}", f"--script-dir={spec.code_dir}",
            f'--command=pip install -e ".[tpu]" && {train}']
  return cmd


def _xpk_delete(spec: LaunchSpec) -> list[str]:
  return ["xpk", "workload", "delete", f"--cluster={spec.cluster}", f"--workload={spec.name}",
          *_where(spec)]


# ----------------------------------------------------------------------------------------------
# Running it.


def run(spec: LaunchSpec, mode: str = "all", execute: bool = False, out: TextIO | None = None) -> list[list[str]]:
  """Prints the plan for `mode` (dry run) or runs it in order, stopping at the first failure.

  Returns the commands. Raises LaunchError for bad input (before anything runs) and
  CommandFailed when an executed command exits non-zero.
  """
  out = sys.stdout if out is None else out
  commands = plan_commands(spec, mode)
  if not execute:
    for cmd in commands:
      print(shlex.join(cmd), file=out)
    return commands
  # A `bash -c` script calls gcloud inside: it needs it as much as a plain gcloud command does.
  tools = {c[0] for c in commands} | {"gcloud" for c in commands if c[0] == "bash" and "gcloud " in c[-1]}
  missing = sorted(t for t in tools if shutil.which(t) is None)
  if missing:
    hints = {"gcloud": "install the Google Cloud CLI", "xpk": "pip install xpk"}
    raise LaunchError(f"{', '.join(missing)} not found on PATH; "
                      + "; ".join(hints.get(m, f"install {m}") for m in missing))
  def stop(signum, frame):
    raise Terminated
  try:  # SIGTERM (a scheduler, a closed session) ends the plan as Ctrl-C does, saying what may be left
    previous = signal.signal(signal.SIGTERM, stop)
  except ValueError:  # not the main thread
    previous = None
  try:
    for i, cmd in enumerate(commands):
      print(f"+ {shlex.join(cmd)}", file=out, flush=True)
      try:
        returncode = subprocess.run(cmd).returncode
      except KeyboardInterrupt as e:
        raise type(e)(_interrupted(spec, mode, i, len(commands))) from None
      if returncode:
        raise CommandFailed(cmd, returncode)
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
  return commands


class Terminated(KeyboardInterrupt):
  """SIGTERM while an executed plan ran; `fmjax` exits with 143, as for any command SIGTERM stopped."""
  exit_code = 143


def _interrupted(spec: LaunchSpec, mode: str, i: int, n: int) -> str:
  """What a Ctrl-C during command `i` of an executed plan may have left behind, and what to do about it."""
  if mode == "logs":  # how a --follow ends
    return ""
  where, at = f"--zone={spec.zone} --project={spec.project}", f"at command {i + 1} of {n}"
  if mode in ("delete", "xpk-delete"):
    return f"{at}; rerun the same command to finish deleting"
  if mode == "xpk":
    return (f"{at}: workload {spec.name} may be submitted; `fmjax launch xpk --delete --workload={spec.name} "
            f"--cluster={spec.cluster} {where}` removes it")
  return (f"{at}: TPU {spec.name} may exist, and is billed while it does; rerun the same command to go on (it "
          f"reuses the TPU that is there), or remove it with `fmjax launch delete --tpu={spec.name} {where}`")


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  from fmjax import config_lib
  try:
    return config_lib.split_overrides(argv)
  except config_lib.ConfigError as e:
    raise LaunchError(str(e)) from None


class _Parser(argparse.ArgumentParser):
  """Usage mistakes end in one `error: ...` line like every other bad input."""

  def error(self, message: str):
    raise LaunchError(f"{self.prog}: {message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
  p = _Parser(
      prog="fmjax launch", allow_abbrev=False,
      description="Cloud TPU commands for fmjax; printed (dry run) unless --execute. "
                  "Training overrides pass through as --config.a.b=v.")
  sub = p.add_subparsers(dest="mode", required=True, metavar="MODE")

  def common(q: argparse.ArgumentParser) -> None:
    q.add_argument("--accelerator", default="", help="TPU type, e.g. v5p-128, v4-32, v5litepod-16, v6e-256")
    q.add_argument("--zone", default="", help="default: $CLOUDSDK_COMPUTE_ZONE, else gcloud's compute/zone")
    q.add_argument("--project", default="", help="default: $CLOUDSDK_CORE_PROJECT, else gcloud's project")
    q.add_argument("--num-slices", type=int, default=1, help="> 1: multislice (a queued resource on TPU VMs)")
    q.add_argument("--config", default="", help="configs/NAME.py[:args] for `fmjax train`")
    q.add_argument("--workdir", default="", help="gs://BUCKET/PATH (required for multi-host runs)")
    q.add_argument("--libtpu-init-args", default="", help="LIBTPU_INIT_ARGS for the training process")
    q.add_argument("--compilation-cache", default="",
                   help="JAX_COMPILATION_CACHE_DIR; default gs://<workdir bucket>/jax_compilation_cache")
    q.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment; repeatable")
    q.add_argument("--code-dir", default=".", help="the repository to ship (default: the current directory)")
    q.add_argument("--command", default="train", choices=COMMANDS,
                   help="the fmjax subcommand the workers run with --config (default: train)")
    q.add_argument("--execute", action="store_true", help="run the commands instead of printing them")

  helps = {"create": "create the TPU VM or queued resource", "setup": "copy the code to all workers and install it",
           "run": "start `fmjax train` (or --command's) on all workers (detached)",
           "logs": "collect worker logs; show worker 0's tail",
           "delete": "delete the TPU VM or queued resource", "all": "create, setup and run"}
  for mode in MODES:
    q = sub.add_parser(mode, help=helps[mode], allow_abbrev=False)
    q.add_argument("--tpu", default="", help="TPU VM / queued resource name")
    common(q)
    cap = q.add_mutually_exclusive_group()
    cap.add_argument("--spot", action="store_true", help="spot capacity (can be preempted)")
    cap.add_argument("--reserved", action="store_true", help="the project's reserved capacity")
    q.add_argument("--queued", action=argparse.BooleanOptionalAction, default=None,
                   help="request through a queued resource, which waits for capacity (default: yes with --spot "
                        "or --num-slices > 1, else no; --no-queued makes a spot TPU VM directly)")
    q.add_argument("--runtime", default="", help="TPU software version; default per TPU generation")
    q.add_argument("--git-repo", default="", help="workers clone this repository instead of a tarball")
    q.add_argument("--git-ref", default="", help="branch, tag or commit to check out (with --git-repo)")
    q.add_argument("--lines", type=int, default=200, help="`logs`: lines of worker 0's log to show")
    q.add_argument("--follow", action="store_true", help="`logs`: keep following worker 0's log")
  q = sub.add_parser("xpk", help="GKE: xpk workload create (or --delete)", allow_abbrev=False)
  q.add_argument("--cluster", default="", help="GKE cluster made with `xpk cluster create`")
  q.add_argument("--workload", default="", help="workload name")
  q.add_argument("--docker-image", default="", help="image with fmjax[tpu] installed (else base image + code)")
  q.add_argument("--base-docker-image", default=LaunchSpec.base_docker_image)
  q.add_argument("--delete", action="store_true", help="delete the workload instead")
  q.add_argument("--max-restarts", type=int, default=0,
                 help="restart the workload up to N times after a failure or preemption; it resumes")
  common(q)
  return p


def spec_from_args(argv: Sequence[str]) -> tuple[LaunchSpec, str, bool]:
  """Parses `fmjax launch` argv into (spec, mode, execute)."""
  rest, overrides = _split_overrides(argv)
  args = _parser().parse_args(rest)
  spec = LaunchSpec(
      accelerator=args.accelerator, zone=args.zone, project=args.project, config=args.config,
      workdir=args.workdir, overrides=tuple(overrides), command=args.command, num_slices=args.num_slices,
      libtpu_init_args=args.libtpu_init_args, compilation_cache=args.compilation_cache,
      env=tuple(args.env), code_dir=args.code_dir)
  if args.mode == "xpk":
    spec = dataclasses.replace(spec, name=args.workload, cluster=args.cluster, docker_image=args.docker_image,
                               base_docker_image=args.base_docker_image, max_restarts=args.max_restarts)
    return spec, "xpk-delete" if args.delete else "xpk", args.execute
  capacity = "spot" if args.spot else "reserved" if args.reserved else "on-demand"
  spec = dataclasses.replace(spec, name=args.tpu, capacity=capacity, queued=args.queued, runtime=args.runtime,
                             git_repo=args.git_repo, git_ref=args.git_ref, log_lines=args.lines,
                             follow=args.follow)
  return spec, args.mode, args.execute


def cli(argv: list[str]) -> int:
  """`fmjax launch ...`: 0 on success, 2 for bad input, 1 when an executed command fails."""
  from fmjax.config_lib import ConfigError
  try:
    spec, mode, execute = spec_from_args(argv)
    spec = resolve(spec)
    validate(spec, mode)
    if mode in ("run", "all", "xpk"):
      check_config(spec)
    run(spec, mode, execute=execute)
  except (LaunchError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except CommandFailed as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except SystemExit as e:  # --help
    return e.code if isinstance(e.code, int) else 0
  if not execute:
    print("# dry run: add --execute to run these commands", file=sys.stderr)
  return 0
