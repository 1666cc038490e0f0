"""Pretraining: one loop for masked LM (BERT) and causal LM (GPT).

The state is a plain pytree `{"step", "params", "opt_state"}` (and "loss_scale" in float16)
with `params` a nested dict of arrays; the model's structure lives in a static `graphdef`.
`train_step` is one pure function, jitted once with explicit shardings and with the state donated. The loop
dispatches step n before reading step n-1's metrics, so the device never waits on logging.

Start order: resume this workdir's checkpoint, else `init_from` a pretrained checkpoint,
else from scratch; the log says which.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import re
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import optax
from flax import nnx
from jax.experimental import multihost_utils

from fmjax import config_lib, files, metrics as metrics_lib, objectives, optim, sharding
from fmjax.config_lib import ConfigError

log = metrics_lib.log


_TOKENIZER_ID = re.compile(r"[0-9a-f]{16}")  # Tokenizer.identity() in checkpoint meta (older runs: a class name)


MAX_SKIPPED_IN_A_ROW = 10  # under nan_policy=skip, this many non-finite updates in a row stop the run

# Dynamic loss scaling, for model.dtype=float16 (whose largest value is 65504). The backward pass
# differentiates the loss, taken as a mean over the micro-batch's positions, times the scale: small
# gradients keep their digits and large ones overflow. An update whose gradients overflow while its
# loss is finite is skipped and the scale halved; after LOSS_SCALE_GROWTH finite updates in a row
# it doubles. At LOSS_SCALE_MIN the overflow is the gradient's own, and `train.nan_policy` applies.
LOSS_SCALE_INIT = 2.0 ** 15
LOSS_SCALE_GROWTH = 2000
LOSS_SCALE_MIN, LOSS_SCALE_MAX = 1.0, 2.0 ** 24


class NonFiniteLossError(RuntimeError):
  """Raised under nan_policy=abort; the message names the step and the last good checkpoint."""


# ----------------------------------------------------------------------------- state


def model_factory(config) -> Callable[[], nnx.Module]:
  """A function that builds the config's model, initialised from `train.seed`, with the PEFT parameters
  of its `finetune.peft` (SFT): every reader of a run's config.json rebuilds the model it trained."""
  from fmjax import models, peft  # local: models is the heaviest import and tests patch configs first

  def make():
    rngs = nnx.Rngs(params=config.train.seed)
    model = models.build_model(config.model, rngs=rngs)
    if config_lib.peft_mode(config) == "none":
      return model
    with models.sharded_if_mesh():  # after the model's own parameters: those draw the keys they always did
      return peft.apply(model, config.finetune, rngs)
  return make


def params_of(model: nnx.Module) -> dict:
  """A model's parameters as a nested dict of arrays."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@dataclasses.dataclass
class StateSpec:
  """What is needed to run the step on a mesh: the graph, abstract state and its shardings."""
  graphdef: Any
  abstract: Any
  shardings: Any
  mesh: jax.sharding.Mesh
  rules: tuple


def state_spec(config, mesh, tx, make_model: Callable[[], nnx.Module] | None = None) -> StateSpec:
  """Shapes and shardings of the train state, derived without allocating it."""
  make_model = make_model or model_factory(config)
  rules = sharding.logical_rules(config)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract_model = nnx.eval_shape(make_model)
    graphdef, abstract_vars = nnx.split(abstract_model, nnx.Param)
    param_shardings = nnx.to_pure_dict(nnx.get_named_sharding(abstract_vars, mesh))
  abstract_params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                                 nnx.to_pure_dict(abstract_vars))
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  repl = sharding.replicated(mesh)
  # Frozen parameters (optim.make_optimizer(trainable=...)) hold a MaskedNode, no array, in the state.
  masked = lambda x: isinstance(x, optax.MaskedNode)
  opt_shardings = optax.tree_map_params(
      tx, lambda p, s: p if masked(p) else s, abstract_opt, param_shardings,
      transform_non_params=lambda _: repl, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding) or masked(x))
  shardings = {"step": repl, "params": param_shardings, "opt_state": opt_shardings}
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params, "opt_state": abstract_opt}
  if scales_loss(config):
    shardings["loss_scale"] = {k: repl for k in _LOSS_SCALE_START}
    abstract["loss_scale"] = {k: jax.ShapeDtypeStruct((), v.dtype) for k, v in _LOSS_SCALE_START.items()}
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return StateSpec(graphdef, abstract, shardings, mesh, rules)


def init_state(config, spec: StateSpec, tx, make_model: Callable[[], nnx.Module] | None = None) -> dict:
  """Creates the state already sharded: each device only ever holds its own shards."""
  make_model = make_model or model_factory(config)

  def create():
    params = params_of(make_model())
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  with jax.set_mesh(spec.mesh), nnx.logical_axis_rules(spec.rules):
    state = jax.jit(create, out_shardings={k: v for k, v in spec.shardings.items() if k != "loss_scale"})()
  return with_loss_scale(state, spec)


def scales_loss(config) -> bool:
  """Whether the train step scales its loss (float16 compute): its state then holds "loss_scale"."""
  return config.model.dtype == "float16"


_LOSS_SCALE_START = {"scale": np.float32(LOSS_SCALE_INIT), "finite_in_a_row": np.int32(0), "skipped": np.int32(0)}


def with_loss_scale(state: dict, spec: StateSpec, saved: Mapping | None = None) -> dict:
  """`state` with the loss scale `spec` asks for: as a checkpoint's meta recorded it (`saved`), else
  fresh (a new run, or a resume in float16 of a run saved in another dtype)."""
  if "loss_scale" not in spec.shardings:
    return state
  values = {k: np.asarray((saved or {}).get(k, v), v.dtype) for k, v in _LOSS_SCALE_START.items()}
  return {**state, "loss_scale": jax.device_put(values, spec.shardings["loss_scale"])}


# ----------------------------------------------------------------------------- steps


def _micro_batches(batch: dict, accum: int) -> dict:
  """[B, ...] -> [accum, B/accum, ...], taking rows strided so every micro-batch spans all devices."""
  def split(x):
    x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def _updates_applied(opt_state, step):
  """The optimizer's own update count, which its schedule reads: a skipped (non-finite) update
  leaves it as it was, as optax does, so after skips it trails `step`."""
  counts = [v for path, v in jax.tree_util.tree_leaves_with_path(opt_state)
            if getattr(path[-1], "name", None) == "count"]
  return counts[0] if counts else step


def make_train_step(config, graphdef, tx, loss_fn: Callable | None = None):
  """Returns the pure `train_step(state, batch) -> (state, metrics)`.

  `loss_fn(model, batch, deterministic=, rngs=) -> (loss_sum, aux)` sums over the batch; aux holds loss_sum,
  weight_sum (what the loss is a mean over) and correct_sum, and may hold further `NAME_sum` totals, logged
  as NAME (their sum over the batch divided by weight_sum), as DPO's rewards are.
  """
  loss_fn = loss_fn or objectives.get_loss_fn(config)
  accum = config.train.grad_accum
  deterministic = config.model.dropout == 0.0 and config.model.get("attention_dropout", 0.0) == 0.0
  schedule = optim.make_schedule(config.optim, config.train.steps)
  skip_nonfinite = config.train.nan_policy == "skip"
  base_key = jax.random.key(config.train.seed + 1)
  peft_mode = config_lib.peft_mode(config)
  scaled = scales_loss(config)

  def micro_grads(params, micro_batch, key, scale):
    def f(p):
      model = nnx.merge(graphdef, p)
      rngs = None if deterministic else nnx.Rngs(dropout=key)
      loss_sum, aux = loss_fn(model, micro_batch, deterministic=deterministic, rngs=rngs)
      return (loss_sum if scale is None else loss_sum * scale), aux
    (_, aux), grads = jax.value_and_grad(f, has_aux=True)(params)
    if peft_mode != "none":
      # A frozen parameter's gradient is zero: XLA then drops the matmuls that computed it, and the
      # gradient norm (logged, clipped, checked for NaN) is the trained parameters' alone.
      from fmjax import peft
      grads = jax.tree.map(lambda g, trains: g if trains else jnp.zeros_like(g), grads,
                           peft.trainable_mask(params, peft_mode))
    return grads, aux

  def train_step(state, batch):
    params, step = state["params"], state["step"]
    key = jax.random.fold_in(base_key, step)
    # The loss is a sum over positions: the scale per position makes `LOSS_SCALE_*` those of a mean.
    scale = state["loss_scale"]["scale"] / (batch["inputs"].size // accum) if scaled else None
    if accum == 1:
      grads, aux = micro_grads(params, batch, key, scale)
    else:
      def body(carry, xs):
        i, mb = xs
        g, a = micro_grads(params, mb, jax.random.fold_in(key, i), scale)
        return jax.tree.map(jnp.add, carry, (g, a)), None
      zeros = jax.tree.map(jnp.zeros_like, params)
      micro = _micro_batches(batch, accum)
      # The loss's totals, which the scan adds up micro-batch by micro-batch: their shapes, traced (not run)
      # from the forward pass as `micro_grads` calls it.
      def aux_of(p, mb):
        rngs = None if deterministic else nnx.Rngs(dropout=key)
        return loss_fn(nnx.merge(graphdef, p), mb, deterministic=deterministic, rngs=rngs)[1]
      aux_shape = jax.eval_shape(aux_of, params, jax.tree.map(lambda x: x[0], micro))
      zero_aux = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape)
      (grads, aux), _ = jax.lax.scan(body, (zeros, zero_aux), (jnp.arange(accum), micro))
    denom = jnp.maximum(aux["weight_sum"], 1.0)
    grads = jax.tree.map(lambda g: g / (denom if scale is None else denom * scale), grads)
    loss = aux["loss_sum"] / denom
    grad_norm = optax.global_norm(grads)
    updates, new_opt = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    # The update too: a rate that overflows it (optim.lr=1e39) turns finite gradients into inf params.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
    nonfinite, keep_old = ~finite, (~finite if skip_nonfinite else None)
    new_state, scale_metrics = {"step": step + 1}, {}
    if scaled:
      new_state["loss_scale"], overflow = _next_loss_scale(state["loss_scale"], finite, loss, grad_norm)
      nonfinite = nonfinite & ~overflow  # not the run's failure: the scale was too large
      keep_old = ~finite if skip_nonfinite else overflow
      scale_metrics = {"loss_scale": new_state["loss_scale"]["scale"],
                       "overflow_skips": new_state["loss_scale"]["skipped"]}
    if keep_old is not None:
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(keep_old, o, n), new, old)
      new_params, new_opt = keep(new_params, params), keep(new_opt, state["opt_state"])
    new_state.update(params=new_params, opt_state=new_opt)
    # `targets`: the loss-bearing positions of the step's batch (masked positions for MLM), which the
    # loss averages over; tokens_per_sec counts every row token the step reads.
    metrics = {"loss": loss, "accuracy": aux["correct_sum"] / denom, "grad_norm": grad_norm,
               "lr": schedule(_updates_applied(state["opt_state"], step)), "targets": aux["weight_sum"],
               "nonfinite": nonfinite.astype(jnp.float32), **scale_metrics,
               **{k.removesuffix("_sum"): v / denom for k, v in aux.items() if k not in _AUX_KEYS}}
    return new_state, metrics

  return train_step


_AUX_KEYS = ("loss_sum", "weight_sum", "correct_sum")  # every loss's; any other `NAME_sum` of a loss is logged


def _next_loss_scale(ls: dict, finite, loss, grad_norm) -> tuple[dict, Any]:
  """(the loss scale's next state, whether this update overflowed): halved after an overflow of
  the gradients alone, doubled after `LOSS_SCALE_GROWTH` finite updates in a row."""
  overflow = ~finite & jnp.isfinite(loss) & ~jnp.isfinite(grad_norm) & (ls["scale"] > LOSS_SCALE_MIN)
  grow = finite & (ls["finite_in_a_row"] + 1 >= LOSS_SCALE_GROWTH)
  scale = jnp.where(overflow, jnp.maximum(ls["scale"] / 2, LOSS_SCALE_MIN),
                    jnp.where(grow, jnp.minimum(ls["scale"] * 2, LOSS_SCALE_MAX), ls["scale"]))
  in_a_row = jnp.where(finite & ~grow, ls["finite_in_a_row"] + 1, 0)
  return {"scale": scale, "finite_in_a_row": in_a_row, "skipped": ls["skipped"] + overflow}, overflow


def make_eval_step(config, graphdef, loss_fn: Callable | None = None):
  """Returns the pure `eval_step(params, batch) -> {loss_sum, weight_sum, correct_sum}`."""
  loss_fn = loss_fn or objectives.get_loss_fn(config)

  def eval_step(params, batch):
    _, aux = loss_fn(nnx.merge(graphdef, params), batch, deterministic=True)
    return aux

  return eval_step


def compile_steps(config, spec: StateSpec, tx, batch_sharding, loss_fn=None):
  """jit the train and eval steps with explicit shardings; the train state is donated."""
  train_step = jax.jit(make_train_step(config, spec.graphdef, tx, loss_fn),
                       in_shardings=(spec.shardings, batch_sharding),
                       out_shardings=(spec.shardings, sharding.replicated(spec.mesh)),
                       donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(config, spec.graphdef, loss_fn),
                      in_shardings=(spec.shardings["params"], batch_sharding),
                      out_shardings=sharding.replicated(spec.mesh))
  return train_step, eval_step


def evaluate(eval_step, params, loader, num_batches: int) -> dict:
  """Held-out loss, perplexity and token accuracy over the first `num_batches` eval batches.

  A mixture's held-out data (`{dataset: loader}`, `data.held_out_loaders`) is scored dataset by
  dataset, the first `num_batches` of each: the figures are over all of them, and each dataset's
  own loss is `<dataset>_loss` (its name with '_' for the characters a metric name avoids).
  """
  loaders = loader if isinstance(loader, dict) else {"": loader}
  # All batches are queued before any result is read: one device-to-host transfer at the end.
  per_batch = jax.device_get({
      name: [eval_step(params, one.global_batch(step))
             for step in range(min(num_batches, one.num_batches) if getattr(one, "num_batches", None) else num_batches)]
      for name, one in loaders.items()})

  def figures(auxes) -> dict:
    totals = {k: sum(float(aux[k]) for aux in auxes) for k in ("loss_sum", "weight_sum", "correct_sum")}
    w = max(totals["weight_sum"], 1.0)
    loss = totals["loss_sum"] / w
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": totals["correct_sum"] / w}

  out = figures([aux for auxes in per_batch.values() for aux in auxes])
  if len(loaders) > 1:
    out.update({f"{re.sub(r'[^A-Za-z0-9.]+', '_', name).strip('_')}_loss": figures(auxes)["loss"]
                for name, auxes in per_batch.items()})
  return out


def _zeroshot_tasks(config, tok, names: list[str]) -> list[tuple]:
  """(name, items, encoded rows) of each `train.zeroshot_tasks` task (`names`), scored at every eval."""
  from fmjax import zeroshot
  tasks = []
  for name in names:
    _, items = zeroshot.load_items(name, data_dir=str(config.data.data_dir), limit=int(config.train.zeroshot_limit),
                                   config=config)
    items, _ = zeroshot.fitting(tok, items, config.data.seq_len, name)
    tasks.append((name.split(":", 1)[0], items, zeroshot.encode_rows(tok, items, config.data.seq_len)))
  return tasks


def eval_batch_size(config) -> int:
  """Rows a held-out batch holds: training's micro-batch (train.batch_size / train.grad_accum), so a
  batch that fits only when split does not run the device out of memory at an eval. The figures are
  the same (rows are scored on their own)."""
  return config.train.batch_size // config.train.grad_accum


def _held_out(config, graphdef, eval_step, eval_loader, zeroshot_tasks) -> Callable[[dict], dict] | None:
  """The loop's `evaluate`: held-out loss (train.eval_batches) and each zero-shot task's acc; None
  when there is neither (no held-out figures, rather than zeros). `eval_loader` reads micro-batches
  (train.batch_size / train.grad_accum rows): eval_batches batches are grad_accum times as many."""
  from fmjax import zeroshot
  if config.train.eval_batches <= 0 and not zeroshot_tasks:
    return None
  micro_batches = config.train.eval_batches * config.train.grad_accum

  def run(params) -> dict:
    out = evaluate(eval_step, params, eval_loader, micro_batches) if config.train.eval_batches > 0 else {}
    for name, items, rows in zeroshot_tasks:
      logliks = zeroshot.score_rows(graphdef, params, rows, items,  # a micro-batch of rows: it fits as training does
                                    batch_size=eval_batch_size(config))
      scores = zeroshot.metrics(items, logliks)
      out.update({f"{name}_acc": scores["acc"], f"{name}_acc_norm": scores["acc_norm"]})
    return out
  return run


def _eval_message(m: dict) -> str:
  parts = [f"eval loss {m['loss']:.4f}  ppl {m['perplexity']:.2f}  acc {m['accuracy']:.3f}"] if "loss" in m else []
  parts += [f"{k.removesuffix('_loss')} loss {v:.4f}" for k, v in m.items() if k.endswith("_loss")]
  parts += [f"{k.removesuffix('_acc')} acc {v:.3f}" for k, v in m.items() if k.endswith("_acc")]
  return "  ".join(parts)


# ----------------------------------------------------------------------------- loop


def flops_per_token(config) -> float:
  """Training FLOPs per token of the config's model (`models.flops_per_token`)."""
  from fmjax import models
  return models.flops_per_token(config.model, config.data.seq_len)


def _to_host(metrics: dict) -> dict:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def run(config, workdir: str) -> dict:
  """Pretrains per `config` in `workdir`; returns the last train and eval metrics.

  A workdir that already holds checkpoints resumes from the newest committed one (after checking
  that the config and the saved arrays fit); else, with `init_from`, training starts from that
  run's params and a fresh optimizer; else from scratch. SIGTERM saves at the next step boundary
  and returns with `preempted=True`; a non-finite loss aborts or skips the step per
  `train.nan_policy`. A start that fails before it trains (a setting, out of memory
  in the compile, Ctrl-C) removes the workdir it created: nothing was saved, and a rerun starts
  clean, never from what the failed start had written (its tokenizer, its config.json). A run
  that logged training steps keeps its workdir, so its losses stay to read.
  """
  config_lib.check_command(config, "train")
  # Ours: init_from adopts its tokenizer and model settings into it, which must not carry over into the
  # caller's next run of the same config (a notebook's, in another workdir).
  config = copy.deepcopy(config)
  created = not files.exists(workdir)
  locked = []  # set once this start holds the workdir's lock: a second start that lost the race for
  try:         # a new workdir must not remove the first one's
    return _run(config, workdir, locked)
  except BaseException:
    if (created and jax.process_index() == 0 and files.exists(workdir) and not _kept_anything(workdir)
        and (locked or not any(files.path(workdir).iterdir()))):
      files.path(workdir).rmtree()
    raise


def _refuse_foreign(workdir: str) -> None:
  """A fresh start writes workdir/config.json: one there that is no fmjax run's (a Hugging Face model
  directory's, say) is refused rather than overwritten."""
  saved = files.read_json(os.path.join(workdir, "config.json"))
  model = saved.get("model") if isinstance(saved, dict) else None
  if saved is not None and not (isinstance(model, dict) and model.get("family") in ("gpt", "bert")):
    raise ConfigError(f"{os.path.join(workdir, 'config.json')} is not an fmjax run's (a Hugging Face model's?), and "
                      "training there would overwrite it; pass a new --workdir")


def _kept_anything(workdir: str) -> bool:
  """Whether a workdir holds a checkpoint or logged training metrics."""
  checkpoints = files.path(os.path.join(workdir, "checkpoints"))
  if checkpoints.is_dir() and any(checkpoints.iterdir()):
    return True
  metrics = os.path.join(workdir, "metrics.jsonl")
  return files.exists(metrics) and '"train/' in files.read_text(metrics)


def _run(config, workdir: str, locked: list) -> dict:
  from fmjax import checkpoint as ckpt_lib, data  # local: heavy, and only the loop's

  from fmjax.data import sources
  metrics_lib.setup_logging()
  config_lib.validate(config, jax.device_count())
  from fmjax import zeroshot
  zeroshot_names = zeroshot.check_tasks(config)
  if not files.isdir(os.path.join(workdir, "checkpoints")):
    sources.check_config(config)  # a bad data setting on a fresh start leaves no workdir behind
    sources.check_held_out_apart(config)
    sources.check_files_read(config)
    _refuse_foreign(workdir)
  files.makedirs(workdir)

  if config.get("init_from"):
    _adopt_model_settings(config, config.init_from, workdir)  # before the model's graph is built with them
  mesh = sharding.make_mesh(config)
  batch_sharding = sharding.batch_sharding(mesh)
  tx = optim.make_optimizer(config)
  spec = state_spec(config, mesh, tx)
  # Closed in reverse order, each even when one before it raised: a lock left held (by the frames of a
  # traceback a notebook keeps) would refuse this process's next run in the workdir as another's.
  with contextlib.ExitStack() as closing:
    closing.enter_context(ckpt_lib.lock_workdir(workdir))  # one training per workdir, until this returns or raises
    locked.append(True)
    checkpointer = ckpt_lib.Checkpointer.of_run(config, workdir)
    # Pending async saves (the final or preemption save included) land before we return or raise.
    closing.callback(checkpointer.close)
    resuming = checkpointer.latest_step() is not None
    if config.get("init_from") and not resuming:
      source = files.read_json(os.path.join(config.init_from, "config.json"))  # None: _init_from names it
      if source is not None:  # another family or size: one line, before its tokenizer or arrays are read
        ckpt_lib.check_same_model(source, config.model, config.init_from)
    source_tokenizer = _adopt_tokenizer(config, workdir, resuming) if config.get("init_from") else None
    cfg_dict = _recorded_config(config, workdir)
    # Before any data work: a workdir of another run fails now, not after the dataset is tokenised,
    # and its config.json is left as it was.
    resume = _check_resume(checkpointer, spec, cfg_dict, workdir)
    if source_tokenizer is not None:
      if jax.process_index() == 0:
        data.save_run_tokenizer(source_tokenizer, workdir)
      multihost_utils.sync_global_devices("fmjax: init_from tokenizer saved")
    tokenizer = _run_tokenizer(config, workdir, resume)
    data_id = _check_data(data.prepare(config, tokenizer), resume)
    train_loader = data.make_loader(config, "train", sharding=batch_sharding, tok=tokenizer)
    # Held-out rows go through as many at once as training's do (train.grad_accum): a batch that only
    # fits split must not run the device out of memory at the first eval. The same rows are scored.
    eval_loader = data.held_out_loaders(config, sharding=batch_sharding, tok=tokenizer,
                                        batch_size=eval_batch_size(config))
    # Loaded now: a zero-shot task that cannot load fails before training.
    zeroshot_tasks = _zeroshot_tasks(config, tokenizer, zeroshot_names)

    state, resumed = _start_state(config, spec, tx, checkpointer, resume)
    start = int(state["step"])
    # Only now: a resume that fails before (a damaged step, data.files, data.cache_dir) leaves the
    # config.json that eval and generate read as it was. A rerun with train.steps at or below the saved
    # step trains nothing: config.json keeps the run's own.
    if jax.process_index() == 0 and not (resume is not None and resume[0] >= config.train.steps):
      config_lib.save_json(ml_collections.ConfigDict(cfg_dict), os.path.join(workdir, "config.json"))

    tokenizer_id = tokenizer.identity()
    meta = lambda step: {"config": cfg_dict, "data_position": step, "tokenizer": tokenizer_id, "data": data_id}
    with jax.set_mesh(mesh), nnx.logical_axis_rules(spec.rules):
      train_step, eval_step = compile_steps(config, spec, tx, batch_sharding)
      batches = train_loader.iterate(start)
      closing.callback(batches.close)  # stops the prefetch thread before the process may exit
      result = loop(
          config, state, (batch for _, batch in batches), train_step, checkpointer=checkpointer, workdir=workdir,
          meta=meta, resumed=resumed, flops_per_token=flops_per_token(config),
          evaluate=_held_out(config, spec.graphdef, eval_step, eval_loader, zeroshot_tasks),
          eval_message=_eval_message)
  return result.summary()


def _run_tokenizer(config, workdir: str, resume):
  """The tokenizer a run trains with, checked against the model and what the run recorded, and
  saved into the workdir (every host takes process 0's)."""
  from fmjax import data
  # A run keeps the tokenizer it started with (workdir/tokenizer): a resume never rebuilds it
  # from data settings whose files may have changed since.
  tokenizer = data.get_tokenizer(config, workdir if resume is not None else None)
  if jax.process_count() > 1:
    tokenizer = _process_0s(tokenizer)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size="
                      f"{config.model.vocab_size}; raise model.vocab_size")
  if resume is None and (note := _unused_vocab_note(config, tokenizer.vocab_size)):
    log.warning("%s", note)
  recorded = str(resume[1].get("tokenizer", "")) if resume is not None else ""
  if (_TOKENIZER_ID.fullmatch(recorded) and recorded != tokenizer.identity()
      and not files.isdir(os.path.join(workdir, data.RUN_TOKENIZER))):  # rebuilt: it must be the same one
    raise ConfigError(f"{workdir} trained with tokenizer {recorded}, and the data settings now "
                      f"build another ({tokenizer.identity()}); restore {workdir}/{data.RUN_TOKENIZER} or the "
                      "original corpus, or use a new --workdir")
  if jax.process_index() == 0:
    data.save_run_tokenizer(tokenizer, workdir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("fmjax: run tokenizer saved")
  return tokenizer


def _start_state(config, spec: StateSpec, tx, checkpointer, resume) -> tuple[dict, dict | None]:
  """(state, the meta of the checkpoint resumed, None for a new start): the run's own checkpoint
  (resume), else `init_from`'s params, else a fresh initialisation."""
  where = f"mesh {dict(spec.mesh.shape)}, {jax.device_count()} devices, {jax.process_count()} process(es)"
  if resume is None and config.get("init_from"):
    (state, read), saved_meta = init_from_checkpoint(config.init_from, spec, tx, config.init_from_step), None
    log.info("Initialised from %s step %d: its params, a fresh optimizer, step 0 (%s)", config.init_from, read, where)
  elif resume is None:
    state, saved_meta = init_state(config, spec, tx), None
    log.info("Started from scratch (%s)", where)
  else:
    step0, saved_meta, harmless = resume
    state = _restore(checkpointer, spec, step0, saved_meta)
    note = f"; config changes since that save: {', '.join(harmless)}" if harmless else ""
    log.info("Resumed from step %d of %s (%s)%s", step0, checkpointer.directory, where, note)
    rate = _rate_change(saved_meta.get("config", {}), config, step0)
    if rate:
      log.warning("%s", rate)
  return state, saved_meta


@dataclasses.dataclass
class LoopResult:
  """What `loop` ends with: the state, the last metrics, and whether SIGTERM stopped it."""
  state: dict
  train: dict      # host metrics of the last update
  eval: dict       # the last held-out metrics
  preempted: bool  # stopped early by SIGTERM, after saving

  def summary(self) -> dict:
    """The result `run` returns: last train and eval metrics, step, preempted."""
    return {"train": self.train, "eval": self.eval, "step": int(self.state["step"]), "preempted": self.preempted}


def loop(config, state: dict, batches: Iterator[dict], train_step, *, checkpointer, workdir: str,
         meta: Callable[[int], dict], evaluate: Callable[[dict], dict] | None, eval_message: Callable[[dict], str],
         resumed: Mapping | None = None, flops_per_token: float | None = None) -> LoopResult:
  """The step loop of `fmjax train`, `sft` and `finetune`: from `state`'s step to `train.steps`.

  `batches` yields the batch of each step from the state's step on. `evaluate(params)` returns
  held-out metrics (None: no eval split), `eval_message` says them in one line, and `meta(step)`
  is what the checkpoint records besides the step, the last train metrics and the count of
  skipped updates (in all and in a row, which `resumed`, the meta of the checkpoint a resumed run
  started from, carries on). Writes metrics.jsonl (train/ and eval/ keys) under `workdir`; SIGTERM saves
  at the next step boundary and returns with `preempted=True`; a non-finite update aborts or is
  skipped per `train.nan_policy`, and is never checkpointed (a save due while updates are being
  skipped waits for the next finite one). `train.profile_steps` > 0 traces that
  many updates from `train.profile_start` into `workdir/tb` (`metrics.StepProfiler`).
  """
  from fmjax import checkpoint as ckpt_lib
  start, total = int(state["step"]), config.train.steps
  tokens_per_step = config.train.batch_size * config.data.seq_len
  peak = metrics_lib.peak_flops_per_device() if flops_per_token else None
  writer = metrics_lib.MetricsWriter(workdir, total, start, progress_bar=config.train.progress_bar,
                                     use_wandb=bool(config.train.get("wandb", False)), run_name=config.name,
                                     config_dict=config_lib.to_dict(config))
  profiler = metrics_lib.StepProfiler(os.path.join(workdir, "tb"), config.train.get("profile_start", 0),
                                      config.train.get("profile_steps", 0), start, writer.message)
  if start == 0 < total and (note := _short_warmup_note(config)):
    writer.message(note)
  watcher = None
  last_train, last_eval, preempted = {}, {}, False
  t_last, step_last = time.time(), start
  skipped = int((resumed or {}).get("skipped_steps", 0))
  in_a_row = int((resumed or {}).get("nonfinite_in_a_row", 0))  # non-finite updates since the last finite one
  deferred = False  # a save fell due inside a run of skipped updates: made once an update is finite

  def record(step: int, device_metrics: dict) -> None:
    """Host side of the update that made `step`: non-finite policy, logging."""
    nonlocal skipped, in_a_row, last_train, t_last, step_last
    m = _to_host(device_metrics)
    in_a_row = in_a_row + 1 if m["nonfinite"] > 0 else 0
    if m["nonfinite"] > 0:
      # Under `skip`, params whose every next update is non-finite have diverged: stop rather than
      # skip to the end and save them as finished.
      if config.train.nan_policy == "abort" or in_a_row >= MAX_SKIPPED_IN_A_ROW:
        checkpointer.wait()  # a save still in flight is the last good checkpoint once it lands
        note = _float16_note(m) if scales_loss(config) else ""
        if config.train.nan_policy == "abort":
          raise NonFiniteLossError(_nonfinite_message(step, checkpointer.latest_step(), workdir, m.get("lr")) + note)
        raise NonFiniteLossError(_diverged_message(step, in_a_row, checkpointer.all_steps(), workdir) + note)
      skipped += 1
      writer.message(f"step {step}: non-finite loss, update skipped ({skipped} skipped so far)")
    m["skipped_steps"] = skipped
    last_train = m
    first = step == start + 1  # this process's first update compiled the step: its time is no speed
    if first:
      writer.pace_from(step)  # nor a pace for the ETA
    if step % config.train.log_every == 0 or step == total:
      now = time.time()
      if not first:
        rate = (step - step_last) * tokens_per_step / max(now - t_last, 1e-9)
        m["tokens_per_sec"] = rate
        if peak:
          m["mfu"] = rate * flops_per_token / (peak * jax.device_count())
      writer.write(step, m, prefix="train/")
      writer.progress(step, m)
      t_last, step_last = now, step
    elif first:
      t_last, step_last = time.time(), step

  if start >= total:
    writer.message(f"step {start} already reaches train.steps={total}: nothing to train; raise train.steps to "
                   "train on")
  try:
    watcher = ckpt_lib.PreemptionWatcher()
    # The metrics of the update that made `step` are read after the next update is queued, so
    # the device never idles while the host reads, logs and dispatches. They are read first
    # wherever the state is evaluated or saved: a non-finite update is never checkpointed.
    pending = None
    for step in range(start, total + 1):  # `state` holds `step` updates, perhaps still running
      # Every host asks at every step from the same first step: the stop step is collective.
      stop = start < step < total and watcher.should_stop(step)
      every = config.train.eval_every  # 0: at the end only
      eval_due = evaluate is not None and step > start and ((every and step % every == 0) or step == total)
      save_due = step > start and (stop or step == total or deferred or checkpointer.should_save(step))
      if pending is not None and (eval_due or save_due):
        record(step, pending)
        pending = None
      if save_due and in_a_row and not (stop or step == total):
        # The params of skipped updates are those that just failed: saving them would let `keep`
        # delete the checkpoints from before, the ones a diverged run goes back to.
        if not deferred:
          writer.message(f"step {step}: checkpoint put off until an update is finite again")
        deferred, save_due = True, False
      paused = time.time()
      if save_due:  # before the eval: an eval that fails (out of memory, say) loses no update
        saved = {"step": step, **meta(step), "fmjax_version": __import__("fmjax").__version__,
                 "metrics": last_train, "skipped_steps": skipped, "nonfinite_in_a_row": in_a_row}
        if "loss_scale" in state:  # ready: `record` has read this update's metrics
          saved["loss_scale"] = {k: v.item() for k, v in jax.device_get(state["loss_scale"]).items()}
        # Inside a run of skipped updates (a stop's save or the last one): out of schedule, so that `keep`
        # never deletes the last good checkpoint for the params that just failed.
        checkpointer.save(step, state, saved, force=stop or step == total or deferred, at_stop=stop,
                          unscheduled=in_a_row > 0)
        deferred = False
      if eval_due:
        last_eval = evaluate(state["params"])
        writer.write(step, last_eval, prefix="eval/")
        writer.message(f"step {step}: {eval_message(last_eval)}")
      if eval_due or save_due:
        writer.sync()  # a bucket workdir's logs are never behind its checkpoints
      t_last += time.time() - paused  # train/tokens_per_sec counts training time only, not eval or saving
      if step == total:
        break
      if stop:
        # Every host says so: on a pod the logs of all hosts show they stopped at the same step.
        log.info("Preempted: saving step %d to %s; rerun the same command to resume", step, checkpointer.directory)
        preempted = True
        break
      profiler.before_update(step, state)
      with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
        state, next_metrics = train_step(state, next(batches))
      if pending is not None:
        record(step, pending)
      pending = next_metrics
      # After `record`: a window that ends here drains this update, and tokens/s must count that time
      # (read before it, the rate of the update after the compiling one was millions of tokens/s).
      profiler.after_update(step + 1, state)
    if not last_eval and evaluate is not None and not preempted:
      last_eval = evaluate(state["params"])  # e.g. resumed a finished run: still report held-out figures
  finally:
    try:
      profiler.stop()  # a run that ends or stops inside the window keeps what it traced
    except Exception as e:  # a trace that cannot be written must not hide how the run ended
      log.warning("profile not written: %s", e)
    if watcher is not None:
      watcher.close()
    writer.close()
  return LoopResult(state, last_train, last_eval, preempted)


def _nonfinite_message(step: int, last_good: int | None, workdir: str, rate: float | None = None) -> str:
  what = f"non-finite loss, gradient or update at step {step}"
  if rate == 0.0:  # warmup's first update: no rate made it, the forward and backward pass of these params did
    return (f"{what}, an update at learning rate 0: the model's own loss or gradient is not finite, whatever "
            "optim.lr is; look at model.dtype (float16 overflows where bfloat16 does not), model.init_std and "
            "the data")
  if last_good is None:
    return f"{what}; no checkpoint was saved yet. Lower optim.lr (or raise optim.warmup_steps) and rerun"
  return (f"{what}; last good checkpoint: step {last_good} in {workdir}/checkpoints. Lower optim.lr or set "
          "train.nan_policy=skip, then rerun the same command to resume from that checkpoint")


def _float16_note(m: dict) -> str:
  """What a float16 update that the loss scale did not absorb means: no rate or skip cures float16
  overflowing in the forward pass, nor gradients that overflow at the smallest scale."""
  if not math.isfinite(m["loss"]):
    what = "a loss that is not finite is most often the forward pass overflowing float16 (past 65504)"
  elif not math.isfinite(m["grad_norm"]):
    what = f"its gradients overflow float16 even at the smallest loss scale ({LOSS_SCALE_MIN:g})"
  else:
    return ""  # finite gradients, a non-finite update: the rate's doing, as the message says
  return (f" (model.dtype=float16: {what}, which loss scaling cannot fix; model.dtype=bfloat16 or float32 does "
          "not overflow there, and a rerun with it resumes the same checkpoints)")


def _diverged_message(step: int, in_a_row: int, saved: list[int], workdir: str) -> str:
  """Under nan_policy=skip: every update since step `step - in_a_row` was non-finite, so the params
  kept since then (and any checkpoint of them) cannot train on."""
  since = step - in_a_row
  what = f"{in_a_row} non-finite updates in a row up to step {step}: the params of step {since} diverged"
  before = [s for s in saved if s < since]
  if not before:
    return f"{what}, and no checkpoint before them was saved. Lower optim.lr and start again in a new --workdir"
  return (f"{what}. Lower optim.lr and go on from step {before[-1]}, the last checkpoint before them: "
          f"--config.init_from={workdir} --config.init_from_step={before[-1]} in a new --workdir")


def _unused_vocab_note(config, tokenizer_ids: int) -> str:
  """A warning when model.vocab_size exceeds the tokenizer's ids by more than padding to 128 does."""
  V = config.model.vocab_size
  if V - tokenizer_ids < 128:
    return ""
  return (f"model.vocab_size={V} leaves {V - tokenizer_ids} rows no token id uses (the tokenizer has {tokenizer_ids} "
          f"ids): they cost compute and start the loss {math.log(V / tokenizer_ids):.2f} nats higher; set "
          f"model.vocab_size={-(-tokenizer_ids // 128) * 128} (a multiple of 128)")


def _short_warmup_note(config) -> str:
  """A note when the warmup outlasts the run, so the rate never reaches optim.lr nor decays."""
  total, warmup = config.train.steps, config.optim.warmup_steps
  if warmup < total:
    return ""
  last = float(optim.make_schedule(config.optim, total)(total - 1))
  return (f"optim.warmup_steps={warmup} is not below train.steps={total}: the rate never reaches "
          f"optim.lr={config.optim.lr:g} (the last update runs at {last:.3g}); lower optim.warmup_steps")


def _rate_change(before: dict, config, step: int) -> str:
  """A note when the learning rate at `step` differs from the saved run's schedule (a resume with
  more train.steps, say, rebuilds the decay over the new length, so the rate jumps)."""
  try:
    old_schedule = optim.make_schedule(ml_collections.ConfigDict(before["optim"]), before["train"]["steps"])
  except (KeyError, TypeError):
    return ""
  old = float(old_schedule(step))
  new = float(optim.make_schedule(config.optim, config.train.steps)(step))
  if math.isclose(old, new, rel_tol=1e-3, abs_tol=1e-12):
    return ""
  return (f"the learning rate at step {step} is now {new:.3g}, where the saved run's schedule gave {old:.3g}: "
          f"the schedule is rebuilt for train.steps={config.train.steps} and this config's optim.*")


def _recorded_config(config, workdir: str) -> dict:
  """`config` as config.json and the checkpoints record it: the run's own tokenizer relative to the
  workdir (data.resolve_tokenizer_path reads it back), so the workdir may move and still resume."""
  from fmjax import data
  cfg = config_lib.to_dict(config)
  tok = cfg.get("data", {}).get("tokenizer", {})
  own = files.absolute(os.path.join(workdir, data.RUN_TOKENIZER))
  if tok.get("kind") == "hf" and tok.get("path") and files.absolute(tok["path"]) == own:
    tok["path"] = data.RUN_TOKENIZER
  return cfg


def _check_resume(checkpointer, spec: StateSpec, cfg_dict: dict,
                  workdir: str | None = None) -> tuple[int, dict, list[str]] | None:
  """`(step, saved metadata, harmless config changes)` of the checkpoint to resume; None if there is none.

  Raises ConfigError when the config changes the model, data or optimizer-state layout, and
  CheckpointMismatchError when the saved arrays don't fit the model (a config guard that cannot
  see the difference, e.g. a checkpoint from another code version).
  """
  from fmjax import checkpoint as ckpt_lib
  latest = checkpointer.latest_step()
  if latest is None:
    return None
  saved = checkpointer.restore_meta(latest)
  before = saved.get("config", {})
  if workdir is not None:  # the run's own tokenizer is the same one wherever the workdir now lies
    from fmjax import data
    before, cfg_dict = (data.resolve_tokenizer_path(copy.deepcopy(c), workdir) for c in (before, cfg_dict))
  breaking, harmless = ckpt_lib.config_changes(before, cfg_dict)
  if breaking:
    more = f" and {len(breaking) - 6} more" if len(breaking) > 6 else ""
    raise ConfigError(f"{checkpointer.directory} holds a run (step {latest}) with a different model/data setup "
                      f"({'; '.join(breaking[:6])}{more}); use a new --workdir or restore the original values")
  ckpt_lib.check_compatible(checkpointer, latest, spec.abstract)
  return latest, saved, harmless


def _tokenizer_identity(cfg: dict) -> dict:
  from fmjax.data import CORPUS_KEYS
  data = cfg.get("data", {})
  tok = dict(data.get("tokenizer", {}))
  corpus = {} if tok.get("kind") == "hf" else {k: data.get(k) for k in CORPUS_KEYS}
  return {"tokenizer": tok, "corpus": corpus, "objective": cfg.get("train", {}).get("objective")}


def _process_0s(tokenizer):
  """Process 0's tokenizer, on every process. Each host trains one when none is cached, and
  training is not the same in every process for every kind (WordPiece ties fall in another order);
  hosts with different token ids would prepare different data."""
  from tokenizers import Tokenizer as HFTokenizer
  from fmjax import data
  mine = tokenizer.hf.to_str().encode()
  size = int(multihost_utils.broadcast_one_to_all(np.int64(len(mine))))
  buffer = np.zeros(size, np.uint8)
  if jax.process_index() == 0:
    buffer[:] = np.frombuffer(mine, np.uint8)
  theirs = bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8))
  if theirs == mine:
    return tokenizer
  log.info("using process 0's tokenizer (this host trained another one)")
  return data.Tokenizer(HFTokenizer.from_str(theirs.decode()), tokenizer.kind, tokenizer.chat_template)


def _check_data(path: str, resume) -> str:
  """The prepared cache's fingerprint (`data.packing.fingerprint`), checked: every host must have
  the same rows, and a resumed run is told when they are not the ones it trained on."""
  from fmjax.data import packing
  fingerprint = packing.fingerprint(path)
  if jax.process_count() > 1:
    mine = np.frombuffer(bytes.fromhex(fingerprint)[:8], np.int64)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1)
    if (every != every[0]).any():
      raise ConfigError(f"the hosts prepared different data (fingerprints differ; this host's cache is {path}): "
                        "their corpus files or caches differ; set data.cache_dir to a bucket all hosts share, or "
                        "delete the hosts' caches so they prepare them again alike")
  if resume is not None:
    saved = resume[1].get("data")
    if saved and saved != fingerprint:
      log.warning("%s holds other rows than those this run trained on (prepared again since, or another corpus): "
                  "its batches after the resume are not the ones the run would have seen", path)
    elif not saved and packing.multi_part(path):
      log.warning("%s was prepared in parts, and this run's checkpoint is older than parts: if its cache was made "
                  "again since, batches after the resume differ from those it would have seen", path)
  return fingerprint


def _adopt_model_settings(config, source_dir: str, workdir: str) -> None:
  """Continued pretraining computes as init_from did: its settings that are no shape but change the
  numbers (`checkpoint.ADOPTED_MODEL_KEYS`, e.g. an imported model's LayerNorm epsilon) are taken
  from its config, on a resume too (from the run's own config.json once init_from has moved), so
  that the run's recorded config stays the same."""
  from fmjax import checkpoint as ckpt_lib
  source = files.read_json(os.path.join(source_dir, "config.json"))  # None: _init_from names what is missing
  if source is None:
    source_dir, source = workdir, files.read_json(os.path.join(workdir, "config.json"))
  for change in ckpt_lib.adopt_model_settings(config, source, f"init_from={source_dir}"):
    log.info("%s, as init_from computed (read from %s/config.json)", change, source_dir)


def _adopt_tokenizer(config, workdir: str, resuming: bool):
  """Continued pretraining (`init_from`) must read the ids the source's embeddings know.

  Where this run's data settings would build another tokenizer (e.g. a BPE trained on the new
  corpus), `data.tokenizer` points at `workdir/tokenizer` instead. Returns the source's tokenizer
  when that directory still has to be written (after the resume check), else None. Only a
  resume (`resuming`: the workdir has a checkpoint) trusts a `workdir/tokenizer` already there;
  one left by a start that never saved may be another init_from's.
  """
  from fmjax import data
  source = files.read_json(os.path.join(config.init_from, "config.json"))
  if source is None:
    return None  # _init_from names what is missing
  source = data.resolve_tokenizer_path(source, config.init_from)
  if _tokenizer_identity(source) == _tokenizer_identity(config_lib.to_dict(config)):
    return None
  own = os.path.join(workdir, data.RUN_TOKENIZER)
  tok = None
  if resuming and files.exists(os.path.join(own, "tokenizer.json")):  # written by the run's first start
    vocab = data.load_hf(own).vocab_size
  else:
    source_config = ml_collections.ConfigDict(source)
    if not os.path.isdir(source_config.data.get("cache_dir") or "/nonexistent"):
      source_config.data.cache_dir = config.data.cache_dir
    try:
      tok = data.get_tokenizer(source_config, config.init_from)  # the one init_from saved, where it did
    except ConfigError as e:
      raise ConfigError(f"this run needs the tokenizer of init_from={config.init_from}, whose ids its params know, "
                        f"but it cannot be rebuilt here ({e}); pass it as data.tokenizer.kind=hf "
                        "data.tokenizer.path=FILE") from None
    vocab = tok.vocab_size
  config.data.tokenizer.update(kind="hf", path=own, vocab_size=vocab)
  log.info("Tokenizer of %s (the ids its params know) in %s", config.init_from, own)
  return tok


def init_from_checkpoint(source: str, spec: StateSpec, tx, source_step: int = 0) -> tuple[dict, int]:
  """(state, step read): step 0 with another run's params (its newest checkpoint, or `source_step`)
  and a fresh optimizer: phase 2 of a two-phase pretraining, SFT from a pretrained run."""
  from fmjax import checkpoint as ckpt_lib
  if not files.isdir(os.path.join(source, "checkpoints")):  # a Checkpointer would make it there (a typo's path)
    raise ConfigError(f"init_from={source} holds no checkpoints/; pass the --workdir of a `fmjax train` run")
  source_ckpt = ckpt_lib.Checkpointer(os.path.join(source, "checkpoints"))
  try:
    step = source_ckpt.source_step(source_step, source)
    with jax.set_mesh(spec.mesh):
      params = source_ckpt.restore(step, spec.abstract, items=("params",))["params"]
  finally:
    source_ckpt.close()
  with jax.set_mesh(spec.mesh), nnx.logical_axis_rules(spec.rules):
    opt_state = jax.jit(tx.init, out_shardings=spec.shardings["opt_state"])(params)
  step0 = jax.device_put(jnp.zeros((), jnp.int32), spec.shardings["step"])
  return with_loss_scale({"step": step0, "params": params, "opt_state": opt_state}, spec), step


def _restore(checkpointer, spec: StateSpec, step: int, meta: Mapping) -> dict:
  """Reads `step`'s params and optimizer state (and its step) straight into this run's shardings (any
  mesh); a float16 run's loss scale comes from `meta`, the checkpoint's."""
  with jax.set_mesh(spec.mesh):
    state = checkpointer.restore(step, spec.abstract, items=("params", "opt_state"))
  return with_loss_scale(state, spec, meta.get("loss_scale"))
