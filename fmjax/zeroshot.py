"""Zero-shot multiple choice for a causal LM: `fmjax eval --workdir=W --task=hellaswag`.

An item is a context and N candidate continuations. The model scores each continuation by the sum
of its tokens' log-probabilities after the context (opened as fmjax opens every document: with the
tokenizer's BOS, else <eos>), and answers with the highest:

  acc        the choice with the largest log-likelihood
  acc_norm   the choice with the largest log-likelihood per character of its text (without the
             space that joins it to the context), so a long ending is not penalised for its
             length: lm-evaluation-harness's acc_norm, the HellaSwag figure GPT-2-size models are
             usually compared on

Tasks (TFDS by name; `data_dir` as in pretraining):
  hellaswag                    `hellaswag`, validation: "<activity>: <context>", 4 endings
  piqa                         `piqa`, validation: "Question: <goal>\\nAnswer:", 2 solutions
  arc_easy / arc_challenge     `ai2_arc/ARC-Easy|ARC-Challenge`, test: "Question: ...\\nAnswer:", 3-5 answers
  jsonl:PATH                   one {"context": str, "choices": [str, ...], "label": int} per line
  continuation                 the run's own held-out documents (its eval split, offline for any
                               corpus), cut into 36-word passages: a passage's first 24 words, and
                               four 12-word spans to follow them, its own and three other passages'

Whitespace that ends a context is scored with each choice, as lm-evaluation-harness does ("used to "
+ "iterate" as "used to" + " iterate"). A context longer than the run's trained positions loses its
start; an item with a choice longer than those positions is left out (and counted as `skipped`),
never scored on part of a choice.
Shapes: B rows a batch, T positions, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fmjax import config_lib, files
from fmjax.config_lib import ConfigError

# name: (TFDS name, default split)
TFDS_TASKS = {
    "hellaswag": ("hellaswag", "validation"),
    "piqa": ("piqa", "validation"),
    "arc_easy": ("ai2_arc/ARC-Easy", "test"),
    "arc_challenge": ("ai2_arc/ARC-Challenge", "test"),
}


@dataclasses.dataclass(frozen=True)
class Item:
  """One multiple-choice question: a context, its choices and the right one's index."""
  context: str
  choices: tuple[str, ...]
  label: int


# ----------------------------------------------------------------------------- tasks


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _hellaswag_clean(text: str) -> str:
  """WikiHow items carry markup ("[title]", "[step]"): a title ends a sentence, other tags go."""
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[[^\]]*\]", "", text)
  return re.sub(r"\s+", " ", text).strip()


def _hellaswag(record) -> Item:
  context = _hellaswag_clean(f"{_text(record['activity_label'])}: {_text(record['context'])}")
  return Item(context, tuple(" " + _hellaswag_clean(_text(e)) for e in record["endings"]), int(record["label"]))


def _piqa(record) -> Item:
  return Item(f"Question: {_text(record['goal']).strip()}\nAnswer:",
              (" " + _text(record["sol1"]).strip(), " " + _text(record["sol2"]).strip()), int(record["label"]))


def _arc(record) -> Item:
  labels = [int(x) for x in record["choices"]["label"]]
  answer = int(record["answerKey"])
  if answer not in labels:
    raise ValueError("an ARC item whose answer is none of its choices")
  return Item(f"Question: {_text(record['question']).strip()}\nAnswer:",
              tuple(" " + _text(t).strip() for t in record["choices"]["text"]), labels.index(answer))


_PARSERS = {"hellaswag": _hellaswag, "piqa": _piqa, "arc_easy": _arc, "arc_challenge": _arc}


def _tfds_items(task: str, split: str | None, data_dir: str, limit: int) -> tuple[str, list[Item]]:
  import tensorflow_datasets as tfds
  from fmjax.data import sources
  name, default_split = TFDS_TASKS[task]
  split = split or default_split
  ds = sources.load_tfds(name, split, data_dir, shuffle_files=False)
  if limit:
    ds = ds.take(limit)
  items = [_PARSERS[task](r) for r in tfds.as_numpy(ds)]
  for i, item in enumerate(items):
    if len(item.choices) < 2 or not 0 <= item.label < len(item.choices) or not all(item.choices):
      raise ConfigError(f"dataset {name!r} split {split!r} item {i} has {len(item.choices)} choices and label "
                        f"{item.label}; is the prepared dataset damaged? prepare it again")
  return split, items


def _jsonl_items(path: str, limit: int) -> list[Item]:
  from fmjax.data import sources
  if not os.path.isfile(path):
    raise ConfigError(f"--task=jsonl:{path}: no such file; one {{\"context\": ..., \"choices\": [...], "
                      "\"label\": i} per line")
  items = []
  for line, row in sources.jsonl_records(path):
    ok = (isinstance(row, dict) and isinstance(row.get("context"), str) and isinstance(row.get("choices"), list)
          and len(row["choices"]) >= 2 and all(isinstance(c, str) and c for c in row["choices"])
          and isinstance(row.get("label"), int) and not isinstance(row["label"], bool)
          and 0 <= row["label"] < len(row["choices"]))
    if not ok:
      raise ConfigError(f"{path}:{line} is not {{\"context\": str, \"choices\": [two or more non-empty str], "
                        "\"label\": index of the right one}")
    items.append(Item(row["context"], tuple(row["choices"]), row["label"]))
    if limit and len(items) >= limit:
      break
  return items


CONTINUATION_CONTEXT_WORDS, CONTINUATION_WORDS, CONTINUATION_ITEMS = 24, 12, 1000


def _continuation_items(config, limit: int) -> list[Item]:
  """Items from the eval split's documents (see the module docstring): each document's successive
  36-word passages, in order; the right span sits at position i % 4, and item i's distractors are
  the spans of the passages a quarter, a half and three quarters of the way round the list."""
  from fmjax.data import sources
  if "sft" in config or "dpo" in config:
    raise ConfigError("the continuation task reads a pretraining corpus's held-out documents, and an "
                      f"{'SFT' if 'sft' in config else 'DPO'} run has none; score its init_from run, or pass "
                      "--task=jsonl:FILE")
  if 0 < limit < 4:
    raise ConfigError(f"a limit of {limit} (--limit, or train.zeroshot_limit) is below the 4 passages the "
                      "continuation task needs (each item's wrong endings are three other passages'); use 0 (all) "
                      "or 4 or more")
  need = CONTINUATION_CONTEXT_WORDS + CONTINUATION_WORDS
  cap = limit or CONTINUATION_ITEMS
  passages = []
  for text in sources.documents(config, "eval"):
    words = text.split()
    passages += [words[at:at + need] for at in range(0, len(words) - need + 1, need)]
    if len(passages) >= cap:
      break
  passages = passages[:cap]
  n = len(passages)
  if n < 4:
    raise ConfigError(f"the eval split of data.dataset={config.data.dataset} has {n} passages of {need} words; "
                      "the continuation task needs 4 or more")
  span = lambda words: " " + " ".join(words[CONTINUATION_CONTEXT_WORDS:])
  items = []
  for i in range(n):
    others = [span(passages[(i + k * max(n // 4, 1)) % n]) for k in (1, 2, 3)]
    label = i % 4
    items.append(Item(" ".join(passages[i][:CONTINUATION_CONTEXT_WORDS]),
                      tuple(others[:label] + [span(passages[i])] + others[label:]), label))
  return items


def load_items(task: str, *, split: str | None = None, data_dir: str = "", limit: int = 0,
               config=None) -> tuple[str, list[Item]]:
  """(split, items) of a task named as in the module docstring; at most `limit` items (0: all).
  `continuation` reads the documents of `config`'s eval split."""
  if task.startswith("jsonl:"):
    return split or "file", _jsonl_items(task[len("jsonl:"):], limit)
  if task == "continuation":
    if split not in (None, "eval"):
      raise ConfigError(f"--task=continuation reads the run's eval split; drop --split={split}")
    return "eval", _continuation_items(config, limit)
  if task not in TFDS_TASKS:
    import difflib
    close = difflib.get_close_matches(task, list(TFDS_TASKS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"unknown zero-shot task {task!r}; {hint}use one of {', '.join(TFDS_TASKS)}, continuation "
                      "or jsonl:PATH")
  return _tfds_items(task, split, data_dir, limit)


# ----------------------------------------------------------------------------- scoring


def _continuation(item: Item, choice: str) -> str:
  """The text whose tokens score `choice`: the whitespace that ends the item's context, then the choice.

  As in lm-evaluation-harness: a BPE splits "used to " + "iterate" into a lone space token and word pieces,
  where running text has "used to" + " iterate". A context that ends in no whitespace (every built-in
  task's) leaves the choice as it is.
  """
  return item.context[len(item.context.rstrip()):] + choice


def encode_rows(tok, items: Sequence[Item], max_len: int) -> dict[str, np.ndarray]:
  """One row per (item, choice), in order: inputs, targets, weights (1 on the choice's tokens: `_continuation`'s),
  segment ids (0 on padding), [R, T] with T the longest row rounded up to 16, at most `max_len`."""
  seqs = []
  for item in items:
    context = tok.encode_opening(item.context.rstrip())
    for choice in item.choices:
      cont = tok.encode(_continuation(item, choice))
      seq = (context + cont)[-(max_len + 1):]  # the context's start goes first
      seqs.append((seq, min(len(cont), len(seq) - 1)))
  T = min(max_len, -(-max(len(s) - 1 for s, _ in seqs) // 16) * 16)
  R = len(seqs)
  rows = {"inputs": np.zeros((R, T), np.int32), "targets": np.zeros((R, T), np.int32),
          "weights": np.zeros((R, T), np.float32), "segment_ids": np.zeros((R, T), np.int32)}
  for r, (seq, n_cont) in enumerate(seqs):
    n = len(seq) - 1
    rows["inputs"][r, :n] = seq[:-1]
    rows["targets"][r, :n] = seq[1:]
    rows["weights"][r, n - n_cont:n] = 1.0
    rows["segment_ids"][r, :n] = 1
  return rows


@functools.partial(jax.jit, static_argnums=0)
def _row_logliks(graphdef, params, inputs_BT, targets_BT, weights_BT, segment_ids_BT):
  model = nnx.merge(graphdef, params)
  logits_BTV = model(inputs_BT, segment_ids_BT=segment_ids_BT).astype(jnp.float32)
  target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  logp_BT = target_BT - jax.nn.logsumexp(logits_BTV, axis=-1)
  return jnp.sum(logp_BT * weights_BT, axis=-1)


def _to_host(x) -> np.ndarray:
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))  # a pod: every host gets every row


def score(model, tok, items: Sequence[Item], *, max_len: int, batch_size: int = 32) -> list[np.ndarray]:
  """Each item's continuation log-likelihoods (one float per choice), batch_size rows at a time."""
  graphdef, params = nnx.split(model)
  return score_rows(graphdef, params, encode_rows(tok, items, max_len), items, batch_size=batch_size)


def score_rows(graphdef, params, rows: dict[str, np.ndarray], items: Sequence[Item], *,
               batch_size: int) -> list[np.ndarray]:
  """`score` over rows already encoded (`encode_rows`), with a model's graphdef and params (which may
  be sharded over a mesh, as a training run's are: every process passes the same rows)."""
  R = len(rows["inputs"])
  out = []
  for start in range(0, R, batch_size):
    chunk = {k: v[start:start + batch_size] for k, v in rows.items()}
    n = len(chunk["inputs"])
    if n < batch_size:  # one shape for every batch: one compile
      chunk = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)]) for k, v in chunk.items()}
    logliks_B = _row_logliks(graphdef, params, chunk["inputs"], chunk["targets"], chunk["weights"],
                             chunk["segment_ids"])
    out.append(_to_host(logliks_B)[:n])
  flat = np.concatenate(out)
  result, at = [], 0
  for item in items:
    result.append(flat[at:at + len(item.choices)])
    at += len(item.choices)
  return result


def _chars(choice: str) -> int:
  """The length acc_norm divides by: the choice's characters, less the space that joins it on."""
  return max(len(choice[1:] if choice.startswith(" ") else choice), 1)


def fitting(tok, items: Sequence[Item], max_len: int, task: str = "") -> tuple[list[Item], int]:
  """The items whose every choice fits in `max_len` positions after at least one context token,
  and how many were left out (logged); none fitting is one ConfigError line."""
  kept = [item for item in items if all(len(tok.encode(_continuation(item, c))) <= max_len for c in item.choices)]
  if not kept:
    raise ConfigError(f"every item of task {task!r} has a choice longer than the {max_len} positions scored "
                      "(the run's trained positions, or data.seq_len in training); drop the task or use longer rows")
  if len(kept) < len(items):
    import logging
    logging.getLogger("fmjax").info("%s: %d of %d items have a choice longer than %d positions: left out", task,
                                    len(items) - len(kept), len(items), max_len)
  return kept, len(items) - len(kept)


def metrics(items: Sequence[Item], logliks: Sequence[np.ndarray]) -> dict[str, float]:
  """acc, acc_norm (log-likelihood per character of the choice), and the chance level of the items."""
  right = [int(np.argmax(ll)) == item.label for item, ll in zip(items, logliks)]
  per_char = [ll / np.array([_chars(c) for c in item.choices]) for item, ll in zip(items, logliks)]
  right_norm = [int(np.argmax(ll)) == item.label for item, ll in zip(items, per_char)]
  return {"acc": float(np.mean(right)), "acc_norm": float(np.mean(right_norm)),
          "chance": float(np.mean([1 / len(item.choices) for item in items])), "items": len(items)}


def check_tasks(config) -> list[str]:
  """The zero-shot tasks a training run scores at each eval (`train.zeroshot_tasks`, comma-separated)."""
  names = [t.strip() for t in str(config.train.get("zeroshot_tasks", "")).split(",") if t.strip()]
  for name in names:
    if not (name in TFDS_TASKS or name == "continuation" or name.startswith("jsonl:")):
      load_items(name)  # the one-line "unknown task" error
  if names and config.model.family != "gpt":
    raise ConfigError(f"train.zeroshot_tasks={config.train.zeroshot_tasks!r} scores a causal LM's continuations; "
                      f"this run trains a {config.model.family}: leave it empty")
  return names


def run(workdir: str, task: str, *, split: str | None = None, limit: int = 0, step: int | None = None,
        batch_size: int = 32, data_dir: str | None = None) -> dict:
  """Scores `task` with `workdir`'s causal LM (checkpoint `step`, default the latest); a TFDS task is read
  from `data_dir` (default: the run's data.data_dir)."""
  from fmjax import data, generate
  path = os.path.join(workdir, "config.json")
  saved = files.read_json(path)
  model = saved.get("model") if isinstance(saved, dict) else None
  if saved is not None and not isinstance(model, dict):
    config_lib.check_saved(saved, path)  # damaged: one line naming it (the rest is checked on restore)
  if isinstance(model, dict) and model.get("family") == "bert":
    what = "BERT classifier" if "task" in saved else "BERT (masked LM)"
    raise ConfigError(f"{workdir} holds a {what}; zero-shot multiple choice scores a causal LM's "
                      "continuations: pass the --workdir of a GPT run")
  restored = generate.restore_run(workdir, step)  # a classifier workdir is refused there
  config = restored.config
  data_dir = str(config.data.get("data_dir", "")) if data_dir is None else data_dir
  split, items = load_items(task, split=split, data_dir=data_dir, limit=limit, config=config)
  if not items:
    raise ConfigError(f"--task={task} split {split!r} holds no items")
  model = nnx.merge(restored.spec.graphdef, restored.params)
  tok, max_len = data.get_tokenizer(config, workdir), generate.trained_positions(config, workdir)
  items, skipped = fitting(tok, items, max_len, task)
  with generate.on_mesh(model, config):  # rows of a multiple of 128 tokens take splash on a TPU
    logliks = score(model, tok, items, max_len=max_len, batch_size=batch_size)
  return {"task": task, "split": split, "step": restored.step, **metrics(items, logliks), "skipped": skipped}
