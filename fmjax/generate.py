"""Sampling from GPT and fill-mask with BERT, from a training workdir.

Legend: B batch, T sequence, V vocabulary.
"""

from __future__ import annotations

import json
import os
from functools import partial

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fmjax.config_lib import ConfigError


def load_run(workdir: str, step: int | None = None):
  """(model, config, tokenizer) from a workdir written by `fmjax train`; params of `step` or the latest."""
  from fmjax import checkpoint as ckpt_lib, data, optim, sharding, train
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ConfigError(f"{workdir} has no config.json; pass the --workdir of a finished `fmjax train` run")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.mesh.update(dcn_data=1, data=-1, fsdp=1, tensor=1)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise ConfigError(f"{workdir} holds no checkpoint yet; train first or pass another --workdir")
  mesh = sharding.make_mesh(config)
  spec = train.state_spec(config, mesh, optim.make_optimizer(config))
  ckpt_lib.check_compatible(checkpointer, step, spec.abstract)
  with jax.set_mesh(mesh):
    params = checkpointer.restore(step, spec.abstract, items=("params",))["params"]
  checkpointer.close()
  model = nnx.merge(spec.graphdef, params)
  return model, config, data.get_tokenizer(config)


def sample_logits(logits_BV: jax.Array, key: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Greedy when temperature is 0; otherwise temperature, top-k and nucleus (top-p) sampling."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / temperature
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    # The smallest logit still inside the nucleus; the top token always stays.
    cutoff_idx_B1 = jnp.sum(cum_BV < top_p, axis=-1, keepdims=True)
    cutoff_B1 = jnp.take_along_axis(sorted_BV, cutoff_idx_B1, axis=-1)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(key, logits_BV).astype(jnp.int32)


@partial(nnx.jit, static_argnames=("max_new_tokens", "temperature", "top_k", "top_p"))
def _generate_padded(model, tokens_BT, segment_ids_BT, positions_BT, start, key, *, max_new_tokens,
                     temperature, top_k, top_p):
  def body(i, carry):
    tokens_BT, positions_BT, key = carry
    cur = start + i
    logits_BTV = model(tokens_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT)
    key, sub = jax.random.split(key)
    next_B = sample_logits(logits_BTV[:, cur - 1], sub, temperature=temperature, top_k=top_k, top_p=top_p)
    tokens_BT = tokens_BT.at[:, cur].set(next_B)
    return tokens_BT, positions_BT, key
  tokens_BT, _, _ = jax.lax.fori_loop(0, max_new_tokens, body, (tokens_BT, positions_BT, key))
  return tokens_BT


def generate(model, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
             max_len: int | None = None) -> list[list[int]]:
  """Continues each prompt (token ids) by up to `max_new_tokens`; batched, prompts left-padded."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ConfigError("every prompt needs at least one token")
  b, longest = len(prompts), max(len(p) for p in prompts)
  total = longest + max_new_tokens
  if max_len is not None and total > max_len:
    raise ConfigError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model's max_len {max_len}")
  tokens = np.zeros((b, total), np.int32)
  segments = np.ones((b, total), np.int32)
  positions = np.zeros((b, total), np.int32)
  for i, p in enumerate(prompts):
    pad = longest - len(p)
    tokens[i, pad:longest] = p
    segments[i, :pad] = 0  # pads form their own segment: real tokens never see them
    positions[i, pad:] = np.arange(total - pad)
  out = _generate_padded(model, jnp.asarray(tokens), jnp.asarray(segments), jnp.asarray(positions), longest,
                         jax.random.key(seed), max_new_tokens=max_new_tokens, temperature=float(temperature),
                         top_k=int(top_k), top_p=float(top_p))
  out = np.asarray(out)
  results = []
  for i in range(b):
    new = out[i, longest:].tolist()
    if eos_id is not None and eos_id in new:
      new = new[:new.index(eos_id)]
    results.append(new)
  return results


def fill_mask(model, tokenizer, text: str, *, top_k: int = 5, mask_token: str = "[MASK]") -> list[list[tuple[str, float]]]:
  """For each `[MASK]` in `text`, the top-k (token, probability) predictions of a BERT."""
  pieces = text.split(mask_token)
  if len(pieces) < 2:
    raise ConfigError(f"fill-mask text needs at least one {mask_token}")
  ids = [tokenizer.cls_id]
  mask_positions = []
  for i, piece in enumerate(pieces):
    if piece.strip():
      ids += tokenizer.encode(piece.strip())
    if i < len(pieces) - 1:
      mask_positions.append(len(ids))
      ids.append(tokenizer.mask_id)
  ids.append(tokenizer.sep_id)
  tokens_1T = jnp.asarray([ids], jnp.int32)
  logits_1MV = model(tokens_1T, mlm_positions_BM=jnp.asarray([mask_positions], jnp.int32))
  probs_MV = np.asarray(jax.nn.softmax(logits_1MV[0], axis=-1))
  results = []
  for row in probs_MV:
    best = np.argsort(-row)[:top_k]
    results.append([(tokenizer.decode([int(t)]).strip(), float(row[t])) for t in best])
  return results
