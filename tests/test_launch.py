"""The Cloud TPU launcher: golden dry-run plans, execution against fake gcloud/xpk, bad input.

Golden files live in tests/golden/launch/. After an intended change to the commands, check the
diff and regenerate them with `FMJAX_UPDATE_GOLDEN=1 pytest tests/test_launch.py`.
"""

import dataclasses
import fnmatch
import os
import shutil
import pathlib
import shlex
import stat
import subprocess

import pytest

from fmjax import launch

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "launch"
WHERE = ["--zone=us-east5-a", "--project=my-proj"]

# name -> (argv shared by every mode, modes). Each golden file holds the dry run of each mode.
GOLDEN_CASES = {
    "on_demand_single_host": (
        ["--tpu=bert-base", "--accelerator=v6e-8", *WHERE, "--config=configs/bert.py:base",
         "--workdir=/home/me/runs/bert"],
        ("create", "setup", "run", "logs", "delete")),
    "spot_v5p_128": (
        ["--tpu=gpt2-small", "--accelerator=v5p-128", "--spot", *WHERE, "--config=configs/gpt.py:small",
         "--workdir=gs://my-bucket/gpt2", "--git-repo=https://github.com/me/fmjax.git", "--git-ref=v0.1",
         "--libtpu-init-args=--xla_tpu_enable_async_collective_fusion=true --xla_enable_async_all_gather=true",
         "--config.train.steps=5000", "--config.optim.lr=3e-4", "--follow", "--lines=50"],
        ("create", "setup", "run", "logs", "delete")),
    "queued_multislice_2x_v5p_128": (
        ["--tpu=gpt2-xl", "--accelerator=v5p-128", "--num-slices=2", "--reserved", *WHERE,
         "--config=configs/gpt.py:xl", "--workdir=gs://my-bucket/gpt2-xl", "--env=TPU_STDERR_LOG_LEVEL=2"],
        ("all", "logs", "delete")),
    "xpk_v5p_128": (
        ["--cluster=my-gke", "--workload=gpt2-small", "--accelerator=v5p-128", "--num-slices=2", *WHERE,
         "--config=configs/gpt.py:small", "--workdir=gs://my-bucket/gpt2-xpk"],
        ("xpk", "xpk --delete")),
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
  """Goldens must not depend on the caller's gcloud defaults or directory."""
  monkeypatch.delenv("CLOUDSDK_CORE_PROJECT", raising=False)
  monkeypatch.delenv("CLOUDSDK_COMPUTE_ZONE", raising=False)
  monkeypatch.chdir(REPO)


def _dry_run(capsys, argv):
  code = launch.cli(argv)
  captured = capsys.readouterr()
  assert code == 0, captured.err
  return captured.out


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_dry_run_matches_golden(case, capsys):
  argv, modes = GOLDEN_CASES[case]
  text = ""
  for mode in modes:
    words = mode.split()
    text += f"# fmjax launch {mode}\n" + _dry_run(capsys, [words[0], *argv, *words[1:]])
  path = GOLDEN / f"{case}.txt"
  if os.environ.get("FMJAX_UPDATE_GOLDEN") == "1":
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  assert path.exists(), f"missing {path}; create it with FMJAX_UPDATE_GOLDEN=1 pytest tests/test_launch.py"
  assert text == path.read_text(), (
      f"dry-run output of {case!r} differs from {path}; if the change is intended, check the diff and run "
      "FMJAX_UPDATE_GOLDEN=1 pytest tests/test_launch.py")


def test_dry_run_lines_are_valid_shell(capsys):
  """Each printed line splits back into one argv, and every `bash -c` script parses."""
  for case, (argv, modes) in GOLDEN_CASES.items():
    for mode in modes:
      words = mode.split()
      for line in _dry_run(capsys, [words[0], *argv, *words[1:]]).splitlines():
        cmd = shlex.split(line)
        assert cmd[0] in ("gcloud", "xpk", "tar", "bash"), line
        if cmd[:2] == ["bash", "-c"]:
          assert subprocess.run(["bash", "-n", "-c", cmd[2]]).returncode == 0, line


def test_plan_is_what_the_golden_shows():
  """Spot-check the key facts the goldens encode, so a careless regeneration is caught."""
  spec = launch.LaunchSpec(name="p", accelerator="v5p-128", zone="z", project="pr", config="configs/gpt.py:small",
                           workdir="gs://b/run", num_slices=2, capacity="spot")
  cmds = launch.plan_commands(spec, "all")
  reclaim, create = cmds[0], cmds[1]
  assert reclaim[:2] == ["bash", "-c"] and "queued-resources describe p " in reclaim[2]
  assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert {"--node-count=2", "--node-prefix=p", "--spot", "--accelerator-type=v5p-128",
          "--runtime-version=v2-alpha-tpuv5"} <= set(create)
  run_scripts = [c[2] for c in cmds if c[:2] == ["bash", "-c"] and "MEGASCALE" in c[2]]
  assert len(run_scripts) == 2
  for i, script in enumerate(run_scripts):
    assert f"ssh p-{i} " in script and f"MEGASCALE_SLICE_ID={i} " in script
    assert "MEGASCALE_NUM_SLICES=2" in script and "--config.mesh.dcn_data=2" in script
    assert "JAX_COMPILATION_CACHE_DIR=gs://b/jax_compilation_cache" in script
  queued = launch.plan_commands(dataclasses.replace(spec, num_slices=1, queued=True), "create")
  assert "--node-id=p" in queued[1] and not any(a.startswith("--node-count") for a in queued[1])
  assert launch.plan_commands(dataclasses.replace(spec, num_slices=1, queued=True), "delete") == [
      ["gcloud", "compute", "tpus", "queued-resources", "delete", "p", "--zone=z", "--project=pr", "--force",
       "--quiet"]]
  single = launch.plan_commands(launch.LaunchSpec(name="s", accelerator="v4-8", zone="z", project="pr"), "create")
  assert single[1:] == [["gcloud", "compute", "tpus", "tpu-vm", "create", "s", "--zone=z", "--project=pr",
                         "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base"]]
  assert "tpu-vm describe s --zone=z --project=pr \"--format=value(state)\"" in single[0][2]


@pytest.mark.parametrize("name,chips,hosts", [
    ("v4-8", 4, 1), ("v4-32", 16, 4), ("v5p-8", 4, 1), ("v5p-128", 64, 16), ("v5litepod-8", 8, 1),
    ("v5litepod-16", 16, 4), ("v6e-8", 8, 1), ("v6e-256", 256, 64)])
def test_accelerator_table(name, chips, hosts):
  acc = launch.parse_accelerator(name)
  assert (acc.chips, acc.hosts) == (chips, hosts)


# ---------------------------------------------------------------------------------------------
# Execution against fake gcloud / xpk.

FAKE = """#!/bin/sh
{ printf '%s' "$(basename "$0")"; for a in "$@"; do printf '\\t%s' "$a"; done; printf '\\n'; } >> "$FAKE_LOG"
# A TPU's state is $FAKE_STATE until this log shows it created (then a queued resource is ACTIVE);
# without FAKE_STATE nothing of the name exists yet (describe fails).
case "$*" in
  *"queued-resources describe"*)
    if grep -q "queued-resources.create" "$FAKE_LOG"; then echo ACTIVE
    elif [ -n "$FAKE_STATE" ]; then echo "$FAKE_STATE"; else exit 1; fi ;;
  *"tpu-vm describe"*"value(state)"*)
    if [ -n "$FAKE_STATE" ]; then echo "$FAKE_STATE"; else exit 1; fi ;;
  *"tpu-vm describe"*) echo 10.1.2.3 ;;
esac
if [ -n "$FAKE_FAIL" ]; then
  case "$*" in *"$FAKE_FAIL"*) exit 3 ;; esac
fi
exit 0
"""


@pytest.fixture
def fake_tools(tmp_path, monkeypatch):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in ("gcloud", "xpk"):
    path = bin_dir / tool
    path.write_text(FAKE)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  log = tmp_path / "calls.log"
  monkeypatch.setenv("FAKE_LOG", str(log))
  monkeypatch.delenv("FAKE_FAIL", raising=False)
  monkeypatch.delenv("FAKE_STATE", raising=False)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  code = tmp_path / "code"  # a checkout as the workers get it: the package, its configs, a marker
  (code / "launch").mkdir(parents=True)
  (code / "launch" / "marker.txt").write_text("shipped")
  (code / "pyproject.toml").write_text("[project]\nname = 'fmjax'\n")
  (code / "fmjax").mkdir()
  shutil.copytree(os.path.join(os.path.dirname(__file__), os.pardir, "configs"), code / "configs")

  def calls():
    return [line.split("\t") for line in log.read_text().splitlines()] if log.exists() else []
  return code, calls


def test_execute_runs_commands_in_order(fake_tools, capsys):
  code, calls = fake_tools
  name = f"fmjax-test-{os.getpid()}"
  argv = [f"--tpu={name}", "--accelerator=v5p-128", "--num-slices=2", *WHERE, "--config=configs/gpt.py:small",
          "--workdir=gs://my-bucket/run", f"--code-dir={code}", "--config.train.steps=7"]
  tarball = pathlib.Path(f"/tmp/fmjax-{name}.tar.gz")
  try:
    assert launch.cli(["all", *argv, "--execute"]) == 0, capsys.readouterr().err
    listing = subprocess.run(["tar", "-tzf", str(tarball)], capture_output=True, text=True, check=True).stdout
    assert "./launch/marker.txt" in listing.splitlines()
  finally:
    tarball.unlink(missing_ok=True)
  assert launch.cli(["delete", *argv, "--execute"]) == 0

  spec, _, _ = launch.spec_from_args(["all", *argv])
  planned = launch.plan_commands(spec, "all") + launch.plan_commands(spec, "delete")
  # Direct gcloud commands arrive with exactly the planned argv; `bash -c` ones call gcloud inside.
  direct = [c for c in planned if c[0] == "gcloud"]
  recorded = calls()
  assert [c for c in recorded if c[1:] in [d[1:] for d in direct]] == direct
  kinds = [" ".join(c[1:5]) + " " + (c[5] if len(c) > 5 else "") for c in recorded]
  assert kinds == [
      f"compute tpus queued-resources describe {name}",      # nothing of the name to reclaim
      f"compute tpus queued-resources create {name}",
      f"compute tpus queued-resources describe {name}",      # the wait until ACTIVE
      f"compute tpus tpu-vm scp /tmp/fmjax-{name}.tar.gz",
      f"compute tpus tpu-vm ssh {name}-0",
      f"compute tpus tpu-vm scp /tmp/fmjax-{name}.tar.gz",
      f"compute tpus tpu-vm ssh {name}-1",
      f"compute tpus tpu-vm describe {name}-0",               # slice 0's address
      f"compute tpus tpu-vm ssh {name}-0",
      f"compute tpus tpu-vm describe {name}-0",
      f"compute tpus tpu-vm ssh {name}-1",
      f"compute tpus queued-resources delete {name}",
  ]
  for slice_id, idx in ((0, 8), (1, 10)):
    remote = next(a for a in recorded[idx] if a.startswith("--command="))
    assert f"MEGASCALE_SLICE_ID={slice_id} " in remote
    assert "MEGASCALE_COORDINATOR_ADDRESS=10.1.2.3:8081 " in remote   # filled in by the shell
    assert remote.endswith("--workdir=gs://my-bucket/run --config.train.steps=7 --config.mesh.dcn_data=2")


def test_setup_tarball_leaves_out_workdirs_wheels_builds_and_dockerignored(fake_tools, capsys):
  code, _ = fake_tools
  for junk in ("workdirs/run/checkpoints/ckpt.bin", ".whl/jax.whl", "build/lib/x.py", ".git/HEAD",
               "fmjax/__pycache__/a.pyc", "secrets/key.json"):
    (code / junk).parent.mkdir(parents=True, exist_ok=True)
    (code / junk).write_text("x")
  (code / ".dockerignore").write_text("# not shipped\n/secrets/\n!launch\n")
  name = f"test-tar-{os.getpid()}"
  spec = launch.LaunchSpec(name=name, accelerator="v4-8", zone="z", project="p", code_dir=str(code))
  tar = launch.plan_commands(spec, "setup")[0]
  assert tar == ["tar", "-czf", f"/tmp/fmjax-{name}.tar.gz", "--exclude=.git", "--exclude=.venv", "--exclude=__pycache__",
                 "--exclude=*.egg-info", "--exclude=workdirs", "--exclude=.whl", "--exclude=build",
                 "--exclude=.pytest_cache", "--exclude=*.pyc", "--exclude=secrets", "-C", str(code), "."]
  tarball = pathlib.Path(f"/tmp/fmjax-{name}.tar.gz")
  try:
    assert launch.cli(["setup", f"--tpu={name}", "--accelerator=v4-8", *WHERE, f"--code-dir={code}",
                       "--execute"]) == 0, capsys.readouterr().err
    listing = subprocess.run(["tar", "-tzf", str(tarball)], capture_output=True, text=True, check=True).stdout
  finally:
    tarball.unlink(missing_ok=True)
  files = sorted(l for l in listing.splitlines() if not l.endswith("/") and not l.startswith("./configs/"))
  assert files == ["./.dockerignore", "./launch/marker.txt", "./pyproject.toml"]


def test_execute_xpk(fake_tools, capsys):
  _, calls = fake_tools
  argv = ["--cluster=c1", "--workload=w1", "--accelerator=v5litepod-16", *WHERE, "--config=configs/gpt.py:small",
          "--workdir=gs://b/w1", "--docker-image=gcr.io/me/fmjax:1"]
  assert launch.cli(["xpk", *argv, "--execute"]) == 0, capsys.readouterr().err
  assert launch.cli(["xpk", *argv, "--delete", "--execute"]) == 0
  assert calls() == [
      ["xpk", "workload", "create", "--cluster=c1", "--workload=w1", "--tpu-type=v5litepod-16", "--num-slices=1",
       *WHERE, "--env=PYTHONUNBUFFERED=1", "--env=FMJAX_DISTRIBUTED=1",
       "--env=JAX_COMPILATION_CACHE_DIR=gs://b/jax_compilation_cache", "--docker-image=gcr.io/me/fmjax:1",
       "--command=fmjax train --config=configs/gpt.py:small --workdir=gs://b/w1"],
      ["xpk", "workload", "delete", "--cluster=c1", "--workload=w1", *WHERE],
  ]
  # Restarts: a run preempted on GKE saves and exits 143.
  assert launch.cli(["xpk", *argv, "--max-restarts=5", "--execute"]) == 0
  create = calls()[-1]
  # xpk restarts on exit codes 42 and 127-255 by default, 143 among them: the count is all it needs.
  assert create[create.index("--env=JAX_COMPILATION_CACHE_DIR=gs://b/jax_compilation_cache") + 1:][:2] == [
      "--max-restarts=5", "--docker-image=gcr.io/me/fmjax:1"]
  assert launch.cli(["xpk", *argv, "--max-restarts=-1"]) == 2
  assert "--max-restarts must be 0 or more" in capsys.readouterr().err


def test_execute_stops_at_first_failure(fake_tools, capsys, monkeypatch):
  _, calls = fake_tools
  monkeypatch.setenv("FAKE_FAIL", "tpu-vm create")
  argv = ["all", "--tpu=t1", "--accelerator=v4-8", *WHERE, "--config=configs/gpt.py:tiny", "--workdir=/tmp/x",
          "--execute"]
  assert launch.cli(argv) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: command failed with exit code 3: gcloud compute tpus tpu-vm "
                                             "create t1 ")
  assert [c[3:5] for c in calls()] == [["tpu-vm", "describe"], ["tpu-vm", "create"]]  # no tar, scp or ssh after it


@pytest.mark.parametrize("queued", [False, True])
def test_a_preempted_tpu_is_deleted_and_created_again_and_a_live_one_is_left_alone(fake_tools, capfd,
                                                                                    monkeypatch, queued):
  """Spot capacity comes back by delete and create: a preempted TPU (a suspended queued resource)
  still holds its name, so `create` after a preemption would fail without the check before it."""
  _, calls = fake_tools
  kind = "queued-resources" if queued else "tpu-vm"
  argv = ["create", "--tpu=t1", "--accelerator=v4-8", *WHERE, "--spot", "--execute", *(["--queued"] if queued else [])]
  monkeypatch.setenv("FAKE_STATE", "SUSPENDED" if queued else "PREEMPTED")
  assert launch.cli(argv) == 0, capfd.readouterr().err
  steps = [c[3:5] for c in calls()]
  assert steps[:3] == [[kind, "describe"], [kind, "delete"], [kind, "create"]], steps
  assert ("--force" in calls()[1]) == queued
  assert "is " + ("SUSPENDED" if queued else "PREEMPTED") + ": deleting it to create it again" in capfd.readouterr().err

  log = fake_tools[0].parent / "calls_live.log"
  monkeypatch.setenv("FAKE_LOG", str(log))
  monkeypatch.setenv("FAKE_STATE", "READY")
  assert launch.cli(argv) == 1
  assert f"{kind} t1 already exists (READY): when it is ready, fmjax launch setup and run use it as it is" in \
      capfd.readouterr().err
  assert [line.split("\t")[3:5] for line in log.read_text().splitlines()] == [[kind, "describe"]]  # nothing else


def test_execute_without_tool_on_path_creates_nothing(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("PATH", str(tmp_path))
  argv = ["xpk", "--cluster=c", "--workload=w", "--accelerator=v6e-256", *WHERE, "--config=configs/gpt.py:small",
          "--workdir=gs://b/w", "--execute"]
  assert launch.cli(argv) == 2
  assert capsys.readouterr().err == "error: xpk not found on PATH; pip install xpk\n"


def test_worker_run_script_detaches_and_logs(tmp_path):
  env = dict(os.environ, HOME=str(tmp_path))
  script = REPO / "launch" / "worker_run.sh"
  subprocess.run(["bash", str(script), "sh", "-c", "echo step 1 loss 2.5"], env=env, check=True,
                 capture_output=True, timeout=10)
  pid = int((tmp_path / "fmjax_logs" / "train.pid").read_text())
  for _ in range(100):  # the detached child writes its line shortly after
    if (tmp_path / "fmjax_logs" / "train.log").read_text():
      break
    subprocess.run(["sleep", "0.05"])
  assert pid > 0
  assert (tmp_path / "fmjax_logs" / "train.log").read_text() == "step 1 loss 2.5\n"
  assert subprocess.run(["bash", "-n", str(REPO / "launch" / "worker_setup.sh")]).returncode == 0


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, nothing printed or run.

BASE = ["run", "--tpu=t1", "--config=configs/gpt.py:small", "--workdir=gs://b/r"]


@pytest.mark.parametrize("argv,expected", [
    (BASE + ["--accelerator=v5p-100", *WHERE],
     "error: unknown TPU accelerator type 'v5p-100'; v5p comes in sizes 8, 16, 32, 64, 128, 256, 384, 512, ... "
     "12288; did you mean 'v5p-32' or 'v5p-64' or 'v5p-128'?"),
    (BASE + ["--accelerator=v5e-16", *WHERE],
     "error: unknown TPU accelerator type 'v5e-16'; Cloud TPU calls it 'v5litepod-16'"),
    (BASE + ["--accelerator=v6-256", *WHERE],
     "error: unknown TPU accelerator type 'v6-256'; did you mean 'v6e-256'?"),
    (BASE + ["--accelerator=tpu-v9-8", *WHERE],
     "error: unknown TPU accelerator type 'tpu-v9-8' (known types: v4-N, v5litepod-N, v5p-N, v6e-N)"),
    (BASE + ["--accelerator=v4-32", "--zone=us-central2-b"],
     "error: no project: pass --project=PROJECT or set CLOUDSDK_CORE_PROJECT "
     "(`gcloud config set project PROJECT` does not reach this launcher)"),
    (BASE + ["--accelerator=v4-32", "--project=p"],
     "error: no zone: pass --zone=ZONE (e.g. us-east5-a) or set CLOUDSDK_COMPUTE_ZONE"),
    (["run", "--tpu=t1", "--config=configs/gpt.py:small", "--workdir=/tmp/run", "--accelerator=v4-32", *WHERE],
     "error: --workdir='/tmp/run' must be a gs:// path: all 4 hosts write checkpoints and metrics there, so it "
     "must be shared storage (e.g. --workdir=gs://BUCKET/run)"),
    (["run", "--tpu=t1", f"--config={REPO / 'configs' / 'gpt.py'}:small", "--workdir=gs://b/r", "--accelerator=v4-8",
      *WHERE],
     "error: --config=*/configs/gpt.py is a path on this machine; the workers run from their copy of --code-dir, so "
     "name it relative to that: --config=configs/gpt.py:small"),
    (["run", "--tpu=t1", "--config=configs/finetune_cls.py", "--workdir=gs://b/r", "--accelerator=v4-8", *WHERE],
     "error: this is a fine-tuning (classification) config (it has the `task` section): run it with `fmjax "
     "finetune`, not `fmjax train`"),
    (["run", "--tpu=t1", "--config=configs/nope.py", "--workdir=gs://b/r", "--accelerator=v4-8", *WHERE],
     "error: --config=configs/nope.py is not a file in --code-dir=., the code the workers get; put the config "
     "there and name it relative to it"),
    (["setup", "--tpu=t1", "--accelerator=v4-8", "--code-dir=/tmp", *WHERE],
     "error: --code-dir=/tmp is not an fmjax checkout (no pyproject.toml and fmjax/ there), and it is what the "
     "workers get: run the launcher from the repository or pass --code-dir=REPO"),
    (["create", "--tpu=My_TPU", "--accelerator=v4-8", *WHERE],
     "error: --tpu='My_TPU' is not a valid name: use lower-case letters, digits and dashes, starting with a "
     "letter (at most 40 characters)"),
    # The config's own checks, run against the target's 64 devices (wording owned by config_lib).
    (BASE + ["--accelerator=v5p-128", *WHERE, "--config.optim.lrr=1e-3"],
     "error: unknown config key 'optim.lrr'*"),
    (BASE + ["--accelerator=v5p-128", *WHERE, "--config.train.batch_size=100"],
     "error: train.batch_size=100 *64*"),
])
def test_bad_input_is_one_line(argv, expected, capsys):
  assert launch.cli(argv + ["--execute"]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert captured.err.count("\n") == 1 and fnmatch.fnmatchcase(captured.err, expected + "\n")


def test_usage_mistakes_are_one_line_and_help_works(capsys):
  assert launch.cli(["xpk", "--cluster=c", "--spot"]) == 2
  assert capsys.readouterr().err == ("error: fmjax launch: unrecognized arguments: --spot "
                                     "(see fmjax launch --help)\n")
  assert launch.cli(["create", "--help"]) == 0
  assert "--accelerator" in capsys.readouterr().out


def test_project_and_zone_default_from_gcloud_env(monkeypatch, capsys):
  monkeypatch.setenv("CLOUDSDK_CORE_PROJECT", "env-proj")
  monkeypatch.setenv("CLOUDSDK_COMPUTE_ZONE", "europe-west4-a")
  out = _dry_run(capsys, ["delete", "--tpu=t1", "--accelerator=v5litepod-16"])
  assert out == "gcloud compute tpus tpu-vm delete t1 --zone=europe-west4-a --project=env-proj --quiet\n"
  # An explicit flag wins over the environment.
  out = _dry_run(capsys, ["delete", "--tpu=t1", "--accelerator=v5litepod-16", "--project=flag-proj"])
  assert "--project=flag-proj" in out and "env-proj" not in out


def test_bad_input_raises_value_error_from_python_api():
  spec = launch.LaunchSpec(name="t", accelerator="v5p-129", zone="z", project="p")
  with pytest.raises(ValueError, match="unknown TPU accelerator type 'v5p-129'"):
    launch.plan_commands(spec, "create")
  with pytest.raises(launch.LaunchError, match="--git-repo and --git-ref go together"):
    launch.plan_commands(launch.LaunchSpec(name="t", accelerator="v4-8", zone="z", project="p", git_ref="main"),
                         "setup")
