"""Loading, overriding and validating ml_collections configs.

A config file is `configs/X.py` with `get_config(arg)`; `arg` is a comma list such as
`small,runlocal` or `task=sst2`. Overrides are `a.b=v` strings. Configs are locked:
a misspelt key fails with a "did you mean" line, and `validate` checks values up front
so a bad run dies before any compile.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib.util
import json
import math
import os
import traceback
from typing import Any, Iterable, Mapping

import ml_collections


class ConfigError(ValueError):
  """A user-facing configuration error; its message is one line saying what to do."""


def parse_arg(arg: str | None) -> tuple[list[str], dict[str, str]]:
  """Splits `get_config` args `"small,runlocal,task=sst2"` into flags and key=value pairs."""
  flags, kv = [], {}
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    if "=" in part:
      k, v = part.split("=", 1)
      kv[k.strip()] = v.strip()
    else:
      flags.append(part)
  return flags, kv


def size_arg(arg: str | None, sizes: Iterable[str], family: str, extra: tuple[str, ...] = ()) -> tuple[str, bool]:
  """`(size, runlocal)` from a pretraining config's arg: `"small,runlocal"` or `"size=small"`
  (default tiny); two sizes or anything else is refused rather than ignored. `extra`: further
  flags the config reads itself (`parse_arg`)."""
  flags, kv = parse_arg(arg)
  sizes = list(sizes)
  unknown = [f for f in flags if f not in sizes and f != "runlocal" and f not in extra]
  unknown += [f"{k}={v}" for k, v in kv.items() if k != "size"]
  if unknown:
    raise ConfigError(f"unknown {family} config arg(s) {unknown}; use a size from {sizes} (or size=NAME) "
                      f"and/or {' / '.join(('runlocal', *extra))}")
  chosen = [f for f in flags if f in sizes] + ([kv["size"]] if "size" in kv else [])
  if len(chosen) > 1:
    raise ConfigError(f"{family} config arg names {len(chosen)} sizes {chosen}; name one of {sizes}")
  if chosen and chosen[0] not in sizes:
    raise ConfigError(f"size={chosen[0]!r} is not one of {sizes}{_suggest(chosen[0], sizes)}")
  return (chosen[0] if chosen else "tiny"), "runlocal" in flags


def load_module(path: str):
  """Imports a config file by path; a missing or non-Python file is one line."""
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist; pass --config=configs/NAME.py[:args]")
  if os.path.isdir(path) or not path.endswith(".py"):
    raise ConfigError(f"--config={path} is not a Python config file; pass --config=configs/NAME.py[:args] (a run's "
                      "config.json is read by the commands that take --workdir alone, e.g. fmjax eval)")
  spec = importlib.util.spec_from_file_location(
      "fmjax_user_config_" + os.path.basename(path).removesuffix(".py"), path)
  module = importlib.util.module_from_spec(spec)
  with _in_config_file(path, "loading it"):
    spec.loader.exec_module(module)
  return module


@contextlib.contextmanager
def _in_config_file(path: str, doing: str):
  """A bug in a user's config file ends in one line naming the file and line, not a traceback."""
  try:
    yield
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    where = path
    if isinstance(e, SyntaxError) and e.lineno:
      where = f"{path}:{e.lineno}"
    else:
      frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == os.path.abspath(path)]
      where = f"{path}:{frames[-1].lineno}" if frames else path
    raise ConfigError(f"{where}: {type(e).__name__} while {doing}: {e}; fix the config file") from None


def split_overrides(argv: Iterable[str]) -> tuple[list[str], list[str]]:
  """Pulls `--config.a.b=v` (or `--config.a.b v`) out of a command line: (rest, overrides)."""
  argv = list(argv)
  rest, overrides, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      if "=" in arg:
        overrides.append(arg[len("--config."):])
      elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        overrides.append(f"{arg[len('--config.'):]}={argv[i + 1]}")
        i += 1
      else:
        raise ConfigError(f"{arg} needs a value: {arg}=VALUE")
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def split_config_spec(spec: str) -> tuple[str, str | None]:
  """`configs/gpt.py:small,runlocal` -> (`configs/gpt.py`, `small,runlocal`)."""
  if ":" in spec and not os.path.exists(spec):
    path, arg = spec.split(":", 1)
    return path, arg
  return spec, None


def load_config(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path[:arg]`, applies `a.b=v` overrides, locks and validates the result."""
  path, arg = split_config_spec(spec)
  module = load_module(path)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} has no get_config(arg) function")
  with _in_config_file(path, f"calling get_config({arg!r})" if arg is not None else "calling get_config()"):
    config = module.get_config(arg) if arg is not None else module.get_config()
  if not isinstance(config, (dict, ml_collections.ConfigDict)) or "model" not in config:
    raise ConfigError(f"{path}: get_config must return a ConfigDict with a `model` section (and the others of "
                      f"config_lib.base_config(family), which it should start from), got {type(config).__name__}")
  config = ml_collections.ConfigDict(config)
  _check_keys(config, path)
  apply_overrides(config, overrides)
  config.lock()
  validate(config)
  return config


def task_section(name: str = "pydoc_family") -> ml_collections.ConfigDict:
  """`fmjax finetune`'s task settings (configs/finetune_cls.py)."""
  return ml_collections.ConfigDict(dict(
      name=name,
      files="",                 # csv/jsonl: comma-separated paths or globs
      validation_files="",      # csv/jsonl: held-out files; empty = hash split of `files`
      text_columns=("sentence",),
      label_column="label",
      positive_label="",        # two classes: the label F1 scores; empty = the one the other negates
                                # (equivalent, not_equivalent), else the second in sorted order
      # -1: from the task (csv/jsonl: the training labels; integer labels are class ids, strings are class
      # names; numbers that are not all integers, e.g. 0.26, are refused: set 0); 0: regression; > 0: the
      # classes, which may outnumber the training labels (a validation-only label is otherwise refused)
      num_classes=-1,
      validation_percent=20,    # hash split when a task has no validation split of its own
      max_train_examples=0,     # >0: train on a fixed subset of this many examples (label-scarce runs)
  ))


def peft_section(peft: str = "none") -> ml_collections.ConfigDict:
  """PEFT settings (`fmjax.peft`): `finetune` in configs/sft.py, and the core of `finetune_section`."""
  return ml_collections.ConfigDict(dict(
      peft=peft,                # none | lora | adapter | bitfit (| head: a classifier's new head only)
      lora_rank=8,
      lora_alpha=16.0,
      lora_targets=("attention.qkv", "attention.out", "attn.qkv", "attn.out"),
      adapter_dim=16,
      adapter_targets=("attention.out", "attn.out", "mlp.proj"),
  ))


def finetune_section(family: str = "bert", peft: str = "none") -> ml_collections.ConfigDict:
  """`fmjax finetune`'s model settings: PEFT, pooling, the new head (configs/finetune_cls.py)."""
  c = peft_section(peft)
  c.update(dict(
      pooling="auto",           # auto (BERT: cls, GPT: last) | cls | last | mean (average of non-pad tokens)
      # A bias in the new head: BERT's classifier has one; Hugging Face's GPT2ForSequenceClassification
      # `score` has none, so a GPT head without one is what `fmjax export` can write.
      head_bias=family == "bert",
  ))
  return c


def peft_mode(config) -> str:
  """The config's `finetune.peft`; none for a config (or a run's config.json) without the section."""
  return (config.get("finetune") or {}).get("peft", "none")


# SFT has no new head: its output layer is GPT's token embedding table (tied), which every mode but none freezes.
SFT_PEFT_MODES = ("none", "lora", "adapter", "bitfit")


def sft_section() -> ml_collections.ConfigDict:
  """`fmjax sft`'s settings (configs/sft.py)."""
  return ml_collections.ConfigDict(dict(
      prompt_key="prompt",
      completion_key="completion",
      # A row with this key is a conversation: [{"role": "system" | "user" | "assistant", "content": ...}, ...],
      # trained on the assistant's messages (and the end of each turn), written in the chat template.
      messages_key="messages",
      # Jinja source, or the path of a file (or a Hugging Face tokenizer directory) holding it; empty: the
      # tokenizer's own (from init_from, kept by import-hf), else fmjax's built-in plain-text one (fmjax.data.chat).
      chat_template="",
      eval_files="",        # held-out JSONL; empty = hold out eval_percent% of data.files by a hash of each row
      eval_percent=10,
      pack=True,            # pack several rows per sequence (segment ids keep them apart); False = one per row
  ))


def dpo_section() -> ml_collections.ConfigDict:
  """`fmjax dpo`'s settings (configs/dpo.py)."""
  return ml_collections.ConfigDict(dict(
      # The DPO loss -log sigmoid(beta * margin), the margin being how much more the policy than the reference
      # (init_from's model) raised the chosen reply's log-probability than the rejected one's: a larger beta
      # keeps the policy closer to the reference. 0.1 as in the paper and TRL.
      beta=0.1,
      # > 0: conservative DPO, for labels taken to be flipped with this probability (below 0.5); 0: plain DPO.
      label_smoothing=0.0,
      # A row is {prompt_key: ..., chosen_key: ..., rejected_key: ...}, all text, or all messages: the
      # prompt's conversation and each reply's assistant message(s); or chosen and rejected alone, as whole
      # conversations sharing their first messages (the prompt).
      prompt_key="prompt",
      chosen_key="chosen",
      rejected_key="rejected",
      # As sft.chat_template: Jinja source, a file or a Hugging Face tokenizer directory holding it; empty: the
      # tokenizer's own (from init_from), else fmjax's built-in plain-text one.
      chat_template="",
      eval_files="",        # held-out JSONL pairs; empty = hold out eval_percent% of data.files by a hash of each row
      eval_percent=10,
      pack=True,            # pack several pairs per row pair (segment ids keep them apart); False = one per row pair
  ))


# Sections a config may add to base_config's, and their settings; `release` (the model card fields
# `fmjax release` reads) is free-form.
COMMAND_SECTIONS = {"task": task_section, "finetune": finetune_section, "sft": sft_section, "dpo": dpo_section}
FREE_SECTIONS = ("release",)


def _check_keys(config: ml_collections.ConfigDict, path: str) -> None:
  """A key that get_config sets and nothing reads (`c.model.num_layer = 3`) is a typo: before, it was
  kept beside the real key, and the default trained."""
  def keys(d, prefix=""):
    for k, v in d.items():
      if isinstance(v, (dict, ml_collections.ConfigDict)):
        yield from keys(v, f"{prefix}{k}.")
      else:
        yield f"{prefix}{k}"
  known = set(keys(base_config(str(config.model.get("family", "gpt"))).to_dict()))
  for name, section in COMMAND_SECTIONS.items():
    if name in config:
      known |= {f"{name}.{k}" for k in keys(section().to_dict())}
  sections = {k.split(".")[0] for k in known} | set(COMMAND_SECTIONS) | set(FREE_SECTIONS)
  for key in keys(config.to_dict()):
    if key in known or key.split(".")[0] in FREE_SECTIONS:
      continue
    head, _, leaf = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == head]
    hint = _suggest(leaf, siblings) if head in sections or head.split(".")[0] in sections else _suggest(
        key.split(".")[0], sections)
    raise ConfigError(f"{path}: get_config sets {key!r}, which is not an fmjax setting{hint} (configs start from "
                      "config_lib.base_config(family); a new key is a typo)")


def _suggest(key: str, options: Iterable[str]) -> str:
  close = difflib.get_close_matches(key, list(options), n=3, cutoff=0.5)
  return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def parse_value(text: str, current: Any) -> Any:
  """Parses an override's text into the type of the value it replaces."""
  if isinstance(current, bool):
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigError(f"expected true/false, got {text!r}")
  if isinstance(current, str):
    return text
  if isinstance(current, int):
    try:
      return int(float(text)) if float(text).is_integer() else _raise(text, "an integer")
    except ValueError:
      _raise(text, "an integer")
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      _raise(text, "a number")
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = tuple(s.strip() for s in text.split(",") if s.strip())
    return type(current)(value) if isinstance(value, (tuple, list)) else type(current)([value])
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _raise(text, what):
  raise ConfigError(f"expected {what}, got {text!r}")


def get_path(config: ml_collections.ConfigDict, dotted: str) -> Any:
  """The value at a dotted key (`train.batch_size`); an unknown key suggests the close ones."""
  node = config
  for i, part in enumerate(dotted.split(".")):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      prefix = ".".join(dotted.split(".")[:i])
      keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      where = f" under {prefix!r}" if prefix else ""
      raise ConfigError(f"unknown config key {dotted!r}: no {part!r}{where}{_suggest(part, keys)}")
    node = node[part]
  return node


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
  """Applies `a.b=v` overrides in place; unknown keys fail with close matches."""
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} must look like key.path=value")
    dotted, text = item.split("=", 1)
    dotted = dotted.strip().removeprefix("config.")
    current = get_path(config, dotted)
    if isinstance(current, ml_collections.ConfigDict):
      raise ConfigError(f"{dotted!r} is a group of settings; override one of its keys: "
                        f"{', '.join(sorted(current.keys()))}")
    try:
      value = parse_value(text, current)
    except ConfigError as e:
      raise ConfigError(f"bad value for {dotted}: {e}") from None
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
      node = node[p]
    with node.unlocked() if node.is_locked else contextlib.nullcontext():
      node[leaf] = value


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
  """`{"a.b": value}` of a config (a ConfigDict or nested dicts, such as a saved config.json)."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  out = {}
  for key, value in config.items():
    if hasattr(value, "to_dict"):
      value = value.to_dict()
    if isinstance(value, Mapping):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def to_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON types."""
  return json.loads(config.to_json_best_effort())


def save_json(config: ml_collections.ConfigDict, path: str) -> None:
  """Writes the config as sorted, indented JSON (a run's config.json)."""
  from fmjax import files
  files.write_text(path, config.to_json_best_effort(indent=2, sort_keys=True))


def _one_of(name: str, value: Any, options: Iterable[Any]) -> None:
  options = list(options)
  if value not in options:
    raise ConfigError(f"{name}={value!r} is not one of {options}{_suggest(str(value), map(str, options))}")


def _check_optim(o) -> None:
  """Optimizer values that would train nothing, or diverge at once, without an error."""
  ranges = {  # key: (low, high, low included, what to say)
      "lr": (0.0, math.inf, True, "a finite rate >= 0"),
      "b1": (0.0, 1.0, True, "in [0, 1)"),
      "b2": (0.0, 1.0, True, "in [0, 1)"),
      # Adam divides by sqrt(v) + eps: at 0, a parameter with no gradient (a position past data.seq_len,
      # an unused vocabulary row) updates by 0/0, and the first step is non-finite.
      "eps": (0.0, math.inf, False, "finite and > 0 (e.g. 1e-8)"),
      "weight_decay": (0.0, math.inf, True, "finite and >= 0"),
      "clip_norm": (0.0, math.inf, True, "finite and >= 0 (0: no clipping)"),
      "min_lr_ratio": (0.0, 1.0 + 1e-12, True, "in [0, 1]"),
      "decay_fraction": (0.0, 1.0 + 1e-12, False, "in (0, 1]: the share of train.steps that wsd decays over"),
  }
  for key, (low, high, closed, what) in ranges.items():
    if key not in o:
      continue
    v = float(o[key])
    if not (low <= v if closed else low < v) or not v < high:
      raise ConfigError(f"optim.{key}={o[key]} must be {what}")
  if o.get("warmup_steps", 0) < 0:
    raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be at least 0")


_COMMAND_OF = {"finetune": ("task", "a fine-tuning (classification)"), "sft": ("sft", "an SFT"),
               "dpo": ("dpo", "a DPO")}


def check_pretraining_step(config, command: str) -> None:
  """`fmjax bench` and `fmjax plan` build the pretraining (or SFT) step: a fine-tuning config's
  classifier step is another program, refused rather than silently replaced by its trunk's."""
  if "task" in config:
    raise ConfigError(f"`fmjax {command}` measures the pretraining step, not a fine-tuning config's classifier; "
                      f"pass the pretraining config of the model it starts from (e.g. configs/bert.py:base)")


def command_of(config) -> str:
  """The subcommand a config is for: `finetune` (it has `task`), `sft` (it has `sft`), `dpo` (it has `dpo`),
  else `train`."""
  return next((c for c, (section, _) in _COMMAND_OF.items() if section in config), "train")


def check_command(config, command: str) -> None:
  """One line when a config goes to the wrong command: a fine-tuning config (it has `task`) is for
  `fmjax finetune`, an SFT config (`sft`) for `fmjax sft` and a DPO config (`dpo`) for `fmjax dpo`, or either
  for `fmjax finetune` (which fine-tunes every way), a pretraining config for `fmjax train`."""
  known = ("train", *_COMMAND_OF)
  if command not in known:
    close = difflib.get_close_matches(command, known, n=1)
    raise ConfigError(f"command {command!r} is not one of {', '.join(known)}"
                      + (f"; did you mean {close[0]!r}?" if close else ""))
  kind = command_of(config)
  if kind == command or (command == "finetune" and kind in ("sft", "dpo")):
    return
  if kind == "train":
    section, what = _COMMAND_OF[command]
    raise ConfigError(f"`fmjax {command}` needs {what} config (with a `{section}` section, e.g. "
                      f"configs/{'finetune_cls' if command == 'finetune' else command}.py); this one is a pretraining "
                      "config: run it with `fmjax train`")
  section, what = _COMMAND_OF[kind]
  raise ConfigError(f"this is {what} config (it has the `{section}` section): run it with `fmjax {kind}`, "
                    f"not `fmjax {command}`")


ARCHITECTURE_KEYS = ("family", "num_layers", "d_model", "num_heads", "d_ff", "vocab_size", "max_len")
# What else models.py reads of every run's model section (newer keys it reads with a default).
MODEL_KEYS_READ = ("layer_norm_eps", "dropout", "init_std", "attention", "dtype", "param_dtype", "remat", "scan_layers")


def check_saved(saved, path: str) -> dict:
  """A run's recorded config (config.json, or the one a checkpoint holds), refused in one line
  when it lacks what rebuilding the model needs, or holds a value no run writes (a damaged or
  hand-edited file): a value of another type than the setting's, or one `validate` refuses."""
  model = saved.get("model") if isinstance(saved, dict) else None
  needed = ARCHITECTURE_KEYS + MODEL_KEYS_READ + (("type_vocab_size",) if isinstance(model, dict)
                                                  and model.get("family") == "bert" else ())
  missing = ["model"] if not isinstance(model, dict) else [f"model.{k}" for k in needed if k not in model]
  missing += [s for s in ("data", "train") if isinstance(model, dict) and not isinstance(saved.get(s), dict)]
  if missing:
    raise ConfigError(f"{path} has no {', '.join(missing)}: it is damaged or not an fmjax run's; copy it again "
                      "from where the run was made")
  bad = [] if model["family"] in ("gpt", "bert") else [f"model.family={model['family']!r}"]
  bad += [f"model.{k}={model[k]!r}" for k in ARCHITECTURE_KEYS[1:]
          if isinstance(model[k], bool) or not isinstance(model[k], int) or model[k] <= 0]
  if bad:
    raise ConfigError(f"{path} has {', '.join(bad)}, where the model needs family gpt or bert and positive whole "
                      "sizes: it is damaged or hand-edited; copy it again from where the run was made")
  defaults = base_config(model["family"])
  for name, section in COMMAND_SECTIONS.items():
    if name in saved:
      defaults[name] = section()
  defaults = defaults.to_dict()
  try:
    _check_saved_types(saved, defaults)
    # Keys absent from older runs' configs read as their defaults, which pass.
    _check_model(ml_collections.ConfigDict({**defaults["model"], **model}))
    batch_size, seq_len = saved["train"].get("batch_size", 1), saved["data"].get("seq_len", 2)
    if batch_size < 1 or seq_len < 2:
      raise ConfigError(f"train.batch_size={batch_size} and data.seq_len={seq_len}, where a run has at least 1 row "
                        "of at least 2 tokens")
  except ConfigError as e:
    raise ConfigError(f"{path} is damaged or hand-edited (copy it again from where the run was made): {e}") from None
  return saved


def _check_saved_types(saved: Mapping, defaults: Mapping, prefix: str = "") -> None:
  """A recorded value of another type than its setting's default (`"seq_len": "abc"`, or a null,
  which no run records: the checks after this one and the readers compare it as a number); keys
  the defaults lack (older or free-form settings) are left to the readers."""
  kinds = ((bool, "true or false", (bool,)), (int, "a whole number", (int,)), (float, "a number", (int, float)),
           (str, "text", (str,)), ((list, tuple), "a list", (list, tuple)), (Mapping, "a section of settings", (dict,)))
  for key, default in defaults.items():
    value = saved.get(key)
    if key not in saved:
      continue
    want, types = next(((what, types) for kind, what, types in kinds if isinstance(default, kind)), (None, None))
    if want is None:  # a default of no kind above (None): any value
      continue
    if value is None or not isinstance(value, types) or (isinstance(value, bool) and not isinstance(default, bool)):
      raise ConfigError(f"{prefix}{key}={value!r}, where a run records {want}")
    if isinstance(default, Mapping):
      _check_saved_types(value, default, f"{prefix}{key}.")


MAX_STEPS = 2**31 - 1  # the step counter is an int32 on the device


def check_seed(key: str, seed) -> None:
  """A seed JAX's keys take: [0, 2**32), as every seed of a run."""
  if not 0 <= seed < 2**32:
    raise ConfigError(f"{key}={seed} must be in [0, 2**32)")


def _check_model(m, positions_from_source: bool = False) -> None:
  """The model section's values: a model of them can be built (a config's, or a run's recorded one).
  `positions_from_source`: the positions are an init_from's, not yet adopted (see `validate`)."""
  from fmjax import attention, models
  _one_of("model.family", m.family, ("gpt", "bert"))
  _one_of("model.attention", m.attention, ("auto", *attention.KERNELS))
  _one_of("model.remat", m.remat, ("none", *models.REMAT_POLICIES))
  _one_of("model.dtype", m.dtype, ("float32", "bfloat16", "float16"))
  _one_of("model.param_dtype", m.param_dtype, ("float32", "bfloat16"))
  for key in ("num_layers", "d_model", "num_heads", "d_ff", "vocab_size", "max_len"):
    if int(m[key]) <= 0:
      raise ConfigError(f"model.{key} must be positive, got {m[key]}")
  if m.d_model % m.num_heads and not models.architecture(m)["head_dim"]:
    raise ConfigError(f"model.num_heads={m.num_heads} does not divide model.d_model={m.d_model}; change one, or set "
                      "model.head_dim (each head's width)")
  for key in ("dropout", "attention_dropout"):
    if not 0.0 <= m.get(key, 0.0) < 1.0:
      raise ConfigError(f"model.{key} must be in [0, 1), got {m[key]}")
  if m.get("attention_dropout", 0.0) > 0 and m.attention in ("cudnn", "splash"):
    raise ConfigError(f"model.attention={m.attention} has no attention-probability dropout; set model.attention=auto "
                      "(the fused kernel for eval, xla while training) or model.attention_dropout=0")
  if not 0.0 < m.get("init_std", 0.02) <= 1.0:
    raise ConfigError(f"model.init_std must be in (0, 1] (GPT-2 and BERT use 0.02), got {m.init_std}")
  if not 0.0 < m.get("layer_norm_eps", 1e-5) < 1.0:
    raise ConfigError(f"model.layer_norm_eps must be in (0, 1) (GPT-2 uses 1e-5, BERT 1e-12), got {m.layer_norm_eps}")
  if m.get("fused_loss_chunk", 0) < 0:
    raise ConfigError(f"model.fused_loss_chunk={m.fused_loss_chunk} must be at least 0 (0: whole logits; > 0: "
                      "tokens a chunk of the fused LM-head loss takes)")
  if m.family == "bert" and m.get("type_vocab_size", 2) < 1:
    raise ConfigError(f"model.type_vocab_size={m.type_vocab_size} must be at least 1 (BERT uses 2: sentence A and B)")
  _check_architecture(m, models, positions_from_source)


def setting(value) -> str:
  """A setting's value as an override writes it (`model.use_bias=false`)."""
  return str(value).lower() if isinstance(value, bool) else str(value)


def _check_architecture(m, models, positions_from_source: bool = False) -> None:
  """The decoder's architecture choices (rotary positions, RMSNorm, SwiGLU, grouped-query attention, the head
  width, biases, q/k norms, an untied head); BERT keeps GPT-2's and the original BERT's."""
  arch = models.architecture(m)
  for key, choices in models.ARCHITECTURE_CHOICES.items():
    _one_of(f"model.{key}", arch[key], choices)
  changed = [f"model.{k}={setting(arch[k])}" for k, v in models.ARCHITECTURE_DEFAULTS.items() if arch[k] != v]
  if m.family == "bert" and changed:
    raise ConfigError(f"{', '.join(changed)} is a decoder choice: BERT has learned positions, LayerNorm, GELU, "
                      "biases in every projection, every head its own keys, d_model / num_heads wide and not "
                      "normalised, and a tied head; drop it, or use model.family=gpt")
  kv_heads = arch["num_kv_heads"]
  if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 0 or (
      kv_heads and m.num_heads % kv_heads):
    raise ConfigError(f"model.num_kv_heads={kv_heads!r} must divide model.num_heads={m.num_heads} (grouped-query "
                      "attention: each key/value head serves num_heads / num_kv_heads query heads; 0: as many "
                      "as query heads)")
  k = arch["head_dim"]
  if isinstance(k, bool) or not isinstance(k, int) or k < 0:
    raise ConfigError(f"model.head_dim={k!r} must be a whole number, at least 0 (each attention head's width; 0: "
                      "model.d_model / model.num_heads)")
  if arch["positions"] == "rope" and models.head_dim(m) % 2:
    raise ConfigError(f"model.positions=rope rotates pairs of each head's {models.head_dim(m)} dimensions, "
                      "which must be even; change model.num_heads or model.d_model (or model.head_dim)")
  if arch["qkv_bias"] and arch["use_bias"]:
    raise ConfigError("model.qkv_bias=true puts biases on the q, k and v projections of a model with no others "
                      "(model.use_bias=false, as Qwen2 has), and model.use_bias=true has them in every projection "
                      "already; drop model.qkv_bias or set model.use_bias=false")
  if not arch["rope_theta"] > 0:
    raise ConfigError(f"model.rope_theta={arch['rope_theta']} must be positive (Llama uses 10000 or 500000)")
  _check_rope_scaling(arch, models, positions_from_source)


def _check_rope_scaling(arch, models, positions_from_source: bool = False) -> None:
  """model.rope_scaling and its parameters: each one a scaling reads is in range, and none it ignores
  is set (a factor without the scaling that reads it would train unscaled, silently)."""
  scaling = arch["rope_scaling"]
  if scaling != "none" and arch["positions"] != "rope" and not positions_from_source:
    raise ConfigError(f"model.rope_scaling={scaling} scales rotary positions, and this model has "
                      f"model.positions={arch['positions']}; set model.positions=rope or model.rope_scaling=none")
  reads = models.ROPE_SCALING_READS[scaling]
  ignored = [k for k in models.ROPE_SCALING_READS["llama3"] if k not in reads
             and arch[k] != models.ARCHITECTURE_DEFAULTS[k]]
  if ignored:
    raise ConfigError(f"{', '.join(f'model.{k}={arch[k]}' for k in ignored)} is not read under model.rope_scaling="
                      f"{scaling} (linear reads rope_factor; llama3 also the rope_*_freq_factor and "
                      "rope_original_max_len); set model.rope_scaling, or drop it")
  if scaling == "none":
    return
  factor = arch["rope_factor"]
  if not 0 < factor < math.inf:
    raise ConfigError(f"model.rope_factor={factor} must be positive (how many times longer a context the model "
                      "reads: Llama 3.1 uses 8, Llama 3.2 32)")
  if factor == 1:
    raise ConfigError(f"model.rope_scaling={scaling} with model.rope_factor=1.0 scales nothing; set model.rope_factor "
                      "(Llama 3.1 uses 8, Llama 3.2 32) or model.rope_scaling=none")
  if scaling == "llama3":
    low, high, original = (arch[k] for k in ("rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len"))
    if not 0 < low < high < math.inf:
      raise ConfigError(f"model.rope_low_freq_factor={low} and model.rope_high_freq_factor={high} must be positive "
                        "with low below high (llama3 blends the frequencies between them; Llama 3 uses 1 and 4)")
    if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
      raise ConfigError(f"model.rope_original_max_len={original!r} must be a positive whole number (the positions of "
                        "the pretraining llama3 scales: 8192 for Llama 3)")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None, *, adopted: bool = False) -> None:
  """Checks values that would otherwise fail deep inside a compile; raises ConfigError. `adopted`: init_from's
  model settings are in the config (`checkpoint.adopt_model_settings`)."""
  m = config.model
  # Extending an imported Llama's context from a GPT-2 config (rope_scaling=linear with init_from): the rotary
  # positions are the source's, adopted later, so the scaling is checked against them then.
  _check_model(m, bool(config.get("init_from")) and not adopted and m.get("positions", "learned") == "learned")
  if "train" in config and "task" not in config and "objective" in config.train:
    # Pretraining and SFT: a decoder learns the next token, an encoder the masked ones (each sees
    # what the other's loss would hide: a bidirectional model reads the token it is asked for).
    want = {"gpt": "clm", "bert": "mlm"}[m.family]
    if config.train.objective != want:
      raise ConfigError(f"train.objective={config.train.objective!r} does not train a {m.family} "
                        f"(model.family={m.family} learns with {want!r}); set train.objective={want}")
  if "data" in config:
    d = config.data
    _one_of("data.bucket_reads", d.get("bucket_reads", "auto"), ("auto", "copy", "remote"))
    if d.get("shard_docs", 1) < 1:
      raise ConfigError(f"data.shard_docs={d.shard_docs} must be at least 1 (records in each part of a split)")
    if d.get("prepare_workers", 0) < 0:
      raise ConfigError(f"data.prepare_workers={d.prepare_workers} must be at least 0 (0: one process per CPU "
                        "core, at most 32)")
    if d.seq_len > m.max_len:
      raise ConfigError(f"data.seq_len={d.seq_len} is longer than the model allows "
                        f"(model.max_len={m.max_len}); lower data.seq_len or raise model.max_len")
    if d.seq_len <= 1:
      raise ConfigError(f"data.seq_len must be at least 2, got {d.seq_len}")
    if d.get("prefetch", 0) < 0:
      raise ConfigError(f"data.prefetch={d.prefetch} must be at least 0 (batches prepared ahead; 0: none)")
    check_seed("data.seed", d.get("seed", 0))
  if "checkpoint" in config:
    ck = config.checkpoint
    for key in ("every_steps", "every_minutes", "keep", "keep_period"):
      if not 0 <= ck.get(key, 0) < math.inf:
        raise ConfigError(f"checkpoint.{key}={ck[key]} must be at least 0 "
                          f"({'0 keeps every save' if key == 'keep' else '0 turns it off'})")
  if "train" in config:
    t = config.train
    if t.batch_size <= 0 or t.steps < 0:
      raise ConfigError("train.batch_size must be positive and train.steps non-negative")
    if t.steps > MAX_STEPS:
      raise ConfigError(f"train.steps={t.steps} is beyond the {MAX_STEPS:,} steps a run can count (int32)")
    check_seed("train.seed", t.get("seed", 0))
    if t.grad_accum < 1 or t.batch_size % t.grad_accum:
      raise ConfigError(f"train.grad_accum={t.grad_accum} must divide train.batch_size={t.batch_size}")
    _one_of("train.nan_policy", t.nan_policy, ("abort", "skip"))
    if t.get("log_every", 1) < 1 or t.get("eval_every", 0) < 0:
      raise ConfigError(f"train.log_every={t.log_every} must be at least 1 and train.eval_every={t.eval_every} "
                        "at least 0 (0: evaluate at the end only)")
    traced, first = t.get("profile_steps", 0), t.get("profile_start", 0)  # absent from older runs' configs
    if traced < 0 or first < 0:
      raise ConfigError(f"train.profile_steps={traced} and train.profile_start={first} must be non-negative; "
                        "profile_steps=0 turns tracing off")
    if traced and first >= t.steps:
      raise ConfigError(f"train.profile_start={first} is not before train.steps={t.steps}, so nothing would "
                        "be traced; lower train.profile_start")
    if t.get("zeroshot_limit", 0) < 0:
      raise ConfigError(f"train.zeroshot_limit={t.zeroshot_limit} must be at least 0 (0: every item)")
    if t.get("eval_batches", 0) < 0:
      raise ConfigError(f"train.eval_batches={t.eval_batches} must be at least 0 (0: no held-out evaluation)")
    _check_optim(config.optim)
    _one_of("optim.schedule", config.optim.schedule, ("cosine", "linear", "rsqrt", "constant", "wsd"))
    _one_of("optim.mu_dtype", config.optim.get("mu_dtype", "float32"), ("float32", "bfloat16"))
  if "data" in config and config.get("train", {}).get("objective") == "mlm" and "task" not in config:
    d = config.data
    if not 0.0 < d.mask_rate < 1.0 or d.max_predictions < 1:
      raise ConfigError(f"data.mask_rate={d.mask_rate} must be in (0, 1) and data.max_predictions="
                        f"{d.max_predictions} at least 1: masked LM learns from the masked positions only")
    if d.max_predictions > d.seq_len:  # bench and plan draw this many distinct positions a row: a traceback
      raise ConfigError(f"data.max_predictions={d.max_predictions} exceeds data.seq_len={d.seq_len}; lower it")
    needed = round(d.mask_rate * d.seq_len)
    if d.max_predictions < needed:  # each row masks at most max_predictions positions
      raise ConfigError(f"data.max_predictions={d.max_predictions} masks at most "
                        f"{100 * d.max_predictions / d.seq_len:.1f}% of a row of data.seq_len={d.seq_len}, not "
                        f"data.mask_rate={d.mask_rate}; set data.max_predictions={needed} (BERT: 20 at 128, 80 at 512)")
  mode = peft_mode(config)
  lm = next((k for k in ("sft", "dpo") if k in config), None)  # a GPT tuned as a language model: no new head
  if lm and mode not in SFT_PEFT_MODES:
    what = (f"trains a classifier's new head alone, and {lm.upper()} has none (a GPT's output layer is its token "
            "table, or with model.tie_embeddings=false its pretrained lm_head)" if mode == "head"
            else "is not a PEFT method")
    raise ConfigError(f"finetune.peft={mode!r} {what}; for {lm.upper()} set finetune.peft= one of "
                      f"{', '.join(SFT_PEFT_MODES)}")
  if "dpo" in config:
    _check_dpo(config)
  if mode == "bitfit" and not m.get("use_bias", True) and not m.get("qkv_bias", False):  # SFT would train nothing
    raise ConfigError("finetune.peft=bitfit trains the biases alone, and this model has none (model.use_bias=false, "
                      "as in Llama's architecture); set finetune.peft=lora or adapter")
  if "mesh" in config:
    from fmjax import sharding  # local: keeps config parsing free of device state
    sharding.validate_mesh(config, num_devices)


def _check_dpo(config) -> None:
  """DPO's settings, and a batch whose every micro-batch holds whole pairs (a chosen row, a rejected row)."""
  p = config.dpo
  if not 0.0 < p.beta < math.inf:
    raise ConfigError(f"dpo.beta={p.beta} must be positive and finite (0.1 is usual; larger keeps the policy closer "
                      "to the reference)")
  if not 0.0 <= p.label_smoothing < 0.5:
    raise ConfigError(f"dpo.label_smoothing={p.label_smoothing} must be in [0, 0.5): the chance that a pair's "
                      "labels are flipped (0: plain DPO)")
  if not 0 <= p.eval_percent < 100:
    raise ConfigError(f"dpo.eval_percent={p.eval_percent} must be in [0, 100): the share of data.files held out "
                      "for eval (0: none)")
  t = config.train
  if t.batch_size % (2 * t.grad_accum):
    raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of 2 x train.grad_accum={t.grad_accum}: "
                      "DPO rows come in pairs (the chosen replies' row and the rejected replies' row), and each "
                      "micro-batch holds whole pairs")


# The logical axis names that models use, and their default mapping onto the mesh axes
# (`dcn_data`, `data`, `fsdp`, `tensor`). Pure data parallelism is the default; FSDP and
# tensor parallelism switch on when the config gives those mesh axes a size above 1.
DEFAULT_RULES = (
    ("batch", ("dcn_data", "data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("layers", None),
    ("norm", None),
)


def base_config(family: str) -> ml_collections.ConfigDict:
  """Every key a pretraining run reads, with defaults; configs/*.py start from this."""
  c = ml_collections.ConfigDict()
  c.name = family
  c.init_from = ""  # a `fmjax train` workdir whose params start this run (optimizer fresh)
  c.init_from_step = 0  # which of init_from's checkpoints: 0 = the newest
  c.model = ml_collections.ConfigDict(dict(
      family=family,
      vocab_size=8192,
      num_layers=2, d_model=128, num_heads=4, d_ff=512,
      max_len=1024 if family == "gpt" else 512,
      type_vocab_size=2,
      layer_norm_eps=1e-5 if family == "gpt" else 1e-12,
      dropout=0.0,             # embeddings and each residual branch
      attention_dropout=0.0,   # attention probabilities (training runs the xla kernel while > 0)
      attention="auto",        # auto | xla | cudnn | splash
      dtype="float32",          # compute dtype (float16 scales the loss dynamically); params stay in param_dtype
      param_dtype="float32",
      remat="none",             # none | full | dots | dots_no_batch | save_attention_out
      scan_layers=False,
      fused_loss_chunk=0,       # >0: the LM head + loss in chunks of this many tokens (no [B,T,V] logits)
      init_std=0.02,
      # The decoder's architecture (GPT-2's below; `configs/gpt.py:SIZE,llama` sets Llama's, and with qkv_bias it is
      # Qwen2's, with qk_norm Qwen3's). BERT keeps these.
      positions="learned",      # learned (a position table, up to max_len) | rope (rotary, in q and k)
      rope_theta=10000.0,       # rope: the base of the rotation frequencies
      rope_scaling="none",      # rope: none | linear (positions / rope_factor) | llama3 (Llama 3.1 and 3.2's)
      rope_factor=1.0,          # linear, llama3: how many times longer a context it reads (Llama 3.1: 8, 3.2: 32)
      rope_low_freq_factor=1.0,   # llama3: frequencies turning fewer times in rope_original_max_len are scaled,
      rope_high_freq_factor=4.0,  # llama3: those turning more times than this are kept, those between blended
      rope_original_max_len=8192,  # llama3: the positions of the pretraining the scaling stretches (Llama 3's)
      norm="layernorm",         # layernorm | rmsnorm (a scale, no centring, no bias)
      mlp="gelu",               # gelu | swiglu (silu(x W_gate) * x W_up; size d_ff)
      num_kv_heads=0,           # key/value heads (grouped-query attention, dividing num_heads); 0: num_heads
      head_dim=0,               # each head's width, if not d_model / num_heads (0); Qwen3-0.6B: 128 at d_model 1024
      use_bias=True,            # biases in every attention and MLP projection
      qkv_bias=False,           # use_bias=false: biases on the q, k and v projections alone (Qwen2's)
      qk_norm=False,            # RMSNorm over each head of q and of k, before the rotary positions (Qwen3's)
      tie_embeddings=True,      # the output layer is the token embedding table (false: an lm_head of its own)
  ))
  c.data = ml_collections.ConfigDict(dict(
      dataset="fmjax_corpus",  # a TFDS name, `fmjax_corpus` (offline), `text_files`, or a mixture: NAME=W,NAME=W
                                # (NAME(feature=...; eval_split=...)=W: one dataset's own settings)
      data_dir="",
      files="",                 # text_files: comma-separated globs of .txt / .jsonl
      feature="text",
      train_split="train",
      eval_split="validation",
      seq_len=128,
      seed=0,
      cache_dir="",             # default: ~/.cache/fmjax; a bucket (gs://) is shared by every host
      bucket_reads="auto",      # bucket cache_dir: copy | remote (ranged reads) | auto (copy if they fit)
      shard_docs=65536,         # prepare: records a part of a split holds (TFRecord: whole files, at least
                                # this many); parts are made in parallel
      prepare_workers=0,        # prepare: processes making parts on each host (0: one per core, at most 32)
      tokenizer=ml_collections.ConfigDict(dict(
          kind="bpe" if family == "gpt" else "wordpiece",  # bpe | wordpiece | unigram | hf
          vocab_size=8192,
          path="",              # HF tokenizer.json / vocab.txt / dir with vocab.json+merges.txt
      )),
      mask_rate=0.15,
      max_predictions=20,
      pii_scrub=False,
      prefetch=2,
  ))
  c.train = ml_collections.ConfigDict(dict(
      objective="clm" if family == "gpt" else "mlm",
      batch_size=32,
      steps=1000,
      grad_accum=1,
      seed=0,
      log_every=50,
      eval_every=500,           # 0: at the end only
      eval_batches=8,           # held-out batches each eval, read grad_accum micro-batches at a time; 0: none
      nan_policy="abort",       # abort | skip
      progress_bar=True,
      wandb=False,              # also log to Weights & Biases (offline unless WANDB_MODE says otherwise)
      zeroshot_tasks="",        # GPT: zero-shot tasks scored at each eval, e.g. "continuation,hellaswag"
      zeroshot_limit=500,       # items of each zero-shot task per eval (0: all)
      profile_steps=0,          # >0: trace this many updates with jax.profiler into <workdir>/tb
      profile_start=5,          # ... from this step on (never the run's first update, which compiles)
  ))
  c.optim = ml_collections.ConfigDict(dict(
      lr=6e-4 if family == "gpt" else 1e-4,
      schedule="cosine",        # cosine | linear | rsqrt | constant | wsd (warmup, stable, then decay)
      warmup_steps=100,
      min_lr_ratio=0.1,
      decay_fraction=0.2,       # wsd: the last fraction of train.steps, decayed linearly to lr * min_lr_ratio
      weight_decay=0.1 if family == "gpt" else 0.01,  # kernels and an untied lm_head; not norms, biases, embeddings
      b1=0.9,
      b2=0.95 if family == "gpt" else 0.999,
      eps=1e-8 if family == "gpt" else 1e-6,
      clip_norm=1.0,
      mu_dtype="float32",       # float32 | bfloat16: Adam's first moment (bf16 saves 2 bytes a parameter)
  ))
  c.mesh = ml_collections.ConfigDict(dict(dcn_data=1, data=-1, fsdp=1, tensor=1))
  c.logical_axis_rules = DEFAULT_RULES
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=500, every_minutes=0.0, keep=3, keep_period=0, async_save=True))  # keep=0: every save
  return c
