"""`fmjax report`: metrics.jsonl (with a resume's repeated steps) to Markdown, CSV and PNGs."""

import csv
import json
import sys

import pytest

from fmjax import checkpoint as ckpt_lib, cli, report, sweep
from fmjax.config_lib import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, records, tail=""):
  path.mkdir(parents=True, exist_ok=True)
  with open(path / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
    f.write(tail)


def run_records(final_eval=4.0):
  recs = [{"step": s, "train/loss": 6.0 - s / 10, "train/lr": 1e-3, "train/grad_norm": 1.0} for s in (5, 10, 15, 20)]
  recs += [{"step": 10, "eval/loss": 5.5}, {"step": 20, "eval/loss": final_eval}]
  # A resume from step 10 logs 15 and 20 again; the later values must win.
  recs += [{"step": 15, "train/loss": 4.4, "train/lr": 1e-3, "train/grad_norm": 1.0},
           {"step": 20, "train/loss": 4.2, "train/lr": 1e-3, "train/grad_norm": 1.0}]
  return recs


def test_log_lines_follow_stdout_as_it_is_now(capsys):
  """fmjax's log handler writes to the current sys.stdout: a stream it was set up with and that was
  closed since (a test's capture, a notebook cell) is never written to."""
  import io
  import sys

  from fmjax import metrics
  first, before = io.StringIO(), sys.stdout
  sys.stdout = first
  try:
    metrics.setup_logging()
    metrics.log.info("into the first stream")
  finally:
    sys.stdout = before
  first.close()
  metrics.log.info("into the stream of now")
  out, err = capsys.readouterr()
  assert "into the stream of now" in out and "Logging error" not in err, err


def test_library_notes_that_say_nothing_to_a_user_are_dropped(caplog):
  import logging

  from fmjax import metrics
  metrics.setup_logging()
  with caplog.at_level("WARNING"):
    logging.getLogger("absl").warning("Using custom data configuration: BuilderConfig(name='x')")
    logging.getLogger("tensorboardX.x2num").warning("NaN or Inf found in input tensor.")
    logging.getLogger("absl").warning("a warning that stays")
  assert [r.getMessage() for r in caplog.records] == ["a warning that stays"]


def test_each_runs_logging_setup_keeps_a_level_the_caller_set():
  """Every run sets logging up again: a notebook that quietened fmjax (or asked absl for more) keeps it."""
  import logging

  from fmjax import metrics
  names = ("fmjax", "absl")
  before = {n: logging.getLogger(n).level for n in names}
  try:
    for n in names:
      logging.getLogger(n).setLevel(logging.NOTSET)
    metrics.setup_logging()
    assert [logging.getLogger(n).level for n in names] == [logging.INFO, logging.WARNING]
    logging.getLogger("fmjax").setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.INFO)
    metrics.setup_logging()
    assert [logging.getLogger(n).level for n in names] == [logging.WARNING, logging.INFO]
  finally:
    for n, level in before.items():
      logging.getLogger(n).setLevel(level)


def test_read_metrics_merges_steps_last_wins_and_skips_torn_line(tmp_path):
  write_metrics(tmp_path, run_records(), tail='{"step": 25, "train/lo')
  records = report.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [5, 10, 15, 20]
  assert records[-1] == {"step": 20, "train/loss": 4.2, "train/lr": 1e-3, "train/grad_norm": 1.0, "eval/loss": 4.0}
  assert report.series(records, "eval/loss") == ([10, 20], [5.5, 4.0])


def test_read_metrics_keeps_the_history_each_run_continues(tmp_path):
  """A resume from an older checkpoint (after a loss spike, say) replaces the steps after it: the steps
  the first run logged past that point and the new one has not reached are not its history (they were
  kept, so a curve ran on into the abandoned run and a sweep read its final loss)."""
  assert report.START_KEY == "run_started_at_step"  # the files already written hold this name
  start = lambda s: {report.START_KEY: s}
  first = [{"step": s, "train/loss": 1.0} for s in range(1, 11)] + [{"step": 10, "eval/loss": 9.0}]
  again = [{"step": s, "train/loss": 2.0} for s in (5, 6)]
  write_metrics(tmp_path, [start(0)] + first + [start(4)] + again + [start(6)])
  records = report.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert [r["train/loss"] for r in records] == [1.0] * 4 + [2.0] * 2
  assert report.series(records, "eval/loss") == ([], [])


def _tensorboard_session_starts(logdir) -> list[int]:
  """Steps of the session starts in a TensorBoard log directory's event files."""
  from tensorboardX.proto import event_pb2
  starts = []
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    while data:  # TFRecords: an 8-byte length and its 4-byte CRC, the record, its 4-byte CRC
      n = int.from_bytes(data[:8], "little")
      event = event_pb2.Event.FromString(data[12:12 + n])
      data = data[16 + n:]
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        starts.append(event.step)
  return starts


def test_a_run_opens_its_metrics_with_where_it_took_over(tmp_path):
  from fmjax import metrics
  starts = []
  for start, steps in ((0, (1, 2, 3)), (2, (3,))):  # a kill after step 3, whose last save was at 2
    writer = metrics.MetricsWriter(str(tmp_path / str(start)), total_steps=4, start_step=start, progress_bar=False)
    for step in steps:
      writer.write(step, {"loss": float(start)}, prefix="train/")
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:  # the one workdir both runs share
      f.write((tmp_path / str(start) / "metrics.jsonl").read_text())
    # TensorBoard drops what earlier runs logged from a session start's step on: each writer opens with one.
    starts += _tensorboard_session_starts(tmp_path / str(start) / "tb")
  assert starts == [1, 3]
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines[0] == {report.START_KEY: 0} and lines[4] == {report.START_KEY: 2}
  assert [(r["step"], r["train/loss"]) for r in report.read_metrics(str(tmp_path))] == [(1, 0.0), (2, 0.0), (3, 2.0)]


def test_a_resume_after_a_kill_that_cut_a_line_short_still_drops_the_steps_it_trains_again(tmp_path):
  """A kill mid-write leaves metrics.jsonl without its last newline: the resumed run's start record must
  open a line of its own, not join the cut one (both were then skipped, and the dead run's steps and
  evals past the resume point stayed in the report)."""
  from fmjax import metrics
  write_metrics(tmp_path, [{report.START_KEY: 0}, *({"step": s, "train/loss": 9.0} for s in (5, 10, 15)),
                           {"step": 15, "eval/loss": 9.0}], tail='{"step": 20, "train/lo')
  writer = metrics.MetricsWriter(str(tmp_path), total_steps=30, start_step=10, progress_bar=False)
  writer.write(20, {"loss": 1.0}, prefix="train/")
  writer.close()
  records = report.read_metrics(str(tmp_path))
  assert [(r["step"], r["train/loss"]) for r in records] == [(5, 9.0), (10, 9.0), (20, 1.0)]
  assert report.series(records, "eval/loss") == ([], [])
  # A file that ends where a line does, or none at all, gets no blank line.
  fresh = tmp_path / "fresh"
  for _ in range(2):
    metrics.MetricsWriter(str(fresh), total_steps=30, progress_bar=False).close()
  assert (fresh / "metrics.jsonl").read_text() == f'{{"{report.START_KEY}": 0}}\n' * 2


def test_report_writes_table_csv_and_plots(tmp_path):
  write_metrics(tmp_path / "run", run_records())
  paths = report.report(str(tmp_path / "run"), str(tmp_path / "out"))
  names = sorted(p.rsplit("/", 1)[1] for p in paths)
  assert names == ["loss.png", "metrics.csv", "report.md", "train.png"]
  md = (tmp_path / "out" / "report.md").read_text()
  assert "train/loss: final 4.2000 at step 20; best 4.2000 at step 20" in md
  assert "eval/loss: final 4.0000 at step 20; best 4.0000 at step 20" in md
  assert md.count("\n| ") == 1 + 4  # header + one row per step
  rows = list(csv.DictReader(open(tmp_path / "out" / "metrics.csv")))
  assert [r["step"] for r in rows] == ["5", "10", "15", "20"] and rows[1]["eval/loss"] == "5.5"
  assert float(rows[2]["train/loss"]) == 4.4
  for name in ("loss.png", "train.png"):
    data = (tmp_path / "out" / name).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_report_table_is_capped_but_keeps_last_step(tmp_path):
  write_metrics(tmp_path, [{"step": s, "train/loss": 1.0 / s} for s in range(1, 101)])
  report.report(str(tmp_path))
  rows = [l for l in (tmp_path / "report.md").read_text().splitlines() if l.startswith("| ") and l[2].isdigit()]
  assert len(rows) <= report._MAX_TABLE_ROWS and rows[0].startswith("| 1 |") and rows[-1].startswith("| 100 |")


def test_report_on_sweep_root_aggregates(tmp_path):
  runs = sweep.expand("configs/gpt.py:tiny", sweep.product({"optim.lr": [1e-3, 3e-3]}))
  sweep._write_runs_file(runs, str(tmp_path))
  write_metrics(tmp_path / runs[0].name, run_records(final_eval=4.0))
  write_metrics(tmp_path / runs[1].name, run_records(final_eval=3.5))
  # As a pod runs a printed command: the second run saved its last step (train.steps=20), the
  # first only step 10 of them.
  for run, saved in zip(runs, (10, 20)):
    (tmp_path / run.name / "config.json").write_text(json.dumps({"train": {"steps": 20}}))
    (tmp_path / run.name / "checkpoints" / str(saved)).mkdir(parents=True)
    (tmp_path / run.name / "checkpoints" / str(saved) / ckpt_lib.COMMIT_MARKER).write_text("")
  paths = report.report(str(tmp_path))
  assert any(p.endswith("sweep_eval_loss.png") for p in paths)
  md = (tmp_path / "sweep.md").read_text()
  assert "| optim.lr=0.001 | partial | 20 | 10 | 4.2000 | 4.0000 |" in md
  assert "| optim.lr=0.003 | done | 20 | 20 | 4.2000 | 3.5000 |" in md


def test_report_without_metrics_is_one_clear_error(tmp_path, capsys):
  with pytest.raises(ConfigError, match="no metrics.jsonl"):
    report.report(str(tmp_path))
  assert cli.main(["report", f"--workdir={tmp_path}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: no metrics.jsonl")
  (tmp_path / "a_file").write_text("")
  assert cli.main(["report", f"--workdir={tmp_path}", f"--out={tmp_path}/a_file"]) == 2
  assert capsys.readouterr().err.strip() == f"error: --out={tmp_path}/a_file is a file; give a directory for the report"
  with pytest.raises(ConfigError, match="--workdir=.*/a_file is not a directory"):
    report.report(str(tmp_path / "a_file"))
  (tmp_path / "metrics.jsonl").write_text('garbage\n{"a": 1}\n{"step": "x"}\n[1]\n')
  with pytest.raises(ConfigError, match=r"metrics.jsonl holds no step's record \(each line is a JSON object"):
    report.report(str(tmp_path))


def test_report_skips_records_of_the_wrong_types(tmp_path):
  # A run start that is not a whole number (a hand edit) drops nothing.
  write_metrics(tmp_path, run_records(), tail='{"step": "x", "loss": 1}\n{"step": 5, "train/loss": [1], "note": null}\n'
                '{"run_started_at_step": true}\n{"run_started_at_step": "3"}\n'
                '{"step": 10, "train/loss": "spike", "train/note": "lr halved"}')  # text: was a traceback
  records = report.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [5, 10, 15, 20]
  assert records[0]["train/loss"] == 5.5 and "note" not in records[0]
  assert records[1]["train/loss"] == 5.0 and "train/note" not in records[1]
  assert len(report.report(str(tmp_path))) >= 3


def test_report_on_sweep_root_into_out_has_the_plot(tmp_path):
  root, out = tmp_path / "root", tmp_path / "out"
  root.mkdir()
  runs = sweep.expand("configs/gpt.py:tiny", sweep.product({"optim.lr": [1e-3, 3e-3]}))
  sweep._write_runs_file(runs, str(root))
  write_metrics(root / runs[0].name, run_records(final_eval=4.0))
  paths = report.report(str(root), str(out))
  assert sorted(paths) == sorted(str(out / n) for n in ("sweep.md", "sweep.csv", "sweep_eval_loss.png"))
  assert (out / "sweep_eval_loss.png").read_bytes().startswith(PNG_MAGIC)
  assert "| optim.lr=0.001 | partial | 20 | – | 4.2000 | 4.0000 |" in (out / "sweep.md").read_text()
  assert not (root / "sweep.md").exists()


def test_report_on_finetune_sweep_root_writes_finetune_md(tmp_path):
  root, out = tmp_path / "root", tmp_path / "out"
  root.mkdir()
  entries = [{"command": "finetune", **e} for e in sweep.product({"optim.lr": [1e-3]}, {"train.seed": [0, 1]})]
  runs = sweep.expand("configs/finetune_cls.py", entries)
  sweep._write_runs_file(runs, str(root))
  for run, acc in zip(runs, (0.5, 0.7)):
    write_metrics(root / run.name, run_records())
    (root / run.name / "results.json").write_text(json.dumps(
        {"task": "pydoc_family", "main_metric": "accuracy", "eval": {"accuracy": acc, "loss": 1.0}}))
  paths = report.report(str(root), str(out))
  assert str(out / "finetune.md") in paths and str(out / "finetune.csv") in paths
  assert "| pydoc_family | accuracy | optim.lr=0.001 | 2 | 60.0 ± 14.1 |" in (out / "finetune.md").read_text()
  assert not (root / "finetune.md").exists()


def test_best_loss_skips_a_non_finite_one():
  records = [{"step": 1, "train/loss": float("nan")}, {"step": 2, "train/loss": 3.0}, {"step": 3, "train/loss": 2.5},
             {"step": 4, "eval/loss": float("nan")}]
  md = report.format_markdown(records, "run")
  assert "- train/loss: final 2.5000 at step 3; best 2.5000 at step 3" in md
  assert "- eval/loss: final nan at step 4\n" in md  # no finite value: no best


def test_a_resumed_run_goes_on_logging_to_its_wandb_run(tmp_path, monkeypatch):
  """W&B gets one run per workdir: a resume appends to the run it started (each resume opened a new
  run before, so a preempted pretraining run was spread over many), and another workdir gets its own."""
  import types

  from fmjax import metrics
  inits, logged = [], []

  class Run:
    def log(self, scalars, step):
      logged.append((inits[-1]["id"], step, scalars))

    def finish(self):
      pass

  def init(**kwargs):
    inits.append(kwargs)
    return Run()

  monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
  for start, workdir in ((0, "a"), (10, "a"), (0, "b")):
    writer = metrics.MetricsWriter(str(tmp_path / workdir), total_steps=30, start_step=start, progress_bar=False,
                                   use_wandb=True, run_name="gpt", config_dict={"x": 1})
    writer.write(start + 5, {"loss": 1.0}, prefix="train/")
    writer.close()
  first, resumed, other = inits
  assert first["resume"] == resumed["resume"] == "allow" and first["mode"] == "offline"
  assert first["id"] == resumed["id"] != other["id"]
  assert (tmp_path / "a" / metrics.WANDB_ID_FILE).read_text().strip() == first["id"]
  assert logged == [(first["id"], 5, {"train/loss": 1.0}), (first["id"], 15, {"train/loss": 1.0}),
                    (other["id"], 5, {"train/loss": 1.0})]


@pytest.mark.parametrize("tty,processes,flag,bar", [(True, 1, True, True), (False, 1, True, False),
                                                    (True, 2, True, False), (True, 1, False, False)])
def test_a_progress_bar_shows_on_an_interactive_single_host_run_only(tmp_path, monkeypatch, capsys, tty, processes,
                                                                     flag, bar):
  """DESIGN.md: a progress bar on interactive single-host runs; a pod, a pipe or train.progress_bar=false gets
  log lines (step, loss, tokens/s, ETA) instead."""
  import jax
  from fmjax import metrics
  monkeypatch.delenv("CI", raising=False)
  monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
  monkeypatch.setattr(jax, "process_count", lambda: processes)
  lines = []
  monkeypatch.setattr(metrics.log, "info", lambda fmt, *args: lines.append(fmt % args))
  writer = metrics.MetricsWriter(str(tmp_path), total_steps=10, progress_bar=flag)
  writer.progress(5, {"loss": 2.5, "tokens_per_sec": 1000.0})
  writer.close()
  err = capsys.readouterr().err
  if bar:
    assert "5/10" in err and "loss 2.5000, 1,000 tok/s" in err and not lines, (err, lines)
  else:
    assert "5/10" not in err and len(lines) == 1 and lines[0].startswith("step 5/10  loss 2.5000  1,000 tok/s  ETA"), \
        (err, lines)
