"""Pretraining losses: causal LM for GPT, masked LM for BERT.

Each returns summed loss and weight so that gradient accumulation and multi-host means
stay exact: the mean is taken once, over the whole global batch.

Legend: B batch, T sequence, M masked positions per row, X either (T or M), V vocabulary, D model,
N the rows B*X flattened, C rows a chunk, S chunks.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fmjax import attention


def cross_entropy(logits_BXV: jax.Array, targets_BX: jax.Array, weights_BX: jax.Array):
  """Summed weighted cross-entropy, weight sum and number of correct argmax predictions."""
  logits_BXV = logits_BXV.astype(jnp.float32)
  logz_BX = jax.nn.logsumexp(logits_BXV, axis=-1)
  target_logit_BX = jnp.take_along_axis(logits_BXV, targets_BX[..., None], axis=-1)[..., 0]
  nll_BX = logz_BX - target_logit_BX
  correct_BX = (jnp.argmax(logits_BXV, axis=-1) == targets_BX).astype(jnp.float32)
  return (jnp.sum(nll_BX * weights_BX), jnp.sum(weights_BX), jnp.sum(correct_BX * weights_BX))


def _fused_forward(h_ND, w_VD, b_V, targets_N, weights_N, chunk: int):
  """Loss, correct count and both gradients, one chunk of rows at a time.

  Only a float32 [chunk, V] block of logits ever exists (the matmul runs in the compute dtype of
  `h_ND`); the softmax statistics are float32. Gradients are produced in the same pass, so the
  backward pass is a multiply by the incoming cotangent. `b_V` (BERT's decoder bias) may be None.
  """
  n, d = h_ND.shape
  dtype = h_ND.dtype
  w_VD_c = w_VD.astype(dtype)
  chunk = min(chunk, n)  # fewer rows than a chunk: one chunk of exactly those, no padding
  pad = (-n) % chunk
  if pad:
    h_ND = jnp.pad(h_ND, ((0, pad), (0, 0)))
    targets_N = jnp.pad(targets_N, (0, pad))
    weights_N = jnp.pad(weights_N, (0, pad))
  steps = h_ND.shape[0] // chunk
  h_SCD = h_ND.reshape(steps, chunk, d)
  t_SC = targets_N.reshape(steps, chunk)
  w_SC = weights_N.reshape(steps, chunk).astype(jnp.float32)

  def body(carry, xs):
    dw_VD, db_V = carry
    h_CD, t_C, wt_C = xs
    # The matmul writes float32, as `cross_entropy`'s logits are. Rounded to bf16, a logit is off
    # by up to half a bf16 step of its size, not of its distance from the row's other logits, and a
    # trained tied head can shift whole rows far from 0: rows at -80 biased the mean loss up by
    # 0.01 nats and put 10x the float32 logits' error into both gradients (tests/test_train.py).
    # bf16 logits had bought 0.75% tokens/s (benchmarks/README.md).
    l32_CV = jnp.dot(h_CD, w_VD_c.T, preferred_element_type=jnp.float32)
    if b_V is not None:
      l32_CV = l32_CV + b_V.astype(jnp.float32)
    lse_C = jax.nn.logsumexp(l32_CV, axis=-1)
    onehot_CV = jax.nn.one_hot(t_C, l32_CV.shape[-1], dtype=jnp.float32)
    target_C = jnp.sum(l32_CV * onehot_CV, axis=-1)
    nll = jnp.sum((lse_C - target_C) * wt_C)
    correct = jnp.sum((jnp.argmax(l32_CV, axis=-1) == t_C) * wt_C)
    dlogits_CV = ((jnp.exp(l32_CV - lse_C[:, None]) - onehot_CV) * wt_C[:, None]).astype(dtype)
    dh_CD = jnp.dot(dlogits_CV, w_VD_c, preferred_element_type=jnp.float32).astype(dtype)
    dw_VD = dw_VD + jnp.dot(dlogits_CV.T, h_CD, preferred_element_type=jnp.float32)
    if b_V is not None:
      db_V = db_V + dlogits_CV.astype(jnp.float32).sum(0)
    return (dw_VD, db_V), (nll, correct, dh_CD)

  db0 = None if b_V is None else jnp.zeros(b_V.shape, jnp.float32)
  (dw_VD, db_V), (nll_S, correct_S, dh_SCD) = jax.lax.scan(
      body, (jnp.zeros(w_VD.shape, jnp.float32), db0), (h_SCD, t_SC, w_SC))
  dh_ND = dh_SCD.reshape(-1, d)[:n]
  db_V = None if b_V is None else db_V.astype(b_V.dtype)
  return jnp.sum(nll_S), jnp.sum(correct_S), dh_ND, dw_VD.astype(w_VD.dtype), db_V


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def fused_lm_head_loss(h_ND, w_VD, b_V, targets_N, weights_N, chunk: int = 2048):
  """Summed cross-entropy of `h_ND @ w_VD.T (+ b_V)` against targets, and the weighted correct count.

  Equal to `cross_entropy(h @ w.T + b, ...)` but never materialises the [N, V] logits: the
  large-vocabulary fast path for the tied LM head. `b_V` may be None (GPT has no bias).
  """
  nll, correct, _, _, _ = _fused_forward(h_ND, w_VD, b_V, targets_N, weights_N, chunk)
  return nll, correct


def _fused_fwd(h_ND, w_VD, b_V, targets_N, weights_N, chunk):
  nll, correct, dh_ND, dw_VD, db_V = _fused_forward(h_ND, w_VD, b_V, targets_N, weights_N, chunk)
  return (nll, correct), (dh_ND, dw_VD, db_V)


def _fused_bwd(chunk, residuals, cotangents):
  dh_ND, dw_VD, db_V = residuals
  g_nll, _ = cotangents
  # In float32, rounded once: float16's loss scale over the positions (the cotangent) is seldom a power of two.
  scaled = lambda g: None if g is None else (g.astype(jnp.float32) * g_nll.astype(jnp.float32)).astype(g.dtype)
  return (scaled(dh_ND), scaled(dw_VD), scaled(db_V), None, None)


fused_lm_head_loss.defvjp(_fused_fwd, _fused_bwd)


def _row_axes(mesh, n_rows: int, batch_rows: int) -> tuple[str, ...]:
  """Axes of `mesh` to split the loss's rows over: those the batch is sharded on, then any other axis
  (tensor, or one the batch did not divide) while the rows still divide evenly."""
  spec = attention.logical_spec(("batch",), (batch_rows,))
  axes = () if spec is None or spec[0] is None else (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])
  for name in mesh.axis_names:
    if name not in axes and mesh.shape[name] > 1 and n_rows % (math.prod(mesh.shape[a] for a in axes)
                                                                * mesh.shape[name]) == 0:
      axes += (name,)
  return axes


def fused_cross_entropy(x_BXD, w_VD, b_V, targets_BX, weights_BX, chunk: int):
  """`cross_entropy` of the logits `x @ w.T (+ b)` through `fused_lm_head_loss`: same outputs,
  no [B, X, V] logits.

  Under a mesh each device runs the chunked loop over its own rows only (`shard_map`), with the
  head's weight whole; left to SPMD partitioning, a scan over rows sharded on the batch gathers
  every row onto every device and computes the head once per device, or all-reduces each
  chunk's logits when the weight is sharded on D.
  """
  d = x_BXD.shape[-1]
  x_ND, t_N, wt_N = x_BXD.reshape(-1, d), targets_BX.reshape(-1), weights_BX.reshape(-1)
  mesh = jax.sharding.get_abstract_mesh()
  axes = () if mesh.empty or mesh.size == 1 else _row_axes(mesh, x_ND.shape[0], x_BXD.shape[0])
  if not axes:
    loss, correct = fused_lm_head_loss(x_ND, w_VD, b_V, t_N, wt_N, chunk)
    return loss, jnp.sum(weights_BX), correct

  def local(x_ND, w_VD, t_N, wt_N, *b_V):
    loss, correct = fused_lm_head_loss(x_ND, w_VD, b_V[0] if b_V else None, t_N, wt_N, chunk)
    return jax.lax.psum(loss, axes), jax.lax.psum(correct, axes)

  rows, bias = P(axes), () if b_V is None else (b_V,)
  # check_vma=False: the transpose then sums the weight's gradient over the devices itself.
  loss, correct = jax.shard_map(local, in_specs=(rows, P(), rows, rows) + (P(),) * len(bias),
                                out_specs=(P(), P()), check_vma=False)(x_ND, w_VD, t_N, wt_N, *bias)
  return loss, jnp.sum(weights_BX), correct


def clm_loss(model, batch, *, deterministic: bool = True, rngs=None, fused_chunk: int = 0):
  """Next-token loss; `batch['loss_weights']` zeroes the targets that carry none (padding rows, and
  in SFT the prompt's).

  With `fused_chunk` > 0 the LM head and the loss run chunk by chunk
  (`fused_lm_head_loss`), which is faster and far leaner for large vocabularies.
  """
  kwargs = dict(positions_BT=batch["positions"], segment_ids_BT=attention.packing_of(batch),
                deterministic=deterministic, rngs=rngs)
  if fused_chunk:
    loss, weight, correct = fused_cross_entropy(model.hidden(batch["inputs"], **kwargs),
                                                model.head_table().embedding[...], None, batch["targets"],
                                                batch["loss_weights"], fused_chunk)
  else:
    logits_BTV = model(batch["inputs"], **kwargs)
    loss, weight, correct = cross_entropy(logits_BTV, batch["targets"], batch["loss_weights"])
  return loss, {"loss_sum": loss, "weight_sum": weight, "correct_sum": correct}


def mlm_loss(model, batch, *, deterministic: bool = True, rngs=None, fused_chunk: int = 0):
  """Masked-LM loss computed on the masked positions only (the head never sees the rest).

  With `fused_chunk` > 0 the tied decoder (plus its bias) and the loss run chunk by chunk
  (`fused_lm_head_loss`), with no float32 [B, M, V] logits.
  """
  kwargs = dict(token_types_BT=batch["token_types"], positions_BT=batch["positions"],
                segment_ids_BT=attention.packing_of(batch), deterministic=deterministic, rngs=rngs)
  if fused_chunk:
    x_BMD = model.mlm_features(model.hidden(batch["inputs"], **kwargs), batch["mlm_positions"])
    loss, weight, correct = fused_cross_entropy(x_BMD, model.embeddings.word_embeddings.embedding[...],
                                                model.mlm_bias[...], batch["mlm_targets"], batch["mlm_weights"],
                                                fused_chunk)
  else:
    logits_BMV = model(batch["inputs"], mlm_positions_BM=batch["mlm_positions"], **kwargs)
    loss, weight, correct = cross_entropy(logits_BMV, batch["mlm_targets"], batch["mlm_weights"])
  return loss, {"loss_sum": loss, "weight_sum": weight, "correct_sum": correct}


LOSSES = {"clm": clm_loss, "mlm": mlm_loss}


def get_loss_fn(config):
  """The loss for `config.train.objective`, with the model's loss fast paths bound."""
  return partial(LOSSES[config.train.objective], fused_chunk=int(config.model.fused_loss_chunk))
