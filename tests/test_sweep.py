"""`fmjax sweep`: expansion and naming, bad keys, seed aggregation, preempted runs, and a real
2-run local sweep."""

import csv
import io
import json
import math
import os
import re
import shlex
import signal
import statistics
import sys
import threading
import time

import pytest

from fmjax import checkpoint as ckpt_lib, cli, config_lib, data, sweep
from fmjax.config_lib import ConfigError

from conftest import xla_flags

GPT = "configs/gpt.py:tiny"


def test_product_and_zip():
  runs = sweep.product({"optim.lr": [1e-3, 3e-3]}, {"train.seed": [0, 1, 2]})
  assert len(runs) == 6
  assert runs[0] == {"optim.lr": 1e-3, "train.seed": 0} and runs[5] == {"optim.lr": 3e-3, "train.seed": 2}
  # Keys within one axis move together.
  sized = sweep.product({"model.d_model": [64, 128], "model.num_heads": [2, 4]}, {"train.steps": [10, 20]})
  assert [(e["model.d_model"], e["model.num_heads"], e["train.steps"]) for e in sized] == [
      (64, 2, 10), (64, 2, 20), (128, 4, 10), (128, 4, 20)]
  assert sweep.zip({"optim.lr": [1, 2]}, {"train.seed": [5, 6]}) == [
      {"optim.lr": 1, "train.seed": 5}, {"optim.lr": 2, "train.seed": 6}]
  with pytest.raises(ConfigError, match="one length"):
    sweep.zip({"optim.lr": [1, 2]}, {"train.seed": [5]})


def test_a_key_in_two_axes_of_a_product_or_a_misspelt_command_is_refused():
  with pytest.raises(ConfigError, match="train.steps is in more than one axis"):
    sweep.product({"train.steps": [16, 32]}, {"train.steps": [64]})
  with pytest.raises(ConfigError, match="sweep entry key 'comand' is not a config key; did you mean 'command'"):
    sweep.expand(GPT, [{"comand": "finetune", "optim.lr": 1e-3}])
  with pytest.raises(ConfigError, match="are the same run with their keys in another order"):
    sweep.expand(GPT, [{"optim.lr": 1e-3, "train.seed": 1}, {"train.seed": 1, "optim.lr": 1e-3}])


def test_run_names_show_overrides_and_are_filesystem_safe():
  assert sweep.run_name({"optim.lr": 0.001, "train.seed": 1}) == "optim.lr=0.001,train.seed=1"
  assert sweep.run_name({}) == "base"
  odd = sweep.run_name({"data.files": "/data/my corpus/*.txt", "model.remat": "full"})
  assert "/" not in odd and " " not in odd and "*" not in odd and odd.endswith("model.remat=full")
  a = sweep.run_name({"data.files": "x" * 300 + "a"})
  b = sweep.run_name({"data.files": "x" * 300 + "b"})
  assert a != b and len(a) <= 180


def test_expand_overrides_round_trip_into_the_config():
  entries = [{"optim.lr": 1e-4, "model.scan_layers": True, "config": "small", "command": "finetune"},
             {"optim.lr": 3e-3}]
  runs = sweep.expand("configs/gpt.py:tiny,runlocal", entries, base_overrides=["train.steps=7"])
  assert runs[0].spec == "configs/gpt.py:small" and runs[0].command == "finetune"
  assert runs[1].spec == "configs/gpt.py:tiny,runlocal" and runs[1].command == "train"
  assert runs[0].overrides == ("train.steps=7", "optim.lr=0.0001", "model.scan_layers=true")
  config = config_lib.load_config(runs[0].spec, runs[0].overrides)
  assert config.optim.lr == 1e-4 and config.model.scan_layers is True and config.train.steps == 7
  assert config.model.d_model == 768  # the `config` key picked get_config("small")
  argv = runs[1].argv("/r")
  assert argv == ["fmjax", "train", "--config=configs/gpt.py:tiny,runlocal", "--workdir=/r/optim.lr=0.003",
                  "--config.train.steps=7", "--config.optim.lr=0.003"]


def test_a_sweep_over_the_config_arg_keeps_the_command_line_args():
  # key=value args join (a LoRA sweep stays LoRA); an entry's flags replace the command line's.
  runs = sweep.expand("configs/finetune_cls.py:model=gpt,peft=lora",
                      [{"config": "task=pydoc_family", "optim.lr": 1e-3}, {"config": "task=jsonl"}])
  assert [r.spec for r in runs] == ["configs/finetune_cls.py:model=gpt,peft=lora,task=pydoc_family",
                                    "configs/finetune_cls.py:model=gpt,peft=lora,task=jsonl"]
  config = config_lib.load_config(runs[0].spec)
  assert config.model.family == "gpt" and config.finetune.peft == "lora" and config.task.name == "pydoc_family"
  with pytest.raises(ConfigError, match="the sweep sets task=jsonl per run but --config gives task=sst2; drop it"):
    sweep.expand("configs/finetune_cls.py:task=sst2", [{"config": "task=jsonl"}])
  # The shipped fine-tuning sweep runs on the task --config names.
  entries = config_lib.load_module("configs/finetune_cls.py").get_sweep()
  runs = sweep.expand("configs/finetune_cls.py:task=jsonl,peft=bitfit", entries)
  assert len(runs) == 6 and {r.spec for r in runs} == {"configs/finetune_cls.py:task=jsonl,peft=bitfit"}


def test_bad_sweep_key_fails_before_anything_runs(tmp_path):
  root = tmp_path / "sweep"
  with pytest.raises(ConfigError, match=r"optim.lrr.*did you mean 'lr'") as e:
    sweep.run_sweep(GPT, [{"optim.lr": 1e-3}, {"optim.lrr": 1e-3}], str(root))
  assert "\n" not in str(e.value)
  assert not root.exists()
  with pytest.raises(ConfigError, match="share the run name"):
    sweep.expand(GPT, [{"optim.lr": 1e-3}, {"optim.lr": 0.001}])
  with pytest.raises(ConfigError, match="trian.*did you mean 'train'"):
    sweep.run_sweep(GPT, [{"optim.lr": 1e-3}], str(root), base_overrides=["trian.steps=3"])


def test_print_commands_runs_nothing_and_keeps_the_list_of_runs(tmp_path):
  out = io.StringIO()
  sweep.run_sweep(GPT, sweep.product({"optim.lr": [1e-3, 1e-2]}), str(tmp_path / "s"), print_commands=True, out=out)
  lines = out.getvalue().splitlines()
  assert lines == [f"fmjax train --config={GPT} --workdir={tmp_path}/s/optim.lr=0.001 --config.optim.lr=0.001",
                   f"fmjax train --config={GPT} --workdir={tmp_path}/s/optim.lr=0.01 --config.optim.lr=0.01"]
  # It runs nothing, but keeps the list of runs, from which `fmjax report` builds their table.
  assert os.listdir(tmp_path / "s") == [sweep.RUNS_FILE]
  assert [r["name"] for r in sweep.read_runs_file(str(tmp_path / "s"))] == ["optim.lr=0.001", "optim.lr=0.01"]


def test_launch_prints_one_fmjax_launch_line_per_run_each_on_a_target_of_its_own(tmp_path):
  from fmjax import launch
  root = "gs://bucket/lr"
  entries = [{"optim.lr": 1e-3}, {"optim.lr": 1e-2, "command": "finetune"}]
  for given, flag in (("all --tpu=lr --accelerator=v5p-8 --spot", "--tpu"),
                      ("xpk --cluster c --workload lr --accelerator=v5p-8", "--workload")):
    out = io.StringIO()
    runs = sweep.expand(GPT, entries, ["train.steps=7"])
    for i, run in enumerate(runs):
      print(shlex.join(sweep.launch_argv(given, i, run, root)), file=out)
    lines = [shlex.split(line) for line in out.getvalue().splitlines()]
    assert all(argv[:3] == ["fmjax", "launch", given.split()[0]] for argv in lines)
    for i, (argv, run) in enumerate(zip(lines, runs)):
      spec, mode, execute = launch.spec_from_args(argv[2:])  # the line `fmjax launch` will parse
      assert (spec.name, spec.command, spec.config, spec.accelerator, execute) == (
          f"lr-{i}", run.command, run.spec, "v5p-8", False)
      assert spec.workdir == f"{root}/{run.name}" and spec.overrides == tuple(run.overrides)
      assert argv.count(f"{flag}=lr-{i}") == 1 and "lr" not in argv
  assert lines[1][lines[1].index("--command=finetune") + 1].startswith("--config=")

  run = sweep.expand(GPT, entries[:1])[0]
  for given, error in (("--tpu=lr", "must start with a launch mode"), ("run --accelerator=v5p-8", "--tpu=NAME is"),
                       ("run --tpu=Lr", "not a valid name"), ("run --tpu=lr --zone", "expected one argument"),
                       ("run --tpu", "expected one argument"),
                       ("run --tpu=lr --workdir=gs://b/x", "which the sweep sets per run"),
                       ("run --tpu=lr --config.optim.lr=1", "which the sweep sets per run")):
    with pytest.raises(ConfigError, match=re.escape(error)):
      sweep.launch_argv(given, 0, run, root)
  # Through the command line, printing runs nothing and keeps the list of runs, as --print_commands does.
  out_root = tmp_path / "s"
  assert sweep.cli(["--config=" + GPT, f"--workdir={out_root}", "--launch=run --tpu=lr"]) == 0
  assert os.listdir(out_root) == [sweep.RUNS_FILE]


def test_printed_or_launched_runs_are_not_held_to_an_init_from_step_here(tmp_path):
  """--print_commands and --launch start nothing on this machine: the init_from step the runs will read where they
  run is not looked for here (--launch once did, as for runs started here, and refused a sweep to launch)."""
  os.makedirs(tmp_path / "pre" / "checkpoints" / "5")
  (tmp_path / "pre" / "checkpoints" / "5" / ckpt_lib.COMMIT_MARKER).write_text("")
  for how in ({"print_commands": True}, {"launch": "run --tpu=lr"}):
    out = io.StringIO()
    sweep.run_sweep("configs/finetune_cls.py", sweep.load_sweep("configs/finetune_cls.py"), str(tmp_path / "ft"),
                    base_overrides=[f"init_from={tmp_path / 'pre'}", "init_from_step=10000"], out=out, **how)
    assert "--config.init_from_step=10000" in out.getvalue(), how


def test_mean_std():
  assert sweep.mean_std([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, statistics.stdev([1.0, 2.0, 4.0])))
  mean, std = sweep.mean_std([3.0])
  assert mean == 3.0 and math.isnan(std)
  mean, std = sweep.mean_std([2.0, math.nan, 4.0])  # a run with no eval yet does not poison the group
  assert mean == 3.0 and std == pytest.approx(math.sqrt(2.0))


def _fake_run(root, run, train_loss, eval_loss, done=True):
  workdir = os.path.join(root, run.name)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 10, "train/loss": train_loss + 1}) + "\n")
    f.write(json.dumps({"step": 20, "train/loss": train_loss}) + "\n")
    f.write(json.dumps({"step": 20, "eval/loss": eval_loss}) + "\n")
  if done:
    sweep._mark_done(run, root, 1.0)


def test_aggregate_groups_over_seeds(tmp_path):
  root = str(tmp_path)
  runs = sweep.expand(GPT, sweep.product({"optim.lr": [1e-3, 1e-2]}, {"train.seed": [0, 1, 2]}))
  evals = {0.001: [3.0, 3.2, 3.4], 0.01: [4.0, 5.0, 9.0]}
  for run in runs:
    entry = dict(run.entry)
    _fake_run(root, run, 2.0 + entry["train.seed"], evals[entry["optim.lr"]][entry["train.seed"]])
  table = sweep.aggregate(root, runs)
  assert [g["group"] for g in table.groups] == ["optim.lr=0.001", "optim.lr=0.01"]
  g = table.groups[1]
  assert g["n"] == 3 and g["eval_loss_mean"] == pytest.approx(6.0)
  assert g["eval_loss_std"] == pytest.approx(statistics.stdev([4.0, 5.0, 9.0]))
  assert g["train_loss_mean"] == pytest.approx(3.0) and g["train_loss_std"] == pytest.approx(1.0)
  assert all(r["status"] == "done" and r["step"] == 20 for r in table.rows)
  md = sweep.format_markdown(table)
  assert "| optim.lr=0.01 | 3 | 3.0000 ± 1.0000 | 6.0000 ± 2.6458 |" in md
  paths = sweep.write_outputs(table, root)
  rows = list(csv.DictReader(open(os.path.join(root, "sweep.csv"))))
  assert len(rows) == 6 and rows[4]["optim.lr"] == "0.01" and rows[4]["train.seed"] == "1"
  assert float(rows[4]["eval_loss"]) == 5.0
  assert os.path.join(root, "sweep_groups.csv") in paths
  assert open(os.path.join(root, "sweep_eval_loss.png"), "rb").read(4) == b"\x89PNG"
  # Without repeated seeds there is no group table.
  assert sweep.aggregate(root, runs[:1] + runs[3:4]).groups == []


def test_finished_means_same_command(tmp_path):
  root = str(tmp_path)
  run = sweep.expand(GPT, [{"optim.lr": 1e-3}])[0]
  assert not sweep.is_finished(run, root)
  _fake_run(root, run, 2.0, 3.0)
  assert sweep.is_finished(run, root)
  longer = sweep.expand(GPT, [{"optim.lr": 1e-3}], base_overrides=["train.steps=5000"])[0]
  assert longer.name == run.name and not sweep.is_finished(longer, root)


def test_finished_means_same_command_and_config(tmp_path, monkeypatch):
  """A finished run is skipped while its config is the same; an edited config file reruns it."""
  root = str(tmp_path / "root")
  run = sweep.expand(GPT, [{"optim.lr": 1e-3}])[0]
  config = sweep.check([run])[run.name]
  os.makedirs(os.path.join(root, run.name))
  sweep._mark_done(run, root, 1.0, config)
  assert sweep.is_finished(run, root, config)
  monkeypatch.chdir(tmp_path)
  assert sweep.is_finished(run, "root", config)  # the same root, spelled another way
  assert sweep.is_finished(run, root, {**config, "data.some_new_key": 1})  # a key a newer fmjax added
  assert not sweep.is_finished(run, root, {**config, "train.steps": config["train.steps"] * 2})


def test_an_edited_config_file_reruns_its_finished_runs(tmp_path, monkeypatch):
  spec = tmp_path / "mine.py"
  source = open(os.path.join(os.path.dirname(__file__), "..", "configs", "gpt.py")).read()
  spec.write_text(source)
  _fake_runs(monkeypatch, "import sys; sys.exit(0)")
  root = str(tmp_path / "sweep")
  entries = sweep.product({"optim.lr": [1e-3, 1e-2]})
  assert len(sweep.run_sweep(f"{spec}:tiny", entries, root, out=io.StringIO())["skipped"]) == 0
  assert len(sweep.run_sweep(f"{spec}:tiny", entries, root, out=io.StringIO())["skipped"]) == 2
  spec.write_text(source.replace("def get_config(arg", "def _get_config(arg") + """

def get_config(arg=None):
  c = _get_config(arg)
  c.train.steps += 1
  return c
""")
  out = io.StringIO()
  result = sweep.run_sweep(f"{spec}:tiny", entries, root, out=out)
  assert not result["skipped"] and "finished with another config (train.steps: " in out.getvalue()


def test_the_sweep_refuses_what_would_be_ignored_or_clash(tmp_path, monkeypatch):
  with pytest.raises(ConfigError, match=r"the sweep sets optim.lr per run, so --config.optim.lr=0.5 would be "
                                        r"overridden"):
    sweep.run_sweep(GPT, sweep.product({"optim.lr": [1e-3]}), str(tmp_path), base_overrides=["optim.lr=0.5"])
  with pytest.raises(ConfigError, match=r"init_from='/no/such/run' does not exist \(read from "):
    sweep.run_sweep("configs/finetune_cls.py", sweep.load_sweep("configs/finetune_cls.py"), str(tmp_path),
                    base_overrides=["init_from=/no/such/run"])
  # An init_from step that is not there would fail every run that reads it, one after another.
  os.makedirs(tmp_path / "pre" / "checkpoints" / "5")
  (tmp_path / "pre" / "checkpoints" / "5" / ckpt_lib.COMMIT_MARKER).write_text("")
  with pytest.raises(ConfigError, match=r"init_from=\S+/pre has no checkpoint at init_from_step=10000; it holds "
                                        r"steps \[5\] \(0 takes the newest\)"):
    sweep.run_sweep("configs/finetune_cls.py", sweep.load_sweep("configs/finetune_cls.py"), str(tmp_path / "ft"),
                    base_overrides=[f"init_from={tmp_path / 'pre'}", "init_from_step=10000"])
  (tmp_path / "a_file").write_text("")
  with pytest.raises(ConfigError, match="is a file; give a directory"):
    sweep.run_sweep(GPT, sweep.product({"optim.lr": [1e-3]}), str(tmp_path / "a_file"))
  # A second sweep into a root that one is running in stops at once and names the first.
  root = tmp_path / "busy"
  root.mkdir()
  first = sweep._lock(str(root))
  with pytest.raises(ConfigError, match=rf"another fmjax sweep \(pid {os.getpid()}\) is running in {root}"):
    sweep.run_sweep(GPT, sweep.product({"optim.lr": [1e-3]}), str(root))
  first.close()
  _fake_runs(monkeypatch, "import sys; sys.exit(0)")
  assert not sweep.run_sweep(GPT, sweep.product({"optim.lr": [1e-3]}), str(root), out=io.StringIO())["failed"]


def test_runs_with_checkpoints_of_their_own_need_no_init_from(tmp_path, monkeypatch):
  """A fine-tuning sweep rerun after its pretraining workdir moved: the runs that saved resume (or are
  done) without init_from, so only a run that still has to read it is refused, before anything starts."""
  _fake_runs(monkeypatch, "import sys; sys.exit(0)")
  root = tmp_path / "ft"
  entries = [{"command": "finetune", **e} for e in sweep.product({"optim.lr": [1e-3, 3e-3]})]
  overrides = [f"init_from={tmp_path / 'moved_away'}"]
  for lr in ("0.001", "0.003"):
    os.makedirs(root / f"command=finetune,optim.lr={lr}" / "checkpoints" / "300")
    (root / f"command=finetune,optim.lr={lr}" / "checkpoints" / "300" / ckpt_lib.COMMIT_MARKER).write_text("")
  result = sweep.run_sweep("configs/finetune_cls.py", entries, str(root), base_overrides=overrides,
                           out=io.StringIO())
  assert not result["failed"] and [r["status"] for r in result["table"].rows] == ["done", "done"]
  with pytest.raises(ConfigError, match=r"sweep run command=finetune,optim.lr=0.01: init_from='\S+/moved_away' "
                                        r"does not exist"):
    sweep.run_sweep("configs/finetune_cls.py", entries + [{"command": "finetune", "optim.lr": 1e-2}], str(root),
                    base_overrides=overrides, out=io.StringIO())


def test_a_damaged_done_marker_reruns_its_run(tmp_path, monkeypatch):
  _fake_runs(monkeypatch, "import sys; sys.exit(0)")
  root = str(tmp_path / "sweep")
  entries = sweep.product({"optim.lr": [1e-3, 1e-2, 1e-1]})
  runs = sweep.run_sweep(GPT, entries, root, out=io.StringIO())["runs"]
  # Cut short, not a JSON object, a config that is not one (a copy cut short, a hand edit): run again.
  for run, text in zip(runs, ('{"argv": [', "[1]", '{"command": "train", "config": [1]}')):
    with open(os.path.join(root, run.name, sweep.DONE_MARKER), "w") as f:
      f.write(text)
  out = io.StringIO()
  result = sweep.run_sweep(GPT, entries, root, out=out)
  assert not result["skipped"] and not result["failed"]
  assert out.getvalue().count(f"has a damaged {sweep.DONE_MARKER} marker: running it again") == 3
  assert len(sweep.run_sweep(GPT, entries, root, out=io.StringIO())["skipped"]) == 3


def test_a_broken_get_sweep_is_one_line_naming_the_file(tmp_path):
  # Not a function, no list, or a bug inside it.
  for i, (body, said) in enumerate((("get_sweep = [{'optim.lr': 1e-3}]", "has no get_sweep() function"),
                                    ("def get_sweep():\n  return None", "get_sweep() returned NoneType, not a list"),
                                    ("def get_sweep():\n  return {'optim.lr': [1e-3]}", "returned dict, not a list"),
                                    ("def get_sweep():\n  return 'optim.lr=1e-3'", "returned str, not a list"),
                                    ("def get_sweep():\n  return [{'optim.lr': x} for x in lrs]",
                                     ":2: NameError while calling get_sweep(): name 'lrs' is not defined"))):
    spec = tmp_path / f"mine{i}.py"
    spec.write_text(body + "\n")
    with pytest.raises(ConfigError, match=re.escape(said)) as e:
      sweep.load_sweep(str(spec))
    assert "\n" not in str(e.value)


def test_an_empty_workdir_is_refused(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # where the runs would have gone
  for print_commands, root in ((False, ""), (True, ""), (False, " ")):
    with pytest.raises(ConfigError, match=rf"--workdir='{root}' must name the sweep's directory"):
      sweep.run_sweep(GPT, sweep.product({"optim.lr": [1e-3]}), root, print_commands=print_commands, out=io.StringIO())
  assert os.listdir(tmp_path) == []


def test_usage_mistakes_are_one_line(capsys):
  assert cli.main(["sweep", f"--config={GPT}", "--workdir=/tmp/never", "--parallel=two"]) == 2
  assert capsys.readouterr().err == ("error: fmjax sweep: argument --parallel: invalid int value: 'two' "
                                     "(see fmjax sweep --help)\n")
  assert cli.main(["sweep", f"--config={GPT}", "--workdir=/tmp/never", "config.optim.lr=3"]) == 2
  assert capsys.readouterr().err.count("\n") == 1


def test_ctrl_c_says_which_runs_saved(tmp_path, monkeypatch):
  # lr=0.001 saves on SIGTERM (exit 143), as `train` does in its step loop; lr=0.01 is still starting.
  _fake_runs(monkeypatch, "import os, signal, sys, time\n" + SAVE_ON_SIGTERM.replace("install", "'--config.optim.lr=0.001' in sys.argv") +
             "open(sys.argv[3][len('--workdir='):] + '/up', 'w'); time.sleep(60)")
  root = str(tmp_path)

  def ctrl_c_when_running():
    while not all(os.path.exists(os.path.join(root, n, "up")) for n in ("optim.lr=0.001", "optim.lr=0.01")):
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGINT)

  threading.Thread(target=ctrl_c_when_running, daemon=True).start()
  with pytest.raises(KeyboardInterrupt, match=r"^optim.lr=0.001 saved and stopped; optim.lr=0.01 stopped while "
                                              r"starting \(nothing saved\); rerun the same sweep command"):
    sweep.run_sweep(GPT, sweep.product({"optim.lr": [1e-3, 1e-2]}), root, parallel=2, out=io.StringIO())


# A fake run's step loop: on SIGTERM it saves a checkpoint and exits 143, as `train` does (when `install` holds).
SAVE_ON_SIGTERM = (
    "def save(*a):\n"
    "  d = sys.argv[3][len('--workdir='):] + '/checkpoints/1'\n"
    "  os.makedirs(d, exist_ok=True)\n"
    f"  open(d + '/{ckpt_lib.COMMIT_MARKER}', 'w')\n"
    "  sys.exit(143)\n"
    "if install: signal.signal(signal.SIGTERM, save)\n")


def _fake_runs(monkeypatch, script: str) -> None:
  """Each run becomes `python -c script <its arguments>`."""
  monkeypatch.setattr(sweep, "_program", lambda: (sys.executable, "-c", script))


def test_a_run_that_cannot_start_stops_the_sweep_and_its_running_runs_save(tmp_path, monkeypatch):
  _fake_runs(monkeypatch, "import os, signal, sys, time\n" + SAVE_ON_SIGTERM.replace("install", "True") +
             "open(sys.argv[3][len('--workdir='):] + '/up', 'w'); time.sleep(60)")
  root = str(tmp_path)
  clear = sweep._clear_markers

  def disk_full_for_the_second(run, root_):
    if run.name == "optim.lr=0.01":
      while not os.path.exists(os.path.join(root, "optim.lr=0.001", "up")):
        time.sleep(0.05)
      raise OSError(28, "No space left on device", os.path.join(root, run.name, "log.txt"))
    clear(run, root_)

  monkeypatch.setattr(sweep, "_clear_markers", disk_full_for_the_second)
  with pytest.raises(OSError, match="No space left"):
    sweep.run_sweep(GPT, sweep.product({"optim.lr": [1e-3, 1e-2]}), root, parallel=2, out=io.StringIO())
  # The run already going saved and stopped with the sweep, rather than run on with no sweep to watch it.
  assert os.path.exists(os.path.join(root, "optim.lr=0.001", "checkpoints", "1"))
  assert json.load(open(os.path.join(root, "optim.lr=0.001", sweep.STATUS_MARKER)))["status"] == "preempted"
  # A file where a run's workdir goes: said before anything starts.
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "optim.lr=0.01").write_text("notes")
  with pytest.raises(ConfigError, match=r"other/optim.lr=0.01 is a file, where run optim.lr=0.01 keeps its workdir"):
    sweep.run_sweep(GPT, sweep.product({"optim.lr": [1e-3, 1e-2]}), str(tmp_path / "other"), out=io.StringIO())
  assert os.listdir(tmp_path / "other") == ["optim.lr=0.01"]


def test_preempted_run_is_not_marked_done_and_a_rerun_starts_it(tmp_path, monkeypatch):
  # A run that saved and stopped on SIGTERM exits 143, on Ctrl-C 130; one that finished exits 0.
  # The preempted one logged step 5 and saved step 7 (and left an unfinished save of step 9) on its way out.
  _fake_runs(monkeypatch, "import json, os, sys\n"
             "if '--config.optim.lr=0.1' in sys.argv: sys.exit(130)\n"
             "if '--config.optim.lr=0.001' not in sys.argv: sys.exit(0)\n"
             "w = sys.argv[3][len('--workdir='):]\n"
             "open(w + '/metrics.jsonl', 'w').write(json.dumps({'step': 5, 'train/loss': 2.5}) + '\\n')\n"
             "[os.makedirs(f'{w}/checkpoints/{s}', exist_ok=True) for s in (3, 7, 9)]\n"
             f"[open(f'{{w}}/checkpoints/{{s}}/{ckpt_lib.COMMIT_MARKER}', 'w') for s in (3, 7)]\n"
             "sys.exit(143)")
  root = str(tmp_path)
  entries = sweep.product({"optim.lr": [1e-3, 1e-2, 1e-1]})
  out = io.StringIO()
  result = sweep.run_sweep(GPT, entries, root, parallel=2, out=out)
  assert [r.name for r in result["preempted"]] == ["optim.lr=0.001", "optim.lr=0.1"] and not result["failed"]
  assert "PREEMPTED optim.lr=0.001" in out.getvalue() and "rerun" in out.getvalue()
  assert [r["status"] for r in result["table"].rows] == ["preempted", "done", "preempted"]
  md = open(os.path.join(root, "sweep.md")).read()
  assert "| optim.lr=0.001 | preempted | 5 | 7 | 2.5000 |" in md and "| optim.lr=0.01 | done | 0 | – |" in md
  result = sweep.run_sweep(GPT, entries, root, parallel=2, out=io.StringIO())
  assert [r.name for r in result["skipped"]] == ["optim.lr=0.01"]
  assert [r.name for r in result["preempted"]] == ["optim.lr=0.001", "optim.lr=0.1"]  # started again, not skipped


def test_a_failed_rerun_of_a_finished_run_is_not_done(tmp_path, monkeypatch):
  # A finished run rerun with another command (e.g. more steps) restarts; when that fails, the old
  # SWEEP_DONE must not make the table say done.
  root = str(tmp_path)
  entries = sweep.product({"optim.lr": [1e-3]})
  _fake_run(root, sweep.expand(GPT, entries)[0], 2.0, 3.0)
  _fake_runs(monkeypatch, "import sys; print('step 3 ...'); print(\"error: data.files='x' matches no file\", "
             "file=sys.stderr); print('a log line after it'); sys.exit(2)")
  result = sweep.run_sweep(GPT, entries, root, base_overrides=["train.steps=8"], out=io.StringIO())
  assert [r.name for r in result["failed"]] == ["optim.lr=0.001"] and not result["skipped"]
  assert [r["status"] for r in result["table"].rows] == ["failed"]
  assert not os.path.exists(os.path.join(root, "optim.lr=0.001", sweep.DONE_MARKER))
  md = open(os.path.join(root, "sweep.md")).read()
  assert "| optim.lr=0.001 | failed | 20 |" in md
  # Why it failed stays in the tables once the sweep's own output is gone.
  assert "- optim.lr=0.001: `error: data.files='x' matches no file`" in md
  assert ",failed,20,,2.0,3.0,error: data.files='x' matches no file" in open(os.path.join(root, "sweep.csv")).read()


def test_sigterm_to_the_sweep_reaches_its_runs(tmp_path, monkeypatch):
  # Runs that save on SIGTERM, as `train` does; the second one is still queued when it comes.
  _fake_runs(monkeypatch, "import os, signal, sys, time\n" + SAVE_ON_SIGTERM.replace("install", "True") +
             "open(sys.argv[3][len('--workdir='):] + '/up', 'w'); time.sleep(60)")
  root = str(tmp_path)
  entries = sweep.product({"optim.lr": [1e-3, 1e-2]})

  def preempt_when_running():
    while not os.path.exists(os.path.join(root, "optim.lr=0.001", "up")):
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=preempt_when_running, daemon=True).start()
  t0 = time.time()
  out = io.StringIO()
  result = sweep.run_sweep(GPT, entries, root, parallel=1, out=out)
  assert time.time() - t0 < 30  # the running run stopped; the queued one never started
  assert [r.name for r in result["preempted"]] == ["optim.lr=0.001"]
  assert [r.name for r in result["not_started"]] == ["optim.lr=0.01"]
  assert not os.path.exists(os.path.join(root, "optim.lr=0.01"))
  assert signal.getsignal(signal.SIGTERM) is not None and not result["failed"]
  assert [r["status"] for r in result["table"].rows] == ["preempted", "not started"]
  assert ("PREEMPTED optim.lr=0.001: saved, not finished; NOT STARTED optim.lr=0.01; rerun the same sweep "
          "command to resume") in out.getvalue()


@pytest.mark.parametrize("on_sigterm", ["", "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); "])
def test_sigterm_while_a_run_is_starting_is_not_a_failure(tmp_path, monkeypatch, capsys, on_sigterm):
  # A run that SIGTERM stops before its step loop saves nothing: killed by it (exit -15), or, as
  # `fmjax train` does, stopped in one line with exit 143. Either way nothing was saved.
  _fake_runs(monkeypatch, "import signal, sys, time; " + on_sigterm +
             "open(sys.argv[3][len('--workdir='):] + '/up', 'w'); time.sleep(60)")
  root = str(tmp_path)
  monkeypatch.setattr(sweep, "load_sweep", lambda spec: sweep.product({"optim.lr": [1e-3, 1e-2]}))

  def preempt_when_running():
    while not os.path.exists(os.path.join(root, "optim.lr=0.001", "up")):
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=preempt_when_running, daemon=True).start()
  assert sweep.cli([f"--config={GPT}", f"--workdir={root}"]) == cli.PREEMPTED_EXIT_CODE
  printed = capsys.readouterr().out
  assert "failed" not in printed and "FAILED" not in printed
  assert "STOPPED optim.lr=0.001 while starting: nothing saved; NOT STARTED optim.lr=0.01; rerun" in printed
  assert "| optim.lr=0.001 | preempted | 0 |" in open(os.path.join(root, "sweep.md")).read()


@pytest.mark.parametrize("command", ["train", "finetune", "sft"])
def test_a_preempted_run_exits_143(command, monkeypatch):
  module = {"train": "fmjax.train", "finetune": "fmjax.finetune", "sft": "fmjax.sft"}[command]
  for preempted, code in ((True, cli.PREEMPTED_EXIT_CODE), (False, 0)):
    monkeypatch.setattr(f"{module}.run", lambda config, workdir, p=preempted: {"preempted": p})
    assert cli.main([command, f"--config={GPT}", "--workdir=/tmp/unused"]) == code


# --------------------------------------------------------------------------- a real local sweep

TINY = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.d_ff=64", "model.vocab_size=384",
        "model.max_len=32", "data.seq_len=32", "data.tokenizer.vocab_size=320", "train.batch_size=4",
        "train.steps=4", "train.log_every=2", "train.eval_every=2", "train.eval_batches=1",
        "train.progress_bar=false", "checkpoint.async_save=false", "optim.warmup_steps=1"]


@pytest.fixture(scope="session")
def sweep_cache_dir(tmp_path_factory):
  """A data cache prepared once, so concurrent runs never race to build it."""
  cache = tmp_path_factory.mktemp("sweep_cache")
  data.prepare(config_lib.load_config(GPT, TINY + [f"data.cache_dir={cache}"]))
  return str(cache)


def test_local_sweep_runs_and_skips_finished(tmp_path, sweep_cache_dir, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", xla_flags())  # runs get one CPU device, not the tests' 8 fake ones
  root = str(tmp_path / "lr")
  base = TINY + [f"data.cache_dir={sweep_cache_dir}"]
  entries = sweep.product({"optim.lr": [1e-3, 1e-2]})
  out = io.StringIO()
  result = sweep.run_sweep(GPT, entries, root, parallel=2, base_overrides=base, out=out)
  assert not result["failed"], out.getvalue()
  rows = result["table"].rows
  assert [r["status"] for r in rows] == ["done", "done"] and all(r["step"] == r["saved"] == 4 for r in rows)
  assert all(math.isfinite(r["eval_loss"]) and math.isfinite(r["train_loss"]) for r in rows)
  for name in ("sweep.md", "sweep.csv", "sweep_eval_loss.png", "sweep.json"):
    assert os.path.exists(os.path.join(root, name)), name
  # Rerun: finished runs are skipped without starting anything.
  logs = {r.name: open(os.path.join(root, r.name, "log.txt")).read() for r in result["runs"]}
  result = sweep.run_sweep(GPT, entries, root, parallel=2, base_overrides=base, out=io.StringIO())
  assert len(result["skipped"]) == 2 and not result["failed"]
  assert logs == {r.name: open(os.path.join(root, r.name, "log.txt")).read() for r in result["runs"]}
  # The config edited into another model: refused once, before any run starts (each would fail).
  table = open(os.path.join(root, "sweep.md")).read()
  wider = [o for o in base if not o.startswith("model.d_ff=")] + ["model.d_ff=256"]
  with pytest.raises(ConfigError, match=r"2 run\(s\) in .* saved checkpoints of another setup than the sweep now "
                                        r"gives them: optim.lr=0.001 \(model.d_ff: \d+ -> 256\)"):
    sweep.run_sweep(GPT, entries, root, parallel=2, base_overrides=wider, out=io.StringIO())
  assert open(os.path.join(root, "sweep.md")).read() == table
  assert logs == {r.name: open(os.path.join(root, r.name, "log.txt")).read() for r in result["runs"]}


# --------------------------------------------------------------------------- experiments/bert_base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bert_base_readme_glue_command_is_tasks_x_lrs_x_seeds(capsys):
  readme = open(os.path.join(REPO, "experiments", "bert_base", "README.md")).read()
  command = next(b for b in readme.split("```bash\n")[1].split("```")[0].split("\nfmjax ") if "sweep" in b)
  args = command.replace("\\\n", " ").split()
  assert args[0] == "sweep"
  assert sweep.cli(args[1:] + ["--print_commands"]) == 0
  lines = capsys.readouterr().out.splitlines()
  tasks = ["mnli", "qqp", "qnli", "sst2", "cola", "stsb", "mrpc", "rte"]  # MNLI's runs score both dev sets
  expected = {(f"glue/{t}", lr, seed) for t in tasks for lr in (2e-5, 3e-5, 5e-5) for seed in (0, 1, 2)}
  got = set()
  for line in lines:
    argv = line.split()
    assert argv[:2] == ["fmjax", "finetune"] and "--config.init_from=gs://BUCKET/bert_base/phase2" in argv
    config = config_lib.load_config(argv[2][len("--config="):], [a[len("--config."):] for a in argv[4:]])
    assert config.model.d_model == 768 and config.train.batch_size == 32
    got.add((config.task.name, config.optim.lr, config.train.seed))
  assert len(lines) == 72 and got == expected
  mnli = config_lib.load_config(os.path.join(REPO, "experiments/bert_base/glue.py:task=glue/mnli"))
  assert mnli.train.steps == 36816 and mnli.optim.warmup_steps == 3681  # 3 epochs of 392,702 at 32, 10%


def test_bert_base_phases_follow_one_1m_step_schedule():
  from fmjax import optim
  path = os.path.join(REPO, "experiments", "bert_base", "config.py")
  p1, p2 = (config_lib.load_config(f"{path}:phase={p}") for p in (1, 2))
  assert (p1.train.steps, p2.train.steps) == (900_000, 100_000)
  s1, s2 = optim.make_schedule(p1.optim, p1.train.steps), optim.make_schedule(p2.optim, p2.train.steps)
  paper = lambda s: 1e-4 * min(s / 10_000, (1_000_000 - s) / 990_000)  # warmup 10k, linear to 0 at 1M
  for s in (0, 5_000, 10_000, 500_000, 899_999, 900_000):
    assert float(s1(s)) == pytest.approx(paper(s), rel=1e-5, abs=1e-12), s
  for s in (0, 1, 50_000, 99_999, 100_000):
    assert float(s2(s)) == pytest.approx(paper(900_000 + s), rel=1e-5, abs=1e-12), s


def test_a_failures_reason_survives_a_log_cut_short_and_unlistable_checkpoints(tmp_path):
  log = tmp_path / "log.txt"
  log.write_text("step 1\nerror: data.files='x' matches no file\n")
  assert sweep._reason(str(log), offset=10_000) == "error: data.files='x' matches no file"  # rotated since it began
  assert sweep._reason(str(log), offset=7) == "error: data.files='x' matches no file"
  (tmp_path / "checkpoints").write_text("")  # not a directory: listing it fails
  assert sweep._newest_save(str(tmp_path)) is None
