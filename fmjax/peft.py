"""Parameter-efficient fine-tuning: LoRA, bottleneck adapters, BitFit and head-only.

`apply(model, finetune_cfg, rngs)` swaps the targeted `Dense` layers of a built model for
subclasses that keep the original `kernel`/`bias` parameters (same paths, so a pretrained
trunk still restores into them) and add their own small ones:

  lora     LoRADense: y = x.W + b + (alpha/r) (x.A).B, A ~ N(0, 1/fan_in), B = 0, so training
           starts from the pretrained function (Hu et al., 2021).
  adapter  AdapterDense on sublayer outputs: y + up(gelu(down(y))), up = 0 at init (Houlsby et
           al., 2019); layer norms train too.
  bitfit   no new parameters: only biases (and the head) train (Ben Zaken et al., 2021).
  head     only the new task head trains (classifiers: SFT has none).

Classification (`finetune.Classifier`) and SFT (the GPT itself, `train.model_factory`) both
apply it from their config's `finetune` section. `trainable_mask(params, peft)` is the bool tree
that `optim.make_optimizer` uses to freeze everything else (frozen leaves get zero updates, no
Adam moments). `merge_lora` folds LoRA into the base kernels for export.
"""

from __future__ import annotations

import fnmatch
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fmjax import models
from fmjax.config_lib import ConfigError

MODES = ("none", "lora", "adapter", "bitfit", "head")
WRAPS = ("lora", "adapter")  # the modes that wrap Dense layers with parameters of their own
HEAD = "head"  # the task head's attribute: always trainable
# BERT's pooler (the [CLS] pooling's tanh(W h)) trains with the head: masked-LM pretraining never
# trains it (BERT's own came from next-sentence prediction), so frozen it would stay random.
POOLER = ("trunk", "pooler")
LORA_LEAVES = ("lora_a", "lora_b")


def _names(param) -> tuple:
  names = param.get_metadata().get("out_sharding") or (None,) * param.ndim
  return tuple(names)


def _contract(x, w, n_in: int):
  """x [..., *in] . w [*in, ...] over the last n_in axes of x."""
  dims = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
  return jax.lax.dot_general(x, w, (dims, ((), ())))


class LoRADense(models.Dense):
  """A Dense with a rank-r update; keeps the wrapped layer's kernel and bias parameters."""

  def __init__(self, base: models.Dense, *, rank: int, alpha: float, rngs: nnx.Rngs):
    self.n_in, self.dtype = base.n_in, base.dtype
    self.kernel, self.bias = base.kernel, base.bias
    shape, names = self.kernel.shape, _names(self.kernel)
    in_shape, out_shape = shape[:self.n_in], shape[self.n_in:]
    fan_in = int(np.prod(in_shape))
    dtype = self.kernel.dtype
    self.scale = float(alpha) / rank
    self.lora_a = models._param(rngs, nnx.initializers.normal(fan_in ** -0.5), in_shape + (rank,),
                                names[:self.n_in] + (None,), dtype)
    self.lora_b = models._param(rngs, nnx.initializers.zeros, (rank,) + out_shape, (None,) + names[self.n_in:],
                                dtype)

  def lora_delta(self, x):
    """The low-rank term alone, (alpha/r) (x.A).B, in the compute dtype."""
    h = _contract(x.astype(self.dtype), self.lora_a[...].astype(self.dtype), self.n_in)
    return self.scale * _contract(h, self.lora_b[...].astype(self.dtype), 1)

  def project(self, x):
    """The frozen projection plus the scaled low-rank update."""
    return super().project(x) + self.lora_delta(x)


class AdapterDense(models.Dense):
  """A Dense followed by a residual bottleneck adapter; keeps the wrapped kernel and bias."""

  bias_is_last = False

  def __init__(self, base: models.Dense, *, dim: int, rngs: nnx.Rngs):
    self.n_in, self.dtype = base.n_in, base.dtype
    self.kernel, self.bias = base.kernel, base.bias
    out_shape = self.kernel.shape[self.n_in:]
    if len(out_shape) != 1:
      raise ConfigError(f"adapters go on layers with a flat output; this one outputs {out_shape}: "
                        "target attention.out / mlp.proj instead")
    d = out_shape[0]
    kw = dict(dtype=self.dtype, param_dtype=self.kernel.dtype, rngs=rngs)
    self.adapter_down = models.Dense((d,), (dim,), ("embed", None), std=1e-2, **kw)
    self.adapter_up = models.Dense((dim,), (d,), (None, "embed"), std=0.0, **kw)

  def __call__(self, x):
    y = super().__call__(x)
    return y + self.adapter_up(jax.nn.gelu(self.adapter_down(y)))


# ----------------------------------------------------------------------------- applying


def _path_str(path) -> str:
  return ".".join(map(str, path))


def dense_layers(model: nnx.Module) -> list[tuple[tuple, models.Dense]]:
  """(path, layer) of every Dense in the model outside the task head."""
  return [(tuple(path), node) for path, node in nnx.iter_graph(model)
          if isinstance(node, models.Dense) and path and path[0] != HEAD and
          not any(str(p).startswith("adapter_") for p in path)]


def _matches(path, pattern: str) -> bool:
  s = _path_str(path)
  if fnmatch.fnmatchcase(s, pattern) or fnmatch.fnmatchcase(s, "*." + pattern):
    return True
  # A pattern for the fused query/key/value projection (`attn.qkv`) names them in grouped-query
  # attention too, where they are two: q and kv.
  return pattern.endswith("qkv") and any(_matches(path, pattern[:-3] + part) for part in ("q", "kv"))


def match_targets(model: nnx.Module, patterns) -> list[tuple[tuple, models.Dense]]:
  """The Dense layers whose dotted path (or its tail) matches any pattern; none fails in one line."""
  layers = dense_layers(model)
  hits = [(p, m) for p, m in layers if any(_matches(p, pat) for pat in patterns)]
  if not hits:
    names = sorted({re.sub(r"\.\d+\.", ".*.", _path_str(p)) for p, _ in layers})
    raise ConfigError(f"PEFT targets {list(patterns)} match no module; Dense modules are: {', '.join(names)}")
  return hits


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  setattr(parent, path[-1], new)


def apply(model: nnx.Module, fcfg, rngs: nnx.Rngs) -> nnx.Module:
  """Adds the PEFT parameters of `fcfg.peft` to `model` in place; returns the model."""
  mode = fcfg.peft
  if mode not in MODES:
    raise ConfigError(f"finetune.peft={mode!r} is not one of {list(MODES)}")
  if mode not in WRAPS:
    return model
  if any(getattr(m, "scan", False) for _, m in nnx.iter_graph(model) if isinstance(m, models.Layers)):
    raise ConfigError(f"finetune.peft={mode} needs unrolled layers; set model.scan_layers=false")
  if mode == "lora":
    if fcfg.lora_rank <= 0:
      raise ConfigError(f"finetune.lora_rank must be positive, got {fcfg.lora_rank}")
    if not 0 < fcfg.lora_alpha < math.inf:  # the update is (alpha/r) (x.A).B: at 0, A and B get no gradient
      raise ConfigError(f"finetune.lora_alpha must be finite and above 0 (the low-rank update is scaled by "
                        f"lora_alpha / lora_rank, and at 0 LoRA learns nothing), got {fcfg.lora_alpha}")
    for path, layer in match_targets(model, fcfg.lora_targets):
      _replace(model, path, LoRADense(layer, rank=fcfg.lora_rank, alpha=fcfg.lora_alpha, rngs=rngs))
  else:
    if fcfg.adapter_dim <= 0:
      raise ConfigError(f"finetune.adapter_dim must be positive, got {fcfg.adapter_dim}")
    for path, layer in match_targets(model, fcfg.adapter_targets):
      _replace(model, path, AdapterDense(layer, dim=fcfg.adapter_dim, rngs=rngs))
  return model


# ----------------------------------------------------------------------------- freezing


def _keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _is_norm(keys) -> bool:
  return any({"ln", "norm"} & set(k.split("_")) for k in keys)  # ln_1, attention_ln, layer_norm, q_norm ...


def is_trainable(keys: tuple[str, ...], mode: str) -> bool:
  """Whether the parameter at `keys` trains under `mode`."""
  if mode == "none" or keys[0] == HEAD or keys[:2] == POOLER:
    return True
  if mode == "lora":
    return keys[-1] in LORA_LEAVES
  if mode == "adapter":
    return any(k.startswith("adapter_") for k in keys) or _is_norm(keys)
  if mode == "bitfit":
    return keys[-1] == "bias"
  return False  # head


def trainable_mask(params, mode: str):
  """A bool tree over `params`: True where the parameter trains."""
  return jax.tree_util.tree_map_with_path(lambda p, _: is_trainable(_keys(p), mode), params)


def count(params, mode: str) -> tuple[int, int]:
  """(trainable, total) parameter counts (works on abstract params too)."""
  trainable = total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    n = int(np.prod(leaf.shape))
    total += n
    trainable += n if is_trainable(_keys(path), mode) else 0
  return trainable, total


# ----------------------------------------------------------------------------- export


def merge_lora(params: dict, alpha: float, rank: int) -> dict:
  """Folds every LoRA pair into its kernel (W + alpha/r A.B) and drops the LoRA leaves.

  The result has the plain (no-PEFT) model's structure: load it into a model built with
  finetune.peft=none, or export it.
  """
  scale = float(alpha) / rank

  def visit(node):
    if not isinstance(node, dict):
      return node
    out = {k: visit(v) for k, v in node.items() if k not in LORA_LEAVES}
    if "lora_a" in node and "lora_b" in node:
      a, b = jnp.asarray(node["lora_a"], jnp.float32), jnp.asarray(node["lora_b"], jnp.float32)
      kernel = node["kernel"]
      delta = jnp.tensordot(a, b, axes=1) * scale
      out["kernel"] = (jnp.asarray(kernel, jnp.float32) + delta).astype(kernel.dtype)
    return out

  return visit(params)
