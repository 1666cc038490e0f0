"""The device mesh and how logical axis names map onto it.

Mesh axes are fixed: `dcn_data` (data parallel across slices, over the data-centre
network), `data` (data parallel), `fsdp` (data parallel with parameters and optimizer
state sharded) and `tensor` (heads and MLP sharded). The config gives each a size; -1
takes what is left of the devices. Models name logical axes only (`embed`, `mlp`, ...);
`config.logical_axis_rules` maps them to these mesh axes.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from fmjax import models
from fmjax.config_lib import DEFAULT_RULES, ConfigError, _suggest

MESH_AXES = ("dcn_data", "data", "fsdp", "tensor")
BATCH_AXES = ("dcn_data", "data", "fsdp")


def mesh_shape(config, num_devices: int | None = None) -> dict[str, int]:
  """Sizes of the four mesh axes, with a single -1 filled from the device count."""
  n = jax.device_count() if num_devices is None else num_devices
  sizes = {a: int(config.mesh[a]) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ConfigError(f"only one mesh axis may be -1, got {free}")
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise ConfigError(f"mesh sizes must be positive or -1, got {', '.join(f'mesh.{a}={sizes[a]}' for a in bad)}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if n % fixed:
      raise ConfigError(f"the mesh's fixed axes ({fixed} devices) do not divide the {n} available devices")
    sizes[free[0]] = n // fixed
  if math.prod(sizes.values()) != n:
    raise ConfigError(f"mesh {sizes} needs {math.prod(sizes.values())} devices but {n} are available; "
                      "set one mesh axis to -1 or change the sizes")
  return sizes


def data_parallel_size(sizes: dict[str, int]) -> int:
  """How many ways a mesh of `sizes` (`mesh_shape`) splits the batch."""
  return math.prod(sizes[a] for a in BATCH_AXES)


def devices_splitting(batch_size: int) -> list:
  """The first devices, as many as split `batch_size` evenly: a reader's data-parallel mesh, so any
  device count can score any run's batches."""
  devices = jax.devices()
  return devices[:max(d for d in range(1, len(devices) + 1) if batch_size % d == 0)]


def validate_mesh(config, num_devices: int | None = None) -> None:
  """Up-front checks that the mesh fits the devices, the batch and the model.

  Without `num_devices` (config loading) only what needs no devices is checked; the run
  calls this again with the real device count before anything compiles.
  """
  _validate_rules(config)
  at_load = num_devices is None
  if at_load:
    fixed = {a: int(config.mesh[a]) for a in MESH_AXES}
    num_devices = math.prod(abs(s) for s in fixed.values())
  sizes = mesh_shape(config, num_devices)
  dp = data_parallel_size(sizes)
  # The batch is checked against the real data-parallel size, after the mesh is checked against
  # the real devices: on a machine with fewer devices that is the error worth reading first.
  if "train" in config and not at_load:
    b, accum = config.train.batch_size, config.train.grad_accum
    if (b // accum) % dp:
      fix = f"use a multiple of {dp}" if accum == 1 else \
          f"make train.batch_size / train.grad_accum={accum} a multiple of {dp} (lower grad_accum or raise the batch)"
      raise ConfigError(f"train.batch_size={b} (per micro-batch {b // accum}) does not divide by the "
                        f"data-parallel size {dp} (mesh {sizes}); {fix}")
  # Every model dimension a rule shards must divide by the product of its mesh axes.
  m = config.model
  dims = {k: (int(m[v]), f"model.{v}") for k, v in
          (("embed", "d_model"), ("norm", "d_model"), ("mlp", "d_ff"), ("heads", "num_heads"), ("vocab", "vocab_size"))}
  dims["kv"] = (models.head_dim(m), "the head size model.head_dim" if models.architecture(m)["head_dim"] else
                "the head size model.d_model/model.num_heads")
  grouped = int(m.get("num_kv_heads", 0))
  dims["kv_heads"] = (grouped or int(m.num_heads),
                      "model.num_kv_heads" if grouped else "model.num_heads (also the key/value heads)")
  if m.get("scan_layers"):
    dims["layers"] = (int(m.num_layers), "model.num_layers")
  for name, axes in logical_rules(config):
    if name not in dims or axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    ways = math.prod(sizes[a] for a in axes)
    size, what = dims[name]
    if size % ways:
      mesh = " x ".join(f"mesh.{a}={sizes[a]}" for a in axes)
      raise ConfigError(f"{what}={size} does not divide by {mesh} (logical axis {name!r} is sharded over it); "
                        f"change that mesh size or the model dimension")


def device_grid(config, devices) -> np.ndarray:
  """`devices` as an array shaped like the 4-axis mesh. Devices of several slices (multi-slice TPU)
  lay the `dcn_data` axis across the slices, one slice per index, and the other axes within each."""
  sizes = mesh_shape(config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  from jax.experimental import mesh_utils
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  # GPUs of several hosts may each report their host's or NVLink domain's index: only a TPU's slices, or a
  # dcn_data asked for, make the hybrid mesh.
  if slices > 1 and (sizes["dcn_data"] > 1 or devices[0].platform == "tpu"):
    if sizes["dcn_data"] != slices:
      raise ConfigError(f"the devices are {slices} TPU slices but mesh.dcn_data={sizes['dcn_data']}: the "
                        f"dcn_data axis spans the slices; set --config.mesh.dcn_data={slices}")
    return mesh_utils.create_hybrid_device_mesh((1,) + shape[1:], (slices, 1, 1, 1), devices=devices)
  try:
    return mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    return np.asarray(devices).reshape(shape)


def make_mesh(config, devices=None) -> Mesh:
  """Builds the 4-axis mesh; on several slices `dcn_data` spans them (`device_grid`)."""
  array = device_grid(config, jax.devices() if devices is None else devices)
  return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of [B, ...] input arrays: rows split over all data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of an array every device holds whole."""
  return NamedSharding(mesh, P())


def _validate_rules(config) -> None:
  """`logical_axis_rules`: pairs of a logical axis name and None, a mesh axis or a list of them."""
  rules = config.get("logical_axis_rules", ())
  example = "e.g. ((\"embed\", \"fsdp\"), (\"mlp\", \"tensor\"), (\"kv\", None))"
  if isinstance(rules, str) or not all(isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str)
                                       for r in rules):
    raise ConfigError(f"logical_axis_rules={rules!r} must be (logical axis, mesh axes) pairs, {example}")
  for name, axes in rules:
    for axis in [] if axes is None else [axes] if isinstance(axes, str) else axes:
      if axis not in MESH_AXES:
        raise ConfigError(f"logical_axis_rules maps {name!r} to {axis!r}, which is not a mesh axis "
                          f"{list(MESH_AXES)}")
  # The setting replaces the whole list: a parameter's name without a rule is read as a mesh axis (a
  # traceback at init), and an activation's (batch, length) is silently replicated on every device.
  known = [name for name, _ in DEFAULT_RULES]
  for name, _ in rules:
    if name not in known:
      raise ConfigError(f"logical_axis_rules names {name!r}, which no model uses (the logical axes are "
                        f"{', '.join(known)}){_suggest(name, known)}")
  # kv_heads names only grouped-query attention's key/value heads: lists written before it may lack it.
  m = config.get("model", {})
  grouped = m.get("num_kv_heads", 0) not in (0, m.get("num_heads"))
  missing = [name for name in known if name not in {name for name, _ in rules} and (name != "kv_heads" or grouped)]
  if missing:
    raise ConfigError(f"logical_axis_rules has no rule for {', '.join(missing)}: it replaces the whole list, so "
                      f"give every logical axis ({', '.join(known)}), None where it is not sharded (the defaults: "
                      "config_lib.DEFAULT_RULES)")


def logical_rules(config) -> tuple:
  """`config.logical_axis_rules` as the tuples `nnx.logical_axis_rules` takes."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config.logical_axis_rules)
