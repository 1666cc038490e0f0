"""GPT-2 decoder and BERT encoder in Flax NNX.

Both follow the original architectures closely enough that Hugging Face weights map onto them
one to one (names in comments). The decoder also takes the choices later decoders made (rotary
positions, RMSNorm, SwiGLU, grouped-query attention, no biases, an untied head; Qwen's q/k/v biases,
q/k norms and a head width of its own), each a `model.*` setting; the first six together are Llama's
architecture (`configs/gpt.py:small,llama`), with model.qkv_bias Qwen2's, with model.qk_norm Qwen3's.
Every parameter carries logical axis names (vocab, embed, mlp, heads, kv_heads, kv, layers, norm);
the config's `logical_axis_rules` maps them onto the mesh.

Layers are either a Python list of blocks (unrolled) or one block whose parameters are stacked on
a leading "layers" axis and run with `nnx.scan`; `stack_layers` / `unstack_layers` convert a
parameter state between the two layouts.

Shape legend: B batch, T sequence, D model, H heads, G key/value heads, K head dim, F mlp, V vocab,
J half a head (rotary pairs), M masked positions, L layers, S KV-cache positions, N rows of a small
embedding table; Bx any leading axes.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from fmjax import attention as attention_lib
from fmjax.config_lib import ConfigError

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}
STACK_KEY = "blocks"  # the attribute that holds the layers, stacked or as a list
ONE_HOT_MAX_ROWS = 1024  # embedding tables up to this size are read by one-hot matmul


def _constrain(x, names):
  """Logical sharding constraint on an activation; a no-op without a mesh and rules."""
  spec = attention_lib.logical_spec(names)
  return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def _param(rngs, init, shape, names, dtype):
  return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, dtype))


def _dropout(x, rate: float, key, deterministic: bool):
  """Inverted dropout from an explicit key, so scanned and unrolled layers draw identical masks."""
  if deterministic or rate == 0.0:
    return x
  if key is None:
    raise ValueError("dropout needs a key: call the model with rngs=nnx.Rngs(dropout=key)")
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _fold(key, i: int):
  return None if key is None else jax.random.fold_in(key, i)


@jax.custom_vjp
def add_bias(y, bias):
  """y + bias in y's dtype, with the bias gradient summed over the rows in float32.

  Every token shares a bias, so its gradient sums all their cotangents; autodiff of the add sums in
  y's dtype, which in bfloat16 rounds at every add (a few percent off over a batch's tokens). The
  forward pass is the plain add.
  """
  return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
  return add_bias(y, bias), bias  # a parameter, kept anyway: only its shape and dtype are read


def _add_bias_bwd(bias, dy):
  rows = tuple(range(dy.ndim - bias.ndim))
  return dy, dy.astype(jnp.float32).sum(rows).astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class Dense(nnx.Module):
  """y = x . W + b contracting the last len(in_shape) axes of x; W is stored as in_shape + out_shape."""

  # Whether y == project(x) + b, so a caller may add the bias itself (`MLP` fuses it into GELU).
  # A subclass that changes y after the bias (`peft.AdapterDense`) sets it False.
  bias_is_last = True

  def __init__(self, in_shape, out_shape, names, *, std: float, use_bias=True, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    self.n_in = len(in_shape)
    self.dtype = dtype
    self.kernel = _param(rngs, nnx.initializers.normal(std), in_shape + out_shape, names, param_dtype)
    self.bias = (_param(rngs, nnx.initializers.zeros, out_shape, names[self.n_in:], param_dtype)
                 if use_bias else None)

  def __call__(self, x):
    y = self.project(x)
    if self.bias is not None:
      y = add_bias(y, self.bias[...])
    return y

  def project(self, x):
    """x . W alone, for a caller that fuses the bias into what follows (`bias_gelu`)."""
    n = self.n_in
    dims = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
    return jax.lax.dot_general(x.astype(self.dtype), self.kernel[...].astype(self.dtype), (dims, ((), ())))


class Embed(nnx.Module):
  """A lookup table; `attend` reuses it as a tied output projection with float32 logits."""

  def __init__(self, num, features, names, *, std, dtype, param_dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.embedding = _param(rngs, nnx.initializers.normal(std), (num, features), names, param_dtype)

  def __call__(self, ids_BT):
    # Gather from a replicated copy: SPMD cannot partition a gather from a table sharded on
    # (vocab, embed) into batch-sharded rows without a full rematerialisation.
    if self.embedding.shape[0] <= ONE_HOT_MAX_ROWS:
      table = _constrain(self.embedding[...].astype(self.dtype), (None, None))
      # Small tables (positions, token types): a one-hot matmul is exact and its gradient is a
      # matmul too, where a gather's gradient is a scatter-add that serialises on the few rows
      # every token hits (2 token types for 32k tokens).
      onehot_BTN = jax.nn.one_hot(ids_BT, table.shape[0], dtype=table.dtype)
      # Output in the compute dtype (exact: one term per sum), so the table's gradient is a
      # compute-dtype matmul too (float32 accumulation) rather than a float32 one.
      out_BTD = jnp.einsum("btn,nd->btd", onehot_BTN, table)
      return _constrain(out_BTD, ("batch", "length", None))
    # Gather in the parameter dtype, then cast: the gradient is a scatter-add that sums a row's
    # cotangents over every position its token holds, in the dtype of what was gathered. In
    # bfloat16 a row that thousands of positions share ([MASK], [CLS], EOS, "the") would be
    # rounded at every add, its gradient off by several percent; in float32 it is exact to 1e-7.
    table = _constrain(self.embedding[...], (None, None))
    return _constrain(jnp.take(table, ids_BT, axis=0).astype(self.dtype), ("batch", "length", None))

  def attend(self, x_BxD):
    """The tied LM head: logits_BxV = x @ embedding.T, float32."""
    # Compute-dtype matmul, float32 accumulation and output: the loss needs f32 logits.
    return jnp.einsum("...d,vd->...v", x_BxD.astype(self.dtype), self.embedding[...].astype(self.dtype),
                      preferred_element_type=jnp.float32)


def _moments(x, eps):
  """float32 mean and rstd [..., 1] over the last axis."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  return mean, jax.lax.rsqrt(jnp.square(x32 - mean).mean(-1, keepdims=True) + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x, scale, bias, eps: float, dtype):
  """LayerNorm over the last axis in float32, output in `dtype`.

  The backward pass recomputes the normalised input from `x` and the per-row mean and rstd, so
  the forward keeps only those for it (2 bytes an element in bf16) where autodiff would keep
  three float32 copies of the activations (12 bytes an element).
  """
  return _layer_norm_fwd(x, scale, bias, eps, dtype)[0]


def _layer_norm_fwd(x, scale, bias, eps, dtype):
  # The barrier makes the statistics a pass of their own whose result the backward reads.
  # Without it XLA fuses them into the forward's one kernel and recomputes them in the
  # backward, inside the column sums (d_scale), for which it then writes a float32 [..., D]
  # product out: one more read of x here costs less than that (benchmarks/gpu_aot.py).
  mean, rstd = jax.lax.optimization_barrier(_moments(x, eps))
  x_hat = (x.astype(jnp.float32) - mean) * rstd
  y = (x_hat * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)
  return y, (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps, dtype, residuals, dy):
  x, mean, rstd, scale, bias = residuals
  x_hat = (x.astype(jnp.float32) - mean) * rstd
  dy32 = dy.astype(jnp.float32)
  rows = tuple(range(dy.ndim - 1))
  d_scale = (dy32 * x_hat).sum(rows).astype(scale.dtype)
  d_bias = dy32.sum(rows).astype(bias.dtype)
  g = dy32 * scale.astype(jnp.float32)  # d loss / d x_hat
  dx = rstd * (g - g.mean(-1, keepdims=True) - x_hat * (g * x_hat).mean(-1, keepdims=True))
  return dx.astype(x.dtype), d_scale, d_bias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm(x, scale, eps: float, dtype):
  """RMSNorm over the last axis in float32 (x / rms(x) * scale, no centring, no bias), output in
  `dtype`; like `layer_norm`, the backward pass keeps only x and the per-row rstd."""
  return _rms_norm_fwd(x, scale, eps, dtype)[0]


def _rms_norm_fwd(x, scale, eps, dtype):
  x32 = x.astype(jnp.float32)
  rstd = jax.lax.optimization_barrier(jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps))
  return (x32 * rstd * scale.astype(jnp.float32)).astype(dtype), (x, rstd, scale)


def _rms_norm_bwd(eps, dtype, residuals, dy):
  x, rstd, scale = residuals
  x_hat = x.astype(jnp.float32) * rstd
  dy32 = dy.astype(jnp.float32)
  d_scale = (dy32 * x_hat).sum(tuple(range(dy.ndim - 1))).astype(scale.dtype)
  g = dy32 * scale.astype(jnp.float32)  # d loss / d x_hat
  dx = rstd * (g - x_hat * (g * x_hat).mean(-1, keepdims=True))
  return dx.astype(x.dtype), d_scale


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bias_gelu(h, bias, approximate: bool):
  """gelu(h + bias) in float32, output in h's dtype: GPT-2's tanh approximation or BERT's erf.

  The backward pass recomputes from `h`, the matmul output that exists anyway, so the forward
  writes only its result; autodiff also kept h + bias and GELU's intermediates for it, up to
  three more activations of the MLP's width.
  """
  return _bias_gelu_fwd(h, bias, approximate)[0]


def _bias_gelu_fwd(h, bias, approximate):
  x = h.astype(jnp.float32) + bias.astype(jnp.float32)
  return jax.nn.gelu(x, approximate=approximate).astype(h.dtype), (h, bias)


def _bias_gelu_bwd(approximate, residuals, dy):
  h, bias = residuals
  x = h.astype(jnp.float32) + bias.astype(jnp.float32)
  if approximate:  # 0.5 x (1 + tanh(c (x + a x^3)))
    c, a = math.sqrt(2 / math.pi), 0.044715
    t = jnp.tanh(c * (x + a * x * x * x))
    slope = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * a * x * x)
  else:  # x Phi(x)
    slope = 0.5 * (1 + jax.lax.erf(x * (1 / math.sqrt(2)))) + x * jnp.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
  dh = (dy.astype(jnp.float32) * slope).astype(h.dtype)
  if approximate:
    # XLA:GPU fuses the erf form's backward and the bias sum below into one kernel, but writes
    # the tanh form's product out in float32 for the sum (twice the bytes of dh); past the
    # barrier the sum reads dh instead (benchmarks/gpu_aot.py, GPT-2 124M: 60.3 -> 59.1 GB a step).
    dh = jax.lax.optimization_barrier(dh)
  # The bias gradient sums the rounded dh, as autodiff of a bias added in h's dtype would.
  return dh, dh.astype(jnp.float32).sum(tuple(range(dh.ndim - 1))).astype(bias.dtype)


bias_gelu.defvjp(_bias_gelu_fwd, _bias_gelu_bwd)


@jax.custom_vjp
def swiglu(h_Bx2F):
  """silu(gate) * up of the fused projection h [..., 2, F] (gate, up) in float32, output in h's dtype.

  The backward pass recomputes from `h`, the matmul output that exists anyway. Autodiff kept five
  float32 activations of the MLP's width for it (gate, up, and silu's three), 20 bytes an element
  of F against h's 4: unrolled, XLA:GPU fused them away, but under `lax.scan` each was stacked
  across the layers (benchmarks/README.md, Llama-style decoder).
  """
  return _swiglu_fwd(h_Bx2F)[0]


def _swiglu_fwd(h_Bx2F):
  h32 = h_Bx2F.astype(jnp.float32)
  return (jax.nn.silu(h32[..., 0, :]) * h32[..., 1, :]).astype(h_Bx2F.dtype), h_Bx2F


def _swiglu_bwd(h_Bx2F, dy_BxF):
  h32 = h_Bx2F.astype(jnp.float32)
  gate, up = h32[..., 0, :], h32[..., 1, :]
  sig = jax.nn.sigmoid(gate)
  dy_sig = dy_BxF.astype(jnp.float32) * sig
  # d gate = dy up silu'(gate), silu'(g) = s (1 + g (1 - s)); d up = dy silu(gate). Chosen per element
  # of [..., 2, F] rather than stacked: XLA computes a concatenation's halves in two kernels, and
  # then writes the shared sigmoid out in float32 between them.
  is_gate = jax.lax.broadcasted_iota(jnp.int32, h_Bx2F.shape, h_Bx2F.ndim - 2) == 0
  factor_Bx2F = jnp.where(is_gate, (up * (1 + gate * (1 - sig)))[..., None, :], gate[..., None, :])
  return ((factor_Bx2F * dy_sig[..., None, :]).astype(h_Bx2F.dtype),)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32 whatever the compute dtype; output in the compute dtype."""

  def __init__(self, features, *, eps, dtype, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.dtype = dtype
    self.scale = _param(rngs, nnx.initializers.ones, (features,), ("norm",), param_dtype)
    self.bias = _param(rngs, nnx.initializers.zeros, (features,), ("norm",), param_dtype)

  def __call__(self, x):
    return layer_norm(x, self.scale[...], self.bias[...], self.eps, self.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm (a scale, no bias) computed in float32; output in the compute dtype. `names`: the scale's
  logical axis (a q/k norm's is the head dim, `kv`)."""

  def __init__(self, features, *, eps, dtype, param_dtype, rngs: nnx.Rngs, names=("norm",)):
    self.eps = eps
    self.dtype = dtype
    self.scale = _param(rngs, nnx.initializers.ones, (features,), names, param_dtype)

  def __call__(self, x):
    return rms_norm(x, self.scale[...], self.eps, self.dtype)


# Architecture choices of the decoder, each with the value that is GPT-2's (what runs saved before
# the setting existed read; the rotary scaling's parameters: unscaled, and Llama 3's). BERT takes these values only.
ARCHITECTURE_DEFAULTS = {"positions": "learned", "rope_theta": 10000.0, "rope_scaling": "none", "rope_factor": 1.0,
                         "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0, "rope_original_max_len": 8192,
                         "norm": "layernorm", "mlp": "gelu", "num_kv_heads": 0, "head_dim": 0, "use_bias": True,
                         "qkv_bias": False, "qk_norm": False, "tie_embeddings": True}
ARCHITECTURE_CHOICES = {"positions": ("learned", "rope"), "rope_scaling": ("none", "linear", "llama3"),
                        "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu")}
# The rotary scaling parameters each model.rope_scaling reads (the others keep their defaults).
ROPE_SCALING_READS = {"none": (), "linear": ("rope_factor",), "llama3": (
    "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len")}


def architecture(cfg, *, canonical: bool = False) -> dict:
  """The model section's architecture choices, with GPT-2's value for any it lacks. `canonical`:
  num_kv_heads 0 also where it equals num_heads (one model: no grouped-query attention), and head_dim
  0 where it is d_model / num_heads, for comparing two models."""
  arch = {k: cfg.get(k, v) for k, v in ARCHITECTURE_DEFAULTS.items()}
  if canonical and arch["num_kv_heads"] == cfg.get("num_heads"):
    arch["num_kv_heads"] = 0
  if canonical and arch["head_dim"] * cfg.get("num_heads", 0) == cfg.get("d_model"):
    arch["head_dim"] = 0
  return arch


def head_dim(cfg) -> int:
  """K, each attention head's width: model.head_dim, or d_model / num_heads where it is 0."""
  return int(architecture(cfg)["head_dim"]) or cfg.d_model // cfg.num_heads


def rope_settings(cfg) -> tuple:
  """The rotary positions' static settings (what `rope_tables` takes after the positions) of a model
  section: (head_dim, theta, scaling, factor, low_freq_factor, high_freq_factor, original_max_len)."""
  arch = architecture(cfg)
  return (head_dim(cfg), float(arch["rope_theta"]), arch["rope_scaling"], float(arch["rope_factor"]),
          float(arch["rope_low_freq_factor"]), float(arch["rope_high_freq_factor"]),
          int(arch["rope_original_max_len"]))


def rope_frequencies(head_dim: int, theta: float, scaling: str = "none", factor: float = 1.0,
                     low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                     original_max_len: int = 8192) -> np.ndarray:
  """The rotation's inverse frequencies [K/2], float32: HF Llama's, scaled as HF's rope_type of the name does.

  Computed in float64 in numpy and rounded once, when a trace builds the tables: constants of the
  compiled step, never recomputed per step. `linear` divides every frequency by `factor` (positions
  read as position / factor). `llama3` (Llama 3.1 on) leaves the frequencies that turn
  `high_freq_factor` times or more over the `original_max_len` positions of pretraining as they were,
  divides those that turn `low_freq_factor` times or fewer by `factor`, and blends the two linearly in
  that number of turns between them.
  """
  inv_freq_J = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if scaling == "linear":
    inv_freq_J = inv_freq_J / factor
  elif scaling == "llama3":
    turns_J = original_max_len * inv_freq_J / (2 * np.pi)  # original_max_len / wavelength
    # 0: slow enough to stretch by factor; 1: fast enough to keep (they resolve nearby tokens).
    keep_J = np.clip((turns_J - low_freq_factor) / (high_freq_factor - low_freq_factor), 0.0, 1.0)
    inv_freq_J = (1 - keep_J) * inv_freq_J / factor + keep_J * inv_freq_J
  elif scaling != "none":
    raise ValueError(f"unknown rotary scaling {scaling!r}")
  return inv_freq_J.astype(np.float32)


def rope_tables(positions_BT, head_dim: int, theta: float, *scaling):
  """Rotary embedding (cos, sin) [B, T, K/2] in float32 for these positions (HF Llama's frequencies);
  `scaling`: `rope_frequencies`' arguments after theta (none: unscaled)."""
  inv_freq_J = rope_frequencies(head_dim, theta, *scaling)
  angles_BTJ = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_J)
  return jnp.cos(angles_BTJ), jnp.sin(angles_BTJ)


def apply_rope(x_BTHK, rope):
  """Rotates the halves (x1, x2) of each head by the position's angles, in float32: the rotate-half
  form Hugging Face's Llama uses, so its q and k kernels map on unpermuted."""
  cos_BTJ, sin_BTJ = (t[:, :, None, :] for t in rope)
  x32 = x_BTHK.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  return jnp.concatenate([x1 * cos_BTJ - x2 * sin_BTJ, x2 * cos_BTJ + x1 * sin_BTJ], -1).astype(x_BTHK.dtype)


class _Common:
  """Resolved model config: dtypes, the attention kernel and the architecture choices."""

  def __init__(self, cfg):
    self.cfg = cfg
    self.arch = architecture(cfg)
    self.dtype = jnp.dtype(cfg.dtype)
    self.param_dtype = jnp.dtype(cfg.param_dtype)
    attention_lib.resolve_kernel(cfg.attention, self.dtype)  # an unknown name fails here, not in a trace
    # "auto" stays unresolved until the trace: the kernel then suits the platform compiled for
    # and the sequence lengths (`attention.resolve_kernel`).
    self.kernel = cfg.attention
    self.head_dim = head_dim(cfg)
    self.num_kv_heads = self.arch["num_kv_heads"] or cfg.num_heads
    self.use_bias = bool(self.arch["use_bias"])
    self.qkv_bias = self.use_bias or bool(self.arch["qkv_bias"])
    self.qk_norm = bool(self.arch["qk_norm"])
    self.attention_dropout = float(cfg.get("attention_dropout", 0.0))  # absent from older runs' configs

  def norm(self, features: int, rngs: nnx.Rngs):
    """The normalisation layer model.norm names."""
    kw = dict(eps=self.cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)
    return RMSNorm(features, **kw) if self.arch["norm"] == "rmsnorm" else LayerNorm(features, **kw)


class SelfAttention(nnx.Module):
  """Fused qkv projection [D -> 3,H,K], attention, output projection [H,K -> D] (biases unless
  model.use_bias=false; on the q/k/v projection alone with model.qkv_bias=true, Qwen2's).

  The qkv kernel (D, 3, H, K) is GPT-2's c_attn (D, 3D) reshaped, or BERT's query/key/value
  kernels stacked on axis 1; sharding H gives Megatron-style tensor parallelism. With fewer
  key/value heads G than query heads (grouped-query attention) the projections are q [D -> H,K]
  and kv [D -> 2,G,K]. K is d_model / H unless model.head_dim sets it. With model.qk_norm (Qwen3's)
  each head of q and of k is RMS-normalised over its K dimensions (q_norm, k_norm: one scale [K] each,
  shared by the heads); rotary positions, when given, turn q and k after that.
  """

  def __init__(self, c: _Common, *, causal: bool, out_std: float, rngs: nnx.Rngs):
    cfg = c.cfg
    H, G, K, D = cfg.num_heads, c.num_kv_heads, c.head_dim, cfg.d_model
    kw = dict(use_bias=c.use_bias, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
    qkv_kw = dict(kw, use_bias=c.qkv_bias)
    self.causal = causal
    self.kernel = c.kernel
    self.dropout_rate = c.attention_dropout
    if G == H:
      self.qkv = Dense((D,), (3, H, K), ("embed", None, "heads", "kv"), std=cfg.init_std, **qkv_kw)
    else:
      self.q = Dense((D,), (H, K), ("embed", "heads", "kv"), std=cfg.init_std, **qkv_kw)
      self.kv = Dense((D,), (2, G, K), ("embed", None, "kv_heads", "kv"), std=cfg.init_std, **qkv_kw)
    self.out = Dense((H, K), (D,), ("heads", "kv", "embed"), std=out_std, **kw)
    if c.qk_norm:
      norm_kw = dict(eps=cfg.layer_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs, names=("kv",))
      self.q_norm, self.k_norm = RMSNorm(K, **norm_kw), RMSNorm(K, **norm_kw)

  @property
  def kv_heads(self) -> int:
    """G, the key/value heads (H without grouped-query attention)."""
    return (self.qkv if hasattr(self, "qkv") else self.kv).kernel.shape[-2]

  def _qkv(self, x_BTD, rope):
    if hasattr(self, "qkv"):
      # One fused projection, [B, T, 3, H, K]; measured faster end to end on an H100 than emitting
      # q/k/v on a leading axis, whose layout costs transposes in the backward pass.
      qkv_BT3HK = _constrain(self.qkv(x_BTD), ("batch", "length", None, "heads", None))
      q_BTHK, k_BTGK, v_BTGK = qkv_BT3HK[:, :, 0], qkv_BT3HK[:, :, 1], qkv_BT3HK[:, :, 2]
    else:
      q_BTHK = _constrain(self.q(x_BTD), ("batch", "length", "heads", None))
      kv_BT2GK = _constrain(self.kv(x_BTD), ("batch", "length", None, "kv_heads", None))
      k_BTGK, v_BTGK = kv_BT2GK[:, :, 0], kv_BT2GK[:, :, 1]
    if hasattr(self, "q_norm"):  # before the rotation, as Qwen3 does: the norm sees each head's own values
      q_BTHK, k_BTGK = self.q_norm(q_BTHK), self.k_norm(k_BTGK)
    if rope is not None:
      q_BTHK, k_BTGK = apply_rope(q_BTHK, rope), apply_rope(k_BTGK, rope)
    return q_BTHK, k_BTGK, v_BTGK

  def __call__(self, x_BTD, segment_ids_BT, dropout_key=None, rope=None):
    """dropout_key: drop attention probabilities at model.attention_dropout (training); None: none.
    rope: (cos, sin) of the positions (`rope_tables`) for rotary positions; None: none."""
    q_BTHK, k_BTHK, v_BTHK = self._qkv(x_BTD, rope)
    out_BTHK = attention_lib.attention(q_BTHK, k_BTHK, v_BTHK, causal=self.causal,
                                       segment_ids_BT=segment_ids_BT, kernel=self.kernel,
                                       dropout_rate=self.dropout_rate, dropout_key=dropout_key)
    out_BTHK = checkpoint_name(out_BTHK, "attention_out")
    return self.out(out_BTHK)

  def decode(self, x_BTD, segment_ids_BT, k_BSHK, v_BSHK, cache_segment_ids_BS, index, rope=None):
    """Attention of T new tokens written at cache slot `index`: (out_BTD, k_BSHK, v_BSHK); the cache
    holds the G key/value heads (rotated, with rotary positions)."""
    q_BTHK, k_new_BTHK, v_new_BTHK = self._qkv(x_BTD, rope)
    k_BSHK = jax.lax.dynamic_update_slice(k_BSHK, k_new_BTHK.astype(k_BSHK.dtype), (0, index, 0, 0))
    v_BSHK = jax.lax.dynamic_update_slice(v_BSHK, v_new_BTHK.astype(v_BSHK.dtype), (0, index, 0, 0))
    # Slots past index + T are still empty: the causal offset masks them. The fused kernels
    # align queries to the last key, so the cache always takes the reference kernel (decoding
    # is memory-bound on the cache reads anyway).
    out_BTHK = attention_lib.attention(q_BTHK, k_BSHK, v_BSHK, causal=self.causal, segment_ids_BT=segment_ids_BT,
                                       segment_ids_BS=cache_segment_ids_BS, kernel="xla", q_offset=index)
    return self.out(out_BTHK), k_BSHK, v_BSHK


class MLP(nnx.Module):
  """D -> F, GELU, F -> D, with biases (GPT-2 c_fc/c_proj; BERT intermediate/output); or SwiGLU
  (model.mlp=swiglu): D -> 2,F (gate and up in one kernel), silu(gate) * up, F -> D."""

  def __init__(self, c: _Common, *, approximate_gelu: bool, out_std: float, rngs: nnx.Rngs):
    cfg = c.cfg
    kw = dict(use_bias=c.use_bias, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
    self.approximate = approximate_gelu
    self.swiglu = c.arch["mlp"] == "swiglu"
    if self.swiglu:
      self.fc = Dense((cfg.d_model,), (2, cfg.d_ff), ("embed", None, "mlp"), std=cfg.init_std, **kw)
    else:
      self.fc = Dense((cfg.d_model,), (cfg.d_ff,), ("embed", "mlp"), std=cfg.init_std, **kw)
    self.proj = Dense((cfg.d_ff,), (cfg.d_model,), ("mlp", "embed"), std=out_std, **kw)

  def __call__(self, x_BTD):
    fc = self.fc
    if self.swiglu:
      return self.proj(swiglu(_constrain(fc(x_BTD), ("batch", "length", None, "mlp"))))
    if fc.bias is None or not fc.bias_is_last:
      h_BTF = _constrain(fc(x_BTD), ("batch", "length", "mlp"))
      return self.proj(jax.nn.gelu(h_BTF, approximate=self.approximate))
    h_BTF = _constrain(fc.project(x_BTD), ("batch", "length", "mlp"))
    return self.proj(bias_gelu(h_BTF, fc.bias[...], self.approximate))


class GPTBlock(nnx.Module):
  """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

  def __init__(self, c: _Common, *, rngs: nnx.Rngs):
    cfg = c.cfg
    # GPT-2 scales the residual projections by 1/sqrt(2L): two residual adds per layer.
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    self.dropout = float(cfg.dropout)
    self.ln_1 = c.norm(cfg.d_model, rngs)
    self.attn = SelfAttention(c, causal=True, out_std=out_std, rngs=rngs)
    self.ln_2 = c.norm(cfg.d_model, rngs)
    self.mlp = MLP(c, approximate_gelu=True, out_std=out_std, rngs=rngs)

  def __call__(self, x_BTD, segment_ids_BT, key, deterministic: bool, rope=None):
    a_BTD = self.attn(self.ln_1(x_BTD), segment_ids_BT, None if deterministic else _fold(key, 2), rope)
    x_BTD = x_BTD + _dropout(a_BTD, self.dropout, _fold(key, 0), deterministic)
    x_BTD = x_BTD + _dropout(self.mlp(self.ln_2(x_BTD)), self.dropout, _fold(key, 1), deterministic)
    return _constrain(x_BTD, ("batch", "length", None))

  def decode(self, x_BTD, segment_ids_BT, k_BSHK, v_BSHK, cache_segment_ids_BS, index, rope=None):
    """The block on T new tokens against this layer's KV cache (inference: no dropout)."""
    a_BTD, k_BSHK, v_BSHK = self.attn.decode(self.ln_1(x_BTD), segment_ids_BT, k_BSHK, v_BSHK,
                                             cache_segment_ids_BS, index, rope)
    x_BTD = x_BTD + a_BTD
    x_BTD = x_BTD + self.mlp(self.ln_2(x_BTD))
    return x_BTD, k_BSHK, v_BSHK


class BERTBlock(nnx.Module):
  """Post-LN layer: LN(x + attn(x)), then LN(x + mlp(x)).

  HF names: attention.self.{query,key,value} = attention.qkv[:, i], attention.output.dense =
  attention.out, attention.output.LayerNorm = attention_ln, intermediate.dense = mlp.fc,
  output.dense = mlp.proj, output.LayerNorm = output_ln.
  """

  def __init__(self, c: _Common, *, rngs: nnx.Rngs):
    cfg = c.cfg
    kw = dict(eps=cfg.layer_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
    self.dropout = float(cfg.dropout)
    self.attention = SelfAttention(c, causal=False, out_std=cfg.init_std, rngs=rngs)
    self.attention_ln = LayerNorm(cfg.d_model, **kw)
    self.mlp = MLP(c, approximate_gelu=False, out_std=cfg.init_std, rngs=rngs)
    self.output_ln = LayerNorm(cfg.d_model, **kw)

  def __call__(self, x_BTD, segment_ids_BT, key, deterministic: bool):
    a_BTD = self.attention(x_BTD, segment_ids_BT, None if deterministic else _fold(key, 2))
    a_BTD = _dropout(a_BTD, self.dropout, _fold(key, 0), deterministic)
    x_BTD = self.attention_ln(x_BTD + a_BTD)
    m_BTD = _dropout(self.mlp(x_BTD), self.dropout, _fold(key, 1), deterministic)
    x_BTD = self.output_ln(x_BTD + m_BTD)
    return _constrain(x_BTD, ("batch", "length", None))


class Layers(nnx.Module):
  """L blocks, unrolled (a list) or stacked on a leading "layers" axis and run with nnx.scan."""

  def __init__(self, make_block: Callable[[nnx.Rngs], nnx.Module], cfg, *, rngs: nnx.Rngs):
    self.num_layers = cfg.num_layers
    self.scan = bool(cfg.scan_layers)
    if cfg.remat != "none" and cfg.remat not in REMAT_POLICIES:
      raise ConfigError(f"model.remat={cfg.remat!r} is not one of {['none', *REMAT_POLICIES]}")
    self.remat = cfg.remat
    blocks = [make_block(rngs) for _ in range(cfg.num_layers)]
    if not self.scan:
      self.blocks = nnx.List(blocks)
      return
    # Stacked from the blocks the unrolled layout makes, so that a seed initialises both layouts
    # (and whatever the model draws after them) alike: the layout is a speed setting only.
    graphdef, state = nnx.split(blocks[0])
    stacked = jax.tree.map(lambda *x_L: jnp.stack(x_L), *(nnx.to_pure_dict(nnx.state(b)) for b in blocks))

    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stack(layer_values):
      layer = jax.tree.map(lambda x: x, state)  # a copy: one block's variables and their metadata
      nnx.replace_by_pure_dict(layer, layer_values)
      return nnx.merge(graphdef, layer)

    self.blocks = stack(stacked)

  def __call__(self, x_BTD, segment_ids_BT, key, deterministic: bool, rope=None):
    extra = {} if rope is None else {"rope": rope}

    def body(block, x_BTD, layer_key):
      return block(x_BTD, segment_ids_BT, layer_key, deterministic, **extra)

    if self.remat != "none":
      body = nnx.remat(body, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
    # Per-layer dropout keys by fold_in(layer), identical in both layouts.
    if self.scan:
      keys_L = None if key is None else jax.vmap(lambda i: jax.random.fold_in(key, i))(
          jnp.arange(self.num_layers))

      @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=nnx.Carry,
                transform_metadata={nnx.PARTITION_NAME: "layers"})
      def run(block, x_BTD, layer_key):
        return body(block, x_BTD, layer_key)

      return run(self.blocks, x_BTD, keys_L)
    for i, block in enumerate(self.blocks):
      x_BTD = body(block, x_BTD, _fold(key, i))
    return x_BTD

  def decode(self, x_BTD, segment_ids_BT, k_LBSHK, v_LBSHK, cache_segment_ids_BS, index, rope=None):
    """Runs each block's `decode` against its slice of the stacked cache: (x_BTD, k_LBSHK, v_LBSHK)."""
    def body(block, x_BTD, k_BSHK, v_BSHK):
      return block.decode(x_BTD, segment_ids_BT, k_BSHK, v_BSHK, cache_segment_ids_BS, index, rope)

    if self.scan:
      @nnx.scan(in_axes=(0, nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0, 0),
                transform_metadata={nnx.PARTITION_NAME: "layers"})
      def run(block, x_BTD, k_BSHK, v_BSHK):
        return body(block, x_BTD, k_BSHK, v_BSHK)

      return run(self.blocks, x_BTD, k_LBSHK, v_LBSHK)
    ks, vs = [], []
    for i, block in enumerate(self.blocks):
      x_BTD, k_BSHK, v_BSHK = body(block, x_BTD, k_LBSHK[i], v_LBSHK[i])
      ks.append(k_BSHK)
      vs.append(v_BSHK)
    return x_BTD, jnp.stack(ks), jnp.stack(vs)


def _dropout_key(rngs: nnx.Rngs | None, deterministic: bool, rate: float):
  """The model's dropout key for this call; `rate` is the largest of its dropout rates."""
  if deterministic or rate == 0.0:
    return None
  if rngs is None:
    raise ValueError("deterministic=False with model.dropout or model.attention_dropout > 0 needs "
                     "rngs=nnx.Rngs(dropout=key)")
  return rngs.dropout()


def _default_positions(tokens_BT, positions_BT):
  if positions_BT is not None:
    return positions_BT
  return jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32), tokens_BT.shape)


class GPT(nnx.Module):
  """GPT-2: token + learned position embeddings, pre-LN blocks, final LN, tied LM head.

  Tree (HF GPT2LMHeadModel minus the `transformer.` prefix): wte, wpe, h.blocks[i].{ln_1,
  attn.qkv (c_attn), attn.out (c_proj), ln_2, mlp.fc (c_fc), mlp.proj (c_proj)}, ln_f.
  With model.positions=rope there is no wpe (q and k are rotated in every layer instead); with
  model.tie_embeddings=false the output layer is a table of its own, lm_head [V, D].
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    c = _Common(cfg)
    self.dropout = float(cfg.dropout)
    self.attention_dropout = c.attention_dropout
    # Python scalars: the rotary frequencies become constants of each trace (`rope_frequencies`).
    self.rope = rope_settings(cfg) if c.arch["positions"] == "rope" else None
    self.max_len = int(cfg.max_len)  # positions it takes (the learned table's rows; rotary: the setting)
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
    self.wte = Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), std=cfg.init_std, **kw)
    if self.rope is None:
      self.wpe = Embed(cfg.max_len, cfg.d_model, (None, "embed"), std=cfg.init_std, **kw)
    self.h = Layers(lambda r: GPTBlock(c, rngs=r), cfg, rngs=rngs)
    self.ln_f = c.norm(cfg.d_model, rngs)
    if not c.arch["tie_embeddings"]:
      self.lm_head = Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), std=cfg.init_std, **kw)

  def _embed(self, tokens_BT, positions_BT):
    """Token (+ learned position) embeddings, and the rotary tables (None without rotary positions)."""
    if self.rope is None:
      return self.wte(tokens_BT) + self.wpe(positions_BT), None
    return self.wte(tokens_BT), rope_tables(positions_BT, *self.rope)

  def hidden(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None, deterministic=True, rngs=None):
    """Final-LN hidden states h_BTD in the compute dtype."""
    positions_BT = _default_positions(tokens_BT, positions_BT)
    key = _dropout_key(rngs, deterministic, max(self.dropout, self.attention_dropout))
    x_BTD, rope = self._embed(tokens_BT, positions_BT)
    x_BTD = _constrain(_dropout(x_BTD, self.dropout, _fold(key, 0), deterministic), ("batch", "length", None))
    x_BTD = self.h(x_BTD, segment_ids_BT, _fold(key, 1), deterministic, rope)
    return self.ln_f(x_BTD)

  def head_table(self) -> Embed:
    """The output layer's [V, D] table: the token embeddings when tied, else lm_head."""
    return self.lm_head if hasattr(self, "lm_head") else self.wte

  def lm_head_logits(self, h_BxD):
    """The output projection: float32 logits [..., V]."""
    return self.head_table().attend(h_BxD)

  def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None, deterministic=True, rngs=None):
    """Next-token logits_BTV in float32. segment_ids_BT: packing ids (0 = pad); None = one per row."""
    h_BTD = self.hidden(tokens_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
                        deterministic=deterministic, rngs=rngs)
    return _constrain(self.lm_head_logits(h_BTD), ("batch", "length", "vocab"))

  def init_cache(self, batch_size: int, max_len: int) -> dict:
    """An empty KV cache: k, v [L, B, S, G, K] in the compute dtype, key segment ids [B, S], fill index.

    Slots never written keep segment id 0 and sit past the fill index, so no query attends them.
    """
    attn = self.h.blocks[0].attn if not self.h.scan else self.h.blocks.attn
    shape = (self.h.num_layers, batch_size, max_len, attn.kv_heads, attn.out.kernel.shape[-2])  # out: [(L,) H, K, D]
    return {"k": jnp.zeros(shape, attn.out.dtype), "v": jnp.zeros(shape, attn.out.dtype),
            "segment_ids": jnp.zeros((batch_size, max_len), jnp.int32), "index": jnp.zeros((), jnp.int32)}

  def decode(self, tokens_BT, cache: dict, *, positions_BT, segment_ids_BT=None) -> tuple[jax.Array, dict]:
    """Logits_BTV of T new tokens appended at `cache["index"]`, and the updated cache.

    One call with the whole (left-padded) prompt is the prefill; then T = 1 per generated token.
    segment_ids_BT: 0 marks left padding (attended by nothing real); None means all ones.
    """
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones(tokens_BT.shape, jnp.int32)
    index = cache["index"]
    cache_seg_BS = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids_BT.astype(jnp.int32), (0, index))
    x_BTD, rope = self._embed(tokens_BT, positions_BT)
    x_BTD, k, v = self.h.decode(x_BTD, segment_ids_BT, cache["k"], cache["v"], cache_seg_BS, index, rope)
    logits_BTV = self.lm_head_logits(self.ln_f(x_BTD))
    new_cache = {"k": k, "v": v, "segment_ids": cache_seg_BS, "index": index + tokens_BT.shape[1]}
    return logits_BTV, new_cache


class BERTEmbeddings(nnx.Module):
  """word + position + token-type embeddings, LayerNorm (HF bert.embeddings)."""

  def __init__(self, c: _Common, *, rngs: nnx.Rngs):
    cfg = c.cfg
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
    self.word_embeddings = Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), std=cfg.init_std, **kw)
    self.position_embeddings = Embed(cfg.max_len, cfg.d_model, (None, "embed"), std=cfg.init_std, **kw)
    self.token_type_embeddings = Embed(cfg.type_vocab_size, cfg.d_model, (None, "embed"), std=cfg.init_std,
                                       **kw)
    self.layer_norm = LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, **kw)

  def __call__(self, tokens_BT, token_types_BT, positions_BT):
    x_BTD = (self.word_embeddings(tokens_BT) + self.position_embeddings(positions_BT)
             + self.token_type_embeddings(token_types_BT))
    return self.layer_norm(x_BTD)


class BERT(nnx.Module):
  """BERT encoder with pooler and MLM head.

  Tree: embeddings.{word,position,token_type}_embeddings, embeddings.layer_norm, encoder.blocks[i]
  (see BERTBlock), pooler (HF pooler.dense), mlm_transform + mlm_ln (cls.predictions.transform.
  {dense, LayerNorm}), mlm_bias (cls.predictions.bias); the decoder is tied to word_embeddings.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    c = _Common(cfg)
    self.dropout = float(cfg.dropout)
    self.attention_dropout = c.attention_dropout
    D = cfg.d_model
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
    self.embeddings = BERTEmbeddings(c, rngs=rngs)
    self.encoder = Layers(lambda r: BERTBlock(c, rngs=r), cfg, rngs=rngs)
    self.pooler = Dense((D,), (D,), ("embed", None), std=cfg.init_std, **kw)
    self.mlm_transform = Dense((D,), (D,), ("embed", None), std=cfg.init_std, **kw)
    self.mlm_ln = LayerNorm(D, eps=cfg.layer_norm_eps, **kw)
    self.mlm_bias = _param(rngs, nnx.initializers.zeros, (cfg.vocab_size,), ("vocab",), c.param_dtype)

  def hidden(self, tokens_BT, *, token_types_BT=None, positions_BT=None, segment_ids_BT=None,
             deterministic=True, rngs=None):
    """Encoder output h_BTD in the compute dtype (no pooler)."""
    positions_BT = _default_positions(tokens_BT, positions_BT)
    if token_types_BT is None:
      token_types_BT = jnp.zeros_like(tokens_BT)
    key = _dropout_key(rngs, deterministic, max(self.dropout, self.attention_dropout))
    x_BTD = self.embeddings(tokens_BT, token_types_BT, positions_BT)
    x_BTD = _constrain(_dropout(x_BTD, self.dropout, _fold(key, 0), deterministic), ("batch", "length", None))
    return self.encoder(x_BTD, segment_ids_BT, _fold(key, 1), deterministic)

  def encode(self, tokens_BT, *, token_types_BT=None, positions_BT=None, segment_ids_BT=None,
             deterministic=True, rngs=None):
    """(h_BTD, pooled_BD): encoder output and tanh(dense(first token)) for classifiers."""
    h_BTD = self.hidden(tokens_BT, token_types_BT=token_types_BT, positions_BT=positions_BT,
                        segment_ids_BT=segment_ids_BT, deterministic=deterministic, rngs=rngs)
    return h_BTD, self.pool(h_BTD)

  def pool(self, h_BTD, cls_B=None):
    """tanh(dense(h at [CLS])): BERT's pooled output, [CLS] at position 0 or at cls_B in each row."""
    cls_BD = h_BTD[:, 0] if cls_B is None else jnp.take_along_axis(h_BTD, cls_B[:, None, None], axis=1)[:, 0]
    return jnp.tanh(self.pooler(cls_BD))

  def mlm_features(self, h_BTD, mlm_positions_BM=None):
    """The head's transform (dense, exact GELU, LN) of h at mlm_positions_BM (all positions if
    None): what the tied decoder reads. Gathering first runs the transform on M positions only."""
    if mlm_positions_BM is not None:
      h_BTD = jnp.take_along_axis(h_BTD, mlm_positions_BM[:, :, None].astype(jnp.int32), axis=1)
    return self.mlm_ln(jax.nn.gelu(self.mlm_transform(h_BTD), approximate=False))

  def __call__(self, tokens_BT, *, token_types_BT=None, positions_BT=None, segment_ids_BT=None,
               mlm_positions_BM=None, deterministic=True, rngs=None):
    """MLM logits in float32: [B, M, V] at mlm_positions_BM, else [B, T, V].

    Gathering before the head means the transform and the V-wide decoder run on M positions only.
    """
    h_BTD = self.hidden(tokens_BT, token_types_BT=token_types_BT, positions_BT=positions_BT,
                        segment_ids_BT=segment_ids_BT, deterministic=deterministic, rngs=rngs)
    x_BMD = self.mlm_features(h_BTD, mlm_positions_BM)
    return self.embeddings.word_embeddings.attend(x_BMD) + self.mlm_bias[...].astype(jnp.float32)


def sharded_if_mesh():
  """Creates parameters sharded under a mesh in context, else unsharded (eager sharding needs a mesh)."""
  no_mesh = jax.sharding.get_abstract_mesh().empty
  return nnx.use_eager_sharding(False) if no_mesh else contextlib.nullcontext()


def build_model(model_cfg, *, rngs: nnx.Rngs) -> GPT | BERT:
  """GPT or BERT from `config.model`. Without a mesh in context, params are created unsharded."""
  families = {"gpt": GPT, "bert": BERT}
  if model_cfg.family not in families:
    raise ConfigError(f"model.family={model_cfg.family!r} is not one of {list(families)}")
  with sharded_if_mesh():
    return families[model_cfg.family](model_cfg, rngs=rngs)


def abstract_model(model_cfg) -> GPT | BERT:
  """The model with ShapeDtypeStruct params: shapes and counts without allocating anything."""
  return nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))


def param_count(model: nnx.Module, *, exclude_positions: bool = False) -> int:
  """Number of parameters (works on abstract models too); optionally without position embeddings."""
  total = 0
  for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if exclude_positions and any(str(p) in ("wpe", "position_embeddings") for p in path):
      continue
    total += int(np.prod(leaf.shape))
  return total


def flops_per_token(model_cfg, seq_len: int) -> float:
  """Training FLOPs per token: 6*N + 12*L*D*T, N without position embeddings.

  6N is forward + backward of the matmuls; 12*L*D*T the attention scores and weighted sums,
  counted in full (no causal halving, and bidirectional BERT counted the same), D there the
  attention's width H*K: d_model, unless model.head_dim makes the heads wider or narrower (Qwen3-0.6B's
  are 2 d_model). A tied token table counts once, as the output layer's matmul; an untied head's input
  table is a lookup like the position table, so N leaves it out too (else MFU would read 27% high for a
  Llama-style GPT-2 small).
  """
  width = model_cfg.num_heads * head_dim(model_cfg)
  return 6.0 * flop_params(model_cfg) + 12.0 * model_cfg.num_layers * width * seq_len


def flop_params(model_cfg) -> int:
  """N of `flops_per_token`: the parameters without position embeddings, nor an untied head's input table."""
  model = abstract_model(model_cfg)
  n = param_count(model, exclude_positions=True)
  if hasattr(model, "lm_head"):
    n -= int(np.prod(model.wte.embedding.shape))
  return n


def _is_layer_list(node) -> bool:
  return isinstance(node, dict) and node and all(isinstance(k, int) for k in node)


def stack_layers(tree: dict) -> dict:
  """Unrolled -> scanned layout: `blocks: {0: t0, 1: t1, ...}` becomes `blocks: stack(t)` on axis 0.

  Works on pure nested dicts (`nnx.to_pure_dict(nnx.state(model))`); load the result with
  `nnx.replace_by_pure_dict` + `nnx.update`.
  """
  out = {}
  for k, v in tree.items():
    if k == STACK_KEY and _is_layer_list(v):
      out[k] = jax.tree.map(lambda *xs: jnp.stack(xs), *[v[i] for i in sorted(v)])
    elif isinstance(v, dict):
      out[k] = stack_layers(v)
    else:
      out[k] = v
  return out


def unstack_layers(tree: dict) -> dict:
  """Scanned -> unrolled layout: the inverse of `stack_layers`."""
  out = {}
  for k, v in tree.items():
    if k == STACK_KEY and isinstance(v, dict) and not _is_layer_list(v):
      n = jax.tree.leaves(v)[0].shape[0]
      out[k] = {i: jax.tree.map(lambda x, i=i: x[i], v) for i in range(n)}
    elif isinstance(v, dict):
      out[k] = unstack_layers(v)
    else:
      out[k] = v
  return out
