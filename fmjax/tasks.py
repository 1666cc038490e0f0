"""Downstream tasks: GLUE through TFDS, local CSV/JSONL files, and an offline default task.

A task is a list of examples `(texts, label)` per split, where `texts` holds one sentence or a
sentence pair, plus what the head needs (number of classes or regression) and the metrics that
papers report for it:

  pydoc_family   offline default: which standard-library family (gui, concurrency, mail, web,
                 testing, numeric, files) a function or class docstring comes from. Real text
                 with real labels from every Python install; the pretraining corpus holds module
                 docstrings and reference topics only, never these docstrings.
  glue/<name>    (or just <name>) every GLUE task via TFDS `glue/*`, with its official metric:
                 accuracy, F1 + accuracy (mrpc, qqp), Matthews correlation (cola),
                 Spearman + Pearson (stsb); the first is the headline a sweep tunes by.
  csv / jsonl    local files (`task.files`, `task.validation_files`) with declared
                 `task.text_columns` and `task.label_column`. The classes are those of the
                 training labels; `task.num_classes` may declare more (a validation label no
                 training example has is otherwise refused, as is a column of mostly distinct values).

Splits are deterministic: GLUE and files with a validation file keep their own; otherwise a
hash of the example text holds out `task.validation_percent` of it.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import glob
import json
import logging
import math
import os
import re
import sys
import sysconfig
from typing import Sequence

import numpy as np

from fmjax.config_lib import ConfigError
from fmjax.data import sources

Example = tuple[tuple[str, ...], float]

# name: (text features, num_classes (0 = regression), metrics, validation split). The first metric
# is the task's headline, which a sweep picks each task's rate by: BERT's GLUE table (Devlin et al.,
# 2019) reports F1 for QQP and MRPC, Spearman for STS-B and Matthews for CoLA.
GLUE = {
    "cola": (("sentence",), 2, ("matthews",), "validation"),
    "sst2": (("sentence",), 2, ("accuracy",), "validation"),
    "mrpc": (("sentence1", "sentence2"), 2, ("f1", "accuracy"), "validation"),
    "qqp": (("question1", "question2"), 2, ("f1", "accuracy"), "validation"),
    "stsb": (("sentence1", "sentence2"), 0, ("spearman", "pearson"), "validation"),
    "mnli": (("premise", "hypothesis"), 3, ("accuracy",), "validation_matched"),
    "mnli_mismatched": (("premise", "hypothesis"), 3, ("accuracy",), "validation_mismatched"),
    "qnli": (("question", "sentence"), 2, ("accuracy",), "validation"),
    "rte": (("sentence1", "sentence2"), 2, ("accuracy",), "validation"),
    "wnli": (("sentence1", "sentence2"), 2, ("accuracy",), "validation"),
}

# The offline task's labels: groups of standard-library packages and modules on one theme.
PYDOC_FAMILIES = {
    "gui": ("tkinter", "turtle"),
    "concurrency": ("asyncio", "concurrent", "multiprocessing", "threading", "queue", "sched"),
    "mail": ("email", "mailbox", "smtplib", "imaplib", "nntplib", "poplib"),
    "web": ("http", "urllib", "wsgiref", "xmlrpc", "socketserver", "ftplib"),
    "testing": ("unittest", "doctest", "pdb", "bdb"),
    "numeric": ("_pydecimal", "statistics", "fractions", "numbers", "random"),
    "files": ("tarfile", "zipfile", "shutil", "pathlib", "tempfile", "glob"),
}
PYDOC_PER_CLASS = 250  # balanced classes: at most this many docstrings per family
_MIN_WORDS = 6


@dataclasses.dataclass
class Task:
  """A downstream task: examples per split, head shape and official metrics."""
  name: str
  text_names: tuple[str, ...]
  num_classes: int  # 0: regression (one output, mean squared error)
  metrics: tuple[str, ...]
  splits: dict[str, list[Example]]
  label_names: tuple[str, ...] = ()
  positive: int = 1  # the class F1 scores (two classes): the names' second unless the labels say otherwise

  @property
  def is_regression(self) -> bool:
    """Whether the task predicts a number (one output) rather than a class."""
    return self.num_classes == 0

  @property
  def num_outputs(self) -> int:
    """The head's outputs: 1 for regression, else the number of classes."""
    return 1 if self.is_regression else self.num_classes

  @property
  def main_metric(self) -> str:
    """The metric a sweep picks the best run by (the first of `metrics`)."""
    return self.metrics[0]

  @property
  def f1_positive_label(self) -> str | None:
    """The name of the class F1 scores; None when the task reports no F1 or has no class names."""
    return self.label_names[self.positive] if "f1" in self.metrics and self.label_names else None


# ----------------------------------------------------------------------------- metrics


def _rank(x: np.ndarray) -> np.ndarray:
  """Ranks with ties given their average rank (what Spearman's rho needs)."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x), np.float64)
  sorted_x = x[order]
  i = 0
  while i < len(x):
    j = i
    while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
      j += 1
    ranks[order[i:j + 1]] = (i + j) / 2.0
    i = j + 1
  return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a - a.mean(), b - b.mean()
  denom = np.sqrt((a * a).sum() * (b * b).sum())
  return float((a * b).sum() / denom) if denom > 0 else 0.0


def compute_metrics(names: Sequence[str], predictions, labels, positive: int = 1) -> dict[str, float]:
  """GLUE's metrics of class ids (or regression scores) against labels.

  f1 is the F1 of class `positive` (mrpc, qqp: 1, the paraphrase); matthews is the Matthews
  correlation (cola); pearson and spearman compare scores (stsb). A metric with an undefined
  denominator is 0.
  """
  p, y = np.asarray(predictions), np.asarray(labels)
  out = {}
  for name in names:
    if name == "accuracy":
      out[name] = float(np.mean(p == y)) if len(y) else 0.0
    elif name in ("f1", "matthews"):
      tp = float(np.sum((p == positive) & (y == positive)))
      fp = float(np.sum((p == positive) & (y != positive)))
      fn = float(np.sum((p != positive) & (y == positive)))
      tn = float(np.sum((p != positive) & (y != positive)))
      if name == "f1":
        out[name] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
      else:
        denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        out[name] = float((tp * tn - fp * fn) / denom) if denom else 0.0
    elif name == "pearson":
      out[name] = _pearson(p.astype(np.float64), y.astype(np.float64))
    elif name == "spearman":
      out[name] = _pearson(_rank(p.astype(np.float64)), _rank(y.astype(np.float64)))
    else:
      raise ConfigError(f"unknown metric {name!r}; use accuracy, f1, matthews, pearson or spearman")
  return out


def evaluate(task: Task, predictions, split: str = "validation") -> dict[str, float]:
  """The task's official metrics of `predictions` (one per example of `split`, in order)."""
  labels = [label for _, label in task.splits[split]]
  if len(labels) != len(predictions):
    raise ValueError(f"{len(predictions)} predictions for {len(labels)} {split} examples of {task.name}")
  return compute_metrics(task.metrics, predictions, labels, task.positive)


# ----------------------------------------------------------------------------- splitting


def hash_split(examples: list[Example], percent: int) -> dict[str, list[Example]]:
  """Holds out about `percent`% of the examples by a hash of their text: same split everywhere."""
  hashes = [sources.text_hash("\x1f".join(texts)) for texts, _ in examples]
  held = [h % 100 < percent for h in hashes]
  if len(examples) >= 2 and not any(held):  # tiny tasks still get a validation example
    held[min(range(len(examples)), key=hashes.__getitem__)] = True
  return {"train": [e for e, h in zip(examples, held) if not h],
          "validation": [e for e, h in zip(examples, held) if h]}


# ----------------------------------------------------------------------------- offline task


def _docstrings(path: str) -> list[str]:
  with open(path, "rb") as f:
    try:
      tree = ast.parse(f.read())
    except (SyntaxError, ValueError):
      return []
  out = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      doc = ast.get_docstring(node)
      if doc and len(doc.split()) >= _MIN_WORDS:
        out.append(" ".join(doc.split()))
  return out


def _module_files(root: str, name: str) -> list[str]:
  path = os.path.join(root, name)
  if os.path.isdir(path):
    files = glob.glob(os.path.join(path, "**", "*.py"), recursive=True)
    return sorted(f for f in files if not {"test", "tests"} & set(os.path.relpath(f, root).split(os.sep)))
  return [path + ".py"] if os.path.exists(path + ".py") else []


def pydoc_family_examples(cache_dir: str = "") -> list[Example]:
  """Docstrings of functions and classes in the PYDOC_FAMILIES modules, labelled by family.

  Parsing the sources takes seconds, so the result is cached as JSON under `cache_dir`
  (keyed by the Python version, whose standard library the text comes from).
  """
  version = f"py{sys.version_info.major}{sys.version_info.minor}"
  cache = os.path.join(cache_dir, "tasks", f"pydoc_family-{version}-v1.json") if cache_dir else ""
  if cache and os.path.exists(cache):
    with open(cache) as f:
      return [(tuple(t), float(y)) for t, y in json.load(f)]
  root = sysconfig.get_paths()["stdlib"]
  by_text: dict[str, set[int]] = {}
  for label, modules in enumerate(PYDOC_FAMILIES.values()):
    for module in modules:
      for path in _module_files(root, module):
        for doc in _docstrings(path):
          by_text.setdefault(doc, set()).add(label)
  # A docstring found in two families (e.g. a shared helper) has no true label: dropped.
  per_class: dict[int, list[str]] = {}
  for text, labels in by_text.items():
    if len(labels) == 1:
      per_class.setdefault(labels.pop(), []).append(text)
  examples = []
  for label in sorted(per_class):
    texts = sorted(per_class[label], key=sources.text_hash)[:PYDOC_PER_CLASS]
    examples += [((t,), float(label)) for t in sorted(texts)]
  if cache:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache + ".tmp", "w") as f:
      json.dump(examples, f)
    os.replace(cache + ".tmp", cache)
  return examples


# ----------------------------------------------------------------------------- files


def _read_records(path: str) -> list[tuple[int, dict]]:
  """(line number, record) of each record of a .jsonl, .csv or .tsv file."""
  if path.endswith(".jsonl"):
    return list(sources.jsonl_records(path))
  try:
    if path.endswith((".csv", ".tsv")):  # a byte-order mark (Excel's "CSV UTF-8" writes one) is not the first column's
      with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ",")
        return [(reader.line_num, record) for record in reader]
  except UnicodeDecodeError:
    raise sources.not_utf8(path) from None
  raise ConfigError(f"task file {path!r} must end in .csv, .tsv or .jsonl")


def _resolve(spec: str, key: str = "task.files") -> list[str]:
  paths = sorted({p for pattern in spec.split(",") if pattern.strip()
                  for p in glob.glob(os.path.expanduser(pattern.strip()))})
  if spec.strip() and not paths:
    raise ConfigError(f"{key}={spec!r} matches no file; give a path or glob of .csv/.tsv/.jsonl files "
                      "(`fmjax eval` of a run whose files moved takes --config.task.files too)")
  return paths


def _file_examples(paths: list[str], text_columns: tuple[str, ...], label_column: str) -> tuple[list, list, list]:
  """(texts, raw labels, `path:line` of each) from the records of `paths`; missing columns fail with the
  available ones."""
  texts, labels, places = [], [], []
  for path in paths:
    for i, (line, record) in enumerate(_read_records(path)):
      if not isinstance(record, dict):
        raise ConfigError(f"{path}:{line} is a JSON {type(record).__name__}, not an object; give each record as "
                          f"{{\"column\": value, ...}} with the columns {sorted({*text_columns, label_column})}")
      for column in (*text_columns, label_column):
        if column not in record:
          which = "task.label_column" if column == label_column and column not in text_columns else \
              "task.text_columns"
          raise ConfigError(f"{path} (record {i + 1}) has no column {column!r}; set {which} to one of "
                            f"{sorted(record)}")
        # JSON null, or a CSV row short of this column: no value, which str() would make the text "None".
        if record[column] is None or (column == label_column and not str(record[column]).strip()):
          raise ConfigError(f"{path}:{line} has no value in column {column!r}; fill it in or remove the record")
        if isinstance(record[column], (dict, list)):  # str() would make its Python repr the text or a class
          raise ConfigError(f"{path}:{line} has a JSON {type(record[column]).__name__} in column {column!r}, where "
                            f"{'a label' if column == label_column else 'text'} goes; give a plain value there")
      texts.append(tuple(str(record[c]) for c in text_columns))
      labels.append(record[label_column])
      places.append(f"{path}:{line}")
  return texts, labels, places


def _label_ids(raw: list, num_classes: int, where: str) -> tuple[list[float], tuple[str, ...]]:
  """Maps labels to class ids 0..C-1 (ints as given, strings in sorted order) or keeps floats.

  Numbers that are not all integers (0.26, 4.65) are scores, not class names: unless
  task.num_classes=0 (regression) declares them so, they are refused rather than made into one
  class per distinct value.
  """
  if num_classes == 0:
    try:
      return [float(y) for y in raw], ()
    except (TypeError, ValueError):
      raise ConfigError(f"{where}: regression (task.num_classes=0) needs numeric labels, got e.g. "
                        f"{next(y for y in raw if not _is_number(y))!r}") from None
  kinds = {type(y) for y in raw}
  if str in kinds and kinds & {int, float} and not all(_is_int(y) for y in raw):
    number, name = next(y for y in raw if type(y) in (int, float)), next(y for y in raw if isinstance(y, str))
    raise ConfigError(f"{where}: labels mix numbers (e.g. {number!r}) and strings (e.g. {name!r}), which would be "
                      "classes of their own; write every label the same way (all class ids or all class names)")
  if raw and all(_is_number(y) and not isinstance(y, bool) for y in raw) and not all(_is_int(y) for y in raw):
    example = next(y for y in raw if not _is_int(y))
    raise ConfigError(f"{where}: labels are numbers that are not all integers (e.g. {example!r}), so not class ids; "
                      "set task.num_classes=0 for regression, or give integer or string class labels")
  if all(_is_int(y) for y in raw):
    ids = [int(float(y)) for y in raw]
    distinct, top = len(set(ids)), max(ids, default=0)
    if num_classes < top + 1 and top + 1 > max(100, 10 * distinct):  # a head of a class per id up to the largest
      raise ConfigError(f"{where}: integer labels run up to {top} but take only {distinct} different values, which "
                        f"would make a head of {top + 1} classes; renumber the classes 0..{distinct - 1}, give them "
                        f"as strings, or set task.num_classes={top + 1} if that many classes are meant")
    names = tuple(str(i) for i in range(max(max(ids) + 1, num_classes))) if ids else ()
    if ids and min(ids) == 1 and num_classes == -1:  # star ratings 1..5, or 1/2 for two classes
      logging.getLogger("fmjax").warning(
          "%s: integer labels run 1..%d and class ids count from 0, so class 0 never occurs and the head has %d "
          "outputs%s; renumber them 0..%d, or write them as strings (class names)", where, top, top + 1,
          " (and a two-class task's F1 is not reported)" if top == 2 else "", top - 1)
  else:
    names = tuple(sorted({str(y) for y in raw}))
    ids = [names.index(str(y)) for y in raw]
  return [float(i) for i in ids], names


def _is_number(y) -> bool:
  try:
    float(y)
    return True
  except (TypeError, ValueError):
    return False


def _is_int(y) -> bool:
  return _is_number(y) and float(y).is_integer() and not isinstance(y, bool)


def _check_label_column(train_raw: list, num_classes: int, label_column: str) -> None:
  """Refuses a label column with more distinct values than half the training examples (and over 10): an id
  or text column, which would make one class per example, unless task.num_classes declares the classes;
  and one with a single value, which leaves nothing to learn."""
  distinct = len({str(y) for y in train_raw})
  if num_classes == -1 and distinct > max(10, len(train_raw) / 2):
    raise ConfigError(f"task.label_column={label_column!r} has {distinct} different values in {len(train_raw)} "
                      "examples of task.files, so it holds no class labels; set task.label_column to the column of "
                      "the labels (or task.num_classes, if these are classes)")
  if distinct == 1:  # a head that always answers that class scores 100% on a validation split cut from these
    raise ConfigError(f"every training example of task.files has the label {train_raw[0]!r} (task.label_column="
                      f"{label_column!r}), and a classifier learns nothing from one class; give examples of at least "
                      "two classes, or set task.label_column to the column of the labels")


def _check_unseen_labels(train_raw: list, val_raw: list, val_places: list[str], num_classes: int) -> None:
  """Refuses a validation label that no training example has, which would become a class of its own (a
  2-class task scored as 3, without its F1), unless task.num_classes counts it among the classes."""
  if all(_is_int(y) for y in train_raw + val_raw):  # class ids: 0..the largest training id, or the declared head
    top = max(int(float(y)) for y in train_raw)
    size = max(top + 1, num_classes)
    unseen = [(int(float(y)), p) for y, p in zip(val_raw, val_places) if int(float(y)) >= size]
    needed, shown = max([size - 1] + [y for y, _ in unseen]) + 1, f"0..{top}"
  else:
    names = sorted({str(y) for y in train_raw})
    unseen = [(str(y), p) for y, p in zip(val_raw, val_places) if str(y) not in names]
    needed = len(names) + len({y for y, _ in unseen})
    if num_classes == needed:
      return
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
  if unseen:
    y, place = unseen[0]
    raise ConfigError(f"{place} has label {y!r}, which no training example has (labels: {shown}); fix the label, "
                      f"or set task.num_classes={needed} to keep it as a class")


def _files_task(tc) -> Task:
  text_columns = tuple(tc.text_columns)
  if not 1 <= len(text_columns) <= 2:
    raise ConfigError(f"task.text_columns={text_columns} must name one column or a sentence pair")
  train_texts, train_raw, train_places = _file_examples(_resolve(tc.files), text_columns, tc.label_column)
  if not train_texts:
    raise ConfigError(f"task.files={tc.files!r} holds no examples")
  val_paths = _resolve(tc.validation_files, "task.validation_files") if tc.validation_files else []
  val_texts, val_raw, val_places = _file_examples(val_paths, text_columns, tc.label_column)
  labels, names = _label_ids(train_raw + val_raw, int(tc.num_classes), tc.files)
  if tc.num_classes == 0:
    bad = next((i for i, y in enumerate(labels) if not math.isfinite(y)), None)
    if bad is not None:  # one such label makes every loss and update NaN
      raise ConfigError(f"{(train_places + val_places)[bad]} has label {(train_raw + val_raw)[bad]!r}, not a finite "
                        "number, which regression cannot learn; fix the label or remove the record")
  else:
    _check_label_column(train_raw, int(tc.num_classes), tc.label_column)
    _check_unseen_labels(train_raw, val_raw, val_places, int(tc.num_classes))
  if tc.label_column in text_columns:  # (a text column named as the labels is refused above, as no labels)
    raise ConfigError(f"task.label_column={tc.label_column!r} is also one of task.text_columns={text_columns}; "
                      "the model would read its label: give the text columns without it")
  train = list(zip(train_texts, labels[:len(train_texts)]))
  if val_paths:
    splits = {"train": train, "validation": list(zip(val_texts, labels[len(train_texts):]))}
  else:
    splits = hash_split(train, int(tc.validation_percent))
  num_classes = int(tc.num_classes) if tc.num_classes != -1 else len(names)
  metrics = ("pearson", "spearman") if num_classes == 0 else ("accuracy", "f1") if num_classes == 2 else \
      ("accuracy",)
  return Task(tc.name, text_columns, num_classes, metrics, splits, names,
              positive_class(names, str(tc.get("positive_label", "")), tc.files) if num_classes == 2 else 1)


_NEGATIVE = re.compile(r"^(not|non|no|un|in|dis)[\s_-]?", re.IGNORECASE)


def positive_class(names: Sequence[str], positive_label: str, where: str) -> int:
  """The class id that F1 scores for two class names: `task.positive_label` if given, else the one
  the other negates (`equivalent` of `not_equivalent`, `duplicate` of `not_duplicate`), else 1."""
  if positive_label:
    if positive_label not in names:
      raise ConfigError(f"task.positive_label={positive_label!r} is not a label of {where}; use one of {list(names)}")
    return list(names).index(positive_label)
  for i, name in enumerate(names):
    other = names[1 - i]
    match = _NEGATIVE.match(other)
    if match and other[match.end():].lower() == name.lower():
      return i
  return 1


# ----------------------------------------------------------------------------- GLUE


def _glue_task(name: str, tc, data_dir: str) -> Task:
  import tensorflow_datasets as tfds
  import tensorflow_datasets.text.glue  # noqa: F401  registers glue/* (STACK.md gotcha 8)

  features, num_classes, metrics, val_split = GLUE[name]
  tfds_name = "glue/mnli" if name == "mnli_mismatched" else f"glue/{name}"
  splits, names = {}, ()
  # MNLI's run also scores its mismatched dev set, as `accuracy_mismatched`: one model, both numbers.
  more = ("validation_mismatched",) if name == "mnli" else ()
  for ours, theirs in (("train", "train"), ("validation", val_split), *((s, s) for s in more)):
    ds, info = sources.load_tfds(tfds_name, theirs, data_dir, with_info=True)
    names = tuple(getattr(info.features["label"], "names", None) or ())  # none for stsb's scores
    examples = []
    for record in tfds.as_numpy(ds):
      texts = tuple(_text(record[f]) for f in features)
      examples.append((texts, float(record["label"])))
    splits[ours] = examples
  positive = positive_class(names, str(tc.get("positive_label", "")), f"glue/{name}") if num_classes == 2 else 1
  return Task(f"glue/{name}", features, num_classes, metrics, splits, names, positive)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------- entry point


def load_task(config) -> Task:
  """The task named by `config.task.name`, with labels checked against `task.num_classes`."""
  tc = config.task
  if tc.max_train_examples < 0:
    raise ConfigError(f"task.max_train_examples={tc.max_train_examples} must be at least 0 (0: every training "
                      "example)")
  if not 0 <= tc.validation_percent < 100:
    raise ConfigError(f"task.validation_percent={tc.validation_percent} must be in [0, 100): the share of the "
                      "examples held out when the task has no validation split")
  if tc.num_classes < -1 or tc.num_classes == 1:
    raise ConfigError(f"task.num_classes={tc.num_classes} must be -1 (from the labels), 0 (regression) or at least 2")
  name = tc.name.removeprefix("glue/")
  if tc.name == "pydoc_family":
    examples = pydoc_family_examples(sources.local_cache_root(config))
    task = Task("pydoc_family", ("docstring",), len(PYDOC_FAMILIES), ("accuracy",),
                hash_split(examples, int(tc.validation_percent)), tuple(PYDOC_FAMILIES))
  elif name in GLUE:
    task = _glue_task(name, tc, config.data.data_dir)
  elif tc.name in ("csv", "jsonl", "files"):
    task = _files_task(tc)
  else:
    options = ["pydoc_family", "csv", "jsonl", *(f"glue/{n}" for n in GLUE)]
    raise ConfigError(f"task.name={tc.name!r} is not one of {options}")
  check_labels(task, int(tc.num_classes))
  if tc.max_train_examples > 0:  # a label-scarce setting: a fixed, hash-ordered subset of the train split
    task.splits["train"] = sorted(task.splits["train"],
                                  key=lambda e: sources.text_hash("\x1f".join(e[0])))[:tc.max_train_examples]
  for split in ("train", "validation"):
    if not task.splits.get(split):
      raise ConfigError(f"task {task.name} has no {split} examples; give more data or task.validation_files")
  return task


def check_labels(task: Task, declared: int = -1) -> None:
  """Fails in one line when labels don't fit the head: out of range, or another class count."""
  if declared != -1 and declared != task.num_classes:
    kind = "regression" if task.num_classes == 0 else f"{task.num_classes} classes"
    raise ConfigError(f"task {task.name} has {kind} but task.num_classes={declared}; set task.num_classes="
                      f"{task.num_classes} (or -1 to take it from the task)")
  if task.is_regression:
    return
  for split, examples in task.splits.items():
    bad = sorted({y for _, y in examples if not (float(y).is_integer() and 0 <= y < task.num_classes)})
    if bad and min(bad) < 0:  # no class count takes a negative id (-1/1 labels)
      raise ConfigError(f"task {task.name} split {split} has labels {bad[:5]}, and class ids count from 0; renumber "
                        "them 0..K-1, or write them as strings (class names, e.g. \"-1\" and \"1\")")
    if bad:
      raise ConfigError(f"task {task.name} split {split} has labels {bad[:5]} outside 0..{task.num_classes - 1} "
                        f"of its {task.num_classes}-class head; fix the labels or task.num_classes")
