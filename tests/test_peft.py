"""PEFT: LoRA merge equals the unmerged forward, frozen parameters stay bitwise fixed, counts, bad targets."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fmjax import config_lib, finetune, models, optim, peft, sharding, train
from fmjax.config_lib import ConfigError

C = 3  # classes


# A GPT with Llama's architecture and one key/value head for its two query heads: q and kv, no fused qkv.
LLAMA = ("model.positions=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.use_bias=false",
         "model.tie_embeddings=false", "model.num_kv_heads=1")


def tiny(family="bert", *overrides):
  if family == "llama":
    return tiny("gpt", *LLAMA, *overrides)
  return config_lib.load_config(f"configs/finetune_cls.py:task=pydoc_family,model={family}", [
      "model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.d_ff=64", "model.vocab_size=128",
      "model.max_len=32", "model.dropout=0.0", "data.seq_len=16", "train.batch_size=8", "mesh.data=1",
      "optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=1e-2", *overrides])


def batch(seed=0, B=8, T=16):
  rng = np.random.default_rng(seed)
  seg = (np.arange(T)[None] < rng.integers(4, T + 1, size=(B, 1))).astype(np.int32)
  return {"inputs": (rng.integers(5, 128, size=(B, T)) * seg).astype(np.int32),
          "token_types": (np.arange(T)[None] >= T // 2).astype(np.int32) * seg,
          "segment_ids": seg, "labels": rng.integers(0, C, size=(B,)).astype(np.float32),
          "weights": np.ones((B,), np.float32)}


def logits(model, b):
  return np.asarray(model(jnp.asarray(b["inputs"]), token_types_BT=jnp.asarray(b["token_types"]),
                          segment_ids_BT=jnp.asarray(b["segment_ids"])))


def params_of(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def load(model, params):
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model


@pytest.mark.parametrize("family", ["bert", "gpt", "llama"])
def test_lora_merge_equals_unmerged_forward(family):
  # mlp.fc goes through Dense.__call__; qkv through the fused einsum's hook: both must merge exactly. In
  # grouped-query attention `qkv` names the two projections that are there, q and kv.
  targets = "finetune.lora_targets=('qkv', 'out', 'mlp.fc')"
  config = tiny(family, "finetune.peft=lora", targets)
  model = finetune.model_factory(config, C)()
  wrapped = {peft._path_str(p)[len("trunk.h.blocks.0."):] for p, m in nnx.iter_graph(model)
             if isinstance(m, peft.LoRADense) and peft._path_str(p).startswith("trunk.h.blocks.0.")}
  if family != "bert":
    assert wrapped == ({"attn.q", "attn.kv"} if family == "llama" else {"attn.qkv"}) | {"attn.out", "mlp.fc"}
  b = batch()
  before = logits(model, b)
  params = params_of(model)
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(rng.normal(0, 0.5, x.shape), x.dtype) if "lora_b" in str(p[-1]) else x, params)
  unmerged = logits(load(model, params), b)
  assert np.abs(unmerged - before).max() > 1e-2  # the low-rank update is live in the forward pass
  merged_params = peft.merge_lora(params, config.finetune.lora_alpha, config.finetune.lora_rank)
  assert "lora_a" not in str(jax.tree_util.tree_structure(merged_params))
  plain = load(finetune.model_factory(tiny(family), C)(), merged_params)
  np.testing.assert_allclose(logits(plain, b), unmerged, atol=2e-5, rtol=1e-5)


def test_lora_dense_adds_the_scaled_low_rank_update():
  """y = x.W + b + (alpha/r) (x.A).B, B zero at init; merge_lora folds it into W."""
  D, F, r, alpha = 8, 6, 2, 5.0
  with nnx.use_eager_sharding(False):
    base = models.Dense((D,), (F,), (None, None), std=0.5, rngs=nnx.Rngs(params=0))
    layer = peft.LoRADense(base, rank=r, alpha=alpha, rngs=nnx.Rngs(params=1))
  layer.bias[...] = jnp.arange(F, dtype=jnp.float32)
  W, b, A = (np.asarray(p[...], np.float64) for p in (layer.kernel, layer.bias, layer.lora_a))
  x = np.random.default_rng(0).normal(size=(3, D))
  assert A.shape == (D, r) and A.std() > 0
  np.testing.assert_array_equal(np.asarray(layer.lora_b[...]), 0.0)  # starts as the wrapped layer
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x, jnp.float32))), x @ W + b, atol=1e-5)
  B = np.random.default_rng(1).normal(size=(r, F))
  layer.lora_b[...] = jnp.asarray(B, jnp.float32)
  want = x @ W + b + alpha / r * (x @ A @ B)
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x, jnp.float32))), want, rtol=1e-5, atol=1e-5)
  merged = peft.merge_lora({"kernel": W.astype(np.float32), "bias": b, "lora_a": A, "lora_b": B}, alpha, r)
  assert set(merged) == {"kernel", "bias"}
  np.testing.assert_allclose(np.asarray(merged["kernel"]), W + alpha / r * A @ B, rtol=1e-5, atol=1e-5)


def test_adapters_start_as_the_identity():
  b = batch()
  plain = logits(finetune.model_factory(tiny(), C)(), b)
  adapted = finetune.model_factory(tiny("bert", "finetune.peft=adapter"), C)()
  np.testing.assert_array_equal(logits(adapted, b), plain)
  names = {".".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(params_of(adapted))[0]}
  assert any("attention.out.adapter_down" in n.replace("'", "").replace("[", ".").replace("]", "") for n in names) \
      or any("adapter_down" in n for n in names)


def _steps(config, n=3):
  devices = jax.devices()[:1]
  mesh = sharding.make_mesh(config, devices)
  make = finetune.model_factory(config, C)
  tx = optim.make_optimizer(config, trainable=lambda p: peft.trainable_mask(p, config.finetune.peft))
  spec = train.state_spec(config, mesh, tx, make)
  state = train.init_state(config, spec, tx, make)
  before = jax.tree.map(np.asarray, state["params"])
  step = jax.jit(train.make_train_step(config, spec.graphdef, tx, finetune.loss_fn))
  b = batch()
  with jax.set_mesh(mesh):
    for _ in range(n):
      state, m = step(state, b)
  return before, jax.tree.map(np.asarray, state["params"]), float(m["loss"])


@pytest.mark.parametrize("family,mode", [("bert", "lora"), ("bert", "adapter"), ("bert", "bitfit"), ("bert", "head"),
                                         ("llama", "lora"), ("llama", "adapter")])
def test_frozen_params_are_bitwise_unchanged(family, mode):
  before, after, loss = _steps(tiny(family, f"finetune.peft={mode}"))
  assert np.isfinite(loss)
  flat_before = jax.tree_util.tree_flatten_with_path(before)[0]
  flat_after = jax.tree.leaves(after)
  trained = frozen = 0
  for (path, old), new in zip(flat_before, flat_after):
    keys = peft._keys(path)
    if peft.is_trainable(keys, mode):
      trained += 1
      assert not np.array_equal(old, new), f"{mode}: trainable {keys} did not move"
    else:
      frozen += 1
      assert np.array_equal(old, new), f"{mode}: frozen {keys} changed"
  assert trained and frozen
  if (family, mode) == ("llama", "lora"):  # the default targets (attn.qkv, attn.out) reach q and kv too
    attn = after["trunk"]["h"]["blocks"][0]["attn"]
    assert {k: set(v) for k, v in attn.items()} == {k: {"kernel", "lora_a", "lora_b"} for k in ("q", "kv", "out")}


def test_weight_decay_shrinks_the_lora_factors_as_it_does_kernels():
  """optim.weight_decay acts on every trained matrix: LoRA's A and B as on the head's kernel, not on biases."""
  config = tiny("bert", "finetune.peft=lora", "optim.weight_decay=0.5", "optim.clip_norm=0")
  with nnx.use_eager_sharding(False):  # no mesh here
    params = params_of(finetune.model_factory(config, C)())
  params = jax.tree.map(lambda x: x + 1.0, params)  # lora_b starts at 0: decay would leave it there unseen
  tx = optim.make_optimizer(config, trainable=lambda p: peft.trainable_mask(p, "lora"))
  zeros = jax.tree.map(jnp.zeros_like, params)  # no gradient: what moves a parameter is its decay alone
  updates, _ = tx.update(zeros, tx.init(params), params)
  flat = {"/".join(peft._keys(p)): (np.asarray(u), np.asarray(x)) for (p, u), x in
          zip(jax.tree_util.tree_flatten_with_path(updates)[0], jax.tree.leaves(params))}
  lora = [name for name in flat if name.endswith(("lora_a", "lora_b"))]
  assert lora and "head/kernel" in flat
  for name in lora + ["head/kernel"]:
    np.testing.assert_allclose(flat[name][0], -1e-2 * 0.5 * flat[name][1], rtol=1e-5, err_msg=name)  # -lr wd p
  for name in ("head/bias", "trunk/encoder/blocks/0/attention/qkv/kernel"):  # a bias; a frozen kernel
    assert not flat[name][0].any(), name


def test_trainable_counts():
  D, L, r = 32, 2, 4
  config = tiny("bert", "finetune.peft=lora", f"finetune.lora_rank={r}")
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(finetune.model_factory(config, C)), nnx.Param))
  trainable, total = peft.count(abstract, "lora")
  # qkv: D*r + r*3D; out: D*r + r*D; per layer 6Dr, plus the pooler D*D + D (masked-LM pretraining
  # never trains it) and the head D*C + C.
  assert trainable == L * 6 * D * r + D * D + D + D * C + C
  head_only, total_head = peft.count(abstract, "head")
  assert head_only == D * D + D + D * C + C and total_head == total
  assert peft.count(abstract, "none") == (total, total)


def test_trainable_counts_of_adapter_and_bitfit():
  D, F, L, m = 32, 64, 2, 16
  abstract = lambda mode: nnx.to_pure_dict(nnx.state(
      nnx.eval_shape(finetune.model_factory(tiny("bert", f"finetune.peft={mode}"), C)), nnx.Param))
  pooler_and_head = D * D + D + D * C + C
  # Adapters on attention.out and mlp.proj: down D*m + m, up m*D + D; layer norms (embeddings', two
  # per layer) train too, scale and bias.
  adapters = L * 2 * (D * m + m + m * D + D)
  norms = 2 * D + L * 2 * 2 * D
  assert peft.count(abstract("adapter"), "adapter")[0] == adapters + norms + pooler_and_head
  # BitFit: only biases, i.e. qkv 3D, out D, fc F, proj D and two layer-norm biases per layer,
  # the embeddings' layer-norm bias; no embedding table or layer-norm scale.
  biases = L * (3 * D + D + F + D + 2 * D) + D
  assert peft.count(abstract("bitfit"), "bitfit")[0] == biases + pooler_and_head


def test_peft_targets_never_wrap_the_task_head():
  model = finetune.model_factory(tiny("bert", "finetune.peft=lora", "finetune.lora_targets=('*',)"), C)()
  assert any(isinstance(m, peft.LoRADense) for _, m in nnx.iter_graph(model))
  assert type(model.head) is models.Dense  # new and fully trained: a low-rank update of it would only add params


def test_target_matching_no_module_lists_module_names():
  config = tiny("bert", "finetune.peft=lora", "finetune.lora_targets=('query',)")
  with pytest.raises(ConfigError, match=r"match no module; Dense modules are: .*encoder\.blocks\.\*\.attention\.qkv") \
      as e:
    finetune.model_factory(config, C)()
  assert "\n" not in str(e.value) and "trunk.pooler" in str(e.value)
  with pytest.raises(ConfigError, match="is not one of"):
    finetune.model_factory(tiny("bert", "finetune.peft=prefix"), C)()


def test_bitfit_of_a_model_without_biases_is_one_line():
  """Llama has no biases: BitFit would train a classifier's head alone, and nothing at all in SFT."""
  with pytest.raises(ConfigError, match=r"^finetune.peft=bitfit trains the biases alone, and this model has none "
                                        r"\(model.use_bias=false"):
    tiny("llama", "finetune.peft=bitfit")
  with pytest.raises(ConfigError, match="finetune.peft=bitfit trains the biases alone"):
    config_lib.load_config("configs/sft.py", ["model.use_bias=false", "finetune.peft=bitfit"])


@pytest.mark.parametrize("size", ["finetune.lora_rank", "finetune.adapter_dim"])
@pytest.mark.parametrize("value", [0, -4])
def test_a_lora_rank_or_adapter_dim_below_one_is_one_line(size, value):
  """adapter_dim=-4 once failed deep in JAX (a negative broadcast shape), 69 lines of traceback."""
  mode = "lora" if "lora" in size else "adapter"
  with pytest.raises(ConfigError, match=rf"^{size} must be positive, got {value}$"):
    finetune.model_factory(tiny("bert", f"finetune.peft={mode}", f"{size}={value}"), C)()


@pytest.mark.parametrize("value", ["0", "-16", "nan", "inf"])
def test_a_lora_alpha_that_scales_the_update_away_is_one_line(value):
  """lora_alpha=0 scales the low-rank update, and so A's and B's gradients, to 0: a LoRA run trained its
  head alone, without a word."""
  with pytest.raises(ConfigError, match=r"^finetune.lora_alpha must be finite and above 0 \(the low-rank update is "
                                        rf"scaled by lora_alpha / lora_rank, and at 0 LoRA learns nothing\), got "
                                        rf"{float(value)}$"):
    finetune.model_factory(tiny("bert", "finetune.peft=lora", f"finetune.lora_alpha={value}"), C)()


def test_lora_finetune_exports_to_transformers(tmp_path):
  """A LoRA fine-tune, merged and exported, gives transformers' BertForSequenceClassification
  the logits of the unmerged fmjax classifier."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from fmjax import interop
  config = tiny("bert", "finetune.peft=lora", "finetune.lora_targets=('qkv', 'out', 'mlp.fc')", "model.attention=xla")
  model = finetune.model_factory(config, C)()
  rng = np.random.default_rng(2)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(rng.normal(0, 0.5, x.shape), x.dtype) if "lora_b" in str(p[-1]) else x,
      params_of(model))
  b = batch()
  want = logits(load(model, params), b)
  out = interop.export_params(interop.from_finetune(params, config), config.model, str(tmp_path / "hf"))
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  with torch.no_grad():
    got = hf(input_ids=torch.tensor(b["inputs"]).long(), token_type_ids=torch.tensor(b["token_types"]).long(),
             attention_mask=torch.tensor(b["segment_ids"]).long()).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_adapter_finetune_refuses_export():
  from fmjax import interop
  config = tiny("bert", "finetune.peft=adapter")
  params = params_of(finetune.model_factory(config, C)())
  with pytest.raises(ConfigError, match="adapters have no Hugging Face counterpart"):
    interop.from_finetune(params, config)


def test_mean_pooled_classifier_refuses_export():
  from fmjax import interop
  config = tiny("bert", "finetune.pooling=mean")
  params = params_of(finetune.model_factory(config, C)())
  with pytest.raises(ConfigError, match="finetune.pooling=mean has no Hugging Face counterpart"):
    interop.from_finetune(params, config)


@pytest.mark.parametrize("mode", ["lora", "adapter"])
def test_peft_on_the_mlp_input_layer_is_live(mode):
  """The MLP adds fc's bias inside its fused GELU; a LoRA on fc still adds its update before the
  GELU, and an adapter on fc (which acts after the bias) still sees the biased output."""
  from fmjax import models
  with nnx.use_eager_sharding(False):
    mlp = models.MLP(models._Common(tiny().model), approximate_gelu=False, out_std=0.5, rngs=nnx.Rngs(0))
    base = mlp.fc
    base.bias[...] = jnp.linspace(-1, 1, base.bias.shape[0])
    mlp.fc = (peft.LoRADense(base, rank=2, alpha=4.0, rngs=nnx.Rngs(1)) if mode == "lora"
              else peft.AdapterDense(base, dim=4, rngs=nnx.Rngs(1)))
  small = [mlp.fc.lora_b] if mode == "lora" else [mlp.fc.adapter_down.kernel, mlp.fc.adapter_up.kernel]
  for p in small:  # zero or near zero at init
    p[...] = 0.3 * jnp.ones(p.shape)
  x = jax.random.normal(jax.random.key(0), (2, 3, base.kernel.shape[0]))
  want = mlp.proj(jax.nn.gelu(mlp.fc(x), approximate=False))  # the layer as a whole, then GELU
  np.testing.assert_allclose(np.asarray(mlp(x)), np.asarray(want), atol=1e-5)
  assert np.abs(np.asarray(mlp.fc(x) - base(x))).max() > 1e-2  # the PEFT term is not zero


def test_frozen_parameters_get_no_gradient_work():
  """Head-only and LoRA steps skip the frozen weights' gradient matmuls, and their grad_norm is
  the trained parameters' alone (what clipping sees)."""
  flops = {}
  for mode in ("none", "lora", "head"):
    config = tiny("bert", f"finetune.peft={mode}")
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    make = finetune.model_factory(config, C)
    tx = optim.make_optimizer(config, trainable=lambda p, mode=mode: peft.trainable_mask(p, mode))
    spec = train.state_spec(config, mesh, tx, make)
    state = train.init_state(config, spec, tx, make)
    step = jax.jit(train.make_train_step(config, spec.graphdef, tx, finetune.loss_fn))
    b = batch()
    with jax.set_mesh(mesh):
      compiled = step.lower(state, b).compile()
      flops[mode] = compiled.cost_analysis()["flops"]
      _, m = compiled(state, b)
    model = nnx.merge(spec.graphdef, state["params"])
    # Jitted, as one program: op by op, the full model's gradient took most of this test's time.
    grads = nnx.jit(nnx.grad(lambda model: finetune.loss_fn(model, b)[0] / np.sum(b["weights"])))(model)
    trained = [g for (path, g) in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(grads))[0]
               if peft.is_trainable(peft._keys(path), mode)]
    np.testing.assert_allclose(float(m["grad_norm"]), float(optax.global_norm(trained)), rtol=1e-4)
  assert flops["head"] < 0.6 * flops["none"] and flops["lora"] < 0.85 * flops["none"], flops
