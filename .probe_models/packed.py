"""Temporary probe: cuDNN packed (ragged offsets) attention vs a bias mask."""
import sys, time
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, ".")
from fmjax import attention as attn
from jax._src.cudnn import fused_attention_stablehlo as fa

def packed(q, k, v, seg, causal, M):
  B, T = seg.shape
  start = jnp.concatenate([jnp.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], 1)
  idx = jnp.cumsum(start, 1) - 1
  counts = jax.vmap(lambda i: jnp.bincount(i, length=M))(idx).astype(jnp.int32)
  offs = jnp.cumsum(counts, 1) - counts
  seqlen = jnp.where(counts > 0, counts, -1)
  offs = jnp.where(counts > 0, offs, -1)
  offs = jnp.concatenate([offs, -jnp.ones((B, 1), jnp.int32)], 1)
  mt = fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING
  return fa.dot_product_attention(q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offs, kv_offsets=offs,
                                  scale=1 / np.sqrt(q.shape[-1]), mask_type=mt)

B, T, H, K = 16, 1024, 12, 64
ks = jax.random.split(jax.random.key(0), 3)
q, k, v = [jax.random.normal(kk, (B, T, H, K), jnp.bfloat16) for kk in ks]
rng = np.random.default_rng(0)
seg = np.zeros((B, T), np.int32)
for b in range(B):
  cuts = np.sort(rng.choice(np.arange(1, T - 50), size=5, replace=False))
  seg[b] = np.searchsorted(cuts, np.arange(T), side="right") + 1
  seg[b, T - 30:] = 0 if b % 2 else seg[b, T - 30]
seg = jnp.asarray(seg)
for causal in (True, False):
  ref = attn.attention(q, k, v, causal=causal, segment_ids_BT=seg, kernel="xla").astype(jnp.float32)
  for M in (8, 64):
    out = jax.jit(packed, static_argnums=(4, 5))(q, k, v, seg, causal, M).astype(jnp.float32)
    print("packed", causal, M, "maxerr", float(jnp.abs(out - ref).max()), flush=True)
  out = attn.attention(q, k, v, causal=causal, segment_ids_BT=seg, kernel="cudnn").astype(jnp.float32)
  print("bias", causal, "maxerr", float(jnp.abs(out - ref).max()), flush=True)

def timeit(name, f):
  g = jax.jit(jax.grad(lambda q, k, v: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
  jax.block_until_ready(g(q, k, v))
  t = time.time()
  for _ in range(20):
    r = g(q, k, v)
  jax.block_until_ready(r)
  print(f"{name:30s} fwd+bwd {(time.time()-t)/20*1e3:.2f} ms", flush=True)

timeit("cudnn causal no seg", lambda q, k, v: attn.attention(q, k, v, causal=True, kernel="cudnn"))
timeit("cudnn causal bias seg", lambda q, k, v: attn.attention(q, k, v, causal=True, segment_ids_BT=seg, kernel="cudnn"))
for M in (8, 64, 1024):
  timeit(f"cudnn causal packed M={M}", lambda q, k, v: packed(q, k, v, seg, True, M))
timeit("xla causal seg", lambda q, k, v: attn.attention(q, k, v, causal=True, segment_ids_BT=seg, kernel="xla"))
