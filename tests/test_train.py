"""The train step: learning, golden loss, accumulation, NaN policy, shardings on 8 fake devices."""

import itertools
import logging
import math
import re
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from fmjax import bench, config_lib, metrics as metrics_lib, models, objectives, optim, report, sharding, train


def tiny(family, *overrides, devices=1):
  """A tiny config of `family`: gpt, bert, or llama (configs/gpt.py:tiny,llama with 2 key/value heads for 4)."""
  if family == "llama":
    return tiny("gpt.py:tiny,llama", "model.num_kv_heads=2", *overrides, devices=devices)
  spec = family if ":" in family else f"{family}.py:tiny"
  c = config_lib.load_config(f"configs/{spec}", [
      "model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.d_ff=128", "model.vocab_size=256",
      "data.seq_len=32", "data.max_predictions=6", "train.batch_size=8", "train.steps=100",
      "optim.warmup_steps=0", "optim.schedule=constant", f"mesh.data={devices}", *overrides])
  return c


def setup(config, devices=None):
  devices = devices or jax.devices()[: config.mesh.data * config.mesh.fsdp * config.mesh.tensor]
  mesh = sharding.make_mesh(config, devices)
  tx = optim.make_optimizer(config)
  spec = train.state_spec(config, mesh, tx)
  state = train.init_state(config, spec, tx)
  bs = sharding.batch_sharding(mesh)
  step, _ = train.compile_steps(config, spec, tx, bs)
  return spec, state, step, bs


def run_steps(config, n, batch=None, devices=None):
  spec, state, step, bs = setup(config, devices)
  host = batch if batch is not None else bench.synthetic_batch(config, seed=1)
  losses = []
  with jax.set_mesh(spec.mesh):
    b = jax.tree.map(lambda x: jax.device_put(x, bs), host)
    for _ in range(n):
      state, m = step(state, b)
      losses.append(float(m["loss"]))
  return state, losses


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_loss_falls_on_repeated_batch(family):
  _, losses = run_steps(tiny(family, "optim.lr=3e-3"), 25)
  assert losses[-1] < 0.5 * losses[0], losses


# Golden losses after one step from seed 0 (f32, CPU). If a deliberate change to the model,
# init or objective moves them, update these numbers in the same commit and say why.
GOLDEN = {"gpt": (5.5768, 5.4195), "bert": (5.5794, 5.3951)}


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_golden_loss(family):
  _, losses = run_steps(tiny(family, "optim.lr=1e-3"), 2)
  np.testing.assert_allclose(losses, GOLDEN[family], atol=2e-4, err_msg=f"{family}: {losses}")


# Adam's first steps are ~lr * sign(g): rounding-level gradient differences on near-zero entries
# would flip whole updates. A large eps makes the update linear in g, so parameters compare the
# gradients themselves.
LINEAR_ADAM = ("optim.eps=1.0", "optim.lr=1.0")


def test_grad_accumulation_matches_full_batch():
  one, l1 = run_steps(tiny("gpt", *LINEAR_ADAM), 2)
  two, l2 = run_steps(tiny("gpt", "train.grad_accum=2", *LINEAR_ADAM), 2)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(two["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_nonfinite_step_is_skipped_bitwise():
  config = tiny("gpt", "train.nan_policy=skip", "optim.schedule=linear", "optim.warmup_steps=10")
  spec, state, step, bs = setup(config)
  good = bench.synthetic_batch(config, seed=1)
  bad = dict(good, loss_weights=good["loss_weights"].copy())
  bad["loss_weights"][0, 0] = np.nan
  with jax.set_mesh(spec.mesh):
    state, _ = step(state, jax.tree.map(lambda x: jax.device_put(x, bs), good))
    before = jax.tree.map(np.asarray, {k: state[k] for k in ("params", "opt_state")})
    state, m = step(state, jax.tree.map(lambda x: jax.device_put(x, bs), bad))
  assert float(m["nonfinite"]) == 1.0 and int(state["step"]) == 2
  after = jax.tree.map(np.asarray, {k: state[k] for k in ("params", "opt_state")})
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  # The optimizer's schedule did not advance with the skipped update: the rate logged is the one applied.
  with jax.set_mesh(spec.mesh):
    _, m = step(state, jax.tree.map(lambda x: jax.device_put(x, bs), good))
  schedule = optim.make_schedule(config.optim, config.train.steps)
  assert float(m["lr"]) == pytest.approx(float(schedule(1))) != pytest.approx(float(schedule(2)))


def _with_scale(state, spec, scale):
  ls = dict(state["loss_scale"], scale=jax.device_put(np.float32(scale), spec.shardings["loss_scale"]["scale"]))
  return dict(state, loss_scale=ls)


def test_float16_skips_updates_whose_scaled_gradients_overflow_and_grows_the_scale_back(monkeypatch):
  """In float16 an update whose scaled gradients overflow is skipped, even under the default
  nan_policy=abort: params, Adam and its count stay bitwise, and the scale halves until they fit.
  `LOSS_SCALE_GROWTH` finite updates in a row double it again."""
  monkeypatch.setattr(train, "LOSS_SCALE_GROWTH", 3)
  config = tiny("gpt", "model.dtype=float16")
  assert config.train.nan_policy == "abort"
  spec, state, step, bs = setup(config)
  assert {k: float(v) for k, v in state["loss_scale"].items()} == {
      "scale": 2.0 ** 15, "finite_in_a_row": 0, "skipped": 0}
  state = _with_scale(state, spec, 2.0 ** 40)
  snapshot = lambda s: jax.tree.map(np.asarray, {k: s[k] for k in ("params", "opt_state")})
  before = snapshot(state)
  with jax.set_mesh(spec.mesh):
    b = jax.tree.map(lambda x: jax.device_put(x, bs), bench.synthetic_batch(config, seed=1))
    history = []
    for _ in range(40):
      scale = float(state["loss_scale"]["scale"])
      state, m = step(state, b)
      history.append((scale, int(m["overflow_skips"]), float(m["loss_scale"])))
      assert float(m["nonfinite"]) == 0.0 and np.isfinite(float(m["loss"]))
      if history[-1][1] == 1:
        assert float(m["loss_scale"]) == scale / 2 and int(state["step"]) == 1
        for a, c in zip(jax.tree.leaves(before), jax.tree.leaves(snapshot(state))):
          np.testing.assert_array_equal(a, c)
  overflows = [n > (history[i - 1][1] if i else 0) for i, (_, n, _) in enumerate(history)]
  assert overflows.index(False) > 10, history  # 2**40 overflowed for many halvings before the gradients fit
  assert int(train._updates_applied(state["opt_state"], state["step"])) == 40 - sum(overflows)
  # The rule, update by update: halve on an overflow, double after 3 finite updates in a row.
  in_a_row = 0
  for i, ((scale, _, after), overflow) in enumerate(zip(history, overflows)):
    in_a_row = 0 if overflow else in_a_row + 1
    want = scale / 2 if overflow else scale * 2 if in_a_row == 3 else scale
    in_a_row %= 3
    assert after == want, (i, history)
  assert any(after > scale for scale, _, after in history), history  # it grew, and overflowed again


def test_float16_loss_scaling_keeps_the_small_gradients_digits():
  """The float16 step with the default scale follows float32's update to 0.5% in every parameter;
  with the scale far below 1 the gradients lose digits below float16's smallest normal, and the
  same comparison is off by over 1% (so the scale is applied, and divided out again)."""
  def update(config, scale=None):
    spec, state, _, bs = setup(config)
    if scale is not None:
      state = _with_scale(state, spec, scale)
    start = jax.tree.map(np.asarray, state["params"])
    batch = jax.tree.map(lambda x: jax.device_put(x, bs), bench.synthetic_batch(config, seed=1))
    step = jax.jit(train.make_train_step(config, spec.graphdef, optim.make_optimizer(config)))
    # As a GPU rounds: XLA:CPU otherwise keeps some float16 results in float32.
    state, _ = step.lower(state, batch).compile({"xla_allow_excess_precision": False})(state, batch)
    return jax.tree.map(lambda new, old: np.asarray(new) - old, state["params"], start)

  want = update(tiny("gpt", *LINEAR_ADAM))
  worst = lambda got: max(jax.tree.leaves(jax.tree.map(lambda g, w: np.linalg.norm(g - w) / np.linalg.norm(w),
                                                          got, want)))
  assert worst(update(tiny("gpt", "model.dtype=float16", *LINEAR_ADAM))) < 0.005
  assert worst(update(tiny("gpt", "model.dtype=float16", *LINEAR_ADAM), 2.0 ** -4)) > 0.01


def test_weight_decay_mask():
  config = tiny("gpt")
  _, state, _, _ = setup(config)
  mask = optim.decay_mask(state["params"])
  flat = {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert any(flat.values()) and not all(flat.values())
  for name, decayed in flat.items():
    assert decayed == name.endswith("kernel"), name
  assert not flat["wte/embedding"] and not flat["h/blocks/0/attn/qkv/bias"] and flat["h/blocks/0/mlp/fc/kernel"]
  # An untied output layer is a projection, stored as a [V, D] table: it decays; the input table does not.
  _, state, _, _ = setup(tiny("gpt", "model.tie_embeddings=false"))
  flat = {"/".join(str(getattr(k, "key", k)) for k in p): v
          for p, v in jax.tree_util.tree_leaves_with_path(optim.decay_mask(state["params"]))}
  assert flat["lm_head/embedding"] and not flat["wte/embedding"]


# Per-device shard shapes for the tiny test GPT (D 64, H 4, K 16, F 128, V 256) under the
# default rules: embed -> fsdp, vocab/heads/mlp -> tensor.
SHARDS = {
    (8, 1, 1): {"wte/embedding": (256, 64), "h/blocks/0/mlp/fc/kernel": (64, 128),
                "h/blocks/0/attn/qkv/kernel": (64, 3, 4, 16)},
    (1, 8, 1): {"wte/embedding": (256, 8), "h/blocks/0/mlp/fc/kernel": (8, 128),
                "h/blocks/0/attn/qkv/kernel": (8, 3, 4, 16)},
    (2, 1, 4): {"wte/embedding": (64, 64), "h/blocks/0/mlp/fc/kernel": (64, 32),
                "h/blocks/0/attn/qkv/kernel": (64, 3, 1, 16), "h/blocks/0/mlp/proj/kernel": (32, 64)},
    (1, 4, 2): {"wte/embedding": (128, 16), "h/blocks/0/mlp/fc/kernel": (16, 64),
                "h/blocks/0/attn/qkv/kernel": (16, 3, 2, 16), "h/blocks/0/attn/out/kernel": (2, 16, 16)},
}


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("mesh", list(SHARDS))
def test_shard_shapes(mesh):
  d, f, t = mesh
  config = tiny("gpt", f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}")
  _, state, _, _ = setup(config)
  params = _flat(state["params"])
  for name, shape in SHARDS[mesh].items():
    assert params[name].addressable_shards[0].data.shape == shape, (mesh, name, params[name].sharding.spec)
  # Adam moments inherit the parameter shardings.
  mu = _flat(state["opt_state"])
  mu_leaf = next(v for k, v in mu.items() if k.endswith("mlp/fc/kernel"))
  assert mu_leaf.sharding.spec == params["h/blocks/0/mlp/fc/kernel"].sharding.spec


def test_batch_rows_split_over_every_data_parallel_axis():
  config = tiny("gpt", "mesh.dcn_data=2", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2")
  mesh = sharding.make_mesh(config, jax.devices()[:8])
  assert sharding.batch_sharding(mesh).shard_shape((8, 32)) == (2, 32)  # 2 x 2 ways; tensor devices share rows
  # The default rules split the activations' rows the same way.
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.logical_rules(config)):
    h_BTD = jax.jit(lambda x: models._constrain(x * 2, ("batch", "length", None)))(jnp.ones((8, 32, 4)))
  assert h_BTD.sharding.shard_shape(h_BTD.shape) == (2, 32, 4)


@pytest.mark.parametrize("family,mesh", [("gpt", (1, 4, 2)), ("bert", (2, 1, 4)), ("bert", (1, 8, 1))])
def test_sharded_step_matches_one_device(family, mesh):
  d, f, t = mesh
  _, ref = run_steps(tiny(family), 2)
  _, losses = run_steps(tiny(family, f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}"), 2)
  np.testing.assert_allclose(losses, ref, rtol=2e-5)


def test_grouped_query_attention_shards_its_key_value_heads_over_tensor_and_steps_as_on_one_device():
  """Llama with 2 key/value heads on fsdp=4 x tensor=2: the kv projection's heads split over tensor as the query
  heads do (the default rules' kv_heads), and two steps give one device's losses."""
  state, losses = run_steps(tiny("llama", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"), 2)
  params = _flat(state["params"])
  shards = {"h/blocks/0/attn/q/kernel": (16, 2, 16), "h/blocks/0/attn/kv/kernel": (16, 2, 1, 16),
            "h/blocks/0/mlp/fc/kernel": (16, 2, 64), "lm_head/embedding": (128, 16), "wte/embedding": (128, 16)}
  for name, shape in shards.items():
    assert params[name].addressable_shards[0].data.shape == shape, (name, params[name].sharding.spec)
  _, ref = run_steps(tiny("llama"), 2)
  np.testing.assert_allclose(losses, ref, rtol=2e-5)


_COLLECTIVE = re.compile(r"= (\S+) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\(")


def _loop_bodies_and_collectives(hlo: str):
  """{computation: [(op, result type)]} of the collectives in each, and the while-loop bodies."""
  found, bodies, name = {}, set(), None
  for line in hlo.splitlines():
    head = re.match(r"(?:ENTRY )?%(\S+) \(", line)
    if head and line.rstrip().endswith("{"):
      name = head.group(1)
    bodies.update(re.findall(r"while\(.*body=%([\w.\-]+)", line))
    if (m := _COLLECTIVE.search(line)):
      found.setdefault(name, []).append((m.group(2), m.group(1)))
  return bodies, found


@pytest.mark.parametrize("mesh,bias", [((1, 4, 2), False), ((8, 1, 1), True), ((2, 1, 4), True)])
def test_fused_loss_runs_each_devices_rows_alone_on_a_mesh(mesh, bias):
  """On 8 devices the chunked head loops over each device's own rows: no collective inside the loop, none
  moves the hidden states, and loss and gradients equal one device's (data, fsdp and tensor axes)."""
  B, T, D, V, chunk = 16, 32, 32, 300, 16  # 64 rows a device at most: several chunks
  rng = np.random.default_rng(0)
  x, w, b = (jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in ((B, T, D), (V, D), (V,)))
  t, wt = rng.integers(0, V, (B, T)), jnp.asarray(rng.random((B, T)) > 0.2, jnp.float32)

  def mean_loss(x, w, b):
    loss, weight, _ = objectives.fused_cross_entropy(x, w, b if bias else None, t, wt, chunk)
    return loss / weight

  grad = jax.value_and_grad(mean_loss, argnums=(0, 1, 2))
  want = grad(x, w, b)
  d, f, tp = mesh
  config = tiny("gpt", f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={tp}")
  m = sharding.make_mesh(config, jax.devices()[:8])
  with jax.set_mesh(m), nnx.logical_axis_rules(config.logical_axis_rules):
    rows = NamedSharding(m, P(("dcn_data", "data", "fsdp")))
    args = (jax.device_put(x, rows), jax.device_put(w, NamedSharding(m, P("tensor", "fsdp"))), b)
    compiled = jax.jit(grad).lower(*args).compile()
    got = compiled(*args)
  for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=2e-5, atol=1e-6)
  bodies, found = _loop_bodies_and_collectives(compiled.as_text())
  assert bodies, "the chunked loop is gone: the test no longer covers it"
  assert not [c for body in bodies for c in found.get(body, [])]
  gathered = [shape for ops in found.values() for op, shape in ops if op == "all-gather"]
  size = lambda shape: math.prod(int(n) for n in re.findall(r"\d+", shape.split("{")[0].split("[")[1]))
  assert all(size(s) <= V * D for s in gathered), gathered  # the head's weight, never the B*T*D hidden states


@pytest.mark.parametrize("family,chunk,more", [
    ("gpt", 48, ()), ("bert", 20, ()), ("bert", 4096, ()),
    ("llama", 20, ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")),  # its own head, sharded over tensor
    ("gpt", 20, ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.grad_accum=2")),
    ("bert", 20, ("mesh.data=1", "mesh.fsdp=8"))])
def test_fused_loss_matches_full_logits(family, chunk, more):
  """The chunked LM-head loss (a fast path) gives the reference loss and the same update: GPT's
  tied head, BERT's tied decoder with its bias, Llama's untied head, in several chunks (the last padded)
  or one, and on meshes where each device loops over its own rows."""
  ref_state, ref = run_steps(tiny(family, *LINEAR_ADAM), 2)
  state, fused = run_steps(tiny(family, f"model.fused_loss_chunk={chunk}", *more, *LINEAR_ADAM), 2)
  np.testing.assert_allclose(fused, ref, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(ref_state["params"]), jax.tree.leaves(state["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_bf16_first_moment_halves_its_memory_and_tracks_float32():
  """optim.mu_dtype=bfloat16: mu is stored in bf16, nu stays float32, and training follows the float32 run."""
  state, losses = run_steps(tiny("gpt", "optim.lr=3e-3", "optim.mu_dtype=bfloat16"), 10)
  _, want = run_steps(tiny("gpt", "optim.lr=3e-3"), 10)
  is_adam = lambda x: hasattr(x, "mu") and hasattr(x, "nu")
  (adam,) = [x for x in jax.tree.leaves(state["opt_state"], is_leaf=is_adam) if is_adam(x)]
  assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
  assert losses[-1] < losses[0] - 0.5
  np.testing.assert_allclose(losses, want, rtol=2e-2)
  with pytest.raises(config_lib.ConfigError, match="optim.mu_dtype"):
    tiny("gpt", "optim.mu_dtype=float16")


@pytest.mark.parametrize("family,overrides", [
    ("gpt", ()), ("bert", ()), ("gpt", ("model.scan_layers=true", "model.remat=dots_no_batch")),
    ("gpt", ("model.attention=auto",)),  # "auto" resolves when traced for the GPU, not on this host
    ("gpt", ("model.dtype=float16",)),  # with its loss scale
    ("llama", ("model.scan_layers=true",))])  # rotary positions and grouped-query attention, which cuDNN takes
def test_train_step_lowers_for_cuda_with_cudnn_attention(family, overrides, as_if_on_an_h100):
  """The whole bf16 (or float16) train step with model.attention=cudnn lowers for CUDA on packed
  rows, unrolled or scanned with remat (what runs on an H100; checked for real by the GPU tests):
  cuDNN's packed layout when the batch carries the runs of its segment ids, else the mask."""
  h100 = as_if_on_an_h100
  config = tiny(family, "model.dtype=bfloat16", "model.attention=cudnn", *overrides)
  spec, state, step, bs = setup(config)
  with jax.set_mesh(spec.mesh):
    batch = jax.tree.map(lambda x: jax.device_put(x, bs), bench.synthetic_batch(config, segments=2))
    assert "segment_lengths" in batch and h100.cudnn_calls(step.trace(state, batch)) == h100.PACKED
    ids_only = {k: v for k, v in batch.items() if k not in ("segment_lengths", "segment_offsets")}
    assert h100.cudnn_calls(step.trace(state, ids_only)) == h100.MASKED


def test_a_model_vocabulary_far_above_the_tokenizers_is_a_warning():
  # A tokenizer of 32000 ids under GPT-2's 50304 rows: 18304 rows no id reaches.
  big = tiny("gpt", "model.vocab_size=50304")
  assert train._unused_vocab_note(big, 32000) == (
      "model.vocab_size=50304 leaves 18304 rows no token id uses (the tokenizer has 32000 ids): they cost compute "
      "and start the loss 0.45 nats higher; set model.vocab_size=32000 (a multiple of 128)")
  assert train._unused_vocab_note(big, 50257) == ""  # GPT-2's own, padded to a multiple of 128


def test_schedule_notes_for_a_warmup_longer_than_the_run_and_a_resume_that_moves_the_rate():
  config = tiny("gpt", "train.steps=20", "optim.warmup_steps=50")
  assert "optim.warmup_steps=50 is not below train.steps=20: the rate never reaches" in train._short_warmup_note(config)
  assert train._short_warmup_note(tiny("gpt", "train.steps=20", "optim.warmup_steps=2")) == ""
  for size in ("tiny", "small"):  # runlocal runs reach their rate and decay
    local = config_lib.load_config(f"configs/gpt.py:{size},runlocal")
    assert train._short_warmup_note(local) == "" and local.optim.warmup_steps < local.train.steps
  cosine = ("optim.schedule=cosine", "optim.warmup_steps=2")
  saved = config_lib.to_dict(tiny("gpt", "train.steps=20", *cosine))
  assert train._rate_change(saved, tiny("gpt", "train.steps=20", *cosine), 10) == ""
  longer = train._rate_change(saved, tiny("gpt", "train.steps=40", *cosine), 10)
  assert longer.startswith("the learning rate at step 10 is now") and "train.steps=40" in longer
  # wsd: a run extended in its stable part goes on at the same rate; once its decay began, it jumps back up.
  wsd = ("optim.schedule=wsd", "optim.warmup_steps=2", "optim.decay_fraction=0.2")
  saved = config_lib.to_dict(tiny("gpt", "train.steps=20", *wsd))
  assert train._rate_change(saved, tiny("gpt", "train.steps=40", *wsd), 15) == ""
  assert train._rate_change(saved, tiny("gpt", "train.steps=40", *wsd), 17).startswith("the learning rate at step 17")


def _numpy_cross_entropy(logits, targets, weights):
  """(summed nll, weight, correct) and d(nll sum / weight)/d logits, in float64."""
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  probs = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
  nll = -np.log(np.take_along_axis(probs, targets[..., None], -1)[..., 0])
  correct = logits.argmax(-1) == targets
  onehot = np.eye(logits.shape[-1])[targets]
  sums = ((nll * weights).sum(), weights.sum(), (correct * weights).sum())
  return sums, (probs - onehot) * weights[..., None] / weights.sum()


def test_losses_and_fused_head_weight_each_target_against_numpy():
  """cross_entropy and the fused LM head sum loss and correct predictions by weight (zero and fractional
  weights, and a last chunk padded), and the fused head's gradients scale with the incoming cotangent."""
  rng = np.random.default_rng(0)
  h_BXD, w_VD, b_V = (rng.normal(size=s).astype(np.float32) for s in ((2, 5, 8), (11, 8), (11,)))
  logits_BXV = h_BXD @ w_VD.T + b_V
  targets_BX = np.where(np.arange(5) % 2 == 0, logits_BXV.argmax(-1), rng.integers(0, 11, (2, 5))).astype(np.int32)
  weights_BX = np.array([[1, 0, 1, 0.5, 0], [0, 1, 1, 1, 0.25]], np.float32)
  want, dlogits_BXV = _numpy_cross_entropy(logits_BXV, targets_BX, weights_BX)
  assert want[2] not in (0.0, float((logits_BXV.argmax(-1) == targets_BX).sum()))
  np.testing.assert_allclose(objectives.cross_entropy(jnp.asarray(logits_BXV), targets_BX, weights_BX), want, rtol=1e-5)
  fused = lambda h, w, b: objectives.fused_cross_entropy(h, w, b, targets_BX, weights_BX, chunk=4)
  np.testing.assert_allclose(fused(h_BXD, w_VD, b_V), want, rtol=1e-5)
  mean_loss = lambda h, w, b: (lambda loss, weight, _: loss / weight)(*fused(h, w, b))
  dh, dw, db = jax.grad(mean_loss, argnums=(0, 1, 2))(h_BXD, w_VD, b_V)
  np.testing.assert_allclose(dh, dlogits_BXV @ w_VD, atol=1e-5)
  np.testing.assert_allclose(dw, dlogits_BXV.reshape(-1, 11).T @ h_BXD.reshape(-1, 8), atol=1e-5)
  np.testing.assert_allclose(db, dlogits_BXV.sum((0, 1)), atol=1e-5)


def test_bf16_fused_head_keeps_float32_logits_whatever_their_offset():
  """In bf16 the fused head's logits stay float32, as the full-logits path's are: a row shifted far
  from 0 (a trained tied head's can be) loses nothing to rounding. Rounded to bf16 at -80, the mean
  loss was 0.013 nats high and both gradients 3.3% off the float32 ones (now 2e-5 and 0.3%)."""
  N, D, V, offset = 1024, 64, 2048, -80.0
  rng = np.random.default_rng(0)
  h_ND = rng.normal(size=(N, D)).astype(np.float32)
  w_VD = (rng.normal(size=(V, D)) * 3 / np.sqrt(D)).astype(np.float32)
  h_ND[:, 0], w_VD[:, 0] = offset, 1.0  # every logit of a row shifted by exactly `offset` (bf16-exact inputs)
  targets_N = np.asarray(jax.random.categorical(jax.random.key(0), jnp.asarray(h_ND @ w_VD.T)), np.int32)
  weights_N = np.ones(N, np.float32)

  def loss_and_grads(h, w):
    loss = lambda h, w: objectives.fused_lm_head_loss(h, w, None, targets_N, weights_N, 256)[0]
    return jax.value_and_grad(loss, argnums=(0, 1))(h, w)

  want, (want_dh, want_dw) = jax.jit(loss_and_grads)(h_ND, w_VD)
  h16 = jnp.asarray(h_ND, jnp.bfloat16)
  # Without excess precision XLA:CPU rounds every bf16 result as a GPU's bf16 matmul writes it (by
  # default it drops a round trip through bf16 to float32 and back, and would hide the rounding).
  compiled = jax.jit(loss_and_grads).lower(h16, w_VD).compile({"xla_allow_excess_precision": False})
  got, (dh, dw) = compiled(h16, w_VD)
  rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float32) - b) / np.linalg.norm(b))
  assert abs(float(got - want)) / N < 1e-3
  assert rel(dh, want_dh) < 0.01 and rel(dw, want_dw) < 0.01, (rel(dh, want_dh), rel(dw, want_dw))


def test_float16_fused_head_takes_a_cotangent_that_is_no_power_of_two_unrounded():
  """float16's loss scale reaches the trunk as the fused head's cotangent, scale / positions (2**15 / 384
  here). Multiplied in float16 it was rounded first, and every trunk gradient came out 2.3e-4 low
  against the head's once the exact scale was divided out again."""
  rng = np.random.default_rng(0)
  h_ND = jnp.asarray(rng.normal(size=(256, 32)), jnp.float16)
  w_VD = jnp.asarray(rng.normal(size=(50, 32)) * 0.1, jnp.float32)
  targets_N, weights_N = jnp.asarray(rng.integers(0, 50, 256), jnp.int32), jnp.ones(256, jnp.float32)
  scaled = lambda h, w, c: objectives.fused_lm_head_loss(h, w, None, targets_N, weights_N, 64)[0] * c
  c = np.float32(2.0 ** 15 / 384)
  (dh1, dw1), (dh, dw) = (jax.grad(scaled, argnums=(0, 1))(h_ND, w_VD, x) for x in (1.0, c))
  want = np.asarray(dh1, np.float32) * c
  assert abs(np.sum(np.asarray(dh, np.float32) * want) / np.sum(want * want) - 1) < 2e-5
  np.testing.assert_allclose(dw, np.asarray(dw1) * c, rtol=1e-6)


@pytest.mark.parametrize("fused_chunk", [0, 16])
def test_clm_loss_of_a_packed_row_is_the_sum_over_its_documents_alone(fused_chunk):
  """Two documents packed into one row (positions restarting at the second) score as each would
  in a row of its own: no position, segment or attention leaks between them."""
  config = tiny("gpt")
  model = models.build_model(config.model, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  inputs, targets = (rng.integers(0, 256, 32).astype(np.int32) for _ in range(2))
  first = np.arange(32) < 12
  packed = {"inputs": inputs[None], "targets": targets[None], "segment_ids": np.where(first, 1, 2)[None],
            "positions": np.where(first, np.arange(32), np.arange(32) - 12)[None], "loss_weights": np.ones((1, 32))}
  alone = {k: np.zeros((2, 32), v.dtype) for k, v in packed.items()}
  for row, (start, n) in enumerate(((0, 12), (12, 20))):
    for k in ("inputs", "targets"):
      alone[k][row, :n] = packed[k][0, start:start + n]
    alone["segment_ids"][row, :n], alone["positions"][row, :n], alone["loss_weights"][row, :n] = 1, np.arange(n), 1
  loss = lambda batch: objectives.clm_loss(model, {k: jnp.asarray(v) for k, v in batch.items()},
                                           fused_chunk=fused_chunk)[1]
  got, want = loss(packed), loss(alone)
  assert float(want["weight_sum"]) == float(got["weight_sum"]) == 32
  np.testing.assert_allclose(float(got["loss_sum"]), float(want["loss_sum"]), rtol=1e-5)


@pytest.mark.parametrize("fused_chunk", [0, 4])
def test_mlm_loss_reads_the_token_types_positions_and_weights_of_its_batch(fused_chunk):
  config = tiny("bert")
  model = models.build_model(config.model, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, 256, (2, 32)), "token_types": (np.arange(32) >= 10)[None].repeat(2, 0),
           "segment_ids": np.where(np.arange(32) < 20, 1, 2)[None].repeat(2, 0),
           "positions": np.where(np.arange(32) < 20, np.arange(32), np.arange(32) - 20)[None].repeat(2, 0),
           "mlm_positions": np.array([[1, 11, 25], [3, 15, 0]]), "mlm_targets": rng.integers(0, 256, (2, 3)),
           "mlm_weights": np.array([[1, 1, 1], [1, 1, 0]], np.float32)}
  batch = {k: jnp.asarray(v, jnp.float32 if k == "mlm_weights" else jnp.int32) for k, v in batch.items()}
  logits_BMV = model(batch["inputs"], token_types_BT=batch["token_types"], positions_BT=batch["positions"],
                     segment_ids_BT=batch["segment_ids"], mlm_positions_BM=batch["mlm_positions"])
  want, _ = _numpy_cross_entropy(np.asarray(logits_BMV), np.asarray(batch["mlm_targets"]),
                                 np.asarray(batch["mlm_weights"]))
  _, aux = objectives.mlm_loss(model, batch, fused_chunk=fused_chunk)
  np.testing.assert_allclose([float(aux[k]) for k in ("loss_sum", "weight_sum", "correct_sum")], want, rtol=1e-5)


def test_optimizer_clips_then_runs_adamw_decaying_kernels_only_against_numpy():
  config = tiny("gpt", "optim.lr=0.1", "optim.b1=0.8", "optim.b2=0.9", "optim.eps=1e-3", "optim.weight_decay=0.5",
                "optim.clip_norm=1.0")
  tx = optim.make_optimizer(config)
  rng = np.random.default_rng(0)
  params = {"fc": {"kernel": rng.normal(size=(3, 2)), "bias": rng.normal(size=2)}, "ln": {"scale": np.ones(2)},
            "wte": {"embedding": rng.normal(size=(2, 2))}}
  params = jax.tree.map(lambda x: x.astype(np.float32), params)
  # Global norms 5 (clipped to 1), 0.3 and 3 (clipped).
  grads = [jax.tree.map(lambda x: (x * n / np.sqrt(14.0)).astype(np.float32), jax.tree.map(np.ones_like, params))
           for n in (5.0, 0.3, 3.0)]
  grads[1]["fc"]["bias"] = -grads[1]["fc"]["bias"]
  update = jax.jit(tx.update)
  state, got = tx.init(params), params
  want = jax.tree.map(np.float64, params)
  m = v = jax.tree.map(np.zeros_like, want)
  for t, g in enumerate(grads, 1):
    updates, state = update(g, state, got)
    got = optax.apply_updates(got, updates)
    norm = np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(g)))
    g = jax.tree.map(lambda x: np.float64(x) * min(1.0, 1.0 / norm), g)
    m = jax.tree.map(lambda m, g: 0.8 * m + 0.2 * g, m, g)
    v = jax.tree.map(lambda v, g: 0.9 * v + 0.1 * g * g, v, g)
    adam = jax.tree.map(lambda m, v: (m / (1 - 0.8 ** t)) / (np.sqrt(v / (1 - 0.9 ** t)) + 1e-3), m, v)
    want = {k: {n: want[k][n] - 0.1 * (adam[k][n] + 0.5 * want[k][n] * (n == "kernel")) for n in want[k]}
            for k in want}
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["cosine", "linear", "rsqrt", "constant", "wsd"])
def test_schedule_warms_up_from_zero_then_decays_to_the_floor_at_the_last_step(kind):
  config = tiny("gpt", f"optim.schedule={kind}", "optim.lr=2.0", "optim.warmup_steps=4", "optim.min_lr_ratio=0.1")
  schedule = optim.make_schedule(config.optim, 20)

  def want(s):
    if s < 4:
      return 2.0 * s / 4
    done = min((s - 4) / 16, 1.0)
    return 2.0 * {"cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)), "linear": 1 - 0.9 * done,
                  "rsqrt": math.sqrt(4 / s), "constant": 1.0,
                  "wsd": 1 - 0.9 * min(max(s - 16, 0) / 4, 1.0)}[kind]  # the last 20% of 20 steps decay

  for s in range(24):
    assert float(schedule(s)) == pytest.approx(want(s), rel=1e-5, abs=1e-7), s


def test_grad_accumulation_averages_over_targets_when_micro_batches_carry_different_numbers():
  config = tiny("gpt", *LINEAR_ADAM)
  batch = bench.synthetic_batch(config, seed=1)
  batch["loss_weights"][1::2, 8:] = 0.0  # the second of two micro-batches (odd rows) has a quarter of the targets
  one, l1 = run_steps(config, 2, batch)
  two, l2 = run_steps(tiny("gpt", "train.grad_accum=2", *LINEAR_ADAM), 2, batch)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(two["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_every_dropout_of_every_micro_batch_and_step_draws_its_own_mask(monkeypatch):
  """Two steps of two micro-batches, each forward pass with five dropouts (embeddings, two a layer): 20 keys."""
  keys = []
  real = models._dropout

  def recording(x, rate, key, deterministic):
    jax.debug.callback(lambda k: keys.append(np.asarray(k).tobytes()), jax.random.key_data(key))
    return real(x, rate, key, deterministic)

  monkeypatch.setattr(models, "_dropout", recording)
  config = tiny("gpt", "model.dropout=0.1", "train.grad_accum=2")
  spec, state, _, bs = setup(config)
  step_fn = jax.jit(train.make_train_step(config, spec.graphdef, optim.make_optimizer(config)))
  with jax.set_mesh(spec.mesh):
    batch = jax.tree.map(lambda x: jax.device_put(x, bs), bench.synthetic_batch(config, seed=1))
    for step in (0, 1):
      jax.block_until_ready(step_fn(dict(state, step=jnp.asarray(step, jnp.int32)), batch))
  jax.effects_barrier()
  assert len(keys) == 2 * 2 * 5 and len(set(keys)) == len(keys)


def test_evaluate_averages_over_every_target_of_the_batches_it_reads():
  aux = [{"loss_sum": 6.0, "weight_sum": 2.0, "correct_sum": 1.0},
         {"loss_sum": 1.0, "weight_sum": 8.0, "correct_sum": 4.0},
         {"loss_sum": 9.0, "weight_sum": 1.0, "correct_sum": 1.0}]  # past the loader's last batch: never read
  loader = types.SimpleNamespace(num_batches=2, global_batch=lambda step: step)
  got = train.evaluate(lambda params, step: aux[step], None, loader, 5)
  assert got == pytest.approx({"loss": 0.7, "perplexity": math.exp(0.7), "accuracy": 0.5})


class _NoSaves:
  """What the step loop asks of a Checkpointer, saving nothing."""

  def should_save(self, step):
    return False

  def save(self, *args, **kwargs):
    return False

  def wait(self):
    pass

  def latest_step(self):
    return None

  def all_steps(self):
    return []


def test_loop_logs_throughput_mfu_and_eta_by_a_clock_of_one_second_an_update(tmp_path, monkeypatch):
  """Logged every 2 updates of 1 s each: tokens/s is a step's tokens, MFU that times the FLOPs per token over
  every device's peak, and the ETA the steps left at the pace so far."""
  clock = [0.0]
  fake_time = types.SimpleNamespace(time=lambda: clock[0], strftime=time.strftime, gmtime=time.gmtime)
  monkeypatch.setattr(train, "time", fake_time)
  monkeypatch.setattr(metrics_lib, "time", fake_time)
  monkeypatch.setattr(metrics_lib, "peak_flops_per_device", lambda: 1e12)

  def train_step(state, batch):
    clock[0] += 1.0
    return {"step": state["step"] + 1}, {"loss": 1.0, "nonfinite": 0.0}

  config = tiny("gpt", "train.steps=6", "train.log_every=2", "train.progress_bar=false")
  train.loop(config, {"step": 0}, itertools.repeat({}), train_step, checkpointer=_NoSaves(), workdir=str(tmp_path),
             meta=lambda step: {}, evaluate=None, eval_message=str, flops_per_token=100.0)
  rows = {r["step"]: r for r in report.read_metrics(str(tmp_path))}
  tokens = config.train.batch_size * config.data.seq_len
  assert sorted(rows) == [2, 4, 6] and rows[4]["train/tokens_per_sec"] == tokens
  assert rows[4]["train/mfu"] == pytest.approx(tokens * 100.0 / (1e12 * jax.device_count()))
  writer = metrics_lib.MetricsWriter(str(tmp_path / "eta"), 100, start_step=20, progress_bar=False)
  clock[0] += 10.0
  assert writer.eta_seconds(30) == pytest.approx(70.0)  # 10 steps in 10 s, 70 to go
  writer.close()


def test_eta_is_paced_by_the_updates_after_the_compiling_one_and_counts_days(tmp_path, monkeypatch):
  """The log line's ETA: the first update (which compiles: 100 s here, then 1 s an update) sets no pace,
  as for tokens/s, and a run with days to go says so rather than a time of day that wrapped."""
  clock = [0.0]
  fake_time = types.SimpleNamespace(time=lambda: clock[0], strftime=time.strftime, gmtime=time.gmtime)
  monkeypatch.setattr(train, "time", fake_time)
  monkeypatch.setattr(metrics_lib, "time", fake_time)
  lines = []
  handler = logging.Handler()
  handler.emit = lambda record: lines.append(record.getMessage())
  metrics_lib.log.addHandler(handler)
  level = metrics_lib.log.level
  metrics_lib.log.setLevel(logging.INFO)

  def train_step(state, batch):
    clock[0] += 100.0 if int(state["step"]) == 0 else 1.0
    return {"step": state["step"] + 1}, {"loss": 1.0, "nonfinite": 0.0}

  try:
    config = tiny("gpt", "train.steps=6", "train.log_every=2", "train.progress_bar=false")
    train.loop(config, {"step": 0}, itertools.repeat({}), train_step, checkpointer=_NoSaves(),
               workdir=str(tmp_path / "run"), meta=lambda step: {}, evaluate=None, eval_message=str)
    etas = [line.split("ETA ")[1] for line in lines if line.startswith("step ") and "ETA" in line]
    assert etas == ["00:00:04", "00:00:02", "00:00:00"]  # 1 s an update (it said 00:03:24 at step 2)
    writer = metrics_lib.MetricsWriter(str(tmp_path / "long"), 200_000, progress_bar=False)
    clock[0] += 10.0
    writer.progress(10, {"loss": 1.0})  # 1 s a step, 199,990 to go
    writer.close()
    assert lines[-1].endswith("ETA 2d 07:33:10"), lines[-1]
  finally:
    metrics_lib.log.removeHandler(handler)
    metrics_lib.log.setLevel(level)


def test_between_evals_and_saves_the_loop_reads_only_metrics_and_compiles_the_step_once(tmp_path, monkeypatch):
  """On a GPU or TPU a read of a device value (`float`, `int`, `np.asarray`) waits for the device, which then
  idles until the host queues the next update. The loop reads each update's metrics once, with one
  `jax.device_get` made after the next update is queued (logging steps included), and nothing else but at
  evals and saves; neither an eval, a save nor the last update compiles the step again.

  `jax.transfer_guard_device_to_host` guards nothing on the CPU, so reads are caught where each one is made:
  a jax.Array's host value."""
  import threading
  from jax._src import array as jax_array
  from fmjax import checkpoint as ckpt_lib
  config = tiny("gpt", "train.steps=9", "train.log_every=2", "train.eval_every=4", "train.progress_bar=false",
                devices=2)
  mesh = sharding.make_mesh(config, jax.devices()[:2])
  tx = optim.make_optimizer(config)
  spec = train.state_spec(config, mesh, tx)
  bs = sharding.batch_sharding(mesh)
  train_step, eval_step = train.compile_steps(config, spec, tx, bs)
  phase, reads, updates, metric_reads = [], [], [], []

  def during(name, fn):
    def wrapped(*args, **kwargs):
      phase.append(name)
      try:
        return fn(*args, **kwargs)
      finally:
        phase.pop()
    return wrapped

  host_value = jax_array.ArrayImpl._value

  def read(x):
    if threading.current_thread() is threading.main_thread():
      reads.append((len(updates), phase[-1] if phase else "loop" if updates else "start"))
    return host_value.fget(x)

  def queue(state, batch):
    updates.append(len(updates) + 1)  # the update queued
    return train_step(state, batch)

  real_to_host = train._to_host

  def to_host(metrics):
    metric_reads.append(len(updates))
    return real_to_host(metrics)

  monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(read))
  monkeypatch.setattr(train, "_to_host", during("metrics", to_host))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), every_steps=6)
  monkeypatch.setattr(checkpointer, "save", during("save", checkpointer.save))
  with jax.set_mesh(mesh):
    batch = jax.device_put(bench.synthetic_batch(config, seed=1), bs)
    loader = types.SimpleNamespace(num_batches=2, global_batch=lambda step: batch)
    try:
      train.loop(config, train.init_state(config, spec, tx), itertools.repeat(batch), during("step", queue),
                 checkpointer=checkpointer, workdir=str(tmp_path), meta=lambda step: {}, eval_message=str,
                 evaluate=during("eval", lambda params: train.evaluate(eval_step, params, loader, 2)))
    finally:
      checkpointer.close()
  assert checkpointer.all_steps() == [6, 9] and {where for _, where in reads} >= {"metrics", "eval"}
  # The first update compiles: jit lowers the step's constants (the dropout key) from their device values.
  stray = [(n, where) for n, where in reads if where not in ("metrics", "eval", "save")]
  assert set(stray) <= {(0, "start"), (1, "step")}, f"(update queued, where) of reads outside metrics: {stray}"
  # Update n's metrics are read once, once update n + 1 is queued (or before its state is evaluated or saved).
  assert metric_reads == [2, 3, 4, 4, 6, 6, 8, 8, 9], metric_reads
  assert train_step._cache_size() == 1 and eval_step._cache_size() == 1


def test_a_fresh_start_refuses_a_workdir_whose_config_json_is_another_programs(tmp_path, monkeypatch):
  """A Hugging Face model directory passed as --workdir: its config.json was overwritten by the run's."""
  monkeypatch.setattr(train.sharding, "make_mesh", lambda *a: pytest.fail("started before refusing the workdir"))
  hf = tmp_path / "gpt2"
  hf.mkdir()
  (hf / "config.json").write_text('{"model_type": "gpt2", "n_layer": 12}')
  with pytest.raises(config_lib.ConfigError, match=f"{hf}/config.json is not an fmjax run's .*pass a new --workdir"):
    train.run(tiny("gpt", devices=jax.device_count()), str(hf))
  assert (hf / "config.json").read_text() == '{"model_type": "gpt2", "n_layer": 12}'
  assert sorted(p.name for p in hf.iterdir()) == ["config.json"]


def test_a_start_stopped_once_it_holds_the_workdir_lets_the_workdir_go(tmp_path, monkeypatch):
  """A notebook keeps the last exception, and with it the frames of the start it stopped: the workdir's
  lock must not stay held by them, or this process's next run there is refused as another process's."""
  from fmjax import checkpoint as ckpt_lib

  def ctrl_c(*args):
    raise KeyboardInterrupt
  monkeypatch.setattr(ckpt_lib.Checkpointer, "of_run", ctrl_c)  # Ctrl-C while the checkpoints open
  workdir = tmp_path / "run"
  workdir.mkdir()
  with pytest.raises(KeyboardInterrupt) as kept:
    train.run(tiny("gpt", f"data.cache_dir={tmp_path / 'cache'}", devices=jax.device_count()), str(workdir))
  ckpt_lib.lock_workdir(str(workdir)).release()  # "another fmjax process is training" while the lock is held
  assert kept.value is not None
