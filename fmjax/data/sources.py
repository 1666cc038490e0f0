"""Where documents come from: TFDS datasets by name, the offline `fmjax_corpus`, or local `text_files`,
or a weighted mixture of them (`data.dataset="c4/en:3.1.0=3,wikipedia/20230601.en=1"`).

TensorFlow Datasets is imported inside functions only: `import fmjax.data` must work on machines
without TF/TFDS (the GPU benchmark image). Reading prefers `builder.as_data_source` (array_record,
no TensorFlow needed) and falls back to `builder.as_dataset` for datasets prepared as TFRecord.
"""

from __future__ import annotations

import codecs
import contextlib
import copy
import difflib
import fractions
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import urllib.parse
from typing import Any, Iterator

from fmjax import files
from fmjax.config_lib import ConfigError

OURS = ("fmjax_corpus", "text_files")
_READ_CHUNK = 1024


def cache_root(config) -> str:
  """The cache directory: config.data.cache_dir (a local path or a bucket), or ~/.cache/fmjax."""
  root = config.data.cache_dir or "~/.cache/fmjax"
  return root if files.is_remote(root) else os.path.abspath(os.path.expanduser(root))


def local_cache_root(config) -> str:
  """Where this host reads caches: `cache_root`, or for a bucket its local copy under ~/.cache/fmjax/buckets/.

  A pod's hosts lose their disks with their VMs. With data.cache_dir in a bucket, a prepared
  dataset or trained tokenizer is copied there once (`share`) and down to each new host
  (`fetch_shared`) instead of being made again from the corpus.
  """
  root = cache_root(config)
  if not files.is_remote(root):
    return root
  return os.path.join(os.path.expanduser("~/.cache/fmjax"), "buckets", re.sub(r"[^A-Za-z0-9_.-]+", "_", root))


def fetch_shared(config, rel: str, marker: str, bulk: tuple[str, ...] = ()) -> str:
  """The local directory of cache entry `rel` (e.g. `datasets/<name>`). From a bucket cache_dir it
  is copied down once the bucket holds it whole: its `marker` file, written last, is there.

  Files named in `bulk` (a packed dataset's arrays) are copied too, or left in the bucket for the
  loader to read by ranges (`bucket_entry`), as `data.bucket_reads` says: `copy`, `remote`, or
  `auto`, which copies them when they take at most half of this host's free disk.
  """
  local = os.path.join(local_cache_root(config), rel)
  root = cache_root(config)
  if not files.is_remote(root) or os.path.exists(os.path.join(local, marker)):
    return local
  remote = os.path.join(root, rel)
  if files.exists(os.path.join(remote, marker)):
    os.makedirs(os.path.dirname(local), exist_ok=True)
    leave_out = frozenset() if not bulk or _copy_bulk(config, remote, os.path.dirname(local), bulk) else frozenset(bulk)
    tmp = files.make_temp_dir(os.path.dirname(local))
    try:
      files.copy_tree(remote, tmp, leave_out)
      os.rename(tmp, local)
    except OSError:
      if not os.path.exists(os.path.join(local, marker)):  # another process of this host fetched it first: fine
        raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return local


def _copy_bulk(config, remote: str, local_dir: str, bulk: tuple[str, ...]) -> bool:
  """Whether this host copies the `bulk` files of bucket entry `remote` to its disk (see `fetch_shared`)."""
  mode = config.data.get("bucket_reads", "auto")
  if mode != "auto":
    return mode == "copy"
  def sizes(directory):  # the bulk files at any depth (a split's parts, or a cache made before parts)
    for f in directory.iterdir():
      if f.is_dir():
        yield from sizes(f)
      elif f.name in bulk:
        yield f.stat().length
  size = sum(sizes(files.path(remote)))
  free = shutil.disk_usage(local_dir).free
  copy = size <= free // 2
  logging.getLogger("fmjax").info(
      "%s: %.1f GB of arrays, %.1f GB free on this host: %s (data.bucket_reads=auto; copy or remote to choose)",
      remote, size / 1e9, free / 1e9, "copying them" if copy else "reading them from the bucket by ranges")
  return copy


def bucket_entry(config, local_entry: str, *parts: str) -> str | None:
  """The bucket path of local cache entry `local_entry` (joined with `parts`), where data.cache_dir
  is a bucket; else None."""
  root = cache_root(config)
  if not files.is_remote(root):
    return None
  return os.path.join(root, os.path.relpath(local_entry, local_cache_root(config)), *parts)


def share(config, rel: str) -> None:
  """Copies this host's cache entry `rel` to a bucket cache_dir (process 0; its marker file last)."""
  import jax
  root = cache_root(config)
  if files.is_remote(root) and jax.process_index() == 0:
    files.copy_tree(os.path.join(local_cache_root(config), rel), os.path.join(root, rel))


# JSON may escape half of a surrogate pair alone (`"\ud83d"`: text cut inside an emoji, common in scraped
# data); Python reads it into a str that has no UTF-8, which TFDS, the tokenizer and our caches need.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_lone_surrogates(value: Any) -> tuple[Any, int]:
  """`value` (a JSON record) with each lone surrogate in its strings replaced by U+FFFD, and how many."""
  if isinstance(value, str):
    return _LONE_SURROGATE.subn("\ufffd", value)
  if isinstance(value, list):
    out = [_without_lone_surrogates(v) for v in value]
    return [v for v, _ in out], sum(n for _, n in out)
  if isinstance(value, dict):
    out = [(_without_lone_surrogates(k), _without_lone_surrogates(v)) for k, v in value.items()]
    return {k: v for (k, _), (v, _) in out}, sum(nk + nv for (_, nk), (_, nv) in out)
  return value, 0


# Compressed files are read as published: gzip (Dolma's .json.gz) and Zstandard (the Pile's and SlimPajama's
# .jsonl.zst), a stream at a time; the name's last suffix says which.
COMPRESSED = (".gz", ".zst")


def _file_ending(path: str) -> str:
  """A corpus file's kind as its name ends: ".parquet", ".jsonl.zst"."""
  stem, last = os.path.splitext(path)
  return os.path.splitext(stem)[1] + last if last in COMPRESSED else last


def _open_bytes(path: str) -> io.BufferedIOBase:
  """`path`'s bytes, decompressed where its name ends in .gz or .zst."""
  if path.endswith(".gz"):
    import gzip
    return gzip.open(path, "rb")
  if path.endswith(".zst"):
    import zstandard
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True,
                                                                        closefd=True))
  return open(path, "rb")


@contextlib.contextmanager
def open_text(path: str):
  """`path` as UTF-8 text (a byte-order mark, which Windows tools write, is not text; universal newlines),
  decompressed where its name says; a damaged compressed file, met on any read, is one ConfigError line."""
  import gzip
  import zlib
  errors: tuple[type[BaseException], ...] = (EOFError, gzip.BadGzipFile, zlib.error)
  if path.endswith(".zst"):
    import zstandard
    errors += (zstandard.ZstdError,)
  try:
    with io.TextIOWrapper(_open_bytes(path), encoding="utf-8-sig") as f:
      yield f
  except errors as e:
    raise ConfigError(f"{path} is damaged or not {'gzip' if path.endswith('.gz') else 'Zstandard'} data ({e}); copy "
                      "it again") from None


def jsonl_records(path: str, warn: bool = True) -> Iterator[tuple[int, Any]]:
  """(line number, record) for each non-blank line of a JSONL file; a line that is not JSON, or a
  file that is not UTF-8, is one ConfigError naming it. What a record must hold is the caller's.
  Lone surrogate escapes become U+FFFD (the replacement character), counted in one log line
  (`warn=False`: none, for a second reading of the file)."""
  lone, first_lone = 0, 0
  try:
    with open_text(path) as f:
      for i, line in enumerate(f):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ConfigError(f"{path}:{i + 1} is not valid JSON ({e.msg}); fix the line or remove it") from None
        if "\\u" in line and re.search(r"\\u[dD][89a-fA-F]", line):  # the rare line that may hold one
          record, n = _without_lone_surrogates(record)
          lone, first_lone = lone + n, first_lone or (i + 1 if n else 0)
        yield i + 1, record
  except UnicodeDecodeError:
    raise not_utf8(path) from None
  except PermissionError as e:
    raise unreadable(path, e) from None
  if lone and warn:
    logging.getLogger("fmjax").warning("replaced %d lone surrogate escape(s) (\\ud800-\\udfff without its pair) "
                                       "with U+FFFD (the first at %s:%d)", lone, path, first_lone)


def unreadable(path: str, e: OSError) -> ConfigError:
  """The one-line error for an input file this user may not read."""
  return ConfigError(f"{path} cannot be read ({e.strerror}); make it readable by this user (e.g. `chmod a+r {path}`) "
                     "or leave it out of the files given")


_DECODE_CHUNK = 1 << 20


def not_utf8(path: str) -> ConfigError:
  """The one-line error for an input file that is not UTF-8, naming the offset of its first bad byte.

  Decoded a MiB at a time: the file may be larger than memory."""
  decoder, done, where = codecs.getincrementaldecoder("utf-8")(), 0, ""
  with _open_bytes(path) as f:  # decompressed: the offset is the text's
    while True:
      chunk = f.read(_DECODE_CHUNK)
      held = len(decoder.getstate()[0])  # bytes of a character cut by the last chunk's end, decoded with this one
      try:
        decoder.decode(chunk, final=not chunk)
      except UnicodeDecodeError as e:
        where = f" (byte {done - held + e.start})"
        break
      if not chunk:
        break
      done += len(chunk)
  return ConfigError(f"{path} is not UTF-8 text{where}; input files must be UTF-8: convert it, e.g. "
                     f"`iconv -f latin1 -t utf-8 {path} > new_file`")


def _is_remote(path: str) -> bool:
  return "://" in path


def _path_exists(path: str) -> bool:
  if _is_remote(path):
    from etils import epath  # comes with TFDS; understands gs://
    return epath.Path(path).exists()
  return os.path.isdir(os.path.expanduser(path))


def _check_cache_dir(root: str) -> None:
  """A local cache directory must be one this process can make or write in (found out later, it fails
  mid-tokenizer); checked without making it, so a refused start leaves nothing behind."""
  if files.is_remote(root):
    return
  existing = root
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    why = "is a file" if not os.path.isdir(existing) else "is not writable"
    raise ConfigError(f"data.cache_dir={root!r} cannot be made ({existing} {why}); set data.cache_dir to a "
                      "directory you can write, or leave it empty for ~/.cache/fmjax")


def _base_name(dataset: str) -> str:
  return dataset.split("/")[0].split(":")[0]


def _split_names(spec: str) -> list[str]:
  """`train[:90%]+validation` -> ['train', 'validation']."""
  return [re.sub(r"\[.*\]$", "", part.strip()) for part in spec.split("+") if part.strip()]


_PIECE = re.compile(r"(?P<name>[^\[\]]+?)(?:\[(?P<lo>-?[\d.]*)(?P<lo_pct>%?):(?P<hi>-?[\d.]*)(?P<hi_pct>%?)\])?")


def _ranges(spec: str) -> list[tuple[str, str, float, float]]:
  """(split, unit, start, stop) of each piece of a TFDS split spec, read without the split's size:
  unit 'all' (the whole split), '%' or 'abs'; a piece whose records need that size (a negative
  absolute bound) or that is no plain slice (shards) is left out."""
  out = []
  for part in (p.strip() for p in spec.split("+")):
    m = _PIECE.fullmatch(part)
    if m is None:
      continue
    name = m["name"].strip()
    if m["lo"] is None:
      out.append((name, "all", 0.0, math.inf))
      continue
    try:
      lo, hi = float(m["lo"] or 0), None if not m["hi"] else float(m["hi"])
    except ValueError:
      continue
    if m["lo_pct"] or m["hi_pct"]:
      hi = 100.0 if hi is None else hi
      out.append((name, "%", lo + 100 * (lo < 0), hi + 100 * (hi < 0)))
    elif lo >= 0 and (hi is None or hi >= 0):
      out.append((name, "abs", lo, math.inf if hi is None else hi))
  return out


def _complement(name: str, unit: str, lo: float, hi: float) -> str | None:
  """The split spec of the records of split `name` outside [lo, hi), where that is one slice."""
  pct = "%" if unit == "%" else ""
  end = 100.0 if unit == "%" else math.inf
  if lo > 0 and hi >= end:
    return f"{name}[:{lo:g}{pct}]"
  if lo == 0 and hi < end:
    return f"{name}[{hi:g}{pct}:]"
  return None


def check_files_read(config) -> None:
  """`data.files` is read by `data.dataset=text_files` alone (and by a mixture's items): beside another dataset
  a run would quietly train on that dataset instead. Checked for a training run's data; raises ConfigError."""
  d = config.data
  parts = mixture(d.dataset)
  if d.files and parts is not None and not any(
      name == "text_files" and "files" not in settings for name, settings in (item_settings(i) for i, _ in parts)):
    # A mixture reads the shared data.files in its text_files items only (one with files= of its own reads those).
    raise ConfigError(f"data.files={d.files!r} is read only by a text_files item of the mixture, and "
                      f"data.dataset={d.dataset!r} has none that reads it; add one ('...,text_files=WEIGHT'), or drop "
                      "data.files")
  if d.files and d.dataset != "text_files" and parts is None:
    raise ConfigError(f"data.files={d.files!r} is read only with data.dataset='text_files' (data.dataset is "
                      f"{d.dataset!r}, which would be trained on instead); add --config.data.dataset=text_files, "
                      "or drop data.files")


def check_held_out_apart(config) -> None:
  """The held-out split must hold no record of the train split: `data.eval_split=train[99%:]` beside
  the default `data.train_split=train` would score the model on text it trained on. Checked for a
  training run's data (`fmjax eval` may score any split of another corpus); raises ConfigError."""
  d = config.data
  parts = mixture(d.dataset)
  if parts is not None:
    for item, _ in parts:
      with in_item(item):
        check_held_out_apart(component(config, item))
    return
  train = _ranges(d.train_split)
  for name, unit, lo, hi in _ranges(d.eval_split):
    for t_name, t_unit, t_lo, t_hi in train:
      if name != t_name and "all" not in (name, t_name):
        continue
      if "all" in (unit, t_unit):
        overlap = lo < hi and t_lo < t_hi
      else:
        overlap = unit == t_unit and max(lo, t_lo) < min(hi, t_hi)
      if not overlap:
        continue
      rest = _complement(name, unit, lo, hi) if t_unit == "all" and len(train) == 1 else None
      instead = f"e.g. {rest!r}" if rest else "the records data.eval_split does not read"
      raise ConfigError(f"dataset {d.dataset!r}: data.eval_split={d.eval_split!r} reads records that "
                        f"data.train_split={d.train_split!r} trains on, so held-out figures would be on trained "
                        f"text; set data.train_split to {instead}")


# The settings one dataset of a mixture may have of its own: NAME(feature=...; eval_split=...)=WEIGHT.
ITEM_SETTINGS = ("feature", "train_split", "eval_split", "files", "data_dir")


def _items(dataset: str) -> list[str]:
  """data.dataset cut at the commas outside parentheses (an item's settings may hold commas: files' globs)."""
  items, depth, start = [], 0, 0
  for i, ch in enumerate(dataset):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if ch == "," and depth == 0:
      items.append(dataset[start:i])
      start = i + 1
  return items + [dataset[start:]]


def item_settings(item: str) -> tuple[str, dict[str, str]]:
  """(dataset name, its own settings) of a mixture's item `NAME` or `NAME(key=value; key=value)`."""
  name, paren, rest = item.partition("(")
  if not paren:
    return item, {}
  example = f"e.g. {name.strip()}(feature=text; eval_split=train[99%:])=1"
  if not rest.endswith(")"):
    raise ConfigError(f"data.dataset item {item!r}: settings of one dataset go in parentheses after its name and "
                      f"before its weight, {example}")
  settings = {}
  for part in rest[:-1].split(";"):
    if not part.strip():
      continue
    key, eq, value = (s.strip() for s in part.partition("="))
    if key not in ITEM_SETTINGS or not eq or not value:
      close = difflib.get_close_matches(key, ITEM_SETTINGS, n=1)
      hint = f"did you mean {close[0]!r}? " if close and close[0] != key else ""
      raise ConfigError(f"data.dataset item {item!r}: {part.strip()!r} is not one of its own settings; {hint}give "
                        f"KEY=VALUE pairs split by ';' with KEY one of {list(ITEM_SETTINGS)}, {example}")
    if key in settings:
      raise ConfigError(f"data.dataset item {item!r} sets {key!r} twice; give it once")
    settings[key] = value
  return name.strip(), settings


def _item(name: str, settings: dict[str, str]) -> str:
  """A mixture's item written one way, its settings in key order whatever order they came in: it
  keys the item's cache entry."""
  return name + (f"({'; '.join(f'{k}={v}' for k, v in sorted(settings.items()))})" if settings else "")


def mixture(dataset: str) -> list[tuple[str, float]] | None:
  """A mixture's items and their shares of each batch (summing to 1), from data.dataset
  `ITEM=WEIGHT,ITEM=WEIGHT,...`; None for a single dataset (a name never holds '=').

  An item is a dataset name, with settings of its own in parentheses where it needs them
  (`wikipedia/20230601.en(train_split=train[:99%]; eval_split=train[99%:])`); the rest of
  config.data is shared. Shares are the weights' exact ratios, so that `6,2` is the mixture `3,1`.
  """
  if "=" not in dataset:
    return None
  example = "e.g. data.dataset='c4/en:3.1.0=3,wikipedia/20230601.en=1'"
  parts = []
  for raw in _items(dataset):
    item, _, weight = raw.strip().rpartition("=")
    try:
      w = fractions.Fraction(weight.strip())
    except (ValueError, ZeroDivisionError):
      w = None
    if not item.strip() or w is None or w <= 0:
      raise ConfigError(f"data.dataset={dataset!r}: {raw.strip()!r} is not NAME=WEIGHT with a weight above 0; a "
                        f"mixture names each dataset with its weight, {example}")
    item = _item(*item_settings(item.strip()))
    if item in [n for n, _ in parts]:
      raise ConfigError(f"data.dataset={dataset!r} names {item!r} twice; give each dataset once, with its weight")
    parts.append((item, w))
  total = sum(w for _, w in parts)
  return [(item, float(w / total)) for item, w in parts]


def labels(parts: list[tuple[str, float]]) -> list[str]:
  """What logs and metrics call each item of a mixture: its dataset's name, or the whole item where
  two items read one dataset (two sets of text_files)."""
  names = [item_settings(item)[0] for item, _ in parts]
  return [name if names.count(name) == 1 else item for name, (item, _) in zip(names, parts)]


def batch_rows(batch_size: int, shares: list[tuple[str, float]]):
  """Rows of each batch for each dataset of a mixture: batch_size * share, rounded down, and the
  rows left over to the largest remainders (ties to the first); a dataset left no row is refused."""
  import numpy as np
  exact = batch_size * np.asarray([share for _, share in shares], np.float64)
  rows = np.floor(exact).astype(np.int64)
  for c in sorted(range(len(shares)), key=lambda c: rows[c] - exact[c])[:batch_size - int(rows.sum())]:
    rows[c] += 1
  if (rows == 0).any():
    name, share = shares[int(np.argmin(rows))]
    raise ConfigError(f"a batch of {batch_size} rows gives {name!r} (share {share:.3g}) no row; raise its weight in "
                      "data.dataset, or train.batch_size")
  return rows


def component(config, item: str):
  """`config` reading one item of its mixture: its dataset, with the item's own settings (feature,
  splits, files, data_dir) where it has them, and every other data setting shared."""
  c = copy.deepcopy(config)
  name, settings = item_settings(item)
  c.data.dataset = name
  for key, value in settings.items():
    c.data[key] = value
  return c


def held_out_only(config):
  """`config` whose train split is its held-out split, dataset by dataset (a mixture's items too): what
  `fmjax eval` prepares to score another corpus's held-out text, since a prepared entry holds both
  splits and that corpus's train split (all of C4's) is never read."""
  c = copy.deepcopy(config)
  c.data.train_split = c.data.eval_split
  parts = mixture(c.data.dataset)
  if parts is not None:
    items = []
    for item, share in parts:
      name, settings = item_settings(item)
      if "train_split" in settings or "eval_split" in settings:  # else the shared one, set above
        settings["train_split"] = settings.get("eval_split", c.data.eval_split)
      items.append(f"{_item(name, settings)}={share!r}")
    c.data.dataset = ",".join(items)
  return c


MOVED_HINT = "(text that moved: --config.data.files=NEW_GLOB)"


@contextlib.contextmanager
def in_item(item: str):
  """Work on one item of a mixture: a feature or split its dataset lacks is set in that item alone
  (the shared data.feature may suit the others), and the error says so."""
  try:
    yield
  except ConfigError as e:
    name, settings = item_settings(item)
    if "files" in settings and MOVED_HINT in str(e):  # data.files would not reach an item with files of its own
      moved = _item(name, {**settings, "files": "NEW_GLOB"})
      raise ConfigError(str(e).replace(MOVED_HINT, f"(text that moved: give this item its new files in "
                                                   f"data.dataset, '{moved}=WEIGHT')")) from None
    found = re.search(r"; set data\.(feature|train_split|eval_split) to ", str(e))
    if found is None:
      raise
    raise ConfigError(f"{str(e)[:found.start()]}; in a mixture give this dataset its own {found.group(1)} in "
                      f"data.dataset, '{name}({found.group(1)}=...)=WEIGHT', with {found.group(1)} "
                      f"{str(e)[found.end():]}") from None


def check_config(config) -> None:
  """Checks the data settings before a run creates anything (reads no more than two text_files
  documents, downloads nothing); raises ConfigError."""
  d = config.data
  if d.seq_len > config.model.max_len:
    raise ConfigError(f"data.seq_len={d.seq_len} is longer than the model allows (model.max_len="
                      f"{config.model.max_len}); lower data.seq_len or raise model.max_len")
  if d.seq_len < 8:
    raise ConfigError(f"data.seq_len={d.seq_len} is too short to pack documents; use at least 8")
  if config.train.objective not in ("clm", "mlm"):
    raise ConfigError(f"train.objective={config.train.objective!r} is not one of ['clm', 'mlm']")
  _check_cache_dir(cache_root(config))
  if d.data_dir and not _is_remote(d.data_dir) and os.path.isfile(os.path.expanduser(d.data_dir)):
    raise ConfigError(f"data.data_dir={d.data_dir!r} is a file; give the directory that holds the TFDS datasets, "
                      "or leave it empty for the default")
  if d.data_dir and not _path_exists(d.data_dir):
    raise ConfigError(f"data.data_dir={d.data_dir!r} does not exist; create it, fix the path, or leave it "
                      "empty for the default")
  parts = mixture(d.dataset)
  if parts is not None:
    batch_rows(config.train.batch_size, parts)
    for item, _ in parts:
      with in_item(item):
        check_config(component(config, item))
    return
  if d.dataset == "text_files":
    from fmjax.data import corpus
    if not d.files:
      raise ConfigError(f"data.dataset='text_files' needs data.files: comma-separated globs of {corpus.FILE_KINDS} "
                        "files")
    if not corpus.resolve_files(d.files):
      folders = [p.strip().rstrip("/") for p in d.files.split(",") if os.path.isdir(os.path.expanduser(p.strip()))]
      if folders:
        # Suggest the kinds the folder holds: a Parquet or .jsonl.zst corpus given the .txt glob matches nothing.
        found = corpus.resolve_files(f"{folders[0]}/**/*")
        if not found:
          raise ConfigError(f"data.files={d.files!r} names a directory that holds no file text_files reads "
                            f"({corpus.FILE_KINDS}); give globs of such files")
        globs = ",".join(f"{folders[0]}/**/*{e}" for e in sorted({_file_ending(p) for p in found}))
        raise ConfigError(f"data.files={d.files!r} names a directory, not files; give globs of its files, e.g. "
                          f"--config.data.files='{globs}'")
      raise ConfigError(f"data.files={d.files!r} matches no file text_files reads ({corpus.FILE_KINDS}); fix the "
                        f"globs {MOVED_HINT}")
    _check_documents(corpus.resolve_files(d.files), d.feature, d.files)
  elif d.dataset == "fmjax_corpus":
    if d.feature != "text":
      raise ConfigError(f"dataset 'fmjax_corpus' has no feature {d.feature!r}; set data.feature to 'text'")
  else:  # a TFDS dataset: known by name, with the feature (read from its code: no download)
    builder = _builder(config)
    _feature_name(config, builder)
    check_downloadable(d.dataset, builder, d.data_dir)
  t = d.tokenizer
  if t.kind not in ("bpe", "wordpiece", "unigram", "hf"):
    raise ConfigError(f"data.tokenizer.kind={t.kind!r} is not one of ['bpe', 'wordpiece', 'unigram', 'hf']")
  if t.kind != "hf" and t.get("path"):  # else the files named are quietly not the tokenizer the run uses
    raise ConfigError(f"data.tokenizer.path={t.path!r} is read only with data.tokenizer.kind='hf' (kind {t.kind!r} "
                      "trains one on the corpus); add --config.data.tokenizer.kind=hf, or drop the path")
  from fmjax.data import pii
  placeholders = len(pii.PLACEHOLDERS) if d.pii_scrub else 0
  if t.kind == "bpe":
    least = 256 + 1 + placeholders + 1  # bytes, specials, one merge
    if t.vocab_size < least:
      raise ConfigError(f"data.tokenizer.vocab_size={t.vocab_size} leaves byte-level BPE no merges beside its 256 "
                        f"bytes and special tokens; use at least {least} (e.g. 2048)")
  elif t.kind in ("wordpiece", "unigram"):
    least = 5 + placeholders + 1  # at most 5 special tokens, the PII placeholders, one piece of text
    if t.vocab_size < least:
      raise ConfigError(f"data.tokenizer.vocab_size={t.vocab_size} leaves a {t.kind} vocabulary no room beside its "
                        f"special tokens; use at least {least} (e.g. 8192)")


_DOC_COUNTS: dict = {}  # files fingerprint -> documents found (at most 2), so huge files are read once


def _check_documents(paths: list[str], feature: str, spec: str) -> None:
  """A text_files corpus needs two documents: one to train on, one held out."""
  from fmjax.data import corpus
  key = corpus.files_fingerprint(paths, feature)
  if key not in _DOC_COUNTS:
    _DOC_COUNTS[key] = sum(1 for _ in itertools.islice(corpus.file_documents(paths, feature), 2))
  if _DOC_COUNTS[key] == 0:
    raise ConfigError(f"data.files={spec!r} holds no text (empty corpus); point it at non-empty files")
  if _DOC_COUNTS[key] < 2:
    raise ConfigError(f"data.files={spec!r} holds 1 document, and text_files needs at least 2 (about 10% are held "
                      "out for eval): separate a .txt file's documents with blank lines, or give .jsonl lines")


def prepare_elsewhere(name: str) -> str:
  """What to do about a TFDS dataset that cannot be prepared on this machine."""
  return (f"prepare it on a machine with internet (`tfds build {name} --data_dir=DIR`) and pass "
          "--config.data.data_dir=DIR")


_PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")


def _resolves(host: str) -> bool:
  try:
    socket.getaddrinfo(host, None)
    return True
  except (OSError, UnicodeError):  # socket.gaierror is an OSError
    return False


def load_tfds(name: str, split: str, data_dir: str, **kwargs):
  """`tfds.load(name, split=...)` of a dataset outside the pretraining path (a task's), checked the
  same way: a dataset that is not prepared here and cannot be downloaded is one ConfigError line."""
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except Exception:  # pylint: disable=broad-except
    builder = None  # tfds.load below says why, in one line
  if builder is not None:
    check_downloadable(name, builder, data_dir)
  try:
    return tfds.load(name, split=split, data_dir=data_dir or None, **kwargs)
  except Exception as e:  # no network here, most often: one line that says where to prepare it
    why = (str(e).strip().splitlines() or [""])[0][:200]
    raise ConfigError(f"dataset {name!r} split {split!r} could not be loaded or downloaded ({type(e).__name__}: "
                      f"{why}); {prepare_elsewhere(name)}") from None


def check_downloadable(name: str, builder, data_dir: str) -> None:
  """Fails in one line when an unprepared TFDS dataset cannot be downloaded because none of its
  download hosts resolves here (no network): TFDS's own retries take minutes to say so.

  Downloads nothing. Prepared datasets, datasets that list no URLs, and machines behind a proxy
  (which resolves names itself) are left to TFDS.
  """
  if builder.is_prepared() or any(os.environ.get(v) for v in _PROXY_VARS):
    return
  try:
    urls = list(builder.url_infos or ())  # from the checksums TFDS ships with the dataset's code
  except Exception:  # pylint: disable=broad-except
    return
  hosts = sorted({urllib.parse.urlparse(u).hostname for u in urls} - {None})[:3]
  if not hosts or any(_resolves(h) for h in hosts):
    return
  where = f"data.data_dir={data_dir!r}" if data_dir else "the default TFDS data_dir"
  raise ConfigError(f"dataset {name!r} is not prepared in {where}, and this machine cannot reach where it downloads "
                    f"from (no address for {' or '.join(hosts)}: no network?); {prepare_elsewhere(name)}")


def _download(config, builder) -> None:
  """Downloads and prepares a TFDS dataset that is not prepared yet; a failure is one line."""
  if builder.is_prepared():
    return
  name = config.data.dataset
  check_downloadable(name, builder, config.data.data_dir)
  try:
    builder.download_and_prepare()
  except ConfigError:
    raise
  except Exception as e:  # no network, a manual download, a missing Beam...: TFDS raises many kinds
    why = (str(e).strip().splitlines() or [""])[0][:200]
    where = f"data.data_dir={config.data.data_dir!r}" if config.data.data_dir else "the default TFDS data_dir"
    raise ConfigError(f"dataset {name!r} is not prepared in {where} and could not be downloaded or prepared here "
                      f"({type(e).__name__}: {why}); {prepare_elsewhere(name)}") from None


_TEXT_FILES: dict = {}  # (data_dir, feature, files fingerprint) -> its TextFiles builder


def _builder(config):
  """The TFDS builder for config.data.dataset; unknown names fail with close matches."""
  import tensorflow_datasets as tfds

  d = config.data
  if d.dataset in OURS:
    from fmjax.data import corpus
    data_dir = d.data_dir or os.path.join(local_cache_root(config), "tfds")
    if d.dataset == "fmjax_corpus":
      return corpus.FmjaxCorpus(data_dir=data_dir, file_format="array_record")
    paths = corpus.resolve_files(d.files)
    key = (data_dir, d.feature, corpus.files_fingerprint(paths, d.feature))
    if key in _TEXT_FILES:  # each part of a prepare asks for it, and TFDS logs each one it makes
      return _TEXT_FILES[key]
    builder = corpus.TextFiles(paths=paths, feature=d.feature, data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():  # kept once its dataset info is on disk (an unprepared one's would go stale)
      _TEXT_FILES[key] = builder
    return builder
  namespaced = ":" in d.dataset.split("/")[0]  # community datasets, e.g. huggingface:imdb
  # Checking the name locally first: an unknown name would otherwise send TFDS looking on the network.
  names = list(tfds.list_builders(with_community_datasets=False))
  if namespaced:
    return _community_builder(d.dataset, d.data_dir)
  if _base_name(d.dataset) in names:
    try:
      return tfds.builder(d.dataset, data_dir=d.data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
      pass
  close = difflib.get_close_matches(_base_name(d.dataset), names + list(OURS), n=3, cutoff=0.6)
  hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
  raise ConfigError(f"unknown dataset {d.dataset!r}: {hint}Use a TFDS name (tfds.list_builders()), "
                    "'fmjax_corpus' or 'text_files'")


def _community_builder(name: str, data_dir: str):
  """The builder of a community dataset (`huggingface:imdb`), which TFDS looks up over the network
  even when it is prepared: without one, a failure is one line at once, not a traceback after retries."""
  import tensorflow_datasets as tfds
  instead = ("run where it is reachable, or write its text to .jsonl files and use --config.data.dataset=text_files "
             "--config.data.files=GLOB")
  if name.startswith("huggingface:") and not any(os.environ.get(v) for v in _PROXY_VARS) and not _resolves(
      "huggingface.co"):
    raise ConfigError(f"dataset {name!r} is looked up on the Hugging Face Hub, and this machine cannot reach it (no "
                      f"address for huggingface.co: no network?); {instead}")
  try:
    return tfds.builder(name, data_dir=data_dir or None)
  except Exception as e:  # pylint: disable=broad-except
    why = (str(e).strip().splitlines() or [""])[0][:200]
    if isinstance(e, tfds.core.registered.DatasetNotFoundError):
      raise ConfigError(f"unknown dataset {name!r} ({why}); check the name against its catalogue") from None
    raise ConfigError(f"dataset {name!r} could not be looked up ({type(e).__name__}: {why}); {instead}") from None


def _feature_name(config, builder) -> str:
  """The feature to read, checked against the dataset's features."""
  if config.data.dataset in OURS:
    return "text"  # text_files maps data.feature of .jsonl records onto `text` when it builds
  features = builder.info.features
  keys = sorted(features.keys()) if hasattr(features, "keys") else []
  if config.data.feature not in keys:
    raise ConfigError(f"dataset {config.data.dataset!r} has no feature {config.data.feature!r}; "
                      f"set data.feature to one of {keys}")
  return config.data.feature


def _check_split(config, builder, spec: str, split: str) -> None:
  available = sorted(builder.info.splits.keys()) if builder.info.splits else []
  if not available:  # unknown until prepared (and under tfds.testing.mock_data); TFDS checks on read
    return
  for name in _split_names(spec):
    if name not in available:
      cut = (f"e.g. '{available[0]}[99%:]', with train_split cut to the rest, '{available[0]}[:99%]'"
             if split == "eval" else f"e.g. '{available[0]}[:99%]'")
      raise ConfigError(f"dataset {config.data.dataset!r} has no split {name!r}; set data.{split}_split to one of "
                        f"{available} (a TFDS split spec: {cut})")


def split_spec(config, split: str) -> str:
  """The TFDS split spec behind our split names 'train' / 'eval'."""
  if split == "train":
    return config.data.train_split
  if split == "eval":
    return config.data.eval_split
  raise ConfigError(f"split must be 'train' or 'eval', got {split!r}")


def corpus_identity(config, split: str) -> dict[str, Any]:
  """What determines the documents of a split (for cache keys); reads no text."""
  d = config.data
  parts = mixture(d.dataset)
  if parts is not None:
    return {"mixture": [[name, share, corpus_identity(component(config, name), split)] for name, share in parts]}
  ident = {"dataset": d.dataset, "split": split_spec(config, split), "feature": d.feature,
           "pii_scrub": bool(d.pii_scrub)}
  if d.dataset == "text_files":
    from fmjax.data import corpus
    ident["files"] = corpus.files_fingerprint(corpus.resolve_files(d.files), d.feature)
  elif d.dataset == "fmjax_corpus":
    ident["python"] = f"{sys.version_info.major}.{sys.version_info.minor}"
  return ident


def identity_hash(obj: Any) -> str:
  """A short stable hash of a JSON-able object, for cache directory names."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def text_hash(text: str) -> int:
  """A stable 64-bit hash of a text, the same on every host and Python: what hash splits and orders."""
  return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "little")


def _as_text(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if hasattr(value, "item") and not isinstance(value, str):  # numpy scalar of bytes/str
    return _as_text(value.item())
  return str(value)


def _open_split(config, split: str):
  """(builder, feature, spec, data source or None) of a split, its dataset built or checked first."""
  check_config(config)
  builder = _builder(config)
  feature = _feature_name(config, builder)
  spec = split_spec(config, split)
  if config.data.dataset in OURS:
    _prepare_ours(config, builder)
  _check_split(config, builder, spec, split)
  try:
    source = builder.as_data_source(split=spec)
  except Exception:  # pylint: disable=broad-except
    source = None  # not array_record (or not prepared): read through tf.data
  return builder, feature, spec, source


def record_count(config, split: str) -> int | None:
  """How many records a split holds (empty ones included), or None where TFDS does not know."""
  builder, _, spec, source = _open_split(config, split)
  if source is not None:
    return len(source)
  _download(config, builder)
  try:
    return int(builder.info.splits[spec].num_examples) or None
  except Exception:  # pylint: disable=broad-except
    return None  # sizes unknown (a mocked dataset): read as one range


def file_starts(config, split: str) -> list[int] | None:
  """Where a split read through tf.data begins each of its files (and each piece of a spec like
  `train[:90%]+validation`), as ascending record indices of the split, 0 first.

  None for a split read by index (array_record), or where TFDS does not know its files' lengths.
  A TFRecord file has no index: a read that starts inside one reads it from its start, so parts
  that begin only where files begin read the input once.
  """
  builder, _, spec, source = _open_split(config, split)
  if source is not None:
    return None
  import tensorflow_datasets as tfds
  _download(config, builder)
  starts, at = {0}, 0
  try:
    for ins in tfds.core.ReadInstruction.from_spec(spec).to_absolute(builder.info.splits):
      info = builder.info.splits[ins.splitname]
      lengths = list(info.shard_lengths)
      if sum(lengths) != info.num_examples:
        return None  # sizes unknown (a mocked dataset)
      lo = ins.from_ or 0
      hi = info.num_examples if ins.to is None else ins.to
      starts.add(at)
      starts.update(at + c - lo for c in itertools.accumulate(lengths[:-1]) if lo < c < hi)
      at += hi - lo
  except Exception:  # pylint: disable=broad-except
    return None
  return sorted(starts)


def _sub_spec(builder, spec: str, start: int, stop: int) -> str:
  """The TFDS split spec of records [start, stop) of `spec` (`train[:90%]+validation` included)."""
  import tensorflow_datasets as tfds
  pieces, at = [], 0
  for ins in tfds.core.ReadInstruction.from_spec(spec).to_absolute(builder.info.splits):
    lo = ins.from_ or 0
    hi = builder.info.splits[ins.splitname].num_examples if ins.to is None else ins.to
    a, b = max(start, at), min(stop, at + hi - lo)
    if a < b:
      pieces.append(f"{ins.splitname}[{lo + a - at}:{lo + b - at}]")
    at += hi - lo
  return "+".join(pieces)


def documents(config, split: str, records: tuple[int, int] | None = None) -> Iterator[str]:
  """Yields the non-empty documents of a split ('train' or 'eval') as str, in a fixed order.

  `records`: only those of records [start, stop) (`record_count` counts them), so that several
  processes can each read a part of a split. A mixture's documents come from its datasets in
  turn, each as often as its share (the tokenizer trains on them in that proportion); a mixture
  is prepared dataset by dataset, so never read by records.
  """
  parts = mixture(config.data.dataset)
  if parts is not None:
    assert records is None, "a mixture is prepared dataset by dataset"
    yield from _interleaved([_item_documents(config, item, split) for item, _ in parts],
                            [share for _, share in parts])
    return
  builder, feature, spec, source = _open_split(config, split)
  if source is not None:
    start, stop = records or (0, len(source))
    for first in range(start, min(stop, len(source)), _READ_CHUNK):
      idx = list(range(first, min(first + _READ_CHUNK, stop, len(source))))
      try:
        batch = source.__getitems__(idx)  # one batched read from array_record
      except (AttributeError, TypeError):
        batch = [source[i] for i in idx]
      for record in batch:
        text = _as_text(record[feature])
        if text.strip():
          yield text
    return
  import tensorflow_datasets as tfds
  _download(config, builder)
  if records is not None:
    spec = _sub_spec(builder, spec, *records)
    if not spec:
      return
  # One file at a time (TFDS interleaves 16 by default): records come in their index order, as above.
  in_order = tfds.ReadConfig(interleave_cycle_length=1)
  for record in tfds.as_numpy(builder.as_dataset(split=spec, shuffle_files=False, read_config=in_order)):
    text = _as_text(record[feature])
    if text.strip():
      yield text


def _item_documents(config, item: str, split: str) -> Iterator[str]:
  with in_item(item):
    yield from documents(component(config, item), split)


def _interleaved(iterators: list[Iterator[str]], shares: list[float]) -> Iterator[str]:
  """Items of `iterators` in turn, each as often as its share (smooth weighted round robin), until
  all are spent; one that is spent early leaves the others to go on in their proportions."""
  credit = [0.0] * len(iterators)
  live = list(range(len(iterators)))
  while live:
    for i in live:
      credit[i] += shares[i]
    i = max(live, key=lambda k: credit[k])  # the first of the largest: a fixed order
    credit[i] -= sum(shares[k] for k in live)
    try:
      yield next(iterators[i])
    except StopIteration:
      live.remove(i)


def _prepare_ours(config, builder) -> None:
  """Builds fmjax_corpus / text_files once (TFDS writes to a temp dir and renames it)."""
  if builder.is_prepared():
    return
  import tensorflow_datasets as tfds
  from fmjax.data import corpus
  if config.data.dataset == "text_files":
    paths = corpus.resolve_files(config.data.files)
    if next(corpus.file_documents(paths, config.data.feature), None) is None:
      raise ConfigError(f"data.files={config.data.files!r} holds no text (empty corpus); point it at non-empty files")
  # Processes that build it at once (a sweep's runs, two prepares) take turns: the later ones
  # find it built, where TFDS would fail the second rename of its temporary directory.
  data_dir = str(builder.data_dir)
  lock = None
  if not files.is_remote(data_dir):
    parent, version = os.path.split(data_dir)
    os.makedirs(parent, exist_ok=True)
    with contextlib.suppress(OSError):  # a file system without locks: as before
      lock = files.try_lock(os.path.join(parent, f".{version}.lock"), f"pid {os.getpid()} on {socket.gethostname()}",
                            wait=True)
  try:
    if builder.is_prepared():  # by the process that held the lock: read what it wrote
      builder.info.read_from_directory(data_dir)
      return
    tfds.disable_progress_bar()
    try:
      builder.download_and_prepare()
    finally:
      tfds.enable_progress_bar()
  finally:
    if lock is not None:
      lock.close()
