"""Forward+backward time of attention variants and of the LM loss at GPT-2 / BERT shapes (GPU).

  python benchmarks/attention_micro.py
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import attention
from fmjax.data import packing


def timeit(f, *args, n=20):
  out = f(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(n):
    out = f(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / n * 1e3


def main():
  rng = np.random.default_rng(0)
  for name, (B, T, H, K, causal) in {"gpt2": (16, 1024, 12, 64, True), "bert128": (256, 128, 12, 64, False),
                                     "bert512": (32, 512, 12, 64, False)}.items():
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.bfloat16) for _ in range(3))
    seg1 = jnp.ones((B, T), jnp.int32)
    # 4 packed segments per row
    seg4 = jnp.asarray(np.repeat(np.arange(1, 5), T // 4)[None].repeat(B, 0), jnp.int32)
    # The same packings with their runs, as the loader sends them (cuDNN's packed layout).
    pack1, pack4 = (attention.packing_of({"segment_ids": s, **packing.segment_runs(np.asarray(s), n)})
                    for s, n in ((seg1, 1), (seg4, 4)))

    def loss(fn):
      return jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))

    mask = (seg4[:, :, None] == seg4[:, None, :])[:, None]
    variants = {
        "xla+seg": lambda q, k, v: attention.attention(q, k, v, causal=causal, segment_ids_BT=seg4, kernel="xla"),
        "cudnn nomask": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn"),
        "cudnn+mask": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                                                   implementation="cudnn"),
        "cudnn fmjax (packed)": lambda q, k, v: attention.attention(q, k, v, causal=causal, segment_ids_BT=pack4,
                                                                    kernel="cudnn"),
        "cudnn fmjax 1 seg": lambda q, k, v: attention.attention(q, k, v, causal=causal, segment_ids_BT=pack1,
                                                                 kernel="cudnn"),
    }
    ref = jax.jit(variants["xla+seg"])(q, k, v).astype(jnp.float32)
    for vname, fn in variants.items():
      try:
        out = jax.jit(fn)(q, k, v).astype(jnp.float32)
        one_segment = "nomask" in vname or "1 seg" in vname  # the reference has 4 segments
        err = float("nan") if one_segment else float(jnp.abs(out - ref).max())
        ms = timeit(loss(fn), q, k, v)
        print(f"{name:8s} {vname:22s} fwd+bwd {ms:7.2f} ms  maxerr vs xla {err:.3g}", flush=True)
      except Exception as e:
        print(f"{name:8s} {vname:22s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)

  # The LM loss on GPT-2 shapes: f32 logits over 50304 ids.
  B, T, D, V = 16, 1024, 768, 50304
  h = jnp.asarray(rng.standard_normal((B, T, D)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((V, D)) * 0.02, jnp.float32)
  tgt = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)

  def ce(h, w, with_acc):
    logits = jnp.einsum("btd,vd->btv", h, w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    lz = jax.nn.logsumexp(logits, -1)
    tl = jnp.take_along_axis(logits, tgt[..., None], -1)[..., 0]
    out = (lz - tl).sum()
    if with_acc:
      out = out + 0 * (jnp.argmax(logits, -1) == tgt).sum()
    return out
  for acc in (False, True):
    f = jax.jit(jax.grad(lambda h, w: ce(h, w, acc), argnums=(0, 1)))
    print(f"lm-loss  with_acc={acc}  fwd+bwd {timeit(f, h, w):7.2f} ms", flush=True)


if __name__ == "__main__":
  main()
