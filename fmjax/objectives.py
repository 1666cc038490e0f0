"""Pretraining losses: causal LM for GPT, masked LM for BERT.

Each returns summed loss and weight so that gradient accumulation and multi-host means
stay exact: the mean is taken once, over the whole global batch.

Legend: B batch, T sequence, M masked positions per row, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits_BXV: jax.Array, targets_BX: jax.Array, weights_BX: jax.Array):
  """Summed weighted cross-entropy, weight sum and number of correct argmax predictions."""
  logits_BXV = logits_BXV.astype(jnp.float32)
  logz_BX = jax.nn.logsumexp(logits_BXV, axis=-1)
  target_logit_BX = jnp.take_along_axis(logits_BXV, targets_BX[..., None], axis=-1)[..., 0]
  nll_BX = logz_BX - target_logit_BX
  correct_BX = (jnp.argmax(logits_BXV, axis=-1) == targets_BX).astype(jnp.float32)
  return (jnp.sum(nll_BX * weights_BX), jnp.sum(weights_BX), jnp.sum(correct_BX * weights_BX))


def clm_loss(model, batch, *, deterministic: bool = True, rngs=None):
  """Next-token loss; `batch['loss_weights']` masks padding and cross-document targets."""
  logits_BTV = model(batch["inputs"], positions_BT=batch["positions"],
                     segment_ids_BT=batch["segment_ids"], deterministic=deterministic, rngs=rngs)
  loss, weight, correct = cross_entropy(logits_BTV, batch["targets"], batch["loss_weights"])
  return loss, {"loss_sum": loss, "weight_sum": weight, "correct_sum": correct}


def mlm_loss(model, batch, *, deterministic: bool = True, rngs=None):
  """Masked-LM loss computed on the masked positions only (the head never sees the rest)."""
  logits_BMV = model(batch["inputs"], token_types_BT=batch["token_types"], positions_BT=batch["positions"],
                     segment_ids_BT=batch["segment_ids"], mlm_positions_BM=batch["mlm_positions"],
                     deterministic=deterministic, rngs=rngs)
  loss, weight, correct = cross_entropy(logits_BMV, batch["mlm_targets"], batch["mlm_weights"])
  return loss, {"loss_sum": loss, "weight_sum": weight, "correct_sum": correct}


LOSSES = {"clm": clm_loss, "mlm": mlm_loss}


def get_loss_fn(objective: str):
  return LOSSES[objective]
