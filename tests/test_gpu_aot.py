"""benchmarks/gpu_aot.py's HLO analysis, on programs compiled for this CPU (XLA:CPU prints the same
text format as XLA:GPU) and on a hand-written module with the GPU-only custom calls."""

import importlib.util
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax import lax

PATH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_aot.py"


def _load():
  spec = importlib.util.spec_from_file_location("gpu_aot", PATH)
  module = importlib.util.module_from_spec(spec)
  sys.modules["gpu_aot"] = module  # dataclasses look their module up while the class is built
  spec.loader.exec_module(module)
  return module


gpu_aot = _load()


def analyze(f, *args):
  return gpu_aot.analyze(jax.jit(f).lower(*args).compile().as_text())


def test_the_analysis_imports_no_jax():
  # --analyze must run on a saved HLO anywhere, and the compile half sets JAX_PLATFORMS before jax loads.
  code = (f"import importlib.util, sys; spec = importlib.util.spec_from_file_location('g', {str(PATH)!r}); "
          "m = importlib.util.module_from_spec(spec); sys.modules['g'] = m; spec.loader.exec_module(m); "
          "assert 'jax' not in sys.modules and 'fmjax' not in sys.modules, sorted(sys.modules)")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_elementwise_fusion_moves_its_operands_and_result():
  a, b = jnp.ones((64, 32), jnp.float32), jnp.ones((64, 32), jnp.bfloat16)
  report = analyze(lambda a, b: (a + b.astype(jnp.float32)) * 2, a, b)
  [k] = report.kernels
  assert (k.group, k.launches, k.flops) == ("elementwise", 1, 0)
  assert k.bytes == 64 * 32 * (4 + 2) + 64 * 32 * 4


def test_kernels_name_the_jax_op_that_made_them():
  report = analyze(lambda a: jnp.sum(jnp.exp(a), axis=1), jnp.ones((64, 32)))
  assert {k.source for k in report.kernels} == {"reduce_sum"}, report.kernels
  text = gpu_aot.format_report(report)
  assert "by the JAX op that made them" in text and "reduce_sum" in text.split("by the JAX op")[1]


def test_dot_flops_are_2mnk():
  m, k, n = 64, 32, 48
  report = analyze(lambda a, w: jnp.tanh(a @ w) + 1, jnp.ones((m, k)), jnp.ones((k, n)))
  gemms = [kern for kern in report.kernels if kern.group == "gemm"]
  assert len(gemms) == 1 and gemms[0].flops == 2 * m * n * k
  launches, _, flops, seconds = report.totals()
  assert flops == 2 * m * n * k and launches == 2
  assert seconds == pytest.approx(sum(max(k.bytes / 3.35e12, k.flops / 989e12) for k in report.kernels))


def test_loop_bodies_count_once_per_trip():
  m = 32
  report = analyze(lambda a, w: lax.fori_loop(0, 7, lambda i, x: jnp.tanh(x @ w), a),
                   jnp.ones((m, m)), jnp.ones((m, m)))
  assert (report.whiles_known, report.whiles_unknown) == (1, 0)
  assert sum(k.launches for k in report.kernels if k.group == "gemm") == 7
  assert report.totals()[2] == 7 * 2 * m ** 3

  scanned = analyze(lambda a: lax.scan(lambda c, x: (jnp.sin(c * x), None), a, jnp.ones((5, 64, 32)))[0],
                    jnp.ones((64, 32)))
  assert max(k.launches for k in scanned.kernels) == 5


def test_a_loop_of_unknown_trip_count_is_flagged_and_its_body_counted_once():
  report = analyze(lambda a: lax.while_loop(lambda x: x.sum() < 1e6, jnp.exp, a), jnp.ones((64, 32)))
  assert (report.whiles_known, report.whiles_unknown) == (0, 1)
  assert max(k.launches for k in report.kernels) == 1


def test_conditionals_are_counted_per_execution_and_their_true_branch_costed():
  a, w = jnp.ones((64, 32)), jnp.ones((32, 32))
  body = lambda i, x: lax.cond(x.sum() > i, jnp.sin, lambda x: x @ w, x)  # noqa: E731
  report = analyze(lambda a, w: lax.fori_loop(0, 3, body, a), a, w)
  assert report.conditionals == 3
  assert report.totals()[2] == 0, "the false branch's matmul was counted"
  assert "3 conditionals" in gpu_aot.format_report(report).splitlines()[-1]


GPU_MODULE = """HloModule gpu_like, is_scheduled=true

%dus_fusion (p0: f32[8,1024], p1: f32[1,1024], p2: s32[]) -> f32[8,1024] {
  %p0 = f32[8,1024]{1,0} parameter(0)
  %p1 = f32[1,1024]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %zero = s32[] constant(0)
  ROOT %dus = f32[8,1024]{1,0} dynamic-update-slice(%p0, %p1, %p2, %zero)
}

ENTRY %main (buf: f32[8,1024], upd: f32[1,1024], i: s32[], a: bf16[128,64], b: bf16[256,64], q: bf16[2,128,4,32]) -> f32[8,1024] {
  %buf = f32[8,1024]{1,0} parameter(0)
  %upd = f32[1,1024]{1,0} parameter(1)
  %i = s32[] parameter(2)
  %a = bf16[128,64]{1,0} parameter(3)
  %b = bf16[256,64]{1,0} parameter(4)
  %q = bf16[2,128,4,32]{3,2,1,0} parameter(5)
  %mm = (bf16[128,256]{1,0}, s8[4096]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["1"]}}}
  %att = (bf16[2,4,128,32]{3,1,2,0}, f32[2,4,128]{2,1,0}, u8[0]{0}) custom-call(%q, %q, %q), custom_call_target="__cudnn$fmhaSoftmax", backend_config={"cudnn_fmha_backend_config":{"mask_type":"CAUSAL"}}
  ROOT %f = f32[8,1024]{1,0} fusion(%buf, %upd, %i), kind=kLoop, calls=%dus_fusion
}
"""


def test_gpu_custom_calls_and_in_place_updates():
  kernels = {k.name: k for k in gpu_aot.analyze(GPU_MODULE).kernels}
  mm, att, dus = kernels["mm"], kernels["att"], kernels["f"]
  assert (mm.group, mm.flops) == ("gemm", 2 * 128 * 256 * 64)
  assert mm.bytes == (128 * 64 + 256 * 64 + 128 * 256) * 2, "the s8 workspace is not data moved"
  assert (att.group, att.flops) == ("attention", 4 * 2 * 4 * 128 * 128 * 32 / 2)  # causal: half
  assert dus.bytes == 1024 * 4 + 4 + 1024 * 4, "an in-place update moves the update, not the buffer"
