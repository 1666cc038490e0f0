"""TFDS builders of ours: `fmjax_corpus` (offline English text) and `text_files` (local .txt / .jsonl / .parquet).

This module imports tensorflow_datasets at the top, so `fmjax.data` imports it only when a
dataset is actually read (the GPU benchmark machine has no TFDS).

fmjax_corpus: CPython's own reference manual text (`pydoc_data.topics`, one document per
topic) plus the module docstrings of the standard library (one document per module). Every
Python install has it, so the demo and the tests run offline. The text depends on the Python
minor version, which is part of the builder config name.

text_files: `.jsonl` files give one document per line (field `data.feature`), `.parquet` files one per
row (column `data.feature`: FineWeb's and Hugging Face datasets' exports); `.txt` files give one
document per block of text between blank lines, so one large text file still has enough documents
for a held-out split. Text and JSON Lines may be compressed whole, as corpora are published
(`.jsonl.gz`, Dolma's `.json.gz`, the Pile's `.jsonl.zst`, `.txt.gz`). The files are read a document
at a time (once to settle the split, then once per split), so a corpus may be larger than the host's
memory.

Both hold out documents deterministically by a hash of their text (about 10%, at least one),
so the split never depends on file order, machine or time.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import inspect
import logging
import os
import re
import sys
import sysconfig
import tokenize
from typing import Iterable, Iterator

import tensorflow_datasets as tfds

from fmjax.data import sources

HELD_OUT_PERCENT = 10
_SKIP_DIRS = {"test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "__pycache__",
              "turtledemo", "ensurepip", "pydoc_data"}
_BLANK_LINES = re.compile(r"\n[ \t]*\n+")  # what separates the blocks of a .txt file (`_txt_blocks` reads it by line)


def _flipped_key(docs: Iterable[tuple[str, str]]) -> str | None:
  """The key of the one document whose hash's split is overruled, so that both splits are non-empty:
  the first lowest-hash document is held out when the hash holds out none, the first highest-hash
  one trained on when it holds out all; None when neither happens. One pass, in the memory of a
  document: what lets a large corpus's splits be streamed (`_held_out` decides each document)."""
  n, any_held, all_held, lowest, highest = 0, False, True, None, None  # (hash, key) of the first lowest / highest
  for key, text in docs:
    h = sources.text_hash(text)
    held = h % 100 < HELD_OUT_PERCENT
    n, any_held, all_held = n + 1, any_held or held, all_held and held
    if lowest is None or h < lowest[0]:
      lowest = (h, key)
    if highest is None or h > highest[0]:
      highest = (h, key)
  if n >= 2 and not any_held:
    return lowest[1]
  if n >= 2 and all_held:
    return highest[1]
  return None


def _held_out(key: str, text: str, flipped: str | None) -> bool:
  """Whether a document is held out: by its text's hash (about HELD_OUT_PERCENT%), but for `flipped`."""
  return (sources.text_hash(text) % 100 < HELD_OUT_PERCENT) != (key == flipped)


def _assign_splits(docs: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
  """The hash-based held-out split of a list of (key, text) documents (the offline corpus)."""
  flipped = _flipped_key(docs)
  held = [_held_out(key, text, flipped) for key, text in docs]
  return {"train": [d for d, h in zip(docs, held) if not h],
          "validation": [d for d, h in zip(docs, held) if h]}


def _module_docstring(path: str) -> str | None:
  """The module docstring, read from the first tokens only: parsing whole files costs seconds."""
  with open(path, "rb") as f:
    try:
      for tok in tokenize.tokenize(f.readline):
        if tok.type in (tokenize.ENCODING, tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE):
          continue
        if tok.type == tokenize.STRING:
          value = ast.literal_eval(tok.string)
          return inspect.cleandoc(value) if isinstance(value, str) else None
        return None
    except (tokenize.TokenError, SyntaxError, ValueError, UnicodeDecodeError):
      return None
  return None


def corpus_documents() -> list[tuple[str, str]]:
  """(key, text) of the offline corpus, in a fixed order."""
  import pydoc_data.topics

  docs = [(f"topic/{name}", text.strip()) for name, text in sorted(pydoc_data.topics.topics.items())]
  root = sysconfig.get_paths()["stdlib"]
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    for name in sorted(filenames):
      if name.endswith(".py"):
        path = os.path.join(dirpath, name)
        text = _module_docstring(path)
        if text and len(text) >= 100:  # one-line docstrings are noise, not English text
          docs.append((f"module/{os.path.relpath(path, root)}", text))
  return docs


class FmjaxCorpus(tfds.core.GeneratorBasedBuilder):
  """Offline English text: the CPython reference manual topics and standard-library module docstrings."""

  VERSION = tfds.core.Version("1.0.0")
  url_infos = None  # nothing to download; also skips TFDS's checksum-file lookup (needs importlib_resources)
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=f"py{sys.version_info.major}{sys.version_info.minor}")]

  def _info(self):
    # DatasetInfo(builder=...) rather than dataset_info_from_configs: see STACK.md gotcha 7.
    return tfds.core.DatasetInfo(
        builder=self,
        description="CPython reference manual topics and standard-library module docstrings.",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    splits = _assign_splits(corpus_documents())
    return {name: self._generate_examples(docs) for name, docs in splits.items()}

  def _generate_examples(self, docs):
    for key, text in docs:
      yield key, {"text": text}


FILE_KINDS = ".txt, .jsonl, .parquet (text and JSON Lines also compressed: .gz, .zst)"


def file_kind(path: str) -> str | None:
  """"txt", "jsonl" or "parquet" by the file's name, or None for a file text_files does not read. A compressed
  .json file holds JSON Lines (Dolma's .json.gz); a plain one is one JSON value, not a corpus."""
  name = path
  compressed = name.endswith(sources.COMPRESSED)
  if compressed:
    name = os.path.splitext(name)[0]
  ext = os.path.splitext(name)[1]
  if ext == ".parquet":
    return None if compressed else "parquet"  # Parquet compresses within
  return {".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl" if compressed else None}.get(ext)


def resolve_files(spec: str) -> list[str]:
  """Sorted, de-duplicated paths of the files text_files reads (`file_kind`) matched by a comma-separated list of
  globs."""
  paths = set()
  for pattern in (p.strip() for p in spec.split(",")):
    if pattern:
      paths.update(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(p) and file_kind(p))
  return sorted(os.path.abspath(p) for p in paths)


def files_fingerprint(paths: list[str], feature: str) -> str:
  """Changes when the file set, a file's size or its modification time changes."""
  h = hashlib.sha256(feature.encode())
  for p in paths:
    st = os.stat(p)
    h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:16]


def _txt_blocks(path: str) -> Iterator[tuple[int, str]]:
  """(i, stripped text) of each block of a .txt file, read a line at a time, so a file larger than memory is
  read in the memory of one block.

  The blocks, and their numbers, are exactly those of `_BLANK_LINES.split(whole_file)` (what keys of
  prepared corpora were made from): a separator is the line break of a line, the next line if it holds
  only spaces and tabs, and the empty lines right after that one. A line of spaces after them opens the
  next block, so two such lines in a row make a block of whitespace, which is numbered like any other.
  """
  i, lines, after_separator = 0, [], False
  with sources.open_text(path) as f:
    for line in f:  # lines end with "\n" alone (universal newlines), as f.read() gives them
      if lines and line[0] in " \t\n" and line.lstrip(" \t") == "\n":
        yield i, "".join(lines).strip()
        i, lines, after_separator = i + 1, [], True
      elif after_separator and line == "\n":
        continue
      else:
        lines.append(line)
        after_separator = False
  yield i, "".join(lines).strip()


def file_documents(paths: list[str], feature: str, warn: bool = True) -> Iterator[tuple[str, str]]:
  """(key, text) for every document in the files, a document at a time; see the module docstring for what a
  document is.

  JSONL records whose field is null carry no text: they are skipped, and counted in one log line.
  (`sources.jsonl_records` replaces lone surrogate escapes with U+FFFD.) `warn=False` leaves out
  these log lines, for a second reading of the same files.
  """
  from fmjax.config_lib import ConfigError

  nulls, first_null, has_feature = 0, "", False
  # Keys (TFDS orders records by them) name files relative to the corpus's own directory, so a
  # corpus moved elsewhere comes out in the same order.
  base = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
  for path in paths:
    key = os.path.relpath(path, base)
    kind = file_kind(path)
    if kind == "parquet":
      for row, text in _parquet_column(path, feature):
        if text is None:
          nulls, first_null = nulls + 1, first_null or f"{path} row {row}"
        elif text.strip():
          yield f"{key}:{row}", text.strip()
      continue
    if kind == "jsonl":
      for line, record in sources.jsonl_records(path, warn=warn):
        if not isinstance(record, dict):
          raise ConfigError(f"{path}:{line} is a JSON {type(record).__name__}, not an object; each line of a .jsonl "
                            f"corpus is one object with the text in its {feature!r} field")
        if feature not in record and has_feature:  # the field is right: this record is not
          raise ConfigError(f"{path}:{line} has no field {feature!r} (only {sorted(record)}), though earlier "
                            "records have it; fix the record or remove it")
        if feature not in record:
          raise ConfigError(f"{path}:{line} has no field {feature!r}; set data.feature to one of {sorted(record)}")
        has_feature = True
        if record[feature] is None:
          nulls, first_null = nulls + 1, first_null or f"{path}:{line}"
          continue
        if not isinstance(record[feature], str):
          raise ConfigError(f"{path}:{line}: {feature!r} is a JSON {type(record[feature]).__name__}, not text; fix "
                            "the record, or set data.feature to the field that holds the text")
        text = record[feature].strip()
        if text:
          yield f"{key}:{line - 1}", text
      continue
    try:
      for i, text in _txt_blocks(path):
        if text:
          yield f"{key}:{i}", text
    except UnicodeDecodeError:
      raise sources.not_utf8(path) from None
    except PermissionError as e:
      raise sources.unreadable(path, e) from None
  if nulls and warn:
    logging.getLogger("fmjax").warning("skipped %d record(s) whose %r is null (the first at %s)", nulls, feature,
                                       first_null)


def _parquet_column(path: str, feature: str) -> Iterator[tuple[int, str | None]]:
  """(row, text or None) of column `feature` of a Parquet file, a batch of rows at a time (memory: one batch)."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  from fmjax.config_lib import ConfigError
  try:
    table = pq.ParquetFile(path)
  except (pa.ArrowException, OSError) as e:
    raise ConfigError(f"{path} is not a Parquet file fmjax can read ({e}); copy it again") from None
  schema = table.schema_arrow
  if feature not in schema.names:
    raise ConfigError(f"{path} has no column {feature!r}; set data.feature to one of {schema.names}")
  kind = schema.field(feature).type
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
    raise ConfigError(f"{path}: column {feature!r} holds {kind}, not text; set data.feature to the column that holds "
                      "the text")
  row = 0
  try:
    for batch in table.iter_batches(batch_size=1024, columns=[feature]):
      for text in batch.column(0).to_pylist():
        yield row, text
        row += 1
  except (pa.ArrowException, OSError) as e:
    raise ConfigError(f"{path} is damaged after row {row} ({e}); copy it again") from None


class TextFiles(tfds.core.GeneratorBasedBuilder):
  """Local .txt / .jsonl / .parquet files as a TFDS dataset with `train` and held-out `validation` splits."""

  VERSION = tfds.core.Version("1.0.0")
  url_infos = None

  def __init__(self, *, paths: list[str], feature: str, **kwargs):
    self._paths = list(paths)
    self._feature = feature
    # One builder config per file set, so two corpora never share a prepared copy.
    config = tfds.core.BuilderConfig(name=files_fingerprint(self._paths, feature))
    super().__init__(config=config, **kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="Local text files (one document per blank-line block of .txt, one per line of .jsonl).",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    # Streamed so that memory holds one document, not the corpus: this pass reads the files for the
    # one document whose split `_flipped_key` overrules; each split reads them again.
    flipped = _flipped_key(file_documents(self._paths, self._feature))
    return {name: self._generate_examples(name == "validation", flipped) for name in ("train", "validation")}

  def _generate_examples(self, held_out: bool, flipped: str | None):
    from fmjax.config_lib import ConfigError

    for key, text in file_documents(self._paths, self._feature, warn=False):
      if _held_out(key, text, flipped) == held_out:
        yield key, {"text": text}
    # Each split read the files apart: an edit meanwhile would leave the splits of two corpora, under
    # the name of the first.
    if files_fingerprint(self._paths, self._feature) != self.builder_config.name:
      raise ConfigError(f"data.files changed while {len(self._paths)} file(s) were being prepared; prepare "
                        "again once they stay as they are")
