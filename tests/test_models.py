"""GPT and BERT: masking semantics, layout/remat equivalences, dtypes, dropout and sizes.

Shape legend: B batch, T sequence, D model, V vocab, M masked positions.
"""

import contextlib
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType

from fmjax import config_lib, models

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")

B, T, V = 2, 32, 128
ALLOWED_AXES = {"vocab", "embed", "mlp", "heads", "kv_heads", "kv", "layers", "norm", None}
# "llama" below: the GPT with every later decoder choice, and 2 key/value heads for its 4 query heads.
LLAMA = dict(positions="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, tie_embeddings=False, num_kv_heads=2)
# "llama3": with Llama 3.1's rotary scaling, stretching 8 positions of pretraining (the rows reach 31).
LLAMA3 = dict(LLAMA, rope_scaling="llama3", rope_factor=4.0, rope_original_max_len=8)
# "qwen": Llama's with what Qwen adds, all at once: biases on q, k and v alone (Qwen2), an RMSNorm on each head of q
# and of k (Qwen3), and heads 24 wide where d_model / num_heads is 16 (Qwen3-0.6B's are 128 at 1024 / 16).
QWEN = dict(LLAMA, qkv_bias=True, qk_norm=True, head_dim=24)
# Row 0 packs two documents and padding (ids 1, 2, then 0); row 1 is one document.
SEGMENTS_BT = jnp.array([[1] * 12 + [2] * 14 + [0] * 6, [1] * T], jnp.int32)
POSITIONS_BT = jnp.array([list(range(12)) + list(range(14)) + [0] * 6, list(range(T))], jnp.int32)


def tiny_cfg(family, **overrides):
  decoder = {"llama": LLAMA, "llama3": LLAMA3, "qwen": QWEN}
  cfg = config_lib.base_config("gpt" if family in decoder else family).model
  cfg.update(vocab_size=V, num_layers=2, d_model=64, num_heads=4, d_ff=128, max_len=64, attention="xla")
  cfg.update({**decoder.get(family, {}), **overrides})
  return cfg


def build(family, seed=0, **overrides):
  return models.build_model(tiny_cfg(family, **overrides), rngs=nnx.Rngs(seed))


def tokens(seed=1):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


@nnx.jit(static_argnames="deterministic")
def forward(model, toks, mlm_positions_BM=None, deterministic=True, rngs=None):
  kw = {} if mlm_positions_BM is None else dict(mlm_positions_BM=mlm_positions_BM)
  return model(toks, segment_ids_BT=SEGMENTS_BT, positions_BT=POSITIONS_BT, deterministic=deterministic,
               rngs=rngs, **kw)


@nnx.jit
def loss_and_grads(model, toks, dropout_key=None):
  def loss_fn(m):
    rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)  # as a pure train step does
    logits_BTV = m(toks, segment_ids_BT=SEGMENTS_BT, positions_BT=POSITIONS_BT, deterministic=rngs is None,
                   rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, jnp.roll(toks, -1, axis=1)).mean()
  return nnx.value_and_grad(loss_fn)(model)


def params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def load(model, pure):
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)


def assert_trees_close(a, b, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0), a, b)


@pytest.mark.parametrize("family,dropout", [("gpt", 0.0), ("gpt", 0.2), ("llama", 0.2), ("qwen", 0.2)])
def test_gpt_is_causal(family, dropout):
  """d loss(position t) / d (input embedding of a later position) is exactly zero, in training with
  dropout (hidden and attention probabilities) too: GPT-2's learned positions, and Llama's rotary
  ones with grouped-query attention (and Qwen's q/k norms, which mix a head's dimensions, never positions)."""
  model = build(family, dropout=dropout, attention_dropout=dropout)
  # Llama has no position table and an untied head: with each token once in the batch, the token table's
  # gradient row of token[b, s] is the gradient of position s's input in row b.
  rotary = family in ("llama", "qwen")
  toks = jax.random.permutation(jax.random.key(1), V)[:B * T].reshape(B, T) if rotary else tokens()
  t = 10

  def loss_at_t(m):
    rngs = nnx.Rngs(dropout=jax.random.key(4)) if dropout else None
    logits_BTV = m(toks, deterministic=not dropout, rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV[:, t], toks[:, t + 1]).sum()

  grads = nnx.jit(nnx.grad(loss_at_t))(model)
  if rotary:
    grad_BTD = grads.wte.embedding[...][toks]
    assert np.all(np.asarray(grad_BTD[:, t + 1:]) == 0.0)
    assert np.all(np.abs(np.asarray(grad_BTD[:, : t + 1])).sum(-1) > 0)  # the past does matter
    return
  grad_LD = grads.wpe.embedding[...]
  assert np.all(np.asarray(grad_LD[t + 1:]) == 0.0)
  assert np.all(np.abs(np.asarray(grad_LD[: t + 1])).sum(-1) > 0)  # the past does matter


def test_bert_is_bidirectional():
  model = build("bert")
  toks = tokens()
  run = nnx.jit(lambda m, t: m(t))
  out = run(model, toks)
  out2 = run(model, toks.at[:, -1].set((toks[:, -1] + 1) % V))
  assert not np.allclose(out[:, 0], out2[:, 0])  # the last token changes the first position


@pytest.mark.parametrize("family", ["gpt", "bert", "llama", "qwen"])
def test_packed_segments_do_not_attend_across(family):
  model = build(family)
  toks = tokens()
  out = forward(model, toks)
  toks2 = toks.at[0, 12:26].set((toks[0, 12:26] + 7) % V)  # rewrite segment 2 of row 0
  out2 = forward(model, toks2)
  np.testing.assert_array_equal(out[0, :12], out2[0, :12])   # segment 1: bitwise unchanged
  np.testing.assert_array_equal(out[0, 26:], out2[0, 26:])   # padding: bitwise unchanged
  np.testing.assert_array_equal(out[1], out2[1])
  assert not np.allclose(out[0, 12:26], out2[0, 12:26])
  # Each packed document, with its own positions from 0, reads as it does alone in a row.
  alone = nnx.jit(lambda m, t: m(t))
  np.testing.assert_allclose(out[0, :12], alone(model, toks[:1, :12])[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out[0, 12:26], alone(model, toks[:1, 12:26])[0], atol=1e-5, rtol=0)


def test_rotary_positions_are_relative():
  """Shifting every position by a constant leaves a rotary model's logits as they were (q.k depends
  on the distance alone); other distances change them."""
  model = build("llama")
  toks = tokens()
  run = nnx.jit(lambda m, t, p: m(t, positions_BT=p))
  positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
  out = run(model, toks, positions_BT)
  np.testing.assert_allclose(run(model, toks, positions_BT + 1000), out, atol=2e-5, rtol=0)
  assert np.abs(np.asarray(run(model, toks, 2 * positions_BT) - out)).max() > 1e-3


def test_unscaled_rotary_frequencies_are_hf_llamas_and_linear_scaling_divides_the_positions():
  """rope_scaling=none keeps the frequencies theta^(-2j/K) (Llama's, as before the setting existed); linear
  with factor 4 is the unscaled model at a quarter of each position."""
  np.testing.assert_array_equal(models.rope_frequencies(16, 500.0),
                                (1.0 / 500.0 ** (np.arange(0, 16, 2) / 16)).astype(np.float32))
  unscaled = build("llama")
  linear = build("llama", rope_scaling="linear", rope_factor=4.0)
  load(linear, params(unscaled))
  toks = tokens()
  run = nnx.jit(lambda m, t, p: m(t, positions_BT=p))
  positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
  np.testing.assert_allclose(run(linear, toks, 4 * positions_BT), run(unscaled, toks, positions_BT), atol=1e-5,
                             rtol=0)
  assert np.abs(np.asarray(run(linear, toks, positions_BT) - run(unscaled, toks, positions_BT))).max() > 1e-3


def test_llama3_scaling_keeps_fast_frequencies_divides_slow_ones_and_blends_between():
  """Llama 3.1's rule: a frequency that turns at least high_freq_factor times in the original positions
  is kept, one that turns at most low_freq_factor times is divided by the factor, and one between is
  blended, linearly in its number of turns (so the rule has no jump); positions stay relative."""
  K, theta, factor, low, high, original = 64, 500000.0, 32.0, 1.0, 4.0, 8192  # Llama 3.2 1B's
  plain_J = models.rope_frequencies(K, theta).astype(np.float64)
  scaled_J = models.rope_frequencies(K, theta, "llama3", factor, low, high, original).astype(np.float64)
  turns_J = original * plain_J / (2 * np.pi)
  fast, slow = turns_J >= high, turns_J <= low
  between = ~fast & ~slow
  assert fast.sum() and slow.sum() and between.sum(), turns_J  # Llama 3's settings have all three
  np.testing.assert_allclose(scaled_J[fast], plain_J[fast], rtol=1e-6)
  np.testing.assert_allclose(scaled_J[slow], plain_J[slow] / factor, rtol=1e-6)
  keep_J = (turns_J[between] - low) / (high - low)
  np.testing.assert_allclose(scaled_J[between], (1 - keep_J) * plain_J[between] / factor + keep_J * plain_J[between],
                             rtol=1e-6)
  assert np.all(np.diff(scaled_J) < 0)  # still one frequency per pair, from fast to slow
  # In a model: other logits than unscaled, and a shift of every position still changes none.
  unscaled, scaled = build("llama"), build("llama3")
  load(scaled, params(unscaled))
  toks = tokens()
  run = nnx.jit(lambda m, t, p: m(t, positions_BT=p))
  positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
  out = run(scaled, toks, positions_BT)
  assert np.abs(np.asarray(out - run(unscaled, toks, positions_BT))).max() > 1e-3
  np.testing.assert_allclose(run(scaled, toks, positions_BT + 1000), out, atol=2e-5, rtol=0)


def saved_for_backward(model, toks) -> int:
  """How many arrays the forward pass keeps for the backward one."""
  graphdef, state = nnx.split(model)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(lambda s: nnx.merge(graphdef, s)(toks).sum(), state)
  return len(out.getvalue().splitlines())


@pytest.mark.parametrize("family,remat", [("gpt", "full"), ("gpt", "save_attention_out"), ("bert", "dots")])
def test_remat_matches_no_remat(family, remat):
  toks = tokens()
  # The policy is in force: the forward keeps fewer arrays than without remat, all the more for "full".
  kept = {r: saved_for_backward(build(family, remat=r), toks) for r in ("none", remat, "full")}
  assert kept["none"] > kept[remat] >= kept["full"], kept
  loss, grads = loss_and_grads(build(family), toks)
  loss_r, grads_r = loss_and_grads(build(family, remat=remat), toks)
  np.testing.assert_allclose(loss, loss_r, atol=1e-6)
  assert_trees_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(grads_r), atol=1e-6)


@pytest.mark.parametrize("family,remat,dropout", [("gpt", "none", 0.2), ("bert", "full", 0.0), ("bert", "dots", 0.1),
                                                  ("llama", "dots", 0.1), ("llama3", "none", 0.0),
                                                  ("qwen", "full", 0.1)])
def test_scan_matches_unrolled(family, remat, dropout):
  """Same weights via stack_layers give the same loss and grads; dropout (hidden and attention
  probabilities) draws the same masks, recomputed identically under remat."""
  toks = tokens()
  kw = dict(remat=remat, dropout=dropout, attention_dropout=dropout)
  unrolled = build(family, **kw)
  scanned = build(family, seed=5, scan_layers=True, **kw)
  stacked = models.stack_layers(params(unrolled))
  assert_trees_close(models.unstack_layers(stacked), params(unrolled), atol=0)
  load(scanned, stacked)
  key = jax.random.key(3) if dropout else None
  loss_u, grads_u = loss_and_grads(unrolled, toks, key)
  loss_s, grads_s = loss_and_grads(scanned, toks, key)
  np.testing.assert_allclose(loss_u, loss_s, atol=1e-6)
  assert_trees_close(nnx.to_pure_dict(grads_u), models.unstack_layers(nnx.to_pure_dict(grads_s)), atol=1e-6)


@pytest.mark.parametrize("family", ["gpt", "bert", "llama"])
def test_a_seed_initialises_both_layer_layouts_alike(family):
  # scan_layers is a speed setting: with it the blocks, and what the model draws after them (BERT's
  # pooler and MLM transform), start from the same numbers as without it.
  stacked = models.stack_layers(params(build(family, seed=7)))
  assert_trees_close(params(build(family, seed=7, scan_layers=True)), stacked, atol=0)


def test_bert_mlm_positions_gather_before_head():
  model = build("bert")
  toks = tokens()
  mlm_positions_BM = jnp.array([[0, 5, 11, 20], [3, 3, 30, 31]])
  full_BTV = forward(model, toks)
  gathered_BMV = forward(model, toks, mlm_positions_BM=mlm_positions_BM)
  assert gathered_BMV.shape == (B, 4, V) and gathered_BMV.dtype == jnp.float32
  np.testing.assert_allclose(gathered_BMV, jnp.take_along_axis(full_BTV, mlm_positions_BM[..., None], 1),
                             atol=1e-5)
  h_BTD, pooled_BD = nnx.jit(lambda m, t: m.encode(t))(model, toks)
  assert h_BTD.shape == (B, T, 64) and pooled_BD.shape == (B, 64)
  assert np.all(np.abs(np.asarray(pooled_BD)) <= 1.0)  # tanh pooler


@pytest.mark.parametrize("family", ["gpt", "bert", "llama"])
def test_bf16_compute_is_close_to_f32(family):
  toks = tokens()
  model32 = build(family, init_std=0.1)  # larger weights so the comparison is not trivially near zero
  model16 = build(family, init_std=0.1, dtype="bfloat16")
  out32, out16 = forward(model32, toks), forward(model16, toks)
  assert out16.dtype == jnp.float32  # logits always come back in float32
  assert jax.tree.leaves(params(model16))[0].dtype == jnp.float32  # params stay float32
  scale = float(jnp.abs(out32).max())
  assert float(jnp.abs(out32 - out16).max()) < 0.05 * scale
  assert not np.array_equal(out32, out16)  # bf16 compute really happened


def test_bf16_embedding_gradient_of_a_row_many_positions_share_is_summed_in_float32():
  # [MASK], [CLS] or EOS fills thousands of positions of a batch. The table's gradient row is the
  # sum of their cotangents: summed in bfloat16 it is off by as much as half (measured 0.50 here).
  rows, hits, n = 2 * models.ONE_HOT_MAX_ROWS, 4096, 16384  # a gathered table, not the one-hot path
  with nnx.use_eager_sharding(False):  # no mesh here
    embed = models.Embed(rows, 64, ("vocab", "embed"), std=0.02, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                         rngs=nnx.Rngs(0))
  k_ids, k_g = jax.random.split(jax.random.key(1))
  ids_BT = jnp.where(jnp.arange(n) < hits, 7, jax.random.randint(k_ids, (n,), 8, rows)).reshape(16, -1)
  g_BTD = (jax.random.normal(k_g, (*ids_BT.shape, 64)) + 0.5).astype(jnp.bfloat16)
  out_BTD = embed(ids_BT)
  assert out_BTD.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out_BTD, jnp.take(embed.embedding[...].astype(jnp.bfloat16), ids_BT, axis=0))
  grad = nnx.grad(lambda m: jnp.sum(m(ids_BT).astype(jnp.float32) * g_BTD.astype(jnp.float32)))(embed)
  got = np.asarray(grad.embedding[...])[7]
  exact = np.asarray(g_BTD.astype(jnp.float32), np.float64)[np.asarray(ids_BT) == 7].sum(0)
  assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 1e-5



def test_bf16_dense_bias_gradient_is_summed_in_float32():
  # Every token shares a bias: its gradient is the sum of all their cotangents (qkv, attention out,
  # mlp proj, pooler ...). Summed in bfloat16 it was off by about 2% here (65k tokens).
  with nnx.use_eager_sharding(False):  # no mesh here
    dense = models.Dense((16,), (8,), ("embed", "mlp"), std=0.5, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  k_x, k_g = jax.random.split(jax.random.key(1))
  x_BTD = jax.random.normal(k_x, (32, 2048, 16), jnp.bfloat16)
  g_BTF = (jax.random.normal(k_g, (32, 2048, 8)) * 0.01 + 0.003).astype(jnp.bfloat16)
  out_BTF = dense(x_BTD)
  assert out_BTF.dtype == jnp.bfloat16
  grad = nnx.grad(lambda m: jnp.sum(m(x_BTD).astype(jnp.float32) * g_BTF.astype(jnp.float32)))(dense)
  got = np.asarray(grad.bias[...])
  exact = np.asarray(g_BTF.astype(jnp.float32), np.float64).sum((0, 1))
  assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 1e-5

@pytest.mark.parametrize("family", ["gpt", "bert"])
@pytest.mark.parametrize("which", ["dropout", "attention_dropout"])
def test_dropout(family, which):
  toks = tokens()
  plain = forward(build(family), toks)
  model = build(family, **{which: 0.3})
  np.testing.assert_array_equal(forward(model, toks, deterministic=True), plain)
  a = forward(model, toks, deterministic=False, rngs=nnx.Rngs(dropout=1))
  b = forward(model, toks, deterministic=False, rngs=nnx.Rngs(dropout=1))
  c = forward(model, toks, deterministic=False, rngs=nnx.Rngs(dropout=2))
  np.testing.assert_array_equal(a, b)  # the key alone decides the masks
  assert not np.allclose(a, plain) and not np.allclose(a, c)
  with pytest.raises(ValueError, match="rngs"):
    forward(model, toks, deterministic=False)


def test_residual_dropout_zeroes_at_its_rate_and_rescales_what_it_keeps():
  x_BD = jnp.full((64, 64), 2.0)
  y_BD = np.asarray(models._dropout(x_BD, 0.25, jax.random.key(0), deterministic=False))
  kept = y_BD != 0
  np.testing.assert_allclose(y_BD[kept], 2.0 / 0.75, rtol=1e-6)  # inverted dropout: the expectation stays x
  assert abs(kept.mean() - 0.75) < 0.02
  np.testing.assert_array_equal(models._dropout(x_BD, 0.25, None, deterministic=True), x_BD)


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_every_residual_dropout_of_a_forward_pass_draws_its_own_mask(family, monkeypatch):
  """The embeddings' dropout and each block's two (after attention, after the MLP): five keys, all different."""
  keys = []
  real = models._dropout

  def recording(x, rate, key, deterministic):
    keys.append(np.asarray(jax.random.key_data(key)).tobytes())
    return real(x, rate, key, deterministic)

  monkeypatch.setattr(models, "_dropout", recording)
  build(family, dropout=0.1)(tokens(), deterministic=False, rngs=nnx.Rngs(dropout=0))
  assert len(keys) == 1 + 2 * 2 and len(set(keys)) == len(keys)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_gpt_hidden_and_head_compose(family):
  model = build(family)
  toks = tokens()
  logits_BTV, composed_BTV = nnx.jit(lambda m, t: (m(t), m.lm_head_logits(m.hidden(t))))(model, toks)
  np.testing.assert_allclose(composed_BTV, logits_BTV, atol=1e-6)
  names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  if family == "gpt":  # the LM head is tied to the token embedding (no separate output matrix)
    assert not any("lm_head" in n for n in names) and "wte/embedding" in names and model.head_table() is model.wte
    return
  # Llama: an output table of its own, no position table, no biases, RMSNorm's scale alone.
  assert model.head_table() is model.lm_head and "lm_head/embedding" in names and "wpe/embedding" not in names
  assert not any(n.endswith("bias") for n in names) and "ln_f/scale" in names
  h_BTD = nnx.jit(lambda m, t: m.hidden(t))(model, toks)
  np.testing.assert_allclose(logits_BTV, h_BTD @ model.lm_head.embedding[...].T, atol=1e-5)


# Published sizes: GPT-2 small (HF GPT2LMHeadModel, tied) and BERT-base (HF BertModel with pooler,
# 109,482,240, plus the MLM head: transform dense 590,592 + LayerNorm 1,536 + decoder bias 30,522).
@pytest.mark.parametrize("family,size,vocab,expected", [
    ("gpt", "small", 50257, 124_439_808),
    ("gpt", "small", 50304, 124_475_904),  # the config's vocabulary, padded to a multiple of 128
    ("bert", "base", 30522, 110_104_890),
])
def test_param_counts_match_published_sizes(family, size, vocab, expected):
  cfg = config_lib.load_module(os.path.join(CONFIGS, f"{family}.py")).get_config(size).model
  cfg.vocab_size = vocab
  abstract = models.abstract_model(cfg)  # eval_shape: nothing materialised
  assert models.param_count(abstract) == expected


def test_flops_per_token_excludes_position_embeddings():
  cfg = config_lib.load_module(os.path.join(CONFIGS, "gpt.py")).get_config("small").model
  cfg.vocab_size = 50257
  n = 124_439_808 - 1024 * 768  # without wpe
  assert models.flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 768 * 1024


def test_flops_per_token_of_an_untied_rope_decoder_counts_the_matmuls_gpt2_has():
  """No position table, and the untied head's input table is a lookup: N is the weights a token is
  multiplied by, so a Llama-style GPT-2 small counts what GPT-2 small does (its MLP is as wide)."""
  gpt = config_lib.load_module(os.path.join(CONFIGS, "gpt.py"))
  llama, gpt2 = gpt.get_config("small,llama").model, gpt.get_config("small").model
  D, F, V, L = 768, 2048, 50304, 12
  layer = 4 * D * D + 3 * D * F + 2 * D  # q, k, v, out; gate, up, down; two RMSNorm scales
  n = L * layer + D + V * D  # the final norm, the untied head (not the input table)
  assert models.flops_per_token(llama, 1024) == 6 * n + 12 * L * D * 1024
  assert abs(models.flops_per_token(llama, 1024) / models.flops_per_token(gpt2, 1024) - 1) < 1e-3


def test_llama_sizes_and_flops_per_token_count_its_untied_head_and_no_position_table():
  cfg = config_lib.load_module(os.path.join(CONFIGS, "gpt.py")).get_config("small,llama").model
  cfg.update(vocab_size=32000, num_kv_heads=4)
  L, D, H, G, F, V_ = 12, 768, 12, 4, 2048, 32000  # F: 8/3 D rounded up to a multiple of 256
  K = D // H
  assert cfg.d_ff == F
  layer = D * H * K + D * 2 * G * K + H * K * D + D * 2 * F + F * D + 2 * D  # q, kv, out, gate+up, down, 2 norms
  n = 2 * V_ * D + L * layer + D  # embeddings, the untied head, the final norm
  assert models.param_count(models.abstract_model(cfg)) == n
  # The input table is a lookup: N for the FLOPs leaves it out (the untied head counts).
  assert models.flops_per_token(cfg, 1024) == 6 * (n - V_ * D) + 12 * L * D * 1024


# Qwen2.5-0.5B and Qwen3-0.6B (tied, 151936 ids) as their config.json describe them; the totals are transformers'
# parameter counts of Qwen2ForCausalLM and Qwen3ForCausalLM built from those configs.
QWEN_SIZES = {"qwen2.5-0.5b": (dict(num_layers=24, d_model=896, num_heads=14, num_kv_heads=2, d_ff=4864,
                                    qkv_bias=True), 494_032_768),
              "qwen3-0.6b": (dict(num_layers=28, d_model=1024, num_heads=16, num_kv_heads=8, head_dim=128, d_ff=3072,
                                  qk_norm=True), 596_049_920)}


@pytest.mark.parametrize("name", list(QWEN_SIZES))
def test_qwen_sizes_and_flops_per_token_count_the_attention_at_its_own_width(name):
  """Biases on q, k and v (Qwen2) or a q and a k norm (Qwen3) per layer; Qwen3-0.6B's 16 heads of 128 make an
  attention twice d_model wide, which the attention's 12*L*D*T term counts (D = H*K there)."""
  settings, expected = QWEN_SIZES[name]
  cfg = tiny_cfg("llama", **settings, vocab_size=151936, tie_embeddings=True, max_len=32768)
  assert models.param_count(models.abstract_model(cfg)) == expected
  L, H, K = settings["num_layers"], settings["num_heads"], models.head_dim(cfg)
  assert K == (128 if name == "qwen3-0.6b" else 896 // 14)
  assert models.flops_per_token(cfg, 1024) == 6 * expected + 12 * L * H * K * 1024  # tied: the table counts once


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k():
  """With model.qk_norm each head of q and of k is RMS-normalised before the rotation: the q and k projections
  (kernels and biases) scaled by 7 give the same logits; without the norms they are another model."""
  toks = tokens()
  for qk_norm in (True, False):
    kw = dict(qk_norm=qk_norm, init_std=0.2)  # q and k large enough that the norms' eps is negligible
    model, rescaled = build("qwen", **kw), build("qwen", seed=1, **kw)
    pure = params(model)
    for i, block in pure["h"]["blocks"].items():
      for name in ("q", "kv"):  # biases (zero at init) that matter
        block["attn"][name]["bias"] = 0.5 * jax.random.normal(jax.random.key(i), block["attn"][name]["bias"].shape)
    load(model, pure)
    for block in pure["h"]["blocks"].values():
      for name in ("kernel", "bias"):
        block["attn"]["q"][name] = block["attn"]["q"][name] * 7
        block["attn"]["kv"][name] = block["attn"]["kv"][name].at[..., 0, :, :].multiply(7)  # k, not v
    load(rescaled, pure)
    want, got = forward(model, toks), forward(rescaled, toks)
    if qk_norm:
      np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    else:
      assert np.abs(np.asarray(got - want)).max() > 1e-2


@pytest.mark.parametrize("family", ["gpt", "bert", "llama", "qwen"])
def test_partitioning_names_and_sharded_build(family):
  """Every param uses only the shared logical names; building under a mesh shards heads and mlp."""
  mesh = jax.make_mesh((1, 2, 2, 2), ("dcn_data", "data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 4)
  cfg = tiny_cfg(family, scan_layers=True)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(config_lib.DEFAULT_RULES):
    abstract = nnx.eval_shape(lambda: models.build_model(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    for path, var in nnx.to_flat_state(state):
      names = var.get_metadata().get("out_sharding") or var.get_metadata().get("sharding_names")
      assert names is not None and len(names) == len(var.shape), path
      assert set(names) <= ALLOWED_AXES, (path, names)
      assert names[0] == "layers" or "blocks" not in path, path
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    blocks = specs["encoder" if family == "bert" else "h"]["blocks"]
    attn = blocks["attention" if family == "bert" else "attn"]
    if family in ("llama", "qwen"):  # the key/value heads over tensor as the query heads are
      assert attn["q"]["kernel"] == jax.P(None, "fsdp", "tensor", None)
      assert attn["kv"]["kernel"] == jax.P(None, "fsdp", None, "tensor", None)
      assert blocks["mlp"]["fc"]["kernel"] == jax.P(None, "fsdp", None, "tensor")
      assert specs["lm_head"]["embedding"] == jax.P("tensor", "fsdp")
    else:
      assert attn["qkv"]["kernel"] == jax.P(None, "fsdp", None, "tensor", None)
    if family == "qwen":  # q/k/v biases by head as their kernels; a q/k norm's scale is a head's width (kv)
      assert (attn["q"]["bias"], attn["kv"]["bias"]) == (jax.P(None, "tensor", None), jax.P(None, None, "tensor", None))
      assert attn["q_norm"]["scale"] == attn["k_norm"]["scale"] == jax.P(None, None)
      assert "bias" not in attn["out"] and "bias" not in blocks["mlp"]["proj"]
    assert blocks["mlp"]["proj"]["kernel"] == jax.P(None, "tensor", "fsdp")
    if family == "gpt":  # one sharded run is enough: the mechanics are shared
      model = nnx.merge(nnx.graphdef(abstract), jax.jit(
          lambda: nnx.state(models.build_model(cfg, rngs=nnx.Rngs(0))))())
      kernel = model.h.blocks.attn.qkv.kernel[...]  # (L, D, 3, H, K), D over fsdp=2, H over tensor=2
      assert kernel.sharding.shard_shape(kernel.shape) == (2, 32, 3, 2, 16)
      out = forward(model, tokens())
  if family == "gpt":
    np.testing.assert_allclose(out, forward(build(family, scan_layers=True), tokens()), atol=1e-5)


@pytest.mark.parametrize("family", ["gpt", "bert", "llama", "qwen"])
def test_every_matrix_has_a_logical_axis_the_mesh_shards(family):
  """A parameter of two or more axes with no sharded logical name sits whole on every device: memory
  that FSDP and tensor parallelism never divide (BERT's pooler and MLM transform are D x D)."""
  sharded = {name for name, axes in config_lib.DEFAULT_RULES if axes}
  state = nnx.state(models.abstract_model(tiny_cfg(family)), nnx.Param)
  for path, var in nnx.to_flat_state(state):
    names = var.get_metadata().get("out_sharding") or var.get_metadata().get("sharding_names")
    if len(var.shape) >= 2:
      assert set(names) & sharded, (path, names)


def test_only_gpts_residual_projections_start_scaled_by_one_over_sqrt_two_layers():
  """GPT-2's init: the two projections that add into the residual stream in each layer (attn.out,
  mlp.proj) start at init_std / sqrt(2L), so the stream's variance does not grow with depth; every
  other matrix, and all of BERT's, at init_std."""
  std = lambda dense: float(np.std(np.asarray(dense.kernel[...])))
  gpt = build("gpt", num_layers=4, init_std=0.02).h.blocks[1]
  for dense, want in ((gpt.attn.out, 0.02 / np.sqrt(8)), (gpt.mlp.proj, 0.02 / np.sqrt(8)),
                      (gpt.attn.qkv, 0.02), (gpt.mlp.fc, 0.02)):
    assert std(dense) == pytest.approx(want, rel=0.05)
  bert = build("bert", num_layers=4, init_std=0.02).encoder.blocks[1]
  for dense in (bert.attention.out, bert.mlp.proj, bert.attention.qkv, bert.mlp.fc):
    assert std(dense) == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_vjp_matches_autodiff_and_keeps_no_float32_activations(dtype, capsys):
  """The hand-written LayerNorm backward equals autodiff of the same forward, and what the
  forward keeps for it is the input plus per-row statistics, not float32 [..., D] copies."""
  k = jax.random.split(jax.random.key(0), 4)
  x = (jax.random.normal(k[0], (3, 5, 64)) * 3 + 1).astype(dtype)
  scale, bias = 1 + 0.1 * jax.random.normal(k[1], (64,)), jax.random.normal(k[2], (64,))
  w = jax.random.normal(k[3], (3, 5, 64))

  def autodiff(x, s, b, eps, dtype):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * s + b).astype(dtype)

  def grads(fn):
    loss = lambda x, s, b: (fn(x, s, b, 1e-5, dtype).astype(jnp.float32) * w).sum()
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, scale, bias)

  (v, g), (v_ref, g_ref) = grads(models.layer_norm), grads(autodiff)
  assert float(v) == float(v_ref)
  for a, b in zip(g, g_ref):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-5)
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(
      lambda x: models.layer_norm(x, scale, bias, 1e-5, dtype).astype(jnp.float32).sum(), x)
  kept = capsys.readouterr().out.strip().splitlines()
  name = {jnp.float32: "f32", jnp.bfloat16: "bf16"}[dtype]
  assert [line for line in kept if "[3,5,64]" in line] == [f"{name}[3,5,64] from the argument x"], kept


@pytest.mark.parametrize("approximate", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bias_gelu_vjp_matches_autodiff_and_keeps_only_its_input(approximate, dtype, capsys):
  """The hand-written GELU backward (GPT-2's tanh form and BERT's erf form) equals autodiff of
  the same forward, and the forward keeps only the matmul output h for it."""
  k = jax.random.split(jax.random.key(1), 3)
  h = (jax.random.normal(k[0], (3, 5, 64)) * 2).astype(dtype)
  bias, w = 0.5 * jax.random.normal(k[1], (64,)), jax.random.normal(k[2], (3, 5, 64))
  autodiff = lambda h, b, approximate: jax.nn.gelu(
      h.astype(jnp.float32) + b, approximate=approximate).astype(h.dtype)

  def grads(fn):
    loss = lambda h, b: (fn(h, b, approximate).astype(jnp.float32) * w).sum()
    return jax.value_and_grad(loss, argnums=(0, 1))(h, bias)

  (v, g), (v_ref, g_ref) = grads(models.bias_gelu), grads(autodiff)
  assert float(v) == float(v_ref)
  for a, b in zip(g, g_ref):
    assert a.dtype == b.dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16: the same float32 math, one rounding
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(
      lambda h: models.bias_gelu(h, bias, approximate).astype(jnp.float32).sum(), h)
  kept = capsys.readouterr().out.strip().splitlines()
  name = {jnp.float32: "f32", jnp.bfloat16: "bf16"}[dtype]
  assert [line for line in kept if "[3,5,64]" in line] == [f"{name}[3,5,64] from the argument h"], kept


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_vjp_matches_autodiff_and_keeps_only_its_input(dtype, capsys):
  """The hand-written SwiGLU backward equals autodiff of silu(gate) * up, and the forward keeps only
  the fused projection's output h [..., 2, F] for it: autodiff kept five float32 [..., F] arrays."""
  k = jax.random.split(jax.random.key(2), 2)
  h = (jax.random.normal(k[0], (3, 5, 2, 64)) * 3).astype(dtype)
  w = jax.random.normal(k[1], (3, 5, 64))

  def autodiff(h):
    h32 = h.astype(jnp.float32)
    return (jax.nn.silu(h32[..., 0, :]) * h32[..., 1, :]).astype(h.dtype)

  def grads(fn):
    return jax.value_and_grad(lambda h: (fn(h).astype(jnp.float32) * w).sum())(h)

  (v, g), (v_ref, g_ref) = grads(models.swiglu), grads(autodiff)
  assert float(v) == float(v_ref)
  assert g.dtype == g_ref.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16: the same float32 math, one rounding
  np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), rtol=tol, atol=tol)
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(lambda h: models.swiglu(h).astype(jnp.float32).sum(), h)
  kept = capsys.readouterr().out.strip().splitlines()
  name = {jnp.float32: "f32", jnp.bfloat16: "bf16"}[dtype]
  assert kept == [f"{name}[3,5,2,64] from the argument h"], kept


def test_llama_block_keeps_no_float32_activation_of_the_mlp_width(capsys):
  """A Llama-style GPT in bfloat16 (SwiGLU, RMSNorm, rotary positions) keeps nothing of the MLP's width
  in float32 for the backward pass: under `lax.scan` XLA stacks every such residual across the layers."""
  model = build("gpt", positions="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, tie_embeddings=False,
                d_ff=96, dtype="bfloat16")
  graphdef, state = nnx.split(model)
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(
      lambda s: nnx.merge(graphdef, s)(tokens(), positions_BT=POSITIONS_BT).sum(), state)
  kept = capsys.readouterr().out.strip().splitlines()
  assert any(f"bf16[{B},{T},2,96]" in line for line in kept), kept  # h, what the backward recomputes from
  assert not [line for line in kept if f"f32[{B},{T},96]" in line or f"f32[{B},{T},2,96]" in line], kept


def test_grouped_query_attention_equals_multi_head_with_each_key_value_head_repeated():
  """G key/value heads for H query heads is multi-head attention whose heads h read key/value head
  h // (H / G): an MHA model given those repeated k/v weights (and biases) computes the same logits."""
  kw = dict(positions="rope", use_bias=True, init_std=0.2)
  gqa, mha = build("gpt", num_kv_heads=2, **kw), build("gpt", seed=1, **kw)
  toks = tokens()

  def as_mha(expand):  # [..., 2, G, K] -> [..., 2, H, K]
    pure = params(gqa)
    for block in pure["h"]["blocks"].values():
      q, kv = block["attn"].pop("q"), block["attn"].pop("kv")
      block["attn"]["qkv"] = {k: jnp.concatenate([q[k][..., None, :, :], expand(kv[k])], axis=-3)
                              for k in ("kernel", "bias")}
    load(mha, pure)
    return forward(mha, toks)

  want = forward(gqa, toks)
  np.testing.assert_allclose(as_mha(lambda x: jnp.repeat(x, 2, axis=-2)), want, atol=1e-5, rtol=0)
  # Tiled instead (head h reading h % G), it is another model: the comparison tells them apart.
  tiled = as_mha(lambda x: jnp.tile(x, (1,) * (x.ndim - 2) + (2, 1)))
  assert np.abs(np.asarray(tiled - want)).max() > 1e-3


def test_swiglu_mlp_is_silu_of_the_gate_times_the_up_projection():
  with nnx.use_eager_sharding(False):
    mlp = models.MLP(models._Common(tiny_cfg("gpt", mlp="swiglu")), approximate_gelu=True, out_std=0.3,
                     rngs=nnx.Rngs(0))
  mlp.fc.bias[...] = jax.random.normal(jax.random.key(1), mlp.fc.bias.shape)
  mlp.proj.bias[...] = jax.random.normal(jax.random.key(2), mlp.proj.bias.shape)
  x_BTD = jax.random.normal(jax.random.key(3), (B, 5, 64))
  w, b = np.asarray(mlp.fc.kernel[...], np.float64), np.asarray(mlp.fc.bias[...], np.float64)
  assert w.shape == (64, 2, 128)
  x = np.asarray(x_BTD, np.float64)
  gate_BTF, up_BTF = x @ w[:, 0] + b[0], x @ w[:, 1] + b[1]
  h_BTF = gate_BTF / (1 + np.exp(-gate_BTF)) * up_BTF
  want_BTD = h_BTF @ np.asarray(mlp.proj.kernel[...], np.float64) + np.asarray(mlp.proj.bias[...], np.float64)
  np.testing.assert_allclose(np.asarray(mlp(x_BTD)), want_BTD, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm_vjp_matches_autodiff_and_keeps_no_float32_activations(dtype, capsys):
  """The hand-written RMSNorm backward equals autodiff of x / rms(x) * scale, and the forward keeps the
  input and a per-row statistic for it, no float32 [..., D] copy."""
  k = jax.random.split(jax.random.key(0), 3)
  x = (jax.random.normal(k[0], (3, 5, 64)) * 3 + 1).astype(dtype)
  scale, w = 1 + 0.1 * jax.random.normal(k[1], (64,)), jax.random.normal(k[2], (3, 5, 64))

  def autodiff(x, s, eps, dtype):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps) * s).astype(dtype)

  def grads(fn):
    loss = lambda x, s: (fn(x, s, 1e-5, dtype).astype(jnp.float32) * w).sum()
    return jax.value_and_grad(loss, argnums=(0, 1))(x, scale)

  (v, g), (v_ref, g_ref) = grads(models.rms_norm), grads(autodiff)
  assert float(v) == float(v_ref)
  for a, b in zip(g, g_ref):
    assert a.dtype == b.dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16: the same float32 math, one rounding of dx
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(lambda x: models.rms_norm(x, scale, 1e-5, dtype).astype(jnp.float32).sum(), x)
  kept = capsys.readouterr().out.strip().splitlines()
  name = {jnp.float32: "f32", jnp.bfloat16: "bf16"}[dtype]
  assert [line for line in kept if "[3,5,64]" in line] == [f"{name}[3,5,64] from the argument x"], kept
