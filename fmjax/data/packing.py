"""`prepare`: tokenise, pack and cache a dataset's train and eval splits (`fmjax data prepare`).

Layout of a cache directory <cache_dir>/datasets/<dataset>-<objective>-<seq_len>-<key>/:
  meta.json            what was prepared (written last: a directory without it is never read)
  tokenizer/           the tokenizer the ids belong to
  pii_counts.json      what PII scrubbing replaced, per split (when data.pii_scrub)
  train/, eval/        meta.json plus raw little-endian arrays, read with np.memmap:
    CLM: tokens.bin    one stream [N] of all documents, each followed by EOS. Row r of the
                       loader is stream[r*T : r*T + T + 1] (inputs and shifted targets), so
                       documents run across rows and nothing is padded. In a row, an EOS opens
                       the next document's segment (as its BOS).
    MLM: tokens.bin, segment_ids.bin, token_types.bin   [R, T] rows of packed
                       [CLS] A [SEP] B [SEP] segments (A/B: a document chunk split at a random
                       point), several per row, the rest padded with segment id 0.
Everything is written into a temporary directory that is renamed into place at the end, so an
interrupted prepare leaves nothing a later run would read.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import time

import numpy as np

from fmjax import files
from fmjax.config_lib import ConfigError
from fmjax.data import pii, sources
from fmjax.data import tokenizers as tokenizers_lib

ARRAY_FILES = ("tokens.bin", "segment_ids.bin", "token_types.bin")  # a split's bulk, beside its meta.json
FORMAT_VERSION = 2  # 2: an EOS opens the next document's segment (its count of segments per row)
_ENCODE_CHUNK = 512
# The most runs of segment ids a row may have for batches to carry them (`segment_runs`), so that
# cuDNN attention takes its packed layout; a split with a longer row takes its mask path.
MAX_RUNS = 16


def runs_to_send(most: int | None) -> int:
  """How many runs a row the batches carry, given the most any row has (None: unknown): that
  many, or 0 (none; attention takes the mask) past MAX_RUNS."""
  return most if most is not None and most <= MAX_RUNS else 0


def most_runs(segment_ids_BT: np.ndarray) -> int:
  """The most runs of equal segment ids in any row (padding counts as one)."""
  return 1 + int((segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]).sum(axis=1).max(initial=0))


def segment_runs(segment_ids_BT: np.ndarray, num_runs: int) -> dict[str, np.ndarray] | None:
  """Each row's contiguous runs of equal segment ids, in the packed form cuDNN attention reads.

  Returns {"segment_lengths": [B, R], "segment_offsets": [B, R + 1]} (int32, R = num_runs): the
  length and first index of each run, -1 past a row's last run (and in the extra offsets column).
  Padding (id 0) is a run too, so pads attend pads as under the mask. None when a row has more
  than `num_runs` runs, or when an id comes back after another ([1, 1, 2, 1]: the runs are not
  the segments); attention then takes the mask path.
  """
  B, T = segment_ids_BT.shape
  starts_BT = np.ones((B, T), bool)
  starts_BT[:, 1:] = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
  b_N, t_N = np.nonzero(starts_BT)  # N: every run in the batch, row by row
  run_N = np.cumsum(starts_BT, axis=1)[b_N, t_N] - 1
  if len(b_N) and run_N.max() >= num_runs:
    return None
  ids_N = segment_ids_BT[b_N, t_N].astype(np.int64)
  if np.unique(b_N * (int(ids_N.max(initial=0)) + 1) + ids_N).size != len(b_N):
    return None
  last_N = np.append(b_N[1:] != b_N[:-1], True)
  end_N = np.where(last_N, T, np.append(t_N[1:], T))
  lengths_BR = np.full((B, num_runs), -1, np.int32)
  offsets_BR1 = np.full((B, num_runs + 1), -1, np.int32)
  lengths_BR[b_N, run_N] = end_N - t_N
  offsets_BR1[b_N, run_N] = t_N
  return {"segment_lengths": lengths_BR, "segment_offsets": offsets_BR1}


def cache_path(config, tok: tokenizers_lib.Tokenizer) -> str:
  """The cache directory for `config` with tokenizer `tok` (whether or not it exists yet)."""
  key = sources.identity_hash({
      "train": sources.corpus_identity(config, "train"), "eval": sources.corpus_identity(config, "eval"),
      "tokenizer": tok.identity(), "seq_len": config.data.seq_len, "objective": config.train.objective,
      "version": FORMAT_VERSION})
  slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.data.dataset)
  return os.path.join(sources.local_cache_root(config), "datasets",
                      f"{slug}-{config.train.objective}-{config.data.seq_len}-{key}")


def is_prepared(path: str) -> bool:
  """True once a cache directory is complete (its meta.json is written last)."""
  return os.path.exists(os.path.join(path, "meta.json"))


def prepare(config, tok: tokenizers_lib.Tokenizer | None = None) -> str:
  """Tokenises, packs and caches the train and eval splits; idempotent; returns the cache directory.

  `tok`: the tokenizer to use (a run's own, `get_tokenizer(config, workdir)`); default the config's.
  """
  sources.check_config(config)
  if config.train.objective == "mlm" and config.data.max_predictions > config.data.seq_len:
    raise ConfigError(f"data.max_predictions={config.data.max_predictions} exceeds data.seq_len="
                      f"{config.data.seq_len}; lower it")
  if tok is None:
    tok = tokenizers_lib.get_tokenizer(config)
  path = cache_path(config, tok)
  rel = os.path.relpath(path, sources.local_cache_root(config))
  # data.cache_dir in a bucket: prepared once, for every host (its arrays copied or read in place).
  sources.fetch_shared(config, rel, "meta.json", bulk=ARRAY_FILES)
  if is_prepared(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = files.make_temp_dir(os.path.dirname(path))
  try:
    meta = {"dataset": config.data.dataset, "objective": config.train.objective, "seq_len": config.data.seq_len,
            "train": sources.corpus_identity(config, "train"), "eval": sources.corpus_identity(config, "eval"),
            "tokenizer_kind": tok.kind, "vocab_size": tok.vocab_size, "version": FORMAT_VERSION, "splits": {}}
    pii_counts = {}
    for split in ("train", "eval"):
      stats, counts = _write_split(config, tok, split, os.path.join(tmp, split))
      meta["splits"][split] = stats
      pii_counts[split] = dict(counts)
    tok.save(os.path.join(tmp, "tokenizer"))
    if config.data.pii_scrub:
      _write_json(os.path.join(tmp, "pii_counts.json"), pii_counts)
    _write_json(os.path.join(tmp, "meta.json"), meta)
    try:
      os.rename(tmp, path)
    except OSError:
      if not is_prepared(path):  # another process finished the same cache first: use theirs
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  sources.share(config, rel)
  return path


def _write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)


def token_dtype(vocab_size: int):
  """The narrowest dtype for the cache: uint16 halves disk and read bandwidth for vocabularies up to 65536."""
  return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def _progress(split: str):
  from tqdm.auto import tqdm
  # disable=None: quiet when stderr is not a terminal (logs on pods, tests).
  return tqdm(desc=f"prepare {split}", unit="tok", unit_scale=True, disable=None, leave=False)


def _token_chunks(config, tok, split: str, counts: collections.Counter):
  """Yields lists of token-id lists, a chunk of documents at a time."""
  batch = []
  for text in sources.documents(config, split):
    if config.data.pii_scrub:
      text, found = pii.scrub(text)
      counts.update(found)
    batch.append(text)
    if len(batch) == _ENCODE_CHUNK:
      yield tok.encode_batch(batch)
      batch = []
  if batch:
    yield tok.encode_batch(batch)


def _write_split(config, tok, split: str, directory: str) -> tuple[dict, collections.Counter]:
  os.makedirs(directory)
  counts = collections.Counter()
  dtype = token_dtype(tok.vocab_size)
  T = config.data.seq_len
  start, num_docs, num_tokens = time.time(), 0, 0
  bar = _progress(split)
  if config.train.objective == "clm":
    writer = _StreamWriter(directory, dtype, T, tok.eos_id)
  else:
    writer = _RowWriter(directory, dtype, T, tok)
  try:
    for chunk in _token_chunks(config, tok, split, counts):
      for ids in chunk:
        if ids:
          writer.add(ids)
          num_docs += 1
          num_tokens += len(ids)
      bar.update(sum(len(ids) for ids in chunk))
      bar.set_postfix_str(f"{num_tokens / max(time.time() - start, 1e-9):,.0f} tok/s")
    stats = writer.close()
  finally:
    bar.close()
  if num_docs == 0:
    raise ConfigError(f"dataset {config.data.dataset!r} split {sources.split_spec(config, split)!r} has no "
                      "text (empty corpus); check data.dataset, data.files and the split names")
  if stats["num_rows"] == 0:
    raise ConfigError(f"the {split} split has {num_tokens} tokens, not enough for one row of data.seq_len={T}; "
                      "lower data.seq_len or use more text")
  stats.update(num_docs=num_docs, num_text_tokens=num_tokens, dtype=np.dtype(dtype).name,
               seconds=round(time.time() - start, 3))
  _write_json(os.path.join(directory, "meta.json"), stats)
  return stats, counts


class _StreamWriter:
  """CLM: appends each document and its EOS to one token stream."""

  def __init__(self, directory, dtype, T, eos_id):
    self.f = open(os.path.join(directory, "tokens.bin"), "wb")
    self.dtype, self.T, self.eos = dtype, T, eos_id
    self.n = 0
    self.pending = []
    self.end = 0  # stream length once `pending` is written
    # Row r's inputs are stream[r*T : r*T + T]; an EOS there at index > 0 starts another
    # segment in the row. EOS positions only grow, so one running count per row is enough.
    self.row, self.row_segments, self.max_segments = 0, 1, 1

  def add(self, ids):
    self.pending.append(ids)
    self.pending.append((self.eos,))
    if len(self.pending) >= 2 * _ENCODE_CHUNK:
      self._flush()
    self.end += len(ids) + 1
    row, at = divmod(self.end - 1, self.T)
    if row != self.row:
      self.max_segments = max(self.max_segments, self.row_segments)
      self.row, self.row_segments = row, 1
    self.row_segments += at > 0

  def _flush(self):
    if self.pending:
      arr = np.fromiter((i for ids in self.pending for i in ids), dtype=self.dtype)
      self.f.write(arr.tobytes())
      self.n += arr.size
      self.pending = []

  def close(self):
    self._flush()
    self.f.close()
    rows = max(self.n - 1, 0) // self.T
    if self.row < rows:  # the last row the loader reads holds the last EOS
      self.max_segments = max(self.max_segments, self.row_segments)
    return {"layout": "stream", "num_stream_tokens": self.n, "num_rows": rows, "pad_fraction": 0.0,
            "max_segments": self.max_segments}


class _RowWriter:
  """MLM: packs [CLS] A [SEP] B [SEP] segments greedily, in order, into rows of T."""

  def __init__(self, directory, dtype, T, tok):
    self.files = {k: open(os.path.join(directory, f"{k}.bin"), "wb")
                  for k in ("tokens", "segment_ids", "token_types")}
    self.dtype, self.T, self.tok = dtype, T, tok
    self.rng = np.random.Generator(np.random.Philox(key=0))  # A/B split points; fixed, so the cache is reproducible
    self.rows = 0
    self.real = 0
    self.max_segments = 1
    self._new_row()

  def _new_row(self):
    self.row = {"tokens": np.full(self.T, self.tok.pad_id, self.dtype),
                "segment_ids": np.zeros(self.T, np.uint16), "token_types": np.zeros(self.T, np.uint8)}
    self.used = 0
    self.nseg = 0

  def _emit(self):
    if self.used:
      for k, f in self.files.items():
        f.write(self.row[k].tobytes())
      self.rows += 1
      self.real += self.used
      self.max_segments = max(self.max_segments, self.nseg + (self.used < self.T))  # padding is a segment too
    self._new_row()

  def add(self, ids):
    piece = self.T - 3
    for s in range(0, len(ids), piece):
      chunk = ids[s:s + piece]
      cut = int(self.rng.integers(1, len(chunk))) if len(chunk) >= 2 else len(chunk)
      a, b = chunk[:cut], chunk[cut:]
      seg = [self.tok.cls_id, *a, self.tok.sep_id] + ([*b, self.tok.sep_id] if b else [])
      types = [0] * (len(a) + 2) + [1] * (len(b) + 1 if b else 0)
      if self.used + len(seg) > self.T:
        self._emit()
      lo, hi = self.used, self.used + len(seg)
      self.nseg += 1
      self.row["tokens"][lo:hi] = seg
      self.row["segment_ids"][lo:hi] = self.nseg
      self.row["token_types"][lo:hi] = types
      self.used = hi

  def close(self):
    self._emit()
    for f in self.files.values():
      f.close()
    total = self.rows * self.T
    return {"layout": "rows", "num_rows": self.rows, "pad_fraction": round(1 - self.real / max(total, 1), 5),
            "max_segments": self.max_segments}
