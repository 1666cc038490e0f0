"""Hugging Face interop: BERT, GPT-2, Llama, Qwen2 (Qwen2.5) and Qwen3 checkpoints (safetensors) in both directions.

  fmjax import-hf --model_dir=DIR --workdir=OUT [--config=configs/bert.py:base]
  fmjax export --workdir=W --out=DIR [--format=hf]

Import reads a Hugging Face directory (config.json, model.safetensors, sharded safetensors or
pytorch_model.bin, tokenizer files) and writes an fmjax workdir: config.json, a step-0 checkpoint
`{"step", "params", "opt_state"}` and the tokenizer, which `generate`, `eval`, `finetune` and
`train` (continued pretraining) accept. Export writes what `transformers`' Auto classes load:
config.json, model.safetensors and the tokenizer files.

Which HF model a GPT is follows from its architecture settings (`hf_model_type`): GPT-2's (the
defaults) exports as GPT2LMHeadModel; Llama's (model.positions=rope, norm=rmsnorm, mlp=swiglu;
any num_kv_heads, head_dim, rope_theta, rope_scaling, use_bias and tie_embeddings) as
LlamaForCausalLM; Llama's with model.use_bias=false and model.qkv_bias=true (biases on q_proj, k_proj
and v_proj alone) as Qwen2ForCausalLM, and with model.use_bias=false and model.qk_norm=true (an RMSNorm
over each head of q and of k, before the rotation) as Qwen3ForCausalLM; any other mix has no HF
counterpart and is refused. Import takes gpt2, llama, mistral (without a sliding window narrower than
its positions: then it is Llama), qwen2 and qwen3 (without a sliding window narrower than its positions
in any layer, nor layer types other than full attention; a Qwen3 without attention_bias, which would
put biases on o_proj too) and bert. fmjax's rotary positions rotate the
halves of each head as HF's Llama does, so its q and k weights map on unpermuted. Rotary scaling
(`rope_type` linear, and llama3 as Llama 3.1 and 3.2 have it) is read from `rope_parameters`
(transformers 5) or `rope_scaling` (earlier) into `model.rope_scaling` and its parameters, and
written back as `rope_scaling`; other rope types (yarn, dynamic, longrope ...) are refused.

The mapping is one table per model type (`_gpt_table`, `_llama_table` for Llama and Qwen, `_bert_table`):
each fmjax parameter is one HF tensor, or several stacked on the output axis (BERT's and Llama's
query/key/value, Llama's gate/up). Kernels are stored by fmjax as (in..., out...) and flattened to
(in, out): GPT-2's Conv1D weights are already (in, out); `torch.nn.Linear` weights are (out, in)
and are transposed.

Conventions of the exported model:
  * The vocabulary is exported as the model has it, padding rows included (`vocab_size` in
    config.json is model.vocab_size, which may exceed the tokenizer's size). Logits then match
    fmjax's exactly; the padding ids are never produced by the tokenizer. The one exception is a
    GPT classifier's pad token (`_export_pad_id`), which may need one row more.
  * Weights are written in float32 whatever the parameter dtype (bfloat16 -> float32 is exact).
  * A `classifier` subtree `{kernel (D, C), bias (C,)}` becomes BertForSequenceClassification's
    `classifier` (applied to the tanh pooler output, as in BERT) or GPT2ForSequenceClassification's
    (Llama's, Qwen2's, Qwen3's) `score` (last non-pad token; HF's score has no bias, so a
    non-zero bias is refused). The exported tokenizer encodes as `finetune.encode` does (BERT
    [CLS] a [SEP] b [SEP] with token types, GPT a <eos> b <eos>, after <s> where the tokenizer frames
    documents), so HF's logits of its output equal fmjax's.
  * A LoRA fine-tune is merged into its dense kernels on export (`from_finetune`); any other
    parameter without an HF counterpart (adapters) and a mean-pooling classifier are refused.

Shape legend: D model, H heads, G key/value heads, K head dim, F mlp, V vocab, C classes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
from typing import Any, Iterable, Mapping, Sequence

import ml_collections
import numpy as np

from fmjax import config_lib, files, models
from fmjax.config_lib import ConfigError

# HF model_type -> fmjax model.family. Mistral is Llama with a sliding attention window: imported when
# the window covers every position (`model_settings_from_hf`), exported as Llama; Qwen2 and Qwen3 likewise
# where their window is off (as in every released Qwen2.5 and Qwen3) or covers every position.
FAMILIES = {"gpt2": "gpt", "llama": "gpt", "mistral": "gpt", "qwen2": "gpt", "qwen3": "gpt", "bert": "bert"}
# The decoder architectures (`models.ARCHITECTURE_DEFAULTS` keys) that HF has: GPT-2's, fmjax's defaults,
# and Llama's, whose biases (attention_bias = mlp_bias), head tying, key/value heads, head width and rotary
# settings (rope_theta, rope_scaling and its parameters) are free; Qwen2's and Qwen3's are Llama's with
# biases on q, k and v alone, or with q/k norms, and no other biases (head tying, heads and rotary free).
GPT2_ARCHITECTURE = {k: v for k, v in models.ARCHITECTURE_DEFAULTS.items() if not k.startswith("rope_")}
LLAMA_ARCHITECTURE = {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qkv_bias": False, "qk_norm": False}
QWEN2_ARCHITECTURE = {**LLAMA_ARCHITECTURE, "use_bias": False, "qkv_bias": True}
QWEN3_ARCHITECTURE = {**LLAMA_ARCHITECTURE, "use_bias": False, "qk_norm": True}
# The rotary decoders, which share Llama's tensor names (`_llama_table`).
ROTARY_ARCHITECTURES = {"llama": LLAMA_ARCHITECTURE, "qwen2": QWEN2_ARCHITECTURE, "qwen3": QWEN3_ARCHITECTURE}
_HF_NAMES = {"gpt2": "GPT-2", "llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "bert": "BERT"}
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
IMPORT_INFO = "import.json"  # written into imported workdirs: where the weights came from


# ----------------------------------------------------------------------------- mapping tables


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One fmjax parameter and the HF tensor(s) it comes from.

  kind: "copy" (same shape, e.g. embeddings), "vector" (1-D in HF: biases and norms),
  "linear" (torch Linear, (out, in)) or "conv1d" (GPT-2 Conv1D, (in, out)).
  n_in: how many leading fmjax kernel axes are inputs (2 for the attention output (H, K, D)).
  Several HF names are concatenated along the output axis (BERT's query, key, value).
  """
  path: tuple
  hf: tuple[str, ...]
  kind: str
  n_in: int = 1


def _gpt_table(num_layers: int) -> list[_Entry]:
  t = [_Entry(("wte", "embedding"), ("transformer.wte.weight",), "copy"),
       _Entry(("wpe", "embedding"), ("transformer.wpe.weight",), "copy"),
       _Entry(("ln_f", "scale"), ("transformer.ln_f.weight",), "vector"),
       _Entry(("ln_f", "bias"), ("transformer.ln_f.bias",), "vector")]
  for i in range(num_layers):
    fm, hf = ("h", "blocks", i), f"transformer.h.{i}."
    for ln in ("ln_1", "ln_2"):
      t += [_Entry(fm + (ln, "scale"), (hf + ln + ".weight",), "vector"),
            _Entry(fm + (ln, "bias"), (hf + ln + ".bias",), "vector")]
    for fm_name, hf_name, n_in in (("attn", "qkv"), "attn.c_attn", 1), (("attn", "out"), "attn.c_proj", 2), \
                                  (("mlp", "fc"), "mlp.c_fc", 1), (("mlp", "proj"), "mlp.c_proj", 1):
      t += [_Entry(fm + fm_name + ("kernel",), (hf + hf_name + ".weight",), "conv1d", n_in),
            _Entry(fm + fm_name + ("bias",), (hf + hf_name + ".bias",), "vector")]
  return t


def _llama_table(model_cfg) -> list[_Entry]:
  arch = models.architecture(model_cfg, canonical=True)
  t = [_Entry(("wte", "embedding"), ("model.embed_tokens.weight",), "copy"),
       _Entry(("ln_f", "scale"), ("model.norm.weight",), "vector")]
  if not arch["tie_embeddings"]:
    t.append(_Entry(("lm_head", "embedding"), ("lm_head.weight",), "copy"))
  # fmjax fuses q, k, v into one kernel unless grouped-query attention splits them into q and kv.
  attn = ([(("attn", "q"), ("q_proj",)), (("attn", "kv"), ("k_proj", "v_proj"))] if arch["num_kv_heads"] else
          [(("attn", "qkv"), ("q_proj", "k_proj", "v_proj"))])
  for i in range(model_cfg.num_layers):
    fm, hf = ("h", "blocks", i), f"model.layers.{i}."
    t += [_Entry(fm + ("ln_1", "scale"), (hf + "input_layernorm.weight",), "vector"),
          _Entry(fm + ("ln_2", "scale"), (hf + "post_attention_layernorm.weight",), "vector")]
    dense = [(p, tuple(hf + "self_attn." + n for n in names), 1) for p, names in attn]
    dense += [(("attn", "out"), (hf + "self_attn.o_proj",), 2),
              (("mlp", "fc"), (hf + "mlp.gate_proj", hf + "mlp.up_proj"), 1),  # fc's axis 1: 0 gate, 1 up
              (("mlp", "proj"), (hf + "mlp.down_proj",), 1)]
    for fm_name, hf_names, n_in in dense:
      t.append(_Entry(fm + fm_name + ("kernel",), tuple(n + ".weight" for n in hf_names), "linear", n_in))
      qkv = fm_name in (p for p, _ in attn)
      if arch["use_bias"] or (arch["qkv_bias"] and qkv):  # Qwen2: q_proj, k_proj and v_proj alone
        t.append(_Entry(fm + fm_name + ("bias",), tuple(n + ".bias" for n in hf_names), "vector"))
    if arch["qk_norm"]:  # Qwen3: one scale over each head's dimensions, for q and for k
      t += [_Entry(fm + ("attn", f"{x}_norm", "scale"), (f"{hf}self_attn.{x}_norm.weight",), "vector") for x in "qk"]
  return t


def _bert_table(num_layers: int) -> list[_Entry]:
  e = "bert.embeddings."
  t = [_Entry(("embeddings", "word_embeddings", "embedding"), (e + "word_embeddings.weight",), "copy"),
       _Entry(("embeddings", "position_embeddings", "embedding"), (e + "position_embeddings.weight",), "copy"),
       _Entry(("embeddings", "token_type_embeddings", "embedding"), (e + "token_type_embeddings.weight",), "copy"),
       _Entry(("embeddings", "layer_norm", "scale"), (e + "LayerNorm.weight",), "vector"),
       _Entry(("embeddings", "layer_norm", "bias"), (e + "LayerNorm.bias",), "vector")]
  for i in range(num_layers):
    fm, hf = ("encoder", "blocks", i), f"bert.encoder.layer.{i}."
    qkv = tuple(f"{hf}attention.self.{n}" for n in ("query", "key", "value"))
    t += [_Entry(fm + ("attention", "qkv", "kernel"), tuple(n + ".weight" for n in qkv), "linear"),
          _Entry(fm + ("attention", "qkv", "bias"), tuple(n + ".bias" for n in qkv), "vector"),
          _Entry(fm + ("attention", "out", "kernel"), (hf + "attention.output.dense.weight",), "linear", 2),
          _Entry(fm + ("attention", "out", "bias"), (hf + "attention.output.dense.bias",), "vector"),
          _Entry(fm + ("mlp", "fc", "kernel"), (hf + "intermediate.dense.weight",), "linear"),
          _Entry(fm + ("mlp", "fc", "bias"), (hf + "intermediate.dense.bias",), "vector"),
          _Entry(fm + ("mlp", "proj", "kernel"), (hf + "output.dense.weight",), "linear"),
          _Entry(fm + ("mlp", "proj", "bias"), (hf + "output.dense.bias",), "vector")]
    for fm_ln, hf_ln in (("attention_ln", "attention.output.LayerNorm"), ("output_ln", "output.LayerNorm")):
      t += [_Entry(fm + (fm_ln, "scale"), (hf + hf_ln + ".weight",), "vector"),
            _Entry(fm + (fm_ln, "bias"), (hf + hf_ln + ".bias",), "vector")]
  p = "cls.predictions."
  t += [_Entry(("pooler", "kernel"), ("bert.pooler.dense.weight",), "linear"),
        _Entry(("pooler", "bias"), ("bert.pooler.dense.bias",), "vector"),
        _Entry(("mlm_transform", "kernel"), (p + "transform.dense.weight",), "linear"),
        _Entry(("mlm_transform", "bias"), (p + "transform.dense.bias",), "vector"),
        _Entry(("mlm_ln", "scale"), (p + "transform.LayerNorm.weight",), "vector"),
        _Entry(("mlm_ln", "bias"), (p + "transform.LayerNorm.bias",), "vector"),
        _Entry(("mlm_bias",), (p + "bias",), "vector")]
  return t


def _classifier_table(family: str) -> list[_Entry]:
  if family == "bert":
    return [_Entry(("classifier", "kernel"), ("classifier.weight",), "linear"),
            _Entry(("classifier", "bias"), ("classifier.bias",), "vector")]
  return [_Entry(("classifier", "kernel"), ("score.weight",), "linear")]


def hf_model_type(model_cfg) -> str:
  """The HF model_type an fmjax model exports as: bert; gpt2 for GPT-2's decoder (fmjax's defaults);
  llama for rotary positions, RMSNorm and SwiGLU (biases, a tied head, grouped-query attention, the head
  width and rope_theta as they are); qwen2 for that with biases on q, k and v alone (model.qkv_bias),
  qwen3 with q/k norms (model.qk_norm) and no biases. Any other decoder has no HF counterpart: a
  one-line ConfigError naming the settings that differ from GPT-2's and from the nearest rotary one's."""
  if model_cfg.family == "bert":
    return "bert"
  arch = models.architecture(model_cfg, canonical=True)
  known = {**ROTARY_ARCHITECTURES, "gpt2": GPT2_ARCHITECTURE}
  for kind, want in known.items():
    if all(arch[k] == v for k, v in want.items()):
      return kind

  setting = config_lib.setting
  differs = {kind: [f"model.{k}={setting(arch[k])} (not {setting(v)})" for k, v in want.items() if arch[k] != v]
             for kind, want in known.items()}
  fewest = min(len(differs[kind]) for kind in ROTARY_ARCHITECTURES)
  parts = [f"GPT-2's architecture in {', '.join(differs['gpt2'])}"] + [
      f"{_HF_NAMES[kind]}'s in {', '.join(differs[kind])}" for kind in ROTARY_ARCHITECTURES
      if len(differs[kind]) == fewest]
  raise ConfigError(f"this decoder has no Hugging Face counterpart: it differs from {', from '.join(parts[:-1])} and "
                    f"from {parts[-1]}; export takes GPT-2's (the model.* defaults), Llama's (model.positions=rope, "
                    "model.norm=rmsnorm, model.mlp=swiglu, as configs/gpt.py:SIZE,llama sets), Qwen2's (Llama's with "
                    "model.use_bias=false, model.qkv_bias=true) or Qwen3's (Llama's with model.use_bias=false, "
                    "model.qk_norm=true)")


def _table(model_cfg) -> list[_Entry]:
  kind = hf_model_type(model_cfg)
  if kind in ROTARY_ARCHITECTURES:
    return _llama_table(model_cfg)
  return _gpt_table(model_cfg.num_layers) if kind == "gpt2" else _bert_table(model_cfg.num_layers)


# Parameters an HF checkpoint may lack (a BertModel or a classifier has no MLM head, a LlamaModel or
# LlamaForSequenceClassification no untied lm_head; a BertModel built without a pooler has none): these
# keep fmjax's fresh initialisation, and the import says so.
_OPTIONAL = {"bert": ("pooler", "mlm_transform", "mlm_ln", "mlm_bias"), "gpt": ("lm_head",)}
# Language-model heads, which HF's sequence classifiers lack: a classifier's export leaves them out
# (a fine-tuned Llama keeps its untied lm_head, unused).
_LM_HEADS = {"bert": ("mlm_transform", "mlm_ln", "mlm_bias"), **dict.fromkeys(ROTARY_ARCHITECTURES, ("lm_head",))}
# Where each model type's weights live, and its layers (a base-model save has no prefix).
_PREFIX = {"gpt2": "transformer.", "bert": "bert.", **dict.fromkeys(ROTARY_ARCHITECTURES, "model.")}
_LAYERS = {"gpt2": "transformer.h.", "bert": "bert.encoder.layer.",
           **dict.fromkeys(ROTARY_ARCHITECTURES, "model.layers.")}


# Buffers and tied copies in HF checkpoints that carry no information of their own, and BERT's
# next-sentence head (pretraining only).
_IGNORED = (".attn.bias", ".attn.masked_bias", "position_ids", "lm_head.weight", "cls.predictions.decoder.weight",
            "cls.predictions.decoder.bias", "cls.seq_relationship.weight", "cls.seq_relationship.bias",
            ".rotary_emb.inv_freq")


def _in_out(shape: tuple, n_in: int) -> tuple[int, int]:
  return math.prod(shape[:n_in]), math.prod(shape[n_in:])


def _hf_shapes(entry: _Entry, fm_shape: tuple) -> list[tuple]:
  """The HF tensor shapes that `entry` expects for an fmjax parameter of `fm_shape`."""
  n = len(entry.hf)
  if entry.kind == "copy":
    return [fm_shape]
  if entry.kind == "vector":
    return [(math.prod(fm_shape) // n,)] * n
  i, o = _in_out(fm_shape, entry.n_in)
  return [(o // n, i) if entry.kind == "linear" else (i, o // n)] * n


def _to_fmjax(entry: _Entry, arrays: list[np.ndarray], fm_shape: tuple) -> np.ndarray:
  if entry.kind in ("copy", "vector"):
    return np.concatenate([a.reshape(-1) for a in arrays]).reshape(fm_shape)
  in_out = [a.T if entry.kind == "linear" else a for a in arrays]
  return np.concatenate(in_out, axis=1).reshape(fm_shape)


def _to_hf(entry: _Entry, x: np.ndarray) -> list[np.ndarray]:
  n = len(entry.hf)
  if entry.kind == "copy":
    return [x]
  if entry.kind == "vector":
    return np.split(x.reshape(-1), n)
  parts = np.split(x.reshape(_in_out(x.shape, entry.n_in)), n, axis=1)
  return [np.ascontiguousarray(p.T) if entry.kind == "linear" else p for p in parts]


def _get(tree: Mapping, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _flat_paths(tree: Mapping, prefix: tuple = ()) -> list[tuple]:
  out = []
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out += _flat_paths(v, prefix + (k,))
    else:
      out.append(prefix + (k,))
  return out


def _fmt_path(path: tuple) -> str:
  return "/".join(map(str, path))


# ----------------------------------------------------------------------------- pure conversions


def _is_stacked(params: Mapping) -> bool:
  root = params.get("h" if "h" in params else "encoder", {})
  blocks = root.get(models.STACK_KEY, {}) if isinstance(root, Mapping) else {}
  return bool(blocks) and not all(isinstance(k, int) for k in blocks)


def normalise_keys(tree: Any) -> Any:
  """Digit-string dict keys (how Orbax returns list indices) back to ints, recursively."""
  if isinstance(tree, Mapping):
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): normalise_keys(v) for k, v in tree.items()}
  return tree


def params_to_hf(params: Mapping, model_cfg) -> dict[str, np.ndarray]:
  """fmjax params (pure nested dict, unrolled or scanned) -> HF state dict of float32 numpy arrays.

  Tied output embeddings are not written (HF re-ties them on load). Raises ConfigError for params
  that have no HF counterpart (e.g. unmerged LoRA weights).
  """
  params = normalise_keys(dict(params))
  if _is_stacked(params):
    params = models.unstack_layers(params)
  family, kind = model_cfg.family, hf_model_type(model_cfg)
  table = _table(model_cfg)
  known = {e.path for e in table}
  if "classifier" in params:
    table = [e for e in table if e.path[0] not in _LM_HEADS.get(kind, ())] + _classifier_table(family)
    known |= {e.path for e in table} | ({("classifier", "bias")} if family == "gpt" else set())
    head = params["classifier"]
    if not isinstance(head, Mapping) or "kernel" not in head or np.ndim(head["kernel"]) != 2:
      raise ConfigError("params['classifier'] must be {kernel: (D, C), bias: (C,)} to export a "
                        "sequence-classification head")
    if family == "gpt" and "bias" in head and np.any(np.asarray(head["bias"]) != 0):
      raise ConfigError(f"{_hf_architecture(kind, True)} has no bias in its `score` layer, but this classifier's "
                        "bias is non-zero; fine-tune the GPT head without one (finetune.head_bias=false, the "
                        "GPT default) to export it")
  extra = [_fmt_path(p) for p in _flat_paths(params) if p not in known]
  if extra:
    raise ConfigError(f"{len(extra)} param(s) have no Hugging Face counterpart ({', '.join(extra[:4])}"
                      f"{', ...' if len(extra) > 4 else ''}); merge LoRA/adapter weights into the base first")
  out = {}
  for entry in table:
    try:
      value = np.asarray(_get(params, entry.path), dtype=np.float32)
    except KeyError:
      if "classifier" in params and entry.path[0] in _OPTIONAL.get(family, ()):
        continue  # a fine-tuned classifier drops the pretraining head; HF's classifier has none
      raise ConfigError(f"params lack {_fmt_path(entry.path)}; is this a {family} checkpoint of "
                        f"{model_cfg.num_layers} layers?") from None
    for name, part in zip(entry.hf, _to_hf(entry, value)):
      out[name] = np.ascontiguousarray(part)
  return out


def _canonical_hf_names(weights: Mapping[str, Any], kind: str) -> dict[str, Any]:
  """Adds the model prefix where a base-model checkpoint lacks it and renames old LayerNorm names."""
  prefix = _PREFIX[kind]
  heads = ("lm_head.", "cls.", "classifier.", "score.")
  out = {}
  for name, value in weights.items():
    if not name.startswith(prefix) and not name.startswith(heads):
      name = prefix + name
    if name.endswith(".gamma"):  # TF-era BERT checkpoints
      name = name[:-len(".gamma")] + ".weight"
    elif name.endswith(".beta"):
      name = name[:-len(".beta")] + ".bias"
    out[name] = value
  return out


def hf_to_params(weights: Mapping[str, np.ndarray], config) -> tuple[dict, dict | None, list[str]]:
  """HF state dict -> (fmjax params, classifier head or None, notes).

  `config.model` gives the expected shapes (from `models.abstract_model`). Optional parameters
  the checkpoint lacks (BERT's pooler and MLM head, an untied lm_head) get fmjax's initialisation (`_init_like`)
  and are listed in the notes. Raises ConfigError for missing or mis-shaped tensors.
  """
  from flax import nnx
  model_cfg = config.model
  family, kind = model_cfg.family, hf_model_type(model_cfg)
  table = _table(model_cfg)
  weights = _canonical_hf_names(weights, kind)
  abstract = normalise_keys(nnx.to_pure_dict(nnx.state(models.abstract_model(
      _unrolled(model_cfg)), nnx.Param)))
  params, notes, missing = {}, [], []
  rng = np.random.default_rng(config.train.seed if "train" in config else 0)
  optional = _OPTIONAL.get(family, ())
  for entry in table:
    fm_shape = tuple(_get(abstract, entry.path).shape)
    absent = [n for n in entry.hf if n not in weights]
    if absent:
      if entry.path[0] in optional:
        _set(params, entry.path, _init_like(entry.path, fm_shape, model_cfg.init_std, rng))
        note = f"{entry.path[0]}: not in the checkpoint, freshly initialised"
        notes += [] if note in notes else [note]
        continue
      missing += absent
      continue
    arrays = [np.asarray(weights[n], dtype=np.float32) for n in entry.hf]
    for name, a, want in zip(entry.hf, arrays, _hf_shapes(entry, fm_shape)):
      if tuple(a.shape) != tuple(want):
        raise ConfigError(f"weights do not match config.json: {name} has shape {tuple(a.shape)} but the config "
                          f"implies {tuple(want)}; fix config.json or use the weights that belong to it")
    _set(params, entry.path, _to_fmjax(entry, arrays, fm_shape))
  if missing and not any(n in weights for e in table for n in e.hf):
    raise ConfigError(f"the checkpoint holds none of the tensors of a {_HF_NAMES[kind]} model "
                      f"(such as {missing[0]}), which its config.json's model_type says it is; use the config.json "
                      "that belongs to these weights")
  if missing:
    raise ConfigError(f"the checkpoint lacks {len(missing)} tensor(s) a {family} model needs "
                      f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); is it a complete "
                      f"{_HF_NAMES[kind]} checkpoint?")
  _check_tied(weights, params, kind)
  used = {n for e in table + _classifier_table(family) for n in e.hf}
  unused = sorted(n for n in weights if n not in used and not n.endswith(_IGNORED))
  prefix = _LAYERS[kind]
  beyond = [int(n[len(prefix):].split(".")[0]) for n in unused if n.startswith(prefix)
            and n[len(prefix):].split(".")[0].isdigit()]
  if beyond:  # importing the first layers only would be another model, silently
    raise ConfigError(f"weights do not match the config: the checkpoint holds layers up to {prefix}{max(beyond)} but "
                      f"the config has {model_cfg.num_layers}; fix config.json or use the weights that belong to it")
  if unused:
    notes.append(f"{len(unused)} tensor(s) of the checkpoint have no place in fmjax's {family} and were skipped: "
                 f"{', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''}")
  head = None
  head_names = [e.hf[0] for e in _classifier_table(family)]
  if head_names[0] in weights:
    w = np.asarray(weights[head_names[0]], np.float32)
    head = {"kernel": np.ascontiguousarray(w.T)}
    head["bias"] = (np.asarray(weights[head_names[1]], np.float32) if len(head_names) > 1
                    else np.zeros((w.shape[0],), np.float32))
  if model_cfg.scan_layers:
    params = models.stack_layers(params)
  return params, head, notes


def _init_like(path: tuple, shape: tuple, std: float, rng: np.random.Generator) -> np.ndarray:
  """fmjax's initialisation in numpy (normal(std) kernels and tables, unit norm scales, zero biases): no
  compile, which a JAX init of a few leaves would cost."""
  if path[-1] in ("kernel", "embedding"):
    return (std * rng.standard_normal(shape)).astype(np.float32)
  return (np.ones if path[-1] == "scale" else np.zeros)(shape, np.float32)


def _check_tied(weights: Mapping, params: dict, kind: str) -> None:
  """A tied output layer is the input embeddings: refuse checkpoints whose output layer differs
  (fmjax's GPT-2 and BERT always tie it; a Llama or Qwen config.json says whether it does)."""
  if "lm_head" in params:  # an untied Llama or Qwen: its lm_head was imported
    return
  name, emb = (("cls.predictions.decoder.weight", params["embeddings"]["word_embeddings"]["embedding"])
               if kind == "bert" else ("lm_head.weight", params["wte"]["embedding"]))
  if name in weights and not np.allclose(np.asarray(weights[name], np.float32), emb):
    if kind in ROTARY_ARCHITECTURES:
      raise ConfigError(f"{name} differs from the input embeddings, but config.json says tie_word_embeddings=true; "
                        "fix config.json (tie_word_embeddings=false) or use the weights that belong to it")
    raise ConfigError(f"{name} differs from the input embeddings (untied output layer); fmjax models tie them, "
                      "so this checkpoint cannot be imported")


def _unrolled(model_cfg):
  cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  cfg.scan_layers = False
  return cfg


# ----------------------------------------------------------------------------- HF config


def _require(cond: bool, what: str) -> None:
  if not cond:
    raise ConfigError(f"unsupported Hugging Face config: {what}")


def model_settings_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """fmjax `config.model` values for an HF config.json; unsupported settings raise ConfigError."""
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    archs = ", ".join(hf.get("architectures") or []) or "none listed"
    raise ConfigError(f"unsupported architecture: model_type={model_type!r} (architectures: {archs}); "
                      f"fmjax imports {', '.join(list(FAMILIES)[:-1])} and {list(FAMILIES)[-1]} checkpoints")
  if model_type in ("llama", "mistral", "qwen2", "qwen3"):
    return _llama_settings(hf)
  if model_type == "gpt2":
    d = hf.get("n_embd", 768)
    _require(hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
             f"activation_function={hf.get('activation_function')!r}; fmjax's GPT uses tanh-approximated GELU")
    _require(hf.get("scale_attn_weights", True), "scale_attn_weights=false")
    _require(not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=true")
    _require(not hf.get("add_cross_attention", False), "add_cross_attention=true")
    _require(hf.get("tie_word_embeddings", True), "tie_word_embeddings=false")
    return dict(family="gpt", vocab_size=hf.get("vocab_size", 50257), num_layers=hf.get("n_layer", 12),
                d_model=d, num_heads=hf.get("n_head", 12), d_ff=hf.get("n_inner") or 4 * d,
                max_len=hf.get("n_positions", 1024), layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                dropout=float(hf.get("resid_pdrop", 0.1)), attention_dropout=float(hf.get("attn_pdrop", 0.1)),
                **GPT2_ARCHITECTURE)
  _require(hf.get("hidden_act", "gelu") == "gelu",
           f"hidden_act={hf.get('hidden_act')!r}; fmjax's BERT uses exact (erf) GELU")
  _require(hf.get("position_embedding_type", "absolute") == "absolute",
           f"position_embedding_type={hf.get('position_embedding_type')!r}")
  _require(not hf.get("is_decoder", False), "is_decoder=true")
  _require(hf.get("tie_word_embeddings", True), "tie_word_embeddings=false")
  return dict(family="bert", vocab_size=hf.get("vocab_size", 30522), num_layers=hf.get("num_hidden_layers", 12),
              d_model=hf.get("hidden_size", 768), num_heads=hf.get("num_attention_heads", 12),
              d_ff=hf.get("intermediate_size", 3072), max_len=hf.get("max_position_embeddings", 512),
              type_vocab_size=hf.get("type_vocab_size", 2), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
              dropout=float(hf.get("hidden_dropout_prob", 0.1)),
              attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)))


def _llama_settings(hf: Mapping[str, Any]) -> dict[str, Any]:
  """`model_settings_from_hf` of a Llama, or of what is Llama where its window covers every position: a Mistral,
  a Qwen2 (with biases on q, k and v alone) or a Qwen3 (with q/k norms)."""
  model_type = hf["model_type"]
  d, heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
  kv_heads = hf.get("num_key_value_heads") or heads
  max_len = hf.get("max_position_embeddings", 2048)
  _require(hf.get("hidden_act", "silu") == "silu",
           f"hidden_act={hf.get('hidden_act')!r}; fmjax's SwiGLU gates with silu")
  # transformers' Qwen3Config defaults head_dim to 128; the others' heads are hidden_size / heads wide.
  head_dim = hf.get("head_dim", 128 if model_type == "qwen3" else None) or d // heads
  if model_type == "qwen2":  # q_proj, k_proj and v_proj have biases, o_proj and the MLP none: no setting says so
    biases = dict(use_bias=False, qkv_bias=True)
  elif model_type == "qwen3":
    _require(not hf.get("attention_bias", False), "attention_bias=true (model_type 'qwen3': biases on q_proj, k_proj, "
                                                  "v_proj and o_proj, none in the MLP); fmjax has biases in every "
                                                  "projection (model.use_bias) or on q, k and v alone (model.qkv_bias)")
    biases = dict(use_bias=False, qk_norm=True)
  else:
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    _require(attention_bias == mlp_bias, f"attention_bias={config_lib.setting(attention_bias)} with "
                                         f"mlp_bias={config_lib.setting(mlp_bias)}; fmjax has biases in every "
                                         "projection or in none (model.use_bias)")
    biases = dict(use_bias=attention_bias)
  _check_full_attention(hf, max_len)
  return dict(family="gpt", vocab_size=hf.get("vocab_size", 32000), num_layers=hf.get("num_hidden_layers", 32),
              d_model=d, num_heads=heads, d_ff=hf.get("intermediate_size", 11008), max_len=max_len,
              layer_norm_eps=hf.get("rms_norm_eps", 1e-6), dropout=0.0,
              attention_dropout=float(hf.get("attention_dropout", 0.0)), **_rope_settings(hf),
              num_kv_heads=0 if kv_heads == heads else kv_heads, head_dim=0 if head_dim * heads == d else head_dim,
              tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **{**LLAMA_ARCHITECTURE, **biases})


def _check_full_attention(hf: Mapping[str, Any], max_len: int) -> None:
  """Refuses a decoder whose layers do not all see every earlier position: a sliding window narrower than
  the positions (Mistral's in every layer; Qwen's, with use_sliding_window, in the layers from
  max_window_layers on, or those `layer_types` names), or layer types other than (sliding) full attention."""
  model_type, layers = hf["model_type"], hf.get("num_hidden_layers", 32)
  types = hf.get("layer_types")
  if types is not None:
    others = sorted({str(t) for t in types} - {"full_attention", "sliding_attention"}) if isinstance(types, list) \
        else [repr(types)]
    _require(not others, f"layer_types holds {', '.join(others)}; fmjax's layers are all full attention")
  if model_type == "mistral":
    window, sliding, what = hf.get("sliding_window"), layers, ""
  elif model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window", False):
    window, what = hf.get("sliding_window"), "use_sliding_window=true, "
    first = hf.get("max_window_layers", 28)
    sliding = sum(t == "sliding_attention" for t in types) if types is not None else max(0, layers - first)
  else:
    return
  _require(window is None or not sliding or window >= max_len,
           f"{what}sliding_window={window} (below max_position_embeddings={max_len}) in {sliding} of its {layers} "
           "layers; fmjax's attention sees every earlier position")


# What each HF rope_type fmjax has reads, and the model.* setting it goes to.
_ROPE_PARAMETERS = {"default": {}, "linear": {"factor": "rope_factor"},
                    "llama3": {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
                               "high_freq_factor": "rope_high_freq_factor",
                               "original_max_position_embeddings": "rope_original_max_len"}}


def _rope_settings(hf: Mapping[str, Any]) -> dict[str, Any]:
  """model.rope_theta, rope_scaling and its parameters of a Llama config.json: transformers 5 writes them in
  rope_parameters, earlier versions (and Meta's Llama 3.1 / 3.2 configs) in rope_theta and rope_scaling."""
  rope, scaling = hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}
  _require(isinstance(rope, Mapping) and isinstance(scaling, Mapping),
           f"rope_parameters={rope!r}, rope_scaling={scaling!r}; fmjax reads objects of rotary settings")
  params = dict(scaling or rope)  # transformers reads rope_scaling alone where a config has both
  kind = params.get("rope_type", params.get("type")) or "default"
  written = scaling or rope
  *others, last = _ROPE_PARAMETERS
  _require(kind in _ROPE_PARAMETERS, f"rope_type={kind!r} (rope_scaling={written}); fmjax's rotary positions take "
                                     f"rope_type {', '.join(others)} and {last}")
  _require(params.get("partial_rotary_factor", hf.get("partial_rotary_factor")) in (None, 1, 1.0),
           f"partial_rotary_factor={params.get('partial_rotary_factor', hf.get('partial_rotary_factor'))}; fmjax "
           "rotates every dimension of a head")
  if kind == "llama3":  # transformers' fallbacks: a top-level original_max_position_embeddings, else every position
    params.setdefault("original_max_position_embeddings",
                      hf.get("original_max_position_embeddings", hf.get("max_position_embeddings", 2048)))
  absent = [k for k in _ROPE_PARAMETERS[kind] if params.get(k) is None]
  _require(not absent, f"rope_type={kind!r} without {', '.join(absent)} (rope_scaling={written})")
  try:
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    values = {key: (int if key == "rope_original_max_len" else float)(params[hf_key])
              for hf_key, key in _ROPE_PARAMETERS[kind].items()}
  except (TypeError, ValueError):
    raise ConfigError(f"unsupported Hugging Face config: rope_theta={params.get('rope_theta', hf.get('rope_theta'))!r}"
                      f", rope_scaling={written}; its rotary settings must be numbers") from None
  if kind == "llama3":
    low, high = values["rope_low_freq_factor"], values["rope_high_freq_factor"]
    _require(0 < low < high, f"low_freq_factor={low} with high_freq_factor={high} (rope_type 'llama3'); the low one "
                             "must be positive and below the high one")
  out = {k: models.ARCHITECTURE_DEFAULTS[k] for k in models.ROPE_SCALING_READS["llama3"]}
  out.update(rope_theta=theta, rope_scaling="none")
  if values and values["rope_factor"] != 1.0:  # a factor of 1 scales nothing, in either rope_type
    out.update(rope_scaling=kind, **values)
  return out


GPT_CLASSIFIER_PAD = "<pad>"


def _export_pad_id(tokenizer, family: str, classifier: bool) -> int:
  """The exported pad id: the tokenizer's, except for a GPT classifier whose tokenizer pads with <eos>.

  GPT2ForSequenceClassification pools the last token that is not `pad_token_id`, and fmjax's GPT
  head pools the <eos> that `finetune.encode` ends a row with: with pad == <eos> (byte-level BPE)
  HF would pool the token before it. Such an export gets a pad token of its own, the id after the
  tokenizer's (a padding row of the model's vocabulary, else a zero row the export adds); pads sit
  under attention_mask 0, so that row never changes a logit.
  """
  if family == "gpt" and classifier and tokenizer.eos_id is not None and tokenizer.pad_id == tokenizer.eos_id:
    return tokenizer.vocab_size
  return tokenizer.pad_id


def hf_config(model_cfg, tokenizer=None, num_labels: int | None = None,
              label_names: Sequence[str] = ()) -> dict[str, Any]:
  """The HF config.json for an fmjax model (and its tokenizer's special ids).

  A classifier (`num_labels`) names its classes by `label_names` (the task's, e.g. "negative",
  "positive"), else LABEL_i; one output is a regression head.
  """
  m = model_cfg
  specials = {}
  if tokenizer is not None:
    specials = {"pad_token_id": _export_pad_id(tokenizer, m.family, bool(num_labels))}
    if m.family == "gpt" and tokenizer.eos_id is not None:
      specials.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
  kind = hf_model_type(m)
  archs = [_hf_architecture(kind, bool(num_labels))]
  if kind in ROTARY_ARCHITECTURES:
    arch = models.architecture(m, canonical=True)
    # Qwen2's biases come with its model_type; Qwen3's attention_bias=true would put one on o_proj too.
    biases = {"llama": dict(attention_bias=bool(arch["use_bias"]), mlp_bias=bool(arch["use_bias"])),
              "qwen2": {}, "qwen3": dict(attention_bias=False)}[kind]
    # The keys in the order earlier exports wrote them: a Llama's config.json (and a release's checksums) stay the same.
    cfg = dict(model_type=kind, architectures=archs, vocab_size=m.vocab_size, hidden_size=m.d_model,
               intermediate_size=m.d_ff, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
               num_key_value_heads=arch["num_kv_heads"] or m.num_heads, head_dim=models.head_dim(m),
               hidden_act="silu", max_position_embeddings=m.max_len, rms_norm_eps=m.layer_norm_eps,
               rope_theta=float(arch["rope_theta"]), rope_scaling=_hf_rope_scaling(arch), **biases,
               attention_dropout=m.get("attention_dropout", 0.0),
               initializer_range=m.init_std, tie_word_embeddings=bool(arch["tie_embeddings"]))
    if kind != "llama":  # Qwen's window off: every layer sees every earlier position
      cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.num_layers)
  elif kind == "gpt2":
    cfg = dict(model_type="gpt2", architectures=archs, vocab_size=m.vocab_size, n_positions=m.max_len,
               n_embd=m.d_model, n_layer=m.num_layers, n_head=m.num_heads, n_inner=m.d_ff,
               activation_function="gelu_new", layer_norm_epsilon=m.layer_norm_eps, resid_pdrop=m.dropout,
               embd_pdrop=m.dropout, attn_pdrop=m.get("attention_dropout", 0.0), initializer_range=m.init_std,
               scale_attn_weights=True, tie_word_embeddings=True)
  else:
    cfg = dict(model_type="bert", architectures=archs, vocab_size=m.vocab_size, hidden_size=m.d_model,
               num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, intermediate_size=m.d_ff,
               hidden_act="gelu", max_position_embeddings=m.max_len, type_vocab_size=m.type_vocab_size,
               layer_norm_eps=m.layer_norm_eps, hidden_dropout_prob=m.dropout,
               attention_probs_dropout_prob=m.get("attention_dropout", 0.0),
               initializer_range=m.init_std, position_embedding_type="absolute", tie_word_embeddings=True)
  if num_labels:
    names = [str(n) for n in label_names]
    if len(names) != num_labels or len(set(names)) != num_labels:
      names = [f"LABEL_{i}" for i in range(num_labels)]
    cfg["id2label"] = {str(i): n for i, n in enumerate(names)}
    cfg["label2id"] = {n: i for i, n in enumerate(names)}
    if num_labels == 1:  # fmjax's only one-output head: regression, trained with mean squared error
      cfg["problem_type"] = "regression"
  cfg["dtype"] = cfg["torch_dtype"] = "float32"  # the name transformers 5 reads, and the one before it
  return {**cfg, **specials}


def _hf_rope_scaling(arch: Mapping[str, Any]) -> dict[str, Any] | None:
  """config.json's rope_scaling of a rotary model, as Meta's Llama 3.1 and 3.2 write it: what transformers 5
  reads (into rope_parameters, with rope_theta) and transformers 4.43 on too; None when unscaled."""
  if arch["rope_scaling"] == "none":
    return None
  return {"rope_type": arch["rope_scaling"], **{hf_key: arch[key] for hf_key, key in
                                               _ROPE_PARAMETERS[arch["rope_scaling"]].items()}}


def _hf_architecture(kind: str, classifier: bool) -> str:
  """The HF class an export loads as (a classifier's weights hold no LM head: a sequence classifier only)."""
  name = {"gpt2": "GPT2", "llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "bert": "Bert"}[kind]
  if classifier:
    return name + "ForSequenceClassification"
  return {"gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM"}.get(kind, name + "ForCausalLM")


# ----------------------------------------------------------------------------- reading HF directories


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open
  out = {}
  try:
    with safe_open(path, framework="np") as f:
      for name in f.keys():
        out[name] = f.get_tensor(name)
  except (TypeError, ValueError) as e:  # bfloat16 has no numpy dtype in safetensors' numpy backend
    if "bfloat16" not in str(e).lower() and "bf16" not in str(e).lower():
      raise _unreadable(path, e) from None
    out = {k: v.float().numpy() for k, v in _torch_load(path, safetensors=True).items()}
  except Exception as e:  # SafetensorError: a truncated or corrupt file
    raise _unreadable(path, e) from None
  return out


def _unreadable(path: str, e: Exception) -> ConfigError:
  return ConfigError(f"{path} cannot be read ({type(e).__name__}: {str(e).strip()[:200]}); it may be truncated or "
                     "corrupt: download it again")


def _torch_load(path: str, safetensors: bool = False) -> dict:
  try:
    import torch
  except ImportError:
    raise ConfigError(f"reading {os.path.basename(path)} needs PyTorch (pip install torch); or convert "
                      "the checkpoint to model.safetensors") from None
  try:
    if safetensors:
      from safetensors.torch import load_file
      return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # a truncated or corrupt file (torch raises RuntimeError, EOFError, pickle errors...)
    raise _unreadable(path, e) from None


def read_hf_weights(model_dir: str) -> dict[str, np.ndarray]:
  """All tensors of an HF model directory: model.safetensors (possibly sharded) or pytorch_model.bin."""
  def files_of(index_name):
    path = os.path.join(model_dir, index_name)
    index = files.read_json(path)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
      raise ConfigError(f"{path} has no \"weight_map\" object naming the weight files; it may be truncated or "
                        "corrupt: download it again")
    return sorted(set(map(str, index["weight_map"].values())))

  for name in HF_WEIGHT_FILES:
    path = os.path.join(model_dir, name)
    if not os.path.exists(path):
      continue
    shards = files_of(name) if name.endswith(".index.json") else [name]
    weights = {}
    for file in shards:
      full = os.path.join(model_dir, file)
      if file.endswith(".safetensors"):
        weights.update(_load_safetensors(full))
      else:
        weights.update({k: v.float().numpy() if v.is_floating_point() else v.numpy()
                        for k, v in _torch_load(full).items()})
    return weights
  raise ConfigError(f"{model_dir} has no model weights ({', '.join(HF_WEIGHT_FILES[::2])}); "
                    "point --model_dir at a Hugging Face model directory")


def read_hf_tokenizer(model_dir: str):
  """The tokenizer of an HF directory (tokenizer.json, vocab.txt, or vocab.json + merges.txt)."""
  from fmjax import data
  if not any(os.path.exists(os.path.join(model_dir, n)) for n in ("tokenizer.json", "vocab.txt", "vocab.json")):
    if os.path.exists(os.path.join(model_dir, "tokenizer.model")):  # Llama 2 / Mistral's SentencePiece file alone
      raise ConfigError(f"{model_dir} has a SentencePiece tokenizer.model but no tokenizer.json, which is what fmjax "
                        "reads; write one beside it with transformers: AutoTokenizer.from_pretrained(D)"
                        ".save_pretrained(D) (converting needs the sentencepiece package)")
    raise ConfigError(f"{model_dir} has no tokenizer files (tokenizer.json, vocab.txt, or vocab.json + "
                      "merges.txt); copy them from the model's repository into it")
  return data.load_hf(model_dir)


def _read_json(path: str, what: str) -> dict:
  value = files.read_json(path)
  if value is None:
    raise ConfigError(f"{os.path.dirname(path) or '.'} has no {os.path.basename(path)}; {what}")
  return value


def _repo_config(family: str) -> str | None:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = os.path.join(root, "configs", f"{family}.py")
  return path if os.path.exists(path) else None


def check_new_dir(path: str, flag: str) -> None:
  """Refuses a directory a command would write whole (`--out`, an import's `--workdir`) before any work:
  one that holds files, or one that cannot be made where it is."""
  if files.exists(path) and not (files.isdir(path) and not any(files.path(path).iterdir())):
    raise ConfigError(f"{flag}={path} already exists and is not empty; choose a new directory")
  if files.is_remote(path):
    return
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    why = "is a file" if not os.path.isdir(parent) else "is not writable"
    raise ConfigError(f"{flag}={path} cannot be made: {parent} {why}; choose a directory elsewhere")


def import_hf(model_dir: str, workdir: str, config_spec: str | None = None,
              overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Turns an HF BERT / GPT-2 / Llama / Qwen directory into an fmjax workdir with a step-0 checkpoint; returns its
  config.

  The config starts from `config_spec` (default: configs/gpt.py or configs/bert.py) with the
  model sizes of the HF config.json; `overrides` (`a.b=v`) apply after that. Everything is
  checked before anything is written, and the workdir is written under a temporary name and
  renamed at the end, so a failure leaves nothing behind.
  """
  import jax
  import jax.numpy as jnp
  from fmjax import checkpoint as ckpt_lib, data, metrics, optim

  model_dir, workdir = os.path.abspath(os.path.expanduser(model_dir)), files.absolute(workdir)
  if not os.path.isdir(model_dir):
    raise ConfigError(f"--model_dir={model_dir} is not a directory")
  check_new_dir(workdir, "--workdir")
  hf = _read_json(os.path.join(model_dir, "config.json"), "point --model_dir at a Hugging Face model directory")
  if not isinstance(hf, dict):
    raise ConfigError(f"{model_dir}/config.json holds a JSON {type(hf).__name__}, not a Hugging Face model config "
                      "(an object); copy it again from the model's repository")
  if "model_type" not in hf and isinstance(hf.get("model"), dict):  # an fmjax run's own config.json
    raise ConfigError(f"--model_dir={model_dir} is an fmjax workdir, which needs no import: pass it as --workdir "
                      "(generate, eval, export) or --config.init_from (train, finetune, sft)")
  settings = model_settings_from_hf(hf)
  family = settings["family"]
  tokenizer = read_hf_tokenizer(model_dir)
  needs = ((("[CLS]", tokenizer.cls_id), ("[SEP]", tokenizer.sep_id), ("[MASK]", tokenizer.mask_id)) if family == "bert"
           else (("end-of-text token", tokenizer.eos_id),))
  lacking = [name for name, i in needs if i is None]
  if lacking:
    raise ConfigError(f"the tokenizer in {model_dir} has no {', '.join(lacking)}, which a {hf['model_type']} model "
                      "needs; the tokenizer files belong to another model: copy the model's own into it")
  weights = read_hf_weights(model_dir)

  spec = config_spec or _repo_config(family)
  config = config_lib.load_config(spec) if spec else config_lib.base_config(family)
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
  # The workdir holds a pretrained LM: under a fine-tuning or SFT config it would be a classifier or SFT
  # run with no such params, which `generate`, `eval` and `init_from` refuse or misread.
  command = config_lib.command_of(config)
  if command != "train":
    raise ConfigError(f"--config={spec} is a `fmjax {command}` config, but import-hf writes a pretrained model: "
                      f"pass a pretraining config (configs/{family}.py, the default), then run `fmjax {command} "
                      f"--config={spec} --config.init_from={workdir}`")
  if config.model.family != family:
    raise ConfigError(f"--config is a {config.model.family} config but {model_dir} holds a {hf['model_type']} "
                      f"model; pass a {family} config")
  config.name = f"{family}_hf_{os.path.basename(model_dir.rstrip('/'))}"
  try:
    config.model.update(settings)
  except TypeError as e:  # a number written as a string, say
    raise ConfigError(f"{model_dir}/config.json has a value of the wrong type ({e}); fix config.json") from None
  config.model.update(dtype="float32", param_dtype="float32")
  # Relative to the workdir (data.resolve_tokenizer_path): the workdir may move.
  config.data.tokenizer.update(kind="hf", path=data.RUN_TOKENIZER, vocab_size=tokenizer.vocab_size)
  config.data.seq_len = min(config.data.seq_len, config.model.max_len)
  config_lib.apply_overrides(config, overrides)
  # The weights are the HF model's: an override of its shape or arithmetic would import another model.
  changed = [k for k, v in settings.items() if k not in ("dropout", "attention_dropout") and config.model[k] != v]
  if changed:
    raise ConfigError(f"--config.model.{changed[0]}={config.model[changed[0]]} contradicts {model_dir}/config.json "
                      f"({changed[0]}={settings[changed[0]]} there): the weights are that model's; drop the override "
                      "(model.dtype, attention, scan_layers, remat and the dropout rates may change)")
  config.lock()
  config_lib.validate(config)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError(f"the tokenizer in {model_dir} has {tokenizer.vocab_size} ids but the model only "
                      f"{config.model.vocab_size}; the tokenizer files belong to another model")

  params, head, notes = hf_to_params(weights, config)
  if family == "gpt":
    opener = tokenizer.hf.id_to_token(tokenizer.bos_id)
    notes.append(f"documents and prompts open with {opener}" + (
        " (the tokenizer's BOS) and end with " + tokenizer.hf.id_to_token(tokenizer.eos_id)
        if tokenizer.frames_documents else ", which also ends each (the tokenizer puts no BOS of its own first)"))
  if family == "gpt" and tokenizer.chat_template is not None:
    notes.append("the tokenizer's chat template is kept (tokenizer/chat_template.jinja): `fmjax sft` writes "
                 "conversations in it and `fmjax generate --chat` prompts with it")
  if head is not None:
    notes.append(f"classification head ({head['kernel'].shape[1]} labels) not imported: `fmjax finetune` "
                 "initialises its own head")
  tx = optim.make_optimizer(config)
  params = jax.tree.map(lambda x: jnp.asarray(x, config.model.param_dtype), params)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": jax.jit(tx.init)(params)}

  with staged_dir(workdir, ".importing") as staging:
    os.makedirs(staging)
    tokenizer.save(os.path.join(staging, data.RUN_TOKENIZER))
    config_lib.save_json(config, os.path.join(staging, "config.json"))
    info = {"source": model_dir, "model_type": hf["model_type"], "architectures": hf.get("architectures", []),
            "notes": notes}
    with open(os.path.join(staging, IMPORT_INFO), "w") as f:
      json.dump(info, f, indent=2)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(staging, "checkpoints"), async_save=False)
    meta = {"config": config_lib.to_dict(config), "data_position": 0, "tokenizer": "hf",
            "imported_from": model_dir, "metrics": {}}
    checkpointer.save(0, state, meta, force=True)
    checkpointer.close()
  for note in notes:
    metrics.log.info("import-hf: %s", note)
  return config


# ----------------------------------------------------------------------------- export


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json of a workdir, its tokenizer path resolved against the workdir."""
  from fmjax import data
  path = os.path.join(workdir, "config.json")
  cfg = config_lib.check_saved(_read_json(path, "pass the --workdir of an fmjax run"), path)
  return ml_collections.ConfigDict(data.resolve_tokenizer_path(cfg, workdir))


def run_config_at(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, int, dict]:
  """(config, step, metadata) of a workdir's checkpoint `step` (default: the latest): the config that
  checkpoint recorded, its tokenizer path resolved against the workdir, and all it recorded (a
  fine-tuning run's label names and init_from too). config.json is the latest start's (a resume
  with other settings rewrites it, even one that fails before it saves): it stands in only for
  checkpoints that recorded none."""
  from fmjax import checkpoint as ckpt_lib
  from fmjax import data
  config = read_run_config(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not files.isdir(ckpt_dir):
    raise ConfigError(f"{workdir} holds no checkpoints/ directory; train first or pass another --workdir")
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise ConfigError(f"{workdir} holds no checkpoint yet; train first or pass another --workdir")
    meta = checkpointer.restore_meta(step)
  finally:
    checkpointer.close()
  saved = meta.get("config")
  if isinstance(saved, dict) and saved:
    saved = config_lib.check_saved(saved, f"{ckpt_dir}/{step}'s recorded config")
    config = ml_collections.ConfigDict(data.resolve_tokenizer_path(saved, workdir))
  return config, step, meta


def read_params(workdir: str, step: int) -> dict:
  """The params of a workdir's checkpoint `step` exactly as saved, whatever their tree.

  Unlike `generate.load_run` this needs no model to restore into, so checkpoints with extra
  subtrees (a classifier head) load too.
  """
  import jax
  from fmjax import checkpoint as ckpt_lib
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    meta = checkpointer.item_metadata(step, "params")
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), meta,
                            is_leaf=lambda x: hasattr(x, "shape"))
    params = checkpointer.restore(step, {"params": abstract}, items=("params",))["params"]
  finally:
    checkpointer.close()
  return normalise_keys(jax.device_get(params))


def run_tokenizer(workdir: str, config):
  """The tokenizer of a run: `workdir/tokenizer/` if present, else the one its config names."""
  from fmjax import data
  try:
    return data.get_tokenizer(config, workdir)
  except ConfigError as e:
    raise ConfigError(f"cannot load the run's tokenizer ({e})") from None


def _export_tokenizer(tokenizer, model_cfg, out: str, classifier: bool = False, max_length: int | None = None) -> None:
  """tokenizer.json (+ vocab files) and tokenizer_config.json that `AutoTokenizer` loads.

  BERT's adds [CLS]/[SEP] and token types; a GPT classifier's (`classifier`) ends each text with
  <eos> (and opens with the BOS of a tokenizer that frames documents) and pads with `_export_pad_id`, as
  `finetune.encode` builds its rows; a GPT language model's opens with `Tokenizer.bos_id`. Its
  `model_max_length` is `max_length`, the positions training used (a classifier's rows:
  truncating there, HF scores what fine-tuning and `fmjax eval` did; an LM's rows, past which its
  position table was never trained), else the position table.
  """
  import tokenizers as hf_tok
  tok = hf_tok.Tokenizer.from_str(tokenizer.hf.to_str())  # a copy: the post-processor is HF-only
  token = lambda i: None if i is None else tok.id_to_token(i)
  pad_id = _export_pad_id(tokenizer, model_cfg.family, classifier)
  if pad_id == tokenizer.vocab_size:
    tok.add_special_tokens([GPT_CLASSIFIER_PAD])
    assert tok.token_to_id(GPT_CLASSIFIER_PAD) == pad_id, "the pad token must take the next id"
  input_names = ["input_ids", "attention_mask"]
  if model_cfg.family == "bert" and tokenizer.cls_id is not None and tokenizer.sep_id is not None:
    cls, sep = token(tokenizer.cls_id), token(tokenizer.sep_id)
    tok.post_processor = hf_tok.processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tokenizer.cls_id), (sep, tokenizer.sep_id)])
    input_names = ["input_ids", "token_type_ids", "attention_mask"]  # segment B's type 1, for pair classifiers
  elif model_cfg.family == "gpt" and tokenizer.eos_id is not None:
    bos, eos = token(tokenizer.bos_id), token(tokenizer.eos_id)
    specials = sorted({(bos, tokenizer.bos_id), (eos, tokenizer.eos_id)})
    if classifier:
      # Type ids stay 0 and are not returned: GPT2Model adds wte(token_type_ids) when given them.
      opening = f"{bos} " if tokenizer.frames_documents else ""
      tok.post_processor = hf_tok.processors.TemplateProcessing(
          single=f"{opening}$A {eos}", pair=f"{opening}$A {eos} $B {eos}", special_tokens=specials)
    else:
      # A language model's text opens with the BOS (<eos>, for a tokenizer without one), as every document does in
      # fmjax's training and every `fmjax generate` prompt (add_special_tokens=False leaves it out).
      tok.post_processor = hf_tok.processors.TemplateProcessing(
          single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=specials)
  tok.save(os.path.join(out, "tokenizer.json"))
  if tokenizer.kind in ("bpe", "wordpiece") or type(tok.model).__name__ in ("BPE", "WordPiece"):
    tok.model.save(out)  # vocab.json + merges.txt, or vocab.txt: for the slow tokenizer classes
  specials = {"unk_token": token(tokenizer.unk_id), "pad_token": token(pad_id)}
  if model_cfg.family == "gpt":
    specials.update(bos_token=token(tokenizer.bos_id), eos_token=token(tokenizer.eos_id))
  else:
    specials.update(cls_token=token(tokenizer.cls_id), sep_token=token(tokenizer.sep_id),
                    mask_token=token(tokenizer.mask_id))
  specials = {k: v for k, v in specials.items() if v is not None}
  # The template a GPT's conversations were trained in, so that `apply_chat_template` writes them alike; it
  # renders with bos_token and eos_token as fmjax does (`fmjax.data.chat`): these ones.
  chat = {"chat_template": tokenizer.chat_template} if _chats(tokenizer, model_cfg, classifier) else {}
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length or model_cfg.max_len,
               "model_input_names": input_names, **specials, **chat}, f, indent=2)
  with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
    json.dump(specials, f, indent=2)


def _chats(tokenizer, model_cfg, classifier: bool) -> bool:
  """Whether an export holds a chat model: a GPT language model whose tokenizer carries a chat template."""
  return tokenizer.chat_template is not None and model_cfg.family == "gpt" and not classifier


def export_params(params: Mapping, model_cfg, out: str, tokenizer=None, label_names: Sequence[str] = (),
                  max_length: int | None = None) -> str:
  """Writes config.json, model.safetensors and (given one) the tokenizer files of `params` to `out`.

  `max_length`: the positions training used (`generate.trained_positions`), the tokenizer's
  `model_max_length`; the config keeps the whole position table.
  """
  from safetensors.numpy import save_file
  tensors = params_to_hf(params, model_cfg)
  num_labels = int(np.shape(normalise_keys(dict(params))["classifier"]["kernel"])[-1]) if "classifier" in params \
      else None
  pad_id = None if tokenizer is None else _export_pad_id(tokenizer, model_cfg.family, bool(num_labels))
  if pad_id is not None and pad_id >= model_cfg.vocab_size:  # no padding row for the GPT classifier's pad token
    wte = next(e.hf[0] for e in _table(model_cfg) if e.path == ("wte", "embedding"))
    wte_VD = tensors[wte]
    tensors[wte] = np.concatenate(
        [wte_VD, np.zeros((pad_id + 1 - len(wte_VD), wte_VD.shape[1]), wte_VD.dtype)])
    model_cfg = ml_collections.ConfigDict({**model_cfg.to_dict(), "vocab_size": pad_id + 1})
  os.makedirs(out, exist_ok=True)
  config = hf_config(model_cfg, tokenizer, num_labels, label_names)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  generation = {}
  if tokenizer is not None and not num_labels and model_cfg.family == "gpt":
    if tokenizer.vocab_size < model_cfg.vocab_size:
      # The rows past the tokenizer's ids pad the vocabulary (to a multiple of 128) and name no token: fmjax's
      # sampling never picks them, and transformers' `generate` reads this file to do the same.
      generation["suppress_tokens"] = list(range(tokenizer.vocab_size, model_cfg.vocab_size))
    if _chats(tokenizer, model_cfg, False):
      from fmjax.data import chat
      end = chat.end_of_turn_id(tokenizer, tokenizer.chat_template)
      if end is not None and end != tokenizer.eos_id:  # a reply ends there, as in `fmjax generate --chat`
        generation["eos_token_id"] = [tokenizer.eos_id, end]
  if generation:
    generation = {**{k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config},
                  **generation}
    with open(os.path.join(out, "generation_config.json"), "w") as f:
      json.dump(generation, f, indent=2)
  save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  os.chmod(os.path.join(out, "model.safetensors"), 0o644)  # as readable as the files beside it
  if tokenizer is not None:
    _export_tokenizer(tokenizer, model_cfg, out, classifier=bool(num_labels), max_length=max_length)
  return out


def from_finetune(params: dict, config) -> dict:
  """A fine-tuning run's params as the flat tree export reads: LoRA merged into its kernels (a
  classifier's or an SFT run's), a classifier's `{trunk, head}` with the head as `classifier`.
  Pretraining params pass through unchanged."""
  ft = config.get("finetune") or {}
  mode = config_lib.peft_mode(config)
  if mode == "adapter":
    raise ConfigError("bottleneck adapters have no Hugging Face counterpart; export a run fine-tuned with "
                      "finetune.peft=lora (merged into the kernels), bitfit, head or none")
  if mode == "lora":
    from fmjax import peft
    params = peft.merge_lora(params, ft["lora_alpha"], ft["lora_rank"])
  if not ("trunk" in params and "head" in params):
    return params
  from fmjax import finetune
  pooling = finetune.pooling_of(config)
  if pooling != finetune.POOLINGS[config.model.family][0]:
    raise ConfigError(f"a classifier with finetune.pooling={pooling} has no Hugging Face counterpart (its "
                      "sequence classifiers pool [CLS] for BERT, the last token for GPT); export a run with "
                      "finetune.pooling=auto")
  flat = dict(params["trunk"])
  flat["classifier"] = dict(params["head"])
  if "bias" not in flat["classifier"] and config.model.family == "bert":  # finetune.head_bias=false: a zero bias
    flat["classifier"]["bias"] = np.zeros(np.shape(flat["classifier"]["kernel"])[-1], np.float32)
  return flat


def export(workdir: str, out: str, fmt: str = "hf", step: int | None = None) -> str:
  """Exports a workdir's checkpoint (latest or `step`) as a Hugging Face model directory `out`."""
  if fmt != "hf":
    raise ConfigError(f"--format={fmt!r} is not supported; use --format=hf")
  out = files.absolute(out)
  check_new_dir(out, "--out")
  from fmjax import generate
  config, step, meta = run_config_at(workdir, step)
  hf_model_type(config.model)  # a decoder HF lacks is refused before any reading
  params = from_finetune(read_params(workdir, step), config)
  tokenizer = run_tokenizer(workdir, config)
  with staged_dir(out, ".exporting") as staging:
    export_params(params, config.model, staging, tokenizer, tuple(meta.get("label_names") or ()),
                  generate.trained_positions(config, workdir))
  return out


@contextlib.contextmanager
def staged_dir(out: str, suffix: str):
  """Yields a scratch directory (not yet made) that becomes `out` only if the block succeeds, so
  nothing is left half-written. A bucket `out` is staged on this machine and copied up at the end."""
  if files.is_remote(out):
    scratch = tempfile.mkdtemp(prefix="fmjax-staging-")
    try:
      yield os.path.join(scratch, "out")
      files.copy_tree(os.path.join(scratch, "out"), out)
    finally:
      shutil.rmtree(scratch, ignore_errors=True)
    return
  staging = out.rstrip("/") + suffix
  shutil.rmtree(staging, ignore_errors=True)
  try:
    yield staging
    if os.path.isdir(out):
      os.rmdir(out)
    os.rename(staging, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------- command line


def cli_import(argv: list[str]) -> int:
  """`fmjax import-hf --model_dir=DIR --workdir=OUT [--config=configs/X.py[:args]] [--config.a.b=v ...]`."""
  from fmjax import cli, metrics
  rest, overrides = config_lib.split_overrides(argv)
  p = cli.ArgumentParser(prog="fmjax import-hf")
  p.add_argument("--model_dir", required=True, help="HF directory: config.json, weights, tokenizer files")
  p.add_argument("--workdir", required=True, help="new fmjax workdir to write")
  p.add_argument("--config", default=None, help="base config (default: configs/gpt.py or configs/bert.py)")
  args = p.parse_args(rest)
  metrics.setup_logging()
  config = import_hf(args.model_dir, args.workdir, args.config, overrides)
  m = config.model
  print(f"imported {m.family} ({_HF_NAMES[hf_model_type(m)]} architecture, {m.num_layers} layers, d_model "
        f"{m.d_model}, vocab {m.vocab_size}) into {files.absolute(args.workdir)}")
  return 0


def cli_export(argv: list[str]) -> int:
  """`fmjax export --workdir=W --out=DIR [--format=hf] [--step=N]`."""
  from fmjax.cli import ArgumentParser
  p = ArgumentParser(prog="fmjax export")
  p.add_argument("--workdir", required=True, help="fmjax run directory (config.json + checkpoints/)")
  p.add_argument("--out", required=True, help="new directory for the Hugging Face files")
  p.add_argument("--format", default="hf", choices=["hf"])
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  args = p.parse_args(argv)
  print(export(args.workdir, args.out, args.format, args.step))
  return 0
