"""`fmjax plan`: ahead-of-time figures on 8 fake CPU devices, TPU topologies, bad input."""

import dataclasses
import importlib.util
import math
import re

import jax
import numpy as np
import pytest

from fmjax import config_lib, models, optim, plan, sharding, train

from conftest import xla_flags

TINY = ["model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.d_ff=256", "model.vocab_size=256",
        "data.seq_len=32", "train.batch_size=16"]


def tiny(*extra):
  return config_lib.load_config("configs/gpt.py:tiny", TINY + list(extra))


@pytest.fixture(scope="module")
def fsdp_plan():
  config = tiny()
  return config, plan.plan(config, mesh="data=2,fsdp=4", hbm_gib=1e-3)  # 1 MiB: cannot fit


def test_plan_numbers_are_consistent(fsdp_plan):
  config, p = fsdp_plan
  abstract = models.abstract_model(config.model)
  assert p["compiled"] and p["num_devices"] == 8
  assert p["mesh"] == {"dcn_data": 1, "data": 2, "fsdp": 4, "tensor": 1}
  assert p["params"] == models.param_count(abstract)
  assert p["flops_per_token"] == models.flops_per_token(config.model, 32)
  assert p["flops_per_step"] == p["flops_per_token"] * 16 * 32
  # XLA's own count of the step agrees with the formula to within attention/softmax details.
  assert 0.7 < p["xla_flops_per_step"] / p["flops_per_step"] < 1.4
  assert not p["xla_flops_lower_bound"] and "a lower bound" not in plan.format_plan(p)
  looped = plan.plan(tiny("model.scan_layers=true", "model.num_layers=8"), mesh="data=8")  # one layer of 8 counted
  assert looped["xla_flops_per_step"] / looped["flops_per_step"] < 0.7
  assert "(a lower bound: it counts a loop's body once, a Pallas kernel as 0)" in plan.format_plan(looped)
  assert any(n.startswith("scan_layers with model.remat=none stacks every layer's") for n in looped["notes"])
  assert not any("scan_layers" in n for n in p["notes"])
  mem = p["memory"]
  for key in ("params", "optimizer", "batch", "temp", "arguments", "peak", "temp_analytic"):
    assert mem[key] > 0, key
  # Parameters are exact per-device shard bytes: the real state on this mesh holds the same.
  same = tiny("mesh.data=2", "mesh.fsdp=4")
  spec = train.state_spec(same, sharding.make_mesh(same), optim.make_optimizer(same))
  real = sum(math.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
             for a in jax.tree.leaves(spec.abstract["params"]))
  assert mem["params"] == real
  # Adam keeps two moments per parameter (plus a few scalar counters).
  assert 2 * mem["params"] <= mem["optimizer"] < 2 * mem["params"] + 64
  # The donated state comes back as the output, so arguments ~ state + batch.
  assert mem["arguments"] == pytest.approx(mem["params"] + mem["optimizer"] + mem["batch"], rel=0.05)
  # The formula estimate of temp memory is within a sane factor of the compiler's figure.
  assert 0.25 < mem["temp_analytic"] / mem["temp"] < 4, (mem["temp_analytic"], mem["temp"])


def test_plan_fit_verdict_and_groups(fsdp_plan):
  _, p = fsdp_plan
  assert p["fits"] is False and "DOES NOT FIT" in plan.format_plan(p)
  assert "to fit: raise train.grad_accum" in plan.format_plan(p)  # and says what to change
  groups = {g["group"]: g for g in p["groups"]}
  fc = groups["h/blocks/*/mlp/fc/kernel"]
  assert fc["count"] == 2 and fc["shape"] == (64, 256) and fc["shard_shape"] == (16, 256)
  assert fc["spec"] == ("fsdp", "tensor")
  assert groups["wte/embedding"]["shard_shape"] == (256, 16)
  text = plan.format_plan(p)
  assert "h/blocks/*/mlp/fc/kernel" in text and "(fsdp, tensor)" in text


# Every way the collectives of a step print: sync and async, combined, in loops (nested), a TPU
# all-reduce-scatter fusion, each form of replica groups, and a group of one, which moves nothing.
COLLECTIVES_HLO = """HloModule m

%body2 (p: (s32[], bf16[64,8])) -> (s32[], bf16[64,8]) {
  %ag = bf16[64,8]{1,0} all-gather(%y), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}
}

%body (p: (s32[], f32[1024])) -> (s32[], f32[1024]) {
  %ar = f32[1024]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %inner = (s32[], bf16[64,8]) while(%t), condition=%cond2, body=%body2, backend_config={"known_trip_count":{"n":"5"}}
}

%all-reduce-scatter (input: f32[400]) -> f32[100] {
  %ar2 = f32[400]{0} all-reduce(%input), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}
  ROOT %ds = f32[100]{0} dynamic-slice(%ar2, %i), dynamic_slice_sizes={100}
}

%unused (p: f32[8]) -> f32[8] {
  %never = f32[8]{0} all-reduce(%p), channel_id=9, replica_groups={{0,1}}
  %never2 = f32[8]{0} all-to-all(%p), channel_id=11, replica_groups={{0,1}}
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[1024]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %rs = ((f32[768,64]{1,0}), f32[96,64]{1,0}) reduce-scatter-start(%g), channel_id=4, replica_groups={{0,1,2,3,4,5,6,7}}
  %ag2 = (bf16[16,8]{1,0}, bf16[128,8]{1,0}) all-gather-start(%h), channel_id=5, replica_groups={{0,1,2,3,4,5,6,7}}
  %f = f32[100]{0} fusion(%z), kind=kCustom, calls=%all-reduce-scatter
  %one = f32[10]{0} all-reduce(%q), channel_id=6, replica_groups={{0}}, to_apply=%add
  %loss = f32[] all-reduce(%l), channel_id=12, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %ars = (f32[16]{0}, f32[48]{0}) all-reduce-start(%a, %b), channel_id=10, replica_groups={{0,1}}, to_apply=%add
  %perm = f32[256]{0} collective-permute(%r), channel_id=7, source_target_pairs={{0,1},{1,0}}
  %rsync = f32[32]{0} reduce-scatter(%s), channel_id=8, replica_groups=mesh['axis_0'=2,'axis_1'=4], \
device_ids=([2,4]T(1,0)) {'axis_0','axis_1'}, dimensions={0}
}
"""


def test_collectives_read_off_the_compiled_text():
  got = plan.collectives(COLLECTIVES_HLO)
  assert list(got) == ["all-gather", "reduce-scatter", "all-reduce", "collective-permute"]
  # 3 trips of the outer loop (and a combined async all-reduce of 64 floats over 2, a scalar over 8); the
  # inner loop's all-gather 3 x 5 times, over groups of 4. A kind only unreached code runs (all-to-all) is none.
  assert got["all-reduce"] == {"count": 5, "bytes": 3 * 4096 + 256 + 4,
                               "sent": 3 * 4096 * 2 * 3 / 4 + 256 + 4 * 2 * 7 / 8}
  assert got["all-gather"] == {"count": 16, "bytes": 15 * 1024 + 2048, "sent": 15 * 1024 * 3 / 4 + 2048 * 7 / 8}
  # An async start's operand (the whole buffer), the TPU fusion's all-reduce, a sync one's result x 8.
  assert got["reduce-scatter"] == {"count": 3, "bytes": 196608 + 1600 + 1024,
                                   "sent": 196608 * 7 / 8 + 1600 * 3 / 4 + 1024 * 7 / 8}
  assert got["collective-permute"] == {"count": 1, "bytes": 1024, "sent": 1024}
  assert plan.collectives("HloModule m\n\nENTRY %main (a: f32[8]) -> f32[8] {\n}\n") == {}


def test_collectives_of_a_computation_called_from_two_places_count_on_each_path():
  """A body two loops share runs their trips added: every call path from the entry counts."""
  hlo = """HloModule m

%shared (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %ar = f32[256]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1}}, to_apply=%add
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w1 = (s32[], f32[256]) while(%i), condition=%c, body=%shared, backend_config={"known_trip_count":{"n":"2"}}
  %w2 = (s32[], f32[256]) while(%j), condition=%c, body=%shared, backend_config={"known_trip_count":{"n":"3"}}
}
"""
  assert plan.collectives(hlo) == {"all-reduce": {"count": 5, "bytes": 5 * 1024, "sent": 5 * 1024 * 2 / 2}}


def test_plan_counts_the_collectives_of_each_mesh(fsdp_plan):
  """Data parallel all-reduces every gradient and gathers nothing; FSDP gathers the parameters; one
  device has none. The plan prints them, a step on each device."""
  _, p = fsdp_plan
  assert "all-gather" in p["collectives"] and "all-reduce" in p["collectives"]
  dp = plan.plan(tiny(), mesh="data=8")
  params = dp["memory"]["params"]  # float32, whole on each device
  assert list(dp["collectives"]) == ["all-reduce"]
  assert params <= dp["collectives"]["all-reduce"]["bytes"] <= 2 * params
  text = plan.format_plan(dp)
  assert "collectives     a step, each device: all-reduce " in text and "sent (ring estimate)" in text
  row = dp["collectives"]["all-reduce"]  # its count and buffer bytes, and what is sent (1.75 x the buffer over 8)
  assert (f"all-reduce {row['count']} ({plan._b(row['bytes'])}); about {plan._b(row['sent'])} sent (ring estimate)"
          in text), text
  one = plan.plan(tiny(), mesh="data=1")
  assert one["collectives"] == {} and "collectives     none" in plan.format_plan(one)


# A two-slice TPU program (as libtpu compiles it, cut down): one slice's program, whose collectives over the
# slices are sends to the DCN runtime (each with its recv), here in the entry and in a loop of 3 trips.
DCN_HLO = """HloModule m, num_partitions=4

%body (p: (s32[], f32[16,8,128])) -> (s32[], f32[16,8,128]) {
  %send.1 = (f32[16,8,128]{2,1,0:T(8,128)}, u32[], token[]) send(%g, %after-all.1), channel_id=5, \
is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",\
_xla_host_transfer_rendezvous="all-reduce.4_0",_xla_megascale_reduce_operation="SUM",\
_xla_megascale_target="{1:4}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %ar = f32[1024]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %recv = (bf16[576,8,128]{2,1,0:T(8,128)(2,1)}, u32[], token[]) recv(%after-all), channel_id=2, \
is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",\
_xla_host_transfer_rendezvous="all-reduce.1_0",_xla_megascale_reduce_operation="SUM",\
_xla_megascale_target="{1,2,3,4}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
  %send = (bf16[576,8,128]{2,1,0:T(8,128)(2,1)}, u32[], token[]) send(%ar2, %after-all), channel_id=3, \
is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",\
_xla_host_transfer_rendezvous="all-reduce.1_0",_xla_megascale_reduce_operation="SUM",\
_xla_megascale_target="{1,2,3,4}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
  %send-done = token[] send-done(%send), channel_id=3, is_host_transfer=true
  %w = (s32[], f32[16,8,128]) while(%i), condition=%c, body=%body, backend_config={"known_trip_count":{"n":"3"}}
}
"""


def test_collectives_across_slices_are_read_apart():
  """Each send to the DCN runtime is one collective over the slices it names (4 here); its recv and the
  collectives within a slice are not among them, nor they among those within a slice."""
  big, small = 576 * 8 * 128 * 2, 16 * 8 * 128 * 4
  assert plan.collectives(DCN_HLO, dcn=True) == {
      "all-reduce": {"count": 4, "bytes": big + 3 * small, "sent": (big + 3 * small) * 2 * 3 / 4}}
  assert plan.collectives(DCN_HLO) == {"all-reduce": {"count": 1, "bytes": 4096, "sent": 4096 * 2 * 3 / 4}}
  assert plan.collectives(COLLECTIVES_HLO, dcn=True) == {}


@dataclasses.dataclass(frozen=True)
class FakeTpu:
  """What laying out a mesh reads of a device of a multi-slice TPU."""
  id: int
  slice_index: int
  platform: str = "cpu"  # laid out in list order within a slice, as fake CPU devices are
  device_kind: str = "fake"


def test_dcn_data_spans_the_slices():
  """Devices listed slice after slice or interleaved: each dcn_data index holds one whole slice, the
  other axes lie within it; a mesh whose dcn_data is not the slice count is refused."""
  config = tiny("mesh.dcn_data=2", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2")
  for order in (range(8), [0, 4, 1, 5, 2, 6, 3, 7]):
    devices = [FakeTpu(i, i // 4) for i in order]
    grid = sharding.device_grid(config, devices)
    assert grid.shape == (2, 1, 2, 2)
    assert [[d.slice_index for d in row.flat] for row in grid] == [[0] * 4, [1] * 4]
    assert sorted(d.id for d in grid.flat) == list(range(8))
  three = [FakeTpu(i, i % 3) for i in range(12)]
  assert [{d.slice_index for d in row.flat} for row in
          sharding.device_grid(tiny("mesh.dcn_data=3", "mesh.data=-1"), three)] == [{0}, {1}, {2}]
  for dcn, platform in (("1", "tpu"), ("4", "cpu")):
    with pytest.raises(config_lib.ConfigError, match=r"^the devices are 2 TPU slices but mesh.dcn_data=.*; set "
                       r"--config.mesh.dcn_data=2$"):
      sharding.device_grid(tiny(f"mesh.dcn_data={dcn}", "mesh.data=-1"),
                           [FakeTpu(i, i // 4, platform) for i in range(8)])
  # GPUs of two hosts that report each host's index as theirs: one mesh over both, as asked.
  grid = sharding.device_grid(tiny("mesh.data=-1"), [FakeTpu(i, i // 4, "gpu") for i in range(8)])
  assert grid.shape == (1, 8, 1, 1)


@pytest.fixture
def without_libtpu(monkeypatch):
  """Plans for a TPU topology as on a host without libtpu: analytic estimates, nothing compiled."""
  monkeypatch.setattr(plan, "tpu_devices", lambda name, num_slices=1: (None, plan.topology_name(name)[0]))


def test_layout_without_devices():
  config = tiny()
  sizes = {"dcn_data": 1, "data": 2, "fsdp": 1, "tensor": 4}
  params, opt = plan.layout(config, sizes, optim.make_optimizer(config))
  by_path = {l.path: l for l in params}
  assert by_path["h/blocks/0/mlp/fc/kernel"].shard_shape == (64, 64)  # mlp -> tensor
  assert by_path["h/blocks/0/attn/qkv/kernel"].shard_shape == (64, 3, 1, 16)  # heads -> tensor
  assert by_path["ln_f/scale"].shard_shape == (64,)
  assert sum(l.shard_bytes for l in opt) >= 2 * sum(l.shard_bytes for l in params)


def test_plan_of_a_llama_config_on_a_tensor_mesh():
  """Llama's architecture (no position table, an untied head, SwiGLU, 2 key/value heads for 4): the plan counts
  its parameters, FLOPs/token = 6N + 12LDT (N with the head, not the input table) agree with XLA's count of the
  step it compiles, and the key/value heads split over tensor."""
  config = config_lib.load_config("configs/gpt.py:tiny,llama", TINY + ["model.num_kv_heads=2"])
  p = plan.plan(config, mesh="data=2,fsdp=2,tensor=2")
  abstract = models.abstract_model(config.model)
  assert p["compiled"] and p["params"] == models.param_count(abstract)
  D, F, V, L, T = 64, 256, 256, 2, 32
  n = 2 * V * D + L * (D * 64 + D * 2 * 32 + 64 * D + D * 2 * F + F * D + 2 * D) + D
  assert p["params"] == n and p["flops_per_token"] == 6 * (n - V * D) + 12 * L * D * T  # the input table: a lookup
  # The text names that N: beside the parameter counts above it, 6*N read as either is wrong by the input table.
  assert f"6*N + 12*L*D*T = {p['flops_per_token']:.4g} (N = {n - V * D:,}: " in plan.format_plan(p)
  assert 0.7 < p["xla_flops_per_step"] / p["flops_per_step"] < 1.4
  params, _ = plan.layout(config, p["mesh"], optim.make_optimizer(config))
  by_path = {l.path: l.shard_shape for l in params}
  assert by_path["h/blocks/0/attn/kv/kernel"] == (32, 2, 1, 16) and by_path["h/blocks/0/attn/q/kernel"] == (32, 2, 16)
  assert by_path["lm_head/embedding"] == (128, 32)


def test_plan_of_a_qwen3_config_counts_its_attention_at_the_width_of_its_heads():
  """Qwen3's choices (q/k norms; heads 32 wide where d_model / num_heads is 16): FLOPs/token count the attention at
  its width H*K (12*L*H*K*T), which XLA's count of the compiled step agrees with; each norm's scale is whole on every
  device; the analytic memory keeps the wider q, k and v and the norms' inputs."""
  grouped = TINY + ["model.num_kv_heads=2"]
  config = config_lib.load_config("configs/gpt.py:tiny,llama", grouped + ["model.qk_norm=true", "model.head_dim=32"])
  p = plan.plan(config, mesh="data=2,fsdp=2,tensor=2")
  D, F, V, L, T, H, G, K = 64, 256, 256, 2, 32, 4, 2, 32
  n = 2 * V * D + L * (D * H * K + D * 2 * G * K + H * K * D + 2 * K + D * 2 * F + F * D + 2 * D) + D
  assert p["params"] == n and p["flops_per_token"] == 6 * (n - V * D) + 12 * L * H * K * T
  assert 0.7 < p["xla_flops_per_step"] / p["flops_per_step"] < 1.4
  params, _ = plan.layout(config, p["mesh"], optim.make_optimizer(config))
  by_path = {l.path: l.shard_shape for l in params}
  assert by_path["h/blocks/0/attn/q/kernel"] == (32, 2, 32) and by_path["h/blocks/0/attn/q_norm/scale"] == (32,)
  narrow = config_lib.load_config("configs/gpt.py:tiny,llama", grouped)
  unnormed = config_lib.load_config("configs/gpt.py:tiny,llama", grouped + ["model.head_dim=32"])
  temp = lambda c: plan.analytic_temp_bytes(c, p["mesh"], 0)
  assert temp(narrow) < temp(unnormed) < temp(config)


def test_layout_of_a_peft_sft_config_is_the_model_it_trains():
  """finetune.peft=lora on configs/sft.py: its LoRA factors are parameters, and the optimizer holds moments for them
  alone (the layout once built the bare GPT, and tripped on the frozen leaves' empty optimizer state)."""
  config = config_lib.load_config("configs/sft.py", TINY + ["finetune.peft=lora"])
  sizes = {"dcn_data": 1, "data": 1, "fsdp": 1, "tensor": 1}
  params, opt = plan.layout(config, sizes, optim.make_optimizer(config))
  lora = sum(l.shard_bytes for l in params if l.path.endswith(("/lora_a", "/lora_b")))
  assert 0 < 2 * lora <= sum(l.shard_bytes for l in opt) < 2 * lora + 1024


def test_analytic_fallback_without_libtpu(without_libtpu, capsys):
  p = plan.plan(tiny("mesh.data=-1"), topology="v5p-16")
  assert not p["compiled"] and p["num_devices"] == 8 and p["hbm_gib"] == 95
  assert p["peak_bytes"] == p["memory"]["peak_analytic"] > p["memory"]["params"] > 0
  assert p["fits"] is True
  text = plan.format_plan(p)
  assert "ANALYTIC ESTIMATE" in text and "pip install libtpu" in text
  assert "collectives" not in text  # nothing compiled, nothing to read them from
  # --mesh lays the mesh out on the topology (it was refused alongside --topology).
  plan.cli(["--config=configs/gpt.py:tiny", "--topology=v5p-16", "--mesh=data=2,fsdp=4"]
           + [f"--config.{o}" for o in TINY])
  assert "on TPU topology v5p:2x2x2 (v5p-16), mesh dcn_data=1 data=2 fsdp=4 tensor=1" in capsys.readouterr().out
  # On a TPU "auto" is splash, which keeps no attention scores, where the lengths allow it.
  assert p["attention"] == "xla" and "attention       xla" in text  # seq 32: not a multiple of 128
  aligned = plan.plan(tiny("mesh.data=-1", "data.seq_len=128", "model.max_len=128"), topology="v5p-16")
  xla = plan.plan(tiny("mesh.data=-1", "data.seq_len=128", "model.max_len=128", "model.attention=xla"),
                  topology="v5p-16")
  assert aligned["attention"] == "splash" and xla["attention"] == "xla"
  assert aligned["memory"]["temp_analytic"] < xla["memory"]["temp_analytic"]


def test_num_slices_plans_that_many_slices_with_dcn_data_across_them(without_libtpu, capsys):
  """--num-slices=2 of v5p-16: 16 chips, mesh.dcn_data 2 (from 1 or -1; another size is refused in one line
  saying what to set), and the estimate says what crosses the slices. It needs a TPU topology."""
  p = plan.plan(tiny("mesh.data=-1"), topology="v5p-16", num_slices=2)
  assert p["num_devices"] == 16 and p["num_slices"] == 2 and p["mesh"] == {"dcn_data": 2, "data": 8, "fsdp": 1,
                                                                              "tensor": 1}
  assert p["target"] == "2 slices of TPU topology v5p:2x2x2 (v5p-16)" and p["dcn_collectives"] is None
  one = plan.plan(tiny("mesh.data=-1"), topology="v5p-16")
  assert p["memory"]["params"] == one["memory"]["params"]  # replicated across the slices, as within one
  assert any(n.startswith("across the 2 slices each device all-reduces its gradient shard (as large as its "
                          f"parameters, {plan._b(p['memory']['params'])}) over DCN") for n in p["notes"])
  assert plan.plan(tiny("mesh.dcn_data=-1", "mesh.data=1", "mesh.fsdp=8"), topology="v5p-16",
                   num_slices=2)["mesh"]["dcn_data"] == 2
  plan.cli(["--config=configs/gpt.py:tiny", "--topology=v5p-16", "--num-slices=2", "--mesh=fsdp=-1"]
           + [f"--config.{o}" for o in TINY])  # --mesh lays out one slice
  assert "on 2 slices of TPU topology v5p:2x2x2 (v5p-16), mesh dcn_data=2 data=1 fsdp=8 tensor=1" in \
      capsys.readouterr().out
  refusals = [
      (dict(mesh="data=-1,dcn_data=4", num_slices=2), r"mesh.dcn_data=4 but --num-slices=2: dcn_data spans the "
       r"slices, one index each; set --config.mesh.dcn_data=2 \(or leave it at 1\)"),
      (dict(mesh="data=-1,dcn_data=2"), r"mesh.dcn_data=2 splits the batch across TPU slices but --topology=v5p-16 "
       r"is one slice: add --num-slices=2 to plan 2 slices of it, or set --config.mesh.dcn_data=1"),
      (dict(num_slices=0), "--num-slices must be at least 1, got 0"),
  ]
  for kwargs, match in refusals:
    with pytest.raises(plan.PlanError, match=f"^{match}$"):
      plan.plan(tiny("mesh.data=-1"), topology="v5p-16", **kwargs)
  for target in (dict(gpu="h100x8"), dict(mesh="data=8")):
    with pytest.raises(plan.PlanError, match="--num-slices=2 counts TPU slices: give the slice with --topology"):
      plan.plan(tiny("mesh.data=-1"), num_slices=2, **target)


def test_an_estimate_refuses_a_kernel_the_target_cannot_run(without_libtpu, monkeypatch):
  """Where nothing is compiled, a kernel named for another platform was planned as if it ran (a cuDNN
  step "fits" a TPU); the run's trace refuses it, and so does the plan now."""
  from fmjax import attention
  monkeypatch.setattr(plan, "gpu_devices", lambda name: (None, name))
  with pytest.raises(attention.AttentionError, match="'cudnn' needs a GPU; set model.attention=auto"):
    plan.plan(tiny("mesh.data=-1", "model.attention=cudnn"), topology="v5p-16")
  with pytest.raises(attention.AttentionError, match="'cudnn' needs bfloat16/float16 compute, got float32"):
    plan.plan(tiny("mesh.data=-1", "model.attention=cudnn"), gpu="h100x8")
  with pytest.raises(attention.AttentionError, match="multiple of 128, got 32; change data.seq_len"):
    plan.plan(tiny("mesh.data=-1", "model.attention=splash"), topology="v5p-16")
  # A GPU would run splash interpreted (as a CPU does, for the tests), at a fraction of its speed.
  with pytest.raises(attention.AttentionError, match="'splash' is a TPU kernel: a GPU would run it in Pallas"):
    plan.plan(tiny("mesh.data=-1", "model.attention=splash", "data.seq_len=128"), gpu="h100x8")
  assert plan.plan(tiny("mesh.data=-1", "model.attention=cudnn", "model.dtype=bfloat16"),
                   gpu="h100x8")["attention"] == "cudnn"


@pytest.mark.parametrize("name,expected", [
    ("v5p-128", ("v5p:4x4x4", 64)), ("v5p-8", ("v5p:2x2x1", 4)), ("v4-32", ("v4:2x2x4", 16)),
    ("v5litepod-16", ("v5e:4x4", 16)), ("v6e-8", ("v6e:2x4", 8)), ("v5p:2x2x2", ("v5p:2x2x2", 8)),
])
def test_topology_names(name, expected):
  assert plan.topology_name(name) == expected


@pytest.mark.parametrize("name,match", [
    ("v5p-100", "did you mean 'v5p-64' or 'v5p-128'|did you mean .*v5p-"),
    ("v5q:2x2", "did you mean 'v5p:2x2'"),
    ("tpu", "unknown TPU accelerator type 'tpu'"),
    ("v5p:0x4x4", "v5p chips form a 3-D grid of positive sizes"),  # once a division by zero
    ("v5p:4x4", "v5p chips form a 3-D grid"), ("v6e:4x4x4", "v6e chips form a 2-D grid"),
    ("v5p:4x4x4x4", "v5p takes 3 sizes$"),  # not a "did you mean" of itself
])
def test_bad_topology_is_one_clear_line(name, match):
  with pytest.raises(plan.PlanError, match=match) as e:
    plan.topology_name(name)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("hbm", [0.0, -1.0, float("nan")])
def test_a_bad_hbm_is_refused_before_the_compile(monkeypatch, hbm):
  monkeypatch.setattr(plan, "compile_step", lambda *a: pytest.fail("compiled before refusing --hbm_gib"))
  with pytest.raises(plan.PlanError, match=f"--hbm_gib must be positive, got {hbm}"):
    plan.plan(tiny(), mesh="data=8", hbm_gib=hbm)


def test_bad_mesh_and_too_many_devices():
  with pytest.raises(plan.PlanError, match="did you mean 'fsdp'"):
    plan.parse_mesh("fsd=4")
  for other, ours in (("dp", "data"), ("tp", "tensor")):  # other codebases' names: the axis, not the spelling
    with pytest.raises(plan.PlanError, match=f"did you mean '{ours}'"):
      plan.parse_mesh(f"{other}=4")
  with pytest.raises(plan.PlanError, match="needs 16 devices but 8"):
    plan.plan(tiny(), mesh="data=4,fsdp=4")
  for size in ("0", "-2"):  # 0 once cut the device list to none
    with pytest.raises(plan.PlanError, match=f"data={size}; a size is positive, or -1 for the devices left"):
      plan.parse_mesh(f"data={size}")
  with pytest.raises(plan.PlanError, match="--mesh=data=2,data=4 gives data twice"):
    plan.parse_mesh("data=2,data=4")
  with pytest.raises(plan.PlanError, match="needs 100,000 devices, more than the 1024 CPU devices a plan fakes"):
    plan.cli(["--config=configs/gpt.py:tiny", "--mesh=data=100000"])
  p = plan.plan(tiny("mesh.data=2", "mesh.tensor=2"), mesh="data=4")
  assert p["mesh"]["tensor"] == 1 and any("the config's tensor=2 is 1 here" in n for n in p["notes"])


def test_a_config_mesh_is_planned_on_as_many_fake_devices():
  """`--config.mesh.data=2` on a one-device CPU host, as `--mesh=data=2` is; before, the plan answered
  "run `fmjax plan` itself (it fakes 2 CPU devices)" to `fmjax plan`."""
  import os
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS=xla_flags())  # one CPU device, as a laptop has
  proc = subprocess.run([sys.executable, "-m", "fmjax.cli", "plan", "--config=configs/gpt.py:tiny",
                         "--config.mesh.data=2"] + [f"--config.{o}" for o in TINY],
                        capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0 and "on 2 x cpu, mesh dcn_data=1 data=2 fsdp=1 tensor=1" in proc.stdout, \
      proc.stderr[-2000:]


def _cuda_plugin() -> bool:
  return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13)) \
      if importlib.util.find_spec("jax_plugins") else False


@pytest.mark.parametrize("name,expected", [("h100", ("h100", 1)), ("H100x8", ("h100", 8)), ("h100x16", ("h100", 16))])
def test_gpu_names(name, expected):
  assert plan.gpu_name(name) == expected


@pytest.mark.parametrize("name", ["a100", "h100x0", "h100-8", "8xh100", ""])
def test_bad_gpu_is_one_clear_line(name):
  with pytest.raises(plan.PlanError, match="unknown GPU target .*MODELxCOUNT .*h100"):
    plan.gpu_name(name)


@pytest.mark.skipif(_cuda_plugin(), reason="JAX's CUDA plugin is installed: the compiled GPU plan runs instead")
def test_gpu_plan_without_the_cuda_plugin_is_an_estimate():
  p = plan.plan(tiny("mesh.data=-1", "model.dtype=bfloat16", "data.seq_len=128", "model.max_len=128"),
                gpu="h100x8")
  assert not p["compiled"] and p["num_devices"] == 8 and p["mesh"]["data"] == 8 and p["hbm_gib"] == 79.1
  assert p["attention"] == "cudnn"  # what "auto" runs on a GPU in bf16
  text = plan.format_plan(p)
  assert "ANALYTIC ESTIMATE" in text and "jax-cuda13-plugin" in text


@pytest.mark.skipif(not _cuda_plugin(), reason="JAX's CUDA plugin is not installed")
def test_plan_compiles_for_gpus_without_one():
  p = plan.plan(tiny("mesh.data=1", "mesh.fsdp=-1", "model.dtype=bfloat16", "data.seq_len=128", "model.max_len=128"),
                gpu="h100x2")
  assert p["compiled"] and "H100" in p["device_kind"] and p["num_devices"] == 2 and p["mesh"]["fsdp"] == 2
  assert p["attention"] == "cudnn" and p["hbm_gib"] == 79.1 and p["fits"] is True
  assert p["memory"]["temp"] > 0 and p["memory"]["params"] > 0


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
@pytest.mark.parametrize("seq_len,kernel", [(32, "xla"), (128, "splash")])
def test_plan_compiles_for_a_tpu_topology(seq_len, kernel):
  # "auto" on a TPU: splash, compiled by the TPU compiler as its Mosaic kernel, where the
  # lengths are multiples of 128; xla where they are not.
  config = tiny("mesh.data=1", "mesh.fsdp=-1", f"data.seq_len={seq_len}", f"model.max_len={max(seq_len, 128)}")
  p = plan.plan(config, topology="v5p:2x2x1")
  assert p["compiled"] and "TPU" in p["device_kind"] and p["num_devices"] == 4
  assert p["mesh"]["fsdp"] == 4 and p["hbm_gib"] == 95 and p["fits"] is True
  assert p["memory"]["temp"] > 0 and p["memory"]["params"] > 0
  assert p["attention"] == kernel


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_a_v4_topology_has_a_device_per_chip():
  """A v4 chip's two cores are one device (megacore) as when it runs: 4 chips, 4 devices of 32 GiB."""
  devices, name = plan.tpu_devices("v4-8")
  assert name == "v4:2x2x1" and len(devices) == 4


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_plan_compiles_for_two_slices():
  """Two v5p:2x2x1 slices joined over DCN: libtpu compiles one slice's program, in which the gradients are
  all-reduced across the slices (over dcn_data) and everything else stays within the slice."""
  config = tiny("mesh.data=1", "mesh.fsdp=-1", "data.seq_len=128", "model.max_len=128")
  p = plan.plan(config, topology="v5p:2x2x1", num_slices=2)
  assert p["compiled"] and p["num_devices"] == 8 and p["mesh"] == {"dcn_data": 2, "data": 1, "fsdp": 4, "tensor": 1}
  assert p["attention"] == "splash" and p["fits"] is True
  devices, _ = plan.tpu_devices("v5p:2x2x1", num_slices=2)
  mesh = sharding.make_mesh(tiny("mesh.dcn_data=2", "mesh.data=1", "mesh.fsdp=-1"), devices)
  assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]
  # Gradients cross the slices once, each device its fsdp shard (XLA pads and fuses them, so bytes are
  # at least the parameters'); the within-slice gathers and reduce-scatters of FSDP do not cross.
  dcn = p["dcn_collectives"]
  assert list(dcn) == ["all-reduce"] and dcn["all-reduce"]["bytes"] >= p["memory"]["params"]
  assert {"all-gather", "reduce-scatter"} <= set(p["collectives"])
  text = plan.format_plan(p)
  assert "collectives     within a slice (ICI), a step, each device: all-gather" in text
  assert "across slices   over DCN, a step, each device: all-reduce" in text


def test_a_step_the_compiler_refuses_for_memory_is_a_plan_that_does_not_fit(monkeypatch):
  """A TPU compiler refuses a program that cannot fit: the plan says DOES NOT FIT with the estimate and
  what to change (it was an error telling the user to run plan)."""
  def refuse(config, devices):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 108.09G of "
                                     "95.74G hbm. Exceeded hbm capacity by 12.35G.\nmore detail")

  monkeypatch.setattr(plan, "compile_step", refuse)
  p = plan.plan(tiny(), mesh="data=2")
  text = plan.format_plan(p)
  assert p["fits"] is False and not p["compiled"] and "memory per device (ANALYTIC ESTIMATE)" in text
  assert "the compiler refused the step (Ran out of memory in memory space hbm. Used 108.09G of 95.74G hbm." in text
  assert "DOES NOT FIT" in text and "to fit: raise train.grad_accum" in text
  monkeypatch.setattr(plan, "compile_step", lambda *a: (_ for _ in ()).throw(ValueError("a bug")))
  with pytest.raises(ValueError, match="a bug"):
    plan.plan(tiny(), mesh="data=2")


def test_a_compiler_that_cannot_print_its_program_gives_the_plan_without_collectives(monkeypatch):
  """A libtpu newer than its JAX compiles the step but cannot print some of its ops ("async-update
  instruction should have 1 operands"): the plan keeps the compiler's memory and says how to get a
  libtpu that prints it, where it ended in a traceback."""
  real = plan.compile_step

  class Unprintable:
    def __init__(self, compiled):
      self._compiled = compiled

    def __getattr__(self, name):
      return getattr(self._compiled, name)

    def as_text(self):
      raise jax.errors.JaxRuntimeError("INTERNAL: async-update instruction should have 1 operands but sees 3\nmore")

  monkeypatch.setattr(plan, "compile_step", lambda config, devices: Unprintable(real(config, devices)))
  p = plan.plan(tiny(), mesh="data=2,fsdp=4")
  text = plan.format_plan(p)
  assert p["compiled"] and p["memory"]["temp"] > 0 and p["collectives"] is None
  assert (f"the compiler could not print its program (INTERNAL: async-update instruction should have 1 operands but "
          f"sees 3), so no collectives are listed; a libtpu of this JAX's own release prints it: pip install "
          f"'jax[tpu]=={jax.__version__}'") in text


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_fsdp_gathers_the_parameters_cast_on_a_tpu():
  """Parameters are float32 and sharded over fsdp; the TPU compiler casts each shard before the all-gather that
  makes it whole, so a bfloat16 step gathers 2 bytes a parameter, not 4 (benchmarks/README.md). The step's only
  float32 collectives are gradient reductions."""
  from fmjax import attention
  config = tiny("mesh.data=1", "mesh.fsdp=-1", "model.dtype=bfloat16", "data.seq_len=128", "model.max_len=128",
                "model.vocab_size=2048")  # over ONE_HOT_MAX_ROWS: the token table is read by a gather
  devices, _ = plan.tpu_devices("v5p:2x2x1")
  with attention.compiling_for("tpu"):
    hlo = plan.compile_step(config, devices).as_text()
  gathered = [m.group(1) for m in re.finditer(r"= (.+?) all-gather(?:-start)?\(", hlo)]
  assert gathered and all("bf16[" in t and "f32[" not in t.replace("bf16[", "") for t in gathered), gathered
