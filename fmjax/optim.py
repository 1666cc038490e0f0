"""Optimizer and learning-rate schedules (optax).

AdamW with decoupled weight decay applied to matrices only: norms, biases and embeddings
are not decayed. Global-norm clipping runs before Adam. `optim.mu_dtype=bfloat16` stores the
first moment in bf16; the second stays float32. A `trainable` mask freezes parameters for
parameter-efficient fine-tuning: frozen leaves get zero updates and keep no Adam moments.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fmjax import config_lib

# The matrices that decay: dense kernels and LoRA's low-rank factors of them (`peft.LoRADense`). Without
# the factors, optim.weight_decay did nothing to a LoRA fine-tune's adapted weights, only to its head.
DECAYED = ("kernel", "lora_a", "lora_b")


def decay_mask(params):
  """True for dense kernels and LoRA factors, and an untied output layer (`lm_head`, a projection
  stored as a table); False for norms, biases and embedding tables."""
  def keep(path, leaf):
    names = [str(getattr(k, "key", k)) for k in path]
    return names[-1] in DECAYED or names[-2:] == ["lm_head", "embedding"]
  return jax.tree_util.tree_map_with_path(keep, params)


def make_schedule(optim_cfg, total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """Linear warmup to `lr`, then cosine / linear decay to `lr * min_lr_ratio`, rsqrt, constant, or
  wsd (warmup-stable-decay: `lr` until the last `decay_fraction` of the steps, which decay linearly
  to the floor).

  The rate of update `s` (from 0) is schedule(s). With a warmup that is lr * s / warmup_steps, so
  the first update runs at rate 0, as in BERT's and Hugging Face's schedules: it moves no parameter
  but starts Adam's moments from a real gradient. A wsd run resumed with more train.steps keeps the
  rate it had anywhere in its stable part, so a run may be extended before its decay begins.
  """
  peak, warmup = optim_cfg.lr, int(optim_cfg.warmup_steps)
  floor = peak * optim_cfg.min_lr_ratio
  decay_steps = max(int(total_steps) - warmup, 1)
  kind = optim_cfg.schedule
  if kind == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim_cfg.min_lr_ratio)
  elif kind == "linear":
    after = optax.linear_schedule(peak, floor, decay_steps)
  elif kind == "wsd":
    tail = min(max(round(optim_cfg.get("decay_fraction", 0.2) * int(total_steps)), 1), decay_steps)
    after = optax.join_schedules([optax.constant_schedule(peak), optax.linear_schedule(peak, floor, tail)],
                                 [decay_steps - tail])
  elif kind == "rsqrt":
    after = lambda s: peak * jax.lax.rsqrt(jnp.maximum(s + warmup, 1.0) / max(warmup, 1))
  else:
    after = optax.constant_schedule(peak)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(config, trainable: Callable | None = None) -> optax.GradientTransformation:
  """The optimizer for `config.optim`; `trainable(params) -> bool tree` freezes the False leaves (by
  default those that `finetune.peft` freezes, `peft.trainable_mask`)."""
  mode = config_lib.peft_mode(config)
  if trainable is None and mode != "none":
    from fmjax import peft  # local: peft imports the models
    trainable = lambda params: peft.trainable_mask(params, mode)
  o = config.optim
  schedule = make_schedule(o, config.train.steps)
  parts = []
  if o.clip_norm and o.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(o.clip_norm))
  parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                           mu_dtype=jnp.dtype(o.get("mu_dtype", "float32")), mask=decay_mask))
  tx = optax.chain(*parts)
  if trainable is not None:
    labels = lambda params: jax.tree.map(lambda t: "train" if t else "freeze", trainable(params))
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  return tx
