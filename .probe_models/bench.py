"""Temporary GPU probe for fmjax models (deleted after use)."""
import sys, time, functools
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
sys.path.insert(0, ".")
from fmjax import config_lib, models

print(jax.devices(), jax.__version__, flush=True)

def gpt_cfg(**kw):
  c = config_lib.load_module("configs/gpt.py").get_config("small").model
  c.update(**kw); return c

def bert_cfg(**kw):
  c = config_lib.load_module("configs/bert.py").get_config("base").model
  c.update(**kw); return c

def bench(name, cfg, B, T, seg=False, mlm=0, steps=10):
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  tx = optax.adamw(1e-4, weight_decay=0.1)
  gd, state = nnx.split(model, nnx.Param)
  opt = tx.init(state)
  toks = jax.random.randint(jax.random.key(0), (B, T), 0, cfg.vocab_size)
  segs = (jnp.arange(T)[None] // 256 + 1).repeat(B, 0).astype(jnp.int32) if seg else None
  mpos = jnp.tile(jnp.arange(mlm)[None] * (T // mlm), (B, 1)) if mlm else None
  def loss_fn(st):
    m = nnx.merge(gd, st)
    if cfg.family == "gpt":
      lg = m(toks, segment_ids_BT=segs)
      return optax.softmax_cross_entropy_with_integer_labels(lg, jnp.roll(toks, -1, 1)).mean()
    lg = m(toks, segment_ids_BT=segs, mlm_positions_BM=mpos)
    lab = jnp.take_along_axis(toks, mpos, 1) if mlm else toks
    return optax.softmax_cross_entropy_with_integer_labels(lg, lab).mean()
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(st, o):
    l, g = jax.value_and_grad(loss_fn)(st)
    u, o = tx.update(g, o, st)
    return optax.apply_updates(st, u), o, l
  t = time.time(); state, opt, l = step(state, opt); l.block_until_ready(); comp = time.time() - t
  t = time.time()
  for _ in range(steps):
    state, opt, l = step(state, opt)
  l.block_until_ready(); dt = (time.time() - t) / steps
  tps = B * T / dt
  mfu = tps * models.flops_per_token(cfg, T) / 989e12
  print(f"{name:40s} B={B} T={T} step={dt*1e3:.1f}ms tok/s={tps/1e3:.0f}k MFU={mfu*100:.1f}% compile={comp:.0f}s loss={float(l):.3f}", flush=True)

which = sys.argv[1:]
if "gpt" in which:
  bench("gpt cudnn unrolled", gpt_cfg(attention="cudnn"), 16, 1024)
  bench("gpt cudnn unrolled seg", gpt_cfg(attention="cudnn"), 16, 1024, seg=True)
  bench("gpt cudnn scan", gpt_cfg(attention="cudnn", scan_layers=True), 16, 1024)
  bench("gpt cudnn unrolled B32", gpt_cfg(attention="cudnn"), 32, 1024)
  bench("gpt xla unrolled", gpt_cfg(attention="xla"), 16, 1024)
if "gptremat" in which:
  bench("gpt cudnn unrolled B32 remat dots", gpt_cfg(attention="cudnn", remat="dots"), 32, 1024)
  bench("gpt cudnn unrolled B32 remat save_attn", gpt_cfg(attention="cudnn", remat="save_attention_out"), 32, 1024)
if "bert" in which:
  bench("bert cudnn unrolled seq128 mlm20", bert_cfg(attention="cudnn"), 256, 128, mlm=20)
  bench("bert cudnn unrolled seq128 seg mlm20", bert_cfg(attention="cudnn"), 256, 128, seg=False, mlm=20)
  bench("bert cudnn unrolled seq512 mlm76", bert_cfg(attention="cudnn"), 32, 512, mlm=76)
