"""Resume, preemption, NaN policy and elastic restore on the real train loop (issue #4).

Runs `python -m fmjax.cli train` in subprocesses and kills them (SIGTERM, SIGKILL), then
compares them with one straight run per module: per-step losses and the final params and
optimizer state must be bitwise equal (same mesh), or equal within float tolerance across
meshes, device counts and process counts. The model is a 2-layer GPT with dropout on, so the
dropout RNG path is part of every comparison.
"""

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache

from fmjax import checkpoint as ckpt_lib, cli, config_lib, optim, report, sharding, train
from fmjax.config_lib import ConfigError
from fmjax.data import loader as loader_lib

from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT = os.path.join(REPO, "configs", "gpt.py") + ":tiny"
BERT = os.path.join(REPO, "configs", "bert.py") + ":tiny"
LLAMA = GPT + ",llama"
N = 24  # steps of the reference run; checkpoints every 4 (all kept)
# A constant schedule after warmup, so a run planned for more steps takes the same first N.
BASE = ["model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.d_ff=128", "model.dropout=0.1",
        "model.vocab_size=512", "data.tokenizer.vocab_size=512", "data.seq_len=32", "train.batch_size=8",
        f"train.steps={N}", "train.log_every=1", "train.eval_every=1000", "train.eval_batches=0",
        "train.progress_bar=false", "optim.schedule=constant", "optim.warmup_steps=2",
        "checkpoint.every_steps=4", "checkpoint.keep=0"]
TIMEOUT = 150
COMPILE_CACHE = ""  # set by the compilation_cache fixture


def overrides(cache_dir, *extra) -> list[str]:
  return BASE + [f"data.cache_dir={cache_dir}", *extra]


def load(cache_dir, *extra, spec=GPT):
  return config_lib.load_config(spec, overrides(cache_dir, *extra))


def cli_args(workdir, cache_dir, *extra, spec=GPT) -> list[str]:
  return ["train", f"--config={spec}", f"--workdir={workdir}"] + [f"--config.{o}" for o in overrides(cache_dir, *extra)]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent JAX compilation cache shared by this module's runs, in-process and in subprocesses.

  A hit loads the very executable a miss compiles, so results are unchanged; it saves about two
  thirds of each run's CPU time. The previous settings come back afterwards.
  """
  global COMPILE_CACHE
  COMPILE_CACHE = str(tmp_path_factory.mktemp("jax_compilation_cache"))
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  before = {k: getattr(jax.config, k) for k in keys}
  jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax_compilation_cache.reset_cache()
  yield
  for k, v in before.items():
    jax.config.update(k, v)
  jax_compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """Tokenizer and packed corpus, prepared once for every run in this module."""
  from fmjax import data
  path = tmp_path_factory.mktemp("fmjax_cache")
  data.prepare(load(path))
  return str(path)


@pytest.fixture(scope="module")
def reference(cache_dir, tmp_path_factory):
  """The straight N-step run on 8 devices (mesh data=8); it keeps a checkpoint every 4 steps."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  train.run(load(cache_dir), workdir)
  return workdir


# ----------------------------------------------------------------------------- helpers


def step_losses(workdir) -> dict[int, float]:
  """`{step: train loss}` from metrics.jsonl; a step logged twice (redone after a kill) must agree bitwise."""
  seen = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "train/loss" in row:
        seen.setdefault(row["step"], []).append(row["train/loss"])
  for step, values in seen.items():
    assert len(set(values)) == 1, f"step {step} was redone with a different loss: {values}"
  return {step: values[0] for step, values in seen.items()}


def metrics_rows(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def saved_state(workdir, step) -> dict:
  """Params and optimizer state of checkpoint `step` as numpy, read onto one device."""
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=0)
  try:
    abstract = {name: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), ck.item_metadata(step, name),
                                   is_leaf=lambda x: hasattr(x, "shape"))
                for name in ckpt_lib.ITEMS}
    return jax.tree.map(np.asarray, ck.restore(step, abstract))
  finally:
    ck.close()


def committed_steps(workdir) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.exists(os.path.join(directory, n, ckpt_lib.COMMIT_MARKER)))


def assert_states_equal(a, b, *, exact=True):
  flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  assert len(flat_a) > 10  # params and Adam moments, not an empty tree
  for (path, x), (_, y) in zip(flat_a, flat_b):
    name = jax.tree_util.keystr(path)
    assert x.shape == y.shape and x.dtype == y.dtype, name
    if exact:
      assert x.tobytes() == y.tobytes(), f"{name} differs (max |diff| {np.max(np.abs(x - y))})"
    else:
      # Other reduction orders differ in the last bits, and Adam amplifies that for near-zero
      # gradients; relative to each array's scale the states still agree closely.
      np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-3 * float(np.max(np.abs(y), initial=0)), err_msg=name)


def copy_checkpoint(src_workdir, step, dst_workdir):
  """A new workdir holding only checkpoint `step` of `src_workdir` (and its metrics up to it)."""
  os.makedirs(os.path.join(dst_workdir, "checkpoints"))
  shutil.copytree(os.path.join(src_workdir, "checkpoints", str(step)),
                  os.path.join(dst_workdir, "checkpoints", str(step)))


def subprocess_env(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "FMJAX_"))}
  # Same backend flags as conftest.py: bitwise comparisons need identically compiled programs.
  env.update(XLA_FLAGS=xla_flags(devices),
             JAX_PLATFORMS="cpu",
             PYTHONUNBUFFERED="1", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
             # Runs of the same shapes share compiled programs across processes (results are unchanged).
             JAX_COMPILATION_CACHE_DIR=COMPILE_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **extra)
  return env


class Trainer:
  """`python -m fmjax.cli train ...` in a subprocess, its output collected by a thread."""

  def __init__(self, args, env):
    self.proc = subprocess.Popen([sys.executable, "-m", "fmjax.cli", *args], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.lines: list[str] = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line)

  @property
  def output(self) -> str:
    return "".join(self.lines)

  def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
    deadline = time.time() + timeout
    while time.time() < deadline:
      for line in list(self.lines):
        if m := re.search(pattern, line):
          return m
      if self.proc.poll() is not None and not self._reader.is_alive():
        break
      time.sleep(0.02)
    raise AssertionError(f"no line matching {pattern!r}; output:\n{self.output[-4000:]}")

  def finish(self, timeout: float = TIMEOUT) -> int:
    try:
      self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      raise AssertionError(f"trainer did not finish in {timeout}s:\n{self.output[-4000:]}") from None
    finally:
      self._reader.join(timeout=10)
    return self.proc.returncode

  def kill(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()


def preempt(trainers, at_step: int, signal_to=None):
  """SIGTERMs (some of) `trainers` once process 0 logged `at_step`.

  SIGSTOP first freezes the run where it is, so the signal lands well before the last step
  whatever the machine's load; the stop step is then at most a few steps later.
  """
  trainers[0].wait_for(rf"step {at_step}/\d+ ")
  for t in trainers:
    t.proc.send_signal(signal.SIGSTOP)
  for t in signal_to if signal_to is not None else trainers:
    t.proc.send_signal(signal.SIGTERM)
  for t in trainers:
    t.proc.send_signal(signal.SIGCONT)


class LogLines(logging.Handler):
  """Collects the fmjax logger's lines (it does not propagate to pytest's caplog)."""

  def __init__(self):
    super().__init__()
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@contextlib.contextmanager
def capture_log():
  handler = LogLines()
  logger = logging.getLogger("fmjax")
  logger.addHandler(handler)
  try:
    yield handler.lines
  finally:
    logger.removeHandler(handler)


# ----------------------------------------------------------------------------- exact resume


def test_killed_and_resumed_runs_are_bitwise_exact(reference, cache_dir, tmp_path):
  """SIGTERM -> resume -> SIGKILL after a save -> resume equals the straight run, bit for bit.

  The first two runs are planned longer (train.steps=40): a harmless change, reported on resume.
  """
  ref_losses = step_losses(reference)
  assert sorted(ref_losses) == list(range(1, N + 1))
  assert committed_steps(reference) == list(range(4, N + 1, 4))  # the final save landed before run() returned
  workdir, ckpts = str(tmp_path), os.path.join(tmp_path, "checkpoints")

  # 1. SIGTERM: the run saves at the next step boundary and exits 143, not 0: it is unfinished,
  # so a scheduler or `fmjax sweep` must not count it as done.
  first = Trainer(cli_args(workdir, cache_dir, "train.steps=40", "checkpoint.every_steps=100"), subprocess_env(8))
  try:
    preempt([first], at_step=3)
    assert first.finish() == cli.PREEMPTED_EXIT_CODE, first.output[-4000:]
  finally:
    first.kill()
  stopped = int(re.search(r"Preempted: saving step (\d+)", first.output).group(1))
  assert 3 <= stopped < 8, first.output[-3000:]
  assert committed_steps(workdir) == [stopped]  # the async save landed before the process exited
  assert step_losses(workdir) == {s: ref_losses[s] for s in range(1, stopped + 1)}

  # 2. Resume, then SIGKILL right after the next save committed.
  second = Trainer(cli_args(workdir, cache_dir, "train.steps=40"), subprocess_env(8))
  try:
    deadline = time.time() + TIMEOUT
    while not os.path.exists(os.path.join(ckpts, "8", ckpt_lib.COMMIT_MARKER)):
      assert time.time() < deadline and second.proc.poll() is None, second.output[-4000:]
      time.sleep(0.01)
    second.proc.send_signal(signal.SIGKILL)
    assert second.finish() == -signal.SIGKILL
  finally:
    second.kill()
  resumed = [line for line in second.lines if "Resumed from step" in line]
  assert len(resumed) == 1 and f"Resumed from step {stopped} of " in resumed[0], second.output[-3000:]
  assert max(step_losses(workdir)) < 40, "the run finished before it was killed; the test proves nothing"
  latest = max(committed_steps(workdir))
  assert 8 <= latest < N, f"killed at step {latest}, too late for the test to resume to {N}"

  # Torn checkpoints, as a kill during a save leaves them: a step directory newer than any
  # committed one but without its commit marker, and an Orbax temporary directory.
  torn = [os.path.join(ckpts, str(latest + 3)), os.path.join(ckpts, f"{latest + 1}.orbax-checkpoint-tmp-1234")]
  for path in torn:
    os.makedirs(os.path.join(path, "params"))
    with open(os.path.join(path, "params", "junk"), "w") as f:
      f.write("half written")

  # 3. Resume to N (in this process, through the same CLI entry point).
  with capture_log() as lines:
    assert cli.main(cli_args(workdir, cache_dir)) == 0
  resumed = [line for line in lines if line.startswith("Resumed")]
  assert len(resumed) == 1 and f"Resumed from step {latest} of " in resumed[0], lines
  assert f"train.steps: 40 -> {N}" in resumed[0], resumed[0]
  assert not any(os.path.exists(p) for p in torn)  # ignored and cleaned up
  # Steps between the last save and the kill ran twice; step_losses checks they agree bitwise.
  assert step_losses(workdir) == ref_losses
  assert_states_equal(saved_state(workdir, N), saved_state(reference, N))


# qwen: Llama's with Qwen2's q/k/v biases, Qwen3's q/k norms and heads 24 wide (d_model / num_heads is 16).
QWEN = ("model.num_kv_heads=2", "model.qkv_bias=true", "model.qk_norm=true", "model.head_dim=24")


@pytest.mark.parametrize("spec,extra", [(BERT, ()), (LLAMA, ("model.num_kv_heads=2",)), (LLAMA, QWEN)],
                         ids=["bert", "llama", "qwen"])
def test_a_run_stopped_at_a_save_resumes_bitwise(cache_dir, tmp_path, spec, extra):
  """The bar holds for MLM too, whose masks (like dropout) are drawn per step, and for Llama's architecture
  (rotary positions, grouped-query attention, an untied head) and Qwen's additions to it: 4 steps, then a resume
  to 8, equal 8 straight steps in every loss and array."""
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.run(load(cache_dir, "train.steps=8", *extra, spec=spec), straight)
  train.run(load(cache_dir, "train.steps=4", *extra, spec=spec), resumed)
  assert committed_steps(resumed) == [4]
  train.run(load(cache_dir, "train.steps=8", *extra, spec=spec), resumed)
  assert step_losses(resumed) == step_losses(straight) and sorted(step_losses(straight)) == list(range(1, 9))
  assert_states_equal(saved_state(resumed, 8), saved_state(straight, 8))


# ----------------------------------------------------------------------------- config guard


def _one_error_line(capsys, code):
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
  return errors[0], err


def _untouched(workdir):
  """What a refused resume must leave exactly as it was."""
  with open(os.path.join(workdir, "config.json")) as f:
    return f.read(), committed_steps(workdir), os.path.getsize(os.path.join(workdir, "metrics.jsonl"))


@pytest.mark.parametrize("spec,extra,expect", [
    (GPT, ["model.d_model=128"], "model.d_model: 64 -> 128"),
    (BERT, ["data.max_predictions=6"], "model.family: 'gpt' -> 'bert'"),
])
def test_resume_with_other_model_refuses(reference, cache_dir, capsys, spec, extra, expect):
  before = _untouched(reference)
  line, _ = _one_error_line(capsys, cli.main(cli_args(reference, cache_dir, *extra, spec=spec)))
  assert expect in line and "different model/data setup" in line and "--workdir" in line, line
  assert _untouched(reference) == before


def test_a_resume_that_fails_on_a_harmless_change_keeps_config_json(reference, cache_dir, capsys, tmp_path):
  """A resume with other settings that cannot start (data.cache_dir names a file) leaves config.json as
  it was: `eval` and `generate` read it, and failed with that setting too until a resume went through."""
  workdir = str(tmp_path / "w")
  shutil.copytree(reference, workdir)
  (tmp_path / "a_file").write_text("")
  before = _untouched(workdir)
  line, _ = _one_error_line(capsys, cli.main(cli_args(workdir, cache_dir, f"train.steps={N + 2}",
                                                      f"data.cache_dir={tmp_path / 'a_file'}")))
  assert line.startswith(f"error: data.cache_dir='{tmp_path / 'a_file'}' cannot be made"), line
  assert _untouched(workdir) == before


@pytest.mark.parametrize("spec,extra,expect", [
    (GPT, ["model.d_model=128"], "params/h/blocks/0/attn/qkv/kernel: saved (64, 3, 4, 16), model expects (128, 3, 4, 32)"),
    (BERT, ["data.max_predictions=6"], "not in checkpoint, model expects"),
])
def test_wrong_checkpoint_without_config_guard_lists_arrays(reference, cache_dir, capsys, monkeypatch,
                                                             spec, extra, expect):
  # E.g. a checkpoint whose saved config lies: the arrays themselves are checked before any is read.
  monkeypatch.setattr(ckpt_lib, "config_changes", lambda saved, new: ([], []))
  before = _untouched(reference)
  line, err = _one_error_line(capsys, cli.main(cli_args(reference, cache_dir, *extra, spec=spec)))
  assert "does not fit this model" in line and "mismatched array(s)" in line, line
  assert expect in err, err
  assert _untouched(reference) == before


def test_a_damaged_newest_step_is_one_line_for_eval_and_resume(reference, cache_dir, tmp_path):
  """A run's newest step with its array files gone: `eval` and a resume each print one line that
  names the step and the intact ones (no traceback, also not at exit), and delete nothing."""
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  newest = max(committed_steps(workdir))
  data = [p for p in (workdir / "checkpoints" / str(newest) / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert data
  for p in data:
    p.unlink()
  config_json = (workdir / "config.json").read_text()
  for argv in (["eval", f"--workdir={workdir}"], cli_args(workdir, cache_dir, f"train.steps={N + 2}")):
    out = subprocess.run([sys.executable, "-m", "fmjax.cli", *argv], env=subprocess_env(1), capture_output=True,
                         text=True, timeout=TIMEOUT)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode == 2 and len(errors) == 1, out.stderr[-3000:]
    assert not any(noise in out.stderr for noise in ("Traceback", "never retrieved", "Exception ignored")), out.stderr[-3000:]
    assert f"checkpoint step {newest} in {workdir}/checkpoints is damaged" in errors[0], errors[0]
    assert committed_steps(workdir) == committed_steps(reference)
    assert (workdir / "config.json").read_text() == config_json


def test_a_resume_that_fails_reading_arrays_leaves_config_json_as_it_was(reference, cache_dir, tmp_path, capsys,
                                                                          monkeypatch):
  """A step whose metadata reads but whose arrays do not (a disk error mid-read, say): the failed
  start's train.steps is not recorded in config.json."""
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  def unreadable(self, step, *args, **kwargs):
    raise ckpt_lib.CheckpointDamagedError(f"checkpoint step {step} is damaged (EIO); move it out")
  monkeypatch.setattr(ckpt_lib.Checkpointer, "restore", unreadable)
  config_json = (workdir / "config.json").read_text()
  line, _ = _one_error_line(capsys, cli.main(cli_args(workdir, cache_dir, f"train.steps={N + 2}")))
  assert "is damaged (EIO)" in line, line
  assert (workdir / "config.json").read_text() == config_json


# ----------------------------------------------------------------------------- NaN policy


def _poison(monkeypatch, bad_steps):
  """Makes the train batches of `bad_steps` (0-based batch index) give a NaN loss."""
  real = loader_lib.Loader.host_batch

  def host_batch(self, step):
    fields = real(self, step)
    if self.split == "train" and step in bad_steps:
      fields["loss_weights"] = fields["loss_weights"].copy()
      fields["loss_weights"][0, 0] = np.nan
    return fields

  monkeypatch.setattr(loader_lib.Loader, "host_batch", host_batch)


def test_nan_abort_names_step_and_last_good_checkpoint(reference, cache_dir, capsys, monkeypatch, tmp_path):
  _poison(monkeypatch, {5})  # the 6th update
  code = cli.main(cli_args(tmp_path, cache_dir))
  line, _ = _one_error_line(capsys, code)
  assert "non-finite loss, gradient or update at step 6" in line, line
  assert f"last good checkpoint: step 4 in {tmp_path}/checkpoints" in line, line
  # The checkpoint before the NaN is intact (bitwise the straight run's) and nothing after it was saved.
  assert committed_steps(tmp_path) == [4]
  assert_states_equal(saved_state(tmp_path, 4), saved_state(reference, 4))
  assert max(step_losses(tmp_path)) == 5


def test_a_non_finite_update_at_rate_0_names_the_model_not_the_rate(cache_dir, capsys, monkeypatch, tmp_path):
  _poison(monkeypatch, {0})  # warmup's first update runs at rate 0: lowering optim.lr cannot help
  line, _ = _one_error_line(capsys, cli.main(cli_args(tmp_path, cache_dir)))
  assert ("non-finite loss, gradient or update at step 1, an update at learning rate 0: the model's own loss or "
          "gradient is not finite, whatever optim.lr is") in line, line


def test_an_overflowing_update_is_non_finite_too(cache_dir, capsys, tmp_path):
  """A rate so high that finite gradients make inf params is caught before anything is saved."""
  line, _ = _one_error_line(capsys, cli.main(cli_args(tmp_path, cache_dir, "optim.lr=1e39", "optim.warmup_steps=0")))
  assert "non-finite loss, gradient or update at step 1; no checkpoint was saved yet" in line, line
  assert committed_steps(tmp_path) == []


def test_nan_skip_stops_once_the_params_diverged(cache_dir, monkeypatch, tmp_path):
  """Under `skip`, updates that stay non-finite mean the params diverged: the run stops, naming the
  last checkpoint saved before, rather than skipping to the end and saving them as finished."""
  _poison(monkeypatch, set(range(5, 40)))  # from the 6th update on
  with pytest.raises(train.NonFiniteLossError, match=r"10 non-finite updates in a row up to step 15: the params of "
                                                     r"step 5 diverged\. .* go on from step 4, the last checkpoint"):
    train.run(load(cache_dir, "train.nan_policy=skip", "train.steps=40", "checkpoint.keep=1"), str(tmp_path))
  # Saves 8 and 12 fell due inside the run of skipped updates and were put off: saved, they would
  # hold step 5's params, and keep=1 would have deleted step 4, the one to go back to.
  assert committed_steps(tmp_path) == [4]


def test_nan_skip_counts_a_run_of_skipped_updates_across_a_resume(cache_dir, monkeypatch, tmp_path):
  """A run stopped inside a run of skipped updates goes on counting it when resumed: it stops where
  the straight run would, naming the same steps."""
  _poison(monkeypatch, set(range(5, 40)))
  train.run(load(cache_dir, "train.nan_policy=skip", "train.steps=8"), str(tmp_path))  # saves 8, 3 skipped in a row
  with pytest.raises(train.NonFiniteLossError, match=r"10 non-finite updates in a row up to step 15: the params of "
                                                     r"step 5 diverged\. .* go on from step 4, the last checkpoint"):
    train.run(load(cache_dir, "train.nan_policy=skip", "train.steps=40"), str(tmp_path))
  # The count of skipped updates goes on too: steps 6 to 14 were all skipped, 3 before the resume.
  skipped = {r["step"]: r["train/skipped_steps"] for r in metrics_rows(tmp_path) if "train/skipped_steps" in r}
  assert [skipped[s] for s in (8, 9, 14)] == [3, 4, 9], skipped


def test_a_run_that_ends_inside_skipped_updates_keeps_the_checkpoint_before_them(cache_dir, monkeypatch, tmp_path):
  """The save at the end of a run (or at a stop) inside a run of skipped updates holds the params that
  just failed: with checkpoint.keep=1 it once deleted step 4, the last good checkpoint, and the resumed
  run that then diverged had none to go back to."""
  _poison(monkeypatch, set(range(5, 40)))  # from the 6th update on
  skip = ("train.nan_policy=skip", "checkpoint.keep=1")
  train.run(load(cache_dir, *skip, "train.steps=8"), str(tmp_path))  # saves 8, 3 skipped in a row
  assert committed_steps(tmp_path) == [4, 8]
  with pytest.raises(train.NonFiniteLossError, match=r"10 non-finite updates in a row up to step 15: the params of "
                                                     r"step 5 diverged\. .* go on from step 4, the last checkpoint"):
    train.run(load(cache_dir, *skip, "train.steps=40"), str(tmp_path))
  assert committed_steps(tmp_path)[0] == 4
  monkeypatch.undo()  # the data is fine again: the streak ends, and a finite save counts toward keep=1 again
  train.run(load(cache_dir, *skip, "train.steps=12"), str(tmp_path))
  assert committed_steps(tmp_path) == [12]


def test_nan_skip_puts_a_save_off_until_an_update_is_finite(cache_dir, monkeypatch, tmp_path, capsys):
  _poison(monkeypatch, {3})  # the 4th update, which makes step 4, a save step
  train.run(load(cache_dir, "train.nan_policy=skip", "train.steps=6"), str(tmp_path))
  assert committed_steps(tmp_path) == [5, 6]
  assert "step 4: checkpoint put off until an update is finite again" in capsys.readouterr().out


def test_reruns_stopped_again_and_again_keep_the_periodic_checkpoints(cache_dir, monkeypatch, tmp_path):
  # Each rerun is stopped (as by SIGTERM or Ctrl-C) soon after it resumed; keep=2 counts the
  # periodic saves (every 4 steps) only, and every rerun resumes from the newest save.
  stop_at = [None]
  monkeypatch.setattr(ckpt_lib.PreemptionWatcher, "should_stop", lambda self, step: step == stop_at[0])
  config = load(cache_dir, "train.steps=16", "checkpoint.keep=2")
  newest = None
  for stop, kept in ((9, [4, 8, 9]), (10, [4, 8, 10]), (13, [8, 12, 13])):
    stop_at[0] = stop
    with capture_log() as lines:
      train.run(config, str(tmp_path))
    resumed = [line for line in lines if line.startswith("Resumed")]
    assert [line.split(" of ")[0] for line in resumed] == ([f"Resumed from step {newest}"] if newest else []), lines
    # It trained on from there, not from an older save (whose steps, rerun bitwise, no loss would tell apart).
    starts = [r[report.START_KEY] for r in metrics_rows(tmp_path) if report.START_KEY in r]
    assert starts[-1] == (newest or 0), starts
    assert committed_steps(tmp_path) == kept
    newest = kept[-1]


def test_nan_skip_leaves_state_bitwise_unchanged(cache_dir, monkeypatch, tmp_path):
  _poison(monkeypatch, {1, 4})  # the 2nd and the 5th update
  out = train.run(load(cache_dir, "train.nan_policy=skip", "train.steps=5"), str(tmp_path))
  assert out["step"] == 5
  # Checkpoints 4 (every 4 steps) and 5 (final) hold the states before and after the skipped 5th update.
  assert_states_equal(saved_state(tmp_path, 5), saved_state(tmp_path, 4))
  rows = {r["step"]: r for r in metrics_rows(tmp_path) if "train/loss" in r}
  assert [rows[s]["train/nonfinite"] for s in range(1, 6)] == [0, 1, 0, 0, 1]
  assert [rows[s]["train/skipped_steps"] for s in range(1, 6)] == [0, 1, 1, 1, 2]
  assert all(np.isfinite(rows[s]["train/loss"]) for s in (1, 3, 4))  # training went on after a skip
  ck = ckpt_lib.Checkpointer(tmp_path / "checkpoints", keep=0)
  assert ck.restore_meta(5)["skipped_steps"] == 2  # a resumed run keeps counting from here
  ck.close()


def test_a_float16_run_resumes_its_loss_scale_bitwise(cache_dir, monkeypatch, tmp_path):
  """A float16 run's loss scale (the scale, the finite updates toward its next doubling, the
  overflows skipped) goes into each checkpoint's meta: a resumed run goes on as the straight run,
  bit for bit. A resume in float32 drops it, and one in float16 of a float32 save starts it afresh."""
  monkeypatch.setattr(train, "LOSS_SCALE_GROWTH", 2)  # a doubling, and so an overflow, every few updates
  start = 2.0 ** 22  # this model's gradients fit below 2**21: two overflows first
  monkeypatch.setitem(train._LOSS_SCALE_START, "scale", np.float32(start))
  fp16 = ("model.dtype=float16", "checkpoint.every_steps=100")
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.run(load(cache_dir, *fp16, "train.steps=10"), straight)
  train.run(load(cache_dir, *fp16, "train.steps=5"), resumed)
  train.run(load(cache_dir, *fp16, "train.steps=10"), resumed)
  assert step_losses(resumed) == step_losses(straight)
  assert_states_equal(saved_state(resumed, 10), saved_state(straight, 10))
  meta = lambda workdir, step: ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=0).restore_meta(step)
  assert meta(resumed, 10)["loss_scale"] == meta(straight, 10)["loss_scale"]
  assert 0 < meta(resumed, 5)["loss_scale"]["skipped"] < meta(resumed, 10)["loss_scale"]["skipped"]

  train.run(load(cache_dir, "train.steps=12", "checkpoint.every_steps=100"), resumed)  # float32
  assert "loss_scale" not in meta(resumed, 12)
  train.run(load(cache_dir, *fp16, "train.steps=14"), resumed)
  rows = {r["step"]: r for r in metrics_rows(resumed) if "train/loss_scale" in r}
  assert sorted(rows) == [*range(1, 11), 13, 14]
  assert rows[13]["train/loss_scale"] in (start, start / 2)  # from the start, one update on
  assert meta(resumed, 14)["loss_scale"]["skipped"] == rows[14]["train/overflow_skips"] <= 2


def test_a_float16_run_stopped_by_a_non_finite_update_says_what_float16_does(cache_dir, monkeypatch, tmp_path):
  """A float16 update the loss scale does not absorb (a non-finite loss, as float16 overflowing in the
  forward pass makes; or gradients that overflow at the smallest scale) is no matter of the rate or of
  skipping: the message says so and names the dtypes that do not overflow (it once said only "lower optim.lr")."""
  fp16 = ("model.dtype=float16", "train.steps=8")
  with monkeypatch.context() as m:
    _poison(m, {5})
    with pytest.raises(train.NonFiniteLossError, match=r"at step 6; .*\(model\.dtype=float16: a loss that is not "
                                                       r"finite is most often the forward pass overflowing float16"):
      train.run(load(cache_dir, *fp16), str(tmp_path / "forward"))
    _poison(m, set(range(5, 40)))
    with pytest.raises(train.NonFiniteLossError, match=r"10 non-finite updates in a row .*model\.dtype=bfloat16 or "
                                                       r"float32 does not overflow there"):
      train.run(load(cache_dir, *fp16, "train.nan_policy=skip", "train.steps=40"), str(tmp_path / "skip"))
  monkeypatch.setattr(train, "LOSS_SCALE_MIN", 2.0 ** 40)  # a scale at its smallest that still overflows
  monkeypatch.setitem(train._LOSS_SCALE_START, "scale", np.float32(2.0 ** 40))
  with pytest.raises(train.NonFiniteLossError, match=r"at step 1; .*gradients overflow float16 even at the smallest "
                                                     r"loss scale"):
    train.run(load(cache_dir, *fp16, "optim.warmup_steps=0"), str(tmp_path / "gradients"))


def test_loop_reads_metrics_after_queueing_the_next_update(cache_dir, monkeypatch, tmp_path):
  """The host reads an update's metrics only once the next update is queued (the device never
  waits on logging), except where that state is evaluated or saved: there they are read first."""
  events = []
  real_compile, real_to_host = train.compile_steps, train._to_host

  def compile_steps(*args, **kwargs):
    step_fn, eval_fn = real_compile(*args, **kwargs)

    def traced_step(state, batch):
      events.append(("queue", int(state["step"]) + 1))
      return step_fn(state, batch)

    def traced_eval(params, batch):
      events.append(("eval", None))
      time.sleep(1.0)  # a slow eval: the throughput logged after it must not count it
      return eval_fn(params, batch)
    return traced_step, traced_eval

  def to_host(metrics):
    events.append(("read", None))
    return real_to_host(metrics)

  monkeypatch.setattr(train, "compile_steps", compile_steps)
  monkeypatch.setattr(train, "_to_host", to_host)
  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", lambda self, step, *a, **k: events.append(("save", step)))
  train.run(load(cache_dir, "train.steps=7", "train.eval_every=3", "train.eval_batches=1",
                 "checkpoint.every_steps=5"), str(tmp_path))
  # Read n: the metrics of the update that made step n (reads follow the queue order).
  reads, queued, order = 0, 0, []
  for kind, n in events:
    if kind == "queue":
      queued = n
    elif kind == "read":
      reads += 1
      order.append((reads, queued))
    else:
      order.append((kind, reads, queued))
  assert order == [
      (1, 2), (2, 3),                    # steps 1 and 2 read once 2 and 3 are queued
      (3, 3), ("eval", 3, 3),            # step 3 read before its eval, nothing queued beyond it
      (4, 5), (5, 5), ("save", 5, 5),    # 4 read once 5 is queued; 5 read before its save
      (6, 6), ("eval", 6, 6),
      (7, 7), ("save", 7, 7), ("eval", 7, 7)]  # the last step: the final save, then the eval
  # train/tokens_per_sec of steps 4 and 7 (each window holds an eval of 1 s) counts training time only.
  config = load(cache_dir)
  rows = {r["step"]: r for r in metrics_rows(tmp_path) if "train/tokens_per_sec" in r}
  assert rows[4]["train/tokens_per_sec"] > config.train.batch_size * config.data.seq_len / 0.8, rows[4]
  assert 1 not in rows and 2 in rows  # the first update compiles: no rate is logged for it, and none counts it


def test_profile_traces_the_chosen_updates_into_tensorboard(cache_dir, tmp_path, traced_steps):
  """`train.profile_steps` traces exactly its updates, each a step annotation, into workdir/tb."""
  with capture_log() as lines:
    train.run(load(cache_dir, "train.steps=6", "train.profile_start=2", "train.profile_steps=2"), str(tmp_path / "a"))
  steps, step_events = traced_steps(tmp_path / "a" / "tb")
  assert steps == {3, 4} and step_events > 0  # the compiled step ran inside the window
  assert any(l.startswith(f"profile of updates 3-4 written to {tmp_path / 'a' / 'tb'}") for l in lines)
  # From step 0 the window skips the first update (it compiles); a window past the end stops with the run.
  with capture_log() as lines:
    train.run(load(cache_dir, "train.steps=3", "train.profile_start=0", "train.profile_steps=5",
                   "train.eval_every=0", "train.eval_batches=1"), str(tmp_path / "b"))
  assert traced_steps(tmp_path / "b" / "tb")[0] == {2, 3}
  assert any(l.startswith("profile of updates 2-3 written") for l in lines)
  assert [r["step"] for r in metrics_rows(tmp_path / "b") if "eval/loss" in r] == [3]  # eval_every=0: the end only
  # train.eval_batches=0 (as here): no eval line and no eval/ metrics, rather than a loss of 0.
  assert not any(k.startswith("eval/") for row in metrics_rows(tmp_path / "a") for k in row)


# ----------------------------------------------------------------------------- elastic


def test_an_eval_that_fails_comes_after_the_save_of_its_step(cache_dir, tmp_path, monkeypatch):
  """Eval and save fall on the same step: the save goes first, so a failing eval loses no update."""
  def out_of_memory(*args, **kwargs):
    raise RuntimeError("RESOURCE_EXHAUSTED: out of memory in the eval step")
  monkeypatch.setattr(train, "evaluate", out_of_memory)
  workdir = tmp_path / "w"
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
    train.run(load(cache_dir, "train.steps=4", "train.eval_batches=1", "train.eval_every=4"), str(workdir))
  assert committed_steps(workdir) == [4]


def test_held_out_rows_go_through_in_micro_batches_and_score_as_whole_batches(cache_dir, tmp_path, monkeypatch):
  """train.grad_accum is there for a batch that fits only split: the eval reads its held-out rows as
  training does, batch_size / grad_accum at a time (it ran whole batches, so the run that trained ran
  out of device memory at its first eval), and scores the rows eval_batches whole batches hold."""
  from fmjax import data
  traced, figures = [], []
  real_step, real_evaluate = train.make_eval_step, train.evaluate

  def make_eval_step(config, graphdef, loss_fn=None):
    step = real_step(config, graphdef, loss_fn)
    def eval_step(params, batch):
      traced.append(batch["inputs"].shape)  # at trace time: once a shape
      return step(params, batch)
    return eval_step

  def evaluate(eval_step, params, loader, num_batches):
    got = real_evaluate(eval_step, params, loader, num_batches)
    whole = data.held_out_loaders(loader.config, sharding=loader.sharding, batch_size=8, tok=loader.tokenizer)
    figures.append((list(traced), got, real_evaluate(eval_step, params, whole, 3)))
    return got

  monkeypatch.setattr(train, "make_eval_step", make_eval_step)
  monkeypatch.setattr(train, "evaluate", evaluate)
  # Batch 8 in 2 micro-batches of 4 rows, over a data axis of 4.
  config = load(cache_dir, "train.steps=2", "train.grad_accum=2", "mesh.data=4", "mesh.tensor=2",
                "train.eval_batches=3", "train.eval_every=2")
  out = train.run(config, str(tmp_path / "w"))
  (shapes, got, want), = figures
  assert shapes == [(4, 32)]
  assert got == pytest.approx(want, rel=1e-6) and out["eval"] == got


def test_a_mixture_resumes_bitwise(cache_dir, tmp_path):
  """A mixture's batches are a function of the step too: 2 steps, a resume, 2 more equal 4 straight."""
  (tmp_path / "odd.txt").write_text("\n\n".join(" ".join(["zebra quartz vortex", "fjord glyph nymph"][i % 2] for _ in
                                                          range(20 + i)) for i in range(80)) + "\n")
  mix = ["data.dataset=fmjax_corpus=3,text_files=1", f"data.files={tmp_path / 'odd.txt'}", "train.steps=4",
         "checkpoint.every_steps=2", "train.eval_batches=1"]
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train.run(load(cache_dir, *mix), str(straight))
  copy_checkpoint(straight, 2, resumed)
  with capture_log() as lines:  # the same weights written another way: the same mixture
    train.run(load(cache_dir, "data.dataset=fmjax_corpus=6, text_files=2", *mix[1:]), str(resumed))
  assert any(line.startswith("Resumed from step 2 ") for line in lines), lines
  assert step_losses(resumed) == {s: loss for s, loss in step_losses(straight).items() if s > 2}
  assert_states_equal(saved_state(resumed, 4), saved_state(straight, 4))
  # Held out dataset by dataset: each one's loss, and the loss over both between them.
  held_out = metrics_rows(resumed)[-1]
  each = [held_out["eval/fmjax_corpus_loss"], held_out["eval/text_files_loss"]]
  assert min(each) < held_out["eval/loss"] < max(each), held_out
  from fmjax import evaluate
  scored = evaluate.run(str(resumed))  # every held-out row of each
  assert scored["loss"] != held_out["eval/loss"] and {"fmjax_corpus_loss", "text_files_loss"} <= scored.keys()
  # The train split too: each dataset's first rows (in order, the joined split is its first dataset's alone).
  on_train = evaluate.run(str(resumed), split="train", batches=1)
  assert {"fmjax_corpus_loss", "text_files_loss"} <= on_train.keys(), on_train


def test_tokens_per_sec_counts_the_update_a_profile_window_drains(cache_dir, tmp_path, monkeypatch):
  """The window's end waits for its last update (and writes the trace): that time is the update's.
  Read after it, the rate of the update after the compiling one was tokens / ~0 s (millions)."""
  stop = train.metrics_lib.StepProfiler.stop

  def slow_stop(self):
    if self.active:
      time.sleep(1.0)
    stop(self)

  monkeypatch.setattr(train.metrics_lib.StepProfiler, "stop", slow_stop)
  config = load(cache_dir, "train.steps=2", "train.profile_start=0", "train.profile_steps=1")
  train.run(config, str(tmp_path / "w"))
  rates = [r["train/tokens_per_sec"] for r in metrics_rows(tmp_path / "w") if "train/tokens_per_sec" in r]
  assert len(rates) == 1 and rates[0] < config.train.batch_size * config.data.seq_len / 1.0, rates


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def assert_losses_close(workdir, reference, steps):
  ref, got = step_losses(reference), step_losses(workdir)
  assert sorted(got) == list(steps)
  np.testing.assert_allclose([got[s] for s in steps], [ref[s] for s in steps], rtol=1e-5)


def test_elastic_resume_across_meshes_devices_and_processes(reference, cache_dir, tmp_path):
  """One run, resumed three times on other layouts; same batches, losses within float tolerance:

  8 devices, mesh data=8 (the reference's step 4) -> 8 devices, fsdp=4 x tensor=2 (to step 8)
  -> 2 processes x 4 devices, data=8, SIGTERM to host 1 only -> 1 process with 4 devices, to N.
  """
  workdir = str(tmp_path)
  copy_checkpoint(reference, 4, workdir)
  with capture_log() as lines:
    train.run(load(cache_dir, "train.steps=8", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"), workdir)
  resumed = [line for line in lines if line.startswith("Resumed")]
  assert len(resumed) == 1 and "Resumed from step 4 " in resumed[0], lines
  assert "mesh.fsdp: 1 -> 4" in resumed[0] and "mesh.tensor: 1 -> 2" in resumed[0], resumed[0]
  assert_losses_close(workdir, reference, range(5, 9))

  port = _free_port()
  hosts = [Trainer(cli_args(workdir, cache_dir), subprocess_env(
      4, FMJAX_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
      JAX_PROCESS_ID=str(i))) for i in range(2)]
  try:
    preempt(hosts, at_step=10, signal_to=hosts[1:])  # host 0 learns of it through JAX's preemption sync
    codes = [h.finish() for h in hosts]
  finally:
    for h in hosts:
      h.kill()
  assert codes == [cli.PREEMPTED_EXIT_CODE] * 2, "\n---\n".join(h.output[-3000:] for h in hosts)
  assert re.search(r"Resumed from step 8 of .*'data': 8.*8 devices, 2 process", hosts[0].output), \
      hosts[0].output[-3000:]
  stops = [int(re.search(r"Preempted: saving step (\d+)", h.output).group(1)) for h in hosts]
  assert stops[0] == stops[1] and 10 <= stops[0] < N, stops
  assert committed_steps(workdir) == sorted({4, 8, stops[0], *range(12, stops[0] + 1, 4)})
  assert_losses_close(workdir, reference, range(5, stops[0] + 1))

  last = Trainer(cli_args(workdir, cache_dir), subprocess_env(4))
  try:
    assert last.finish() == 0, last.output[-4000:]
  finally:
    last.kill()
  assert re.search(rf"Resumed from step {stops[0]} of .*'data': 4.*4 devices, 1 process", last.output), \
      last.output[-3000:]
  assert committed_steps(workdir)[-1] == N  # the final save landed before the process exited
  assert_losses_close(workdir, reference, range(5, N + 1))
  assert_states_equal(saved_state(workdir, N), saved_state(reference, N), exact=False)


def by_path(tree) -> dict[str, np.ndarray]:
  return {"/".join(ckpt_lib._path_keys(path)): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def layer_count(flat: dict[str, np.ndarray]) -> int:
  return 1 + max(int(k.split("/blocks/")[1].split("/")[0]) for k in flat if "/blocks/" in k)


def test_resume_in_the_other_layer_layout(reference, cache_dir, tmp_path):
  """model.scan_layers may change between runs of one workdir: a checkpoint restores into either
  layer layout (stacked blocks or one per layer), bit for bit, onto any mesh, and training goes on."""
  workdir = str(tmp_path)
  copy_checkpoint(reference, 8, workdir)
  # Unrolled (the reference) -> scanned on an FSDP x tensor mesh: each array is its layers stacked.
  config = load(cache_dir, "model.scan_layers=true", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
  spec = train.state_spec(config, sharding.make_mesh(config), optim.make_optimizer(config))
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=0)
  with jax.set_mesh(spec.mesh):
    scanned = ck.restore(8, spec.abstract, items=ckpt_lib.ITEMS)
  ck.close()
  scanned = {k: scanned[k] for k in ckpt_lib.ITEMS}
  assert jax.tree.map(lambda x: x.sharding, scanned) == {k: spec.shardings[k] for k in ckpt_lib.ITEMS}
  unrolled, got = by_path(saved_state(workdir, 8)), by_path(scanned)
  n = layer_count(unrolled)
  stacked = [k for k in got if "/blocks/" in k]
  assert len(stacked) > 20 and len(got) == len(unrolled) - (n - 1) * len(stacked)
  for k, x in got.items():
    want = (np.stack([unrolled[k.replace("/blocks/", f"/blocks/{i}/", 1)] for i in range(n)]) if k in stacked
            else unrolled[k])
    assert x.shape == want.shape and x.tobytes() == want.tobytes(), k

  with capture_log() as lines:
    train.run(load(cache_dir, "model.scan_layers=true", "train.steps=12"), workdir)
  assert any("Resumed from step 8 " in l and "model.scan_layers: False -> True" in l for l in lines), lines
  assert_losses_close(workdir, reference, range(9, 13))
  # Scanned -> unrolled: layer i of each stacked array.
  saved = by_path(saved_state(workdir, 12))
  config = load(cache_dir)
  spec = train.state_spec(config, sharding.make_mesh(config), optim.make_optimizer(config))
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=0)
  with jax.set_mesh(spec.mesh):
    got = by_path({k: v for k, v in ck.restore(12, spec.abstract, items=ckpt_lib.ITEMS).items() if k != "step"})
  ck.close()
  for k, x in got.items():
    if "/blocks/" in k:
      head, tail = k.split("/blocks/", 1)
      i, rest = tail.split("/", 1)
      want = saved[f"{head}/blocks/{rest}"][int(i)]
    else:
      want = saved[k]
    assert x.shape == want.shape and x.tobytes() == want.tobytes(), k
  train.run(load(cache_dir, "train.steps=16"), workdir)
  assert_losses_close(workdir, reference, range(9, 17))


def test_resume_in_another_compute_dtype(reference, cache_dir, tmp_path):
  """model.dtype is how the step computes, not what it saves: a run goes on in bfloat16 (or back to
  float32 to chase a NaN) from the same state, as the log says (it was refused as another model)."""
  workdir = str(tmp_path)
  copy_checkpoint(reference, 8, workdir)
  with capture_log() as lines:
    train.run(load(cache_dir, "model.dtype=bfloat16", "train.steps=10"), workdir)
  assert any("Resumed from step 8 " in l and "model.dtype: 'float32' -> 'bfloat16'" in l for l in lines), lines
  got, ref = step_losses(workdir), step_losses(reference)
  assert sorted(got) == [9, 10]
  np.testing.assert_allclose([got[9], got[10]], [ref[9], ref[10]], rtol=2e-2)  # bf16 compute, the same state
  assert got[9] != ref[9]


def test_init_from_keeps_the_source_tokenizer(reference, cache_dir, tmp_path):
  """Continued pretraining on other text reads the token ids the source's params know: the
  source's tokenizer, saved into the workdir, not one trained anew on the new text."""
  from fmjax import data
  words = ["river", "stone", "quiet", "engine", "paper", "window", "orbit", "garden", "signal", "copper"]
  rng = np.random.default_rng(0)
  text = tmp_path / "more.txt"
  text.write_text("\n\n".join(" ".join(rng.choice(words, 12)) + "." for _ in range(400)) + "\n")  # 400 documents
  workdir = tmp_path / "w"
  overrides = (f"init_from={reference}", "data.dataset=text_files", f"data.files={text}")
  config = load(cache_dir, *overrides, "train.steps=2")
  given = config_lib.to_dict(config)
  with capture_log() as lines:
    assert train.run(config, str(workdir))["step"] == 2
  assert any(l.startswith(f"Tokenizer of {reference} (the ids its params know) in {workdir}") for l in lines), lines
  assert config_lib.to_dict(config) == given  # adopted into the run's copy: the caller's runs again as it was
  sample = "The with statement opens a quiet river of words."
  source, own = data.get_tokenizer(load(cache_dir)), data.load_hf(str(workdir / "tokenizer"))
  assert own.encode(sample) == source.encode(sample)
  with open(workdir / "config.json") as f:
    saved = json.load(f)["data"]["tokenizer"]
  assert saved["kind"] == "hf" and saved["path"] == "tokenizer"  # relative to the workdir, which may move
  # Rerunning the same command resumes (the adopted tokenizer is no config change), in the workdir
  # where it now lies.
  moved = tmp_path / "moved"
  shutil.move(workdir, moved)
  workdir = moved
  assert train.run(load(cache_dir, *overrides, "train.steps=3"), str(workdir))["step"] == 3
  # Data that is not there fails before a fresh workdir is created.
  with pytest.raises(ConfigError, match="matches no file text_files reads"):
    train.run(load(cache_dir, "data.dataset=text_files", f"data.files={tmp_path}/nothing*.txt"), str(tmp_path / "x"))
  assert not os.path.exists(tmp_path / "x")
  # A rerun asking for fewer steps than the checkpoint holds trains nothing, and says so.
  with capture_log() as lines:
    assert train.run(load(cache_dir, *overrides, "train.steps=2"), str(workdir))["step"] == 3
  assert any("step 3 already reaches train.steps=2: nothing to train" in l for l in lines), lines
  with open(workdir / "config.json") as f:
    assert json.load(f)["train"]["steps"] == 3  # the run's own config stays: it trained to step 3


def test_init_from_computes_with_the_sources_layer_norm_eps(reference, cache_dir, tmp_path):
  """An imported model may use another LayerNorm epsilon than the config's default: continued
  pretraining takes the source's (as fine-tuning does), and a rerun resumes with it."""
  source = tmp_path / "source"
  shutil.copytree(reference, source)
  saved = json.loads((source / "config.json").read_text())
  saved["model"]["layer_norm_eps"] = 1e-6
  (source / "config.json").write_text(json.dumps(saved))
  workdir = tmp_path / "w"
  config = load(cache_dir, f"init_from={source}", "train.steps=1", "train.eval_batches=0")
  assert config.model.layer_norm_eps != 1e-6
  with capture_log() as lines:
    train.run(config, str(workdir))
  assert any(f"model.layer_norm_eps=1e-06, as init_from computed (read from {source}/config.json" in l for l in lines), lines
  assert json.loads((workdir / "config.json").read_text())["model"]["layer_norm_eps"] == 1e-6
  again = load(cache_dir, f"init_from={source}", "train.steps=2", "train.eval_batches=0")
  assert train.run(again, str(workdir))["step"] == 2  # no "different model/data setup" on the resume
  shutil.rmtree(source)  # init_from gone: the run's own config.json says what it computed with
  assert train.run(load(cache_dir, f"init_from={source}", "train.steps=3", "train.eval_batches=0"),
                   str(workdir))["step"] == 3


def test_continued_pretraining_of_a_rotary_model_may_read_a_longer_context(cache_dir, tmp_path):
  """Extending a Llama's context: a run from it with position interpolation (rope_scaling=linear) over twice its
  positions and rows takes its params, keeps these settings (and adopts the rest), and resumes with them."""
  source, workdir = tmp_path / "source", tmp_path / "longer"
  assert train.run(load(cache_dir, "train.steps=1", "model.max_len=32", spec=LLAMA), str(source))["step"] == 1
  longer = ("model.rope_scaling=linear", "model.rope_factor=2", "model.max_len=64", "data.seq_len=64")
  config = load(cache_dir, f"init_from={source}", "train.steps=1", *longer, spec=LLAMA)
  assert train.run(config, str(workdir))["step"] == 1
  saved = json.loads((workdir / "config.json").read_text())
  assert ({k: saved["model"][k] for k in ("rope_scaling", "rope_factor", "max_len")}, saved["data"]["seq_len"]) == (
      {"rope_scaling": "linear", "rope_factor": 2.0, "max_len": 64}, 64)
  again = load(cache_dir, f"init_from={source}", "train.steps=2", *longer, spec=LLAMA)
  assert train.run(again, str(workdir))["step"] == 2


def test_init_from_starts_at_step_zero_with_the_source_params(reference, cache_dir):
  """`init_from` (e.g. phase 2 of BERT-style two-phase pretraining): another run's latest params,
  a fresh optimizer, step 0 — and only when the workdir has no checkpoint of its own."""
  config = load(cache_dir, f"init_from={reference}")
  mesh = sharding.make_mesh(config)
  tx = optim.make_optimizer(config)
  spec = train.state_spec(config, mesh, tx)
  state, read = train.init_from_checkpoint(reference, spec, tx)
  source = saved_state(reference, max(committed_steps(reference)))
  assert int(state["step"]) == 0 and read == max(committed_steps(reference))
  got, want = jax.tree.leaves(state["params"]), jax.tree.leaves(source["params"])  # saved keys are strings
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), b)
  fresh = jax.tree.map(np.asarray, jax.jit(tx.init)(state["params"]))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state["opt_state"]), fresh)
  with pytest.raises(ConfigError, match="holds no checkpoint"):
    train.init_from_checkpoint(os.path.join(reference, "nowhere"), spec, tx)
  assert not os.path.exists(os.path.join(reference, "nowhere"))  # a misspelt init_from got a checkpoints/ made
  # init_from_step picks an older checkpoint of the source run.
  first = min(committed_steps(reference))
  older, read = train.init_from_checkpoint(reference, spec, tx, first)
  assert read == first
  for a, b in zip(jax.tree.leaves(older["params"]), jax.tree.leaves(saved_state(reference, first)["params"])):
    np.testing.assert_array_equal(np.asarray(a), b)
