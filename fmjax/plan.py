"""`fmjax plan`: what a config costs on a mesh or TPU topology, before anything runs.

  fmjax plan --config=configs/gpt.py:small --mesh=data=2,fsdp=4        # 8 fake CPU devices here
  fmjax plan --config=configs/gpt.py:xl --topology=v5p-128    # needs pip install 'jax[tpu]==<JAX version>'
  fmjax plan --config=configs/gpt.py:xl --topology=v5p:4x4x4 --config.mesh.fsdp=-1 --config.mesh.data=1
  fmjax plan --config=configs/gpt.py:small --topology=v5p-128 --num-slices=2   # multi-slice: dcn_data=2

The train step is compiled ahead of time from abstract inputs (`jax.ShapeDtypeStruct`s carrying
their shardings), so no parameter is ever materialised. The plan reports parameter count,
FLOPs per token (6*N + 12*L*D*T) and per step next to XLA's own count, per-device memory for
parameters, optimizer state and XLA's temporary buffers (activations, gradients, workspace) from
`compiled.memory_analysis()`, the sharding of each parameter group, and whether the peak fits the
device's HBM. With `--num-slices=N` the topology is N slices joined over the data-centre network
(DCN), as `fmjax launch --num-slices=N` makes them; `mesh.dcn_data` spans the slices, and the
collectives that cross them (the gradient all-reduce) are reported apart from those within a slice.

For a TPU topology the real TPU compiler runs on this host through libtpu
(`jax.experimental.topologies`), and for `--gpu=h100x8` XLA's GPU compiler through JAX's CUDA
plugin, with no GPU present. Without the compiler the plan falls back to an analytic estimate:
parameter and optimizer bytes are still exact (from the shardings), activations come from a
formula, and the output says so.

  fmjax plan --config=configs/gpt.py:xl --gpu=h100x8 --config.mesh.fsdp=-1 --config.mesh.data=1
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import difflib
import math
import os
import re

import ml_collections

from fmjax import config_lib
from fmjax.config_lib import ConfigError

GiB = 2**30
MiB = 2**20

# Cloud TPU accelerator prefixes -> the generation names libtpu's topology strings use.
_LIBTPU_FAMILY = {"v4": "v4", "v5litepod": "v5e", "v5p": "v5p", "v6e": "v6e"}
_TOPOLOGY_RE = re.compile(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})")


class PlanError(ConfigError):
  """Bad plan input (mesh, topology, HBM); the message is one line saying what to do."""


def hbm_gib_for(kind: str) -> float | None:
  """HBM per device for a device kind or accelerator name, or None when unknown (e.g. CPU)."""
  from fmjax import metrics
  spec = metrics.device_spec(kind)
  return spec and float(spec[1])


# ----------------------------------------------------------------------------- targets


MAX_FAKE_DEVICES = 1024  # beyond this, compiling for fake CPU devices takes too long: plan a --topology


def parse_mesh(text: str) -> dict[str, int]:
  """`data=2,fsdp=4` -> {"dcn_data": 1, "data": 2, "fsdp": 4, "tensor": 1}; -1 fills the rest."""
  from fmjax.sharding import MESH_AXES
  sizes = {a: 1 for a in MESH_AXES}
  given = set()
  for part in filter(None, (p.strip() for p in text.split(","))):
    axis, _, value = part.partition("=")
    if axis in given:
      raise PlanError(f"--mesh={text} gives {axis} twice; give each axis once")
    given.add(axis)
    if axis not in sizes:
      # Other codebases' names for the same axes first (dp, tp, ...), then spelling.
      alias = {"dp": "data", "tp": "tensor", "mp": "tensor", "model": "tensor",
               "dcn": "dcn_data", "slice": "dcn_data"}.get(axis)
      close = [alias] if alias else difflib.get_close_matches(axis, MESH_AXES, n=1)
      hint = f"; did you mean {close[0]!r}?" if close else f"; the axes are {', '.join(MESH_AXES)}"
      raise PlanError(f"unknown mesh axis {axis!r} in --mesh={text}{hint}")
    try:
      sizes[axis] = int(value)
    except ValueError:
      raise PlanError(f"--mesh={text}: {axis} needs an integer size, e.g. {axis}=4") from None
    if sizes[axis] == 0 or sizes[axis] < -1:
      raise PlanError(f"--mesh={text}: {axis}={sizes[axis]}; a size is positive, or -1 for the devices left")
  return sizes


def _chip_grid(chips: int, ndim: int) -> list[int]:
  """A balanced torus shape for `chips`: 64 -> 4x4x4, 8 -> 2x4 (2-D), 4 -> 2x2x1."""
  dims, rest = [1] * ndim, chips
  while rest % 2 == 0 and rest > 1:
    dims[dims.index(min(dims))] *= 2
    rest //= 2
  dims = sorted(dims)
  dims[-1] *= rest
  return [d for d in dims if d > 1] + [d for d in dims if d == 1]


def topology_name(name: str) -> tuple[str, int]:
  """`v5p-128` (Cloud TPU name) or `v5p:4x4x4` (libtpu name) -> (libtpu name, chips)."""
  from fmjax import launch
  match = _TOPOLOGY_RE.fullmatch(name)
  if match:
    dims = [int(d) for d in match.group(2).split("x")]
    ndim = 3 if match.group(1) in ("v4", "v5p") else 2
    if len(dims) != ndim or 0 in dims:
      raise PlanError(f"TPU topology {name!r}: {match.group(1)} chips form a {ndim}-D grid of positive sizes "
                      f"(e.g. {match.group(1)}:{'x'.join(['4'] * ndim)}), or pass an accelerator type (e.g. "
                      f"{'v5p-128' if ndim == 3 else 'v6e-64'})")
    return name, math.prod(dims)
  if ":" in name:
    family = name.split(":")[0]
    close = difflib.get_close_matches(family, ("v4", "v5e", "v5p", "v6e"), n=1)
    if family in ("v4", "v5e", "v5p", "v6e"):  # the shape is what is wrong
      hint = f"{family} takes {3 if family in ('v4', 'v5p') else 2} sizes"
    elif close:
      hint = f"did you mean {close[0] + ':' + name.split(':', 1)[1]!r}?"
    else:
      hint = "the generations are v4, v5e, v5p, v6e"
    raise PlanError(f"unknown TPU topology {name!r}: write GEN:AxB[xC] (e.g. v5p:4x4x4) or an accelerator type "
                    f"(e.g. v5p-128); {hint}")
  try:
    acc = launch.parse_accelerator(name)
  except launch.LaunchError as e:
    raise PlanError(f"--topology: {e}") from None
  family = _LIBTPU_FAMILY[acc.family.prefix]
  ndim = 3 if family in ("v4", "v5p") else 2
  return f"{family}:{'x'.join(map(str, _chip_grid(acc.chips, ndim)))}", acc.chips


def tpu_devices(name: str, num_slices: int = 1):
  """(devices, libtpu topology name) of a TPU topology, or (None, name) when libtpu is not installed.

  With `num_slices` > 1 the devices are that many copies of the topology joined over the data-centre
  network (multi-slice), each device carrying its `slice_index`.
  """
  libtpu_name, _ = topology_name(name)
  try:
    import libtpu  # noqa: F401  (only to learn whether it is there)
  except ImportError:
    return None, libtpu_name
  # Several processes on one host may load libtpu only with this set; the plan never runs on a TPU.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  # A v4 chip's two TensorCores run as one device (megacore), as on a real v4; libtpu's default
  # description has a device per core, half a chip's HBM each.
  kwargs = {"chip_config_name": "megacore"} if libtpu_name.startswith("v4:") else {}
  if num_slices > 1:
    kwargs["num_slices"] = num_slices
  try:
    topo = topologies.get_topology_desc(topology_name=libtpu_name, platform="tpu", **kwargs)
  except Exception as e:  # libtpu reports a bad shape as a runtime error; keep its first line
    raise PlanError(f"libtpu cannot build topology {libtpu_name!r}: {str(e).splitlines()[0]}") from None
  return list(topo.devices), libtpu_name


# XLA's description of each GPU it can compile for with none present (as in XLA's
# xla/tools/hlo_opt/gpu_specs), plus the cuDNN and CUDA versions a device would report.
GPU_MEM_FRACTION = 0.75  # of a GPU's memory that XLA takes unless XLA_PYTHON_CLIENT_MEM_FRACTION says
CUDNN_VERSION = 91000  # 9.10: compiling cuDNN attention graphs without a device needs 9.8 or later
GPU_TARGETS = {
    "h100": f"""
gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84978434048 shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {CUDNN_VERSION // 10000} minor: {CUDNN_VERSION // 100 % 100} }}
runtime_version {{ major: 13 }}
device_description_str: "NVIDIA H100 80GB HBM3"
""",
}
_GPU_RE = re.compile(r"([a-z][a-z0-9]*?)(?:x(\d+))?")


def gpu_name(name: str) -> tuple[str, int]:
  """`h100` or `h100x8` -> ("h100", 8): a GPU model XLA can compile for, and how many."""
  match = _GPU_RE.fullmatch(name.strip().lower())
  if not match or match.group(1) not in GPU_TARGETS or (match.group(2) and int(match.group(2)) < 1):
    raise PlanError(f"unknown GPU target {name!r}: write MODEL or MODELxCOUNT with MODEL one of "
                    f"{', '.join(GPU_TARGETS)} (e.g. --gpu=h100x8)")
  return match.group(1), int(match.group(2) or 1)


def gpu_devices(name: str):
  """(devices, label) of `count` GPUs of a model, compile-only; (None, label) without the CUDA plugin.

  JAX registers its CUDA plugin's compile-only topologies when the plugin is installed and either a
  GPU is present or JAX_PLATFORMS=cpu (which `fmjax plan --gpu` sets: the plan runs nothing).
  """
  model, count = gpu_name(name)
  label = f"{count} x {model.upper()}"
  from jax.experimental import topologies
  try:
    topo = topologies.get_topology_desc(platform="cuda", topology=f"1x1x{count}", target_config=GPU_TARGETS[model])
  except (NotImplementedError, ImportError, RuntimeError):
    return None, label
  return list(topo.devices), label


@contextlib.contextmanager
def compiling_for_gpu():
  """Traces for a GPU from a host that may have none: fmjax picks the GPU kernels
  (`attention.compiling_for`), and JAX's cuDNN version and capability checks, which would ask a
  device, answer as a `GPU_TARGETS` GPU does. A check JAX has moved is left alone."""
  from unittest import mock

  from fmjax import attention
  try:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
  except ImportError:
    cudnn_fa = None
  patches = [(attention, "_has_compute_capability", lambda *a: True),
             (cudnn_fa, "check_cudnn_version", lambda: CUDNN_VERSION),
             (cudnn_fa, "check_compute_capability", lambda c: True)]
  with contextlib.ExitStack() as stack:
    for module, name, f in patches:
      if hasattr(module, name):
        stack.enter_context(mock.patch.object(module, name, f))
    stack.enter_context(attention.compiling_for("gpu"))
    yield


# ----------------------------------------------------------------------------- layout


@dataclasses.dataclass
class Leaf:
  """One parameter or optimizer array: its global shape, mesh spec and per-device shard."""
  path: str
  shape: tuple[int, ...]
  dtype: str
  spec: tuple
  shard_shape: tuple[int, ...]

  @property
  def shard_bytes(self) -> int:
    """Bytes of one device's shard."""
    import numpy as np
    return math.prod(self.shard_shape) * np.dtype(self.dtype).itemsize


def _shard_shape(shape, spec, mesh_sizes: dict[str, int]) -> tuple[int, ...]:
  out = []
  for i, dim in enumerate(shape):
    axes = spec[i] if i < len(spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    out.append(math.ceil(dim / math.prod(mesh_sizes[a] for a in axes)))
  return tuple(out)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def layout(config, mesh_sizes: dict[str, int], tx) -> tuple[list[Leaf], list[Leaf]]:
  """Per-device shards of every parameter and optimizer leaf, from the logical axis rules alone.

  Needs no devices, so it serves TPU topologies without libtpu as well as real meshes.
  """
  import jax
  import optax
  from flax import nnx
  from jax.sharding import PartitionSpec as P
  from fmjax import sharding, train

  with nnx.logical_axis_rules(sharding.logical_rules(config)):
    model = nnx.eval_shape(train.model_factory(config))  # the run's model: an SFT config's PEFT parameters too
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
  params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                        nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  opt = jax.eval_shape(tx.init, params)
  is_spec = lambda x: isinstance(x, P)
  masked = lambda x: isinstance(x, optax.MaskedNode)  # a parameter finetune.peft freezes has no optimizer state
  opt_specs = optax.tree_map_params(tx, lambda p, s: p if masked(p) else s, opt, specs,
                                    transform_non_params=lambda _: P(), is_leaf=lambda x: is_spec(x) or masked(x))

  def leaves(tree, spec_tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    flat_specs = jax.tree_util.tree_leaves(spec_tree, is_leaf=is_spec)
    return [Leaf(_path_str(p), tuple(a.shape), str(a.dtype), tuple(s), _shard_shape(a.shape, tuple(s), mesh_sizes))
            for (p, a), s in zip(flat, flat_specs)]

  return leaves(params, specs), leaves(opt, opt_specs)


def groups(param_leaves: list[Leaf]) -> list[dict]:
  """Parameters with the layer index folded (`h/blocks/*/mlp/fc/kernel`), one row per group."""
  out: dict[str, dict] = {}
  for leaf in param_leaves:
    name = re.sub(r"/\d+/", "/*/", leaf.path)
    row = out.setdefault(name, {"group": name, "count": 0, "shape": leaf.shape, "spec": leaf.spec,
                                "shard_shape": leaf.shard_shape})
    row["count"] += 1
  return list(out.values())


# ----------------------------------------------------------------------------- memory


def analytic_temp_bytes(config, mesh_sizes: dict[str, int], param_bytes: int, kernel: str = "xla") -> int:
  """A formula for XLA's temporary buffers in one train step, per device.

  Gradients (one copy of the local parameters) plus saved activations. Per token and layer
  the block keeps about 16*D values for GPT-2 (the two norms' inputs and the residual stream, 4*D;
  q/k/v, 3*D, or H*K + 2*G*K with G key/value heads and K = model.head_dim; the attention output,
  H*K; with model.qk_norm the q and k norms' inputs, H*K + G*K more; the MLP hidden before and after
  GELU, 2*F, or SwiGLU's gate, up and product, 3*F), plus 2*H*T for attention scores and
  probabilities unless the
  attention `kernel` is a flash kernel (splash, cudnn), which keeps none (Korthikanti et al.,
  2022 count 34*D + 5*H*T bytes at 16 bits with dropout masks). Remat keeps only each layer's
  input and recomputes one layer at a time. The LM head's logits and their gradient come on
  top: float32, or one chunk in the compute dtype with the fused loss. Tensor parallelism
  divides all of it but the fused loss's copy of the head.
  """
  from fmjax import models, sharding
  m, t = config.model, config.data.seq_len
  dp = sharding.data_parallel_size(mesh_sizes)
  tp = mesh_sizes["tensor"]
  rows = max(1, config.train.batch_size // config.train.grad_accum // dp)
  tokens = rows * t
  act_bytes = 2 if m.dtype in ("bfloat16", "float16") else 4
  scores = 0 if kernel in ("splash", "cudnn") else 2 * m.num_heads * t
  arch = models.architecture(m)
  q_width = m.num_heads * models.head_dim(m)
  kv_width = (arch["num_kv_heads"] or m.num_heads) * models.head_dim(m)
  qk_norm = q_width + kv_width if arch["qk_norm"] else 0
  mlp = (3 if arch["mlp"] == "swiglu" else 2) * m.d_ff
  per_layer = tokens * (4 * m.d_model + q_width + 2 * kv_width + q_width + qk_norm + mlp + scores) * act_bytes / tp
  if m.remat == "none":
    acts = m.num_layers * per_layer
  elif m.remat == "full":
    acts = m.num_layers * tokens * m.d_model * act_bytes + per_layer
  else:  # the dots policies keep matmul outputs: about half of a layer's activations
    acts = m.num_layers * per_layer / 2 + per_layer
  logit_rows = rows * (config.data.max_predictions if config.train.objective == "mlm" else t)
  if m.fused_loss_chunk:
    # Each device loops over its own rows (split over tensor too) with the whole head: one chunk of
    # logits and of their gradient in the compute dtype, the head's weight and its float32 gradient.
    logits = 2 * min(math.ceil(logit_rows / tp), m.fused_loss_chunk) * m.vocab_size * act_bytes
    logits += m.vocab_size * m.d_model * (act_bytes + 4 + (4 if dp * tp > 1 else 0))
  else:
    logits = 3 * logit_rows * m.vocab_size * 4 / tp
  return int(param_bytes + acts + logits)


def _batch_bytes(config, dp: int) -> int:
  from fmjax import bench
  host = bench.synthetic_batch(config, batch_size=1)
  rows = math.ceil(config.train.batch_size / dp)
  return sum(rows * v[0].nbytes for v in host.values())


# ----------------------------------------------------------------------------- plan


def plan(config, *, mesh: str | dict | None = None, topology: str | None = None, gpu: str | None = None,
         hbm_gib: float | None = None, devices=None, num_slices: int = 1) -> dict:
  """Plans one train step of `config`; returns a dict of the figures (see `format_plan`).

  mesh: `data=2,fsdp=4` (or a dict of axis sizes); without it the config's mesh is used.
  topology: a TPU (`v5p-128` or `v5p:4x4x4`) to compile for instead of this host's devices.
  gpu: GPUs (`h100x8`) to compile for instead of this host's devices.
  hbm_gib: HBM per device to judge "fits" against; default from the device kind or topology.
  num_slices: slices of `topology` joined over DCN; `mesh.dcn_data` (1 or -1: the slice count) spans them.
  """
  import jax
  from flax import nnx
  from fmjax import attention, models, optim, sharding, train

  config_lib.check_pretraining_step(config, "plan")
  if hbm_gib is not None and not hbm_gib > 0:  # before a compile that may take minutes
    raise PlanError(f"--hbm_gib must be positive, got {hbm_gib}")
  if num_slices < 1:
    raise PlanError(f"--num-slices must be at least 1, got {num_slices}")
  if num_slices > 1 and not topology:
    raise PlanError(f"--num-slices={num_slices} counts TPU slices: give the slice with --topology (e.g. "
                    "--topology=v5p-128); on other devices, split the batch with mesh.dcn_data instead")
  config = ml_collections.ConfigDict(config_lib.to_dict(config))  # an unlocked copy: the plan edits it
  notes = []
  if mesh is not None:
    sizes = parse_mesh(mesh) if isinstance(mesh, str) else dict(mesh)
    if num_slices > 1 and sizes.get("dcn_data", 1) == 1:  # --mesh lays out a slice; dcn_data is the slices
      sizes["dcn_data"] = num_slices
    dropped = [f"{a}={config.mesh[a]}" for a, n in sizes.items() if n == 1 and config.mesh.get(a, 1) not in (1, -1)]
    if dropped:
      notes.append(f"--mesh gives the whole mesh: the config's {', '.join(dropped)} is 1 here (add it to --mesh to "
                   "keep it)")
    config.mesh.update(sizes)
  if topology:
    dcn = int(config.mesh.dcn_data)
    if dcn in (1, -1):
      config.mesh.dcn_data = num_slices
    elif num_slices == 1:
      raise PlanError(f"mesh.dcn_data={dcn} splits the batch across TPU slices but --topology={topology} is one "
                      f"slice: add --num-slices={dcn} to plan {dcn} slices of it, or set --config.mesh.dcn_data=1")
    elif dcn != num_slices:
      raise PlanError(f"mesh.dcn_data={dcn} but --num-slices={num_slices}: dcn_data spans the slices, one index "
                      f"each; set --config.mesh.dcn_data={num_slices} (or leave it at 1)")

  target, libtpu_name, compiled_ok = "", None, True
  if topology:
    devices, libtpu_name = tpu_devices(topology, num_slices)
    target = f"TPU topology {libtpu_name}" + (f" ({topology})" if topology != libtpu_name else "")
    target = f"{num_slices} slices of {target}" if num_slices > 1 else target
    if devices is None:
      compiled_ok = False
      num_devices = topology_name(topology)[1] * num_slices
      kind = libtpu_name.split(":")[0]
      notes.append("libtpu is not installed, so nothing was compiled: parameter and optimizer bytes are exact, "
                   "temp (activations, gradients) is an ANALYTIC ESTIMATE. `pip install libtpu` (best "
                   f"`pip install 'jax[tpu]=={jax.__version__}'`, the libtpu of this JAX) for the TPU compiler's "
                   "own figures")
    else:
      num_devices, kind = len(devices), devices[0].device_kind
  elif gpu:
    devices, target = gpu_devices(gpu)
    if devices is None:
      compiled_ok = False
      model, num_devices = gpu_name(gpu)
      kind = model
      notes.append("JAX's CUDA plugin is not installed, so nothing was compiled: parameter and optimizer bytes "
                   "are exact, temp (activations, gradients) is an ANALYTIC ESTIMATE. `pip install "
                   "\"jax-cuda13-plugin[with-cuda]==<this JAX's version>\"` for XLA's own figures")
    else:
      num_devices, kind = len(devices), devices[0].device_kind
  else:
    devices = list(devices if devices is not None else jax.devices())
    wanted = math.prod(abs(int(config.mesh[a])) for a in sharding.MESH_AXES)
    if -1 not in [int(config.mesh[a]) for a in sharding.MESH_AXES]:
      if wanted > len(devices):
        raise PlanError(f"the mesh needs {wanted} devices but {len(devices)} are available; on a CPU host "
                        f"run `fmjax plan` itself (it fakes {wanted} CPU devices) or plan for a --topology")
      devices = devices[:wanted]
    num_devices, kind = len(devices), devices[0].device_kind
    target = f"{num_devices} x {kind}"
    if devices[0].platform == "cpu":
      notes.append("compiled for fake CPU devices by XLA's CPU compiler: memory figures are indicative of, "
                   "not equal to, a TPU's or GPU's")

  config_lib.validate(config, num_devices)
  if config.model.scan_layers and config.model.remat == "none":
    notes.append("scan_layers with model.remat=none stacks every layer's saved activations (on a v5p, 1.6x the "
                 "temporaries of unrolled layers for GPT-2 124M); a remat policy such as dots_no_batch or "
                 "save_attention_out is scan's usual pair")
  mesh_sizes = sharding.mesh_shape(config, num_devices)
  dp = sharding.data_parallel_size(mesh_sizes)
  tx = optim.make_optimizer(config)
  param_leaves, opt_leaves = layout(config, mesh_sizes, tx)
  abstract = nnx.eval_shape(train.model_factory(config))
  n_params = models.param_count(abstract)
  n_no_pos = models.param_count(abstract, exclude_positions=True)
  tokens_per_step = config.train.batch_size * config.data.seq_len
  fpt = models.flops_per_token(config.model, config.data.seq_len)

  param_bytes = sum(l.shard_bytes for l in param_leaves)
  opt_bytes = sum(l.shard_bytes for l in opt_leaves)
  batch_bytes = _batch_bytes(config, dp)
  # A TPU topology or GPU target is not this host: "auto" means that platform's kernel (splash,
  # lowered to its Mosaic kernel and never Pallas interpret mode; cuDNN), not this host's.
  platform = "tpu" if topology else "gpu" if gpu else devices[0].platform
  with attention.compiling_for(platform):
    kernel = attention.resolve_kernel(config.model.attention, config.model.dtype, (config.data.seq_len,) * 2,
                                     dropout=config.model.get("attention_dropout", 0.0) > 0)
    # A kernel named for another platform fails the run's trace; an analytic plan traces nothing.
    attention.check_kernel(kernel, config.model.dtype, (config.data.seq_len,))
  analytic_temp = analytic_temp_bytes(config, mesh_sizes, param_bytes, kernel)
  memory = {"params": param_bytes, "optimizer": opt_bytes, "batch": batch_bytes,
            "temp_analytic": analytic_temp,
            "peak_analytic": param_bytes + opt_bytes + batch_bytes + analytic_temp}
  xla_flops, refused, comm, dcn_comm = None, None, None, None
  if compiled_ok:
    try:
      with compiling_for_gpu() if gpu else attention.compiling_for(platform):
        compiled = compile_step(config, devices)
    except Exception as e:  # pylint: disable=broad-except
      refused = _out_of_memory_at_compile(e)  # a TPU compiler refuses a program that cannot fit
      if refused is None:
        raise
      compiled_ok = False
      notes.append(f"the compiler refused the step ({refused}): the memory below is the ANALYTIC ESTIMATE")
  if compiled_ok:
    stats = compiled.memory_analysis()
    code = getattr(stats, "generated_code_size_in_bytes", 0)
    memory.update(arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
                  aliased=stats.alias_size_in_bytes, temp=stats.temp_size_in_bytes, code=code,
                  peak=(stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
                        + stats.temp_size_in_bytes + code))
    try:
      hlo = compiled.as_text()
    except Exception as e:  # pylint: disable=broad-except  # a libtpu newer than its JAX cannot print some ops
      hlo = None
      why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
      notes.append(f"the compiler could not print its program ({why}), so no collectives are listed; a libtpu "
                   f"of this JAX's own release prints it: pip install 'jax[tpu]=={jax.__version__}'")
    if hlo is not None:
      comm = collectives(hlo)
      dcn_comm = collectives(hlo, dcn=True) if num_slices > 1 else None
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get("flops"):
      xla_flops = float(cost["flops"]) * num_devices  # cost_analysis counts one device's program
  peak = memory.get("peak", memory["peak_analytic"])
  if num_slices > 1 and not compiled_ok:
    sent = 2 * (num_slices - 1) / num_slices * param_bytes
    notes.append(f"across the {num_slices} slices each device all-reduces its gradient shard (as large as its "
                 f"parameters, {_b(param_bytes)}) over DCN every step: about {_b(sent)} sent (ring estimate)")

  hbm_source = "given"
  if hbm_gib is None:
    hbm_gib = hbm_gib_for(kind) or (hbm_gib_for(topology or gpu) if topology or gpu else None)
    hbm_source = f"{kind}" if hbm_gib else ""
  fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEM_FRACTION))
  if platform == "gpu" and hbm_gib and fraction * hbm_gib * GiB < peak <= hbm_gib * GiB:
    notes.append(f"the peak is more than the {fraction:.0%} of a GPU's memory that XLA takes by default; "
                 "run with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95")
  return {
      "config": config.name, "target": target, "device_kind": kind, "num_devices": num_devices,
      "num_slices": num_slices,
      "mesh": mesh_sizes, "compiled": compiled_ok, "attention": kernel,
      "params": n_params, "params_without_positions": n_no_pos,
      "flops_per_token": fpt, "flop_params": models.flop_params(config.model), "tokens_per_step": tokens_per_step,
      "flops_per_step": fpt * tokens_per_step,
      "xla_flops_per_step": xla_flops, "memory": memory, "peak_bytes": peak,
      # XLA's cost analysis counts a loop's body once and a Pallas kernel as no FLOPs.
      "xla_flops_lower_bound": bool(config.model.scan_layers or config.model.fused_loss_chunk
                                    or config.train.grad_accum > 1 or kernel == "splash"),
      "hbm_gib": hbm_gib, "hbm_source": hbm_source,
      "fits": False if refused else None if hbm_gib is None else peak <= hbm_gib * GiB,
      "groups": groups(param_leaves), "notes": notes, "collectives": comm, "dcn_collectives": dcn_comm,
  }


# ----------------------------------------------------------------------------- collectives

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
_COLLECTIVE = re.compile(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
# A multi-slice TPU program is one slice's: what crosses slices is a send to the DCN runtime (and its
# recv), typed (buffer, u32[], token[]), whose target lists the slices it spans first (`{1,2}x{0:3}` for
# two slices of four devices).
_DCN_SEND = re.compile(r"= (.+?) send\(.*_xla_megascale_transfer_type=\"(\w+)\"")
_DCN_SLICES = re.compile(r'_xla_megascale_target="\{([^}]*)\}')
_CALLEES = re.compile(r"\b(calls|body|condition|to_apply|called_computations|branch_computations)="
                      r"(\{[^}]*\}|%[\w.\-]+)")


def _array_bytes(type_text: str) -> int:
  return sum(_DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in re.findall(r"\b([a-z]+\d*[a-z\d]*)\[([\d,]*)\]", type_text))


def _top_level(type_text: str) -> list[str]:
  """The elements of a tuple type `(a, (b, c), d)`; `[type_text]` when it is not a tuple."""
  if not type_text.startswith("("):
    return [type_text]
  parts, depth, start = [], 0, 1
  for i, ch in enumerate(type_text):
    depth += ch in "([{"
    depth -= ch in ")]}"
    if (ch == "," and depth == 1) or depth == 0:
      parts.append(type_text[start:i].strip())
      start = i + 1
    if depth == 0:
      break
  return [p for p in parts if p]


def _group_size(line: str) -> int:
  """Devices in each replica group of a collective, from any of the ways XLA prints them."""
  if m := re.search(r"replica_groups=\{\{([\d,]*)\}", line):
    return len(m.group(1).split(","))
  if m := re.search(r"replica_groups=\[\d+,(\d+)\]<=", line):
    return int(m.group(1))
  if m := re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\S+)? \{([^}]*)\}", line):
    sizes = {k.strip("' "): int(v) for k, v in (a.split("=") for a in m.group(1).split(","))}
    return math.prod(sizes[a.strip("' ")] for a in m.group(2).split(",") if a.strip())
  if "source_target_pairs=" in line:
    return 2
  return 1


def _id_count(ids: str) -> int:
  """How many ids a list such as `1,2,5:7` names (a range `a:b` includes b)."""
  return sum(int(b) - int(a) + 1 if sep else 1
             for a, sep, b in (part.partition(":") for part in ids.split(",") if part.strip()))


def collectives(hlo_text: str, dcn: bool = False) -> dict[str, dict[str, float]]:
  """The collectives a compiled step runs on each device, read from its optimized HLO text.

  For each kind: `count`, `bytes` (the whole buffer: an all-gather's result, a reduce-scatter's or
  all-reduce's operand) and `sent`, a ring estimate of what each device sends: (n-1)/n of the
  buffer over a group of n, twice that for an all-reduce, all of it for a collective-permute. A
  while loop's body counts its known trip count times (once where XLA does not know it); a
  collective over a group of one, none. A TPU `all-reduce-scatter` fusion, an all-reduce and a
  slice in the text, is a reduce-scatter. With `dcn`, the collectives that cross the slices of a
  multi-slice TPU program instead (sends to the DCN runtime, over groups of slices); without, those
  within a slice.
  """
  found, calls, name = collections.defaultdict(list), collections.defaultdict(list), None
  for line in hlo_text.splitlines():
    if (m := _COMPUTATION.match(line)) and line.rstrip().endswith("{"):
      name = m.group(1)
      continue
    if name is None:
      continue
    trips = 1
    if " while(" in line and (t := re.search(r'"known_trip_count":\{"n":"(\d+)"', line)):
      trips = int(t.group(1))
    for key, names in _CALLEES.findall(line):
      calls[name] += [(callee, trips if key == "body" else 1) for callee in re.findall(r"%([\w.\-]+)", names)]
    if " send(" in line and (m := _DCN_SEND.search(line)):
      if dcn:
        slices = _id_count(t.group(1)) if (t := _DCN_SLICES.search(line)) else 2  # at least two
        found[name].append((m.group(2).lower().replace("_", "-"), slices, _array_bytes(_top_level(m.group(1))[0])))
      continue
    if dcn or not (m := _COLLECTIVE.search(line)):
      continue
    type_text, kind, start = m.group(1), m.group(2), m.group(3)
    n = _group_size(line)
    if name.startswith("all-reduce-scatter"):
      kind = "reduce-scatter"  # the result is the whole sum; the fusion's slice keeps 1/n of it
    parts = _top_level(type_text)
    # An async start is typed ((operands), results) or (operand, result, ...), but an all-reduce's
    # start as its results alone, like a sync collective.
    if start and len(parts) >= 2 and (parts[0].startswith("(") or kind != "all-reduce"):
      operand, result = _array_bytes(parts[0]), _array_bytes(parts[1])
    else:
      result = _array_bytes(type_text)
      operand = result * n if kind == "reduce-scatter" and not name.startswith("all-reduce-scatter") else result
    buffer = result if kind in ("all-gather", "all-to-all") else operand
    found[name].append((kind, n, buffer))

  entry = next((m.group(1) for l in hlo_text.splitlines() if l.startswith("ENTRY ")
                for m in [_COMPUTATION.match(l)] if m), None)
  times: dict[str, int] = collections.Counter()
  stack = [(entry, 1)] if entry else []
  while stack:  # every call path from the entry, each multiplying its loops' trip counts
    comp, k = stack.pop()
    times[comp] += k
    stack += [(callee, k * t) for callee, t in calls.get(comp, ())]
  out: dict[str, dict[str, float]] = {}
  for comp, ops in found.items():
    for kind, n, buffer in ops:
      if n <= 1 or not times.get(comp):
        continue
      row = out.setdefault(kind, {"count": 0, "bytes": 0, "sent": 0.0})
      row["count"] += times[comp]
      row["bytes"] += times[comp] * buffer
      share = 1.0 if kind == "collective-permute" else (n - 1) / n * (2 if kind == "all-reduce" else 1)
      row["sent"] += times[comp] * buffer * share
  return {kind: out[kind] for kind in sorted(out, key=lambda k: (COLLECTIVES + (k,)).index(k))}


def _out_of_memory_at_compile(e: BaseException) -> str | None:
  """The line of a compile error that says the program does not fit in device memory; None otherwise."""
  line = next((l for l in str(e).splitlines() if re.search(r"RESOURCE_EXHAUSTED|out of memory", l, re.I)), None)
  if line is None:
    return None
  line = re.sub(r"^\s*(RESOURCE_EXHAUSTED|INTERNAL):\s*", "", line).strip()
  return line[:200] + ("..." if len(line) > 200 else "")


def compile_step(config, devices):
  """Compiles the real train step for `devices` from ShapeDtypeStructs: nothing is allocated."""
  import jax
  from flax import nnx
  from fmjax import bench, optim, sharding, train

  mesh = sharding.make_mesh(config, devices)
  batch_sharding = sharding.batch_sharding(mesh)
  tx = optim.make_optimizer(config)
  spec = train.state_spec(config, mesh, tx)
  host = bench.synthetic_batch(config, batch_size=1)
  batch = {k: jax.ShapeDtypeStruct((config.train.batch_size,) + v.shape[1:], v.dtype, sharding=batch_sharding)
           for k, v in host.items()}
  # jit outside the mesh context: building the step makes a PRNG key eagerly, which a mesh of
  # topology-only TPU devices cannot hold. Tracing (lower) needs the mesh and the axis rules.
  step, _ = train.compile_steps(config, spec, tx, batch_sharding)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(spec.rules):
    return step.lower(spec.abstract, batch).compile()


# ----------------------------------------------------------------------------- output


def _b(n: float) -> str:
  return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.2f} MiB"


def _spec(spec: tuple) -> str:
  return "(" + ", ".join("-" if s is None else s if isinstance(s, str) else "+".join(s) for s in spec) + ")"


def _collectives_text(comm: dict, where: str) -> str:
  if not comm:
    return "none"
  kinds = ", ".join(f"{k} {int(v['count'])} ({_b(v['bytes'])})" for k, v in comm.items())
  return f"{where}a step, each device: {kinds}; about {_b(sum(v['sent'] for v in comm.values()))} sent (ring estimate)"


def format_plan(p: dict) -> str:
  """The plan as text for a terminal."""
  mem = p["memory"]
  mesh = " ".join(f"{k}={v}" for k, v in p["mesh"].items())
  lines = [f"plan: {p['config']} on {p['target']}, mesh {mesh}"]
  lines += [f"  note: {n}" for n in p["notes"]]
  lines += [
      f"  parameters      {p['params']:,} ({p['params_without_positions']:,} without position embeddings)",
      f"  attention       {p['attention']}",
      f"  FLOPs/token     6*N + 12*L*D*T = {p['flops_per_token']:.4g} (N = {p['flop_params']:,}: no position "
      "embeddings, nor an untied head's input table; D: the attention's width, num_heads * head_dim)",
      f"  FLOPs/step      {p['flops_per_step']:.4g} ({p['tokens_per_step']:,} tokens)"
      + (f"; XLA cost analysis {p['xla_flops_per_step']:.4g}" if p["xla_flops_per_step"] else "")
      + (" (a lower bound: it counts a loop's body once, a Pallas kernel as 0)"
         if p["xla_flops_per_step"] and p.get("xla_flops_lower_bound") else ""),
      f"  memory per device ({'compiled' if p['compiled'] else 'ANALYTIC ESTIMATE'}):",
      f"    parameters    {_b(mem['params'])}",
      f"    optimizer     {_b(mem['optimizer'])}",
      f"    batch         {_b(mem['batch'])}",
  ]
  if p["compiled"]:
    lines += [f"    temp          {_b(mem['temp'])}  (XLA temporaries: activations, gradients, workspace; "
              f"formula {_b(mem['temp_analytic'])})",
              f"    peak          {_b(mem['peak'])}  (arguments {_b(mem['arguments'])} + outputs "
              f"{_b(mem['outputs'])} - donated {_b(mem['aliased'])} + temp + code)"]
  else:
    lines += [f"    temp          {_b(mem['temp_analytic'])}  (estimate: gradients + activations + logits)",
              f"    peak          {_b(mem['peak_analytic'])}  (estimate)"]
  if p["fits"] is None:
    lines.append("  fits            unknown: no HBM figure for this device; pass --hbm_gib")
  else:
    if p["hbm_gib"] is None:  # the compiler refused the step
      lines.append("  fits            DOES NOT FIT: the compiler refused the step (see the note)")
    else:
      use = p["peak_bytes"] / (p["hbm_gib"] * GiB)
      verdict = "FITS" if p["fits"] else "DOES NOT FIT"
      lines.append(f"  fits            {verdict}: {100 * use:.0f}% of {p['hbm_gib']:g} GiB HBM per device "
                   f"({p['hbm_source']})" + (" (tight: XLA needs headroom)" if p["fits"] and use > 0.9 else ""))
    if not p["fits"]:
      lines.append("                  to fit: raise train.grad_accum (fewer rows at once, the same batch), set "
                   "model.remat=dots_no_batch or full, or shard the state over more devices (mesh.fsdp)")
  if p.get("collectives") is not None:
    within = "within a slice (ICI), " if p.get("dcn_collectives") is not None else ""
    lines.append("  collectives     " + _collectives_text(p["collectives"], within))
  if p.get("dcn_collectives") is not None:
    lines.append("  across slices   " + _collectives_text(p["dcn_collectives"], "over DCN, "))
  lines.append("  parameter shardings (per-device shard):")
  width = max(len(g["group"]) for g in p["groups"])
  for g in p["groups"]:
    count = f" x{g['count']}" if g["count"] > 1 else ""
    lines.append(f"    {g['group']:<{width}}  {str(g['shape']):<18} {_spec(g['spec']):<22} "
                 f"-> {g['shard_shape']}{count}")
  return "\n".join(lines)


def cli(argv: list[str]) -> int:
  """`fmjax plan --config=... [--mesh=data=2,fsdp=4] [--topology=v5p-128 [--num-slices=N] | --gpu=h100x8]
  [--hbm_gib=G] [--config.a=b ...]`."""
  import jax
  from fmjax.cli import ArgumentParser
  rest, overrides = config_lib.split_overrides(argv)
  p = ArgumentParser(prog="fmjax plan")
  p.add_argument("--config", required=True, help="configs/NAME.py[:args]")
  p.add_argument("--mesh", default=None, help="mesh axis sizes, e.g. data=2,fsdp=4: on this host's devices (faked "
                 "on a CPU host), or on the --topology or --gpu given")
  target = p.add_mutually_exclusive_group()
  target.add_argument("--topology", default=None, help="TPU to compile for: v5p-128 or v5p:4x4x4 (needs libtpu)")
  target.add_argument("--gpu", default=None, help="GPUs to compile for: h100 or h100x8 (needs JAX's CUDA plugin)")
  p.add_argument("--num-slices", type=int, default=1, help="with --topology: that many slices of it joined over "
                 "DCN, as `fmjax launch --num-slices` makes them; mesh.dcn_data spans them")
  p.add_argument("--hbm_gib", type=float, default=None, help="HBM per device to judge fit (default: by device)")
  args = p.parse_args(rest)
  config = config_lib.load_config(args.config, overrides)
  devices = None
  from fmjax.sharding import MESH_AXES
  sizes = parse_mesh(args.mesh) if args.mesh else {a: int(config.mesh[a]) for a in MESH_AXES}
  wanted = math.prod(abs(s) for s in sizes.values())
  # The mesh of --mesh, else the config's (--config.mesh.data=8); a config that fixes no size (data=-1)
  # plans on the devices there are.
  if not (args.topology or args.gpu) and (args.mesh or wanted > 1):
    if wanted > MAX_FAKE_DEVICES and len(jax.devices()) < wanted:
      raise PlanError(f"{f'--mesh={args.mesh}' if args.mesh else 'the config mesh'} needs {wanted:,} devices, more "
                      f"than the {MAX_FAKE_DEVICES} CPU devices a plan fakes; plan a pod with --topology=v5p-N (or "
                      "--gpu=h100xN)")
    try:  # a CPU host plans a pod-sized mesh on fake devices; only possible before JAX starts
      jax.config.update("jax_num_cpu_devices", max(wanted, 1))
    except RuntimeError:
      pass
    if len(jax.devices()) < wanted:
      devices = jax.devices("cpu")
  if args.gpu:
    gpu_name(args.gpu)  # a bad name fails before JAX starts
    try:  # compile-only CUDA devices: JAX lists them with no GPU here only when it runs on the CPU
      jax.config.update("jax_platforms", "cpu")
    except RuntimeError:
      pass
  print(format_plan(plan(config, mesh=args.mesh, topology=args.topology, gpu=args.gpu, hbm_gib=args.hbm_gib,
                         devices=devices, num_slices=args.num_slices)))
  return 0
