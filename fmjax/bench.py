"""`fmjax bench`: the real train step on synthetic data.

Prints tokens/s, MFU, step time, compile time and peak device memory. FLOPs per token are
6*N + 12*L*D*T (N = parameters without position embeddings, L layers, D the attention's width, num_heads *
head_dim (d_model unless model.head_dim differs), T sequence;
attention is counted in full for BERT's bidirectional attention as well as GPT's). An untied
output layer's input table is a lookup, as the position table is: N leaves it out too.

Shapes: T sequence.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from flax import nnx

from fmjax import config_lib, files, metrics as metrics_lib, optim, sharding, train
from fmjax.config_lib import ConfigError
from fmjax.data import packing

FLOPS_FORMULA = ("FLOPs/token = 6*N + 12*L*D*T (N: parameters without position embeddings, nor an untied head's "
                 "input table; D: the attention's width, num_heads * head_dim)")


def synthetic_batch(config, batch_size: int | None = None, seed: int = 0, segments: int = 1) -> dict[str, np.ndarray]:
  """A host batch with every key the objective reads and random tokens.

  `segments` > 1 packs that many equal documents into each row (segment ids 1.., positions
  restarting at each), as the packed pretraining data does; like the loader, the batch carries
  the rows' runs of segment ids when there are at most `data.packing.MAX_RUNS`.
  """
  b = batch_size or config.train.batch_size
  t = config.data.seq_len
  if not 1 <= segments <= t:
    raise ConfigError(f"--segments must be between 1 and data.seq_len={t}, got {segments}")
  rng = np.random.default_rng(seed)
  vocab = config.model.vocab_size
  seg_T = 1 + np.arange(t) * segments // t
  starts_T = np.searchsorted(seg_T, seg_T)  # first index of each token's segment
  batch = {
      "inputs": rng.integers(0, vocab, (b, t), dtype=np.int32),
      "segment_ids": np.broadcast_to(seg_T.astype(np.int32), (b, t)).copy(),
      "positions": np.broadcast_to((np.arange(t) - starts_T).astype(np.int32), (b, t)).copy(),
      "token_types": np.zeros((b, t), np.int32),
  }
  if config.train.objective == "clm":
    batch["targets"] = rng.integers(0, vocab, (b, t), dtype=np.int32)
    batch["loss_weights"] = np.ones((b, t), np.float32)
  else:
    m = config.data.max_predictions
    batch["mlm_positions"] = np.sort(np.stack([rng.choice(t, m, replace=False) for _ in range(b)]), axis=1).astype(np.int32)
    batch["mlm_targets"] = rng.integers(0, vocab, (b, m), dtype=np.int32)
    batch["mlm_weights"] = np.ones((b, m), np.float32)
  if packing.runs_to_send(segments):
    batch.update(packing.segment_runs(batch["segment_ids"], segments))
  return batch


def _memory_stats() -> dict:
  """The first device's allocator figures (`bytes_in_use`, `peak_bytes_in_use`); {} where the backend has none."""
  try:
    return jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  # not every backend reports memory
    return {}


def own_peak_bytes(before: dict, after: dict) -> int | None:
  """A bench's peak device memory, from the allocator's figures before and after it.

  The allocator's peak is the process's since it began, and no JAX call resets it: in a notebook it
  holds the earlier runs' and benches' peaks too. It is this bench's only where the bench raised it,
  less the bytes the process held already; None where it did not (or the backend has no figures).
  """
  peak = after.get("peak_bytes_in_use")
  if not peak or peak <= before.get("peak_bytes_in_use", 0):
    return None
  return peak - before.get("bytes_in_use", 0)


def run(config, *, steps: int = 10, warmup: int = 2, segments: int = 1, json_path: str = "",
        quiet: bool = False, profile_dir: str = "") -> dict:
  """Times `steps` train steps after `warmup` ones on a batch of `segments` documents a row;
  returns and prints the figures.

  `profile_dir`: then traces `steps` more steps with `jax.profiler` into it (TensorBoard's Profile
  tab, XProf, and a Perfetto `*.trace.json.gz`), apart from the timed ones so tracing costs them
  nothing. Each step is a `StepTraceAnnotation`.
  """
  config_lib.check_pretraining_step(config, "bench")
  if steps < 1 or warmup < 1:  # the first warm-up step compiles; the timed ones must not
    raise ConfigError(f"--steps={steps} and --warmup={warmup} must each be at least 1")
  if json_path and os.path.isdir(json_path):
    raise ConfigError(f"--json={json_path} is a directory; pass a file path, e.g. "
                      f"{os.path.join(json_path, 'bench.json')}")
  if json_path and not os.path.isdir(os.path.dirname(os.path.abspath(json_path))):
    raise ConfigError(f"--json={json_path}: its directory does not exist; create it or pass another path")
  if profile_dir:  # refused now, not after the timed steps (which it would then not print)
    if files.exists(profile_dir) and not files.isdir(profile_dir):
      raise ConfigError(f"--profile={profile_dir} is a file; pass a directory for the trace (made if new)")
    files.makedirs(profile_dir)
  config_lib.validate(config, jax.device_count())
  memory_before = _memory_stats()  # before this bench's arrays: the process's peak so far, and what it holds
  mesh = sharding.make_mesh(config)
  batch_sharding = sharding.batch_sharding(mesh)
  tx = optim.make_optimizer(config)
  spec = train.state_spec(config, mesh, tx)
  state = train.init_state(config, spec, tx)
  host = synthetic_batch(config, segments=segments)
  batch = jax.tree.map(lambda x: jax.device_put(x, batch_sharding), host)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(spec.rules):
    step_fn, _ = train.compile_steps(config, spec, tx, batch_sharding)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
      state, m = compiled(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = compiled(state, batch)
    jax.block_until_ready(m)
    elapsed = time.perf_counter() - t0
    if profile_dir:
      with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
        for i in range(steps):
          with jax.profiler.StepTraceAnnotation("train", step_num=warmup + steps + i + 1):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
  step_s = elapsed / steps
  tokens = config.train.batch_size * config.data.seq_len
  fpt = train.flops_per_token(config)
  peak = metrics_lib.peak_flops_per_device()
  dev = jax.devices()[0]
  memory_after = _memory_stats()
  mem = own_peak_bytes(memory_before, memory_after)
  from fmjax import attention, models
  n_params = models.param_count(nnx.eval_shape(train.model_factory(config)))
  kernel = attention.resolve_kernel(config.model.attention, config.model.dtype, (config.data.seq_len,) * 2,
                                     dropout=config.model.get("attention_dropout", 0.0) > 0)
  result = {
      "config": config.name, "device": dev.device_kind, "num_devices": jax.device_count(),
      "batch_size": config.train.batch_size, "seq_len": config.data.seq_len, "params": n_params,
      "dtype": config.model.dtype, "attention": kernel, "remat": config.model.remat,
      "scan_layers": config.model.scan_layers, "segments_per_row": segments, "step_time_s": step_s, "compile_time_s": compile_s,
      "tokens_per_sec": tokens / step_s, "flops_per_token": fpt,
      "mfu": (tokens / step_s * fpt / (peak * jax.device_count())) if peak else None,
      "peak_memory_gib": mem / 2**30 if mem else None, "loss": float(m["loss"]),
  }
  if not quiet:
    print(f"{config.name} on {jax.device_count()}x {dev.device_kind}: batch {result['batch_size']} x seq "
          f"{result['seq_len']}, {n_params / 1e6:.1f}M params, {config.model.dtype}, attention={kernel}"
          f"{' (auto)' if config.model.attention == 'auto' else ''}, "
          f"remat={config.model.remat}, scan_layers={config.model.scan_layers}, {segments} segment(s) a row")
    print(f"  tokens/s      {result['tokens_per_sec']:,.0f}")
    mfu = f"{100 * result['mfu']:.1f}% of {peak / 1e12:.0f} TF/s per device" if peak else "n/a (unknown peak FLOP/s)"
    print(f"  MFU           {mfu}")
    cache = jax.config.jax_compilation_cache_dir
    print(f"  step time     {1e3 * step_s:.1f} ms   compile {compile_s:.1f} s"
          + (f" (or a load from the compilation cache {cache})" if cache else ""))
    if mem:
      print(f"  peak memory   {result['peak_memory_gib']:.2f} GiB")
    elif memory_after.get("peak_bytes_in_use"):
      print(f"  peak memory   n/a: below this process's earlier peak ({memory_after['peak_bytes_in_use'] / 2**30:.2f} "
            "GiB, of a run or bench before it); bench in a fresh process for its own")
    else:
      print("  peak memory   n/a on this backend")
    print(f"  {FLOPS_FORMULA} = {fpt / 1e6:.1f} MFLOPs/token")
    if profile_dir:
      print(f"  profile of {steps} more steps in {profile_dir} (tensorboard --logdir {profile_dir}, Profile tab)")
  if json_path:
    with open(json_path, "w") as f:
      json.dump(result, f, indent=2)
  return result
