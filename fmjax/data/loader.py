"""Step-indexed loader over a prepared cache: the global batch of step s is a pure function of
(data.seed, s, cache); each host reads only its own rows.

Shapes: B global batch rows, T sequence (data.seq_len), M masked positions (data.max_predictions), L a
span's length, P parts of a split, C datasets of a mixture, V vocabulary.

Sample g = s*B + b of the global batch (b = row in the batch) is dataset row perm_e(g mod N) with
epoch e = g // N and perm_e a permutation drawn from Philox keyed by (seed, e): epochs reshuffle,
and resuming at step s needs nothing but s. A mixture gives each dataset c a fixed k_c of every
batch's rows (B times its share, rounded so they sum to B), spread evenly over the batch; its
j-th of them at step s is its own sample s*k_c + j, drawn the same way from its own rows and
permutations: each dataset cycles through its epochs at its own pace. Which batch rows a host
holds comes from the sharding (`addressable_devices_indices_map`), and the global array is
assembled with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
from typing import Iterator

import numpy as np

from fmjax import files
from fmjax.config_lib import ConfigError
from fmjax.data import masking
from fmjax.data import packing
from fmjax.data import sources
from fmjax.data import tokenizers as tokenizers_lib


_PREFETCHERS: set = set()


@atexit.register
def _stop_prefetchers():
  """Stops prefetch threads left running by an unclosed `iterate`, so none is inside JAX at exit."""
  for done, thread in list(_PREFETCHERS):
    done.set()
    thread.join(timeout=30)


class _LocalArray:
  """A raw little-endian array file on this host's disk, memory-mapped."""

  def __init__(self, path: str, dtype):
    self.array = np.memmap(path, dtype=dtype, mode="r")

  def span(self, start: int, length: int) -> np.ndarray:
    return self.array[start:start + length]

  def spans(self, starts_B: np.ndarray, length: int) -> np.ndarray:
    """[B, length] elements from each start."""
    return self.array[starts_B[:, None] + np.arange(length, dtype=np.int64)]

  def whole(self) -> np.ndarray:
    return self.array


class _BucketArray:
  """A raw array file left in a bucket (`data.bucket_reads`): each span is one ranged read, the
  spans of a batch in parallel (threads shared by every such file), each thread with its own open file."""

  THREADS = 16
  _pool = None
  _pool_lock = threading.Lock()

  def __init__(self, path: str, dtype):
    self.path, self.dtype = path, np.dtype(dtype)
    self._fs = files.range_filesystem(path)  # exact ranged reads (gcsfs), or None: the file's own reader
    self._local = threading.local()

  @classmethod
  def pool(cls):
    with cls._pool_lock:
      if cls._pool is None:
        from concurrent.futures import ThreadPoolExecutor
        cls._pool = ThreadPoolExecutor(cls.THREADS, thread_name_prefix="fmjax-bucket-read")
      return cls._pool

  def _file(self):
    f = getattr(self._local, "file", None)
    if f is None:
      f = self._local.file = files.path(self.path).open("rb")
    return f

  def span(self, start: int, length: int) -> np.ndarray:
    """`length` elements from `start`: one ranged read."""
    first, size = start * self.dtype.itemsize, length * self.dtype.itemsize
    if self._fs is not None:
      raw = self._fs.cat_file(self.path, start=first, end=first + size)
    else:
      f = self._file()
      f.seek(first)
      raw = f.read(size)
    if len(raw) != length * self.dtype.itemsize:
      raise ConfigError(f"{self.path} ends before element {start + length}: the bucket's cache entry is "
                        "incomplete; delete it there (and in data.cache_dir on each host) to prepare it again")
    return np.frombuffer(raw, self.dtype)

  def spans(self, starts_B: np.ndarray, length: int) -> np.ndarray:
    return np.stack(list(self.pool().map(lambda start: self.span(int(start), length), starts_B)))

  def whole(self) -> np.ndarray:
    return np.frombuffer(files.path(self.path).read_bytes(), self.dtype)


class PackedSplit:
  """One prepared split; `rows(ids)` gives unmasked batch fields.

  The split's rows are those of its parts in order (`packing`). Each part's arrays are
  memory-mapped from under `directory`, or, where it lacks them, read by ranges from
  `bucket_directory`, the same entry in a bucket `data.cache_dir` (`data.bucket_reads`).
  """

  def __init__(self, directory: str, seq_len: int, tok: tokenizers_lib.Tokenizer,
               bucket_directory: str | None = None):
    self.meta = packing.read_entry(os.path.dirname(directory), os.path.join(os.path.basename(directory), "meta.json"))
    self.T = seq_len
    self.tok = tok
    self.num_rows = self.meta["num_rows"]
    self.layout = self.meta["layout"]
    dtypes = {"tokens": np.dtype(self.meta["dtype"])}
    if self.layout != "stream":
      dtypes.update(segment_ids=np.uint16, token_types=np.uint8)
    # A cache made before parts is one part: the split directory itself. A part with no rows (its
    # records held no text, or too little for a row) is left out: there is nothing to map.
    parts = [p for p in self.meta.get("parts") or [{"name": "", "num_rows": self.num_rows}] if p["num_rows"] > 0]
    # A stream's row r reads T + 1 tokens from r*T; a row layout holds [rows, T] of each array.
    extra = 1 if self.layout == "stream" else 0
    self.parts = [{name: self._array(directory, bucket_directory, part["name"], name, dtype,
                                     part["num_rows"] * seq_len + extra)
                   for name, dtype in dtypes.items()} for part in parts]
    self.part_rows_P = np.array([part["num_rows"] for part in parts], np.int64)
    self.first_row_P = np.concatenate([[0], np.cumsum(self.part_rows_P)[:-1]])
    self.in_bucket = any(isinstance(a, _BucketArray) for part in self.parts for a in part.values())

  @staticmethod
  def _array(directory, bucket_directory, part: str, name: str, dtype, size: int):
    """Array `name` of `part`, which its meta.json says holds at least `size` elements."""
    local = os.path.join(directory, part, f"{name}.bin")
    if os.path.exists(local):
      held = os.path.getsize(local) // np.dtype(dtype).itemsize
      if held < size:  # cut short since it was made (a copy that stopped, a full disk): rows past its end fail
        raise ConfigError(f"{local} holds {held} elements where its meta.json counts {size}: the prepared cache "
                          f"is damaged; delete {os.path.dirname(directory)} to prepare it again")
      return _LocalArray(local, dtype)
    if bucket_directory is not None:
      return _BucketArray(os.path.join(bucket_directory, part, f"{name}.bin"), dtype)
    raise ConfigError(f"{os.path.join(directory, part)} has no {name}.bin: the prepared cache is incomplete; "
                      f"delete {os.path.dirname(directory)} to prepare it again")

  def targets(self) -> np.ndarray:
    """The tokens the loss reads, in order (CLM: every row's targets but a framed document's BOS; MLM: every real
    token)."""
    pieces = []
    for part, rows in zip(self.parts, self.part_rows_P):
      if self.layout == "stream":
        tokens = np.asarray(part["tokens"].whole()[1:rows * self.T + 1], np.int64)
        pieces.append(tokens[tokens != self.tok.bos_id] if self.tok.frames_documents else tokens)
      else:
        tokens = np.asarray(part["tokens"].whole(), np.int64)
        pieces.append(tokens[(np.asarray(part["segment_ids"].whole()) > 0)
                             & ~np.isin(tokens, sorted(self.tok.special_ids))])
    return np.concatenate(pieces)

  def rows(self, ids_B: np.ndarray) -> dict[str, np.ndarray]:
    """Fields of dataset rows `ids_B`; rows with id -1 are all padding (eval's last batch)."""
    pad_B = ids_B < 0
    ids_B = np.where(pad_B, 0, ids_B).astype(np.int64)
    if self.layout == "stream":
      # Row r is stream[r*T : r*T + T + 1]: its inputs and, shifted by one, its targets.
      return self._clm_rows(self._spans("tokens", ids_B, self.T + 1), pad_B)
    tokens_BT, seg_BT, types_BT = (self._spans(name, ids_B, self.T)
                                   for name in ("tokens", "segment_ids", "token_types"))
    if pad_B.any():
      tokens_BT[pad_B] = self.tok.pad_id
      seg_BT[pad_B] = 0
      types_BT[pad_B] = 0
    return {"tokens": tokens_BT, "segment_ids": seg_BT, "positions": _positions(seg_BT), "token_types": types_BT}

  def _spans(self, name: str, ids_B: np.ndarray, length: int) -> np.ndarray:
    """[B, length] int32 elements of array `name` from the start of each row, read from its part."""
    if len(self.parts) == 1:
      return np.asarray(self.parts[0][name].spans(ids_B * self.T, length), dtype=np.int32)
    part_B = np.searchsorted(self.first_row_P, ids_B, side="right") - 1
    starts_B = (ids_B - self.first_row_P[part_B]) * self.T
    if self.in_bucket:  # each row one ranged read, all of them at once whichever parts they are in
      arrays_B = [self.parts[p][name] for p in part_B]
      return np.stack(list(_BucketArray.pool().map(lambda a, start: a.span(int(start), length), arrays_B,
                                                   starts_B))).astype(np.int32)
    out_BL = np.empty((len(ids_B), length), np.int32)
    for p in np.unique(part_B):
      sel_B = part_B == p
      out_BL[sel_B] = self.parts[p][name].spans(starts_B[sel_B], length)
    return out_BL

  @classmethod
  def joined(cls, splits: list[PackedSplit]) -> PackedSplit:
    """The splits of a mixture's datasets as one: the rows of the first, then of the second, ..."""
    self = cls.__new__(cls)
    first = splits[0]
    self.T, self.tok, self.layout = first.T, first.tok, first.layout
    self.parts = [part for split in splits for part in split.parts]
    self.part_rows_P = np.concatenate([split.part_rows_P for split in splits])
    self.first_row_P = np.concatenate([[0], np.cumsum(self.part_rows_P)[:-1]])
    self.num_rows = int(self.part_rows_P.sum())
    most = [split.meta.get("max_segments") for split in splits]
    self.meta = {"num_rows": self.num_rows, "layout": self.layout,
                 "max_segments": None if None in most else max(most)}
    self.in_bucket = any(split.in_bucket for split in splits)
    return self

  def _clm_rows(self, x_BT1, pad_B):
    inputs_BT, targets_BT = x_BT1[:, :-1], x_BT1[:, 1:]
    opens_BT = inputs_BT == self.tok.bos_id
    # The EOS between two documents opens the second one's segment, as its BOS: EOS -> first token
    # is learnt within that document (what an empty prompt asks for), and the last token -> EOS
    # ("the document ends here") is predicted from its own document alone. Every target counts.
    # A tokenizer that frames documents (<s> ... </s>) opens each with its BOS instead; the EOS ends
    # its own document, and EOS -> the next BOS, which no document decides, is not a target.
    seg_BT = (1 + np.cumsum(opens_BT, axis=1, dtype=np.int32) - opens_BT[:, :1]).astype(np.int32)
    weights_BT = np.ones(inputs_BT.shape, np.float32)
    if self.tok.frames_documents:
      weights_BT[targets_BT == self.tok.bos_id] = 0.0
    if pad_B.any():
      inputs_BT[pad_B] = self.tok.pad_id
      targets_BT[pad_B] = self.tok.pad_id
      seg_BT[pad_B] = 0
      weights_BT[pad_B] = 0.0
    return {"inputs": np.ascontiguousarray(inputs_BT), "targets": np.ascontiguousarray(targets_BT),
            "segment_ids": seg_BT, "positions": _positions(seg_BT), "token_types": np.zeros_like(seg_BT),
            "loss_weights": weights_BT}


def _positions(seg_BT: np.ndarray) -> np.ndarray:
  """Position of each token within its segment (0 at padding)."""
  B, T = seg_BT.shape
  idx_T = np.arange(T, dtype=np.int32)
  starts_BT = np.empty_like(seg_BT, dtype=bool)
  starts_BT[:, 0] = True
  np.not_equal(seg_BT[:, 1:], seg_BT[:, :-1], out=starts_BT[:, 1:])
  first_BT = np.maximum.accumulate(np.where(starts_BT, idx_T, 0), axis=1)
  return np.where(seg_BT > 0, idx_T - first_BT, 0).astype(np.int32)


def host_rows(sharding, global_shape: tuple[int, int], process_index: int | None = None,
              process_count: int | None = None) -> np.ndarray:
  """The batch rows this process holds under `sharding`, sorted.

  With `process_index`/`process_count` set, simulates that many hosts: the sharding's devices,
  ordered by id, are split into `process_count` equal groups and group `process_index` is "ours".
  """
  B = global_shape[0]
  try:
    sharding.shard_shape(global_shape)
  except ValueError:
    raise ConfigError(f"batch size {B} does not split evenly over the data shards of the mesh; "
                      "use a batch size divisible by the data-parallel size") from None
  if process_index is None:
    index_map = sharding.addressable_devices_indices_map(global_shape)
  else:
    devices = sorted(sharding.device_set, key=lambda d: d.id)
    if process_count is None or len(devices) % process_count:
      raise ValueError(f"{len(devices)} devices do not split into process_count={process_count} hosts")
    per = len(devices) // process_count
    full = sharding.devices_indices_map(global_shape)
    index_map = {d: full[d] for d in devices[process_index * per:(process_index + 1) * per]}
  rows, sizes = set(), set()
  for index in index_map.values():
    r = range(*index[0].indices(B))
    rows.update(r)
    sizes.add(len(r))
  rows = np.array(sorted(rows), dtype=np.int64)
  if len(sizes) > 1 or B % max(len(rows), 1):
    raise ConfigError(f"batch size {B} does not split evenly over the data shards of the mesh; "
                      "use a batch size divisible by the data-parallel size")
  if len(rows) and rows[-1] - rows[0] + 1 != len(rows):
    raise ConfigError("this host's batch rows are not contiguous under the given sharding; shard the batch "
                      "dimension over the mesh's data axes in device order")
  return rows


def _default_sharding(batch_size: int):
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  devices = jax.devices()
  if batch_size % len(devices):
    devices = devices[:1]
  return NamedSharding(Mesh(np.array(devices), ("data",)), P("data", None))


def open_split(config, path: str, split: str, tok: tokenizers_lib.Tokenizer) -> tuple[PackedSplit, list]:
  """The prepared `split` of the cache entry at `path` (a mixture's datasets joined), and for a
  mixture the (first row, rows, share) of each of its datasets in it; else an empty list."""
  entries = packing.mixture_entries(path)
  if entries is None:
    return PackedSplit(os.path.join(path, split), config.data.seq_len, tok,
                       sources.bucket_entry(config, path, split)), []
  splits = [PackedSplit(os.path.join(entry, split), config.data.seq_len, tok,
                        sources.bucket_entry(config, entry, split)) for entry, _ in entries]
  firsts = np.concatenate([[0], np.cumsum([s.num_rows for s in splits])[:-1]])
  return PackedSplit.joined(splits), [(int(f), s.num_rows, share) for f, s, (_, share) in zip(firsts, splits, entries)]


class Loader:
  """Deterministic, step-indexed batches of one split; see the module docstring."""

  def __init__(self, config, split: str = "train", sharding=None, batch_size: int | None = None,
               shuffle: bool | None = None, *, process_index: int | None = None,
               process_count: int | None = None, tok: tokenizers_lib.Tokenizer | None = None):
    if split not in ("train", "eval"):
      raise ConfigError(f"split must be 'train' or 'eval', got {split!r}")
    self.config = config
    self.split = split
    self.path = packing.prepare(config, tok)
    self.tokenizer = tokenizers_lib.load_tokenizer(os.path.join(self.path, "tokenizer"))
    self.data, mixture = open_split(config, self.path, split, self.tokenizer)
    self.batch_size = int(batch_size or config.train.batch_size)
    self.seq_len = config.data.seq_len
    self.shuffle = (split == "train") if shuffle is None else bool(shuffle)
    self.seed = int(config.data.seed)
    self.objective = config.train.objective
    self.sharding = sharding if sharding is not None else _default_sharding(self.batch_size)
    self.simulated = process_index is not None
    self.rows_b = host_rows(self.sharding, (self.batch_size, self.seq_len), process_index, process_count)
    N, B = self.data.num_rows, self.batch_size
    # eval: every row once, the last batch padded; train: whole batches per epoch.
    self.num_batches = -(-N // B) if split == "eval" else max(N // B, 1)
    # Batches carry each row's runs of segment ids when every row of the split has few enough
    # (the cache's own count, so all hosts agree and the batch never changes shape).
    most = self.data.meta.get("max_segments")
    if most is None and split == "train":
      logging.getLogger("fmjax").info(
          "%s was prepared before caches counted segments a row: batches carry no segment runs, so "
          "cuDNN attention reads a mask; delete it to prepare it again for the faster path", self.path)
    self.num_runs = packing.runs_to_send(most)
    self._perms = {}
    self._lock = threading.Lock()
    self.mixture = None
    if mixture and self.shuffle and split == "train":
      self._mix_batch(mixture, sources.mixture(config.data.dataset))

  def _mix_batch(self, mixture: list[tuple[int, int, float]], names: list[tuple[str, float]]) -> None:
    """Which dataset each row of a batch reads, and its index among that dataset's rows of the batch."""
    B = self.batch_size
    k_C = sources.batch_rows(B, names)
    # Spread evenly: row j of dataset c sits at (j + 1/2) / k_c of the batch, so each device's rows
    # hold the mixture too (grad_accum's strided micro-batches need not; their summed gradient does).
    c_B = np.concatenate([np.full(k, c) for c, k in enumerate(k_C)])
    j_B = np.concatenate([np.arange(k) for k in k_C])
    order = np.lexsort((c_B, (j_B + 0.5) / k_C[c_B]))
    self.mixture = {"first_C": np.array([f for f, _, _ in mixture], np.int64),
                    "rows_C": np.array([n for _, n, _ in mixture], np.int64), "k_C": k_C,
                    "c_B": c_B[order], "j_B": j_B[order]}
    if self.rows_b.size and self.rows_b[0] == 0:  # once, from the host holding the first row
      logging.getLogger("fmjax").info("mixture: each batch of %d rows holds %s", B, ", ".join(
          f"{k} of {label} ({k / B:.1%}, weight {share:.1%})"
          for k, label, (_, share) in zip(k_C, sources.labels(names), names)))

  def _permutation(self, epoch: int, dataset: int | None = None) -> np.ndarray:
    """The order of the rows in `epoch`: of the split, or of one `dataset` of a mixture."""
    with self._lock:
      perm = self._perms.get((dataset, epoch))
      if perm is None:
        # A mixture's datasets draw from streams of their own, far apart (the counter's third word);
        # the split's is the stream from 0.
        stream = np.array([0, 0, 0 if dataset is None else dataset + 1, 0], dtype=np.uint64)
        rng = np.random.Generator(np.random.Philox(key=np.array([self.seed, epoch], dtype=np.uint64), counter=stream))
        perm = rng.permutation(self.data.num_rows if dataset is None else int(self.mixture["rows_C"][dataset]))
        mine = [k for k in self._perms if k[0] == dataset]
        if len(mine) >= 2:  # the current epoch and the next, of each dataset
          self._perms.pop(min(mine, key=lambda k: k[1]))
        self._perms[(dataset, epoch)] = perm
      return perm

  def dataset_rows(self, step: int) -> np.ndarray:
    """Dataset row ids for this host's batch rows at `step` (-1 = padding row)."""
    N, B = self.data.num_rows, self.batch_size
    if self.split == "eval" and not self.shuffle:
      g_b = (step % self.num_batches) * B + self.rows_b
      return np.where(g_b < N, g_b, -1)
    if self.mixture is not None:
      return self._mixture_rows(step)
    g_b = step * B + self.rows_b
    if not self.shuffle:
      return g_b % N
    return self._shuffled(g_b, N)

  def _shuffled(self, g_b: np.ndarray, N: int, dataset: int | None = None) -> np.ndarray:
    """Rows of samples `g_b` of N rows: sample g is row perm_e(g mod N) of epoch e = g // N."""
    epoch_b, i_b = g_b // N, g_b % N
    out_b = np.empty_like(g_b)
    for e in np.unique(epoch_b):
      sel = epoch_b == e
      out_b[sel] = self._permutation(int(e), dataset)[i_b[sel]]
    return out_b

  def _mixture_rows(self, step: int) -> np.ndarray:
    m = self.mixture
    c_b, j_b = m["c_B"][self.rows_b], m["j_B"][self.rows_b]
    g_b = step * m["k_C"][c_b] + j_b  # the sample of its own dataset each row reads
    out_b = np.empty_like(g_b)
    for c in np.unique(c_b):
      sel = c_b == c
      out_b[sel] = m["first_C"][c] + self._shuffled(g_b[sel], int(m["rows_C"][c]), int(c))
    return out_b

  def host_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch for `step`, as numpy arrays."""
    rows_b = self.dataset_rows(step)
    fields = self.data.rows(rows_b)
    if self.objective == "mlm":
      d = self.config.data
      tokens_BT = fields.pop("tokens")
      # Train masks change with the step (dynamic masking); an eval row keeps one mask, keyed by the
      # row itself, so held-out figures do not depend on the batch size that groups the rows.
      held_out = self.split == "eval" and not self.shuffle
      fields.update(masking.mask_batch(
          tokens_BT, fields["segment_ids"], seed=self.seed, step=0 if held_out else step,
          rows_B=rows_b if held_out else self.rows_b,
          special_ids=self.tokenizer.special_ids, vocab_size=self.tokenizer.vocab_size,
          mask_id=self.tokenizer.mask_id, rate=d.mask_rate, max_predictions=d.max_predictions))
    if self.num_runs:
      runs = packing.segment_runs(fields["segment_ids"], self.num_runs)
      if runs is None:
        raise RuntimeError(f"step {step} has a row of more than {self.num_runs} segments, the most its cache "
                           f"recorded; delete {self.path} to prepare it again")
      fields.update(runs)
    return fields

  def global_batch(self, step: int) -> dict:
    """The global batch for `step` as jax.Arrays sharded like `sharding`, from this host's rows."""
    import jax
    if self.simulated:
      raise ValueError("global_batch needs the real process layout; this loader simulates a host")
    host = self.host_batch(step)
    return {k: jax.make_array_from_process_local_data(self.sharding, v, (self.batch_size,) + v.shape[1:])
            for k, v in host.items()}

  def iterate(self, start_step: int = 0) -> Iterator[tuple[int, dict]]:
    """Yields (step, global batch) from `start_step`, prepared `data.prefetch` steps ahead in a
    background thread; endless for train, steps [start_step, num_batches) for eval."""
    stop = self.num_batches if self.split == "eval" else None
    depth = int(self.config.data.prefetch)
    if depth <= 0:
      step = start_step
      while stop is None or step < stop:
        yield step, self.global_batch(step)
        step += 1
      return
    q = queue.Queue(maxsize=depth)
    done = threading.Event()

    def put(item):
      while not done.is_set():
        try:
          q.put(item, timeout=0.1)
          return True
        except queue.Full:
          continue
      return False

    def work():
      step = start_step
      try:
        while (stop is None or step < stop) and put((step, self.global_batch(step))):
          step += 1
        put(None)
      except BaseException as e:  # pylint: disable=broad-except
        put(e)

    thread = threading.Thread(target=work, name=f"fmjax-data-{self.split}", daemon=True)
    thread.start()
    _PREFETCHERS.add((done, thread))
    try:
      while True:
        item = q.get()
        if item is None:
          return
        if isinstance(item, BaseException):
          raise item
        yield item
    finally:
      if not done.is_set():  # else the exit hook already stopped it
        done.set()
        thread.join(timeout=30)  # never leave it inside a JAX call at interpreter exit
      _PREFETCHERS.discard((done, thread))


def make_loader(config, split: str = "train", sharding=None, batch_size: int | None = None,
                shuffle: bool | None = None, **kwargs) -> Loader:
  """A `Loader` for `split` ('train' or 'eval'); prepares the cache first if it is missing.

  batch_size is the global batch (default config.train.batch_size). kwargs: `tok`, the tokenizer
  (a run's own; default the config's), and process_index and process_count to simulate one host
  of several (for tests).
  """
  return Loader(config, split, sharding, batch_size, shuffle, **kwargs)


def held_out_loaders(config, sharding=None, batch_size: int | None = None, split: str = "eval",
                     **kwargs) -> Loader | dict[str, Loader]:
  """The loader of `split` (eval: the held-out rows) to score, unshuffled: its rows in order; for a
  mixture, one for each of its datasets, by name, so that each is scored on its own (`make_loader`'s
  kwargs). A mixture's train split read in order would be its first dataset's rows alone."""
  parts = sources.mixture(config.data.dataset)
  if parts is None:
    return make_loader(config, split, sharding, batch_size, shuffle=False, **kwargs)
  if kwargs.get("tok") is None:  # the mixture's, not the one each dataset alone would train
    kwargs["tok"] = tokenizers_lib.get_tokenizer(config)
  loaders = {}
  for label, (item, _) in zip(sources.labels(parts), parts):
    with sources.in_item(item):  # an item's own setting is fixed in its item: the error says so
      loaders[label] = make_loader(sources.component(config, item), split, sharding, batch_size, shuffle=False,
                                   **kwargs)
  return loaders


def unigram_baseline(config) -> float:
  """Cross-entropy (nats/token) on the eval split of an add-one-smoothed unigram model fit on train,
  over the positions the loss uses (CLM: every next token; MLM: non-special tokens)."""
  path = packing.prepare(config)
  tok = tokenizers_lib.load_tokenizer(os.path.join(path, "tokenizer"))
  V = tok.vocab_size

  def targets(split):
    return open_split(config, path, split, tok)[0].targets()

  counts_V = np.bincount(targets("train"), minlength=V).astype(np.float64)
  logp_V = np.log(counts_V + 1.0) - np.log(counts_V.sum() + V)
  return float(-logp_V[targets("eval")].mean())
