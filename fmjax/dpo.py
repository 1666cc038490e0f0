"""Direct Preference Optimization (DPO, Rafailov et al. 2023) of a GPT from an SFT or pretraining run.

  fmjax dpo --config=configs/dpo.py --config.init_from=workdirs/sft \
      --config.data.files=prefs.jsonl --workdir=workdirs/dpo

Each JSONL row is a preference pair `{"prompt": ..., "chosen": ..., "rejected": ...}` (`dpo.prompt_key`,
`chosen_key`, `rejected_key`): text, each reply written after its prompt as SFT writes a (prompt, completion)
row (`sft.encode_example`); or conversations, as Hugging Face preference datasets hold them: the prompt's
messages and each reply's (assistant) messages, or `chosen` and `rejected` alone, two whole conversations whose
shared first messages are the prompt. Conversations are written in the run's chat template as SFT writes them
(`sft.encode_conversation`). A sequence's trained tokens are its reply's (and the end of turn or EOS after it);
the prompt's, an assistant turn inside the prompt included, are not.

The loss of a pair, with r = beta * (log pi(y|x) - log pi_ref(y|x)) the reward of a reply y (its trained tokens'
log-probs summed) and m = r_chosen - r_rejected:

  -(1 - eps) * log sigmoid(m) - eps * log sigmoid(-m)      (eps = dpo.label_smoothing; 0: DPO's sigmoid loss)

The reference pi_ref is the model the run starts from: init_from's (under LoRA or adapters the same function,
since their update starts at 0). Its sequence log-probs depend on that model and the data alone, so they are
computed once, before the first update, by the same forward pass the policy takes (eval mode, sharded as
training is), and kept on the host beside the rows: training holds one copy of the weights. They are also
written to the workdir (`dpo_reference.npz`, with a fingerprint of the rows they score), so that a resume
and `fmjax eval` read them back, also after init_from has moved; without the file (or for other rows) they are
computed again from init_from: the same numbers (bit for bit on CPU).

Batches. Rows of data.seq_len tokens come in pairs: a row of chosen replies and, after it, a row of the rejected
replies of the same preference pairs, in the same order (segments 1, 2, ...; `dpo.pack=false`: one pair per row
pair). Pairs are packed greedily as SFT packs its rows, a pair going to a new row pair when either of its
sequences no longer fits. Segment ids keep the sequences of a row apart in attention, and a segment-sum of each
row's token log-probs gives every sequence's log-prob at once; segment k of a chosen row faces segment k of the
rejected row after it. A batch (`train.batch_size` rows) holds whole row pairs, drawn per epoch as SFT draws its
rows (`PairLoader`: a pure function of the seed and the step, so a resume is exact), and laid out so that each
of the `train.grad_accum` micro-batches holds whole row pairs. The step is `train.compile_steps`'s with `loss`:
its further totals (rewards/*, logps/*) are logged beside the loss. The loss needs each token's log-prob, so a
micro-batch's logits are made whole (`model.fused_loss_chunk` does not apply; `train.grad_accum` makes them
smaller).

Metrics (train/ and eval/, named as TRL names them): loss, rewards/chosen and rewards/rejected (the mean
rewards), rewards/accuracies (the share of pairs whose chosen reward is the larger), rewards/margins (their mean
difference), logps/chosen and logps/rejected (the policy's mean log-prob of each reply). `results.json` holds
the last ones when the run ends. The start order, PEFT, the model's shape and its tokenizer are SFT's
(`fmjax.sft`): the workdir is read by `fmjax generate` (`--chat` too), `eval`, `export` and `release` as an SFT
run's is.

Legend: N rows, B batch rows, T sequence, V vocabulary, S segments of a row (0: padding), P row pairs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import glob
import hashlib
import io
import itertools
import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from fmjax import attention, config_lib, files, metrics as metrics_lib, optim, peft, sharding
from fmjax import sft, train
from fmjax.config_lib import ConfigError
from fmjax.data import chat, sources

log = metrics_lib.log
REFERENCE_FILE = "dpo_reference.npz"  # in the workdir: the reference's sequence log-probs of each split's rows
_ROW_KEYS = ("inputs", "targets", "loss_weights", "segment_ids", "positions")  # what the reference scores


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Pair:
  """A preference pair: a prompt and two replies, all text or all messages (tuples of role and content)."""
  prompt: str | tuple[dict, ...]
  chosen: str | tuple[dict, ...]
  rejected: str | tuple[dict, ...]
  where: str = dataclasses.field(default="", compare=False)


def _kind(value) -> str:
  return "null" if value is None else f"a JSON {type(value).__name__}"


def _messages(value, field: str, where: str, *, reply: bool) -> tuple[dict, ...]:
  """A row's list of messages, checked (`chat.check_messages`): a reply's must hold an assistant message."""
  if (problem := chat.check_messages(value, needs_assistant=reply)) is not None:
    raise ConfigError(f"{where} {field!r} {problem}; fix the row or remove it (a reply is a list of messages "
                      "[{\"role\": \"assistant\", \"content\": ...}], a prompt the messages before it)")
  return tuple({"role": m["role"], "content": m["content"]} for m in value)


def _pair(row, where: str, prompt_key: str, chosen_key: str, rejected_key: str) -> Pair:
  """The `Pair` of one JSONL row; anything else is one line naming `where` (file:line)."""
  missing = [k for k in (chosen_key, rejected_key) if not isinstance(row, dict) or k not in row]
  if missing:
    have = sorted(row) if isinstance(row, dict) else _kind(row)
    raise ConfigError(f"{where} has no {' or '.join(map(repr, missing))} field (has {have}); set dpo.prompt_key / "
                      "dpo.chosen_key / dpo.rejected_key to the file's field names")
  prompt, chosen, rejected = row.get(prompt_key), row[chosen_key], row[rejected_key]
  if isinstance(chosen, str) and isinstance(rejected, str):
    if prompt is not None and not isinstance(prompt, str):
      raise ConfigError(f"{where} has {_kind(prompt)} in {prompt_key!r} beside text replies; write the prompt as "
                        "text, or the replies as lists of messages too")
    return Pair(prompt or "", chosen, rejected, where)
  if not (isinstance(chosen, list) and isinstance(rejected, list)):
    raise ConfigError(f"{where} has {_kind(chosen)} in {chosen_key!r} and {_kind(rejected)} in {rejected_key!r}; "
                      "write both replies as text, or both as lists of messages")
  if prompt is None:  # two whole conversations: the messages they share are the prompt
    whole = [_messages(v, k, where, reply=True) for v, k in ((chosen, chosen_key), (rejected, rejected_key))]
    n = next((i for i, (a, b) in enumerate(zip(*whole)) if a != b), min(map(len, whole)))
    prompt, (chosen, rejected) = whole[0][:n], (w[n:] for w in whole)
    for reply, k in ((chosen, chosen_key), (rejected, rejected_key)):
      if not any(m["role"] == "assistant" for m in reply):
        raise ConfigError(f"{where} {chosen_key!r} and {rejected_key!r} share their first {n} messages (the prompt), "
                          f"and {k!r} has no assistant message after them; a pair's replies must differ in what the "
                          "assistant writes")
    return Pair(prompt, chosen, rejected, where)
  if not isinstance(prompt, list):
    raise ConfigError(f"{where} has {_kind(prompt)} in {prompt_key!r} beside replies that are lists of messages; "
                      f"write the prompt as messages too ([{{\"role\": \"user\", \"content\": ...}}])")
  return Pair(_messages(prompt, prompt_key, where, reply=False), _messages(chosen, chosen_key, where, reply=True),
              _messages(rejected, rejected_key, where, reply=True), where)


def read_pairs(spec: str, prompt_key: str = "prompt", chosen_key: str = "chosen", rejected_key: str = "rejected", *,
               key: str = "data.files") -> list[Pair]:
  """The preference pairs of comma-separated JSONL paths or globs, in file order. `key` is the config key `spec`
  came from, which the error messages name."""
  paths = sorted({p for pattern in spec.split(",") if pattern.strip()
                  for p in glob.glob(os.path.expanduser(pattern.strip()))})
  if not paths:
    raise ConfigError(f"{key}={spec!r} matches no file; pass --config.{key}=PATH.jsonl (rows of {{\"{prompt_key}\": "
                      f"..., \"{chosen_key}\": ..., \"{rejected_key}\": ...}})")
  return [_pair(row, f"{path}:{line}", prompt_key, chosen_key, rejected_key)
          for path in paths for line, row in sources.jsonl_records(path)]


def encode_pair(tok, pair: Pair, template: str | None) -> tuple[tuple[list[int], list[int]], ...]:
  """((ids, trained) of the chosen sequence, of the rejected one): prompt then reply, trained 1 on the reply's
  tokens (and its end of turn or EOS), as SFT writes a (prompt, completion) row or a conversation."""
  if isinstance(pair.chosen, str):
    return tuple(sft.encode_example(tok, pair.prompt, reply) for reply in (pair.chosen, pair.rejected))
  return tuple(sft.encode_conversation(tok, sft.Conversation(pair.prompt + reply, pair.where), template,
                                       respond_from=len(pair.prompt)) for reply in (pair.chosen, pair.rejected))


def pack_pairs(encoded: list[tuple[tuple[list[int], list[int]], ...]], seq_len: int, *, pack: bool = True
               ) -> dict[str, np.ndarray]:
  """[N, T] rows (`sft.write_rows`) of encoded pairs: row 2p holds the chosen sequences of row pair p and row
  2p + 1 the rejected ones, each pair in the same segment of both. Pairs fill row pairs greedily, in order;
  a sequence longer than the row is cut at its end."""
  T = seq_len
  chosen_rows, rejected_rows = [], []
  used = (T, T)  # forces a new row pair for the first pair
  for chosen, rejected in encoded:
    n = (min(len(chosen[0]) - 1, T), min(len(rejected[0]) - 1, T))
    if not pack or used[0] + n[0] > T or used[1] + n[1] > T:
      chosen_rows.append([])
      rejected_rows.append([])
      used = (0, 0)
    chosen_rows[-1].append(chosen)
    rejected_rows[-1].append(rejected)
    used = (used[0] + n[0], used[1] + n[1])
  return sft.write_rows([row for both in zip(chosen_rows, rejected_rows) for row in both], T)


def _held_out(pair: Pair, percent: int) -> bool:
  """Whether the hash split holds `pair` out: by its text, so a pair stays on its side as the file changes."""
  return sources.text_hash(json.dumps([pair.prompt, pair.chosen, pair.rejected], ensure_ascii=False)) % 100 < percent


def load_rows(config, tok) -> dict[str, dict[str, np.ndarray] | None]:
  """Row pairs (`pack_pairs`) of the train and eval splits: eval is `dpo.eval_files`, else a hash split of
  data.files. A pair whose prompt leaves no token of a reply within data.seq_len is dropped, and counted."""
  d = config.dpo
  keys = dict(prompt_key=d.prompt_key, chosen_key=d.chosen_key, rejected_key=d.rejected_key)
  splits = sft.split_held_out(config, "dpo", lambda spec, **kw: read_pairs(spec, **keys, **kw), _held_out, "pair")
  if any(not isinstance(p.chosen, str) for p in itertools.chain(*splits.values())):
    sft._check_chat_template(tok, "dpo")  # pylint: disable=protected-access
  out = {}
  for split, pairs in splits.items():
    kept = sft.fitting(config, "dpo", split, [encode_pair(tok, p, tok.chat_template) for p in pairs],
                       ("pair", "pairs", "replies"))
    out[split] = pack_pairs(kept, config.data.seq_len, pack=d.pack) if kept else None
  return out


def num_pairs(rows: dict[str, np.ndarray] | None) -> int:
  """The preference pairs `pack_pairs` rows hold: the segments of the chosen rows."""
  return 0 if rows is None else int(rows["segment_ids"][0::2].max(axis=1).sum())


class PairLoader(sft.RowLoader):
  """`sft.RowLoader` over row pairs (rows 2p and 2p + 1, `pack_pairs`), which stay together.

  Train: batch s holds row pairs perm_e(g mod P) for g = s*B/2 + b, perm_e drawn from (seed, epoch e); eval:
  every row pair once in order, the last batch padded with rows that carry no loss. Row g of a batch lies in
  micro-batch g % accum at place g // accum (`train._micro_batches`), so the batch is laid out such that each
  micro-batch holds whole row pairs, chosen row first: micro-batch m holds the batch's row pairs m, m + accum, ...
  """

  def __init__(self, rows: dict[str, np.ndarray], batch_size: int, sharding, *, seed: int, shuffle: bool,
               accum: int = 1):
    super().__init__(rows, batch_size, sharding, seed=seed, shuffle=shuffle)
    self.accum, self.num_row_pairs = accum, self.num_rows // 2
    per = batch_size // 2
    self.num_batches = max(self.num_row_pairs // per, 1) if shuffle else -(-self.num_row_pairs // per)

  def dataset_rows(self, step: int) -> np.ndarray:
    """Row ids of this host's batch rows at `step` (-1 = padding)."""
    micro_b, place_b = self.rows_b % self.accum, self.rows_b // self.accum
    row_pair_b = self.draw(step * (self.batch_size // 2) + (place_b // 2) * self.accum + micro_b, self.num_row_pairs)
    return np.where(row_pair_b < 0, -1, 2 * row_pair_b + place_b % 2)


def make_loaders(config, rows, batch_sharding, eval_batch_size: int | None = None
                 ) -> tuple[PairLoader, PairLoader | None]:
  """Train and eval loaders over `load_rows`'s rows (eval: None when nothing is held out). The order is
  drawn from train.seed and data.seed, as SFT's; eval batches hold `eval_batch_size` rows (train.batch_size)."""
  seed = config.train.seed * 1_000_003 + config.data.seed
  train_loader = PairLoader(rows["train"], config.train.batch_size, batch_sharding, seed=seed, shuffle=True,
                            accum=config.train.grad_accum)
  eval_loader = (PairLoader(rows["eval"], eval_batch_size or config.train.batch_size, batch_sharding,
                            seed=config.data.seed, shuffle=False) if rows["eval"] is not None else None)
  return train_loader, eval_loader


# ----------------------------------------------------------------------------- loss


def sequence_logps(model, batch, num_segments: int, *, deterministic: bool = True, rngs=None) -> jax.Array:
  """[B, S] log-probs of each row's sequences: its trained tokens' log-probs, summed segment by segment."""
  logits_BTV = model(batch["inputs"], positions_BT=batch["positions"], segment_ids_BT=attention.packing_of(batch),
                     deterministic=deterministic, rngs=rngs).astype(jnp.float32)
  target_BT = jnp.take_along_axis(logits_BTV, batch["targets"][..., None], axis=-1)[..., 0]
  logp_BT = (target_BT - jax.nn.logsumexp(logits_BTV, axis=-1)) * batch["loss_weights"]
  return jax.vmap(functools.partial(jax.ops.segment_sum, num_segments=num_segments))(logp_BT, batch["segment_ids"])


def loss(model, batch, *, beta: float, label_smoothing: float = 0.0, deterministic: bool = True, rngs=None):
  """DPO's loss summed over the pairs of a batch of row pairs, with `train.make_train_step`'s aux: the pair
  count as weight_sum, the pairs whose chosen reward is the larger as correct_sum, and the rewards' and the
  policy's log-probs' totals. `batch["reference"]` holds the reference's [B, S] `sequence_logps`."""
  S = batch["reference"].shape[-1]
  policy_BS = sequence_logps(model, batch, S, deterministic=deterministic, rngs=rngs)
  # A segment is a sequence where it has a trained token (every kept one has): not padding, not a pad row.
  present_BS = jax.vmap(functools.partial(jax.ops.segment_sum, num_segments=S))(
      batch["loss_weights"], batch["segment_ids"]) > 0
  reward_BS = beta * (policy_BS - batch["reference"])

  def chosen_and_rejected(x_BS):
    x_PS = x_BS.reshape(-1, 2, S)  # a row pair: its chosen row, then its rejected row
    return x_PS[:, 0], x_PS[:, 1]

  (chosen_PS, rejected_PS), (policy_chosen_PS, policy_rejected_PS) = map(chosen_and_rejected, (reward_BS, policy_BS))
  pair_PS = chosen_and_rejected(present_BS)[0].astype(jnp.float32)
  margin_PS = chosen_PS - rejected_PS
  loss_PS = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(margin_PS) - label_smoothing * jax.nn.log_sigmoid(-margin_PS)
  total = lambda x_PS: jnp.sum(x_PS * pair_PS)
  aux = {"loss_sum": total(loss_PS), "weight_sum": jnp.sum(pair_PS), "correct_sum": total(margin_PS > 0),
         "rewards/chosen_sum": total(chosen_PS), "rewards/rejected_sum": total(rejected_PS),
         "rewards/margins_sum": total(margin_PS), "logps/chosen_sum": total(policy_chosen_PS),
         "logps/rejected_sum": total(policy_rejected_PS)}
  return aux["loss_sum"], aux


def loss_fn(config):
  """`loss` with the config's beta and label smoothing."""
  return functools.partial(loss, beta=float(config.dpo.beta), label_smoothing=float(config.dpo.label_smoothing))


def _metrics(totals: dict) -> dict:
  """The DPO metrics of a loss's aux totals: each a mean over the pairs."""
  w = max(float(totals["weight_sum"]), 1.0)
  return {"loss": float(totals["loss_sum"]) / w, "rewards/accuracies": float(totals["correct_sum"]) / w,
          **{k.removesuffix("_sum"): float(v) / w for k, v in totals.items() if k not in train._AUX_KEYS}}


def evaluate(eval_step, params, loader: PairLoader, num_batches: int | None = None) -> dict:
  """The DPO metrics of the first `num_batches` batches of `loader` (default: all), over all their pairs."""
  n = loader.num_batches if num_batches is None else min(num_batches, loader.num_batches)
  auxes = jax.device_get([eval_step(params, loader.global_batch(s)) for s in range(n)])  # queued, then read once
  return _metrics({k: sum(float(a[k]) for a in auxes) for k in auxes[0]})


def _dpo_names(train_step):
  """The train step with its `accuracy` (the chosen reward the larger) named as DPO's metrics are."""
  def step(state, batch):
    state, metrics = train_step(state, batch)
    metrics = dict(metrics)
    metrics["rewards/accuracies"] = metrics.pop("accuracy")
    return state, metrics
  return step


# ----------------------------------------------------------------------------- reference


def reference_logps(spec: train.StateSpec, params, rows: dict[str, np.ndarray], batch_sharding,
                    batch_size: int) -> np.ndarray:
  """[N, S] `sequence_logps` of every row under `params` (eval mode), in batches of `batch_size` rows sharded as
  training's micro-batches. Call under the mesh and its axis rules."""
  S = int(rows["segment_ids"].max()) + 1
  loader = PairLoader({k: rows[k] for k in _ROW_KEYS + ("token_types",)}, batch_size, batch_sharding, seed=0,
                      shuffle=False)
  score = jax.jit(lambda p, batch: sequence_logps(nnx.merge(spec.graphdef, p), batch, S),
                  in_shardings=(spec.shardings["params"], batch_sharding),
                  out_shardings=sharding.replicated(spec.mesh))
  out = jax.device_get([score(params, loader.global_batch(s)) for s in range(loader.num_batches)])
  return np.concatenate(out)[:loader.num_rows].astype(np.float32)


def _fingerprint(rows: dict[str, np.ndarray]) -> str:
  """What the reference's log-probs are of: the rows' tokens, trained tokens and segments."""
  h = hashlib.sha256()
  for k in _ROW_KEYS:
    h.update(np.ascontiguousarray(rows[k]).tobytes())
  return h.hexdigest()


def _read_reference(workdir: str, rows: dict) -> dict[str, np.ndarray]:
  """The saved reference log-probs of each split whose rows are those saved (by fingerprint)."""
  path = os.path.join(workdir, REFERENCE_FILE)
  if not files.exists(path):
    return {}
  try:
    with np.load(io.BytesIO(files.path(path).read_bytes()), allow_pickle=False) as saved:
      return {split: saved[split] for split, r in rows.items()
              if r is not None and split in saved and str(saved[f"{split}_fingerprint"]) == _fingerprint(r)}
  except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:  # damaged: computed again from init_from
    log.warning("%s is unreadable (%s): the reference log-probs are computed again", path, e)
    return {}


def _everywhere(ok: bool) -> bool:
  """Whether `ok` holds on every process (each decides alike whether to compute: computing is collective)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(ok))).all())


def _reference_params(config, spec: train.StateSpec, tx):
  """The params of the reference: the run's step 0, init_from's model (a LoRA or adapter run's factors at their
  start, where it computes init_from's function), else the fresh initialisation."""
  if not config.init_from:
    return train.init_state(config, spec, tx)["params"]
  if not files.isdir(os.path.join(config.init_from, "checkpoints")):
    raise ConfigError(f"the DPO reference (init_from={config.init_from!r}, the model the run started from) holds no "
                      f"checkpoints/, and this run's {REFERENCE_FILE} is missing or for other rows; restore init_from "
                      f"or the run's {REFERENCE_FILE}, or start a new --workdir")
  return sft.init_from_pretrained(config, spec, tx, config.init_from)["params"]


def attach_reference(config, rows: dict, workdir: str, spec: train.StateSpec, tx, batch_sharding, *,
                     params=None, save: bool = True) -> None:
  """Puts each split's reference log-probs into its rows (`rows[split]["reference"]`): `params`' (a new start's
  step 0), else the workdir's saved ones where they are of these rows, else computed from init_from. Writes
  them to the workdir (`save`, process 0). Call under the mesh and its axis rules."""
  splits = [s for s, r in rows.items() if r is not None]
  saved = {} if params is not None else _read_reference(workdir, rows)
  if not _everywhere(all(s in saved for s in splits)):
    if params is None:
      log.info("DPO reference: computing the log-probs of init_from=%s (or the initialisation)", config.init_from)
    params = _reference_params(config, spec, tx) if params is None else params
    b = train.eval_batch_size(config)  # as many rows at once as training's micro-batches
    saved = {s: reference_logps(spec, params, rows[s], batch_sharding, b) for s in splits}
    del params  # a resume's copy of init_from's model goes before its own state is read
    if save and jax.process_index() == 0:
      buffer = io.BytesIO()
      np.savez(buffer, **saved, **{f"{s}_fingerprint": np.asarray(_fingerprint(rows[s])) for s in splits})
      files.write_bytes(os.path.join(workdir, REFERENCE_FILE), buffer.getvalue())
  for s in splits:
    rows[s]["reference"] = saved[s]


# ----------------------------------------------------------------------------- loop


def run(config, workdir: str) -> dict:
  """DPO per `config` in `workdir`; returns the last train and eval metrics, and writes `results.json` once the
  run has reached train.steps."""
  from fmjax import finetune

  config_lib.check_command(config, "dpo")
  config = copy.deepcopy(config)  # ours: init_from's shape and tokenizer are adopted into it
  metrics_lib.setup_logging()
  if config.train.objective != "clm":
    raise ConfigError("DPO scores replies with the causal LM's log-probs; set train.objective=clm")
  # Everything a user can get wrong (init_from, the config, the data) is checked before the workdir is written.
  source = sft.adopt_shape(config, workdir)
  config_lib.validate(config, jax.device_count())
  tok = sft.adopt_tokenizer(config, workdir, source)
  rows = load_rows(config, tok)
  resuming = sft._resuming(workdir)  # pylint: disable=protected-access
  if config.model.fused_loss_chunk:
    log.info("model.fused_loss_chunk=%d does not apply to DPO, which needs each token's log-prob: a micro-batch's "
             "logits are made whole (train.grad_accum makes them smaller)", config.model.fused_loss_chunk)

  mesh = sharding.make_mesh(config)
  batch_sharding = sharding.batch_sharding(mesh)
  tx = optim.make_optimizer(config)  # frozen per finetune.peft
  spec = train.state_spec(config, mesh, tx)
  pretrained = (sft.init_from_pretrained(config, spec, tx, config.init_from) if config.init_from and not resuming
                else None)
  cfg_dict = config_lib.to_dict(config)
  files.makedirs(workdir)
  with contextlib.ExitStack() as closing:
    checkpointer, resume = sft.enter_workdir(closing, config, cfg_dict, workdir, spec, tok, resuming)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(spec.rules):
      if resume is not None:
        # The reference (saved, else init_from's model, read and dropped) before the run's own state is read.
        attach_reference(config, rows, workdir, spec, tx, batch_sharding)
        state = train._restore(checkpointer, spec, resume[0], resume[1])  # pylint: disable=protected-access
        log.info("Resumed from step %d of %s", resume[0], checkpointer.directory)
      else:
        if config.init_from:
          state = pretrained if pretrained is not None else sft.init_from_pretrained(config, spec, tx, config.init_from)
        else:
          state = train.init_state(config, spec, tx)
          log.info("Started from scratch (no init_from): the reference is the initialisation")
        attach_reference(config, rows, workdir, spec, tx, batch_sharding, params=state["params"])
      train_loader, eval_loader = make_loaders(config, rows, batch_sharding, train.eval_batch_size(config))
      trainable, total = peft.count(spec.abstract["params"], config_lib.peft_mode(config))
      log.info("DPO data: %d train pairs in %d row pairs, %d eval pairs, rows of %d tokens; beta=%g; peft=%s: %s of "
               "%s parameters trainable (%.2f%%)", num_pairs(rows["train"]), train_loader.num_row_pairs,
               num_pairs(rows["eval"]), config.data.seq_len, config.dpo.beta, config_lib.peft_mode(config),
               f"{trainable:,}", f"{total:,}", 100.0 * trainable / total)
      meta = lambda step: {"config": cfg_dict, "data_position": step, "tokenizer": "hf"}
      train_step, eval_step = train.compile_steps(config, spec, tx, batch_sharding, loss_fn(config))
      result = train.loop(
          config, state, (train_loader.global_batch(s) for s in itertools.count(int(state["step"]))),
          _dpo_names(train_step), checkpointer=checkpointer, workdir=workdir, meta=meta,
          resumed=resume[1] if resume is not None else None,
          evaluate=None if eval_loader is None else (lambda params: evaluate(eval_step, params, eval_loader)),
          flops_per_token=train.flops_per_token(config),
          eval_message=lambda m: (f"eval DPO loss {m['loss']:.4f}  reward accuracy {m['rewards/accuracies']:.3f}  "
                                  f"margin {m['rewards/margins']:.4f}"))
  summary = result.summary()
  if not result.preempted and jax.process_index() == 0:
    # A rerun of a finished run makes no update: its train metrics are those its last checkpoint saved.
    train_metrics = summary["train"] or (dict(resume[1].get("metrics") or {}) if resume is not None else {})
    files.write_json(os.path.join(workdir, finetune.RESULTS_FILE), {
        "eval": summary["eval"], "train": train_metrics, "step": summary["step"], "init_from": config.init_from,
        "init_from_step": config.init_from_step, "resumed_from": resume[0] if resume is not None else None,
        "beta": config.dpo.beta, "label_smoothing": config.dpo.label_smoothing, "peft": config_lib.peft_mode(config),
        "trainable_params": trainable, "total_params": total,
        "pairs": {"train": num_pairs(rows["train"]), "eval": num_pairs(rows["eval"])}}, indent=1)
  return summary


def eval_metrics(workdir: str, *, split: str = "eval", batches: int | None = None, step: int | None = None,
                 overrides=()) -> dict:
  """`fmjax eval` of a DPO workdir: the DPO metrics of its checkpoint (`step`, default the latest) on its
  held-out pairs (or `split="train"`), against the reference log-probs it trained with. `overrides`
  (`data.files=...`, `dpo.eval_files=...`) say where its files are now; `batches` counts batches of
  train.batch_size rows (default: the whole split)."""
  from fmjax import data, generate
  if split not in ("eval", "train"):
    raise ConfigError(f"--split must be 'eval' or 'train' for a DPO run, got {split!r}")
  if batches is not None and batches < 1:
    raise ConfigError(f"--batches must be at least 1, got {batches}")
  restored = generate.restore_run(workdir, step, split_batch=True)
  config, spec, params = restored.config, restored.spec, restored.params
  config_lib.apply_overrides(config, overrides)
  tok = data.get_tokenizer(config, workdir)  # the run's own, with the chat template its pairs were written in
  rows = load_rows(config, tok)
  if rows[split] is None:
    raise ConfigError(f"{workdir} has no held-out DPO pairs; set dpo.eval_files or dpo.eval_percent > 0, or pass "
                      "--split=train")
  rows = {split: rows[split]}
  batch_sharding = sharding.batch_sharding(spec.mesh)
  b, accum = train.eval_batch_size(config), config.train.grad_accum
  tx = optim.make_optimizer(config)
  with jax.set_mesh(spec.mesh), nnx.logical_axis_rules(spec.rules):
    # The reference's spec on this mesh: its own optimizer transform, which init_state's jit takes as static.
    attach_reference(config, rows, workdir, train.state_spec(config, spec.mesh, tx), tx, batch_sharding, save=False)
    loader = PairLoader(rows[split], b, batch_sharding, seed=config.data.seed, shuffle=False)
    eval_step = jax.jit(train.make_eval_step(config, spec.graphdef, loss_fn(config)),
                        in_shardings=(spec.shardings["params"], batch_sharding),
                        out_shardings=sharding.replicated(spec.mesh))
    n = loader.num_batches if batches is None else min(batches * accum, loader.num_batches)
    result = evaluate(eval_step, params, loader, n)
  return {"split": split, "scored": "preference pairs", "pairs": num_pairs(rows[split]), "batches": n,
          "batch_size": b, "seq_len": config.data.seq_len, "beta": config.dpo.beta, "step": restored.step, **result}
