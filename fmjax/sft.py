"""GPT supervised fine-tuning (SFT) and continued pretraining on JSONL rows: (prompt, completion) or conversations.

  fmjax sft --config=configs/sft.py --config.init_from=workdirs/gpt_tiny \
      --config.data.files=train.jsonl --workdir=workdirs/sft

Each row `{"prompt": ..., "completion": ...}` becomes BOS + prompt + completion + EOS (the BOS: EOS, for
a tokenizer without one of its own, as pretraining opens a document); the loss is on the
completion tokens (and the EOS) only: targets that are prompt tokens have loss weight 0. An empty
prompt is continued pretraining on the completion text. A row `{"messages": [{"role": "system" | "user" |
"assistant", "content": ...}, ...]}` (`sft.messages_key`; a file may hold both kinds) is a conversation,
written in the tokenizer's chat template (`fmjax.data.chat`; `sft.chat_template` overrides it, and fmjax's
own tokenizers, which have none, take a built-in one): the loss is on each assistant message's tokens and the
template's end of turn after it (`<|eot_id|>`, `<|im_end|>`, EOS), every turn in one row. Rows are packed
into fixed-length sequences with segment ids (or padded one per row with `sft.pack=False`), so they never
attend each other.

Start order: resume this workdir's checkpoint, else `init_from` (the pretrained params; the
optimizer starts fresh), else from scratch; the log says which. `finetune.peft` trains LoRA,
adapters or BitFit alone, as classification does: the model is `train.model_factory`'s, which
every reader of the workdir's config.json (generate, eval, zero-shot) rebuilds alike. The model's shape and the
tokenizer come from the `init_from` run (a data.seq_len beyond its max_len is lowered to it, and
logged), and the tokenizer is saved into the workdir (recorded as `tokenizer`, relative to it), with
the chat template its conversations were written in, so `fmjax generate` (`--chat` too) / `fmjax eval` /
`fmjax export` work on an SFT workdir as on a pretraining one, also after a
move. The data and init_from are checked before anything is written: a failed start leaves a new
workdir empty and an existing one as it was.

Legend: N rows, B batch, T sequence.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import itertools
import json
import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from fmjax import checkpoint as ckpt_lib, config_lib, files, metrics as metrics_lib, models, optim, peft, sharding
from fmjax import train
from fmjax.config_lib import ConfigError
from fmjax.data import chat, packing, sources

log = metrics_lib.log
# Model keys that decide the parameter tree: always those of the run the params come from (an SFT config
# states no model of its own), its layer layout too.
SHAPE_KEYS = (*ckpt_lib.SHAPE_KEYS, *ckpt_lib.ADOPTED_MODEL_KEYS, "scan_layers")


# ----------------------------------------------------------------------------- data


# Field names that hold a prompt in common SFT files: rows with one of them and no sft.prompt_key
# are refused rather than trained on their completions alone.
_PROMPT_NAMES = frozenset({"prompt", "question", "input", "inputs", "instruction", "query", "context", "source",
                           "user", "text"})


@dataclasses.dataclass(frozen=True)
class Conversation:
  """A conversation row: its messages (role and content only), and the file and line it came from."""
  messages: tuple[dict, ...]
  where: str = dataclasses.field(default="", compare=False)


def read_examples(spec: str, prompt_key: str = "prompt", completion_key: str = "completion", *,
                  messages_key: str = "messages", key: str = "data.files") -> list[tuple[str, str] | Conversation]:
  """(prompt, completion) pairs and `Conversation`s (rows with `messages_key`) from comma-separated JSONL
  paths or globs, in file order.

  `key` is the config key `spec` came from, which the error messages name.
  """
  paths = sorted({p for pattern in spec.split(",") if pattern.strip()
                  for p in glob.glob(os.path.expanduser(pattern.strip()))})
  if not paths:
    raise ConfigError(f"{key}={spec!r} matches no file; pass --config.{key}=PATH.jsonl (rows of "
                      f"{{\"{prompt_key}\": ..., \"{completion_key}\": ...}} or {{\"{messages_key}\": [...]}})")
  out, nulls, first_null = [], 0, ""
  pairs, unprompted, other_fields = 0, 0, set()  # (prompt, completion) rows, those without prompt_key, what else
  for path in paths:
    for line, row in sources.jsonl_records(path):
      if isinstance(row, dict) and messages_key in row and completion_key not in row:  # else a pair, as it was
        messages = row[messages_key]
        if (problem := chat.check_messages(messages)) is not None:
          raise ConfigError(f"{path}:{line} {messages_key!r} {problem}; fix the row or remove it (a conversation "
                            f"is {{\"{messages_key}\": [{{\"role\": \"user\", \"content\": ...}}, {{\"role\": "
                            "\"assistant\", \"content\": ...}]})")
        out.append(Conversation(tuple({"role": m["role"], "content": m["content"]} for m in messages),
                                f"{path}:{line}"))
        continue
      if not isinstance(row, dict) or completion_key not in row:
        have = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ConfigError(f"{path}:{line} has no {completion_key!r} field (has {have}); set "
                          "sft.prompt_key / sft.completion_key to the file's field names (sft.messages_key to a "
                          "conversation's)")
      if row[completion_key] is None:  # nothing to learn; str() would make it the text "None"
        nulls, first_null = nulls + 1, first_null or f"{path}:{line}"
        continue
      for k in (prompt_key, completion_key):
        if isinstance(row.get(k), (dict, list)):  # chat messages, say: str() would train on their Python repr
          raise ConfigError(f"{path}:{line} has a JSON {type(row[k]).__name__} in {k!r}, where SFT takes text; "
                            "write the prompt and the completion as strings, or a conversation as "
                            f"{{\"{messages_key}\": [{{\"role\": ..., \"content\": ...}}, ...]}}")
      pairs += 1
      if prompt_key not in row:
        unprompted += 1
        other_fields.update(k for k, v in row.items() if k != completion_key and isinstance(v, str))
      out.append((str(row.get(prompt_key, "") or ""), str(row[completion_key])))
  if nulls:
    log.warning("skipped %d row(s) whose %r is null (the first at %s)", nulls, completion_key, first_null)
  likely = sorted(other_fields & _PROMPT_NAMES)
  if pairs and unprompted == pairs and likely:
    # Every prompt would be dropped, while the rows plainly hold one under another name.
    raise ConfigError(f"no row of {key}={spec!r} has a {prompt_key!r} field, but they have {likely}; set "
                      "sft.prompt_key to the prompt's field name")
  if unprompted:
    log.warning("%d of %d row(s) have no %r field: they train on their completion alone", unprompted, pairs,
                prompt_key)
  return out


def encode_example(tok, prompt: str, completion: str) -> tuple[list[int], list[int]]:
  """(ids, trained) of a (prompt, completion) row: BOS + prompt + completion + EOS, trained 1 on the completion
  and the EOS, 0 on the prompt. The BOS (`Tokenizer.bos_id`: the EOS, for a tokenizer without a BOS of its
  own) opens a document as in pretraining (`fmjax generate` starts every prompt with it), so an empty
  prompt's first completion token has a context too."""
  prompt_ids = tok.encode_opening(prompt)
  completion_ids = tok.encode(completion) + [tok.eos_id]
  return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


def encode_conversation(tok, conversation: Conversation, template: str, respond_from: int = 0
                        ) -> tuple[list[int], list[int]]:
  """(ids, trained) of a conversation in `template` (`chat.encode`): trained 1 on what the assistant writes
  (in its messages from `respond_from` on)."""
  try:
    return chat.encode(tok, conversation.messages, template, respond_from)
  except ConfigError as e:
    raise ConfigError(f"{conversation.where}: {e}") from None


def pack_rows(examples: list[tuple[list[int], list[int]]], seq_len: int, *, pack: bool = True
              ) -> dict[str, np.ndarray]:
  """Packs encoded examples `(ids, trained)` into [N, T] rows of inputs, targets, loss_weights, segment_ids,
  positions.

  Example j occupies len(ids) - 1 slots (inputs ids[:-1], targets ids[1:]); target i has weight
  trained[i + 1] (1 on a completion's or an assistant's tokens). Rows fill greedily in order;
  padding is segment 0 with weight 0. Examples longer than the row are cut at its end.
  """
  T = seq_len
  rows: list[list[tuple[list[int], list[int]]]] = []
  used = T  # forces a new row for the first example
  for ids, trained in examples:
    n = min(len(ids) - 1, T)
    if not pack or used + n > T:
      rows.append([])
      used = 0
    rows[-1].append((ids, trained))
    used += n
  return write_rows(rows, T)


def write_rows(rows: list[list[tuple[list[int], list[int]]]], seq_len: int) -> dict[str, np.ndarray]:
  """`pack_rows`'s [N, T] arrays of rows that hold the given examples, in order (segment ids from 1); each
  row's examples must fit in it, but for a single example longer than the row, which is cut at its end."""
  T = seq_len
  N = len(rows)
  out = {"inputs": np.zeros((N, T), np.int32), "targets": np.zeros((N, T), np.int32),
         "loss_weights": np.zeros((N, T), np.float32), "segment_ids": np.zeros((N, T), np.int32),
         "positions": np.zeros((N, T), np.int32), "token_types": np.zeros((N, T), np.int32)}
  for r, row in enumerate(rows):
    at = 0
    for seg, (ids, trained) in enumerate(row, start=1):
      ids, trained = ids[:T + 1], trained[:T + 1]
      n = len(ids) - 1
      sl = slice(at, at + n)
      out["inputs"][r, sl] = ids[:-1]
      out["targets"][r, sl] = ids[1:]
      out["loss_weights"][r, sl] = trained[1:]
      out["segment_ids"][r, sl] = seg
      out["positions"][r, sl] = np.arange(n)
      at += n
  return out


def _held_out(example: tuple[str, str] | Conversation, percent: int) -> bool:
  """Whether the hash split holds `example` out: by its text, so a row stays on its side as the file changes."""
  if isinstance(example, Conversation):
    text = json.dumps([[m["role"], m["content"]] for m in example.messages], ensure_ascii=False)
  else:
    text = f"{example[0]}\x1f{example[1]}"
  return sources.text_hash(text) % 100 < percent


def load_rows(config, tok) -> dict[str, dict[str, np.ndarray] | None]:
  """Packed rows of the train and eval splits: eval is `sft.eval_files`, or a hash split of the train files.

  Conversations are written in `tok`'s chat template; a tokenizer without one takes the built-in template,
  which it then carries (`tok.chat_template`), so the run's saved tokenizer chats as it trained.
  """
  s = config.sft
  if not 0 <= s.eval_percent < 100:
    raise ConfigError(f"sft.eval_percent={s.eval_percent} must be in [0, 100): the share of data.files held out "
                      "for eval (0: none)")
  keys = dict(prompt_key=s.prompt_key, completion_key=s.completion_key,
              messages_key=s.get("messages_key", "messages"))  # a run saved before conversations had no key
  splits = split_held_out(config, "sft", lambda spec, **kw: read_examples(spec, **keys, **kw), _held_out, "row")
  if any(isinstance(e, Conversation) for e in itertools.chain(*splits.values())):
    _check_chat_template(tok)
  out = {}
  for split, examples in splits.items():
    encoded = [(encode_conversation(tok, e, tok.chat_template) if isinstance(e, Conversation)
                else encode_example(tok, *e),) for e in examples]
    kept = fitting(config, "sft", split, encoded, ("row", "rows", "completions"))
    out[split] = pack_rows([e for e, in kept], config.data.seq_len, pack=config.sft.pack) if kept else None
  return out


def split_held_out(config, section: str, read, held_out, noun: str) -> dict[str, list]:
  """{"train", "eval"} items of an SFT or DPO config (`section`): eval is `<section>.eval_files`, else the items of
  data.files that `held_out(item, <section>.eval_percent)` holds out. `read(spec, key=...)` reads a file list."""
  s = config[section]
  train = read(config.data.files)
  if s.eval_files:
    held_out_items = read(s.eval_files, key=f"{section}.eval_files")
  else:
    held = [held_out(e, s.eval_percent) for e in train]
    held_out_items = [e for e, h in zip(train, held) if h]
    train = [e for e, h in zip(train, held) if not h]
  if not train:
    raise ConfigError(f"data.files={config.data.files!r} holds no training {noun}s (after holding out "
                      f"{section}.eval_percent={s.eval_percent}%); add rows or lower {section}.eval_percent")
  return {"train": train, "eval": held_out_items}


def fitting(config, section: str, split: str, encoded: list[tuple], nouns: tuple[str, str, str]) -> list[tuple]:
  """The items of `encoded` (each a tuple of `(ids, trained)` sequences: one for SFT, DPO's two) whose every
  sequence keeps a trained token within data.seq_len; the others are dropped and counted (`nouns`: what an item,
  items and trained parts are called), and a split that asked for items and keeps none is one line.

  Targets are ids[1:seq_len + 1]: a prompt (a conversation's: what comes before the first assistant message)
  of seq_len ids, its BOS included, still leaves the row's last target to the first trained token; a longer
  one leaves nothing to learn from.
  """
  s, T = config[section], config.data.seq_len
  item, items, parts = nouns
  kept = [e for e in encoded if all(any(trained[1:T + 1]) for _, trained in e)]
  cut = sum(len(ids) - 1 > T for e in kept for ids, _ in e)
  if len(kept) < len(encoded) or cut:
    log.info("%s %s: dropped %d %s whose prompt (with the token that opens it) is longer than data.seq_len=%d; "
             "cut %d %s at the row end", section.upper(), split, len(encoded) - len(kept), items, T, cut, parts)
  if encoded and not kept:  # nothing left to learn from (train) or to score (eval, which the config asked for)
    held_out = split == "eval" and not s.eval_files
    which = (f"training {item}" if split == "train" else f"{item} of {section}.eval_files={s.eval_files!r}"
             if s.eval_files else f"held-out eval {item} ({section}.eval_percent={s.eval_percent})")
    fix = (f"raise data.seq_len (up to model.max_len={config.model.max_len}) or shorten the prompts"
           if T < config.model.max_len else "shorten the prompts (data.seq_len is model.max_len)")
    raise ConfigError(f"every {which} has a prompt longer than data.seq_len={T} ({len(encoded)} dropped); {fix}"
                      + (f", or set {section}.eval_percent=0" if held_out else ""))
  return kept


def _check_chat_template(tok, section: str = "sft") -> None:
  """Gives `tok` the template its conversations are written in (its own, else the built-in one), and says
  when that template ends no assistant turn with a special token: a model trained on it never learns to stop.
  `section`: the config section whose `chat_template` sets another (sft, dpo)."""
  if tok.chat_template is None:
    log.info("%s: conversations are written in fmjax's built-in chat template (the tokenizer has none; "
             "%s.chat_template sets one)", section.upper(), section)
    tok.chat_template = chat.BUILTIN_TEMPLATE
  try:
    ends = chat.end_of_turn(tok, tok.chat_template)
  except ConfigError:  # it wants more than a user's and an assistant's message: the rows say what it refuses
    return
  if not any(i in tok.added_special_ids for i in ends):
    log.warning("the chat template writes no special token after an assistant's message (such as <|im_end|> or "
                "EOS): a model trained on it does not learn where its turn ends")


class RowLoader:
  """Step-indexed batches over packed rows, with the pretraining loader's interface.

  Train: batch s holds rows perm_e(g mod N) for g = s*B + b, perm_e drawn from (seed, epoch e).
  Eval: every row once in order, the last batch padded with zero-weight rows.
  """

  def __init__(self, rows: dict[str, np.ndarray], batch_size: int, sharding, *, seed: int, shuffle: bool):
    from fmjax import data
    self.rows, self.batch_size, self.sharding = rows, batch_size, sharding
    self.seed, self.shuffle = seed, shuffle
    self.num_rows = len(rows["inputs"])
    self.num_batches = max(self.num_rows // batch_size, 1) if shuffle else -(-self.num_rows // batch_size)
    self.rows_b = data.host_rows(sharding, (batch_size, rows["inputs"].shape[1]))
    self.num_runs = packing.runs_to_send(packing.most_runs(rows["segment_ids"]))  # as the pretraining loader

  def dataset_rows(self, step: int) -> np.ndarray:
    """Row ids of this host's batch rows at `step` (-1 = padding)."""
    return self.draw(step * self.batch_size + self.rows_b, self.num_rows)

  def draw(self, g_b: np.ndarray, n: int) -> np.ndarray:
    """The ids of places `g_b` in the stream over `n` items: item perm_e(g mod n) of epoch e = g // n
    (shuffled), else g itself while g < n, then -1 (padding)."""
    if not self.shuffle:
      return np.where(g_b < n, g_b, -1)
    epoch_b, i_b = g_b // n, g_b % n
    out_b = np.empty_like(g_b)
    for e in np.unique(epoch_b):
      rng = np.random.Generator(np.random.Philox(key=np.array([self.seed, e], dtype=np.uint64)))
      sel = epoch_b == e
      out_b[sel] = rng.permutation(n)[i_b[sel]]
    return out_b

  def host_batch(self, step: int) -> dict[str, np.ndarray]:
    """This step's rows on the host; a pad row (past the split's end) carries no loss."""
    ids_b = self.dataset_rows(step)
    pad_b = ids_b < 0
    batch = {k: v[np.where(pad_b, 0, ids_b)].copy() for k, v in self.rows.items()}
    batch["loss_weights"][pad_b] = 0.0
    batch["segment_ids"][pad_b] = 0
    if self.num_runs:
      batch.update(packing.segment_runs(batch["segment_ids"], self.num_runs))
    return batch

  def global_batch(self, step: int) -> dict:
    """The global batch of `step` as jax.Arrays, assembled from this host's rows."""
    return {k: jax.make_array_from_process_local_data(self.sharding, v, (self.batch_size,) + v.shape[1:])
            for k, v in self.host_batch(step).items()}


def make_loaders(config, tok, batch_sharding, rows=None, eval_batch_size: int | None = None
                 ) -> tuple[RowLoader, RowLoader | None]:
  """Train and eval loaders over `config.data.files` (or `rows` of `load_rows`); eval is None when nothing
  is held out. Eval batches hold `eval_batch_size` rows (default train.batch_size)."""
  rows = load_rows(config, tok) if rows is None else rows
  b = config.train.batch_size
  # As fine-tuning orders its examples: train.seed too, so that a sweep's seeds are repeats that differ
  # (the trunk comes from init_from and dropout is off: the order is all a seed changes). train.seed=0
  # keeps the order data.seed alone gave.
  seed = config.train.seed * 1_000_003 + config.data.seed
  train_loader = RowLoader(rows["train"], b, batch_sharding, seed=seed, shuffle=True)
  eval_loader = (RowLoader(rows["eval"], eval_batch_size or b, batch_sharding, seed=config.data.seed, shuffle=False)
                 if rows["eval"] is not None else None)
  return train_loader, eval_loader


# ----------------------------------------------------------------------------- setup


def _read_config(workdir: str) -> dict | None:
  return files.read_json(os.path.join(workdir, "config.json"))


def _resuming(workdir: str) -> bool:
  """Whether `workdir` holds an SFT run to resume: its own tokenizer and a checkpoint. A tokenizer
  that a start which never saved left behind is not the run's: the new start's init_from wins."""
  from fmjax import data
  return files.isdir(os.path.join(workdir, data.RUN_TOKENIZER)) and bool(
      ckpt_lib.saved_steps(os.path.join(workdir, "checkpoints")))


def adopt_shape(config, workdir: str) -> dict | None:
  """Takes the model shape from the run the params come from; returns that run's config.json (None: none).

  That run is this workdir's own (resume), else `init_from`. A data.seq_len longer than its
  max_len is lowered to it: the pretrained position table decides, not the size preset. Reads only.
  """
  from fmjax import data
  source = _read_config(workdir) if _resuming(workdir) else None
  where = workdir
  if source is None and config.init_from:
    where = config.init_from
    if not files.isdir(os.path.join(config.init_from, "checkpoints")):
      raise ConfigError(f"init_from={config.init_from!r} holds no checkpoints/; pass the --workdir of a "
                        "`fmjax train` run")
    source = _read_config(config.init_from)
    if source is None:
      raise ConfigError(f"init_from={config.init_from!r} has no config.json; pass the --workdir of a `fmjax train` run")
    from fmjax import finetune
    if finetune.is_classifier_run(source):
      raise ConfigError(f"init_from={config.init_from} is a `fmjax finetune` (classifier) workdir; pass the --workdir "
                        "of a pretraining (`fmjax train`) or `fmjax sft` run")
    if source["model"]["family"] != "gpt":
      raise ConfigError(f"init_from={config.init_from} holds a {source['model']['family']} model; "
                        f"{_what(config)} needs a GPT checkpoint (use `fmjax finetune` for BERT)")
    data.resolve_tokenizer_path(source, config.init_from)
  if source is not None:
    theirs = {**models.ARCHITECTURE_DEFAULTS, **source["model"]}  # a run from before a choice existed: GPT-2's
    changed = [f"{k}={theirs[k]}" for k in SHAPE_KEYS if config.model[k] != theirs[k]]
    config.model.update({k: theirs[k] for k in SHAPE_KEYS})
    if config_lib.peft_mode(config) in peft.WRAPS and config.model.scan_layers:
      # LoRA and adapters wrap each layer's Dense: the stacked checkpoint restores unrolled.
      config.model.scan_layers = False
      changed = [c for c in changed if not c.startswith("scan_layers=")]
      changed.append(f"scan_layers=False (finetune.peft={config_lib.peft_mode(config)} wraps each layer)")
    if changed:
      log.info("Model shape taken from %s: %s", where, ", ".join(changed))
    if config.data.seq_len > config.model.max_len:
      log.info("data.seq_len=%d lowered to %d, the model.max_len of %s", config.data.seq_len, config.model.max_len,
               where)
      config.data.seq_len = config.model.max_len
  if config.model.family != "gpt":
    raise ConfigError(f"{_what(config)} trains a GPT; set model.family=gpt (use `fmjax finetune` for BERT)")
  return source


def _what(config) -> str:
  """SFT or DPO (`fmjax.dpo`, which starts its runs as SFT does): what the config trains, as messages name it."""
  return config_lib.command_of(config).upper()


def adopt_tokenizer(config, workdir: str, source: dict | None):
  """The tokenizer of the run the params come from (`source`, from `adopt_shape`); points `data.tokenizer` at
  the workdir's copy, `tokenizer` relative to the workdir. `sft.chat_template` (a DPO config's
  `dpo.chat_template`) replaces its chat template (a resumed run keeps the one it started with). Reads only:
  `run` saves the copy."""
  from fmjax import data
  own_tok = os.path.join(workdir, data.RUN_TOKENIZER)
  resuming = _resuming(workdir)
  if resuming:
    tok = data.load_tokenizer(own_tok)
  elif config.init_from:  # the tokenizer init_from saved, if it did: its ids exactly
    tok = data.get_tokenizer(ml_collections.ConfigDict(source), config.init_from)
  elif config.data.tokenizer.kind == "hf":
    tok = data.get_tokenizer(config)
  else:
    raise ConfigError(f"{_what(config)} needs the tokenizer of a pretrained model: pass "
                      "--config.init_from=PRETRAIN_WORKDIR (or data.tokenizer.kind=hf with data.tokenizer.path)")
  section = config_lib.command_of(config)  # sft, or dpo
  given = config[section].chat_template
  if given:
    template = chat.read_template(given, key=f"{section}.chat_template")
    if resuming and template != tok.chat_template:  # its rows would be other text than those it trained on
      raise ConfigError(f"{section}.chat_template={given!r} is not the chat template {workdir} "
                        f"started with (kept in {own_tok}); resume without changing it, or use a new --workdir")
    tok.chat_template = template
  # A resumed run keeps the path its checkpoint recorded (absolute in runs written before paths were relative).
  path = source["data"]["tokenizer"]["path"] if resuming and source else data.RUN_TOKENIZER
  config.data.tokenizer.update(kind="hf", path=path, vocab_size=tok.vocab_size)
  if tok.vocab_size > config.model.vocab_size:
    raise ConfigError(f"the tokenizer has {tok.vocab_size} ids but model.vocab_size={config.model.vocab_size}; "
                      "raise model.vocab_size")
  return tok


def init_from_pretrained(config, spec: train.StateSpec, tx, init_from: str) -> dict:
  """Train state at step 0 with `init_from`'s model (its newest checkpoint, or `init_from_step`; a LoRA SFT
  run's with its LoRA merged into the kernels) and a fresh optimizer. This run's own PEFT parameters start at
  their init, where the model computes the checkpoint's function (LoRA's B and the adapters' up are 0)."""
  from fmjax import finetune
  state = train.init_state(config, spec, tx)
  return finetune.load_trunk(config, spec, state, init_from, root=())


# ----------------------------------------------------------------------------- loop


def enter_workdir(closing: contextlib.ExitStack, config, cfg_dict: dict, workdir: str, spec, tok, resuming: bool):
  """(checkpointer, resume) of an SFT or DPO run starting in `workdir`, which it holds (locked, with pending saves
  landing first) until `closing` closes; process 0 writes the run's tokenizer on a fresh start and its config.json."""
  from fmjax import data
  closing.enter_context(ckpt_lib.lock_workdir(workdir))  # one training per workdir, until this returns or raises
  checkpointer = ckpt_lib.Checkpointer.of_run(config, workdir)
  closing.callback(checkpointer.close)
  resume = train._check_resume(checkpointer, spec, cfg_dict)  # pylint: disable=protected-access
  if jax.process_index() == 0:
    if not resuming:
      data.save_run_tokenizer(tok, workdir)  # replaces one a start that never saved left
    config_lib.save_json(config, os.path.join(workdir, "config.json"))
  return checkpointer, resume


def run(config, workdir: str) -> dict:
  """SFT per `config` in `workdir`; returns the last train and eval (completion-token) metrics."""
  config_lib.check_command(config, "sft")
  # Ours: the shape and tokenizer of init_from (or of the run resumed) are adopted into it, which must not
  # carry over into the caller's next run of the same config (a notebook's, in another workdir).
  config = copy.deepcopy(config)
  metrics_lib.setup_logging()
  if config.train.objective != "clm":
    raise ConfigError("SFT trains with the causal LM loss; set train.objective=clm")
  # Everything a user can get wrong (init_from, the config, the data) is checked before the workdir is written.
  source = adopt_shape(config, workdir)
  config_lib.validate(config, jax.device_count())
  tok = adopt_tokenizer(config, workdir, source)
  rows = load_rows(config, tok)
  resuming = _resuming(workdir)

  mesh = sharding.make_mesh(config)
  batch_sharding = sharding.batch_sharding(mesh)
  tx = optim.make_optimizer(config)  # frozen per finetune.peft
  spec = train.state_spec(config, mesh, tx)  # the model with finetune.peft's parameters
  # Read now, so that a missing or damaged init_from checkpoint refuses the start before the workdir is made.
  pretrained = init_from_pretrained(config, spec, tx, config.init_from) if config.init_from and not resuming else None
  cfg_dict = config_lib.to_dict(config)
  files.makedirs(workdir)
  # Closed in reverse order, each even when one before it raised (a lock left held would refuse this
  # process's next run in the workdir as another's): pending saves land, then the workdir is unlocked.
  with contextlib.ExitStack() as closing:
    checkpointer, resume = enter_workdir(closing, config, cfg_dict, workdir, spec, tok, resuming)
    # Held-out rows go through as many at once as training's (train.grad_accum), as in pretraining:
    # a batch that fits only split must not run out of memory at the first eval.
    train_loader, eval_loader = make_loaders(config, tok, batch_sharding, rows,
                                             eval_batch_size=train.eval_batch_size(config))
    if resume is not None:
      state = train._restore(checkpointer, spec, resume[0], resume[1])  # pylint: disable=protected-access
      log.info("Resumed from step %d of %s", resume[0], checkpointer.directory)
    elif config.init_from:
      state = pretrained if pretrained is not None else init_from_pretrained(config, spec, tx, config.init_from)
    else:
      state = train.init_state(config, spec, tx)
      log.info("Started from scratch (no init_from)")
    trainable, total = peft.count(spec.abstract["params"], config_lib.peft_mode(config))
    log.info("SFT data: %d train rows, %d eval rows of %d tokens; peft=%s: %s of %s parameters trainable (%.2f%%)",
             train_loader.num_rows, eval_loader.num_rows if eval_loader else 0, config.data.seq_len,
             config_lib.peft_mode(config), f"{trainable:,}", f"{total:,}", 100.0 * trainable / total)

    meta = lambda step: {"config": cfg_dict, "data_position": step, "tokenizer": "hf"}
    with jax.set_mesh(mesh), nnx.logical_axis_rules(spec.rules):
      train_step, eval_step = train.compile_steps(config, spec, tx, batch_sharding)
      evaluate = None if eval_loader is None else (
          lambda params: train.evaluate(eval_step, params, eval_loader, eval_loader.num_batches))
      result = train.loop(
          config, state, (train_loader.global_batch(s) for s in itertools.count(int(state["step"]))), train_step,
          checkpointer=checkpointer, workdir=workdir, meta=meta, resumed=resume[1] if resume is not None else None,
          evaluate=evaluate,
          flops_per_token=train.flops_per_token(config),
          eval_message=lambda m: (f"eval completion loss {m['loss']:.4f}  ppl {m['perplexity']:.2f}  "
                                  f"acc {m['accuracy']:.3f}"))
  return result.summary()
