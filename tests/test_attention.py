"""Attention masking semantics and kernel parity with the XLA reference.

Shape legend: B batch, T sequence, H heads, K head dim, R runs of segment ids a row.
"""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from fmjax import attention as attn
from fmjax import config_lib
from fmjax.data import packing as packing_lib

B, T, H, K = 2, 128, 2, 16
# Row 0: three packed documents then padding; row 1: one document filling the row.
SEGMENTS_BT = jnp.array([[1] * 40 + [2] * 50 + [3] * 10 + [0] * 28, [1] * 128], jnp.int32)


def _qkv(seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, (B, T, H, K), dtype) for k in keys]


def _dense_reference(q, k, v, mask_BTS):
  """Plain numpy softmax attention with an explicit boolean mask."""
  q, k, v, mask_BTS = map(np.asarray, (q, k, v, mask_BTS))
  logits = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask_BTS[:, None], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhts,bshk->bthk", probs, v)


@pytest.mark.parametrize("causal", [True, False])
def test_xla_matches_explicit_mask(causal):
  q, k, v = _qkv()
  seg = np.asarray(SEGMENTS_BT)
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  mask_BTS = (seg[:, :, None] == seg[:, None, :]) & ((j <= i) if causal else True)
  out = attn.attention(q, k, v, causal=causal, segment_ids_BT=SEGMENTS_BT, kernel="xla")
  np.testing.assert_allclose(out, _dense_reference(q, k, v, mask_BTS), atol=1e-5, rtol=1e-5)
  assert np.isfinite(np.asarray(out)).all()  # pad rows attend pads, never an all-masked row


def test_multi_head_attention_is_the_plain_einsums_with_no_grouped_reshapes():
  """G == H (every model without grouped-query attention) runs the einsums GPT-2 and BERT always ran:
  the grouped form's reshapes added transposes and copies to XLA's program and moved the gradients' bits."""
  q, k, v = _qkv(2)

  def plain(q, k, v):
    logits_BHTS = jnp.einsum("bthk,bshk->bhts", q, k, preferred_element_type=jnp.float32) / np.sqrt(K)
    logits_BHTS = jnp.where(attn.make_mask(SEGMENTS_BT, SEGMENTS_BT, causal=True, T=T, S=T), logits_BHTS,
                            jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(logits_BHTS, axis=-1), v)

  def xla(q, k, v):
    return attn.attention(q, k, v, causal=True, segment_ids_BT=SEGMENTS_BT, kernel="xla")

  grads = [jax.jit(jax.grad(lambda *a, f=f: (f(*a) ** 2).sum(), argnums=(0, 1, 2)))(q, k, v) for f in (plain, xla)]
  for g, g_ref in zip(grads[1], grads[0]):
    np.testing.assert_array_equal(g, g_ref)
  assert "reshape" not in jax.jit(xla).lower(q, k, v).as_text()


def test_segments_are_isolated_and_causal():
  q, k, v = _qkv()
  out = attn.attention(q, k, v, causal=True, segment_ids_BT=SEGMENTS_BT, kernel="xla")
  # Perturb segment 2 (positions 40..89) and the future of position 20 inside segment 1.
  k2 = k.at[0, 40:90].add(1.0).at[0, 30:40].add(1.0)
  v2 = v.at[0, 40:90].add(1.0).at[0, 30:40].add(1.0)
  out2 = attn.attention(q, k2, v2, causal=True, segment_ids_BT=SEGMENTS_BT, kernel="xla")
  np.testing.assert_array_equal(out[0, :30], out2[0, :30])     # past of segment 1: unchanged
  np.testing.assert_array_equal(out[0, 90:], out2[0, 90:])     # later segments: unchanged
  assert not np.allclose(out[0, 40:90], out2[0, 40:90])        # the perturbed segment did change
  np.testing.assert_array_equal(out[1], out2[1])               # other rows untouched


def test_bidirectional_sees_future_but_not_other_segments():
  q, k, v = _qkv()
  out = attn.attention(q, k, v, causal=False, segment_ids_BT=SEGMENTS_BT, kernel="xla")
  k2, v2 = k.at[0, 39].add(1.0), v.at[0, 39].add(1.0)  # last token of segment 1
  out2 = attn.attention(q, k2, v2, causal=False, segment_ids_BT=SEGMENTS_BT, kernel="xla")
  assert not np.allclose(out[0, 0], out2[0, 0])  # the first token sees the last one
  np.testing.assert_array_equal(out[0, 40:], out2[0, 40:])


def test_no_segments_means_one_segment():
  q, k, v = _qkv()
  ones = jnp.ones((B, T), jnp.int32)
  for causal in (True, False):
    a = attn.attention(q, k, v, causal=causal, kernel="xla")
    b = attn.attention(q, k, v, causal=causal, segment_ids_BT=ones, kernel="xla")
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_dropout_drops_probabilities_and_rescales_the_rest(causal):
  """With v = identity the output is the probability matrix itself: each allowed entry is dropped
  (0) or kept and scaled by 1/(1-rate), masked entries stay 0, and about `rate` of them drop."""
  rate = 0.25
  q, k, _ = _qkv()
  eye_BSHK = jnp.broadcast_to(jnp.eye(T)[None, :, None, :], (B, T, H, T))  # K = T: value j is one-hot at j
  run = lambda **kw: np.asarray(attn.attention(q, k, eye_BSHK, causal=causal, segment_ids_BT=SEGMENTS_BT,
                                               kernel="xla", **kw))
  probs_BTHS = run()
  np.testing.assert_array_equal(run(dropout_rate=rate), probs_BTHS)  # no key: no dropout (eval)
  np.testing.assert_array_equal(run(dropout_rate=0.0, dropout_key=jax.random.key(0)), probs_BTHS)
  dropped_BTHS = run(dropout_rate=rate, dropout_key=jax.random.key(0))
  np.testing.assert_array_equal(dropped_BTHS, run(dropout_rate=rate, dropout_key=jax.random.key(0)))
  assert not np.array_equal(dropped_BTHS, run(dropout_rate=rate, dropout_key=jax.random.key(1)))
  allowed = probs_BTHS > 0
  np.testing.assert_array_equal(dropped_BTHS[~allowed], 0.0)  # other segments and the future stay unseen
  kept = dropped_BTHS[allowed] != 0
  np.testing.assert_allclose(dropped_BTHS[allowed][kept], probs_BTHS[allowed][kept] / (1 - rate), rtol=1e-5)
  assert abs(1 - kept.mean() - rate) < 0.01  # ~ 2e5 allowed entries


def test_attention_dropout_is_unbiased():
  """Averaged over keys, dropped attention converges to the plain output (inverted dropout)."""
  q, k, v = _qkv()
  plain = attn.attention(q, k, v, causal=True, segment_ids_BT=SEGMENTS_BT, kernel="xla")
  keys = jax.random.split(jax.random.key(7), 400)
  mean = jax.jit(jax.vmap(lambda key: attn.attention(q, k, v, causal=True, segment_ids_BT=SEGMENTS_BT,
                                                     kernel="xla", dropout_rate=0.5, dropout_key=key)))(keys)
  err = np.abs(np.asarray(mean.mean(0) - plain))
  one = np.abs(np.asarray(mean[0] - plain))
  assert err.mean() < 0.1 * one.mean()  # 400 draws: about 1/20 of one draw's deviation


def test_attention_dropout_takes_the_xla_kernel():
  with attn.compiling_for("gpu"):
    assert attn.resolve_kernel("auto", jnp.bfloat16) == "cudnn"
    assert attn.resolve_kernel("auto", jnp.bfloat16, dropout=True) == "xla"
    with pytest.raises(attn.AttentionError, match="attention_dropout=0"):
      attn.resolve_kernel("cudnn", jnp.bfloat16, dropout=True)
  with attn.compiling_for("tpu"):
    assert attn.resolve_kernel("auto", jnp.bfloat16, (128, 128), dropout=True) == "xla"
    with pytest.raises(attn.AttentionError, match="no attention-probability dropout"):
      attn.resolve_kernel("splash", jnp.bfloat16, dropout=True)


@pytest.mark.parametrize("causal,blocks,heads,kv_heads", [(True, 1, H, H), (False, 1, H, H), (True, 3, H, H),
                                                         (True, 1, 4, 2)])
def test_splash_matches_xla(causal, blocks, heads, kv_heads):
  # blocks=3: T=384, three of the kernel's 128-blocks, documents running across block edges. 4 heads, 2 key/value
  # heads: grouped-query attention, query heads 0, 1 reading key/value head 0 and 2, 3 head 1 (in both kernels).
  keys = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(keys[0], (B, blocks * T, heads, K))
  k, v = (jax.random.normal(key, (B, blocks * T, kv_heads, K)) for key in keys[1:])
  long_BT = jnp.array([[1] * 140 + [2] * 200 + [3] * 20 + [0] * 24, [1] * 384], jnp.int32)
  segment_ids_BT = long_BT if blocks > 1 else SEGMENTS_BT

  def run(kernel):
    def loss(q, k, v):
      out = attn.attention(q, k, v, causal=causal, segment_ids_BT=segment_ids_BT, kernel=kernel)
      return jnp.sum(out * jnp.cos(jnp.arange(K))), out
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

  (_, out_ref), grads_ref = run("xla")
  (_, out), grads = run("splash")
  assert out.shape == (B, blocks * T, heads, K) and grads[1].shape == k.shape
  np.testing.assert_allclose(out, out_ref, atol=1e-5)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, atol=2e-5)


def test_splash_kernel_is_reused_by_a_second_jitted_program():
  """The train step and then the eval step trace splash at one shape; the kernel cached by the first
  must hold no tracer of it (before: UnexpectedTracerError at a run's first eval)."""
  q = jax.random.normal(jax.random.key(2), (1, T, H, K))
  f = lambda q: attn.attention(q, q, q, causal=True, kernel="splash").sum()
  grad = jax.jit(jax.grad(f))(q)
  np.testing.assert_allclose(jax.jit(f)(q), jax.jit(lambda q: attn.attention(q, q, q, causal=True).sum())(q),
                             rtol=1e-5)
  assert np.isfinite(grad).all()


def test_tracing_splash_for_a_tpu_puts_nothing_on_a_device():
  """`fmjax plan --topology` traces under a mesh of TPU devices this host cannot run: making the kernel
  must run nothing (before: its mask arrays were made eagerly, and planning any splash step failed)."""
  q = jax.ShapeDtypeStruct((B, T, H, K), jnp.bfloat16)
  f = lambda q: attn.attention(q, q, q, causal=True, kernel="auto").sum()
  with jax.transfer_guard("disallow"), attn.compiling_for("tpu"):
    for step in (jax.grad(f), f):  # the train step, then the eval step at the same shape
      assert "tpu_custom_call" in jax.jit(step).trace(q).lower(lowering_platforms=("tpu",)).as_text()


def test_splash_runs_sharded_under_a_mesh():
  """Splash is wrapped in shard_map over batch and heads; results equal the unsharded kernel."""
  q, k, v = _qkv(2)
  ref = attn.attention(q, k, v, causal=True, segment_ids_BT=SEGMENTS_BT, kernel="xla")
  mesh = jax.make_mesh((1, 2, 2, 2), ("dcn_data", "data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 4)
  rules = (("batch", ("data", "fsdp")), ("heads", "tensor"))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    assert attn.logical_spec(("batch", None, "heads", None)) == jax.P(("data", "fsdp"), None, "tensor", None)
    # B=2 does not divide over data*fsdp=4: the spec falls back to the axes that divide it.
    assert attn.logical_spec(("batch", None, "heads", None), q.shape) == jax.P("data", None, "tensor", None)
    run = jax.jit(lambda q, k, v: attn.attention(q, k, v, causal=True, segment_ids_BT=SEGMENTS_BT, kernel="splash"))
    out = run(q, k, v)
    # Grouped-query attention: 4 query heads (over tensor=2) reading the 2 key/value heads.
    q4_BTHK = jnp.concatenate([q, -q], axis=2)
    out4 = run(q4_BTHK, k, v)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  np.testing.assert_allclose(out4, attn.attention(q4_BTHK, k, v, causal=True, segment_ids_BT=SEGMENTS_BT), atol=1e-5)


def test_auto_on_several_tpu_chips_without_a_mesh_takes_xla(monkeypatch, caplog):
  """A notebook's direct fill_mask on a TPU VM: params on 8 chips, no mesh in context. XLA could not
  partition splash's Mosaic kernel there; inside a mesh (generate.on_mesh, training) splash runs per shard."""
  monkeypatch.setattr(attn.jax, "default_backend", lambda: "tpu")
  assert jax.device_count() > 1 and attn.target_platform() == "tpu"
  with caplog.at_level(logging.INFO, logger="fmjax"):
    assert attn.resolve_kernel("auto", jnp.bfloat16, (128, 128)) == "xla"
  assert "outside a mesh on 8 TPU devices" in caplog.text and "generate.on_mesh(model, config)" in caplog.text
  assert attn.resolve_kernel("splash", jnp.bfloat16, (128, 128)) == "splash"  # named, it is kept
  mesh = jax.make_mesh((1, 8, 1, 1), ("dcn_data", "data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 4)
  with jax.set_mesh(mesh):
    assert attn.resolve_kernel("auto", jnp.bfloat16, (128, 128)) == "splash"
  with attn.compiling_for("tpu"):  # `fmjax plan --topology` resolves for the topology's mesh
    assert attn.resolve_kernel("auto", jnp.bfloat16, (128, 128)) == "splash"


def test_logical_spec_without_mesh_is_none():
  with nnx.logical_axis_rules(config_lib.DEFAULT_RULES):
    assert attn.logical_spec(("batch", "length")) is None


def test_splash_rejects_unaligned_length():
  q = jnp.zeros((1, 100, H, K))
  with pytest.raises(ValueError, match="multiple of 128"):
    attn.attention(q, q, q, causal=True, kernel="splash")


def test_compiling_for_tpu_lowers_splash_to_its_mosaic_kernel():
  """A CPU host compiling for a TPU (`fmjax plan --topology`) traces "auto" as splash and lowers it
  to the Mosaic TPU kernel, never to Pallas interpret mode."""
  q = jax.ShapeDtypeStruct((B, T, H, K), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((B, T), jnp.int32)

  def tpu_kernels(kernel, platform):
    loss = lambda q, k, v, s: attn.attention(q, k, v, causal=True, segment_ids_BT=s, kernel=kernel).sum()
    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return step.trace(q, q, q, seg).lower(lowering_platforms=(platform,)).as_text().count("tpu_custom_call")

  with attn.compiling_for("tpu"):
    assert attn.target_platform() == "tpu" and attn.resolve_kernel("auto", jnp.bfloat16) == "splash"
    assert attn.resolve_kernel("auto", jnp.bfloat16, (1024, 1024)) == "splash"
    assert attn.resolve_kernel("auto", jnp.bfloat16, (100, 100)) == "xla"  # what splash cannot tile
    with pytest.raises(attn.AttentionError, match="multiple of 128"):  # named, it still says why not
      jax.eval_shape(lambda q: attn.attention(q, q, q, causal=True, kernel="splash"),
                     jax.ShapeDtypeStruct((1, 100, H, K), jnp.bfloat16))
    assert tpu_kernels("auto", "tpu") == 3  # forward, dq, dk and dv
  assert attn.target_platform() == jax.default_backend()
  if jax.default_backend() != "tpu":
    assert tpu_kernels("splash", jax.default_backend()) == 0  # interpret mode: plain HLO


def test_resolve_kernel():
  expected = {"cpu": "xla", "gpu": "cudnn", "tpu": "splash"}[jax.default_backend()]
  assert attn.resolve_kernel("auto", jnp.bfloat16) == expected
  assert attn.resolve_kernel("xla") == "xla"
  with pytest.raises(ValueError, match="unknown attention kernel"):
    attn.resolve_kernel("flash")


def _packing(seg_BT, num_runs=packing_lib.MAX_RUNS):
  """`seg_BT` with its runs computed on the host as the loader does; the bare ids if they do not fit."""
  runs = packing_lib.segment_runs(np.asarray(seg_BT), num_runs)
  if runs is None:
    return seg_BT
  return attn.Packing(seg_BT, jnp.asarray(runs["segment_lengths"]), jnp.asarray(runs["segment_offsets"]))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
@pytest.mark.parametrize("causal,kv_heads", [(True, H), (False, H), (True, 1)])
def test_cudnn_matches_xla(causal, kv_heads):
  q, k, v = _qkv(3, jnp.bfloat16)
  k, v = k[:, :, :kv_heads], v[:, :, :kv_heads]  # kv_heads < H: grouped-query attention, which cuDNN takes as is
  # The packed layout (the runs sent along), then the mask path: bare ids, more runs than
  # MAX_RUNS, and an id that comes back after another.
  many_BT = jnp.asarray(np.repeat(np.arange(1, 33), T // 32)[None].repeat(B, 0), jnp.int32)
  interleaved_BT = SEGMENTS_BT.at[0, 100:110].set(1)
  assert isinstance(_packing(SEGMENTS_BT), attn.Packing)
  assert not isinstance(_packing(many_BT), attn.Packing) and not isinstance(_packing(interleaved_BT), attn.Packing)
  for seg in (None, _packing(SEGMENTS_BT), SEGMENTS_BT, _packing(many_BT), _packing(interleaved_BT)):
    ref = attn.attention(q, k, v, causal=causal, segment_ids_BT=seg, kernel="xla")
    out = attn.attention(q, k, v, causal=causal, segment_ids_BT=seg, kernel="cudnn")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)
    g = lambda kern: jax.grad(lambda q: attn.attention(
        q, k, v, causal=causal, segment_ids_BT=seg, kernel=kern).astype(jnp.float32).sum())(q)
    np.testing.assert_allclose(np.asarray(g("cudnn"), np.float32), np.asarray(g("xla"), np.float32), atol=5e-2)


def _runs_mask(lengths_BR, offsets_BR1, T):
  """[B, T, T]: tokens in the same run of cuDNN's packed layout attend each other."""
  run_BT = np.zeros((lengths_BR.shape[0], T), np.int32)
  for b, r in zip(*np.nonzero(lengths_BR >= 0)):
    assert offsets_BR1[b, r] >= 0 and (run_BT[b, offsets_BR1[b, r]:offsets_BR1[b, r] + lengths_BR[b, r]] == 0).all()
    run_BT[b, offsets_BR1[b, r]:offsets_BR1[b, r] + lengths_BR[b, r]] = r + 1
  assert (run_BT > 0).all(), "a token outside every run would have no output"
  assert (offsets_BR1[:, -1] == -1).all() and ((lengths_BR >= 0) == (offsets_BR1[:, :-1] >= 0)).all()
  return run_BT[:, :, None] == run_BT[:, None, :]


def test_segment_runs_are_the_packing():
  """The lengths and offsets the loader sends for cuDNN's packed layout describe exactly the
  packing mask; rows whose runs are not their segments get none."""
  rng = np.random.default_rng(0)
  rows = [np.array([1] * 40 + [2] * 50 + [3] * 10 + [0] * 28), np.ones(T, np.int64), np.zeros(T, np.int64)]
  for _ in range(6):  # random documents, then padding
    lens = rng.integers(1, 40, 8)
    row = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)] + [np.zeros(T, np.int64)])[:T]
    rows.append(row)
  seg_BT = np.stack(rows).astype(np.int32)
  runs = packing_lib.most_runs(seg_BT)
  assert runs == max(1 + np.count_nonzero(np.diff(r)) for r in rows)
  got = packing_lib.segment_runs(seg_BT, runs)
  lengths_BR, offsets_BR1 = got["segment_lengths"], got["segment_offsets"]
  assert lengths_BR.shape == (len(rows), runs) and offsets_BR1.shape == (len(rows), runs + 1)
  assert lengths_BR.dtype == offsets_BR1.dtype == np.int32
  want = np.asarray(attn.make_mask(jnp.asarray(seg_BT), jnp.asarray(seg_BT), causal=False, T=T, S=T))[:, 0]
  np.testing.assert_array_equal(_runs_mask(lengths_BR, offsets_BR1, T), want)
  # More runs than asked for, or an id that comes back: no runs (cuDNN takes the mask).
  assert packing_lib.segment_runs(seg_BT, runs - 1) is None
  seg_BT[3, -1] = 1
  assert packing_lib.segment_runs(seg_BT, T) is None
  assert packing_lib.segment_runs(np.array([[1, 1, 0, 0, 2, 2, 0, 0]]), 8) is None  # pads in two runs


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_path_lowers_for_cuda(causal, as_if_on_an_h100):
  """Off a GPU, the cuDNN path still traces, differentiates and lowers for CUDA, with no
  device-side branch: the packed kernels when the runs come along, else the masked ones."""
  q = jax.ShapeDtypeStruct((B, T, H, 64), jnp.bfloat16)
  h100 = as_if_on_an_h100

  def calls(seg):
    loss = lambda q, k, v, seg: attn.attention(
        q, k, v, causal=causal, segment_ids_BT=seg, kernel="cudnn").astype(jnp.float32).sum()
    return h100.cudnn_calls(jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, q, q, seg))

  assert calls(_packing(SEGMENTS_BT)) == h100.PACKED
  assert calls(SEGMENTS_BT) == h100.MASKED


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_kernels_scale_and_mask_as_the_reference_does(causal, as_if_on_an_h100):
  """Off a GPU, read off the lowering what cuDNN is told: scale 1/sqrt(K), and its causal mask exactly
  when the attention is causal, on the packed path and on the mask path."""
  q = jax.ShapeDtypeStruct((B, T, H, 64), jnp.bfloat16)
  for seg in (_packing(SEGMENTS_BT), SEGMENTS_BT):
    f = jax.jit(lambda q, k, v, seg: attn.attention(q, k, v, causal=causal, segment_ids_BT=seg, kernel="cudnn"))
    text = f.trace(q, q, q, seg).lower(lowering_platforms=("cuda",)).as_text()
    assert {float(x) for x in re.findall(r"fmha_scale\\22: ([-0-9.e]+)", text)} == {1 / 8}
    assert set(re.findall(r"mask_type\\22: \\22(\w+)", text)) == {"CAUSAL" if causal else "NO_MASK"}


def test_cudnn_off_gpu_is_a_clear_error():
  if jax.default_backend() == "gpu":
    pytest.skip("GPU present")
  q = jnp.zeros((1, 8, 1, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match="needs a GPU"):
    attn.attention(q, q, q, causal=True, kernel="cudnn")
