"""Fine-tuning: a pretrained trunk plus a new head on a downstream task (full or PEFT).

  fmjax finetune --config=configs/finetune_cls.py:task=pydoc_family \
      --config.init_from=workdirs/bert_tiny --workdir=workdirs/ft

Reuses the pretraining pieces: `train.state_spec` / `init_state` / `compile_steps` with this
module's model (`Classifier`) and loss. Start order: resume this workdir's checkpoint, else
`init_from` (params of the trunk only, read by a partial restore, with a LoRA SFT run's LoRA
merged in; the head and any PEFT parameters are initialised), else from scratch; the log says
which and lists what was loaded and what was initialised.

Heads: BERT classifies or regresses from the pooled [CLS] vector (single sentences and
[CLS] a [SEP] b [SEP] pairs with token types); GPT from the hidden state of the last non-pad
token (a <eos> b <eos>).

Legend: B batch, N rows of a split, T sequence, D model, C outputs (classes, or 1 for regression).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fmjax import config_lib, files, metrics as metrics_lib, models, objectives, optim, peft, sharding, tasks, train
from fmjax.config_lib import ConfigError

log = metrics_lib.log
RESULTS_FILE = "results.json"
_RATE_KEYS = ("optim.lr",)  # what `summarize` picks the best of, per task and per other setting
# Pretraining-only parameters a classifier drops: GPT's output layer when untied (tied, it is the token
# embedding the trunk reads).
_PRETRAIN_HEADS = {"bert": ("mlm_transform", "mlm_ln", "mlm_bias"), "gpt": ("lm_head",)}


# ----------------------------------------------------------------------------- model


POOLINGS = {"bert": ("cls", "mean"), "gpt": ("last", "mean")}


def pooling_of(config) -> str:
  """`finetune.pooling` resolved: auto is cls for BERT (its pooler, as in BERT) and last for GPT."""
  family, pooling = config.model.family, config.finetune.get("pooling", "auto")
  if pooling == "auto":
    return POOLINGS[family][0]
  if pooling not in POOLINGS[family]:
    raise ConfigError(f"finetune.pooling={pooling!r} does not apply to {family}; use one of "
                      f"{['auto', *POOLINGS[family]]}")
  return pooling


class Classifier(nnx.Module):
  """`trunk` (GPT or BERT without its pretraining head) and a new linear `head` of C outputs.

  Pooling (`finetune.pooling`): cls = tanh(pooler(h[CLS])) as in BERT; last = the last non-pad
  token's hidden state (GPT); mean = the average over non-pad tokens. MLM trains neither [CLS]'s
  output nor the pooler, so a briefly pretrained BERT can transfer better through mean pooling.
  Rows may be padded on either side (segment id 0): positions count from each row's first real
  token and [CLS] is that token, so a left-padded row gives the logits of its right-padded twin.
  The head has a bias unless `finetune.head_bias` is false (GPT's default, as Hugging Face's
  GPT2ForSequenceClassification `score` has none, so the classifier exports); runs saved before
  the key existed had one.
  """

  def __init__(self, config, num_outputs: int, *, rngs: nnx.Rngs):
    m = config.model
    self.family = m.family
    self.pooling = pooling_of(config)
    self.dropout = float(m.dropout)
    self.trunk = models.build_model(m, rngs=rngs)
    for name in _PRETRAIN_HEADS[m.family] + (("pooler",) if m.family == "bert" and self.pooling != "cls" else ()):
      if hasattr(self.trunk, name):
        delattr(self.trunk, name)
    self.head = models.Dense((m.d_model,), (num_outputs,), ("embed", None), std=m.init_std, rngs=rngs,
                             use_bias=bool(config.finetune.get("head_bias", True)),
                             dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype))

  def __call__(self, tokens_BT, *, token_types_BT=None, segment_ids_BT=None, deterministic=True, rngs=None):
    """float32 logits_BC. segment_ids_BT: 1 on real tokens, 0 on padding (either side); None: no padding."""
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones(tokens_BT.shape, jnp.int32)
    real_BT = segment_ids_BT != 0
    index_T = jnp.arange(tokens_BT.shape[1])
    first_B = jnp.argmax(real_BT, axis=1)  # 0 for a row without a real token
    positions_BT = jnp.maximum(index_T[None] - first_B[:, None], 0)
    types = {"token_types_BT": token_types_BT} if self.family == "bert" else {}
    h_BTD = self.trunk.hidden(tokens_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
                              deterministic=deterministic, rngs=rngs, **types)
    if self.pooling == "cls":
      pooled_BD = self.trunk.pool(h_BTD, first_B)
    elif self.pooling == "last":
      last_B = jnp.max(jnp.where(real_BT, index_T[None], 0), axis=1)
      pooled_BD = jnp.take_along_axis(h_BTD, last_B[:, None, None], axis=1)[:, 0]
    else:
      w_BT1 = real_BT[..., None].astype(jnp.float32)
      pooled_BD = (jnp.sum(h_BTD.astype(jnp.float32) * w_BT1, axis=1)
                   / jnp.maximum(jnp.sum(w_BT1, axis=1), 1.0)).astype(h_BTD.dtype)
    key = None if deterministic or self.dropout == 0.0 else rngs.dropout()
    pooled_BD = models._dropout(pooled_BD, self.dropout, key, deterministic)
    return self.head(pooled_BD).astype(jnp.float32)


def model_factory(config, num_outputs: int):
  """Builds the classifier with its PEFT parameters; param init follows `train.seed`."""
  def make():
    rngs = nnx.Rngs(params=config.train.seed)
    with models.sharded_if_mesh():
      return peft.apply(Classifier(config, num_outputs, rngs=rngs), config.finetune, rngs)
  return make


def loss_fn(model, batch, *, deterministic=True, rngs=None, regression=False):
  """Summed cross-entropy (or squared error) over the weighted examples; train.py's aux layout."""
  logits_BC = model(batch["inputs"], token_types_BT=batch["token_types"], segment_ids_BT=batch["segment_ids"],
                    deterministic=deterministic, rngs=rngs)
  w_B = batch["weights"]
  if regression:
    loss = jnp.sum(jnp.square(logits_BC[:, 0] - batch["labels"]) * w_B)
    correct = jnp.zeros((), jnp.float32)
  else:
    loss, _, correct = objectives.cross_entropy(logits_BC, batch["labels"].astype(jnp.int32), w_B)
  return loss, {"loss_sum": loss, "weight_sum": jnp.sum(w_B), "correct_sum": correct}


# ----------------------------------------------------------------------------- data


def encode(examples: Sequence[tasks.Example], tok, family: str, seq_len: int) -> dict[str, np.ndarray]:
  """Token rows of the examples: BERT [CLS] a [SEP] (b [SEP]), GPT a <eos> (b <eos>); right-padded. A GPT whose
  tokenizer frames documents (Llama's <s> ... </s>) opens each row with its BOS: <s> a </s> (b </s>).

  Texts that don't fit lose tokens from their ends, as HF's `longest_first` truncation does (`_fit_lengths`).
  """
  n = len(examples)
  inputs = np.full((n, seq_len), tok.pad_id, np.int32)
  types = np.zeros((n, seq_len), np.int32)
  seg = np.zeros((n, seq_len), np.int32)
  num_texts = len(examples[0][0]) if n else 1
  pieces = [tok.encode_batch([ex[0][i] for ex in examples]) for i in range(num_texts)]
  sep = tok.sep_id if family == "bert" else tok.eos_id
  prefix = [tok.cls_id] if family == "bert" else [tok.bos_id] if tok.frames_documents else []
  budget = seq_len - len(prefix) - num_texts
  for r in range(n):
    parts = [list(p[r]) for p in pieces]
    parts = [part[:keep] for part, keep in zip(parts, _fit_lengths([len(part) for part in parts], budget))]
    ids, tt = list(prefix), [0] * len(prefix)
    for i, part in enumerate(parts):
      ids += part + [sep]
      tt += [i] * (len(part) + 1)
    inputs[r, :len(ids)], types[r, :len(ids)], seg[r, :len(ids)] = ids, tt, 1
  labels = np.array([y for _, y in examples], np.float32)
  return {"inputs": inputs, "token_types": types, "segment_ids": seg, "labels": labels,
          "weights": np.ones((n,), np.float32)}


def _fit_lengths(lengths: list[int], budget: int) -> list[int]:
  """How many tokens each of one or two texts keeps within `budget`, as HF's `longest_first` truncation
  (the exported tokenizer's) decides: a pair keeps its shorter text whole when the longer one can shrink
  to the rest of the budget; else each keeps half, and an odd budget's extra token goes to the text that
  was longer (the second, when they were equal).
  """
  if sum(lengths) <= budget:
    return list(lengths)
  if len(lengths) == 1:
    return [budget]
  n_a, n_b = lengths
  short = min(n_a, n_b)
  if 2 * short > budget:
    short = budget // 2
  long = budget - short
  return [long, short] if n_a > n_b else [short, long]


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Example ids of step `step`'s batch: epochs of seeded permutations, a pure function of (seed, step)."""
  pos = step * batch_size + np.arange(batch_size)
  epochs, within = pos // n, pos % n
  out = np.empty(batch_size, np.int64)
  for e in np.unique(epochs):
    perm = np.random.default_rng([seed, int(e)]).permutation(n)
    out[epochs == e] = perm[within[epochs == e]]
  return out


def _to_device(host: dict, batch_sharding) -> dict:
  # Every host holds the whole (small) task in memory: each takes its own shards of the global batch.
  return {k: jax.make_array_from_callback(v.shape, batch_sharding, lambda idx, v=v: v[idx]) for k, v in host.items()}


def _eval_batches(rows: dict, batch_size: int):
  """Fixed-size batches over all rows; the last is padded with weight-0 rows."""
  n = len(rows["labels"])
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    valid = idx < n
    batch = {k: v[np.minimum(idx, n - 1)] for k, v in rows.items()}
    batch["weights"] = batch["weights"] * valid
    yield batch, int(valid.sum())


# ----------------------------------------------------------------------------- init_from


def _checkpoint_dir(path: str) -> str:
  sub = os.path.join(path, "checkpoints")
  return sub if files.isdir(sub) else path


def is_classifier_run(saved_config) -> bool:
  """Whether a workdir's config.json is a `fmjax finetune` run's: params {trunk, head}, no LM head."""
  return "task" in saved_config and "finetune" in saved_config


def _saved_config(init_from: str) -> dict | None:
  """init_from's config.json, its tokenizer path resolved against init_from (a run's own tokenizer/)."""
  from fmjax import data
  saved = files.read_json(os.path.join(init_from, "config.json"))
  return data.resolve_tokenizer_path(saved, init_from) if saved is not None else None


def adopt_pretrain_settings(config, init_from: str, *, resumed: str = "") -> list[str]:
  """Checks that init_from holds this model and takes its tokenizer settings; returns what changed.

  Raises ConfigError for a fine-tuning workdir and CheckpointMismatchError (one line) for a
  checkpoint of another family or size. `resumed`: the workdir of a run to resume, whose config.json
  holds what init_from gave it when it started: taken from there, it needs init_from no more.
  """
  from fmjax import data
  from fmjax.checkpoint import adopt_model_settings, check_same_model
  if resumed:
    init_from = resumed
  elif not files.isdir(init_from):
    raise ConfigError(f"init_from={init_from!r} does not exist; pass the --workdir of a `fmjax train` run")
  saved = _saved_config(init_from)
  if saved is None:
    return []
  if is_classifier_run(saved) and not resumed:
    raise ConfigError(f"init_from={init_from} is a `fmjax finetune` (classifier) workdir; pass the --workdir of a "
                      "pretraining (`fmjax train`) or `fmjax sft` run, whose language model holds the trunk to load")
  check_same_model(saved, config.model, init_from)
  changed = adopt_model_settings(config, saved, f"init_from={init_from}")
  with config.unlocked():
    for key in data.CORPUS_KEYS:  # init_from's tokenizer: the ids its trunk knows
      if key in saved.get("data", {}) and saved["data"][key] != config.data[key]:
        changed.append(f"data.{key}={saved['data'][key]!r}")
        config.data[key] = saved["data"][key]
    for key, value in saved.get("data", {}).get("tokenizer", {}).items():
      if key in config.data.tokenizer and value != config.data.tokenizer[key]:
        changed.append(f"data.tokenizer.{key}={value!r}")
        config.data.tokenizer[key] = value
    # The tokenizer the run saved (train keeps it in its workdir) is its ids exactly; rebuilt from
    # the corpus settings it could differ, once those files changed.
    own = files.absolute(os.path.join(init_from, data.RUN_TOKENIZER))  # absolute, or in a bucket
    if config.data.tokenizer.kind != "hf" and files.exists(os.path.join(own, "tokenizer.json")):
      vocab = data.load_hf(own).vocab_size
      config.data.tokenizer.update(kind="hf", path=own, vocab_size=vocab)
      changed.append(f"data.tokenizer=hf:{own}")
  return changed


def _run_tokenizer(config, workdir: str, resuming: bool):
  """The run's tokenizer, kept in `workdir/tokenizer` (`run` saves it), so that the run's eval, export
  and release do not depend on where init_from's workdir is. A run that started before fine-tuning
  runs kept one goes on reading the tokenizer its config names."""
  from fmjax import data
  own = os.path.join(workdir, data.RUN_TOKENIZER)
  if resuming and files.exists(os.path.join(own, "tokenizer.json")):
    tok = data.load_tokenizer(own)
  else:  # a new run (one a failed start left a tokenizer for: this start's settings win, and replace it)
    tok = data.get_tokenizer(config)
    if resuming:
      return tok
  config.data.tokenizer.update(kind="hf", path=data.RUN_TOKENIZER, vocab_size=tok.vocab_size)
  return tok


def _tree_get(tree: dict, keys: tuple):
  for k in keys:
    tree = tree[k]
  return tree


def _trunk_paths(config) -> set[tuple[str, ...]]:
  """Parameter paths of the bare pretrained model (the ones a pretraining checkpoint holds)."""
  abstract = nnx.to_pure_dict(nnx.state(models.abstract_model(config.model), nnx.Param))
  return {tuple(map(str, p)) for p in _flat_keys(abstract)}


def _flat_keys(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flat_keys(v, prefix + (k,))
  else:
    yield prefix


def _subtree(tree: dict, keep, prefix: tuple = ()) -> dict:
  """The nested dict of leaves whose key paths satisfy `keep` (empty branches dropped)."""
  out = {}
  for k, v in tree.items():
    path = prefix + (k,)
    if isinstance(v, dict):
      sub = _subtree(v, keep, path)
      if sub:
        out[k] = sub
    elif keep(path):
      out[k] = v
  return out


def _summary(tree: dict) -> str:
  """`embeddings (5 arrays, 295,424 params), encoder (...)` for the top-level groups of `tree`."""
  parts = []
  for k, v in tree.items():
    leaves = jax.tree.leaves(v)
    parts.append(f"{k} ({len(leaves)} arrays, {sum(int(np.prod(x.shape)) for x in leaves):,} params)")
  return ", ".join(parts)


TRUNK = ("trunk",)  # where the pretrained model sits in a classifier's params (SFT's model is all of them: ())


def _trunk_abstract(config, spec: train.StateSpec, root: tuple = TRUNK) -> dict:
  """The abstract params under `root` that a pretraining checkpoint holds: no head, no PEFT parameters."""
  base = _trunk_paths(config)
  return _subtree(_tree_get(spec.abstract["params"], root), lambda p: tuple(map(str, p)) in base)


def source_step(config, spec: train.StateSpec, init_from: str) -> int:
  """The init_from step to load (newest, or `init_from_step`), checked against the trunk.

  Reads only checkpoint metadata, so a run can refuse a bad init_from before touching its workdir.
  """
  from fmjax import checkpoint as ckpt_lib
  checkpointer = ckpt_lib.Checkpointer(_checkpoint_dir(init_from))
  try:
    step = checkpointer.source_step(config.get("init_from_step", 0), init_from)
    ckpt_lib.check_compatible(checkpointer, step, {"params": _trunk_abstract(config, spec)}, items=("params",),
                              partial=True)
  finally:
    checkpointer.close()
  return step


def _source_lora(checkpointer, step: int, init_from: str) -> ml_collections.ConfigDict | None:
  """The finetune settings of a LoRA fine-tune's checkpoint (an SFT run's), whose factors merge into its
  kernels as the trunk loads; None for any other. An adapter fine-tune's adapters fold into no weight: refused."""
  saved = checkpointer.restore_meta(step).get("config") or {}
  mode = config_lib.peft_mode(saved)
  if mode == "adapter":
    raise ConfigError(f"init_from={init_from} was fine-tuned with finetune.peft=adapter, whose adapters fold into "
                      "no weight of the model; train it further by resuming that run (its own --workdir)")
  return ml_collections.ConfigDict(saved["finetune"]) if mode == "lora" else None


def _lora_abstract(config, ft, mesh) -> dict:
  """The LoRA factors (replicated: they are small) that a LoRA fine-tune with settings `ft` saved beside the kernels."""
  def make():
    rngs = nnx.Rngs(0)
    with models.sharded_if_mesh():
      return peft.apply(models.build_model(config.model, rngs=rngs), ft, rngs)
  factors = _subtree(train.params_of(nnx.eval_shape(make)), lambda p: str(p[-1]) in peft.LORA_LEAVES)
  repl = sharding.replicated(mesh)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), factors)


def _union(a: dict, b: dict) -> dict:
  """The leaves of two nested dicts together."""
  out = dict(a)
  for k, v in b.items():
    out[k] = _union(out[k], v) if isinstance(v, dict) and k in out else v
  return out


def load_trunk(config, spec: train.StateSpec, state: dict, init_from: str, step: int | None = None,
               root: tuple = TRUNK) -> dict:
  """Reads the trunk's parameters from init_from's checkpoint (`step`, else `source_step`) into `state`
  under `root`; a LoRA fine-tune's factors are merged into its kernels first (`peft.merge_lora`)."""
  from fmjax import checkpoint as ckpt_lib
  checkpointer = ckpt_lib.Checkpointer(_checkpoint_dir(init_from))
  try:
    if step is None:
      step = checkpointer.source_step(config.get("init_from_step", 0), init_from)
    base = _trunk_paths(config)
    abstract = _trunk_abstract(config, spec, root)
    lora = _source_lora(checkpointer, step, init_from)
    wanted = abstract if lora is None else _union(abstract, _lora_abstract(config, lora, spec.mesh))
    with jax.set_mesh(spec.mesh):
      loaded = checkpointer.restore(step, {"params": wanted}, items=("params",), partial=True)["params"]
      if lora is not None:
        loaded = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding),
                              peft.merge_lora(loaded, lora.lora_alpha, lora.lora_rank), abstract)
    saved_top = set(checkpointer.item_metadata(step, "params"))
  finally:
    checkpointer.close()
  params = state["params"]
  trunk = _tree_get(params, root)
  for path in _flat_keys(loaded):
    *parents, leaf = path
    _tree_get(trunk, tuple(parents))[leaf] = _tree_get(loaded, path)
  new = _subtree(params, lambda p: not (p[:len(root)] == root and tuple(map(str, p[len(root):])) in base))
  skipped = sorted(saved_top - set(loaded))
  merged = f", its LoRA (rank {lora.lora_rank}) merged into the kernels" if lora is not None else ""
  log.info("init_from %s step %d: loaded %s%s%s", init_from, step, "trunk " if root else "", _summary(loaded), merged)
  if new:
    log.info("initialised: %s", _summary(new))
  log.info("not loaded: %s", ", ".join(skipped + ["opt_state"]))
  return state


# ----------------------------------------------------------------------------- run


def setup(config, task: tasks.Task, mesh):
  """(tx, spec) of the classifier for `task` on `mesh`."""
  make = model_factory(config, task.num_outputs)
  tx = optim.make_optimizer(config)  # frozen per finetune.peft
  return tx, train.state_spec(config, mesh, tx, make), make


def make_predict(spec: train.StateSpec, batch_sharding):
  """jitted (params, batch) -> float32 logits_BC, replicated."""
  def predict(params, batch):
    model = nnx.merge(spec.graphdef, params)
    return model(batch["inputs"], token_types_BT=batch["token_types"], segment_ids_BT=batch["segment_ids"])
  return jax.jit(predict, in_shardings=(spec.shardings["params"], batch_sharding),
                 out_shardings=sharding.replicated(spec.mesh))


def predict_all(predict, params, rows: dict, batch_size: int, batch_sharding) -> np.ndarray:
  """float32 logits_NC for every row, in order."""
  out = [np.asarray(jax.device_get(predict(params, _to_device(batch, batch_sharding))))[:n]
         for batch, n in _eval_batches(rows, batch_size)]
  return np.concatenate(out)


def task_metrics(task: tasks.Task, logits_NC: np.ndarray, labels_N: np.ndarray) -> dict:
  """The task's metrics of the logits, plus `loss` (cross-entropy, or squared error for regression)."""
  if task.is_regression:
    preds = logits_NC[:, 0]
    loss = float(np.mean((preds - labels_N) ** 2))
  else:
    preds = logits_NC.argmax(-1)
    z = logits_NC - logits_NC.max(-1, keepdims=True)
    logp_NC = z - np.log(np.exp(z).sum(-1, keepdims=True))
    loss = float(-np.mean(logp_NC[np.arange(len(labels_N)), labels_N.astype(np.int64)]))
  return {**tasks.compute_metrics(task.metrics, preds, labels_N, task.positive), "loss": loss}


def _eval(predict, params, rows, task, config, batch_sharding) -> dict:
  logits_NC = predict_all(predict, params, rows, train.eval_batch_size(config), batch_sharding)
  return task_metrics(task, logits_NC, rows["labels"])


# What results.json and every checkpoint's metadata say about where the weights began.
_ORIGIN_KEYS = ("start", "init_from", "init_from_step")


def _origin(saved_meta: dict) -> dict:
  """How a resumed run began (init_from or scratch), from its checkpoint's metadata."""
  if "start" in saved_meta:
    return {k: saved_meta[k] for k in _ORIGIN_KEYS if k in saved_meta}
  # Checkpoints written before the origin was recorded: a run with init_from began from it.
  init_from = saved_meta.get("config", {}).get("init_from", "")
  return {"start": "init_from", "init_from": init_from} if init_from else {"start": "scratch"}


def _without_accuracy(train_step):
  """The train step without its `accuracy` metric, which means nothing for a regression head."""
  def step(state, batch):
    state, metrics = train_step(state, batch)
    return state, {k: v for k, v in metrics.items() if k != "accuracy"}
  return step


def run(config, workdir: str) -> dict:
  """Fine-tunes per `config` in `workdir`; returns `{"eval", "train", "step", "start", "task", ...}`.

  Also writes `workdir/results.json` with the final task metrics (what sweeps aggregate). `start`
  (with `init_from`, `init_from_step`) says where the weights began and stays so when a rerun
  resumes the run; `resumed_from` is the step this call resumed from (None: it started the run).
  Everything that can refuse a new run (init_from, task, tokenizer) is checked before the
  workdir is created, and config.json is written only once the start succeeded. An SFT config
  (configs/sft.py) runs `sft.run`, as `fmjax sft` does, and a DPO config (configs/dpo.py) `dpo.run`.
  """
  from fmjax import checkpoint as ckpt_lib, data

  config_lib.check_command(config, "finetune")
  if config_lib.command_of(config) == "sft":  # fine-tuning covers SFT too: `fmjax sft` is the same run
    from fmjax import sft
    return sft.run(config, workdir)
  if config_lib.command_of(config) == "dpo":  # and preference tuning: `fmjax dpo`
    from fmjax import dpo
    return dpo.run(config, workdir)
  metrics_lib.setup_logging()
  config_lib.validate(config, jax.device_count())
  config = ml_collections.ConfigDict(config.to_dict())  # our own copy: init_from may set tokenizer keys
  init_from = config.init_from
  # A workdir with checkpoints resumes them and needs no init_from checkpoint; a new one checks it now. Its
  # config.json has the settings init_from gave it, so the same command resumes it once init_from has moved.
  resuming = bool(ckpt_lib.saved_steps(os.path.join(workdir, "checkpoints")))
  own = resuming and files.exists(os.path.join(workdir, "config.json"))
  adopted = adopt_pretrain_settings(config, init_from, resumed=workdir if own else "") if init_from else []
  task = tasks.load_task(config)
  mesh = sharding.make_mesh(config)
  batch_sharding = sharding.batch_sharding(mesh)
  tx, spec, make = setup(config, task, mesh)
  init_step = source_step(config, spec, init_from) if init_from and not resuming else None
  tok = _run_tokenizer(config, workdir, resuming)
  if tok.vocab_size > config.model.vocab_size:
    raise ConfigError(f"the tokenizer has {tok.vocab_size} ids but model.vocab_size={config.model.vocab_size}")
  trainable, total = peft.count(spec.abstract["params"], config.finetune.peft)
  log.info("task %s: %d train / %d validation examples, %s; peft=%s: %s of %s parameters trainable (%.2f%%)",
           task.name, len(task.splits["train"]), len(task.splits["validation"]),
           "regression" if task.is_regression else f"{task.num_classes} classes" + (
               f" (F1 of {task.f1_positive_label!r})" if task.f1_positive_label else ""),
           config.finetune.peft,
           f"{trainable:,}", f"{total:,}", 100.0 * trainable / total)
  cfg_dict = config_lib.to_dict(config)

  def fresh_start() -> tuple[dict, dict]:
    state = train.init_state(config, spec, tx, make)
    if not init_from:
      log.info("Started from scratch: random trunk and head (no init_from)")
      return state, {"start": "scratch"}
    if adopted:
      log.info("settings from init_from: %s", ", ".join(adopted))
    step = source_step(config, spec, init_from) if init_step is None else init_step
    return load_trunk(config, spec, state, init_from, step), {"start": "init_from", "init_from": init_from,
                                                              "init_from_step": step}

  # A new run reads init_from's arrays now: a damaged checkpoint refuses the start before the workdir is made.
  fresh = None if resuming else fresh_start()
  files.makedirs(workdir)
  # Closed in reverse order, each even when one before it raised (a lock left held would refuse this
  # process's next run in the workdir as another's): pending saves land, then the workdir is unlocked.
  with contextlib.ExitStack() as closing:
    closing.enter_context(ckpt_lib.lock_workdir(workdir))  # one training per workdir, until this returns or raises
    checkpointer = ckpt_lib.Checkpointer.of_run(config, workdir)
    closing.callback(checkpointer.close)
    resume = train._check_resume(checkpointer, spec, cfg_dict)
    if resume is not None:
      state, origin = train._restore(checkpointer, spec, resume[0], resume[1]), _origin(resume[1])
      log.info("Resumed from step %d of %s", resume[0], checkpointer.directory)
    else:
      state, origin = fresh if fresh is not None else fresh_start()
    if jax.process_index() == 0:
      if config.data.tokenizer.path == data.RUN_TOKENIZER:
        data.save_run_tokenizer(tok, workdir)
      config_lib.save_json(config, os.path.join(workdir, "config.json"))
    also = [s for s in task.splits if s.startswith("validation_")]  # more dev sets, e.g. MNLI's mismatched
    rows = {s: encode(task.splits[s], tok, config.model.family, config.data.seq_len)
            for s in ("train", "validation", *also)}

    def evaluate(params) -> dict:
      """The task's metrics on its validation split, and on each further dev set with its name as suffix."""
      m = _eval(predict, params, rows["validation"], task, config, batch_sharding)
      for split in also:
        more = _eval(predict, params, rows[split], task, config, batch_sharding)
        m.update({f"{k}_{split.removeprefix('validation_')}": v for k, v in more.items() if k != "loss"})
      return m

    n_train = len(rows["train"]["labels"])
    seed = config.train.seed * 1_000_003 + config.data.seed
    batches = (_to_device({k: v[batch_indices(n_train, config.train.batch_size, seed, step)]
                           for k, v in rows["train"].items()}, batch_sharding)
               for step in itertools.count(int(state["step"])))
    # The class names travel with the weights: an export names the classifier's outputs by them.
    meta = lambda step: {"config": cfg_dict, "task": task.name, "label_names": list(task.label_names), **origin}
    with jax.set_mesh(mesh), nnx.logical_axis_rules(spec.rules):
      loss = lambda *a, **k: loss_fn(*a, regression=task.is_regression, **k)
      train_step, _ = train.compile_steps(config, spec, tx, batch_sharding, loss)
      if task.is_regression:
        train_step = _without_accuracy(train_step)
      predict = make_predict(spec, batch_sharding)
      looped = train.loop(
          config, state, batches, train_step, checkpointer=checkpointer, workdir=workdir, meta=meta,
          resumed=resume[1] if resume is not None else None,
          evaluate=evaluate,
          eval_message=lambda m: f"{task.name} " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()))
  # A rerun of a finished run makes no update: its train metrics are those its last checkpoint saved.
  train_metrics = looped.train or (dict(resume[1].get("metrics") or {}) if resume is not None else {})
  if task.is_regression:
    train_metrics.pop("accuracy", None)  # checkpoints saved before it was dropped
  result = {"task": task.name, "label_names": list(task.label_names), "main_metric": task.main_metric,
            **({"f1_positive_label": task.f1_positive_label} if task.f1_positive_label else {}),
            "eval": looped.eval, "train": train_metrics,
            "step": int(looped.state["step"]), **origin, "resumed_from": resume[0] if resume is not None else None,
            "peft": config.finetune.peft, "trainable_params": trainable, "total_params": total,
            "preempted": looped.preempted}
  if looped.preempted:
    return result  # results.json marks a finished run; rerunning the same command resumes this one
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, RESULTS_FILE), result, indent=1)
  return result


def _finetune_config(workdir: str, overrides: Sequence[str] = ()):
  """(config, task) of a finetune workdir, from its config.json; `overrides` (`task.files=...`) say where
  its task files are now."""
  from fmjax import data
  path = os.path.join(workdir, "config.json")
  saved = files.read_json(path)
  if saved is None:
    raise ConfigError(f"{workdir} has no config.json; pass the --workdir of a `fmjax finetune` run")
  config = ml_collections.ConfigDict(data.resolve_tokenizer_path(config_lib.check_saved(saved, path), workdir))
  if not is_classifier_run(config):
    raise ConfigError(f"{workdir} is not a `fmjax finetune` workdir (its config.json has no task/finetune); "
                      "pass the --workdir of a `fmjax finetune` run")
  config.mesh.update(dcn_data=1, data=-1, fsdp=1, tensor=1)
  config_lib.apply_overrides(config, overrides)
  return config, tasks.load_task(config)


def _restore_classifier(workdir: str, config, task, step: int | None):
  """(spec, params, step): the classifier's params of `step` (default: the latest) of a finetune workdir."""
  from fmjax import checkpoint as ckpt_lib
  # `evaluate` feeds training's micro-batches: data parallel over the most devices that split them.
  mesh = sharding.make_mesh(config, sharding.devices_splitting(train.eval_batch_size(config)))
  _, spec, _ = setup(config, task, mesh)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise ConfigError(f"{workdir} holds no checkpoint yet; run `fmjax finetune` there first")
    with jax.set_mesh(mesh):
      params = checkpointer.restore(step, spec.abstract, items=("params",))["params"]
  finally:
    checkpointer.close()
  return spec, params, step


def load_finetuned(workdir: str, step: int | None = None):
  """(model, config, task) of a finetune workdir: the classifier with the params of `step` or the latest."""
  config, task = _finetune_config(workdir)
  spec, params, _ = _restore_classifier(workdir, config, task, step)
  return nnx.merge(spec.graphdef, params), config, task


def evaluate(workdir: str, split: str = "validation", step: int | None = None, batches: int | None = None,
             overrides: Sequence[str] = ()) -> dict:
  """Task metrics of a finetune workdir's checkpoint on `split` (what `fmjax eval` reports).

  `split` is a task split ("eval" means validation); `batches` scores only the first that many
  batches of train.batch_size examples, in order (default: the whole split), as `fmjax eval`
  does for pretraining runs; they go through as training's micro-batches (train.grad_accum).
  `overrides` (`task.files=...`, `task.validation_files=...`) point at the task's files where
  they moved; their classes must be the ones the run learned.
  """
  from fmjax import data, interop
  config, task = _finetune_config(workdir, overrides)
  if overrides:
    learned = interop.run_config_at(workdir, step)[2].get("label_names")
    if learned and list(learned) != list(task.label_names):
      raise ConfigError(f"the task files given have the classes {list(task.label_names)}, and {workdir} learned "
                        f"{list(learned)}; point --config.task.files at the data the run was trained on")
  split = "validation" if split == "eval" else split
  if split not in task.splits:
    raise ConfigError(f"task {task.name} of {workdir} has no split {split!r}; pass --split= one of "
                      f"{sorted(task.splits)} (eval means validation)")
  if batches is not None and batches < 1:
    raise ConfigError(f"--batches must be at least 1, got {batches}")
  examples = task.splits[split]
  num_batches = -(-len(examples) // config.train.batch_size)
  batches = num_batches if batches is None else min(int(batches), num_batches)
  examples = examples[:batches * config.train.batch_size]
  spec, params, step = _restore_classifier(workdir, config, task, step)
  rows = encode(examples, data.get_tokenizer(config), config.model.family, config.data.seq_len)
  batch_sharding = sharding.batch_sharding(spec.mesh)
  # The jitted step of training's evals, under its mesh and axis rules: on several TPU devices splash
  # attention runs per shard only there (called eagerly, its Mosaic kernel cannot be partitioned).
  with jax.set_mesh(spec.mesh), nnx.logical_axis_rules(spec.rules):
    logits = predict_all(make_predict(spec, batch_sharding), params, rows, train.eval_batch_size(config),
                         batch_sharding)
  return {"step": step, "batches": batches, "examples": len(examples), **task_metrics(task, logits, rows["labels"])}


# ----------------------------------------------------------------------------- sweeps


def _config_without_task(arg) -> str:
  """A sweep entry's `config` arg less its task: `task=sst2,peft=lora` -> `peft=lora` (empty: the task alone)."""
  flags, kv = config_lib.parse_arg(str(arg))
  return ",".join(flags + [f"{k}={v}" for k, v in kv.items() if k != "task"])


def summarize(root: str, runs: Sequence) -> dict:
  """Mean ± std over seeds of each task's metrics per setting, and the best learning rate per task.

  Reads `results.json` of every run under `root`; writes `finetune.md` and `finetune.csv` there.
  Papers report GLUE this way: the best rate on validation, mean ± std over seeds at that rate.
  When a sweep varies more than the rate (e.g. pretrained vs random trunk), the best rate is
  chosen separately for each value of the other keys, so every arm gets its own tuned rate.
  """
  from fmjax import sweep
  groups: dict[tuple, list[dict]] = {}  # (task, arm: the settings other than the rate, setting) -> results
  for run in runs:
    name, entry = (run.name, dict(run.entry)) if hasattr(run, "entry") else (run["name"], run["entry"])
    result = files.read_json(os.path.join(root, name, RESULTS_FILE))
    if result is None:
      continue
    # A `config` arg's task= is the row's task; its other args (peft=, model=, size=) are settings to compare.
    fixed = {k: _config_without_task(v) if k == "config" else v for k, v in entry.items()
             if not sweep.is_seed_key(k) and k not in ("command", "task.name")}
    fixed = {k: v for k, v in fixed.items() if k != "config" or v}
    arm = sweep.run_name({k: v for k, v in fixed.items() if k not in _RATE_KEYS})
    groups.setdefault((result["task"], arm, sweep.run_name(fixed)), []).append(result)
  rows = []
  for (task, arm, setting), results in sorted(groups.items()):
    names = list(results[0]["eval"].keys() - {"loss"})
    main = results[0]["main_metric"]
    names = [main] + sorted(n for n in names if n != main)
    stats = {n: sweep.mean_std([r["eval"].get(n, math.nan) for r in results]) for n in names}
    rows.append({"task": task, "setting": setting, "arm": arm, "seeds": len(results), "main": main, "stats": stats})
  best = {}  # (task, arm) -> the row of its best rate
  for row in rows:
    key = (row["task"], row["arm"])
    if key not in best or row["stats"][row["main"]][0] > best[key]["stats"][row["main"]][0]:
      best[key] = row
  fmt = lambda ms: f"{100 * ms[0]:.1f}" + ("" if math.isnan(ms[1]) else f" ± {100 * ms[1]:.1f}")
  lines = ["| task | metric | best setting | seeds | score (x100, mean ± std) |", "|---|---|---|---|---|"]
  for (task, _), row in best.items():
    metrics = "/".join(row["stats"])
    score = " / ".join(fmt(row["stats"][n]) for n in row["stats"])
    lines.append(f"| {task} | {metrics} | {row['setting']} | {row['seeds']} | {score} |")
  lines += ["", "| task | setting | seeds | " + "metric (x100, mean ± std) |", "|---|---|---|---|"]
  lines += [f"| {r['task']} | {r['setting']} | {r['seeds']} | " +
            ", ".join(f"{n} {fmt(ms)}" for n, ms in r["stats"].items()) + " |" for r in rows]
  markdown = "\n".join(lines)
  with open(os.path.join(root, "finetune.md"), "w") as f:
    f.write(markdown + "\n")
  with open(os.path.join(root, "finetune.csv"), "w") as f:
    f.write("task,setting,seeds,metric,mean,std,best\n")
    for r in rows:
      for n, (mean, std) in r["stats"].items():
        f.write(f"{r['task']},\"{r['setting']}\",{r['seeds']},{n},{mean},{std},"
                f"{int(best[(r['task'], r['arm'])] is r)}\n")
  return {"rows": rows, "best": best, "markdown": markdown,
          "paths": [os.path.join(root, "finetune.md"), os.path.join(root, "finetune.csv")]}
