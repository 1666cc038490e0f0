"""Multi-head dot-product attention with packing masks and selectable kernels.

Inputs are already projected: `attention(q_BTHK, k_BSHK, v_BSHK, causal=..., segment_ids_BT=...)`.
Query i attends key j iff `segment_ids[i] == segment_ids[j]` and (not causal or j <= i). Segment
id 0 marks padding; pads attend only pads, so no softmax row is ever fully masked (no NaN) and
their outputs are simply ignored by the loss.

Kernels:
  xla     reference einsum + masked softmax in float32; runs everywhere.
  cudnn   cuDNN flash attention (GPU, bf16/fp16); a packing goes in as the runs' offsets on
          Hopper or later when the loader computed them (a `Packing`), else as a mask.
  splash  Pallas splash attention (TPU; Pallas interpret mode elsewhere, so CPU tests cover it).

Shape legend: B batch, T query length, S key/value length, H heads, G key/value heads, Q query heads
per key/value head, K head dim, R runs of segment ids a row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec as P

KERNELS = ("xla", "cudnn", "splash")
SPLASH_MIN_BLOCK = 128  # splash tiles queries and keys in blocks of 512, 256 or 128


class AttentionError(ValueError):
  """An attention kernel cannot run this configuration; the message says what to change."""


_TARGET_PLATFORM: list[str] = []  # set by `compiling_for` while tracing for another platform


@contextlib.contextmanager
def compiling_for(platform: str):
  """Traces inside pick kernels for `platform` ("tpu", "gpu"), not for this host's backend.

  For ahead-of-time compiles from a CPU host (`fmjax plan --topology`): "auto" resolves to that
  platform's kernel and splash lowers to its Mosaic TPU kernel instead of Pallas interpret mode.
  """
  _TARGET_PLATFORM.append(platform)
  try:
    yield
  finally:
    _TARGET_PLATFORM.pop()


def target_platform() -> str:
  """The platform being compiled for: `compiling_for`'s, else this host's default backend."""
  return _TARGET_PLATFORM[-1] if _TARGET_PLATFORM else jax.default_backend()


def resolve_kernel(name: str, dtype=None, lengths: tuple[int, ...] = (), dropout: bool = False) -> str:
  """Maps "auto" to the platform's fast kernel: cudnn on GPU, splash on TPU, xla on CPU.

  "auto" never picks a kernel that cannot run the case: cuDNN flash attention takes only
  half-precision inputs, splash only query and key `lengths` that are multiples of 128 (and, on
  several TPU devices, a mesh in context to run per shard under), and neither drops attention
  probabilities (`dropout`), so those fall back to xla rather than failing. Naming a kernel keeps
  its own checks.
  """
  if name != "auto":
    if name not in KERNELS:
      raise AttentionError(f"unknown attention kernel {name!r}; use one of {('auto',) + KERNELS}")
    if dropout and name != "xla":
      raise AttentionError(f"attention kernel {name!r} has no attention-probability dropout; set "
                           "model.attention=auto (xla while dropout is on) or model.attention_dropout=0")
    return name
  if dropout:
    _note_dropout_fallback(target_platform())
    return "xla"
  platform = target_platform()
  if platform == "gpu" and (dtype is None or jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)):
    return "cudnn"
  if platform == "tpu":
    if not all(n % SPLASH_MIN_BLOCK == 0 for n in lengths):
      _note_fallback(tuple(lengths))
      return "xla"
    if not _TARGET_PLATFORM and jax.sharding.get_abstract_mesh().empty and jax.device_count() > 1:
      # Params on several chips and no mesh to run splash per shard under (a notebook's direct call
      # of fill_mask or zeroshot.score): XLA cannot partition the Mosaic kernel, but it can xla's.
      _note_no_mesh(jax.device_count())
      return "xla"
    return "splash"
  return "xla"


@functools.lru_cache(maxsize=None)
def _note_fallback(lengths: tuple[int, ...]) -> None:
  logging.getLogger("fmjax").info(
      "attention=auto runs xla, not splash, for sequence lengths %s: splash needs multiples of %d",
      lengths, SPLASH_MIN_BLOCK)


@functools.lru_cache(maxsize=None)
def _note_no_mesh(devices: int) -> None:
  logging.getLogger("fmjax").info(
      "attention=auto runs xla, not splash, outside a mesh on %d TPU devices: for splash, call the model inside "
      "`with generate.on_mesh(model, config):`", devices)


@functools.lru_cache(maxsize=None)
def _note_dropout_fallback(platform: str) -> None:
  if platform != "cpu":
    logging.getLogger("fmjax").info(
        "attention=auto runs xla, not the fused kernel, while model.attention_dropout > 0 (training); "
        "set model.attention_dropout=0 for the fused kernel")


def make_mask(segment_ids_BT, segment_ids_BS, *, causal: bool, T: int, S: int, q_offset=None):
  """Boolean [B|1, 1, T, S] mask (True = attend), or None when nothing is masked.

  q_offset: key index of the first query (may be traced). By default the queries are aligned to
  the end of the keys (S - T); a fixed-size KV cache whose tail is still empty passes its fill index.
  """
  mask = None
  if segment_ids_BT is not None:
    mask = (segment_ids_BT[:, :, None] == segment_ids_BS[:, None, :])[:, None]
  if causal:
    offset = S - T if q_offset is None else q_offset
    causal_TS = jnp.arange(T)[:, None] + offset >= jnp.arange(S)[None, :]
    mask = causal_TS[None, None] if mask is None else mask & causal_TS
  return mask


def _xla_attention(q_BTHK, k_BSHK, v_BSHK, *, causal, segment_ids_BT, segment_ids_BS, q_offset=None,
                   dropout_rate: float = 0.0, dropout_key=None):
  B, T, H, K = q_BTHK.shape
  S, G = k_BSHK.shape[1], k_BSHK.shape[2]
  if G == H:  # multi-head: the grouped form's reshapes cost XLA transposes and copies (and other rounding)
    logits_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK, preferred_element_type=jnp.float32)
  else:
    # Grouped-query attention: the H query heads in G groups of Q = H / G, each group reading one
    # key/value head. The probabilities keep H on one axis, as dropout draws them.
    q_BTGQK = q_BTHK.reshape(B, T, G, H // G, K)
    logits_BHTS = jnp.einsum("btgqk,bsgk->bgqts", q_BTGQK, k_BSHK, preferred_element_type=jnp.float32)
    logits_BHTS = logits_BHTS.reshape(B, H, T, S)
  logits_BHTS = logits_BHTS * (1.0 / math.sqrt(K))
  mask = make_mask(segment_ids_BT, segment_ids_BS, causal=causal, T=T, S=S, q_offset=q_offset)
  if mask is not None:
    logits_BHTS = jnp.where(mask, logits_BHTS, jnp.finfo(jnp.float32).min)
  probs_BHTS = jax.nn.softmax(logits_BHTS, axis=-1)
  if dropout_rate > 0.0:
    # Inverted dropout on the probabilities (as BERT and GPT-2 train): a row no longer sums to 1.
    keep_BHTS = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, probs_BHTS.shape)
    probs_BHTS = jnp.where(keep_BHTS, probs_BHTS * (1.0 / (1.0 - dropout_rate)), 0.0)
  probs_BHTS = probs_BHTS.astype(v_BSHK.dtype)
  if G == H:
    return jnp.einsum("bhts,bshk->bthk", probs_BHTS, v_BSHK)
  probs_BGQTS = probs_BHTS.reshape(B, G, H // G, T, S)
  return jnp.einsum("bgqts,bsgk->btgqk", probs_BGQTS, v_BSHK).reshape(B, T, H, v_BSHK.shape[-1])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Packing:
  """Segment ids together with each row's runs of them, computed on the host by the loader
  (`data.packing.segment_runs`): what cuDNN's packed layout reads instead of a mask.

  Pass one wherever `segment_ids_BT` goes; kernels other than cuDNN read only `ids_BT`.
  """
  ids_BT: jax.Array
  lengths_BR: jax.Array   # [B, R] length of each run, -1 past the row's last
  offsets_BR1: jax.Array  # [B, R + 1] first index of each run, -1 past the row's last


def packing_of(batch: dict):
  """The batch's segment ids, as a `Packing` when the loader sent their runs along."""
  if "segment_lengths" in batch:
    return Packing(batch["segment_ids"], batch["segment_lengths"], batch["segment_offsets"])
  return batch["segment_ids"]


def _has_compute_capability(major: int, minor: int) -> bool:
  """Whether the first GPU is an NVIDIA one of at least this CUDA compute capability."""
  try:
    version = getattr(jax.devices()[0], "compute_capability", "0.0")
    return tuple(int(x) for x in str(version).split(".")[:2]) >= (major, minor)
  except (RuntimeError, ValueError):
    return False


def check_kernel(kernel: str, dtype, lengths: tuple[int, ...] = ()) -> None:
  """Raises AttentionError where `kernel` (resolved) cannot run on the target platform at this compute
  dtype and these sequence lengths: what a trace would find, for `fmjax plan` where nothing is traced."""
  if kernel == "cudnn" and target_platform() != "gpu":
    raise AttentionError("attention kernel 'cudnn' needs a GPU; set model.attention=auto or xla")
  if kernel == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    raise AttentionError(f"attention kernel 'cudnn' needs bfloat16/float16 compute, got {jnp.dtype(dtype)}; "
                         "set model.dtype=bfloat16 or model.attention=xla")
  if kernel == "splash" and target_platform() == "gpu":  # CPUs run it interpreted so that tests cover it
    raise AttentionError("attention kernel 'splash' is a TPU kernel: a GPU would run it in Pallas interpret "
                         "mode, far slower than its own; set model.attention=auto (cudnn) or xla")
  for n in lengths if kernel == "splash" else ():
    if n % SPLASH_MIN_BLOCK:
      raise AttentionError(f"splash attention needs sequence lengths that are a multiple of {SPLASH_MIN_BLOCK}, "
                           f"got {n}; change data.seq_len or set model.attention=xla")


def _cudnn_attention(q_BTHK, k_BSHK, v_BSHK, *, causal, segment_ids_BT, segment_ids_BS, packing=None):
  check_kernel("cudnn", q_BTHK.dtype)
  if segment_ids_BT is None:
    return jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_BSHK, is_causal=causal, implementation="cudnn")
  # `packing` comes only with self-attention (see `attention`).
  if packing is not None and _has_compute_capability(9, 0):  # cuDNN's packed layout needs Hopper or later
    try:
      from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa  # the only entry that takes offsets
    except ImportError:  # a JAX that moved it: the mask path below is still correct
      cudnn_fa = None
    if cudnn_fa is not None:
      # Self-attention over a packing: cuDNN gets the runs' lengths and offsets, skips the
      # blocks between segments and reads no mask (the faster path; see benchmarks/README.md).
      return cudnn_fa.dot_product_attention(
          q_BTHK, k_BSHK, v_BSHK, q_seqlen=packing.lengths_BR, kv_seqlen=packing.lengths_BR,
          q_offsets=packing.offsets_BR1, kv_offsets=packing.offsets_BR1, scale=1.0 / math.sqrt(q_BTHK.shape[-1]),
          mask_type=cudnn_fa.MaskType.CAUSAL if causal else cudnn_fa.MaskType.NO_MASK)
  # Causality stays with cuDNN's own mask type (it skips the upper triangle); only the segment
  # structure goes in, as a dense [B, 1, T, S] mask cuDNN reads for every block.
  mask = (segment_ids_BT[:, :, None] == segment_ids_BS[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_BSHK, mask=mask, is_causal=causal, implementation="cudnn")


def _splash_blocks(T: int, S: int):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

  check_kernel("splash", None, (T, S))
  block = lambda n: next(b for b in (512, 256, SPLASH_MIN_BLOCK) if n % b == 0)
  bq, bkv = block(T), block(S)
  return sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                       block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                       block_q_dq=bq, block_kv_dq=bkv)


def _splash_kernel(T: int, S: int, H: int, causal: bool, interpret: bool):
  """The splash kernel of one (shape, mask), made inside the trace that calls it.

  Its mask arrays are that trace's constants. Cached across traces they leaked into the next one
  (the eval step after the train step); made eagerly they ran on the mesh's devices, which a
  compile for a TPU topology from a CPU host (`fmjax plan`) does not have. JAX caches the costly
  part, the mask preprocessing, by mask value.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  head_mask = sm.CausalMask((T, S), offset=S - T) if causal else sm.FullMask((T, S))
  return sk.make_splash_mha(sm.MultiHeadMask([head_mask] * H), block_sizes=_splash_blocks(T, S),
                            head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q_BTHK, k_BSHK, v_BSHK, seg_BT, seg_BS, *, causal):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  T, H, K = q_BTHK.shape[1], q_BTHK.shape[2], q_BTHK.shape[3]
  S = k_BSHK.shape[1]
  kernel = _splash_kernel(T, S, H, causal, target_platform() != "tpu")
  q_BHTK = (q_BTHK * (1.0 / math.sqrt(K))).astype(q_BTHK.dtype).transpose(0, 2, 1, 3)
  k_BHSK = k_BSHK.transpose(0, 2, 1, 3)
  v_BHSK = v_BSHK.transpose(0, 2, 1, 3)

  def one(q_HTK, k_HSK, v_HSK, sq_T, sk_S):
    return kernel(q_HTK, k_HSK, v_HSK, segment_ids=sk.SegmentIds(q=sq_T, kv=sk_S))

  out_BHTK = jax.vmap(one)(q_BHTK, k_BHSK, v_BHSK, seg_BT, seg_BS)
  return out_BHTK.transpose(0, 2, 1, 3)


def logical_spec(names, shape=None) -> P | None:
  """PartitionSpec for logical axis names under the current mesh and rules; None without a mesh.

  Mesh axes the current mesh lacks are dropped, so a rule such as batch -> (data, fsdp) works on
  a mesh that only has `data`; with `shape`, so are axes that do not divide that dimension.
  """
  mesh = jax.sharding.get_abstract_mesh()
  rules = dict(flax_spmd.get_logical_axis_rules())
  if mesh.empty or not rules:
    return None
  present = set(mesh.axis_names)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    target = rules.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a in present and a not in used)
    if shape is not None:
      while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*spec)


def _splash_attention(q_BTHK, k_BSHK, v_BSHK, *, causal, segment_ids_BT, segment_ids_BS):
  if k_BSHK.shape[2] != q_BTHK.shape[2]:  # grouped-query attention: each key/value head read by its group
    groups = q_BTHK.shape[2] // k_BSHK.shape[2]
    k_BSHK, v_BSHK = jnp.repeat(k_BSHK, groups, axis=2), jnp.repeat(v_BSHK, groups, axis=2)
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones(q_BTHK.shape[:2], jnp.int32)
    segment_ids_BS = jnp.ones(k_BSHK.shape[:2], jnp.int32)
  fn = functools.partial(_splash_local, causal=causal)
  qkv_spec = logical_spec(("batch", None, "heads", None), q_BTHK.shape)
  seg_spec = None if qkv_spec is None else P(qkv_spec[0], None)
  if qkv_spec is not None and jax.sharding.get_abstract_mesh().size > 1:
    # A Pallas TPU kernel is opaque to SPMD partitioning: run it per shard (batch and heads are
    # independent), so XLA neither gathers nor replicates q, k and v around it.
    fn = jax.shard_map(fn, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec, seg_spec),
                       out_specs=qkv_spec, check_vma=False)
  return fn(q_BTHK, k_BSHK, v_BSHK, segment_ids_BT.astype(jnp.int32), segment_ids_BS.astype(jnp.int32))


_IMPLS = {"xla": _xla_attention, "cudnn": _cudnn_attention, "splash": _splash_attention}


def attention(q_BTHK, k_BSHK, v_BSHK, *, causal: bool, segment_ids_BT=None, segment_ids_BS=None,
              kernel: str = "xla", q_offset=None, dropout_rate: float = 0.0, dropout_key=None):
  """Scaled dot-product attention over projected heads; returns out_BTHK in q's dtype.

  Args:
    q_BTHK, k_BSHK, v_BSHK: projected queries, keys and values (scale 1/sqrt(K) is applied here);
      keys and values may have fewer heads G than the queries' H, G dividing H (grouped-query
      attention: query head h reads key/value head h // (H / G)).
    causal: mask keys after the query position.
    segment_ids_BT: packing ids of the queries (0 = padding), or a `Packing` that carries their
      runs too; None means one segment per row.
    segment_ids_BS: ids of the keys; defaults to segment_ids_BT (self-attention).
    kernel: "xla", "cudnn", "splash" or "auto" (see `resolve_kernel`).
    q_offset: key index of the first query for a KV cache (see `make_mask`); "xla" kernel only.
    dropout_rate, dropout_key: drop attention probabilities at this rate with this key (training);
      a rate of 0 or no key means none. "xla" kernel only ("auto" picks it).
  """
  dropout = dropout_rate > 0.0 and dropout_key is not None
  kernel = resolve_kernel(kernel, q_BTHK.dtype, (q_BTHK.shape[1], k_BSHK.shape[1]), dropout=dropout)
  extra = {}
  if dropout:
    extra.update(dropout_rate=float(dropout_rate), dropout_key=dropout_key)
  if isinstance(segment_ids_BT, Packing):
    if kernel == "cudnn" and segment_ids_BS is None:  # self-attention: the runs are the keys' too
      extra["packing"] = segment_ids_BT
    segment_ids_BT = segment_ids_BT.ids_BT
  if segment_ids_BT is not None and segment_ids_BS is None:
    segment_ids_BS = segment_ids_BT
  if q_offset is not None:
    if kernel != "xla":
      raise AttentionError(f"a KV-cache offset needs the 'xla' attention kernel, got {kernel!r}")
    extra["q_offset"] = q_offset
  out_BTHK = _IMPLS[kernel](q_BTHK, k_BSHK, v_BSHK, causal=causal,
                            segment_ids_BT=segment_ids_BT, segment_ids_BS=segment_ids_BS, **extra)
  return out_BTHK.astype(q_BTHK.dtype)
