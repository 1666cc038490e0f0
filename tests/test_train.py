"""The train step: learning, golden loss, accumulation, NaN policy, shardings on 8 fake devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import bench, config_lib, optim, sharding, train


def tiny(family, *overrides, devices=1):
  c = config_lib.load_config(f"configs/{family}.py:tiny", [
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


def test_weight_decay_mask():
  config = tiny("gpt")
  _, state, _, _ = setup(config)
  mask = optim.decay_mask(state["params"])
  flat = {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert any(flat.values()) and not all(flat.values())
  for name, decayed in flat.items():
    assert decayed == name.endswith("kernel"), name
  assert not flat["wte/embedding"] and not flat["h/blocks/0/attn/qkv/bias"] and flat["h/blocks/0/mlp/fc/kernel"]


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


@pytest.mark.parametrize("family,mesh", [("gpt", (1, 4, 2)), ("bert", (2, 1, 4)), ("bert", (1, 8, 1))])
def test_sharded_step_matches_one_device(family, mesh):
  d, f, t = mesh
  _, ref = run_steps(tiny(family), 2)
  _, losses = run_steps(tiny(family, f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}"), 2)
  np.testing.assert_allclose(losses, ref, rtol=2e-5)


@pytest.mark.parametrize("family,chunk", [("gpt", 48), ("bert", 20), ("bert", 4096)])
def test_fused_loss_matches_full_logits(family, chunk):
  """The chunked LM-head loss (a fast path) gives the reference loss and the same update: GPT's
  tied head, BERT's tied decoder with its bias, in several chunks (the last padded) or one."""
  ref_state, ref = run_steps(tiny(family, *LINEAR_ADAM), 2)
  state, fused = run_steps(tiny(family, f"model.fused_loss_chunk={chunk}", *LINEAR_ADAM), 2)
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
    ("gpt", ("model.attention=auto",))])  # "auto" resolves when traced for the GPU, not on this host
def test_train_step_lowers_for_cuda_with_cudnn_attention(family, overrides, as_if_on_an_h100):
  """The whole bf16 train step with model.attention=cudnn lowers for CUDA on packed rows,
  unrolled or scanned with remat (what runs on an H100; checked for real by the GPU tests):
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
