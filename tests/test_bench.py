"""`fmjax bench` on CPU: the real train step on synthetic (optionally packed) batches."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fmjax import bench, cli, config_lib, metrics, models, plan

TINY = ["--config.model.num_layers=2", "--config.model.d_model=64", "--config.model.num_heads=4",
        "--config.model.d_ff=128", "--config.model.vocab_size=512", "--config.data.seq_len=64",
        "--config.train.batch_size=8", "--config.train.grad_accum=1"]


@pytest.mark.parametrize("spec,segments,extra", [
    ("gpt.py:tiny", 1, []), ("gpt.py:tiny", 4, []), ("bert.py:tiny", 2, []),
    ("gpt.py:tiny,llama", 2, ["--config.model.num_kv_heads=2"])])  # rotary positions restart with each segment
def test_bench_prints_and_writes_every_figure(spec, segments, extra, capsys, tmp_path):
  path = tmp_path / "bench.json"
  code = cli.main(["bench", f"--config=configs/{spec}", "--steps=2", "--warmup=1",
                   f"--segments={segments}", f"--json={path}"] + TINY + extra)
  assert code == 0
  out = capsys.readouterr().out
  for label in ("tokens/s", "MFU", "step time", "compile", "peak memory", "FLOPs/token = 6*N + 12*L*D*T"):
    assert label in out, out
  r = json.loads(path.read_text())
  config = config_lib.load_config(f"configs/{spec}", [a[len("--config."):] for a in TINY + extra])
  assert r["flops_per_token"] == models.flops_per_token(config.model, 64)
  assert r["segments_per_row"] == segments and r["batch_size"] == 8 and r["seq_len"] == 64
  assert r["tokens_per_sec"] == pytest.approx(8 * 64 / r["step_time_s"])
  assert r["compile_time_s"] > 0 and np.isfinite(r["loss"])


@pytest.mark.parametrize("kind,tflops,gib", [
    ("TPU v4", 275, 32), ("TPU v5 lite", 197, 16), ("TPU v5", 459, 95), ("TPU v6 lite", 918, 32), ("TPU v3", 61.5, 16),
    ("NVIDIA H100 80GB HBM3", 989, 79.1), ("NVIDIA H100 PCIe", 756, 79.1), ("NVIDIA H100 NVL", 835, 87.5),
    ("NVIDIA H200", 989, 139), ("NVIDIA A100-SXM4-40GB", 312, 39.4), ("NVIDIA A100 80GB PCIe", 312, 79.1),
    ("NVIDIA L4", 121, 22), ("NVIDIA L40S", 362, 44.4), ("v5litepod-16", 197, 16), ("v5p:2x2x1", 459, 95),
    ("NVIDIA GH200 480GB", None, None), ("cpu", None, None)], ids=lambda x: str(x))
def test_device_specs_by_the_names_jax_gives(kind, tflops, gib):
  # JAX names v5p "TPU v5"; "L40S" holds "L4" and "H100 PCIe" "H100", with other peaks.
  spec = metrics.device_spec(kind)
  assert spec == (None if tflops is None else (tflops * 1e12, gib))
  assert plan.hbm_gib_for(kind) == (None if gib is None else gib)


def test_bench_mfu_is_tokens_per_second_times_flops_per_token_over_the_peak(capsys, monkeypatch):
  monkeypatch.setattr(metrics, "peak_flops_per_device", lambda: 2e12)  # a made-up peak: CPU has none
  r = bench.run(config_lib.load_config("configs/gpt.py:tiny", [a[len("--config."):] for a in TINY]), steps=2,
                warmup=1)
  assert r["mfu"] == pytest.approx(r["tokens_per_sec"] * r["flops_per_token"] / (2e12 * jax.device_count()))
  assert f"{100 * r['mfu']:.1f}% of 2 TF/s per device" in capsys.readouterr().out


def test_a_second_bench_in_one_process_reports_its_own_peak_memory_or_none(capsys, monkeypatch):
  """The allocator's peak is the process's: after a bigger bench (or run) in a notebook it is that one's.
  A bench reports the peak it raised, less what the process held before it, or nothing."""
  GiB = 2**30
  figures = iter([{"bytes_in_use": 1 * GiB, "peak_bytes_in_use": 9 * GiB},   # an earlier bench peaked at 9
                  {"bytes_in_use": 1 * GiB, "peak_bytes_in_use": 9 * GiB},   # this one stayed below
                  {"bytes_in_use": 1 * GiB, "peak_bytes_in_use": 9 * GiB},
                  {"bytes_in_use": 1 * GiB, "peak_bytes_in_use": 12 * GiB}])  # this one raised it to 12
  monkeypatch.setattr(bench, "_memory_stats", lambda: next(figures))  # CPU has no allocator figures
  config = config_lib.load_config("configs/gpt.py:tiny", [a[len("--config."):] for a in TINY])
  assert bench.run(config, steps=1, warmup=1)["peak_memory_gib"] is None
  assert "n/a: below this process's earlier peak (9.00 GiB" in capsys.readouterr().out
  assert bench.run(config, steps=1, warmup=1)["peak_memory_gib"] == 11
  assert "peak memory   11.00 GiB" in capsys.readouterr().out
  assert bench.own_peak_bytes({}, {}) is None and bench.own_peak_bytes({}, {"peak_bytes_in_use": GiB}) == GiB


def test_bench_profile_traces_further_steps(capsys, tmp_path, traced_steps):
  code = cli.main(["bench", "--config=configs/gpt.py:tiny", "--steps=2", "--warmup=1",
                   f"--profile={tmp_path}"] + TINY)
  assert code == 0 and f"profile of 2 more steps in {tmp_path}" in capsys.readouterr().out
  steps, step_events = traced_steps(tmp_path)
  assert steps == {4, 5} and step_events > 0  # after 1 warm-up and 2 timed steps
  assert len(list(tmp_path.glob("plugins/profile/*/*.trace.json.gz"))) == 1  # for Perfetto


def test_synthetic_packing_restarts_positions():
  config = config_lib.load_config("configs/gpt.py:tiny", ["data.seq_len=10", "train.batch_size=2"])
  batch = bench.synthetic_batch(config, segments=3)
  np.testing.assert_array_equal(batch["segment_ids"][1], [1, 1, 1, 1, 2, 2, 2, 3, 3, 3])
  np.testing.assert_array_equal(batch["positions"][1], [0, 1, 2, 3, 0, 1, 2, 0, 1, 2])
  one = bench.synthetic_batch(config)
  assert (one["segment_ids"] == 1).all() and (one["positions"] == np.arange(10)).all()


def test_bad_segments_is_one_line(capsys):
  code = cli.main(["bench", "--config=configs/gpt.py:tiny", "--segments=0"] + TINY)
  err = capsys.readouterr().err.strip()
  assert code == 2 and err.count("\n") == 0 and "--segments must be between 1 and data.seq_len=64" in err, err
  for flags in (["--steps=0"], ["--warmup=0"], ["--steps=-1"]):  # once a division by zero, an unbound name, a negative time
    code = cli.main(["bench", "--config=configs/gpt.py:tiny", *flags] + TINY)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "must each be at least 1" in err, err
  # Checked before the benchmark runs, not after it has.
  code = cli.main(["bench", "--config=configs/gpt.py:tiny", "--json=/nonexistent/dir/x.json"] + TINY)
  err = capsys.readouterr().err.strip()
  assert code == 2 and err == "error: --json=/nonexistent/dir/x.json: its directory does not exist; create it or " \
      "pass another path", err
  code = cli.main(["bench", "--config=configs/gpt.py:tiny", f"--json={os.getcwd()}"] + TINY)  # a directory
  err = capsys.readouterr().err.strip()
  assert code == 2 and err.startswith(f"error: --json={os.getcwd()} is a directory; pass a file path"), err


def test_a_profile_path_that_cannot_be_a_directory_is_refused_first(capsys, tmp_path, monkeypatch):
  """Before: the benchmark ran, then the profiler's traceback, and its figures were never printed."""
  monkeypatch.setattr(bench.train, "init_state", lambda *a: pytest.fail("ran before refusing --profile"))
  (tmp_path / "f").write_text("")
  code = cli.main(["bench", "--config=configs/gpt.py:tiny", f"--profile={tmp_path / 'f'}"] + TINY)
  err = capsys.readouterr().err.strip()
  assert code == 2 and err == f"error: --profile={tmp_path / 'f'} is a file; pass a directory for the trace " \
      "(made if new)", err
  code = cli.main(["bench", "--config=configs/gpt.py:tiny", f"--profile={tmp_path / 'f' / 'sub'}"] + TINY)
  err = capsys.readouterr().err.strip()
  assert code == 2 and err.count("\n") == 0 and "a part of the path is a file" in err, err


def test_commands_keep_compiled_programs_in_a_persistent_cache(tmp_path):
  """A rerun loads its programs from ~/.cache/fmjax (or the user's own cache directory)."""
  def bench(home, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("FMJAX_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    # JAX keeps only programs that took a second or more to compile; the tiny model's may take less.
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    subprocess.run([sys.executable, "-m", "fmjax.cli", "bench", "--config=configs/gpt.py:tiny", "--steps=1",
                    "--warmup=1"] + TINY, env={**env, "HOME": str(tmp_path / home), **extra}, check=True,
                   capture_output=True, text=True, timeout=300)

  default = tmp_path / "home" / ".cache" / "fmjax" / "jax_compilation_cache"
  bench("home")
  steps = list(default.glob("jit_train_step-*-cache"))
  assert len(steps) == 1, sorted(p.name for p in default.iterdir())
  stamp = steps[0].with_name(steps[0].name.replace("-cache", "-atime"))
  first = stamp.read_bytes()
  bench("home")
  assert list(default.glob("jit_train_step-*-cache")) == steps  # no new entry: the same program
  assert stamp.read_bytes() != first  # JAX stamps an entry each time it loads it
  bench("home_off", FMJAX_COMPILATION_CACHE="off")
  assert not (tmp_path / "home_off" / ".cache").exists()
  own = tmp_path / "own_cache"
  bench("home_own", JAX_COMPILATION_CACHE_DIR=str(own))  # as the pod launcher sets it
  assert list(own.glob("jit_train_step-*-cache")) and not (tmp_path / "home_own" / ".cache").exists()
