"""BERT masking, deterministic per (seed, step, row) through a counter-based hash RNG.

Shapes: B batch rows, T sequence, M = max_predictions, N positions drawn for, V vocabulary.

The random numbers for batch row b at step s are a pure function of (seed, s, b, position): a
splitmix64 hash of those counters. Nothing depends on which host computes the row or on how many
rows it computes, so 1, 2 or N hosts produce bitwise the same masks.
"""

from __future__ import annotations

import functools

import numpy as np

_C1 = np.uint64(0x9E3779B97F4A7C15)
_C2 = np.uint64(0xBF58476D1CE4E5B9)
_C3 = np.uint64(0x94D049BB133111EB)


def _mix(x):
  """splitmix64's finaliser: a bijective, well-mixing map of uint64."""
  x = x ^ (x >> np.uint64(30))
  x = x * _C2
  x = x ^ (x >> np.uint64(27))
  x = x * _C3
  return x ^ (x >> np.uint64(31))


def uniform(seed: int, step: int, rows_B: np.ndarray, cols_BN: np.ndarray, stream: int) -> np.ndarray:
  """Floats in [0, 1) for (global batch row, position) pairs at `step`; `stream` separates uses.

  cols_BN: [B, N] positions (or [N], shared by all rows); the result is [B, N].
  """
  with np.errstate(over="ignore"):
    key = _mix(np.asarray([seed], np.uint64) * _C1 + np.uint64(stream))
    key = _mix(key ^ (np.asarray([step], np.uint64) * _C2))
    key_B = _mix(key ^ (np.asarray(rows_B, np.uint64) * _C3 + _C1))
    cols_BN = np.asarray(cols_BN, np.uint64)
    x_BN = _mix(key_B[:, None] + (cols_BN + np.uint64(1)) * _C1)
  return (x_BN >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@functools.lru_cache(maxsize=8)
def _tables(special: tuple[int, ...], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(is_special lookup over ids, the ids a random replacement may take)."""
  is_special_V = np.zeros(max(vocab_size, max(special, default=0) + 1), bool)
  is_special_V[list(special)] = True
  return is_special_V, np.flatnonzero(~is_special_V[:vocab_size])


def mask_batch(tokens_BT: np.ndarray, segment_ids_BT: np.ndarray, *, seed: int, step: int, rows_B: np.ndarray,
               special_ids, vocab_size: int, mask_id: int, rate: float, max_predictions: int) -> dict:
  """Picks round(rate * candidates) positions per row (at least 1, at most M) among non-special, non-pad
  tokens; 80% become [MASK], 10% a random non-special token, 10% stay. Returns the MLM batch fields."""
  B, T = tokens_BT.shape
  M = max_predictions
  is_special_V, allowed = _tables(tuple(sorted(special_ids)), vocab_size)
  cand_BT = (segment_ids_BT > 0) & ~is_special_V[tokens_BT]
  n_cand_B = cand_BT.sum(axis=1)
  n_B = np.where(n_cand_B > 0, np.clip(np.rint(rate * n_cand_B), 1, M), 0).astype(np.int64)

  score_BT = np.where(cand_BT, uniform(seed, step, rows_B, np.arange(T), stream=0), 2.0)
  pick_BM = np.argsort(score_BT, axis=1, kind="stable")[:, :M]
  valid_BM = np.arange(M)[None, :] < n_B[:, None]
  pos_BM = np.sort(np.where(valid_BM, pick_BM, T), axis=1)  # sentinel T sorts the padding slots last
  valid_BM = pos_BM < T
  pos_BM = np.where(valid_BM, pos_BM, 0)

  rows_BM = np.arange(B)[:, None]
  targets_BM = np.where(valid_BM, tokens_BT[rows_BM, pos_BM], 0)
  action_BM = uniform(seed, step, rows_B, pos_BM, stream=1)
  random_BM = allowed[(uniform(seed, step, rows_B, pos_BM, stream=2) * len(allowed)).astype(np.int64)]
  new_BM = np.where(action_BM < 0.8, mask_id, np.where(action_BM < 0.9, random_BM, targets_BM))

  inputs_BT = tokens_BT.astype(np.int32, copy=True)
  r, c = np.nonzero(valid_BM)
  inputs_BT[r, pos_BM[r, c]] = new_BM[r, c]
  return {"inputs": inputs_BT,
          "mlm_positions": pos_BM.astype(np.int32),
          "mlm_targets": targets_BM.astype(np.int32),
          "mlm_weights": valid_BM.astype(np.float32)}
