"""Temporary probe: where GPT-2 small step time goes."""
import sys, time
import jax, jax.numpy as jnp, optax
from flax import nnx
sys.path.insert(0, ".")
from fmjax import config_lib, models
cfg = config_lib.load_module("configs/gpt.py").get_config("small").model
cfg.update(attention="cudnn")
B, T = 16, 1024
model = models.build_model(cfg, rngs=nnx.Rngs(0))
gd, st = nnx.split(model, nnx.Param)
toks = jax.random.randint(jax.random.key(0), (B, T), 0, cfg.vocab_size)
def t(name, f):
  g = jax.jit(jax.grad(f))
  jax.block_until_ready(g(st))
  s = time.time()
  for _ in range(10): r = g(st)
  jax.block_until_ready(r)
  dt = (time.time() - s) / 10
  print(f"{name:35s} {dt*1e3:.1f} ms", flush=True)
t("hidden only (sum)", lambda st: nnx.merge(gd, st).hidden(toks).astype(jnp.float32).mean())
t("full CE f32 logits", lambda st: optax.softmax_cross_entropy_with_integer_labels(nnx.merge(gd, st)(toks), toks).mean())
def bf16ce(st):
  m = nnx.merge(gd, st); h = m.hidden(toks)
  lg = jnp.einsum("btd,vd->btv", h, m.wte.embedding[...].astype(jnp.bfloat16))
  return optax.softmax_cross_entropy_with_integer_labels(lg.astype(jnp.float32), toks).mean()
t("CE bf16 logits", bf16ce)
t("embed only", lambda st: nnx.merge(gd, st).wte(toks).astype(jnp.float32).mean())
