"""A static, deviceless view of the train step's GPU program: the kernels XLA emits for an H100, how
many launches a step makes, how many bytes each kernel moves, and a roofline lower bound. Not a timing.

  /tmp/aot/bin/python benchmarks/gpu_aot.py --config=configs/gpt.py:small --config.train.batch_size=16 \
      --config.train.grad_accum=1 [--attention=cudnn] [--segments=4] [--hlo_out=FILE]
  python benchmarks/gpu_aot.py --analyze=FILE   # any optimized HLO text, e.g. a GPU's *after_optimizations.txt

No GPU is needed: the real train step is compiled on this CPU for a compile-only CUDA topology
(jax.experimental.topologies) described as an H100. That takes JAX's CUDA plugin at the installed
JAX's version, in a venv of its own, since with the plugin installed JAX looks for a GPU:

  V=$(python -c 'import jax; print(jax.__version__)')  # the project venv's JAX
  python -m venv /tmp/aot && /tmp/aot/bin/pip install -e . "jax==$V" "jax-cuda13-plugin[with-cuda]==$V"

Caveats:
- without a device XLA does no autotuning: gemm backends and tiles are its defaults, which an H100
  may swap for cuBLAS or other tiles;
- XLA's cost analysis counts no flops in custom calls, so gemm and attention flops come from shapes;
- the roofline sum, max(bytes / 3.35 TB/s, flops / 989 TF/s) per kernel, ignores launch gaps,
  caches and kernel efficiency: a lower bound on the step time, not a prediction of it.
XLA flags work as usual, e.g. XLA_FLAGS=--xla_gpu_enable_triton_gemm=false.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import re
import sys
import time

# The analysis half (analyze, format_report) reads text and needs only the standard library; the
# compile half imports jax and fmjax when called, after main has set JAX_PLATFORMS.

H100_BYTES_PER_S = 3.35e12  # HBM3, H100 SXM 80GB
H100_FLOPS_PER_S = 989e12   # dense bf16


# ---------------------------------------------------------------------------- compile for an H100

def compile_train_step(config, segments: int = 1):
  """The train step as `fmjax bench` builds it, compiled for one H100 from abstract state and batch:
  nothing is allocated and no GPU is needed (`fmjax plan --gpu=h100` compiles it the same way)."""
  import jax
  from flax import nnx

  from fmjax import bench, config_lib, optim, plan, sharding, train
  devices, _ = plan.gpu_devices("h100")
  if devices is None:
    raise RuntimeError("this venv has no JAX CUDA plugin; set one up as benchmarks/gpu_aot.py says")
  config_lib.validate(config, len(devices))
  with plan.compiling_for_gpu():
    mesh = sharding.make_mesh(config, devices=devices)
    batch_sharding = sharding.batch_sharding(mesh)
    tx = optim.make_optimizer(config)
    spec = train.state_spec(config, mesh, tx)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
                         bench.synthetic_batch(config, segments=segments))
    # Outside set_mesh: the step makes a PRNG key eagerly, which must not land on the unrunnable mesh.
    step_fn, _ = train.compile_steps(config, spec, tx, batch_sharding)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(spec.rules):
      return step_fn.lower(spec.abstract, batch).compile()


# ---------------------------------------------------------------------------- parse optimized HLO text

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5, "token": 0}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_HEADER = re.compile(r"(ENTRY\s+)?%?([\w.\-$]+)\s+\(.*\)\s*->\s*.*\{\s*$")


def _arrays(type_str: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, dims) of each array in an HLO type: one array or a tuple of them."""
  return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(type_str)]


def _nbytes(type_str: str, skip_scratch: bool = False) -> float:
  # Custom calls return their workspace as a u8/s8 array: scratch, not data moved.
  return sum(_DTYPE_BYTES.get(dt, 1 if dt.startswith("f8") else 4) * math.prod(dims)
             for dt, dims in _arrays(type_str) if not (skip_scratch and dt in ("s8", "u8")))


def _close(s: str, i: int, open_c: str, close_c: str) -> int:
  """Index of the bracket that closes the one at s[i]."""
  depth = 0
  for j in range(i, len(s)):
    depth += (s[j] == open_c) - (s[j] == close_c)
    if depth == 0:
      return j
  return len(s) - 1


@dataclasses.dataclass
class Instr:
  name: str
  type: str
  op: str
  args: str  # the text between the op's parentheses
  operands: list[str]
  attrs: str
  root: bool

  def attr(self, key: str) -> str | None:
    m = re.search(r"(?:^|, )" + re.escape(key) + r"=(%?[\w.\-$]+|\"[^\"]*\"|\{[^}]*\})", self.attrs)
    return m.group(1).strip('"') if m else None

  def called(self, key: str) -> list[str]:
    return [c.lstrip("%") for c in re.findall(r"%?[\w.\-$]+", (self.attr(key) or "").strip("{}"))]

  def backend_config(self) -> dict:
    i = self.attrs.find("backend_config={")
    try:
      return json.JSONDecoder().raw_decode(self.attrs, i + len("backend_config="))[0] if i >= 0 else {}
    except ValueError:
      return {}


def _parse_instr(line: str) -> Instr | None:
  m = re.match(r"\s*(ROOT )?%?([\w.\-$]+)\s*=\s*", line)
  if not m:
    return None
  rest = line[m.end():]
  end = _close(rest, 0, "(", ")") + 1 if rest.startswith("(") else rest.find(" ")
  type_, rest = rest[:end], rest[end:].lstrip()
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return None
  j = _close(rest, op.end() - 1, "(", ")")
  args = rest[op.end():j]
  return Instr(m.group(2), type_, op.group(1), args, re.findall(r"%([\w.\-$]+)", args),
               rest[j + 1:].lstrip(", "), bool(m.group(1)))


def _parse_module(text: str) -> tuple[dict[str, list[Instr]], str]:
  """{computation: its instructions}, and the entry computation's name."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    if current is None:
      if m := _HEADER.match(line):
        current = m.group(2)
        comps[current] = []
        entry = current if m.group(1) else entry
    elif line.strip() == "}":
      current = None
    elif ins := _parse_instr(line):
      comps[current].append(ins)
  return comps, entry


# ---------------------------------------------------------------------------- kernels, bytes and flops

_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "opt-barrier", "iota",
         "partition-id", "replica-id", "add-dependency", "domain", "get-dimension-size", "async-done",
         "async-update", "copy-done", "send-done", "recv-done"}
_MOVERS = {"parameter", "bitcast", "transpose", "copy", "reshape", "broadcast", "slice", "concatenate",
           "dynamic-slice", "dynamic-update-slice", "pad", "constant", "tuple", "get-tuple-element", "convert"}
_COPIES = {"copy", "transpose", "copy-start", "dynamic-update-slice", "dynamic-slice", "slice", "concatenate", "pad"}


@dataclasses.dataclass
class Kernel:
  name: str
  group: str       # gemm, attention, reduction, elementwise, copy/transpose or other
  kind: str        # fusion kind[:backend kind], custom-call target, or op
  bytes: float     # read + written by one launch
  flops: float     # of one launch: dots, gemms and attention only
  launches: float  # per step
  source: str = ""  # the JAX op that made it (op_name metadata), numbers dropped

  @property
  def seconds(self) -> float:
    """Roofline time of a step's launches."""
    return self.launches * max(self.bytes / H100_BYTES_PER_S, self.flops / H100_FLOPS_PER_S)


@dataclasses.dataclass
class Report:
  kernels: list[Kernel] = dataclasses.field(default_factory=list)
  conditionals: float = 0    # per step; on XLA:GPU each copies its predicate to the host and waits
  whiles_known: float = 0    # loops run per step whose trip count XLA knows
  whiles_unknown: float = 0  # loops whose condition the host reads every trip; bodies counted once

  def totals(self) -> tuple[float, float, float, float]:
    """Launches, bytes, flops and roofline seconds of a step."""
    ks = self.kernels
    return (sum(k.launches for k in ks), sum(k.launches * k.bytes for k in ks),
            sum(k.launches * k.flops for k in ks), sum(k.seconds for k in ks))


def _dot_flops(ins: Instr, table: dict[str, Instr]) -> float:
  """2 x output elements x contracted size, of a dot or a cuBLAS gemm custom call."""
  dims = ins.backend_config().get("gemm_backend_config", {}).get("dot_dimension_numbers", {})
  contracting = (re.findall(r"\d+", ins.attr("lhs_contracting_dims") or "")
                 or dims.get("lhs_contracting_dimensions", []))
  out = _arrays(ins.type)
  lhs = _arrays(table[ins.operands[0]].type) if ins.operands and ins.operands[0] in table else []
  if not out or not lhs:
    return 0.0
  return 2.0 * math.prod(out[0][1]) * math.prod(lhs[0][1][int(d)] for d in contracting)


def _fmha_flops(ins: Instr, table: dict[str, Instr]) -> float:
  """cuDNN flash attention on [B, T, H, K]: two matmuls forward, 2.5x that backward, half if causal."""
  shapes = [_arrays(table[o].type)[0][1] for o in ins.operands[:2] if o in table]
  if len(shapes) < 2 or len(shapes[0]) != 4 or len(shapes[1]) != 4:
    return 0.0
  (b, t, h, d), s = shapes[0], shapes[1][1]
  backward = "Backward" in (ins.attr("custom_call_target") or "")
  causal = "CAUSAL" in str(ins.backend_config().get("cudnn_fmha_backend_config", {}).get("mask_type", ""))
  return 4.0 * b * h * t * s * d * (2.5 if backward else 1) * (0.5 if causal else 1)


def _fusion_bytes(ins: Instr, table: dict[str, Instr], fused: list[Instr]) -> float:
  """Read + written by a fusion: an operand it only slices counts as its slices, and the buffer of
  an in-place dynamic-update-slice as its update."""
  ftab = {f.name: f for f in fused}
  users = collections.defaultdict(list)
  for f in fused:
    for o in f.operands:
      users[o].append(f)

  def sliced_read(name: str) -> float | None:  # None: read in full
    total = 0.0
    for u in users[name]:
      if u.op in ("dynamic-slice", "slice", "gather") and u.operands[0] == name:
        total += _nbytes(u.type)
      elif u.op == "bitcast" and (sub := sliced_read(u.name)) is not None:
        total += sub
      elif not (u.op == "dynamic-update-slice" and u.operands[0] == name):
        return None
    return total

  read = 0.0
  for p in (f for f in fused if f.op == "parameter" and int(f.args) < len(ins.operands)):
    operand = ins.operands[int(p.args)]
    full = _nbytes(table[operand].type if operand in table else p.type)
    sliced = sliced_read(p.name)
    read += full if sliced is None else min(full, sliced)
  root = next((f for f in fused if f.root), None)
  outs = [ftab[o] for o in root.operands if o in ftab] if root and root.op == "tuple" else [root] if root else []
  written = 0.0
  for r in outs:
    while r.op == "bitcast" and r.operands and r.operands[0] in ftab:
      r = ftab[r.operands[0]]
    in_place = r.op == "dynamic-update-slice" and len(r.operands) > 1 and r.operands[1] in ftab
    written += _nbytes(ftab[r.operands[1]].type if in_place else r.type)
  return read + written


def _fusion_group(ins: Instr, fused: list[Instr]) -> tuple[str, str]:
  """(group, kind) of a fusion. CPU fusions name their backend kind in fusion_config, GPU ones in
  fusion_backend_config."""
  ops = collections.Counter(f.op for f in fused)
  bc = ins.backend_config()
  backend_kind = (bc.get("fusion_backend_config") or bc.get("fusion_config") or {}).get("kind", "")
  kind = f"{ins.attr('kind')}:{backend_kind}" if backend_kind else str(ins.attr("kind"))
  if ops["dot"] or ops["convolution"] or "gemm" in backend_kind:
    return "gemm", kind
  if backend_kind.startswith("__cudnn"):
    return "attention", kind
  if set(ops) <= _MOVERS and (ops["transpose"] or ops["copy"]) and not ops["convert"]:
    return "copy/transpose", kind
  if set(ops) <= _MOVERS | {"iota", "compare", "select", "add", "clamp"} and (
      ops["dynamic-update-slice"] or ops["dynamic-slice"]):
    return "copy/transpose", kind
  if ops["reduce"] or ops["reduce-window"] or ops["scatter"] or ops["sort"]:
    return "reduction", kind
  return "elementwise", kind


def _source(ins: Instr) -> str:
  m = re.search(r'op_name="([^"]*)"', ins.attrs)
  return re.sub(r"\d+", "#", re.sub(r"^jit\([^)]*\)/", "", m.group(1))) if m else "?"


def _kernel(ins: Instr, comps: dict[str, list[Instr]], table: dict[str, Instr], launches: float) -> Kernel:
  kernel = _kernel_costs(ins, comps, table, launches)
  kernel.source = _source(ins)
  return kernel


def _kernel_costs(ins: Instr, comps: dict[str, list[Instr]], table: dict[str, Instr], launches: float) -> Kernel:
  operand_bytes = sum(_nbytes(table[o].type) for o in ins.operands if o in table)
  if ins.op == "fusion":
    fused = comps.get(next(iter(ins.called("calls")), ""), [])
    ftab = {f.name: f for f in fused}
    flops = sum(_dot_flops(f, ftab) for f in fused if f.op == "dot")
    return Kernel(ins.name, *_fusion_group(ins, fused), _fusion_bytes(ins, table, fused), flops, launches)
  if ins.op == "custom-call":
    target = ins.attr("custom_call_target") or "?"
    group, flops = "other", 0.0
    if target.startswith(("__cublas$gemm", "__cublas$lt$matmul")):
      group, flops = "gemm", _dot_flops(ins, table)
    elif target.startswith("__cudnn"):
      group, flops = "attention", _fmha_flops(ins, table) if target.startswith("__cudnn$fmha") else 0.0
    return Kernel(ins.name, group, target, operand_bytes + _nbytes(ins.type, skip_scratch=True), flops, launches)
  nbytes, flops, group = operand_bytes + _nbytes(ins.type), 0.0, "other"
  if ins.op in _COPIES:
    group = "copy/transpose"
    if ins.op == "dynamic-update-slice" and len(ins.operands) > 1 and ins.operands[1] in table:
      nbytes = 2 * _nbytes(table[ins.operands[1]].type)  # in place: reads and writes the update only
  elif ins.op in ("dot", "convolution"):
    group, flops = "gemm", _dot_flops(ins, table)
  elif ins.op in ("reduce", "sort", "scatter", "reduce-window", "select-and-scatter"):
    group = "reduction"
  return Kernel(ins.name, group, ins.op, nbytes, flops, launches)


def analyze(hlo_text: str) -> Report:
  """The kernels one run of an optimized HLO module (`compiled.as_text()`) launches.

  A while body counts its known trip count times (once when unknown). Of a conditional, the branch
  lax.cond takes on a true predicate counts: true_computation, or the last of an indexed switch.
  """
  comps, entry = _parse_module(hlo_text)
  report = Report()

  def walk(comp: str, launches: float) -> None:
    table = {i.name: i for i in comps[comp]}
    for ins in comps[comp]:
      if ins.op in _FREE:
        continue
      if ins.op == "while":
        trips = ins.backend_config().get("known_trip_count", {}).get("n")
        if trips is None:
          report.whiles_unknown += launches
        else:
          report.whiles_known += launches
        walk(ins.called("body")[0], launches * float(trips or 1))
      elif ins.op == "conditional":
        report.conditionals += launches
        walk((ins.called("branch_computations") or ins.called("true_computation"))[-1], launches)
      elif ins.op in ("call", "async-start"):
        for c in ins.called("to_apply") + ins.called("calls"):
          if c in comps:
            walk(c, launches)
      else:
        report.kernels.append(_kernel(ins, comps, table, launches))

  walk(entry, 1.0)
  return report


def format_report(report: Report, top: int = 15) -> str:
  """Launches by kind; launches, bytes, flops and roofline time by group; the costliest kernels."""
  ks = report.kernels
  launches, nbytes, flops, seconds = report.totals()
  small = sum(k.launches for k in ks if k.bytes < 1e6 and k.flops < 1e9)
  lines = [f"{launches:.0f} kernel launches a step, {small:.0f} of them moving under 1 MB (bound by launch "
           "latency, a few us each, outside a CUDA graph)",
           f"{report.conditionals:.0f} conditionals a step (on XLA:GPU each copies its predicate to the host and "
           f"waits); while loops a step: {report.whiles_known:.0f} with a known trip count, "
           f"{report.whiles_unknown:.0f} without (body counted once; the host reads the condition every trip)",
           "", "launches by group and kind:"]
  by_kind = collections.Counter()
  groups = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
  for k in ks:
    by_kind[(k.group, k.kind)] += k.launches
    for i, v in enumerate((k.launches, k.launches * k.bytes, k.launches * k.flops, k.seconds)):
      groups[k.group][i] += v
  lines += [f"  {n:7.0f}  {g:15s} {kind}" for (g, kind), n in sorted(by_kind.items(), key=lambda x: (-x[1], x[0]))]
  lines += ["", f"  {'group':15s} {'launches':>8s} {'GB r+w':>9s} {'GFLOP':>9s} {'t_mem':>9s} {'t_flop':>9s} "
            f"{'roofline':>9s}"]
  for name, (n, b, f, s) in sorted(groups.items(), key=lambda x: -x[1][3]) + [("TOTAL", report.totals())]:
    lines.append(f"  {name:15s} {n:8.0f} {b / 1e9:9.3f} {f / 1e9:9.1f} {1e3 * b / H100_BYTES_PER_S:7.3f}ms "
                 f"{1e3 * f / H100_FLOPS_PER_S:7.3f}ms {1e3 * s:7.3f}ms")
  lines += ["  (bytes: operands + results of each kernel, slices and in-place updates as such; roofline: "
            "the sum over kernels of max(bytes / 3.35 TB/s, flops / 989 TF/s))", "",
            f"top {top} kernels by roofline time:"]
  for k in sorted(ks, key=lambda k: -k.seconds)[:top]:
    lines.append(f"  {1e6 * k.seconds:9.1f}us x{k.launches:<4.0f} {k.group:14s} {k.kind[:40]:40s} "
                 f"{k.launches * k.bytes / 1e6:9.1f}MB {k.launches * k.flops / 1e9:8.1f}GF  {k.name[:50]}")
  lines += ["", f"memory-bound kernels (not gemm or attention) by the JAX op that made them, top {top}:"]
  by_source = collections.defaultdict(lambda: [0.0, 0.0])
  for k in ks:
    if k.group not in ("gemm", "attention"):
      by_source[(k.group, k.source)][0] += k.launches
      by_source[(k.group, k.source)][1] += k.launches * k.bytes
  for (group, source), (n, b) in sorted(by_source.items(), key=lambda x: -x[1][1])[:top]:
    lines.append(f"  {b / 1e9:8.3f} GB {1e6 * b / H100_BYTES_PER_S:8.0f}us x{n:<5.0f} {group:14s} {source[:90]}")
  lines += ["", f"summary: {launches:.0f} launches, {nbytes / 1e9:.2f} GB, {flops / 1e9:.0f} GFLOP, roofline "
            f"{1e3 * seconds:.2f} ms, {report.conditionals:.0f} conditionals, {report.whiles_unknown:.0f} while "
            "loops of unknown trip count"]
  return "\n".join(lines)


# ---------------------------------------------------------------------------- main

def main() -> int:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CPU is the only backend that runs; CUDA only compiles
  from fmjax import config_lib
  argv, overrides = config_lib.split_overrides(sys.argv[1:])
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", help="configs/NAME.py[:args]")
  p.add_argument("--attention", help="sets model.attention (xla | cudnn | auto)")
  p.add_argument("--segments", type=int, default=1, help="packed documents per row, as in fmjax bench (only the "
                 "batch's keys and shapes reach the compiler, not its values)")
  p.add_argument("--top", type=int, default=15)
  p.add_argument("--hlo_out", default="", help="writes the optimized HLO text here")
  p.add_argument("--analyze", default="", help="reports on this optimized HLO text instead of compiling")
  args = p.parse_args(argv)
  if args.analyze:
    with open(args.analyze) as f:
      print(format_report(analyze(f.read()), args.top))
    return 0
  if not args.config:
    p.error("--config is required (or --analyze=FILE)")
  config = config_lib.load_config(args.config, overrides + ([f"model.attention={args.attention}"]
                                                            if args.attention else []))
  from fmjax import train
  t0 = time.perf_counter()
  compiled = compile_train_step(config, args.segments)
  m = config.model
  from fmjax import attention
  with attention.compiling_for("gpu"):
    kernel = attention.resolve_kernel(m.attention, m.dtype, (config.data.seq_len,) * 2)
  print(f"{config.name} for an H100, compiled without one in {time.perf_counter() - t0:.0f} s: batch "
        f"{config.train.batch_size} x seq {config.data.seq_len}, {args.segments} segment(s) a row, "
        f"attention={kernel}{' (auto)' if m.attention == 'auto' else ''}, remat={m.remat}, "
        f"scan_layers={m.scan_layers}, {m.dtype}")
  mem = compiled.memory_analysis()
  print(f"memory: arguments {mem.argument_size_in_bytes / 2**30:.2f} GiB, "
        f"temporaries {mem.temp_size_in_bytes / 2**30:.2f} GiB")
  text = compiled.as_text()
  if args.hlo_out:
    with open(args.hlo_out, "w") as f:
      f.write(text)
  report = analyze(text)
  print(format_report(report, args.top))
  model_flops = train.flops_per_token(config) * config.train.batch_size * config.data.seq_len
  print(f"model FLOPs (6N + 12LDT): {model_flops / 1e9:.0f} GFLOP a step, so the roofline bounds MFU at "
        f"{100 * model_flops / H100_FLOPS_PER_S / report.totals()[3]:.1f}%")
  return 0


if __name__ == "__main__":
  sys.exit(main())
