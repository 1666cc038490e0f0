"""`prepare`: tokenise, pack and cache a dataset's train and eval splits (`fmjax data prepare`).

Layout of a cache directory <cache_dir>/datasets/<dataset>-<objective>-<seq_len>-<key>/:
  meta.json            what was prepared (written last: a directory without it is never read)
  tokenizer/           the tokenizer the ids belong to
  pii_counts.json      what PII scrubbing replaced, per split (when data.pii_scrub)
  train/, eval/        meta.json (the split's counts and its parts) and part-00000/, part-00001/, ...:
                       records [k*S, (k+1)*S) of the split, S = data.shard_docs (for a TFRecord
                       dataset: whole files, at least S records a part), each packed on its own
                       into its own rows, in raw little-endian arrays read with np.memmap:
    CLM: tokens.bin    one stream [N] of the part's documents, each followed by EOS. Row r of
                       the part is stream[r*T : r*T + T + 1] (inputs and shifted targets), so
                       documents run across rows and nothing is padded. In a row, an EOS opens
                       the next document's segment (as its BOS). With a tokenizer that frames
                       documents (`Tokenizer.frames_documents`: Llama's <s> ... </s>) each
                       document is BOS, its ids, EOS, and the BOS opens its segment.
    MLM: tokens.bin, segment_ids.bin, token_types.bin   [R, T] rows of packed
                       [CLS] A [SEP] B [SEP] segments (A/B: a document chunk split at a random
                       point), several per row, the rest padded with segment id 0.
                       (Caches made before parts hold these files in train/ and eval/ directly.)
A mixture (data.dataset `NAME=WEIGHT,...`) is cached dataset by dataset, each an entry as above
made with the mixture's tokenizer, and a small entry mixture-<objective>-<seq_len>-<key>/ that
holds its meta.json (the datasets' entries and shares) and the tokenizer.
The split's rows are its parts' rows in order. A part is complete once its meta.json is written,
and the entry once its meta.json is: an interrupted prepare leaves nothing a run would read, and
the next one keeps the parts already made (in <entry>.parts/, or in the bucket).

Shapes: B rows, T sequence, R runs of equal segment ids a row, N runs of a batch, P parts of a split.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time

import numpy as np

from fmjax import files
from fmjax.config_lib import ConfigError
from fmjax.data import pii, sources
from fmjax.data import tokenizers as tokenizers_lib

ARRAY_FILES = ("tokens.bin", "segment_ids.bin", "token_types.bin")  # a split's bulk, beside its meta.json
FORMAT_VERSION = 2  # 2: an EOS opens the next document's segment (its count of segments per row)
_ENCODE_CHUNK = 512
SHARD_DOCS = 65536  # default data.shard_docs: records a part of a split holds
log = logging.getLogger("fmjax")
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


def shard_docs(config) -> int:
  """Records a part of a split holds (`data.shard_docs`; absent from older runs' configs)."""
  return int(config.data.get("shard_docs", SHARD_DOCS))


def cache_path(config, tok: tokenizers_lib.Tokenizer) -> str:
  """The cache directory for `config` with tokenizer `tok` (whether or not it exists yet)."""
  ident = {
      "train": sources.corpus_identity(config, "train"), "eval": sources.corpus_identity(config, "eval"),
      "tokenizer": tok.identity(), "seq_len": config.data.seq_len, "objective": config.train.objective,
      "version": FORMAT_VERSION}
  if shard_docs(config) != SHARD_DOCS:  # parts of another size hold other rows; the default keeps older keys
    ident["shard_docs"] = shard_docs(config)
  if config.train.objective == "clm" and tok.frames_documents:  # BOS ... EOS; caches made before were EOS-only
    ident["framed"] = True
  slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.data.dataset)
  return os.path.join(sources.local_cache_root(config), "datasets",
                      f"{slug}-{config.train.objective}-{config.data.seq_len}-{sources.identity_hash(ident)}")


def is_prepared(path: str) -> bool:
  """True once a cache directory is complete (its meta.json is written last)."""
  return os.path.exists(os.path.join(path, "meta.json"))


def _drop_if_it_lost_its_meta(path: str) -> None:
  """Entries are renamed into place whole, meta.json in them: one without it lost it since, and
  would block the rename of the entry made again."""
  if os.path.isdir(path) and not is_prepared(path):
    log.warning("%s has no meta.json (removed or lost since it was prepared): preparing it again", path)
    shutil.rmtree(path)


def prepare(config, tok: tokenizers_lib.Tokenizer | None = None) -> str:
  """Tokenises, packs and caches the train and eval splits; idempotent; returns the cache directory.

  `tok`: the tokenizer to use (a run's own, `get_tokenizer(config, workdir)`); default the config's.

  Each split is cut into parts of `data.shard_docs` records, tokenised and packed on their own
  (by `data.prepare_workers` processes) and kept as they finish, so an interrupted prepare
  starts again where it stopped. The parts do not depend on who made them: with data.cache_dir
  in a bucket every host of a pod makes its share of them, straight into the bucket, and no host
  needs the disk for the whole dataset.
  """
  _refuse_in_a_worker()
  sources.check_config(config)
  if config.train.objective == "mlm" and config.data.max_predictions > config.data.seq_len:
    raise ConfigError(f"data.max_predictions={config.data.max_predictions} exceeds data.seq_len="
                      f"{config.data.seq_len}; lower it")
  if tok is None:
    tok = tokenizers_lib.get_tokenizer(config)
  if sources.mixture(config.data.dataset) is not None:
    return _prepare_mixture(config, tok)
  path = cache_path(config, tok)
  rel = os.path.relpath(path, sources.local_cache_root(config))
  _drop_if_it_lost_its_meta(path)
  # data.cache_dir in a bucket: prepared once, for every host (its arrays copied or read in place).
  sources.fetch_shared(config, rel, "meta.json", bulk=ARRAY_FILES)
  if is_prepared(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  bucket = sources.bucket_entry(config, path)
  try:
    if bucket is None:
      _prepare_here(config, tok, path)
    else:
      _prepare_in_bucket(config, tok, bucket, os.path.dirname(path))
  except OSError:
    if not is_prepared(path):  # another process of this host finished the same cache first: use theirs
      raise
  if bucket is not None:
    sources.fetch_shared(config, rel, "meta.json", bulk=ARRAY_FILES)
  return path


def _prepare_mixture(config, tok: tokenizers_lib.Tokenizer) -> str:
  """Prepares each dataset of a mixture with its tokenizer (made again where one went missing), and
  the mixture's entry, which names them; returns that entry."""
  shares = sources.mixture(config.data.dataset)
  entries = []
  for item, _ in shares:
    with sources.in_item(item):
      entries.append(prepare(sources.component(config, item), tok))
  listed = [{"dataset": name, "share": share, "entry": os.path.basename(entry)}
            for (name, share), entry in zip(shares, entries)]
  key = sources.identity_hash({"mixture": listed, "version": FORMAT_VERSION})
  path = os.path.join(os.path.dirname(entries[0]), f"mixture-{config.train.objective}-{config.data.seq_len}-{key}")
  _drop_if_it_lost_its_meta(path)
  if is_prepared(path):
    return path
  metas = [read_entry(entry, "meta.json") for entry in entries]
  splits = {}
  for split in ("train", "eval"):
    each = [m["splits"][split] for m in metas]
    splits[split] = {
        "layout": each[0]["layout"], "dtype": each[0]["dtype"], "num_rows": sum(s["num_rows"] for s in each),
        "num_docs": sum(s["num_docs"] for s in each), "num_text_tokens": sum(s["num_text_tokens"] for s in each),
        "max_segments": None if any(s.get("max_segments") is None for s in each)
        else max(s["max_segments"] for s in each),
        "parts": [dict(p, entry=m["entry"]) for m, s in zip(listed, each) for p in s.get("parts") or [{}]]}
  meta = {"dataset": config.data.dataset, "objective": config.train.objective, "seq_len": config.data.seq_len,
          "mixture": listed, "tokenizer_kind": tok.kind, "vocab_size": tok.vocab_size, "version": FORMAT_VERSION,
          "splits": splits}
  # Written whole under another name and renamed: a reader never sees half of it, and each host (or
  # process) that makes the same one at once keeps the first.
  staging = f"{path}.{os.getpid()}.tmp"
  shutil.rmtree(staging, ignore_errors=True)
  tok.save(os.path.join(staging, "tokenizer"))
  files.write_json(os.path.join(staging, "meta.json"), meta, indent=2, sort_keys=True)
  try:
    os.rename(staging, path)
  except OSError:
    if not is_prepared(path):
      raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return path


def mixture_entries(path: str) -> list[tuple[str, float]] | None:
  """(entry, share) of each dataset of the mixture entry at `path`; None for one dataset's entry."""
  listed = read_entry(path, "meta.json").get("mixture")
  if listed is None:
    return None
  return [(os.path.join(os.path.dirname(path), m["entry"]), m["share"]) for m in listed]


def read_entry(path: str, name: str, parse=json.loads):
  """`parse` of the bytes of file `name` (e.g. "train/meta.json") in the cache entry at `path`; a
  file gone or garbled since the entry was prepared is one line naming the entry to delete."""
  try:
    with open(os.path.join(path, name), "rb") as f:
      return parse(f.read())
  except FileNotFoundError:
    what = "is missing"
  except ValueError as e:  # a JSON file cut short or overwritten
    what = f"does not parse: {e}"
  raise ConfigError(f"the prepared cache {path} is damaged ({name} {what}); delete it to prepare it again")


def fingerprint(path: str) -> str:
  """A prepared cache's tokenizer and counts, hashed: per split its layout, dtype, documents,
  tokens and rows, part by part. Another corpus, or the same one cut into other parts, counts
  differently."""
  entries = mixture_entries(path)
  if entries is not None:
    return sources.identity_hash([[share, fingerprint(entry)] for entry, share in entries])
  splits = read_entry(path, "meta.json")["splits"]
  counts = {split: [s["layout"], s["dtype"], s.get("num_docs"), s.get("num_text_tokens"), s["num_rows"],
                    [p["num_rows"] for p in s.get("parts") or []]] for split, s in sorted(splits.items())}
  # Two vocabularies count alike: the tokenizer's file decides.
  counts["tokenizer"] = read_entry(path, "tokenizer/tokenizer.json", lambda b: hashlib.sha256(b).hexdigest())
  return sources.identity_hash(counts)


def multi_part(path: str) -> bool:
  """Whether a split of the cache at `path` has more than one part (its rows differ from those a
  cache made before parts held, past the first part)."""
  entries = mixture_entries(path)
  if entries is not None:
    return any(multi_part(entry) for entry, _ in entries)
  return any(len(s.get("parts") or []) > 1 for s in read_entry(path, "meta.json")["splits"].values())


def _plan(config) -> list[tuple[str, int, tuple[int, int] | None]]:
  """(split, part, records) of every part to make: a split's records cut every data.shard_docs,
  or, for a split read through tf.data (TFRecord), only where its files begin, once a part holds
  data.shard_docs records (so each file is read once). records None: a split of unknown size,
  made as one part."""
  jobs, per = [], shard_docs(config)
  for split in ("train", "eval"):
    n = sources.record_count(config, split)
    if n is None:
      jobs.append((split, 0, None))
      continue
    cuts = _cuts(sources.file_starts(config, split), n, per)
    jobs.extend((split, k, (a, b)) for k, (a, b) in enumerate(zip(cuts, cuts[1:] + [n])))
  return jobs


def _cuts(file_starts: list[int] | None, n: int, per: int) -> list[int]:
  """Where the parts of a split of `n` records begin: every `per` records, or at the first file
  start at least `per` records past the previous cut."""
  if file_starts is None:
    return list(range(0, max(n, 1), per))
  cuts = [0]
  for start in file_starts:
    if per <= start - cuts[-1] and start < n:
      cuts.append(start)
  return cuts


def _made(store: str, split: str, part: int, records) -> bool:
  """Whether part `part` of `store` (local or a bucket) is complete and holds records `records`
  (a prepare of an older fmjax may have cut the split elsewhere)."""
  meta = files.read_json(os.path.join(_part_dir(store, split, part), "meta.json"))
  return meta is not None and meta.get("records") == (list(records) if records else None)


def _part_dir(store: str, split: str, part: int) -> str:
  return os.path.join(store, split, f"part-{part:05d}")


def _prepare_here(config, tok, path: str) -> None:
  """Makes every part in `<path>.parts` (keeping those an earlier attempt finished), then the
  split and entry metadata, and renames it to `path`. Processes of one host that prepare the
  same entry take turns (a lock beside it): the later ones find it made."""
  store = path + ".parts"
  lock_path = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
  lock = _lock_entry(lock_path, path)
  try:
    if is_prepared(path):
      shutil.rmtree(store, ignore_errors=True)
      return
    _make_here(config, tok, path, store)
  finally:
    if lock is not None:
      if is_prepared(path):  # whoever waits on it finds the entry made; a later process needs no lock
        with contextlib.suppress(OSError):
          os.remove(lock_path)
      lock.close()


def _lock_entry(lock_path: str, path: str):
  """Holds `lock_path` for cache entry `path`, waiting while another process holds it; None where
  the file system has no locks."""
  holder = f"pid {os.getpid()} on {socket.gethostname()}"
  try:
    got = files.try_lock(lock_path, holder)
    if isinstance(got, str):
      log.info("%s is being prepared by another process (%s); waiting for it", path, got or "pid unknown")
      got = files.try_lock(lock_path, holder, wait=True)
    return got
  except OSError as e:
    log.warning("%s cannot be locked (%s); make sure no other process prepares it", lock_path, e.strerror)
    return None


def _make_here(config, tok, path: str, store: str) -> None:
  for split in ("train", "eval"):  # what a killed process left half written
    for leftover in glob.glob(os.path.join(store, split, ".tmp-*")):
      shutil.rmtree(leftover, ignore_errors=True)
  jobs = _plan(config)
  todo = [job for job in jobs if not _made(store, *job)]
  for split, part, _ in todo:  # what a prepare cut elsewhere left (an older fmjax's)
    shutil.rmtree(_part_dir(store, split, part), ignore_errors=True)
  if len(todo) < len(jobs):
    log.info("%s: %d of %d parts were made by an earlier prepare; making the other %d", path, len(jobs) - len(todo),
             len(jobs), len(todo))
  for _ in _make_parts(config, tok, todo, store):
    pass
  try:
    _finish(config, tok, store, jobs)
  except ConfigError:  # no text, or too little for a row: nothing here is worth keeping
    shutil.rmtree(store, ignore_errors=True)
    raise
  os.rename(store, path)


def _prepare_in_bucket(config, tok, bucket: str, scratch_parent: str) -> None:
  """Every host makes its share of the parts (every process_count-th) in scratch space under
  `scratch_parent` and copies each to bucket entry `bucket` as it finishes; process 0 then writes
  the metadata, meta.json last. A host that fails says so in the bucket, and the others stop too."""
  import jax
  if files.exists(os.path.join(bucket, "meta.json")):
    return
  index, count = jax.process_index(), jax.process_count()
  attempt = _attempt(count)
  try:
    _make_in_bucket(config, tok, bucket, scratch_parent, index, count, attempt)
  except BaseException as e:
    if not isinstance(e, _OtherHostFailed):
      try:  # best effort: the others are waiting for this host's parts
        files.write_text(os.path.join(bucket, f".failed-{attempt}-{index}"), f"{type(e).__name__}: {e}"[:500])
      except Exception:  # pylint: disable=broad-except
        pass
    raise


class _OtherHostFailed(ConfigError):
  pass


def _attempt(count: int) -> str:
  """An id all processes of this run share (process 0's), naming its failure markers."""
  mine = int.from_bytes(os.urandom(4), "little")
  if count > 1:
    from jax.experimental import multihost_utils
    mine = int(multihost_utils.broadcast_one_to_all(np.uint32(mine)))
  return f"{mine:08x}"


def _make_in_bucket(config, tok, bucket, scratch_parent, index, count, attempt) -> None:
  jobs = _plan(config)
  mine = [job for i, job in enumerate(jobs) if i % count == index]
  todo = [job for job, done in zip(mine, _in_threads(lambda job: _made(bucket, *job), mine)) if not done]
  for split, part, _ in todo:  # a part an older fmjax cut elsewhere counts as made by its meta.json: not any more
    stale = files.path(_part_dir(bucket, split, part)) / "meta.json"
    if stale.exists():
      stale.unlink()
  for leftover in glob.glob(os.path.join(scratch_parent, ".prepare-*")):  # of a process killed mid-prepare
    if not _alive(int(leftover.rsplit("-", 1)[1])):
      shutil.rmtree(leftover, ignore_errors=True)
  scratch = os.path.join(scratch_parent, f".prepare-{os.getpid()}")  # this host's other processes have theirs
  shutil.rmtree(scratch, ignore_errors=True)
  os.makedirs(scratch)
  try:
    for split, part in _make_parts(config, tok, todo, scratch):
      local = _part_dir(scratch, split, part)
      files.copy_tree(local, _part_dir(bucket, split, part))
      shutil.rmtree(local)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  seen = set()

  def finished() -> int:  # each part is looked for until it is found, in parallel (thousands for C4)
    unseen = [job for job in jobs if job not in seen]
    seen.update(job for job, found in zip(unseen, _in_threads(lambda job: _made(bucket, *job), unseen)) if found)
    return len(seen)

  def failed() -> None:
    for marker in files.path(bucket).glob(f".failed-{attempt}-*"):
      raise _OtherHostFailed(f"process {marker.name.rsplit('-', 1)[1]} stopped preparing {bucket}: "
                             f"{marker.read_text()}")

  _wait_for(finished, len(jobs), f"parts of {bucket} from the other hosts", failed)
  if index == 0:
    _finish(config, tok, bucket, jobs)
  else:
    _wait_for(lambda: int(files.exists(os.path.join(bucket, "meta.json"))), 1, f"{bucket}/meta.json from process 0",
              failed)


_POLL_SECONDS = 10.0


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _in_threads(fn, items: list) -> list:
  """[fn(item) for item in items], 16 at a time: many small reads of a bucket (a part's metadata each)."""
  from concurrent.futures import ThreadPoolExecutor
  with ThreadPoolExecutor(16, thread_name_prefix="fmjax-prepare") as pool:
    return list(pool.map(fn, items))


def _wait_for(count_fn, total: int, what: str, check=lambda: None) -> None:
  """Waits until count_fn() reaches `total`, saying so each minute; `check()` may raise to stop."""
  said = time.time()
  while (done := count_fn()) < total:
    check()
    if time.time() - said >= 60:
      log.info("waiting for %s: %d of %d", what, done, total)
      said = time.time()
    time.sleep(_POLL_SECONDS)


def _make_parts(config, tok, jobs, store: str):
  """Makes the parts `jobs` under `store`, in this process or a pool of data.prepare_workers
  processes; yields (split, part) of each as it is complete."""
  workers = _workers(config, jobs)
  bar = _progress(len(jobs))
  try:
    if workers == 1:
      for split, part, records in jobs:
        stats = _write_part(config, tok, split, part, records, store)
        bar.update(1)
        bar.set_postfix_str(f"{stats['num_text_tokens'] / max(stats['seconds'], 1e-9):,.0f} tok/s")
        yield split, part
      return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool
    log.info("preparing %d parts with %d processes (data.prepare_workers)", len(jobs), workers)
    threads = max(1, len(os.sched_getaffinity(0)) // workers)  # each process's tokenizer threads
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                               initargs=(threads, os.getpid()))
    finished = False
    try:
      os.environ[_WORKER_ENV] = "1"  # what the workers inherit as they start (on the submits below)
      try:
        futures = {pool.submit(_write_part, config.to_dict(), tok, split, part, records, store): (split, part)
                   for split, part, records in jobs}
      finally:
        os.environ.pop(_WORKER_ENV, None)
      for future in as_completed(futures):
        try:
          future.result()
        except BrokenProcessPool:
          raise ConfigError(f"a prepare process died while {workers} made parts at once: out of memory (run again "
                            "with a lower data.prepare_workers; the parts made are kept), or a script that calls "
                            "fmjax without `if __name__ == \"__main__\":` (processes start by importing it)") from None
        bar.update(1)
        yield futures[future]
      finished = True
    finally:
      if not finished:  # an error or Ctrl-C: stop now, the parts in the making with it (finished ones stay)
        for process in list((getattr(pool, "_processes", None) or {}).values()):
          process.terminate()
      pool.shutdown(wait=True, cancel_futures=True)
  finally:
    bar.close()


_WORKER_ENV = "FMJAX_PREPARE_WORKER"  # set in the pool's processes, which import the script that started them


def _refuse_in_a_worker() -> None:
  """A prepare worker imports the main script first (spawn): one whose fmjax calls are not under
  `if __name__ == "__main__":` would prepare again there and wait for ever on its parent's lock."""
  # There the script runs as module `__mp_main__`, before the worker is set up.
  if os.environ.get(_WORKER_ENV) and "__mp_main__" in sys.modules:
    raise SystemExit("error: the script that called fmjax ran again in a prepare worker process: put its fmjax "
                     "calls under `if __name__ == \"__main__\":`, or set data.prepare_workers=1")


_MOST_WORKERS = 32  # data.prepare_workers=0 on a host with more cores: each process holds TF and a tokenizer


def _workers(config, jobs) -> int:
  """Processes to prepare `jobs` with: data.prepare_workers (0: one per CPU core, at most 32);
  this process alone where each split is one part, as small datasets are."""
  if len(jobs) <= 2:
    return 1
  wanted = int(config.data.get("prepare_workers", 0)) or min(len(os.sched_getaffinity(0)), _MOST_WORKERS)
  return max(1, min(wanted, len(jobs)))


def _worker_init(threads: int, parent: int) -> None:
  os.environ["RAYON_NUM_THREADS"] = str(threads)  # HF tokenizers' batch threads, before their first use
  if sys.platform.startswith("linux"):  # a parent killed outright (SIGKILL, OOM) takes its workers with it
    import ctypes
    import signal
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
  if os.getppid() != parent:  # it died before the line above
    os._exit(1)


def _finish(config, tok, store: str, jobs) -> None:
  """Writes the tokenizer, the PII counts and each split's metadata beside the parts in `store`
  (local or a bucket), and the entry's meta.json last."""
  meta = {"dataset": config.data.dataset, "objective": config.train.objective, "seq_len": config.data.seq_len,
          "train": sources.corpus_identity(config, "train"), "eval": sources.corpus_identity(config, "eval"),
          "tokenizer_kind": tok.kind, "vocab_size": tok.vocab_size, "version": FORMAT_VERSION,
          "shard_docs": shard_docs(config), "splits": {}}
  pii_counts = {}
  for split in ("train", "eval"):
    parts = [part for s, part, _ in jobs if s == split]
    stats_P = _in_threads(files.read_json, [os.path.join(_part_dir(store, split, part), "meta.json")
                                            for part in parts])
    meta["splits"][split] = stats = _split_stats(config, split, parts, stats_P)
    files.write_json(os.path.join(store, split, "meta.json"), stats, indent=2, sort_keys=True)
    pii_counts[split] = dict(sum((collections.Counter(s.pop("pii", {})) for s in stats_P), collections.Counter()))
  tok.save(os.path.join(store, "tokenizer"))
  if config.data.pii_scrub:
    files.write_json(os.path.join(store, "pii_counts.json"), pii_counts, indent=2, sort_keys=True)
  files.write_json(os.path.join(store, "meta.json"), meta, indent=2, sort_keys=True)


def _split_stats(config, split: str, parts: list[int], stats_P: list[dict]) -> dict:
  """A split's metadata from its parts'; a split with no text or no whole row is one ConfigError."""
  T = config.data.seq_len
  num_docs = sum(s["num_docs"] for s in stats_P)
  num_tokens = sum(s["num_text_tokens"] for s in stats_P)
  num_rows = sum(s["num_rows"] for s in stats_P)
  if num_docs == 0:
    raise ConfigError(f"dataset {config.data.dataset!r} split {sources.split_spec(config, split)!r} has no "
                      "text (empty corpus); check data.dataset, data.files and the split names")
  if num_rows == 0:
    raise ConfigError(f"dataset {config.data.dataset!r} split {sources.split_spec(config, split)!r} has {num_tokens} "
                      f"tokens, not enough for one row of data.seq_len={T}; lower data.seq_len or use more text")
  stats = {"layout": stats_P[0]["layout"], "dtype": stats_P[0]["dtype"], "num_rows": num_rows, "num_docs": num_docs,
           "num_text_tokens": num_tokens, "max_segments": max(s["max_segments"] for s in stats_P),
           "pad_fraction": round(sum(s["pad_fraction"] * s["num_rows"] for s in stats_P) / num_rows, 5),
           "seconds": round(sum(s["seconds"] for s in stats_P), 3),
           "parts": [{"name": f"part-{part:05d}", "num_rows": s["num_rows"]} for part, s in zip(parts, stats_P)]}
  if stats["layout"] == "stream":
    stats["num_stream_tokens"] = sum(s["num_stream_tokens"] for s in stats_P)
  return stats


def token_dtype(vocab_size: int):
  """The narrowest dtype for the cache: uint16 halves disk and read bandwidth for vocabularies up to 65536."""
  return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def _progress(parts: int):
  from tqdm.auto import tqdm
  # disable=None: quiet when stderr is not a terminal (logs on pods, tests).
  return tqdm(total=parts, desc="prepare", unit="part", disable=None, leave=False)


def _token_chunks(config, tok, split: str, records, counts: collections.Counter):
  """Yields lists of token-id lists, a chunk of documents at a time."""
  batch = []
  for text in sources.documents(config, split, records):
    if config.data.pii_scrub:
      text, found = pii.scrub(text)
      counts.update(found)
    batch.append(text)
    if len(batch) == _ENCODE_CHUNK:
      yield tok.encode_batch(batch)
      batch = []
  if batch:
    yield tok.encode_batch(batch)


def _write_part(config, tok, split: str, part: int, records, store: str) -> dict:
  """Tokenises and packs records `records` of `split` into part `part` of `store` (a local
  directory; filled under a temporary name and renamed, its meta.json last); returns its stats.

  A part starts its own rows (and, for MLM, its own A/B split points), so it is the same whichever
  process makes it. `config` may be a plain dict (in a worker process).
  """
  if isinstance(config, dict):
    import ml_collections
    config = ml_collections.ConfigDict(config)
  target = _part_dir(store, split, part)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  directory = files.make_temp_dir(os.path.dirname(target))
  try:
    counts = collections.Counter()
    dtype = token_dtype(tok.vocab_size)
    T = config.data.seq_len
    start, num_docs, num_tokens = time.time(), 0, 0
    if config.train.objective == "clm":
      writer = _StreamWriter(directory, dtype, T, tok)
    else:
      writer = _RowWriter(directory, dtype, T, tok, seed=part)
    for chunk in _token_chunks(config, tok, split, records, counts):
      for ids in chunk:
        if ids:
          writer.add(ids)
          num_docs += 1
          num_tokens += len(ids)
    stats = writer.close()
    stats.update(num_docs=num_docs, num_text_tokens=num_tokens, dtype=np.dtype(dtype).name,
                 seconds=round(time.time() - start, 3), records=list(records) if records else None, pii=dict(counts))
    files.write_json(os.path.join(directory, "meta.json"), stats, indent=2, sort_keys=True)
    try:
      os.rename(directory, target)
    except OSError:
      if not is_prepared(target):  # made by another process of this host: the same part
        raise
    return stats
  finally:
    shutil.rmtree(directory, ignore_errors=True)


class _StreamWriter:
  """CLM: appends each document and its EOS (BOS first, for a tokenizer that frames documents) to one token stream."""

  def __init__(self, directory, dtype, T, tok):
    self.f = open(os.path.join(directory, "tokens.bin"), "wb")
    self.dtype, self.T, self.eos = dtype, T, tok.eos_id
    self.bos = tok.bos_id if tok.frames_documents else None
    self.n = 0
    self.pending = []
    self.end = 0  # stream length once `pending` is written
    # Row r's inputs are stream[r*T : r*T + T]; an opener there at index > 0 starts another segment
    # in the row. Openers' positions only grow, so one running count per row is enough.
    self.row, self.row_segments, self.max_segments = 0, 1, 1

  def add(self, ids):
    if self.bos is not None:
      opener = self.end  # this document's BOS
      self.pending.append((self.bos,))
      self.end += 1
    else:
      opener = self.end + len(ids)  # its EOS, which opens the next document
    self.pending.append(ids)
    self.pending.append((self.eos,))
    if len(self.pending) >= 2 * _ENCODE_CHUNK:
      self._flush()
    self.end += len(ids) + 1
    row, at = divmod(opener, self.T)
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
    if self.row < rows:  # the last row the loader reads holds the last opener
      self.max_segments = max(self.max_segments, self.row_segments)
    return {"layout": "stream", "num_stream_tokens": self.n, "num_rows": rows, "pad_fraction": 0.0,
            "max_segments": self.max_segments}


class _RowWriter:
  """MLM: packs [CLS] A [SEP] B [SEP] segments greedily, in order, into rows of T."""

  def __init__(self, directory, dtype, T, tok, seed: int = 0):
    self.files = {k: open(os.path.join(directory, f"{k}.bin"), "wb")
                  for k in ("tokens", "segment_ids", "token_types")}
    self.dtype, self.T, self.tok = dtype, T, tok
    # A/B split points, drawn from the part's own key: the cache is the same whoever makes each part.
    self.rng = np.random.Generator(np.random.Philox(key=seed))
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
