"""Sampling from GPT with a KV cache, and fill-mask with BERT, from a run's workdir.

  fmjax generate --workdir=W --prompt="The for statement" [--prompt=...] [--prompt_file=F] [--max_new_tokens=64]
                 [--temperature=0.8 --top_k=40 --top_p=0.95 --seed=0]      # GPT; temperature 0 = greedy
  fmjax generate --workdir=W --prompt="What does the with statement do?" --chat  # GPT: a reply, in the chat template
  fmjax generate --workdir=W --text="The [MASK] statement is used to ..."  # BERT fill-mask

Generation is one jitted call: a prefill over the left-padded prompts fills the cache, then a
`lax.while_loop` decodes one token per step until `max_new_tokens` or every row has emitted EOS
(or, with `--chat`, the template's end of turn: `<|eot_id|>`, `<|im_end|>`).
Left padding has segment id 0, so a prompt's continuation never depends on the other prompts.

Legend: B batch, P prompt (padded), N new tokens, T sequence, V vocabulary, M masked positions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
import os
import re
from functools import partial, reduce
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fmjax import config_lib, files
from fmjax.config_lib import ConfigError


@dataclasses.dataclass
class RestoredRun:
  """A workdir's config, train-state spec (graph, shardings, mesh) and one step's params."""
  config: ml_collections.ConfigDict
  spec: Any
  params: dict
  step: int


def restore_run(workdir: str, step: int | None = None, *, split_batch: bool = False) -> RestoredRun:
  """Params of `step` (default: the latest) of a workdir written by `fmjax train` or `fmjax sft`.

  The mesh is pure data parallelism over the devices; with `split_batch` it uses the most devices
  that split the run's held-out batches (`train.eval_batch_size`) evenly, so any device count can
  evaluate any run.
  """
  from fmjax import checkpoint as ckpt_lib, data, finetune, optim, sharding, train
  path = os.path.join(workdir, "config.json")
  saved = files.read_json(path)
  if saved is None:
    raise ConfigError(f"{workdir} has no config.json; pass the --workdir of a finished `fmjax train` run")
  if not isinstance(saved, dict) or "model" not in saved or "train" not in saved:
    raise ConfigError(f"{path} is not the config of an fmjax run; pass the --workdir of `fmjax train`")
  config = ml_collections.ConfigDict(data.resolve_tokenizer_path(config_lib.check_saved(saved, path), workdir))
  if finetune.is_classifier_run(config):
    raise ConfigError(f"{workdir} is a `fmjax finetune` (classifier) workdir, which has no language-model head; "
                      "pass the --workdir of a pretraining (`fmjax train`) or `fmjax sft` run "
                      "(`fmjax eval` scores a classifier)")
  devices = sharding.devices_splitting(train.eval_batch_size(config)) if split_batch else jax.devices()
  config.mesh.update(dcn_data=1, data=-1, fsdp=1, tensor=1)
  no_checkpoint = ConfigError(f"{workdir} holds no checkpoint yet; train first or pass another --workdir")
  if not files.isdir(os.path.join(workdir, "checkpoints")):  # a reader makes nothing in the run's workdir
    raise no_checkpoint
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise no_checkpoint
    mesh = sharding.make_mesh(config, devices)
    spec = train.state_spec(config, mesh, optim.make_optimizer(config))
    ckpt_lib.check_compatible(checkpointer, step, spec.abstract, items=("params",))
    with jax.set_mesh(mesh):
      params = checkpointer.restore(step, spec.abstract, items=("params",))["params"]
  finally:
    checkpointer.close()
  return RestoredRun(config, spec, params, step)


def load_run(workdir: str, step: int | None = None):
  """(model, config, tokenizer) from a workdir written by `fmjax train`; params of `step` or the latest."""
  return _load(workdir, step)[:3]


def _load(workdir: str, step: int | None):
  """`load_run`'s (model, config, tokenizer), and the step read."""
  from fmjax import data
  run_ = restore_run(workdir, step)
  model = nnx.merge(run_.spec.graphdef, run_.params)
  return model, run_.config, data.get_tokenizer(run_.config, workdir), run_.step


@contextlib.contextmanager
def on_mesh(model, config):
  """The mesh the model's params lie on and the run's axis rules: where its train step traced. On several TPU
  devices splash attention runs per shard only there (XLA cannot partition its Mosaic kernel)."""
  from fmjax import sharding
  mesh = getattr(jax.tree.leaves(nnx.state(model, nnx.Param))[0].sharding, "mesh", None)
  if mesh is None:  # params on one device, not a mesh: nothing to partition
    yield
    return
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.logical_rules(config)):
    yield


# ----------------------------------------------------------------------------- sampling


def mask_vocab(logits_BV: jax.Array, vocab_size: int | None) -> jax.Array:
  """Logits with -inf at ids >= `vocab_size` (static): rows the model has beyond its tokenizer's ids.

  model.vocab_size is padded (GPT-2's 50257 ids in 50304 rows), and a trained tokenizer can come
  out smaller than asked; those rows have no token to decode to, so neither sampling nor fill-mask
  may pick them.
  """
  if vocab_size is None or vocab_size >= logits_BV.shape[-1]:
    return logits_BV
  return jnp.where(jnp.arange(logits_BV.shape[-1]) < vocab_size, logits_BV, -jnp.inf)


def mask_logits(logits_BV: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Logits with -inf outside the top-k and outside the nucleus (smallest set with mass >= top_p).

  The most likely token always stays; ties at the cut-off stay too.
  """
  logits_BV = logits_BV.astype(jnp.float32)
  if top_k and top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # A sorted token is in the nucleus while the mass strictly before it is < top_p.
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    cutoff_idx_B1 = jnp.sum(before_BV < top_p, axis=-1, keepdims=True) - 1
    cutoff_B1 = jnp.take_along_axis(sorted_BV, cutoff_idx_B1, axis=-1)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return logits_BV


def sample_logits(logits_BV: jax.Array, key: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, vocab_size: int | None = None) -> jax.Array:
  """Next ids [B]: argmax when temperature is 0, else a draw from the tempered, filtered softmax.

  Only ids below `vocab_size` (the tokenizer's; default: every row) are candidates. Row b draws
  with fold_in(key, b), so its sample does not depend on the other rows' logits or on the batch size.
  """
  logits_BV = mask_vocab(logits_BV, vocab_size)
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = mask_logits(logits_BV.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p)
  keys_B = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(logits_BV.shape[0]))
  return jax.vmap(jax.random.categorical)(keys_B, logits_BV).astype(jnp.int32)


def _stops(ids_B: jax.Array, stop_ids: tuple[int, ...]) -> jax.Array:
  """Whether each id is one of `stop_ids` (static: one comparison per id, none for none)."""
  return reduce(operator.or_, (ids_B == i for i in stop_ids), jnp.zeros(ids_B.shape, bool))


@partial(nnx.jit, static_argnames=("max_new_tokens", "temperature", "top_k", "top_p", "stop_ids", "vocab_size"))
def _generate_cached(model, tokens_BP, segment_ids_BP, positions_BP, key, *, max_new_tokens, temperature,
                     top_k, top_p, stop_ids, vocab_size):
  B, P = tokens_BP.shape
  sample = partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=vocab_size)
  cache = model.init_cache(B, P + max_new_tokens)
  logits_BPV, cache = model.decode(tokens_BP, cache, positions_BT=positions_BP, segment_ids_BT=segment_ids_BP)
  next_B = sample(logits_BPV[:, -1], jax.random.fold_in(key, 0))
  out_BN = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(next_B)
  done_B = _stops(next_B, stop_ids)

  def cond(carry):
    i, done_B = carry[0], carry[5]
    return (i < max_new_tokens) & ~jnp.all(done_B)

  # The params ride in the loop carry and the body rebuilds the module from them: NNX transforms
  # inside the model (nnx.scan over layers) refuse Variables captured from an outer trace.
  graphdef, state = nnx.split(model)

  def body(carry):
    i, next_B, pos_B, cache, out_BN, done_B, state = carry
    logits_B1V, cache = nnx.merge(graphdef, state).decode(next_B[:, None], cache, positions_BT=pos_B[:, None])
    next_B = sample(logits_B1V[:, 0], jax.random.fold_in(key, i))
    out_BN = out_BN.at[:, i].set(next_B)
    if stop_ids:
      done_B = done_B | _stops(next_B, stop_ids)
    return i + 1, next_B, pos_B + 1, cache, out_BN, done_B, state

  carry = (jnp.asarray(1, jnp.int32), next_B, positions_BP[:, -1] + 1, cache, out_BN, done_B, state)
  return jax.lax.while_loop(cond, body, carry)[4]


def generate(model, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | Sequence[int] | None = None,
             max_len: int | None = None, vocab_size: int | None = None) -> list[list[int]]:
  """Continues each prompt (token ids) by up to `max_new_tokens`, cut before the first EOS.

  `eos_id` may be several ids, each of which ends a row (a chat template's end of turn beside EOS).

  Prompts of different lengths are batched with left padding; the KV cache holds the longest
  prompt plus `max_new_tokens`. `max_len` defaults to model.max_len (the learned position table's
  rows; with rotary positions, the setting). New ids are below `vocab_size` (pass the tokenizer's;
  default: any row of the model's vocabulary).
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ConfigError("every prompt needs at least one token")
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
  if not 0.0 <= temperature < float("inf") or not 0.0 < top_p <= 1.0 or top_k < 0:  # nan fails both ranges
    raise ConfigError(f"need a finite temperature >= 0, 0 < top_p <= 1 and top_k >= 0; got "
                      f"temperature={temperature}, top_p={top_p}, top_k={top_k}")
  config_lib.check_seed("--seed", seed)  # past 64 bits JAX's key fails in an OverflowError
  max_len = model.max_len if max_len is None else max_len
  b, longest = len(prompts), max(len(p) for p in prompts)
  if longest >= max_len:  # no --max_new_tokens would leave room
    raise ConfigError(f"the prompt is {longest} tokens, and the model was trained on {max_len} positions: shorten "
                      f"it to at most {max_len - 1} tokens, to leave room for the new ones")
  if longest + max_new_tokens > max_len:
    raise ConfigError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds {max_len}, the "
                      f"positions the model was trained on; lower --max_new_tokens to {max_len - longest} or "
                      "shorten the prompt")
  tokens = np.zeros((b, longest), np.int32)
  segments = np.zeros((b, longest), np.int32)  # 0 = left padding, which no real token attends
  positions = np.zeros((b, longest), np.int32)
  for i, p in enumerate(prompts):
    pad = longest - len(p)
    tokens[i, pad:] = p
    segments[i, pad:] = 1
    positions[i, pad:] = np.arange(len(p))
  stop_ids = () if eos_id is None else tuple(sorted({int(i) for i in np.atleast_1d(eos_id)}))
  out = _generate_cached(model, jnp.asarray(tokens), jnp.asarray(segments), jnp.asarray(positions),
                         jax.random.key(seed), max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                         top_k=int(top_k), top_p=float(top_p), stop_ids=stop_ids,
                         vocab_size=None if vocab_size is None else int(vocab_size))
  results = []
  for row in np.asarray(out).tolist():
    ends = [row.index(i) for i in stop_ids if i in row]
    results.append(row[:min(ends)] if ends else row)
  return results


@partial(nnx.jit, static_argnames=("vocab_size",))
def _mlm_logits(model, tokens_BT, mlm_positions_BM, vocab_size):
  return mask_vocab(model(tokens_BT, mlm_positions_BM=mlm_positions_BM), vocab_size)


def fill_mask(model, tokenizer, text: str, *, top_k: int = 5,
              max_len: int | None = None) -> list[list[tuple[str, float]]]:
  """For each `[MASK]` in `text`, the top-k (token, probability) predictions of a BERT, over the tokenizer's ids.

  `max_len` (default: the position table) is the longest input, [CLS] and [SEP] included.
  """
  pieces = re.split(re.escape("[MASK]"), text, flags=re.IGNORECASE)  # [mask] as well
  if len(pieces) < 2:
    raise ConfigError("fill-mask text needs at least one [MASK]")
  ids = [tokenizer.cls_id]
  mask_positions = []
  for i, piece in enumerate(pieces):
    if piece.strip():
      ids += tokenizer.encode(piece.strip())
    if i < len(pieces) - 1:
      mask_positions.append(len(ids))
      ids.append(tokenizer.mask_id)
  ids.append(tokenizer.sep_id)
  max_len = int(model.embeddings.position_embeddings.embedding.shape[0]) if max_len is None else max_len
  if len(ids) > max_len:
    raise ConfigError(f"the text is {len(ids)} tokens with [CLS] and [SEP], longer than {max_len}, the positions the "
                      "model was trained on; shorten it")
  tokens_1T = jnp.asarray([ids], jnp.int32)
  logits_1MV = _mlm_logits(model, tokens_1T, jnp.asarray([mask_positions], jnp.int32),
                           vocab_size=int(tokenizer.vocab_size))
  probs_MV = np.asarray(jax.nn.softmax(logits_1MV[0], axis=-1))
  results = []
  for row in probs_MV:
    best = np.argsort(-row)[:min(top_k, tokenizer.vocab_size)]
    results.append([(tokenizer.decode([int(t)]).strip(), float(row[t])) for t in best])
  return results


# ----------------------------------------------------------------------------- entry points


_SAMPLING = {"max_new_tokens": 64, "temperature": 1.0, "top_p": 1.0, "seed": 0}  # GPT only; None: not given


def run(workdir: str, *, prompts: list[str] = (), text: str = "", max_new_tokens: int | None = None,
        temperature: float | None = None, top_k: int = 0, top_p: float | None = None, seed: int | None = None,
        step: int | None = None, chat: bool = False) -> list:
  """`fmjax generate` as a function: completions (str) for GPT prompts, or fill-mask predictions for BERT.

  The sampling settings (`_SAMPLING` gives their defaults) are GPT's; fill-mask refuses them. With `chat`,
  each prompt is a user's message in the run's chat template (`fmjax.data.chat`: the tokenizer's own, else
  the built-in one) followed by the template's generation prompt, and a reply also ends at the template's
  end of turn where that is one special token (`<|eot_id|>`, `<|im_end|>`).
  """
  given = {k: v for k, v in dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 seed=seed).items() if v is not None}
  model, config, tok, step_read = _load(workdir, step)
  family = config.model.family
  if family == "gpt":
    if text or not prompts:
      raise ConfigError(f"{workdir} holds a GPT: pass --prompt=TEXT (repeatable); --text is for BERT fill-mask")
    sampling = {**_SAMPLING, **given}
    stop = [tok.eos_id]
    if chat:
      from fmjax.data import chat as chat_lib
      template = chat_lib.template_of(tok)
      if tok.chat_template is None and "sft" not in config and "dpo" not in config:
        # As transformers' apply_chat_template refuses such a tokenizer: a base model never saw this template.
        logging.getLogger("fmjax").warning(
            "%s has no chat template and was not tuned on conversations: --chat asks in fmjax's built-in plain-text "
            "one (User: / Assistant: lines), which this model never saw; tune it on conversations first (`fmjax "
            "sft`, or sft.chat_template), or prompt without --chat", workdir)
      # The template writes the BOS it wants (the built-in one: the tokenizer's), as in SFT's rows.
      ids = [chat_lib.encode_prompt(tok, p, template) for p in prompts]
      stop.append(chat_lib.end_of_turn_id(tok, template))
    else:
      # Every prompt opens a document as training does (with the tokenizer's BOS, else the EOS that separates
      # documents).
      ids = [tok.encode_opening(p) for p in prompts]
    outs = generate(model, ids, sampling.pop("max_new_tokens"), top_k=top_k, **sampling,
                    eos_id=[i for i in stop if i is not None], max_len=trained_positions(config, workdir),
                    vocab_size=tok.vocab_size)
    return [tok.decode(o) for o in outs]
  if chat:
    raise ConfigError(f"{workdir} holds a BERT, which has no chat; --chat is for a GPT (an SFT run)")
  if prompts or not text:
    raise ConfigError(f"{workdir} holds a BERT: pass --text=\"... [MASK] ...\"; --prompt is for GPT sampling")
  if given:
    raise ConfigError(f"{workdir} holds a BERT, whose fill-mask shows the most likely words: "
                      f"{', '.join('--' + k for k in given)} are for GPT sampling; drop them (--top_k sets how many)")
  if top_k < 0:
    raise ConfigError(f"--top_k={top_k}: give how many predictions to show per [MASK] (default 5)")
  _warn_untrained_mlm_head(workdir, step_read)
  with on_mesh(model, config):  # a text of 128 tokens takes splash on a TPU
    return fill_mask(model, tok, text, top_k=top_k or 5, max_len=trained_positions(config, workdir))


def _warn_untrained_mlm_head(workdir: str, step: int) -> None:
  """A BERT imported without its MLM head (a `BertModel`) predicts at random until trained: say so
  rather than print its guesses as if they meant something."""
  from fmjax import interop
  info = files.read_json(os.path.join(workdir, interop.IMPORT_INFO))
  fresh = [n.split(":")[0] for n in (info or {}).get("notes", []) if str(n).endswith("freshly initialised")
           and str(n).split(":")[0] in ("mlm_transform", "mlm_ln", "mlm_bias")]
  if fresh and step == 0:  # the imported step: nothing trained the head since
    logging.getLogger("fmjax").warning(
        "%s was imported without its masked-LM head (%s initialised at random, not trained since): fill-mask "
        "predictions are guesses; train the head first (`fmjax train --config=configs/bert.py:SIZE "
        "--config.init_from=%s --workdir=NEW`)", workdir, ", ".join(fresh), workdir)


def trained_positions(config, workdir: str, _seen: frozenset = frozenset()) -> int:
  """How many positions a run's training used: its rows of data.seq_len, within the position table.

  The table's rows past them (`configs/gpt.py:tiny` has 256 for rows of 128) keep their initial
  values, so neither sampling nor fill-mask reaches them. An imported model was trained on its
  whole table. A language model that started from another run (`init_from`: continued pretraining,
  SFT) learnt that run's positions first, so shorter rows here do not untrain them (SFT of an
  imported GPT-2 on rows of 512 still knows all 1024). A classifier's count stays its own rows:
  its exported tokenizer truncates there, as fine-tuning and `fmjax eval` did.
  """
  from fmjax import finetune, interop
  max_len = int(config.model.max_len)
  if files.exists(os.path.join(workdir, interop.IMPORT_INFO)):
    return max_len
  own = min(max_len, int(config.data.seq_len))
  source = str(config.get("init_from") or "")
  seen = _seen | {files.absolute(workdir)}
  if (own >= max_len or not source or finetune.is_classifier_run(config) or files.absolute(source) in seen
      or not files.exists(os.path.join(source, "config.json"))):
    return own  # an init_from that moved away: only this run's own rows are known
  try:
    before = interop.read_run_config(source)
  except ConfigError:
    return own
  return max(own, min(max_len, trained_positions(before, source, seen)))


def cli(argv: list[str]) -> int:
  """`fmjax generate --workdir=W (--prompt=TEXT ... [--chat] | --text="... [MASK] ...") [sampling flags]`."""
  from fmjax.cli import ArgumentParser
  p = ArgumentParser(prog="fmjax generate")
  p.add_argument("--workdir", required=True, help="a `fmjax train`, `sft`, `dpo` or `import-hf` workdir")
  p.add_argument("--prompt", action="append", default=[], help="GPT prompt; repeat for a batch")
  p.add_argument("--prompt_file", default="", help="GPT prompts, one a line (blank lines skipped), after any --prompt")
  p.add_argument("--chat", action="store_true", help="GPT: each prompt is a user's message in the run's chat "
                 "template, answered in the assistant's turn (stops at the template's end of turn)")
  p.add_argument("--text", default="", help="BERT fill-mask text with one or more [MASK]")
  p.add_argument("--max_new_tokens", type=int, default=None, help="GPT (default 64)")
  p.add_argument("--temperature", type=float, default=None, help="GPT: 0 = greedy (default 1)")
  p.add_argument("--top_k", type=int, default=0, help="GPT: keep the k most likely tokens (0 = all); "
                 "BERT: predictions shown per [MASK] (default 5)")
  p.add_argument("--top_p", type=float, default=None, help="GPT: nucleus sampling mass (default 1 = off)")
  p.add_argument("--seed", type=int, default=None, help="GPT sampling (default 0)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  args = p.parse_args(argv)
  if args.prompt_file:
    if not files.exists(args.prompt_file) or files.isdir(args.prompt_file):
      raise ConfigError(f"--prompt_file={args.prompt_file} is not a file; give a text file of prompts, one a line")
    try:
      text = files.read_text(args.prompt_file)
    except UnicodeDecodeError:
      from fmjax.data import sources
      raise sources.not_utf8(files.local_copy(args.prompt_file)) from None
    args.prompt += [line.rstrip("\n") for line in text.splitlines() if line.strip()]
    if not args.prompt:
      raise ConfigError(f"--prompt_file={args.prompt_file} holds no prompt (one a line)")
  results = run(args.workdir, prompts=args.prompt, text=args.text, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, step=args.step,
                chat=args.chat)
  if args.prompt:
    for prompt, completion in zip(args.prompt, results):
      print(f"{prompt}\n{completion}" if args.chat else f"{prompt}{completion}")  # a reply, or a continuation
      print("-" * 40)
  else:
    for cands in results:
      print("[MASK] -> " + ", ".join(f"{w!r} {prob:.2g}" for w, prob in cands))
  return 0
