"""Held-out metrics of a checkpoint: `fmjax eval --workdir=W [--split=eval] [--batches=N] [--step=S]`.

  pretraining (GPT)  next-token loss, perplexity and accuracy on the packed held-out split
  pretraining (BERT) masked-LM loss, accuracy (and pseudo-perplexity exp(loss)) at the masked positions
  SFT                the same on the completion tokens of the held-out JSONL rows
  DPO                the DPO loss and rewards (fmjax.dpo) on the held-out preference pairs
  fine-tuning        the task's official metrics (fmjax.finetune.evaluate) on a task split
                     (--split=eval is its validation split; --batches counts batches of train.batch_size examples)
  --task=NAME        zero-shot multiple choice of a GPT run (HellaSwag, PIQA, ARC, a JSONL file):
                     acc and acc_norm (fmjax.zeroshot), written to `eval_<task>.json`; a TFDS task is read
                     from the run's data.data_dir, or --config.data.data_dir=DIR

The numbers are those of the train loop's eval (same step function and batches), over the whole
split by default, where a pretraining run's loop scored only its first `train.eval_batches`.
They are printed and written to `workdir/eval.json` (`eval_<split>.json` for other splits).

`--config.data.KEY=V` scores a pretraining run on other text with its own tokenizer: another
corpus's held-out split (`--config.data.dataset=wikipedia/20230601.en`; `--config.data.files=GLOB`
alone: local text files, as `data.dataset=text_files`), or its own files after they moved
(`--config.data.files=NEW_GLOB`). The result goes to `eval_data.json`.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import jax
from flax import nnx

from fmjax import config_lib, files, finetune, generate, metrics as metrics_lib, sharding, train
from fmjax.config_lib import ConfigError

log = metrics_lib.log


def _read_config(workdir: str) -> dict:
  saved = files.read_json(os.path.join(workdir, "config.json"))
  if saved is None:
    raise ConfigError(f"{workdir} has no config.json; pass the --workdir of a `fmjax train`, `sft` or "
                      "`finetune` run")
  return saved


def _finetune_metrics(workdir: str, split: str, batches: int | None, step: int | None,
                      overrides: Sequence[str] = ()) -> dict:
  try:
    from fmjax import finetune
  except ImportError:
    raise ConfigError(f"{workdir} is a fine-tuning run, and this install has no fmjax.finetune to score it") from None
  task_split = "validation" if split == "eval" else split
  given = {"data_overrides": list(overrides)} if overrides else {}
  return {"split": task_split, **given,
          **finetune.evaluate(workdir, split=task_split, step=step, batches=batches, overrides=overrides)}


MOVED_FILE_KEYS = {"finetune": ("task.files", "task.validation_files"), "sft": ("data.files", "sft.eval_files"),
                   "dpo": ("data.files", "dpo.eval_files")}
_KIND_NAMES = {"finetune": "a fine-tuning", "sft": "an SFT", "dpo": "a DPO"}


def _override_keys(overrides: Sequence[str]) -> list[str]:
  return [item.split("=", 1)[0].strip().removeprefix("config.") for item in overrides]


def check_data_overrides(overrides: Sequence[str]) -> None:
  """`fmjax eval --config.data.KEY=V`: the held-out data to score may change, nothing else (and for a
  fine-tuning or SFT run, where its files are now: `MOVED_FILE_KEYS`)."""
  moved = {k for keys in MOVED_FILE_KEYS.values() for k in keys}
  for key in _override_keys(overrides):
    if key not in moved and (not key.startswith("data.") or key.startswith("data.tokenizer.")):
      raise ConfigError(f"fmjax eval takes --config.data.* overrides only (the text to score: data.dataset, "
                        f"data.files, data.eval_split ...), got --config.{key}; the model, its tokenizer and its "
                        "step come from the run")


def _check_moved_files(kind: str, workdir: str, overrides: Sequence[str]) -> None:
  """A fine-tuning, SFT or DPO run scores its own data: overrides may only say where its files are now."""
  allowed = MOVED_FILE_KEYS[kind]
  for key in _override_keys(overrides):
    if key not in allowed:
      raise ConfigError(f"{workdir} is {_KIND_NAMES[kind]} run, scored on its own "
                        f"data; it takes --config.{' / --config.'.join(allowed)} (where those files are now), "
                        f"not --config.{key}")


def _with_data(config, workdir: str, overrides: Sequence[str]):
  """The run's config with `overrides` of its data (`check_data_overrides`), checked."""
  if not overrides:
    return config
  if "sft" in config:
    _check_moved_files("sft", workdir, overrides)
    config_lib.apply_overrides(config, overrides)
    return config
  moved = [k for k in _override_keys(overrides) if not k.startswith("data.")]
  if moved:
    raise ConfigError(f"--config.{moved[0]} is for a fine-tuning or SFT run; {workdir} is a pretraining run, which "
                      "takes --config.data.* (the text to score)")
  seq_len = config.data.seq_len
  keys = _override_keys(overrides)
  from fmjax.data import sources
  if "data.files" in keys and "data.dataset" not in keys and sources.mixture(config.data.dataset) is None:
    overrides = ["data.dataset=text_files", *overrides]  # files beside a run of another corpus: score those files
  config_lib.apply_overrides(config, overrides)
  from fmjax import interop
  if config.data.seq_len > seq_len and not files.exists(os.path.join(workdir, interop.IMPORT_INFO)):
    raise ConfigError(f"data.seq_len={config.data.seq_len} is longer than the rows {workdir} trained on ({seq_len}); "
                      "the positions past them are untrained: use at most that")
  config_lib.validate(config)  # the values `train` would refuse (data.shard_docs=0, a mask rate that overflows)
  sources.check_config(config)
  return config


def _lm_metrics(workdir: str, split: str, batches: int | None, step: int | None,
                data_overrides: Sequence[str] = ()) -> dict:
  from fmjax import data, sft
  if split not in ("eval", "train"):
    raise ConfigError(f"--split must be 'eval' or 'train' for a pretraining or SFT run, got {split!r}")
  restored = generate.restore_run(workdir, step, split_batch=True)
  config, spec, params = _with_data(restored.config, workdir, data_overrides), restored.spec, restored.params
  batch_sharding = sharding.batch_sharding(spec.mesh)
  tok = data.get_tokenizer(config, workdir)  # the run's own tokenizer, whatever its corpus files became
  # Rows go through as many at once as training's (its micro-batches): a run that trained with
  # train.grad_accum because a whole batch did not fit is scored on the same devices.
  rows, accum = train.eval_batch_size(config), config.train.grad_accum
  if "sft" in config:
    train_loader, eval_loader = sft.make_loaders(config, tok, batch_sharding, eval_batch_size=rows)
    loader = eval_loader if split == "eval" else sft.RowLoader(train_loader.rows, rows, batch_sharding,
                                                              seed=config.data.seed, shuffle=False)
    if loader is None:
      raise ConfigError(f"{workdir} has no held-out SFT rows; set sft.eval_files or sft.eval_percent > 0, or "
                        "pass --split=train")
    what = "completion tokens"
  else:  # a mixture's split: each dataset's rows scored on their own (train.evaluate)
    from fmjax.data import sources
    # Other text's held-out split alone is tokenised, not its train split too (C4's, to score 2 batches).
    scored = sources.held_out_only(config) if data_overrides and split == "eval" else config
    loader = data.held_out_loaders(scored, sharding=batch_sharding, split=split, tok=tok, batch_size=rows)
    if isinstance(loader, dict):  # named as given (an item's own train_split is in its name)
      loader = dict(zip(sources.labels(sources.mixture(config.data.dataset)), loader.values()))
    what = "next tokens" if config.train.objective == "clm" else "masked tokens"
  most = max(one.num_batches for one in (loader.values() if isinstance(loader, dict) else [loader]))
  if batches is not None and batches < 1:
    raise ConfigError(f"--batches must be at least 1, got {batches}")
  if batches is None:  # batches of train.batch_size rows, which go through in `accum` micro-batches
    batches = most if split == "eval" else config.train.eval_batches * accum
  else:
    batches = int(batches) * accum
  batches = min(batches, most)
  if batches < 1:
    raise ConfigError(f"--split={split} of {workdir} has no rows to score")
  # The axis rules as in training: a Pallas kernel (splash on a TPU) runs per shard only under them.
  with jax.set_mesh(spec.mesh), nnx.logical_axis_rules(spec.rules):
    eval_step = jax.jit(train.make_eval_step(config, spec.graphdef),
                        in_shardings=(spec.shardings["params"], batch_sharding),
                        out_shardings=sharding.replicated(spec.mesh))
    result = train.evaluate(eval_step, params, loader, batches)
  given = {"data_overrides": list(data_overrides), "dataset": config.data.dataset} if data_overrides else {}
  return {"split": split, **given, "objective": config.train.objective, "scored": what, "batches": batches,
          "batch_size": rows, "seq_len": config.data.seq_len, "step": restored.step, **result}


def run(workdir: str, *, split: str = "eval", batches: int | None = None, step: int | None = None,
        data_overrides: Sequence[str] = ()) -> dict:
  """Metrics of `workdir`'s checkpoint (`step`, default the latest) on `split`; also written to eval.json.

  `data_overrides` (`data.KEY=V`) score a pretraining run on other text (another corpus, or its own
  files where they moved), with its own tokenizer; the result goes to eval_data.json instead.
  """
  check_data_overrides(data_overrides)
  config = _read_config(workdir)
  if finetune.is_classifier_run(config):
    _check_moved_files("finetune", workdir, data_overrides)
    result = _finetune_metrics(workdir, split, batches, step, data_overrides)
  elif "dpo" in config and "model" in config:
    from fmjax import dpo
    _check_moved_files("dpo", workdir, data_overrides)
    result = dpo.eval_metrics(workdir, split=split, batches=batches, step=step, overrides=data_overrides)
  elif "model" in config and "train" in config:
    result = _lm_metrics(workdir, split, batches, step, data_overrides)
  else:
    raise ConfigError(f"{workdir}/config.json is not an fmjax run's; pass the --workdir of `fmjax train`, `sft` "
                      "or `finetune`")
  result = {"workdir": files.absolute(workdir), **result}
  if jax.process_index() == 0:
    other_text = data_overrides and "model" in config and not any(k in config for k in ("task", "sft", "dpo"))
    name = ("eval_data" if other_text else "eval") + ("" if split == "eval" else f"_{split}") + ".json"
    _write_result(os.path.join(workdir, name), result)
  return result


def run_task(workdir: str, task: str, *, split: str | None = None, limit: int = 0, step: int | None = None,
             data_dir: str | None = None) -> dict:
  """Zero-shot multiple choice (`fmjax.zeroshot`) of a GPT run; also written to eval_<task>.json.
  `data_dir`: where the TFDS task is prepared (default: the run's data.data_dir)."""
  from fmjax import zeroshot
  result = {"workdir": files.absolute(workdir),
            **zeroshot.run(workdir, task, split=split, limit=limit, step=step, data_dir=data_dir)}
  if jax.process_index() == 0:
    kind, _, path = task.partition(":")  # jsonl:PATH -> eval_jsonl_<file name>.json, one per file
    name = f"{kind}_{os.path.splitext(os.path.basename(path))[0]}" if path else kind
    _write_result(os.path.join(workdir, f"eval_{name}.json"), result)
  return result


def _write_result(path: str, result: dict) -> None:
  """Writes the metrics beside the run; where the run cannot be written they are printed all the same."""
  try:
    files.write_json(path, result, indent=1)
  except OSError as e:
    print(f"warning: could not write {path} ({e.strerror or e}); the metrics are on stdout only", file=sys.stderr)


def cli(argv: list[str]) -> int:
  """`fmjax eval --workdir=W [--split=eval|train] [--batches=N] [--step=S] [--config.data.KEY=V ...]
  [--task=NAME [--limit=N]]`."""
  from fmjax.cli import ArgumentParser
  argv, overrides = config_lib.split_overrides(argv)
  check_data_overrides(overrides)
  p = ArgumentParser(prog="fmjax eval", epilog="--config.data.KEY=V (dataset, files, data_dir, eval_split, "
                              "seq_len, ...): score a pretraining run's held-out perplexity on other text, or on "
                              "its own files where they moved, with the run's tokenizer (written to eval_data.json); "
                              "a fine-tuning run takes --config.task.files / task.validation_files, an SFT run "
                              "--config.data.files / sft.eval_files and a DPO run --config.data.files / "
                              "dpo.eval_files, where its own files are now")
  p.add_argument("--workdir", required=True, help="a `fmjax train`, `sft`, `dpo` or `finetune` workdir")
  p.add_argument("--split", default=None, help="eval (held-out, default) or train; fine-tuning and --task: a "
                 "split of the task")
  p.add_argument("--batches", type=int, default=None, help="batches of train.batch_size rows to score, the first "
                 "ones in order (a mixture's: of each of its datasets; default: the whole eval split); they go "
                 "through in train.grad_accum micro-batches, as in training")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--task", default="", help="zero-shot multiple choice for a GPT run: hellaswag, piqa, arc_easy, "
                 "arc_challenge, continuation (its own held-out documents) or jsonl:PATH (fmjax.zeroshot)")
  p.add_argument("--limit", type=int, default=0, help="with --task: score the first N items only (0: all)")
  args = p.parse_args(argv)
  if not args.workdir.strip():
    raise ConfigError("--workdir is empty; pass the --workdir of a `fmjax train`, `sft`, `dpo`, `finetune` or "
                      "`import-hf` run")
  if args.limit < 0:
    raise ConfigError(f"--limit must be 0 (all items) or more, got {args.limit}")
  from fmjax import zeroshot
  # A TFDS task may be prepared elsewhere than the run's data (`tfds build piqa --data_dir=DIR`).
  data_dir = [o.split("=", 1)[1] for o in overrides if _override_keys([o]) == ["data.data_dir"]]
  if args.task and overrides and (args.task not in zeroshot.TFDS_TASKS or len(data_dir) < len(overrides)):
    raise ConfigError("--config.data.* overrides are for perplexity on other text, not --task (a TFDS task takes "
                      "--config.data.data_dir, where it is prepared); drop them")
  if args.task:
    result = run_task(args.workdir, args.task, split=args.split, limit=args.limit, step=args.step,
                      data_dir=data_dir[-1] if data_dir else None)
    print(f"{args.workdir} {result['task']} ({result['split']}, {result['items']} items, step {result['step']}): "
          f"acc {result['acc']:.4f}  acc_norm {result['acc_norm']:.4f}  (chance {result['chance']:.4f})")
    return 0
  result = run(args.workdir, split=args.split or "eval", batches=args.batches, step=args.step,
               data_overrides=overrides)
  skip = {"workdir", "split", "data_overrides"}
  print(f"{args.workdir} ({result['split']}): " + "  ".join(
      f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items() if k not in skip))
  return 0
