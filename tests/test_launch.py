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
import signal
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
    # Spot asks for a queued resource by default: it waits for capacity where a plain create fails.
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
def _clean_env(monkeypatch, tmp_path):
  """Goldens must not depend on the caller's gcloud defaults (environment or `gcloud config`) or directory."""
  monkeypatch.delenv("CLOUDSDK_CORE_PROJECT", raising=False)
  monkeypatch.delenv("CLOUDSDK_COMPUTE_ZONE", raising=False)
  monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud_config"))  # a real gcloud finds nothing set
  monkeypatch.chdir(REPO)


def _created(cmds):
  """The create command, which runs inside the check of the name (`exec` at its end), so that a re-run
  reuses a live TPU instead of failing on the name."""
  check = cmds[0]
  assert check[:2] == ["bash", "-c"], check
  return shlex.split(check[2].rsplit("; exec ", 1)[1])


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
  check, wait, create = cmds[0], cmds[1], _created(cmds)
  assert check[:2] == ["bash", "-c"] and "queued-resources describe p " in check[2]
  assert wait[:2] == ["bash", "-c"] and "ACTIVE) exit 0;;" in wait[2]
  assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert {"--node-count=2", "--node-prefix=p", "--spot", "--accelerator-type=v5p-128",
          "--runtime-version=v2-alpha-tpuv5"} <= set(create)
  run_scripts = [c[2] for c in cmds if c[:2] == ["bash", "-c"] and "MEGASCALE" in c[2]]
  assert len(run_scripts) == 2
  for i, script in enumerate(run_scripts):
    assert f"ssh p-{i} " in script and f"MEGASCALE_SLICE_ID={i} " in script
    assert "MEGASCALE_NUM_SLICES=2" in script and "--config.mesh.dcn_data=2" in script
    assert "JAX_COMPILATION_CACHE_DIR=gs://b/jax_compilation_cache" in script
  # A dcn_data that is not the slice count is refused here, not by the run on the pod.
  with pytest.raises(launch.LaunchError, match=r"^--config.mesh.dcn_data=4 but --num-slices=2: dcn_data spans the "
                     r"slices, one index each; set it to 2 or leave it out$"):
    launch.check_config(dataclasses.replace(spec, overrides=("mesh.dcn_data=4", "mesh.data=1", "mesh.fsdp=-1")))
  queued = _created(launch.plan_commands(dataclasses.replace(spec, num_slices=1, queued=True), "create"))
  assert "--node-id=p" in queued and not any(a.startswith("--node-count") for a in queued)
  deletes = [launch.plan_commands(dataclasses.replace(spec, num_slices=n, queued=q), "delete")
             for n, q in ((1, True), (2, None), (1, False))]
  assert deletes[0] == deletes[1] == deletes[2]  # one plan, whatever create was given
  (delete,) = deletes[0]
  assert delete[:2] == ["bash", "-c"] and delete[2].index("queued-resources describe p ") < delete[2].index(
      "tpu-vm describe p ")
  assert "exec gcloud compute tpus queued-resources delete p --zone=z --project=pr --force --quiet;" in delete[2]
  assert "exec gcloud compute tpus tpu-vm delete p --zone=z --project=pr --quiet;" in delete[2]
  single = launch.plan_commands(launch.LaunchSpec(name="s", accelerator="v4-8", zone="z", project="pr"), "create")
  assert _created(single) == ["gcloud", "compute", "tpus", "tpu-vm", "create", "s", "--zone=z", "--project=pr",
                              "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base"]
  assert "tpu-vm describe s --zone=z --project=pr \"--format=value(state)\"" in single[0][2]
  assert len(single) == 2 and "READY) exit 0;;" in single[1][2]  # a reused TPU VM may still be CREATING


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
# The n-th look at a TPU's state (this one included) gets the n-th word of $FAKE_STATE (the last
# word once they run out) until this log shows the TPU created: then a queued resource is ACTIVE
# and a TPU VM READY (a queued resource's node as well). Without FAKE_STATE nothing of the name
# exists yet (describe fails). The looks whose numbers $FAKE_FLAKY lists fail as a network error would.
case "$*" in
  *"describe"*"value(state"*)
    n=$(grep -c "describe.*value(state" "$FAKE_LOG")
    case " $FAKE_FLAKY " in *" $n "*) echo "ERROR: (gcloud) network is unreachable" >&2; exit 1 ;; esac
    case "$*" in  # a queued resource's node is a TPU VM too
      *queued-resources*) if grep -q "queued-resources.create" "$FAKE_LOG"; then echo ACTIVE; exit 0; fi ;;
      *) if grep -q "tpu-vm.create\\|queued-resources.create" "$FAKE_LOG"; then echo READY; exit 0; fi ;;
    esac
    [ -n "$FAKE_STATE" ] || exit 1
    i=1; for state in $FAKE_STATE; do [ $i -ge $n ] && break; i=$((i + 1)); done
    echo "$state"; exit 0 ;;
  *"tpu-vm describe"*) echo 10.1.2.3 ;;
  *"config get-value project"*) echo "$FAKE_PROJECT" ;;
  *"config get-value compute/zone"*) echo "$FAKE_ZONE" ;;
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
  for tool in ("gcloud", "xpk", "sleep"):  # a fake sleep: the waits' pauses are logged, not slept
    path = bin_dir / tool
    path.write_text(FAKE)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  log = tmp_path / "calls.log"
  monkeypatch.setenv("FAKE_LOG", str(log))
  monkeypatch.delenv("FAKE_FAIL", raising=False)
  for var in ("FAKE_STATE", "FAKE_FLAKY", "FAKE_PROJECT", "FAKE_ZONE"):
    monkeypatch.delenv(var, raising=False)
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
      f"compute tpus queued-resources describe {name}",      # delete finds the queued resource by its name
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


def test_ctrl_c_while_executing_says_what_may_be_left_and_how_to_remove_it(fake_tools, capsys, monkeypatch):
  from fmjax import cli

  def ctrl_c(cmd, *a, **kw):
    raise KeyboardInterrupt
  monkeypatch.setattr(launch.subprocess, "run", ctrl_c)
  assert cli.main(["launch", "create", "--tpu=t1", "--accelerator=v4-8", *WHERE, "--execute"]) == 130
  assert capsys.readouterr().err == (
      "interrupted: at command 1 of 2: TPU t1 may exist, and is billed while it does; rerun the same command to go "
      "on (it reuses the TPU that is there), or remove it with `fmjax launch delete --tpu=t1 --zone=us-east5-a "
      "--project=my-proj`\n")
  assert cli.main(["launch", "logs", "--tpu=t1", *WHERE, "--follow", "--execute"]) == 130
  assert capsys.readouterr().err == "interrupted\n"  # how a --follow ends: nothing to undo

  def sigterm(cmd, *a, **kw):  # a scheduler or a closed session stops the plan mid-command
    os.kill(os.getpid(), signal.SIGTERM)
  monkeypatch.setattr(launch.subprocess, "run", sigterm)
  before = signal.getsignal(signal.SIGTERM)
  assert cli.main(["launch", "create", "--tpu=t1", "--accelerator=v4-8", *WHERE, "--execute"]) == 143
  assert capsys.readouterr().err.startswith("stopped: at command 1 of 2: TPU t1 may exist, and is billed")
  assert signal.getsignal(signal.SIGTERM) is before  # the handler goes with the plan


def test_execute_stops_at_first_failure(fake_tools, capsys, monkeypatch):
  _, calls = fake_tools
  monkeypatch.setenv("FAKE_FAIL", "tpu-vm create")
  argv = ["all", "--tpu=t1", "--accelerator=v4-8", *WHERE, "--config=configs/gpt.py:tiny", "--workdir=/tmp/x",
          "--execute"]
  assert launch.cli(argv) == 1
  err = capsys.readouterr().err.strip().splitlines()
  # The create runs inside the check of the name (a re-run reuses a live TPU), so the line names that script.
  assert len(err) == 1 and err[0].startswith("error: command failed with exit code 3: bash -c ")
  assert "exec gcloud compute tpus tpu-vm create t1 " in err[0]
  assert [c[3:5] for c in calls()] == [["tpu-vm", "describe"], ["tpu-vm", "create"]]  # no wait, tar, scp or ssh


@pytest.mark.parametrize("queued", [False, True])
def test_a_preempted_tpu_is_deleted_and_created_again_and_a_live_one_is_reused(fake_tools, capfd, monkeypatch,
                                                                              queued):
  """Spot capacity comes back by delete and create: a preempted TPU (a suspended queued resource)
  still holds its name, so `create` after a preemption would fail without the check before it."""
  _, calls = fake_tools
  kind = "queued-resources" if queued else "tpu-vm"
  # --spot alone asks for a queued resource now; --no-queued keeps the plain spot TPU VM case tested.
  argv = ["create", "--tpu=t1", "--accelerator=v4-8", *WHERE, "--spot", "--execute",
          "--queued" if queued else "--no-queued"]
  monkeypatch.setenv("FAKE_STATE", "SUSPENDED" if queued else "PREEMPTED")
  assert launch.cli(argv) == 0, capfd.readouterr().err
  steps = [c[3:5] for c in calls()]
  assert steps == [[kind, "describe"], [kind, "delete"], [kind, "create"], [kind, "describe"]], steps
  assert ("--force" in calls()[1]) == queued
  assert "is " + ("SUSPENDED" if queued else "PREEMPTED") + ": deleting it to create it again" in capfd.readouterr().err

  # A live one (the plan was interrupted after create) is used as it is: re-running the plan resumes it.
  ready = "ACTIVE" if queued else "READY"
  log = fake_tools[0].parent / "calls_live.log"
  monkeypatch.setenv("FAKE_LOG", str(log))
  monkeypatch.setenv("FAKE_STATE", ready)
  assert launch.cli(argv) == 0
  what = "queued resource" if queued else "TPU VM"
  assert f"{what} t1 already exists and is {ready}: using it as it is\n" in capfd.readouterr().err
  assert [line.split("\t")[3:5] for line in log.read_text().splitlines()] == [[kind, "describe"]] * 2  # no create

  # One that will not become ready stops the plan in one line, and nothing is created or deleted.
  log.unlink()
  monkeypatch.setenv("FAKE_STATE", "DELETING")
  assert launch.cli(argv) == 1
  err = capfd.readouterr().err
  assert f"{what} t1 is DELETING, which create cannot use: run the same command again once that changes, " \
         "or remove it with fmjax launch delete\n" in err
  assert [line.split("\t")[3:5] for line in log.read_text().splitlines()] == [[kind, "describe"]]


def test_delete_finds_what_create_made_whatever_flags_it_is_given(fake_tools, capfd, monkeypatch):
  """A spot TPU made with --no-queued is a plain TPU VM. Deleting by the flags, `delete --spot` would ask
  for a queued resource that is not there, fail, and leave the TPU running."""
  _, calls = fake_tools
  where = ["--tpu=t1", *WHERE]
  assert launch.cli(["create", *where, "--accelerator=v4-8", "--spot", "--no-queued", "--execute"]) == 0
  made = len(calls())
  assert launch.cli(["delete", *where, "--spot", "--execute"]) == 0, capfd.readouterr().err
  assert [c[3:5] for c in calls()[made:]] == [["queued-resources", "describe"], ["tpu-vm", "describe"],
                                              ["tpu-vm", "delete"]]
  # Nothing of the name (a wrong zone, say): one line that says so, exit 1, nothing deleted.
  monkeypatch.setenv("FAKE_LOG", str(fake_tools[0].parent / "calls_none.log"))
  capfd.readouterr()
  assert launch.cli(["delete", *where, "--execute"]) == 1
  err = capfd.readouterr().err.splitlines()
  zone, project = (w.split("=")[1] for w in WHERE)
  assert err[0] == (f"found no queued resource or TPU VM named t1 in {zone} of project {project}, so nothing was "
                    f"deleted; if it is there, gcloud compute tpus tpu-vm describe t1 --zone={zone} "
                    f"--project={project} says why it could not be read")
  assert err[1].startswith("error: command failed with exit code 1: bash -c ")


@pytest.mark.parametrize("states,queued", [
    ("WAITING_FOR_RESOURCES WAITING_FOR_RESOURCES PROVISIONING ACTIVE", True),
    ("CREATING CREATING READY", False)])
def test_rerunning_all_resumes_a_tpu_that_is_still_on_its_way(fake_tools, capfd, monkeypatch, states, queued):
  """`all` stopped during a long spot wait (Ctrl-C, a closed laptop) left the request queued: running the
  same command again waits for that request instead of stopping at its name or making a second one."""
  code, calls = fake_tools
  monkeypatch.setenv("FAKE_STATE", states)
  argv = ["all", "--tpu=t1", "--accelerator=v4-8", *WHERE, "--config=configs/gpt.py:tiny", "--workdir=gs://b/r",
          f"--code-dir={code}", "--spot", "--execute", "--queued" if queued else "--no-queued"]
  try:
    assert launch.cli(argv) == 0, capfd.readouterr().err
  finally:
    pathlib.Path("/tmp/fmjax-t1.tar.gz").unlink(missing_ok=True)
  kind, what = ("queued-resources", "queued resource") if queued else ("tpu-vm", "TPU VM")
  first = states.split()[0]
  assert f"{what} t1 already exists ({first}): not creating it again, waiting until it is" in capfd.readouterr().err
  d = f"{kind} describe"
  steps = [c[0] if c[0] == "sleep" else " ".join(c[3:5]) for c in calls()]
  # The check of the name, then the wait (a pause after each look but the last), then setup and run.
  assert steps == [d, d, "sleep"] + ([d, "sleep"] if queued else []) + [d, "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]
  assert {tuple(c) for c in calls() if c[0] == "sleep"} == {("sleep", str(launch.POLL_S))}


def test_waiting_outlasts_a_few_failed_looks_at_the_state(fake_tools, capfd, monkeypatch):
  """An hours-long spot wait sees network blips and laptop sleeps: a failed describe is tried again after
  a pause, and only DESCRIBE_TRIES failures in a row end the wait, with one line on how to go on."""
  _, calls = fake_tools
  argv = ["create", "--tpu=t1", "--accelerator=v5p-128", *WHERE, "--spot", "--queued", "--execute"]
  monkeypatch.setenv("FAKE_FLAKY", "2 3")  # the wait's first two looks (look 1 is the check of the name)
  assert launch.cli(argv) == 0, capfd.readouterr().err
  assert [c[0] if c[0] == "sleep" else " ".join(c[3:5]) for c in calls()] == [
      "queued-resources describe", "queued-resources create", "queued-resources describe", "sleep",
      "queued-resources describe", "sleep", "queued-resources describe"]
  assert [c for c in calls() if c[0] == "sleep"] == [["sleep", str(launch.RETRY_S)]] * 2
  assert "queued resource t1: describe failed (2 of 5), trying again in 30s" in capfd.readouterr().err

  log = fake_tools[0].parent / "calls_down.log"
  monkeypatch.setenv("FAKE_LOG", str(log))
  monkeypatch.setenv("FAKE_FLAKY", " ".join(str(n) for n in range(2, 2 + launch.DESCRIBE_TRIES)))
  assert launch.cli(argv) == 1
  err = capfd.readouterr().err
  assert f"could not read the state of queued resource t1 {launch.DESCRIBE_TRIES} times in a row: run the same " \
         "command again to go on waiting\n" in err
  tries = [line for line in err.splitlines() if line.startswith("queued resource t1: describe failed (")]
  assert len(tries) == launch.DESCRIBE_TRIES - 1  # no pause after the last


def test_spot_asks_for_a_queued_resource_unless_told_not_to(capsys):
  """A plain spot `tpu-vm create` fails at once when capacity is short (Cloud TPU docs, Manage TPU
  resources); a queued resource waits for it, so it is what --spot gets unless --no-queued."""
  argv = ["create", "--tpu=t1", "--accelerator=v5p-128", *WHERE, "--spot"]
  out = _dry_run(capsys, argv)
  assert "exec gcloud compute tpus queued-resources create t1 " in out and "--node-id=t1 --spot" in out
  out = _dry_run(capsys, [*argv, "--no-queued"])
  assert "exec gcloud compute tpus tpu-vm create t1 " in out and "queued-resources" not in out
  # On-demand and reserved capacity keep the plain create unless --queued.
  assert "tpu-vm create t1 " in _dry_run(capsys, argv[:-1])
  assert "queued-resources create t1 " in _dry_run(capsys, [*argv[:-1], "--reserved", "--queued"])
  assert launch.cli([*argv, "--no-queued", "--num-slices=2"]) == 2
  assert capsys.readouterr().err == ("error: --no-queued cannot make --num-slices=2: Cloud TPU creates multislice "
                                     "only through a queued resource; drop --no-queued\n")
  assert launch.cli(["create", "--help"]) == 0
  assert "(default: yes with --spot" in " ".join(capsys.readouterr().out.split())


def test_execute_without_tool_on_path_creates_nothing(tmp_path, monkeypatch, capsys):
  bash = shutil.which("bash")
  monkeypatch.setenv("PATH", str(tmp_path))
  argv = ["xpk", "--cluster=c", "--workload=w", "--accelerator=v6e-256", *WHERE, "--config=configs/gpt.py:small",
          "--workdir=gs://b/w", "--execute"]
  assert launch.cli(argv) == 2
  assert capsys.readouterr().err == "error: xpk not found on PATH; pip install xpk\n"
  # `delete` and `create` are bash scripts that call gcloud: without it they say so, not "nothing found".
  os.symlink(bash, tmp_path / "bash")
  assert launch.cli(["delete", "--tpu=t1", *WHERE, "--execute"]) == 2
  assert capsys.readouterr().err == "error: gcloud not found on PATH; install the Google Cloud CLI\n"


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
  for name in ("worker_setup.sh", "worker_run.sh"):
    assert subprocess.run(["bash", "-n", str(REPO / "launch" / name)]).returncode == 0, name


def test_worker_run_starts_when_the_old_run_exits_before_it_is_killed(tmp_path):
  """The previous run can exit between the script's `kill -0` and its `kill`; under `set -e` the failed
  kill must not abort the new start. A `kill` function (BASH_ENV) reports a gone process alive once."""
  gone = subprocess.Popen(["true"])
  gone.wait()
  (tmp_path / "fmjax_logs").mkdir()
  (tmp_path / "fmjax_logs" / "train.pid").write_text(f"{gone.pid}\n")
  (tmp_path / "kill.sh").write_text(
      'kill() { if [ "$1" = -0 ] && [ ! -e "$HOME/seen" ]; then : > "$HOME/seen"; return 0; fi; builtin kill "$@"; }\n')
  env = dict(os.environ, HOME=str(tmp_path), BASH_ENV=str(tmp_path / "kill.sh"))
  result = subprocess.run(["bash", str(REPO / "launch" / "worker_run.sh"), "true"], env=env, capture_output=True,
                          text=True, timeout=30)
  assert result.returncode == 0, result.stderr
  assert f"stopping the previous run (pid {gone.pid})" in result.stdout and "started pid" in result.stdout
  assert int((tmp_path / "fmjax_logs" / "train.pid").read_text()) != gone.pid


# A Python for worker_setup.sh as Debian ships it: `-m venv` leaves a bin/python without pip (and fails)
# until the interpreter's pythonX.Y-venv package is installed; the fake apt-get installs it.
FAKE_PY = """#!/bin/sh
case "$1" in
  -c) exit 0 ;;
  --version) echo "Python 3.13.0" ;;
  -m)
    if [ "$2" = venv ]; then
      mkdir -p "$3/bin" && cp "$0" "$3/bin/python"
      [ -e "$FAKE_ROOT/python3.13-venv" ] && { : > "$3/bin/pip"; exit 0; }
      echo "ensurepip is not available: apt install python3.13-venv" >&2; exit 1
    fi
    [ "$2" = pip ] && [ -e "$(dirname "$0")/pip" ] && exit 0
    echo "No module named pip" >&2; exit 1 ;;
esac
"""
FAKE_APT = """#!/bin/sh
echo "apt-get $*" >> "$FAKE_ROOT/apt.log"
for a in "$@"; do case "$a" in *-venv) : > "$FAKE_ROOT/$a" ;; esac; done
"""


def test_worker_setup_makes_a_venv_without_pip_again(tmp_path):
  """A venv made while pythonX.Y-venv was missing has bin/python but no pip; setup must make it again
  (installing the picked interpreter's venv package) rather than fail on "No module named pip" forever."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in (("python3.13", FAKE_PY), ("apt-get", FAKE_APT), ("sudo", '#!/bin/sh\nexec env "$@"\n')):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  work = tmp_path / "fmjax"
  (work / ".venv" / "bin").mkdir(parents=True)
  shutil.copy(bin_dir / "python3.13", work / ".venv" / "bin" / "python")  # left by a failed `-m venv`: no pip
  env = dict(os.environ, FAKE_ROOT=str(tmp_path), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

  def setup():
    return subprocess.run(["bash", str(REPO / "launch" / "worker_setup.sh")], cwd=work, env=env,
                          capture_output=True, text=True, timeout=60)
  result = setup()
  assert result.returncode == 0, result.stdout + result.stderr
  assert ".venv has no working pip" in result.stdout and "Python 3.13.0 in" in result.stdout
  assert (work / ".venv" / "bin" / "pip").exists()
  assert "install -y -qq python3.13-venv" in (tmp_path / "apt.log").read_text()
  # Once it works it is kept: no message, no apt-get.
  (tmp_path / "apt.log").unlink()
  result = setup()
  assert result.returncode == 0 and "no working pip" not in result.stdout, result.stderr
  assert not (tmp_path / "apt.log").exists()


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
     "error: no project: pass --project=PROJECT or set CLOUDSDK_CORE_PROJECT"),
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
     "finetune`, not `fmjax train`; to launch it, pass --command=finetune"),
    (["run", "--tpu=t1", "--config=configs/gpt.py:small", "--workdir=gs://b/r", "--accelerator=v4-8", "--command=sft",
      *WHERE],
     "error: `fmjax sft` needs an SFT config (with a `sft` section, e.g. configs/sft.py); this one is a pretraining "
     "config: run it with `fmjax train`; to launch it, pass --command=train"),
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
def test_bad_input_is_one_line(argv, expected, capsys, tmp_path, monkeypatch):
  monkeypatch.setenv("PATH", str(tmp_path))  # a machine without gcloud: no `gcloud config` to fall back on
  assert launch.cli(argv + ["--execute"]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert captured.err.count("\n") == 1 and fnmatch.fnmatchcase(captured.err, expected + "\n")


def test_command_launches_finetune_and_sft_runs(capsys):
  """A sweep's printed `fmjax finetune` runs (the GLUE sweep) and SFT go to a pod with --command: the workers run
  that subcommand with the same --config, --workdir and overrides."""
  glue = ["--config=experiments/bert_base/glue.py:task=glue/rte", "--workdir=gs://b/glue/rte",
          "--config.init_from=gs://b/phase2", "--config.optim.lr=2e-05", "--command=finetune", *WHERE]
  out = _dry_run(capsys, ["run", "--tpu=glue", "--accelerator=v5p-16", *glue])
  (line,) = out.splitlines()
  remote = shlex.split(shlex.split(line)[-1].removeprefix("--command="))
  assert remote[remote.index("launch/worker_run.sh") + 1:] == [
      ".venv/bin/fmjax", "finetune", "--config=experiments/bert_base/glue.py:task=glue/rte",
      "--workdir=gs://b/glue/rte", "--config.init_from=gs://b/phase2", "--config.optim.lr=2e-05"]
  (xpk,) = _dry_run(capsys, ["xpk", "--cluster=c", "--workload=glue", "--accelerator=v5p-16", *glue]).splitlines()
  assert shlex.split(xpk)[-1].endswith(" && fmjax finetune --config=experiments/bert_base/glue.py:task=glue/rte "
                                       "--workdir=gs://b/glue/rte --config.init_from=gs://b/phase2 "
                                       "--config.optim.lr=2e-05")
  spec = launch.LaunchSpec(name="s", accelerator="v4-8", zone="z", project="p", config="configs/sft.py",
                           workdir="gs://b/sft", command="sft")
  launch.check_config(spec)
  assert launch.train_argv(spec)[:2] == ["fmjax", "sft"]
  dpo = dataclasses.replace(spec, config="configs/dpo.py", workdir="gs://b/dpo", command="dpo")
  launch.check_config(dpo)
  assert launch.train_argv(dpo)[:2] == ["fmjax", "dpo"]
  with pytest.raises(launch.LaunchError, match=r"^--command='sfft' is not one of train, finetune, sft, dpo; did you "
                                               r"mean 'sft'\?$"):
    launch.plan_commands(dataclasses.replace(spec, command="sfft"), "run")


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
  assert "exec gcloud compute tpus tpu-vm delete t1 --zone=europe-west4-a --project=env-proj --quiet;" in out
  # An explicit flag wins over the environment.
  out = _dry_run(capsys, ["delete", "--tpu=t1", "--accelerator=v5litepod-16", "--project=flag-proj"])
  assert "--project=flag-proj" in out and "env-proj" not in out


def test_project_and_zone_default_from_gcloud_config(fake_tools, monkeypatch, capsys):
  """Most users set them once with `gcloud config set project/compute/zone`; the launcher reads those back
  when neither a flag nor gcloud's environment variable gives them."""
  _, calls = fake_tools
  monkeypatch.setenv("FAKE_PROJECT", "cfg-proj")
  monkeypatch.setenv("FAKE_ZONE", "us-central2-b")
  out = _dry_run(capsys, ["delete", "--tpu=t1"])
  assert "exec gcloud compute tpus tpu-vm delete t1 --zone=us-central2-b --project=cfg-proj --quiet;" in out
  assert calls() == [["gcloud", "config", "get-value", "project"], ["gcloud", "config", "get-value", "compute/zone"]]
  # Flags and the environment win, without asking gcloud.
  monkeypatch.setenv("CLOUDSDK_CORE_PROJECT", "env-proj")
  out = _dry_run(capsys, ["delete", "--tpu=t1", "--accelerator=v4-8", "--zone=europe-west4-a"])
  assert "exec gcloud compute tpus tpu-vm delete t1 --zone=europe-west4-a --project=env-proj --quiet;" in out
  assert len(calls()) == 2
  # Set nowhere: the error names `gcloud config set` too, since gcloud is there to read it.
  monkeypatch.setenv("FAKE_ZONE", "")
  assert launch.cli(["delete", "--tpu=t1", "--accelerator=v4-8"]) == 2
  assert capsys.readouterr().err == ("error: no zone: pass --zone=ZONE (e.g. us-east5-a) or set CLOUDSDK_COMPUTE_ZONE "
                                     "(or run `gcloud config set compute/zone ZONE`)\n")


def test_bad_input_raises_value_error_from_python_api():
  spec = launch.LaunchSpec(name="t", accelerator="v5p-129", zone="z", project="p")
  with pytest.raises(ValueError, match="unknown TPU accelerator type 'v5p-129'"):
    launch.plan_commands(spec, "create")
  with pytest.raises(launch.LaunchError, match="--git-repo and --git-ref go together"):
    launch.plan_commands(launch.LaunchSpec(name="t", accelerator="v4-8", zone="z", project="p", git_ref="main"),
                         "setup")


SLURM_TASK = dict(SLURM_JOB_ID="1234", SLURM_STEP_NODELIST="gpu[01-02]", SLURM_NTASKS="16", SLURM_STEP_NUM_TASKS="16",
                  SLURM_PROCID="9", SLURM_LOCALID="1")


def test_a_slurm_step_joins_through_slurms_variables_and_warns_without_fmjax_distributed(monkeypatch, capsys):
  """A Slurm task with FMJAX_DISTRIBUTED=1 leaves the coordinator, ids and its GPU to JAX's Slurm
  detection; without it, a step of several tasks warns that each trains alone (a batch script's one
  process, which srun's step variables do not describe, is not warned)."""
  import jax
  from fmjax import cli
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "FMJAX_DISTRIBUTED"):
    monkeypatch.delenv(key, raising=False)
  for key, value in SLURM_TASK.items():
    monkeypatch.setenv(key, value)
  cli.maybe_initialize_distributed()
  assert "task 9 of a Slurm step of 16, and each task trains on its own; set FMJAX_DISTRIBUTED=1" in \
      capsys.readouterr().err
  monkeypatch.setenv("FMJAX_DISTRIBUTED", "1")
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  cli.maybe_initialize_distributed()
  assert calls == [{}]  # JAX reads the coordinator (gpu01), 16 processes, id 9 and GPU 1 from Slurm
  monkeypatch.delenv("FMJAX_DISTRIBUTED")
  monkeypatch.delenv("SLURM_STEP_NUM_TASKS")  # a batch script's own process
  cli.maybe_initialize_distributed()
  assert capsys.readouterr().err == ""
