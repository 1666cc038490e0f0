"""Checkpoints: bitwise round trip, retention, torn steps, elastic and multi-process restore,
mismatch errors, config changes, preemption and save errors.

Uses a toy NNX model (embedding, MLP, norm) with logical axis names and a masked AdamW state,
laid out as the train loop saves it: `{"step", "params": pure dict, "opt_state": optax tree}`.
This file doubles as the worker script of its subprocess tests (`python test_checkpoint.py MODE ...`).
"""

import asyncio
import gc
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from fmjax import checkpoint as ckpt_lib
from fmjax import config_lib, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TX = optax.adamw(1e-3, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
_INIT = nnx.initializers.normal(0.02)


class ToyLM(nnx.Module):
  """GPT-like (`lm_head`) or BERT-like (`pooler`, `type_embed`) toy with logical axis names."""

  def __init__(self, vocab: int, d: int, ff: int, rngs: nnx.Rngs, family: str = "gpt"):
    part = nnx.with_partitioning
    self.embed = nnx.Embed(vocab, d, embedding_init=part(_INIT, ("vocab", "embed")), rngs=rngs)
    self.up = nnx.Linear(d, ff, kernel_init=part(_INIT, ("embed", "mlp")),
                         bias_init=part(nnx.initializers.zeros_init(), ("mlp",)), rngs=rngs)
    self.down = nnx.Linear(ff, d, kernel_init=part(_INIT, ("mlp", "embed")), use_bias=False, rngs=rngs)
    self.norm = nnx.LayerNorm(d, scale_init=part(nnx.initializers.ones_init(), ("norm",)),
                              bias_init=part(nnx.initializers.zeros_init(), ("norm",)), rngs=rngs)
    if family == "gpt":
      self.lm_head = nnx.Linear(d, vocab, kernel_init=part(_INIT, ("embed", "vocab")), use_bias=False, rngs=rngs)
    else:
      self.type_embed = nnx.Embed(2, d, embedding_init=part(_INIT, (None, "embed")), rngs=rngs)
      self.pooler = nnx.Linear(d, d, kernel_init=part(_INIT, ("embed", "mlp")), rngs=rngs)


def toy(d=64, family="gpt", vocab=256, ff=128):
  return lambda: ToyLM(vocab, d, ff, nnx.Rngs(0), family)


def make_mesh(shape, names, devices=None):
  devices = jax.devices() if devices is None else devices
  return Mesh(np.array(devices).reshape(shape), names, axis_types=(AxisType.Auto,) * len(names))


DATA_RULES = (("vocab", "data"), ("embed", None), ("mlp", "data"), ("norm", None))  # ZeRO-like: shard on data
FSDP_TP_RULES = (("vocab", "tensor"), ("embed", "fsdp"), ("mlp", "tensor"), ("norm", None))


def spec(mesh, rules, make_model):
  """Abstract train state with shardings, as the train loop builds it (no arrays allocated)."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    _, abstract_vars = nnx.split(nnx.eval_shape(make_model), nnx.Param)
    param_shardings = nnx.to_pure_dict(nnx.get_named_sharding(abstract_vars, mesh))
  params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(abstract_vars))
  opt = jax.eval_shape(TX.init, params)
  repl = NamedSharding(mesh, P())
  opt_shardings = optax.tree_map_params(TX, lambda _, s: s, opt, param_shardings,
                                        transform_non_params=lambda _: repl,
                                        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  shardings = {"step": repl, "params": param_shardings, "opt_state": opt_shardings}
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "opt_state": opt}
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def make_state(mesh, rules, make_model, step=5):
  """A sharded state after one AdamW update, so moments and count are not at their init values."""
  abstract = spec(mesh, rules, make_model)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)

  def create():
    params = nnx.to_pure_dict(nnx.state(make_model(), nnx.Param))
    opt = TX.init(params)
    grads = jax.tree.map(lambda x: 0.5 * x + 0.1, params)
    updates, opt = TX.update(grads, opt, params)
    return {"step": jnp.int32(step), "params": optax.apply_updates(params, updates), "opt_state": opt}

  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    return jax.jit(create, out_shardings=shardings)()


def assert_trees_bitwise_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert np.array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8)), jax.tree_util.keystr(path)


def committed(directory, step):
  return os.path.exists(os.path.join(directory, str(step), ckpt_lib.COMMIT_MARKER))


# ----------------------------------------------------------------------------- single process


def test_roundtrip_is_bitwise_and_keeps_tree_types(tmp_path):
  mesh = make_mesh((8,), ("data",))
  state = make_state(mesh, DATA_RULES, toy(), step=10)
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  config = {"model": {"d_model": 64}, "logical_axis_rules": [["embed", None]]}
  assert ck.save(10, state, {"config": config, "metrics": {"loss": np.float32(2.5)}}, force=True)
  ck.close()

  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  assert ck.latest_step() == 10 and ck.all_steps() == [10]
  restored = ck.restore(10, spec(mesh, DATA_RULES, toy()))
  assert_trees_bitwise_equal(restored, state)  # includes ScaleByAdamState/MaskedState/EmptyState types
  meta = ck.restore_meta(10)
  assert meta["step"] == 10 and meta["config"] == config and meta["metrics"] == {"loss": 2.5}
  assert meta["fmjax_version"] == __import__("fmjax").__version__
  # The trunk alone (fine-tuning): only "params" is read.
  only_params = ck.restore(10, {"params": spec(mesh, DATA_RULES, toy())["params"]}, items=("params",))
  assert set(only_params) == {"params"}
  assert_trees_bitwise_equal(only_params["params"], state["params"])
  ck.close()


def test_an_unreadable_step_metadata_file_is_no_error_at_every_listing(tmp_path, caplog):
  """Orbax's _CHECKPOINT_METADATA holds a step's save times only: emptied (a partial copy), the step
  still lists and restores, without an ERROR line each time Orbax reads it."""
  mesh = make_mesh((8,), ("data",))
  state = make_state(mesh, DATA_RULES, toy(), step=3)
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  ck.save(3, state, {}, force=True)
  ck.close()
  (tmp_path / "ckpt" / "3" / "_CHECKPOINT_METADATA").write_text("")
  with caplog.at_level("WARNING"):
    ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
    assert ck.latest_step() == 3 and ck.restore_meta(3)["step"] == 3
    assert_trees_bitwise_equal(ck.restore(3, spec(mesh, DATA_RULES, toy())), state)
    ck.close()
  assert not [r for r in caplog.records if "Metadata file" in r.getMessage()]


def test_async_save_snapshots_state_before_it_is_donated(tmp_path):
  # The train step donates the state right after `save` returns; the checkpoint must still
  # hold the values at save time.
  mesh = make_mesh((8,), ("data",))
  state = make_state(mesh, DATA_RULES, toy())
  expected = jax.device_get(state)
  ck = ckpt_lib.Checkpointer(tmp_path, async_save=True)
  ck.save(5, state, {}, force=True)
  bump = jax.jit(lambda s: jax.tree.map(lambda x: x + jnp.ones_like(x), s), donate_argnums=0)
  for _ in range(3):
    state = bump(state)
  ck.close()
  restored = ckpt_lib.Checkpointer(tmp_path).restore(5, spec(mesh, DATA_RULES, toy()))
  assert_trees_bitwise_equal(restored, expected)


def test_saves_and_restores_never_collect_tensorstore_metrics(tmp_path, monkeypatch):
  # Each collection leaks the lists it returns (tensorstore 0.1.86): Orbax took 4 a save, for a log
  # line, and a run that saved for days grew by them without bound.
  import tensorstore
  calls = []
  collect = tensorstore.experimental_collect_matching_metrics
  monkeypatch.setattr(tensorstore, "experimental_collect_matching_metrics",
                      lambda *a, **k: calls.append(a) or collect(*a, **k))
  mesh = make_mesh((8,), ("data",))
  state = make_state(mesh, DATA_RULES, toy(d=16, vocab=64, ff=32))
  ck = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=1)
  for step in (1, 2, 3):
    ck.save(step, state, {})
  ck.wait()
  ck.restore(3, spec(mesh, DATA_RULES, toy(d=16, vocab=64, ff=32)))
  ck.close()
  assert ck.all_steps() == [3] and not calls


def test_partial_restore_reads_the_trunk_for_a_new_head(tmp_path):
  mesh = make_mesh((8,), ("data",))
  state = make_state(mesh, DATA_RULES, toy(family="gpt"))
  ck = ckpt_lib.Checkpointer(tmp_path)
  ck.save(2, state, {}, force=True)
  ck.wait()
  bert_params = spec(mesh, DATA_RULES, toy(family="bert"))["params"]
  trunk = {k: v for k, v in bert_params.items() if k not in ("pooler", "type_embed")}  # the new head is fresh
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    ck.restore(2, {"params": trunk}, items=("params",))
  assert "params/lm_head/kernel: in checkpoint (64, 256), not in model" in str(e.value)
  got = ck.restore(2, {"params": trunk}, items=("params",), partial=True)["params"]
  assert sorted(got) == ["down", "embed", "norm", "up"]
  want = {k: v for k, v in state["params"].items() if k != "lm_head"}
  assert_trees_bitwise_equal(got, want)
  assert got["embed"]["embedding"].sharding == trunk["embed"]["embedding"].sharding
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    ck.restore(2, {"params": bert_params}, items=("params",), partial=True)
  assert "params/pooler/kernel: not in checkpoint" in str(e.value)
  ck.close()


def test_keep_last_k_plus_every_period_and_should_save(tmp_path):
  # A run's checkpointer takes its config's whole checkpoint section: fine-tuning's too.
  config = config_lib.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "finetune_cls.py"), [
      "checkpoint.every_steps=2", "checkpoint.keep=2", "checkpoint.keep_period=4", "checkpoint.every_minutes=90"])
  ck = ckpt_lib.Checkpointer.of_run(config, str(tmp_path))
  assert ck.every_minutes == 90 and ck.directory == tmp_path / "checkpoints"
  state = {"params": {"w": jnp.zeros(3)}, "opt_state": (optax.EmptyState(),)}
  saved = [step for step in range(1, 15) if ck.save(step, {**state, "params": {"w": jnp.full(3, step)}}, {})]
  assert saved == [2, 4, 6, 8, 10, 12, 14]
  assert not ck.save(14, state, {}, force=True)  # already there: not written twice
  ck.wait()
  assert ck.all_steps() == [4, 8, 12, 14]  # multiples of 4, plus the last two
  assert ck.restore(12, {"params": {"w": jax.ShapeDtypeStruct((3,), jnp.int32)}},
                    items=("params",))["params"]["w"].tolist() == [12, 12, 12]
  ck.close()


def test_every_minutes_decision(tmp_path, monkeypatch):
  now = [1000.0]
  monkeypatch.setattr(ckpt_lib, "_now", lambda: now[0])
  ck = ckpt_lib.Checkpointer(tmp_path, every_minutes=2.0, async_save=False)
  assert not ck.should_save(1)
  now[0] += 121
  assert ck.should_save(2)
  assert ck.save(2, {"params": {"w": jnp.ones(2)}}, {})  # decided at should_save(2), not re-timed
  now[0] += 60
  assert not ck.should_save(3) and not ck.save(3, {"params": {"w": jnp.ones(2)}}, {})
  now[0] += 61
  assert ck.should_save(4)
  ck.close()


def test_saves_at_a_stop_never_evict_the_periodic_ones(tmp_path):
  # Each Ctrl-C or preemption saves one step further on; with keep=2 those saves once pushed out
  # the periodic checkpoints (30 32 -> 32 33 -> 33 34).
  w = lambda step: {"params": {"w": jnp.full(2, step)}}
  checkpointer = lambda: ckpt_lib.Checkpointer(tmp_path, every_steps=10, keep=2, owner=True)
  ck = checkpointer()
  assert [s for s in range(1, 33) if ck.save(s, w(s), {}, at_stop=s == 32)] == [10, 20, 30, 32]
  ck.close()
  assert ck.all_steps() == [20, 30, 32]
  for step in (33, 34):  # reruns, each stopped right after it resumed
    ck = checkpointer()
    assert ck.latest_step() == step - 1  # a rerun resumes from the newest, the stop's save
    assert ck.save(step, w(step), {}, at_stop=True)
    ck.close()
    assert ck.all_steps() == [20, 30, step]  # the stop's save went once a newer one landed
  ck = checkpointer()
  assert ck.restore_meta(34)["saved_at_stop"] and ck.latest_step() == 34
  assert ck.save(40, w(40), {})
  ck.wait()
  assert ck.all_steps() == [30, 40]  # `keep` counts the scheduled saves only
  assert ck.save(50, w(50), {}, at_stop=True)  # a stop at a step due anyway: a scheduled save
  ck.wait()
  assert ck.all_steps() == [40, 50] and "saved_at_stop" not in ck.restore_meta(50)
  ck.close()


def plant_torn(directory):
  os.makedirs(directory / "9.orbax-checkpoint-tmp-1730000000")  # killed during the write
  os.makedirs(directory / "7" / "params")                      # a GCS save cut short: no commit marker
  (directory / "7" / "params" / "junk").write_text("x")


def test_torn_checkpoints_are_ignored_and_removed(tmp_path, caplog):
  ck = ckpt_lib.Checkpointer(tmp_path, async_save=False, owner=True)
  ck.save(2, {"params": {"w": jnp.arange(4.0)}}, {"note": "good"}, force=True)
  os.makedirs(tmp_path / "1" / "params")  # older than a committed step: no save in flight, never removed

  plant_torn(tmp_path)
  assert ck.all_steps() == [2]
  with caplog.at_level("WARNING"):
    assert ck.latest_step() == 2
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]
  assert "Removed 2 unfinished checkpoint(s)" in caplog.text
  ck.close()

  plant_torn(tmp_path)  # a new run cleans up on start, before Orbax lists the steps
  ck = ckpt_lib.Checkpointer(tmp_path, owner=True)
  assert sorted(os.listdir(tmp_path)) == ["1", "2"] and ck.latest_step() == 2
  assert ck.restore_meta(2)["note"] == "good"
  ck.close()


def test_readers_never_delete_unfinished_saves(tmp_path):
  # `fmjax eval`/`generate`/`export`/init_from open another run's checkpoints: a save that run is
  # writing looks unfinished, and a workdir whose steps lack commit markers must not lose them.
  ck = ckpt_lib.Checkpointer(tmp_path, async_save=False, owner=True)
  ck.save(2, {"params": {"w": jnp.arange(4.0)}}, {"note": "good"}, force=True)
  ck.close()
  plant_torn(tmp_path)
  before = sorted(os.listdir(tmp_path))
  reader = ckpt_lib.Checkpointer(tmp_path)
  assert reader.latest_step() == 2 and reader.all_steps() == [2]
  assert reader.restore_meta(2)["note"] == "good"
  reader.close()
  assert sorted(os.listdir(tmp_path)) == before

  unmarked = tmp_path / "unmarked"  # every step without its commit marker
  for step in (3, 5):
    os.makedirs(unmarked / str(step) / "params")
  reader = ckpt_lib.Checkpointer(unmarked)
  assert reader.latest_step() is None
  reader.close()
  assert sorted(os.listdir(unmarked)) == ["3", "5"]

  # A run started there cannot take them for one interrupted save (there is one at a time): it
  # refuses in one line, before it deletes anything.
  with pytest.raises(ckpt_lib.CheckpointDamagedError, match=r"holds steps \[3, 5\] without Orbax's commit marker "
                                                            r".* so none was deleted"):
    ckpt_lib.Checkpointer(unmarked, owner=True)
  assert sorted(os.listdir(unmarked)) == ["3", "5"]


def test_elastic_restore_onto_other_meshes(tmp_path):
  mesh8 = make_mesh((8,), ("data",))
  state = make_state(mesh8, DATA_RULES, toy())
  assert state["params"]["embed"]["embedding"].sharding.spec == P("data", None)  # really sharded on save
  ck = ckpt_lib.Checkpointer(tmp_path)
  ck.save(5, state, {}, force=True)
  ck.close()

  ck = ckpt_lib.Checkpointer(tmp_path)
  targets = [
      make_mesh((4, 2), ("fsdp", "tensor")),
      make_mesh((4,), ("data",), jax.devices()[4:]),
  ]
  for mesh, rules in zip(targets, (FSDP_TP_RULES, DATA_RULES)):
    abstract = spec(mesh, rules, toy())
    restored = ck.restore(5, abstract)
    assert_trees_bitwise_equal(restored, state)
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
      assert leaf.sharding == want.sharding
      assert leaf.sharding.device_set == set(mesh.devices.flat)
  assert restored["params"]["up"]["kernel"].sharding.spec == P(None, "data")
  ck.close()


def test_mismatch_lists_paths_and_shapes(tmp_path):
  mesh = make_mesh((8,), ("data",))
  ck = ckpt_lib.Checkpointer(tmp_path)
  ck.save(3, make_state(mesh, DATA_RULES, toy(d=64)), {}, force=True)
  ck.wait()

  wider = spec(mesh, DATA_RULES, toy(d=128))
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    ck.restore(3, wider)
  msg = str(e.value)
  assert msg.splitlines()[0].startswith("checkpoint step 3 in ")
  assert "params/embed/embedding: saved (256, 64), model expects (256, 128)" in msg
  assert "params/down/kernel: saved (128, 64), model expects (128, 128)" in msg
  assert "params/norm/scale: saved (64,), model expects (128,)" in msg
  assert re.search(r"opt_state: \d+ mismatched array\(s\) as well", msg)
  assert len(msg.splitlines()) == 8  # headline, 6 parameters, 1 line for the optimizer state

  bert = spec(mesh, DATA_RULES, toy(d=64, family="bert"))
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    ckpt_lib.check_compatible(ck, 3, bert, items=("params",))
  msg = str(e.value)
  assert "params/lm_head/kernel: in checkpoint (64, 256), not in model" in msg
  assert "params/pooler/kernel: not in checkpoint, model expects (64, 64)" in msg
  assert "params/type_embed/embedding: not in checkpoint, model expects (2, 64)" in msg

  many = {"params": {f"w{i:02d}": jax.ShapeDtypeStruct((2,), jnp.float32) for i in range(25)}}
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    ckpt_lib.check_compatible(ck, 3, many)
  msg = str(e.value)
  assert "(32 mismatched array(s))" in msg and "... and 22 more" in msg  # 25 missing + 7 unexpected
  assert len(msg.splitlines()) == 12
  ckpt_lib.check_compatible(ck, 3, spec(mesh, DATA_RULES, toy(d=64)))  # the right model passes
  ck.close()


def test_restore_errors_are_clear(tmp_path):
  ck = ckpt_lib.Checkpointer(tmp_path, async_save=False)
  ck.save(1, {"params": {"w": jnp.ones(2)}}, {}, force=True)
  with pytest.raises(FileNotFoundError) as e:
    ck.restore(4, {"params": {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}}, items=("params",))
  assert "no checkpoint for step 4" in str(e.value) and "available: [1]" in str(e.value)
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    ck.restore(1, {"params": {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}, "opt_state": ()})
  assert "holds no optimizer state, so a run cannot resume it; to train from its params, start a new" in str(e.value)
  with pytest.raises(TypeError) as e:
    ck.save(2, {"params": {"w": jnp.ones(2)}}, {"bad": object()}, force=True)
  assert "meta.bad" in str(e.value)
  ck.close()


def test_init_from_adopts_the_sources_architecture_unless_this_config_names_another():
  """A config that names no architecture (a classifier's, GPT-2's) takes init_from's; one that names
  another than the source's (Llama's settings, init_from a GPT-2 run saved before they existed) is one
  line, not a run that silently trains GPT-2 under the Llama config's name."""
  gpt2 = config_lib.load_config("configs/gpt.py:tiny").to_dict()
  for key in ("positions", "norm", "mlp", "num_kv_heads", "use_bias", "tie_embeddings", "rope_theta"):
    del gpt2["model"][key]  # saved before the keys existed
  llama = config_lib.load_config("configs/gpt.py:tiny,llama", ["model.num_kv_heads=2"])
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=(
      r"^init_from=/runs/gpt2 holds a model with model.positions=learned, .*model.use_bias=true, "
      r"model.tie_embeddings=true but this config sets model.positions=rope, model.norm=rmsnorm, "
      r"model.mlp=swiglu, model.num_kv_heads=2, model.use_bias=false, model.tie_embeddings=false; .*$")) as e:
    ckpt_lib.adopt_model_settings(llama, gpt2, "init_from=/runs/gpt2")
  assert "\n" not in str(e.value) and llama.model.positions == "rope"
  plain = config_lib.load_config("configs/gpt.py:tiny")
  assert ckpt_lib.adopt_model_settings(plain, gpt2) == []
  assert ckpt_lib.adopt_model_settings(plain, {"model": llama.model.to_dict()}) == [
      "model.positions='rope'", "model.norm='rmsnorm'", "model.mlp='swiglu'", "model.num_kv_heads=2",
      "model.use_bias=False", "model.tie_embeddings=False"]
  # num_kv_heads = num_heads is the multi-head model that 0 names.
  mha = config_lib.load_config("configs/gpt.py:tiny,llama", [f"model.num_kv_heads={llama.model.num_heads}"])
  assert ckpt_lib.adopt_model_settings(mha, {"model": {**llama.model.to_dict(), "num_kv_heads": 0}}) == [
      "model.num_kv_heads=0"]


def test_init_from_adopts_a_qwen_sources_norms_biases_and_head_width_and_older_runs_had_none():
  """A config that names no architecture (a classifier's for an imported Qwen3) takes the source's q/k norms and
  head width; one that names q/k norms for a source without them (a Qwen2) is one line; a run saved before the
  keys had neither them nor q/k/v-only biases, and resumes without a breaking change."""
  qwen = ["model.num_kv_heads=2", "model.head_dim=48"]
  qwen3 = config_lib.load_config("configs/gpt.py:tiny,llama", [*qwen, "model.qk_norm=true"])
  qwen2 = config_lib.load_config("configs/gpt.py:tiny,llama", [*qwen, "model.qkv_bias=true"]).to_dict()
  plain = config_lib.load_config("configs/gpt.py:tiny")
  assert ckpt_lib.adopt_model_settings(plain, qwen3.to_dict()) == [
      "model.positions='rope'", "model.norm='rmsnorm'", "model.mlp='swiglu'", "model.num_kv_heads=2",
      "model.head_dim=48", "model.use_bias=False", "model.qk_norm=True", "model.tie_embeddings=False"]
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=(
      r"^init_from=/runs/qwen2 holds a model with model.qk_norm=false but this config sets model.qk_norm=true; ")) as e:
    ckpt_lib.adopt_model_settings(qwen3, qwen2, "init_from=/runs/qwen2")
  assert "\n" not in str(e.value)
  now = config_lib.load_config("configs/gpt.py:tiny,llama").to_dict()
  before = json.loads(json.dumps(now))
  for key in ("head_dim", "qkv_bias", "qk_norm"):
    del before["model"][key]
  assert ckpt_lib.config_changes(before, now)[0] == []
  assert models.architecture(before["model"]) == models.architecture(now["model"])


def test_init_from_adopts_the_rotary_scaling_of_its_source_unless_this_config_reads_positions_anew(caplog):
  """A Llama 3.2 import's llama3 scaling (and theta) come with it into a config that names none (its logits are
  that model's); a config that names a scaling or a theta reads positions anew, as extending a context does
  (with a longer max_len, which a rotary model may take and a position table may not), and is warned; a rotary
  run saved before the scaling keys is unscaled, and resumes under today's defaults without a breaking change."""
  llama3 = ["model.rope_scaling=llama3", "model.rope_factor=32", "model.rope_original_max_len=64",
            "model.rope_theta=500000"]
  source = config_lib.load_config("configs/gpt.py:tiny,llama", llama3).to_dict()
  plain = config_lib.load_config("configs/gpt.py:tiny,llama")
  assert ckpt_lib.adopt_model_settings(plain, source) == [
      "model.rope_theta=500000.0", "model.rope_scaling='llama3'", "model.rope_factor=32.0",
      "model.rope_original_max_len=64"]
  longer = ["model.rope_scaling=linear", "model.rope_factor=4", "model.max_len=1024"]
  linear = config_lib.load_config("configs/gpt.py:tiny,llama", longer)
  ckpt_lib.check_same_model(source, linear.model, "init_from")
  with caplog.at_level(logging.WARNING, logger="fmjax"):
    assert ckpt_lib.adopt_model_settings(linear, source, "init_from=/runs/llama") == ["model.rope_theta=500000.0"]
  assert {k: linear.model[k] for k in ("rope_scaling", "rope_factor", "rope_original_max_len")} == {
      "rope_scaling": "linear", "rope_factor": 4.0, "rope_original_max_len": 8192}  # the scaling's group: this one's
  assert ("model.rope_scaling=linear, where init_from=/runs/llama has llama3: positions are read anew, so its "
          "outputs change until the run adapts to them (extending its context); drop the setting") in caplog.text
  assert "rope_original_max_len" not in caplog.text  # linear reads no such setting: nothing of it is read anew
  theta = config_lib.load_config("configs/gpt.py:tiny,llama", ["model.rope_theta=1000000"])
  assert ckpt_lib.adopt_model_settings(theta, source)[0] == "model.rope_scaling='llama3'"
  assert theta.model.rope_theta == 1e6
  learned = config_lib.load_config("configs/gpt.py:tiny")
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"\(.*max_len=256.*\) but this config builds gpt "
                                                             r"\(.*max_len=1024"):
    ckpt_lib.check_same_model(learned.to_dict(), config_lib.load_config("configs/gpt.py:tiny", ["model.max_len=1024"])
                              .model, "init_from")
  now = config_lib.load_config("configs/gpt.py:tiny,llama").to_dict()
  before = json.loads(json.dumps(now))
  for key in models.ROPE_SCALING_READS["llama3"] + ("rope_scaling",):
    del before["model"][key]
  assert ckpt_lib.config_changes(before, now)[0] == []
  assert models.architecture(before["model"]) == models.architecture(now["model"])


def test_a_gpt2_config_extends_the_context_of_a_rotary_init_from():
  """README's position interpolation, `configs/gpt.py:tiny` with init_from=an imported Llama and
  rope_scaling=linear: its positions (rotary) are the source's, so the scaling is checked once they are
  adopted, not refused against GPT-2's learned table; from a learned-position source it is still refused."""
  longer = ["init_from=/runs/llama", "model.rope_scaling=linear", "model.rope_factor=2", "model.max_len=512",
            "data.seq_len=512"]
  config = config_lib.load_config("configs/gpt.py:tiny", longer)
  source = config_lib.load_config("configs/gpt.py:tiny,llama").to_dict()
  assert "model.positions='rope'" in ckpt_lib.adopt_model_settings(config, source)
  assert (config.model.positions, config.model.rope_scaling, config.model.rope_factor) == ("rope", "linear", 2.0)
  learned = config_lib.load_config("configs/gpt.py:tiny", longer)
  with pytest.raises(config_lib.ConfigError, match=r"model.rope_scaling=linear scales rotary positions, and this "
                                                   r"model has model.positions=learned"):
    ckpt_lib.adopt_model_settings(learned, config_lib.load_config("configs/gpt.py:tiny").to_dict())
  with pytest.raises(config_lib.ConfigError, match="scales rotary positions"):  # no init_from: refused at once
    config_lib.load_config("configs/gpt.py:tiny", longer[1:])


def test_config_changes_classification():
  saved = {"name": "gpt_tiny",
           "model": {"d_model": 64, "num_layers": 2, "remat": "none", "dtype": "bfloat16", "param_dtype": "float32"},
           "data": {"seq_len": 128, "prefetch": 2, "tokenizer": {"vocab_size": 2048}},
           "train": {"steps": 100, "log_every": 10, "eval_every": 50, "batch_size": 8, "seed": 0,
                     "objective": "clm"},
           "optim": {"lr": 1e-3, "b2": 0.95},
           "checkpoint": {"every_steps": 10, "keep": 3},
           "logical_axis_rules": [["embed", None], ["mlp", "tensor"]]}
  same = {**saved, "logical_axis_rules": (("embed", None), ("mlp", "tensor"))}  # tuples vs JSON lists
  assert ckpt_lib.config_changes(saved, same) == ([], [])

  new = {**saved,
         "model": {"d_model": 128, "num_layers": 2, "remat": "full", "dtype": "float32", "param_dtype": "bfloat16"},
         "data": {"seq_len": 128, "prefetch": 8, "tokenizer": {"vocab_size": 4096}},
         "train": {**saved["train"], "steps": 200, "log_every": 5, "eval_every": 20, "batch_size": 16,
                   "seed": 1, "objective": "mlm"},
         "optim": {"lr": 3e-4, "b2": 0.95, "freeze": "trunk"},
         "checkpoint": {"every_steps": 50, "keep": 1}}
  breaking, harmless = ckpt_lib.config_changes(saved, new)
  key = lambda s: s.split(":")[0]
  assert [key(b) for b in breaking] == [
      "data.tokenizer.vocab_size", "model.d_model", "model.param_dtype", "optim.freeze", "train.batch_size",
      "train.objective", "train.seed"]
  assert [key(h) for h in harmless] == [
      "checkpoint.every_steps", "checkpoint.keep", "data.prefetch", "model.dtype", "model.remat", "optim.lr",
      "train.eval_every", "train.log_every", "train.steps"]
  assert "model.d_model: 64 -> 128" in breaking
  assert "optim.freeze: '<unset>' -> 'trunk'" in breaking
  # A fine-tuning workdir resumed with another task, PEFT mode, SFT data or source is another experiment.
  tuned = {**saved, "init_from": "/runs/a", "task": {"name": "sst2"}, "finetune": {"peft": "none"},
           "sft": {"eval_percent": 10}}
  breaking, _ = ckpt_lib.config_changes(tuned, {**tuned, "init_from": "/runs/b", "task": {"name": "csv"},
                                                "finetune": {"peft": "lora"}, "sft": {"eval_percent": 5}})
  assert [key(b) for b in breaking] == ["finetune.peft", "init_from", "sft.eval_percent", "task.name"]
  # A key newer than the checkpoint compares as the value the run had without it.
  old_run = {**tuned, "finetune": {"peft": "none"}}
  assert ckpt_lib.config_changes(old_run, {**tuned, "finetune": {"peft": "none", "head_bias": True}}) == ([], [])
  breaking, _ = ckpt_lib.config_changes(old_run, {**tuned, "finetune": {"peft": "none", "head_bias": False}})
  assert breaking == ["finetune.head_bias: True -> False"]
  # An SFT run saved before conversations resumes with their defaults; another template is another experiment.
  chats = {**tuned, "sft": {"eval_percent": 10, "messages_key": "messages", "chat_template": ""}}
  assert ckpt_lib.config_changes(tuned, chats) == ([], [])
  breaking, _ = ckpt_lib.config_changes(tuned, {**chats, "sft": {**chats["sft"], "chat_template": "t.jinja"}})
  assert breaking == ["sft.chat_template: '' -> 't.jinja'"]
  # The default rules gained kv_heads (grouped-query attention's key/value heads): a run saved before it, with
  # the defaults or its own list, resumes without a change reported; another rule for kv_heads is one.
  rules = [list(r) for r in config_lib.DEFAULT_RULES]
  before_gqa = {**saved, "logical_axis_rules": [r for r in rules if r[0] != "kv_heads"]}
  assert ckpt_lib.config_changes(before_gqa, {**saved, "logical_axis_rules": config_lib.DEFAULT_RULES}) == ([], [])
  other = [[n, None if n == "kv_heads" else a] for n, a in rules]
  assert ckpt_lib.config_changes(before_gqa, {**saved, "logical_axis_rules": other})[1]
  # A pretraining corpus that moved resumes (train warns if its rows differ); an SFT run's files are its rows.
  files = {**saved, "data": {**saved["data"], "files": "/old/*.txt"}}
  moved = {**files, "data": {**files["data"], "files": "/new/*.txt"}}
  assert ckpt_lib.config_changes(files, moved) == ([], ["data.files: '/old/*.txt' -> '/new/*.txt'"])
  sft = {"sft": {"eval_percent": 10}}
  assert ckpt_lib.config_changes({**files, **sft}, {**moved, **sft})[0] == [
      "data.files: '/old/*.txt' -> '/new/*.txt'"]
  # So does a mixture whose item's own files moved, written any way; another weight or dataset does not.
  mix = lambda dataset: {**saved, "data": {**saved["data"], "dataset": dataset}}
  before = mix("lm1b=3,text_files(files=/old/*.txt; feature=body)=1")
  assert ckpt_lib.config_changes(before, mix("lm1b=6, text_files(feature=body; files=/new/*.txt)=2")) == ([], [
      "data.dataset: 'lm1b=3,text_files(files=/old/*.txt; feature=body)=1' -> 'lm1b=6, text_files(feature=body; "
      "files=/new/*.txt)=2'"])
  for other in ("lm1b=1,text_files(files=/new/*.txt; feature=body)=1", "lm1b=3,text_files(files=/new/*.txt)=1"):
    assert ckpt_lib.config_changes(before, mix(other))[0], other
  # Another clipping threshold is a hyperparameter; clipping on or off adds or drops a slot of the
  # optimizer state, which a resume could not restore.
  clipped = {**saved, "optim": {**saved["optim"], "clip_norm": 1.0}}
  with_clip = lambda c: {**saved, "optim": {**saved["optim"], "clip_norm": c}}
  assert ckpt_lib.config_changes(clipped, with_clip(0.5)) == ([], ["optim.clip_norm: 1.0 -> 0.5"])
  assert ckpt_lib.config_changes(clipped, with_clip(0.0))[0] == [
      "optim.clip_norm: 1.0 -> 0.0 (clipping turned off: the optimizer state has another structure)"]
  assert [key(b) for b in ckpt_lib.config_changes(with_clip(0), clipped)[0]] == ["optim.clip_norm"]


def test_async_save_error_surfaces(tmp_path, monkeypatch):
  ck = ckpt_lib.Checkpointer(tmp_path, async_save=True, owner=True)
  original = ckpt_lib.ocp.StandardCheckpointHandler.async_save

  class _Failed:
    def result(self, timeout=None):
      raise OSError("No space left on device (simulated)")

  async def failing_async_save(self, *args, **kwargs):
    return list(await original(self, *args, **kwargs) or []) + [_Failed()]

  monkeypatch.setattr(ckpt_lib.ocp.StandardCheckpointHandler, "async_save", failing_async_save)
  assert ck.save(3, {"params": {"w": jnp.ones(4)}}, {}, force=True)  # the write fails in the background
  with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
    ck.wait()
  assert str(e.value) == (f"saving checkpoint step 3 to {tmp_path} failed (OSError: No space left on device "
                          "(simulated)); no earlier checkpoint exists; free space or fix the permissions, then "
                          "rerun the same command")
  assert ck.latest_step() is None and os.listdir(tmp_path) == []  # the half-written step is gone

  monkeypatch.setattr(ckpt_lib.ocp.StandardCheckpointHandler, "async_save", original)
  assert ck.save(4, {"params": {"w": jnp.ones(4)}}, {}, force=True)
  ck.close()
  assert ckpt_lib.Checkpointer(tmp_path).all_steps() == [4]


def test_uncommitted_save_raises(tmp_path):
  # Orbax logs some finalisation errors instead of raising; the commit marker check catches them.
  ck = ckpt_lib.Checkpointer(tmp_path, async_save=True)
  ck.save(1, {"params": {"w": jnp.ones(4)}}, {}, force=True)
  ck._manager.wait_until_finished()
  os.remove(tmp_path / "1" / ckpt_lib.COMMIT_MARKER)
  with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
    ck.wait()
  assert "saving checkpoint step 1 to" in str(e.value) and "it was not committed" in str(e.value)
  ck.close()


def test_cli_names_a_failed_save_and_the_intact_steps_in_one_line(tmp_path, monkeypatch, capsys):
  from fmjax import cli
  original = ckpt_lib.ocp.StandardCheckpointHandler.async_save

  class _Failed:
    def result(self, timeout=None):
      raise OSError(28, "No space left on device")

  async def failing_async_save(self, *args, **kwargs):
    return list(await original(self, *args, **kwargs) or []) + [_Failed()]

  def save_twice(argv):
    ck = ckpt_lib.Checkpointer(tmp_path, async_save=True, owner=True)
    ck.save(10, {"params": {"w": jnp.ones(4)}}, {}, force=True)
    ck.wait()
    monkeypatch.setattr(ckpt_lib.ocp.StandardCheckpointHandler, "async_save", failing_async_save)
    try:
      ck.save(20, {"params": {"w": jnp.ones(4)}}, {}, force=True)
    finally:
      ck.close()

  monkeypatch.setitem(cli.COMMANDS, "savetest", (save_twice, ""))
  assert cli.main(["savetest"]) == 2
  err = capsys.readouterr().err
  assert err == (f"error: saving checkpoint step 20 to {tmp_path} failed (OSError: [Errno 28] No space left on "
                 "device); the older steps [10] are intact; free space or fix the permissions, then rerun the "
                 "same command to resume from step 10\n")


def test_a_full_disk_found_at_the_next_save_names_that_step_in_one_line(tmp_path, monkeypatch, capsys, caplog):
  # The background write of step 4 fails and the save of step 6 finds it uncommitted: the one line
  # names step 4 and the OS error at the end of tensorstore's status, and Orbax's tracebacks are gone.
  from fmjax import cli
  original = ckpt_lib.ocp.StandardCheckpointHandler.async_save

  class _Failed:
    def result(self, timeout=None):
      raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "0.w/0" in OCDBT database at local file "{tmp_path}/4'
                       '.orbax-checkpoint-tmp/params/": Failed to write 4 bytes to file 12: No space left on device '
                       "[os_error_code='28']")

  async def failing_async_save(self, *args, **kwargs):
    return list(await original(self, *args, **kwargs) or []) + [_Failed()]

  def run(argv):
    ck = ckpt_lib.Checkpointer(tmp_path, every_steps=2, owner=True)
    try:
      for step in range(1, 7):
        if step == 4:
          monkeypatch.setattr(ckpt_lib.ocp.StandardCheckpointHandler, "async_save", failing_async_save)
        ck.save(step, {"params": {"w": jnp.ones(4)}}, {})
        while ck._manager.is_saving_in_progress():  # as in training: the write ends before the next save
          time.sleep(0.01)
    finally:
      ck.close()

  monkeypatch.setitem(cli.COMMANDS, "savetest", (run, ""))
  assert cli.main(["savetest"]) == 2
  assert capsys.readouterr().err == (
      f"error: saving checkpoint step 4 to {tmp_path} failed (RESOURCE_EXHAUSTED: No space left on device); the "
      "older steps [2] are intact; free space or fix the permissions, then rerun the same command to resume from "
      "step 2\n")
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]  # Orbax's tracebacks
  sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)  # a write that ended after its loop
  assert capsys.readouterr().err == ""


def _damage_rm_arrays(step_dir):
  for name in os.listdir(step_dir / "params" / "d"):
    os.remove(step_dir / "params" / "d" / name)


def _damage_truncate_manifest(step_dir):
  with open(step_dir / "params" / "manifest.ocdbt", "r+b") as f:
    f.truncate(10)


@pytest.mark.parametrize("damage, read, reason", [
    (_damage_rm_arrays, "restore", r"NOT_FOUND reading params/d/\w+"),
    (_damage_truncate_manifest, "restore", "DATA_LOSS reading params/manifest.ocdbt"),
    (lambda d: __import__("shutil").rmtree(d / "meta"), "meta", "its 'meta' item is missing"),
    (lambda d: (d / "meta" / "metadata").write_text('{"step": 3'), "meta", "a JSON file is cut short"),
    (lambda d: __import__("shutil").rmtree(d / "params"), "restore", "its 'params' item is missing"),
    (lambda d: __import__("shutil").rmtree(d / "opt_state"), "restore", "its 'opt_state' item is missing"),
    (lambda d: os.remove(d / "params" / "_METADATA"), "restore", "the metadata of its 'params' item is missing"),
])
def test_damaged_step_is_named_with_the_intact_ones_in_one_line(tmp_path, damage, read, reason):
  ck = ckpt_lib.Checkpointer(tmp_path, async_save=False, owner=True)
  state = {"params": {"w": jnp.arange(300.0), "v": jnp.ones((4, 4))}, "opt_state": {"m": jnp.ones(3)}}
  for step in (1, 2, 3):
    ck.save(step, state, {}, force=True)
  ck.close()
  damage(tmp_path / "3")
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  reader = ckpt_lib.Checkpointer(tmp_path)
  with pytest.raises(ckpt_lib.CheckpointDamagedError) as e:
    reader.restore_meta(3) if read == "meta" else reader.restore(3, abstract)
  reader.close()
  msg = str(e.value)
  assert "\n" not in msg and re.match(
      rf"checkpoint step 3 in {re.escape(str(tmp_path))} is damaged \({reason}.*\); move {re.escape(str(tmp_path))}/3 "
      rf"out of {re.escape(str(tmp_path))} to resume from step 2, or read that step instead \(--step=2, "
      r"init_from_step=2\); the other committed steps are \[1, 2\]$", msg), msg
  assert ckpt_lib.Checkpointer(tmp_path).all_steps() == [1, 2, 3]  # no step moved or deleted behind the user's back


@pytest.mark.parametrize("read", ["restore", "meta", "after listing"])
def test_a_step_removed_while_it_is_read_is_no_damage(tmp_path, monkeypatch, read):
  """eval or init_from beside a training: that run's checkpoint.keep may delete the step being read,
  during the read or after the reader picked it. Nothing is damaged, so the line says to read again;
  it said to move the step out, or 'no checkpoint for step 1' of a step nobody asked for, or was a traceback."""
  ck = ckpt_lib.Checkpointer(tmp_path, async_save=False, owner=True)
  state = {"params": {"w": jnp.arange(3.0)}, "opt_state": {"m": jnp.ones(3)}}
  for step in (1, 2):
    ck.save(step, state, {}, force=True)
  ck.close()
  reader = ckpt_lib.Checkpointer(tmp_path)
  orbax_restore = reader._manager.restore

  def removed_meanwhile(step, *args, **kwargs):  # the training's save of step 3 lands, and step 1 goes
    shutil.rmtree(tmp_path / str(step))
    return orbax_restore(step, *args, **kwargs)

  if read == "after listing":
    assert reader.all_steps() == [1, 2]
    shutil.rmtree(tmp_path / "1")
  else:
    monkeypatch.setattr(reader._manager, "restore", removed_meanwhile)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  with pytest.raises(ckpt_lib.CheckpointDamagedError) as e:
    reader.restore_meta(1) if read == "meta" else reader.restore(1, abstract)
  reader.close()
  assert str(e.value) == (f"checkpoint step 1 in {tmp_path} was removed while it was read, by the run still "
                          "training there (its checkpoint.keep); rerun to read its newest step (now step 2), or "
                          "read a step that run keeps (checkpoint.keep_period)")


def test_a_reader_lists_again_when_a_step_goes_as_it_opens(tmp_path, monkeypatch):
  """Orbax's manager reads the time of each step it lists: a training beside the reader may delete one
  in between (its checkpoint.keep). That was "error: [Errno 2] No such file or directory: DIR/1"."""
  ck = ckpt_lib.Checkpointer(tmp_path, async_save=False, owner=True)
  for step in (1, 2):
    ck.save(step, {"params": {"w": jnp.ones(3)}}, {}, force=True)
  ck.close()
  orbax_manager, opened = ckpt_lib.ocp.CheckpointManager, []

  def step_1_goes(directory, **kwargs):
    opened.append(directory)
    if len(opened) == 1:
      shutil.rmtree(tmp_path / "1")
      raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "1"))
    return orbax_manager(directory, **kwargs)

  monkeypatch.setattr(ckpt_lib.ocp, "CheckpointManager", step_1_goes)
  reader = ckpt_lib.Checkpointer(tmp_path)
  assert reader.latest_step() == 2 and len(opened) == 2
  reader.close()


def test_the_other_failed_reads_of_a_damaged_step_log_nothing(tmp_path, caplog):
  """Orbax reads a step's arrays in concurrent tasks; when the step is damaged, the errors of the
  reads that failed beside the first are logged by asyncio as "never retrieved" once their tasks
  are collected, at times before the first error reaches fmjax: none of them may show."""
  ck = ckpt_lib.Checkpointer(tmp_path / "saved", async_save=False, owner=True)
  for step in (1, 2):
    ck.save(step, {"params": {"w": jnp.ones(3)}}, {}, force=True)
  ck.close()
  directory = tmp_path / "copied"  # as in a resume, which has saved nothing yet
  shutil.copytree(tmp_path / "saved", directory)
  caplog.set_level(logging.ERROR, logger="asyncio")  # as before any damaged read in this process
  damaged = lambda: ValueError(f'OUT_OF_RANGE: Error reading "w/0" in OCDBT database at local file '
                               f'"{directory}/2/params/"')

  def unretrieved(*errors):
    """Tasks that fail with the `errors` made, collected with nobody retrieving them."""
    async def read(error):
      raise error()

    loop = asyncio.new_event_loop()
    others = [loop.create_task(read(e)) for e in errors]
    loop.run_until_complete(asyncio.sleep(0.01))
    assert all(o.done() for o in others)
    loop.close()
    del others
    gc.collect()

  def wrapped():  # as Orbax wraps tensorstore's errors: the damage is the cause
    e = Exception("reading the step failed")
    e.__cause__ = damaged()
    return e

  reader = ckpt_lib.Checkpointer(directory)
  with pytest.raises(ckpt_lib.CheckpointDamagedError, match=r"step 2 .* is damaged \(OUT_OF_RANGE reading params"):
    with reader._reading(2):
      # What is no damage of a step, or another directory's, is still told (until the damage is said).
      unretrieved(lambda: RuntimeError(f"INTERNAL: another failure in {directory}/2"),
                  lambda: FileNotFoundError(2, "No such file or directory", str(tmp_path / "elsewhere")))
      told = caplog.text
      assert f"another failure in {directory}/2" in told and "elsewhere" in told, told
      caplog.clear()
      unretrieved(damaged, wrapped)  # the unretrieved tasks go before the first error is raised
      raise damaged()
  reader.close()
  assert "never retrieved" not in caplog.text, caplog.text


def test_after_a_damaged_read_unrelated_errors_still_show(tmp_path, caplog, monkeypatch):
  """In a notebook the process outlives a damaged read: its leftovers (Orbax's and tensorstore's) stay
  quiet, but another object's failed __del__ or another task's unretrieved error is still told; one
  damaged read silenced them all until the kernel restarted."""
  told = []
  monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)  # fmjax's hooks go on again, over `told`
  monkeypatch.setattr(sys, "unraisablehook", told.append)
  caplog.set_level(logging.ERROR, logger="asyncio")
  directory = tmp_path / "run"
  ck = ckpt_lib.Checkpointer(directory, async_save=False, owner=True)
  ck.save(1, {"params": {"w": jnp.ones(3)}}, {}, force=True)
  ck.close()
  reader = ckpt_lib.Checkpointer(directory)
  with pytest.raises(ckpt_lib.CheckpointDamagedError, match=r"step 1 .* is damaged \(OUT_OF_RANGE reading params"):
    with reader._reading(1):
      raise ValueError(f'OUT_OF_RANGE: Error reading "w/0" in OCDBT database at local file "{directory}/1/params/"')
  reader.close()
  orbax = {}  # code as if in Orbax's files: what its reads leave behind
  exec(compile("async def read():\n  raise RuntimeError('INTERNAL: a read Orbax left')\n"
               "def finish():\n  raise RuntimeError('INTERNAL: a callback tensorstore left')\n",
               os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "reads.py"), "exec"), orbax)

  class Unrelated:
    def __del__(self):
      raise ValueError("an unrelated __del__ failed")

  async def unrelated():
    raise KeyError("an unrelated task failed")

  Unrelated()
  try:
    orbax["finish"]()
  except RuntimeError as e:
    sys.unraisablehook(type("Info", (), {"exc_type": RuntimeError, "exc_value": e, "exc_traceback": e.__traceback__,
                                         "err_msg": None, "object": None})())
  loop = asyncio.new_event_loop()
  tasks = [loop.create_task(unrelated()), loop.create_task(orbax["read"]())]
  loop.run_until_complete(asyncio.sleep(0.01))
  loop.close()
  del tasks
  gc.collect()
  assert [str(info.exc_value) for info in told] == ["an unrelated __del__ failed"], told
  assert "never retrieved" in caplog.text and "an unrelated task failed" in caplog.text, caplog.text
  assert "a read Orbax left" not in caplog.text, caplog.text


def test_workdir_lock_is_exclusive_and_names_the_holder(tmp_path):
  from fmjax.config_lib import ConfigError
  lock = ckpt_lib.lock_workdir(str(tmp_path))
  with pytest.raises(ConfigError) as e:  # a second open file of the lock conflicts, as another process's does
    ckpt_lib.lock_workdir(str(tmp_path))
  assert str(e.value) == (f"another fmjax process is training in {tmp_path} (pid {os.getpid()} on "
                          f"{socket.gethostname()}); wait for it or use another --workdir")
  lock.release()
  with ckpt_lib.lock_workdir(str(tmp_path)):
    pass
  ckpt_lib.lock_workdir(str(tmp_path)).release()
  assert os.listdir(tmp_path) == [ckpt_lib.LOCK_FILE]
  with ckpt_lib.lock_workdir("gs://bucket/run"), ckpt_lib.lock_workdir("gs://bucket/run"):
    pass  # object stores have no locks: not locked, and no file written there


def _run_args(command, tmp_path):
  """A tiny run of `command` that reaches its workdir lock without a dataset to prepare."""
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "cat", "dog", "runs", "the", *"abcdefghijklmnopqrst"]
  (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
  rows = [{"text": "the cat runs", "label": i % 2, "prompt": "1 plus 1 is", "completion": " 2."} for i in range(16)]
  (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  model = ["--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.num_heads=2",
           "--config.model.d_ff=64", "--config.model.vocab_size=128", "--config.model.max_len=32",
           "--config.data.seq_len=16", "--config.train.batch_size=8", "--config.data.tokenizer.kind=hf",
           f"--config.data.tokenizer.path={tmp_path}/vocab.txt"]
  return {
      "train": ["--config=configs/gpt.py:tiny,runlocal"],
      "finetune": ["--config=configs/finetune_cls.py:task=jsonl", *model, f"--config.task.files={tmp_path}/rows.jsonl",
                   "--config.task.text_columns=text", f"--config.data.cache_dir={tmp_path}/cache"],
      "sft": ["--config=configs/sft.py", *model, f"--config.data.files={tmp_path}/rows.jsonl",
              f"--config.data.cache_dir={tmp_path}/cache"],
  }[command] + [f"--workdir={tmp_path}/run"]


@pytest.mark.parametrize("command", ["train", "finetune", "sft"])
def test_second_training_in_a_workdir_fails_at_once(tmp_path, capsys, monkeypatch, command):
  from fmjax import cli
  from fmjax.config_lib import ConfigError
  os.makedirs(tmp_path / "run")
  with ckpt_lib.lock_workdir(str(tmp_path / "run")):  # as a training in another process holds it
    assert cli.main([command, *_run_args(command, tmp_path)]) == 2
  err = capsys.readouterr().err  # log lines may come first: a logger set up by an earlier test writes here too
  assert err.splitlines()[-1] == (f"error: another fmjax process is training in {tmp_path}/run (pid {os.getpid()} "
                      f"on {socket.gethostname()}); wait for it or use another --workdir")
  assert not os.path.exists(tmp_path / "run" / "checkpoints")  # refused before it touched anything

  def fail(self):
    raise ConfigError("stop here")

  monkeypatch.setattr(ckpt_lib.Checkpointer, "latest_step", fail)  # the run fails while it holds the lock
  assert cli.main([command, *_run_args(command, tmp_path)]) == 2
  assert capsys.readouterr().err.splitlines()[-1] == "error: stop here"
  ckpt_lib.lock_workdir(str(tmp_path / "run")).release()  # ...and let it go


@pytest.mark.parametrize("command", ["train", "finetune", "sft"])
def test_sigterm_while_a_run_starts_stops_it_in_one_line(tmp_path, capsys, monkeypatch, command):
  """A preemption or a scheduler can stop a run before its step loop watches for SIGTERM (while it
  prepares data, restores or compiles): the run stops there, as after a Ctrl-C, and exits 143."""
  from fmjax import cli
  before = signal.getsignal(signal.SIGTERM)
  real = ckpt_lib.Checkpointer.latest_step

  def latest_step(self):
    os.kill(os.getpid(), signal.SIGTERM)  # handled in this (main) thread before the next lines run
    return real(self)

  monkeypatch.setattr(ckpt_lib.Checkpointer, "latest_step", latest_step)
  assert cli.main([command, *_run_args(command, tmp_path)]) == cli.PREEMPTED_EXIT_CODE
  assert capsys.readouterr().err.splitlines()[-1] == (
      "stopped: SIGTERM before the step loop could save: nothing new was saved; rerun the same command to go on")
  assert ckpt_lib.saved_steps(str(tmp_path / "run" / "checkpoints")) == []
  if command == "train":  # a start that saved nothing leaves no workdir behind
    assert not os.path.exists(tmp_path / "run")
  assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("signalled", ["Terminated", "KeyboardInterrupt"])
def test_the_fmjax_program_stopped_by_a_signal_exits_without_the_teardown(tmp_path, signalled):
  """A SIGTERM or Ctrl-C can come while XLA compiles a step on a thread of its own; Python's teardown
  then freed the devices under it and `fmjax train` died of a segmentation fault (139) instead of
  exiting 143 or 130. The program skips the teardown (no atexit handler runs) after saying why it stopped."""
  root = os.path.join(os.path.dirname(__file__), "..")
  code = ("import atexit, sys; from fmjax import checkpoint, cli, train\n"
          "atexit.register(print, 'teardown ran')\n"
          f"def run(config, workdir): raise {'checkpoint.' if signalled == 'Terminated' else ''}{signalled}('x')\n"
          "train.run = run\n"
          f"sys.argv = ['fmjax', 'train', '--config=configs/gpt.py:tiny', '--workdir={tmp_path / 'run'}']\n"
          "sys.exit(cli.main())\n")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                        env={**os.environ, "PYTHONPATH": root}, timeout=120)
  from fmjax import cli
  want = cli.PREEMPTED_EXIT_CODE if signalled == "Terminated" else cli.INTERRUPTED_EXIT_CODE
  assert done.returncode == want and "teardown ran" not in done.stdout, (done.returncode, done.stdout, done.stderr)
  assert done.stderr.strip().endswith(f"{'stopped' if signalled == 'Terminated' else 'interrupted'}: x")


def test_sigterm_after_the_step_loop_lets_the_last_save_land():
  """Once a step loop ran, it saved what it had: a SIGTERM while its last async save is waited on is
  noted, not raised (that would cut the save short and say nothing was saved)."""
  before = signal.getsignal(signal.SIGTERM)
  with ckpt_lib.sigterm_stops_the_start():
    with pytest.raises(ckpt_lib.Terminated):
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(1)
    watcher = ckpt_lib.PreemptionWatcher()  # the step loop
    watcher.close()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a second one ends the process, as usual
  assert signal.getsignal(signal.SIGTERM) is before


def test_second_ctrl_c_aborts_and_sigterm_after_ctrl_c_is_a_preemption(tmp_path):
  watcher = ckpt_lib.PreemptionWatcher()
  try:
    assert not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGINT)  # handled in this (main) thread before the next line runs
    assert watcher.should_stop(2)
    ck = ckpt_lib.Checkpointer(tmp_path, async_save=False, owner=True)
    ck.save(2, {"params": {"w": jnp.ones(2)}}, {}, force=True)
    with pytest.raises(ckpt_lib.RunInterrupted, match=f"^saved step 2 to {re.escape(str(tmp_path))}; rerun the same"):
      ck.close()
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  finally:
    watcher.close()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

  watcher = ckpt_lib.PreemptionWatcher()  # `fmjax sweep` passes SIGTERM on to runs a Ctrl-C stops
  try:
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)
    assert watcher.should_stop(3)
    ck = ckpt_lib.Checkpointer(tmp_path / "b", async_save=False, owner=True)
    ck.save(3, {"params": {"w": jnp.ones(2)}}, {}, force=True)
    ck.close()  # preempted (exit 143), not interrupted
  finally:
    watcher.close()


# ----------------------------------------------------------------------------- subprocesses


def _worker_env(devices: int) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
             FMJAX_TEST_DEVICES=str(devices), PYTHONUNBUFFERED="1")
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two(mode: str, directory, timeout: float = 90.0, on_ready=None) -> list[str]:
  """Runs `mode` in 2 processes (4 CPU devices each) on 127.0.0.1; returns their outputs."""
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, __file__, mode, str(directory), str(port), str(i)],
                            env=_worker_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  deadline = time.time() + timeout
  try:
    if on_ready is not None:
      on_ready(procs)
    outs = [p.communicate(timeout=max(1.0, deadline - time.time()))[0] for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    outs = [p.communicate()[0] for p in procs]
    raise AssertionError(f"{mode!r} did not finish in {timeout:.0f}s:\n" + "\n---\n".join(o[-2000:] for o in outs))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} of {mode!r} exited {p.returncode}:\n{out[-3000:]}"
  return outs


def _wait_for_line(proc, prefix: str, timeout: float = 60.0) -> str:
  deadline = time.time() + timeout
  lines = []
  while time.time() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    lines.append(line)
    if line.startswith(prefix):
      return line
  raise AssertionError(f"no {prefix!r} line from the worker:\n{''.join(lines)[-3000:]}")


def _signalled_worker(mode: str, directory, signum) -> tuple[int, str, int]:
  """(exit code, output, step it had reached) of a worker loop sent `signum` once it is stepping."""
  proc = subprocess.Popen([sys.executable, __file__, mode, str(directory)], env=_worker_env(1),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    ready = _wait_for_line(proc, "step ")
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode, out, int(ready.split()[1])


def test_sigterm_saves_at_next_step_and_exits_zero(tmp_path):
  code, out, reached = _signalled_worker("preempt_loop", tmp_path, signal.SIGTERM)
  assert code == 0, out[-3000:]
  saved = int(re.search(r"^saved (\d+)$", out, re.M).group(1))
  assert saved >= reached  # stopped at a step boundary after the signal, not before
  ck = ckpt_lib.Checkpointer(tmp_path)
  assert ck.latest_step() == saved
  x = ck.restore(saved, {"params": {"x": jax.ShapeDtypeStruct((4,), jnp.float32)}}, items=("params",))
  assert x["params"]["x"].tolist() == [float(saved)] * 4
  assert ck.restore_meta(saved)["reason"] == "preempted"
  ck.close()


def test_ctrl_c_saves_at_next_step_and_exits_130_with_how_to_resume(tmp_path):
  # The worker runs its loop as `fmjax train` does (watcher, save at the stop step, close) under cli.main.
  code, out, reached = _signalled_worker("interrupt_cli", tmp_path, signal.SIGINT)
  assert code == 130, out[-3000:]
  ck = ckpt_lib.Checkpointer(tmp_path)
  saved = ck.latest_step()
  assert saved is not None and saved >= reached, out[-3000:]  # at a step boundary after Ctrl-C
  assert f"interrupted: saved step {saved} to {tmp_path}; rerun the same command to resume from there" in out
  assert "press Ctrl-C again to abort at once" in out and "Traceback" not in out
  x = ck.restore(saved, {"params": {"x": jax.ShapeDtypeStruct((4,), jnp.float32)}}, items=("params",))
  assert x["params"]["x"].tolist() == [float(saved)] * 4
  ck.close()


def _two_process_values():
  """The global values both sides agree on (numpy; placed by whichever mesh restores them)."""
  params = {"embed": np.arange(64 * 16, dtype=np.float32).reshape(64, 16) / 7,
            "mlp": {"kernel": np.linspace(-1, 1, 16 * 32, dtype=np.float32).reshape(16, 32)},
            "norm": np.full((16,), 0.5, jnp.bfloat16)}
  moments = jax.tree.map(lambda x: (x * 3).astype(x.dtype), params)
  opt = (optax.ScaleByAdamState(count=np.int32(7), mu=params, nu=moments), optax.EmptyState())
  return {"params": params, "opt_state": opt}


def _place(values, mesh):
  """Shards every leaf with a leading dim divisible by the mesh's first axis along that axis."""
  axis = mesh.axis_names[0]

  def sharding(x):
    spec = P(axis) if x.ndim and x.shape[0] % mesh.shape[axis] == 0 else P()
    return NamedSharding(mesh, spec)

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding(x)), values)
  arrays = jax.tree.map(lambda x, a: jax.make_array_from_callback(x.shape, a.sharding, lambda i: x[i]),
                        values, abstract)
  return arrays, abstract


def _check_local(restored, values):
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(values)):
    assert got.dtype == want.dtype
    for shard in got.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])


def test_two_processes_save_one_restores_and_back(tmp_path):
  # 2 processes x 4 devices save one sharded state; this process (8 devices) reads it back.
  outs = _run_two("save2", tmp_path / "from2")
  assert all("timed decision False False" in out for out in outs), outs[1][-2000:]
  values = _two_process_values()
  mesh = make_mesh((2, 4), ("fsdp", "tensor"))
  ck = ckpt_lib.Checkpointer(tmp_path / "from2")
  assert ck.latest_step() == 7 and ck.restore_meta(7)["processes"] == 2
  restored = ck.restore(7, _place(values, mesh)[1])
  _check_local(restored, values)
  assert restored["params"]["embed"].sharding.spec == P("fsdp")

  # ...and the reverse: saved here on 8 devices, restored by 2 processes on a (4, 2) mesh.
  arrays, _ = _place(values, make_mesh((8,), ("data",)))
  ck = ckpt_lib.Checkpointer(tmp_path / "from1")
  ck.save(9, arrays, {"processes": 1}, force=True)
  ck.close()
  outs = _run_two("restore2", tmp_path / "from1")
  assert all("restored 9 ok" in out for out in outs), outs[0][-2000:]


def test_two_process_preemption_agrees_on_step(tmp_path):
  def sigterm_one_host(procs):
    _wait_for_line(procs[1], "step ")
    procs[1].send_signal(signal.SIGTERM)  # only host 1 is told; host 0 learns it through JAX

  outs = _run_two("preempt2", tmp_path, on_ready=sigterm_one_host)
  steps = [int(re.search(r"^saved (\d+)$", out, re.M).group(1)) for out in outs]
  assert steps[0] == steps[1]
  ck = ckpt_lib.Checkpointer(tmp_path)
  assert ck.latest_step() == steps[0]
  ck.close()


def test_two_processes_without_jaxs_preemption_service_stop_together(tmp_path):
  """With JAX's preemption service off, the hosts share a SIGTERM by an all-gather, every
  TIME_CHECK_STEPS steps (each step it would keep the host from dispatching ahead)."""
  def sigterm_one_host(procs):
    _wait_for_line(procs[1], "step ")
    procs[1].send_signal(signal.SIGTERM)

  outs = _run_two("preempt2_gather", tmp_path, on_ready=sigterm_one_host)
  steps = [int(re.search(r"^saved (\d+)$", out, re.M).group(1)) for out in outs]
  assert steps[0] == steps[1] and steps[0] % ckpt_lib.TIME_CHECK_STEPS == 0, steps


def test_two_processes_agree_on_which_stop_saves_go(tmp_path):
  # Process 0 deletes what the preservation policy drops, but every process drops the same steps from
  # its own Orbax listing: if the hosts decided apart, a host's listing would hold steps gone from disk.
  both = lambda steps: {"disk": steps, "orbax": steps}
  first = [_reported(out) for out in _run_two("stops2", tmp_path)]
  assert first[0] == first[1], first  # the same on both hosts
  assert first[0] == {"saved": [10, 20, 30, 32], "after": both([20, 30, 32])}
  rerun = [_reported(out) for out in _run_two("stops2_rerun", tmp_path)]  # a restart, on both hosts
  assert rerun[0] == rerun[1], rerun
  assert rerun[0] == {"resumed": 32, "after_stop": both([20, 30, 33]),  # 32 went, the periodic ones stayed
                      "resumed_again": 33, "after_periodic": both([30, 40])}  # keep=2 counts 30 and 40 only
  assert ckpt_lib.saved_steps(str(tmp_path)) == [30, 40]


def test_two_processes_read_the_same_newest_step_of_a_run_still_saving(tmp_path):
  """init_from a run still training: a save that lands between the hosts' listings must not have
  each host read its shards of another step (host 1 took step 3 while host 0 took 2)."""
  ck = ckpt_lib.Checkpointer(tmp_path, async_save=False, owner=True)
  for step in (1, 2):
    ck.save(step, {"params": {"w": jnp.ones(2)}}, {}, force=True)
  ck.close()
  outs = _run_two("source2", tmp_path)
  assert [re.search(r"^source (\d+)$", out, re.M).group(1) for out in outs] == ["2", "2"], outs


def _reported(out: str) -> dict:
  """What a worker saw: its `seen {...}` lines, each a JSON object, merged."""
  seen = {}
  for line in re.findall(r"^seen (.*)$", out, re.M):
    seen.update(json.loads(line))
  assert seen, out[-3000:]
  return seen


# ----------------------------------------------------------------------------- worker side


def _worker_main(mode: str, directory: str, port: str | None = None, process_id: str | None = None):
  jax.config.update("jax_num_cpu_devices", int(os.environ["FMJAX_TEST_DEVICES"]))
  if mode == "preempt2_gather":
    jax.config.update("jax_enable_preemption_service", False)
  if port is not None:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=int(process_id), initialization_timeout=60)
  if mode in ("preempt_loop", "preempt2", "preempt2_gather"):
    watcher = ckpt_lib.PreemptionWatcher()
    ck = ckpt_lib.Checkpointer(directory)
    x = jnp.zeros(4)
    for step in range(1, 100_000):
      x = x + 1  # the "train step"
      if step == 3:
        print(f"step {step}", flush=True)
      if watcher.should_stop(step):
        # A global array (replicated over all hosts' devices), as Orbax needs across processes.
        x = jax.make_array_from_callback(x.shape, NamedSharding(make_mesh((jax.device_count(),), ("data",)), P()),
                                         lambda i, v=np.asarray(x): v[i])
        ck.save(step, {"params": {"x": x}}, {"reason": "preempted"}, force=True)
        ck.close()
        print(f"saved {step}", flush=True)
        return
      time.sleep(0.01)
    raise SystemExit("never preempted")
  if mode == "interrupt_cli":
    from fmjax import cli

    def toy_train(argv):
      watcher, ck = ckpt_lib.PreemptionWatcher(), ckpt_lib.Checkpointer(directory, owner=True)
      try:
        x = jnp.zeros(4)
        for step in range(1, 100_000):
          x = x + 1
          if step == 3:
            print(f"step {step}", flush=True)
          if watcher.should_stop(step):
            ck.save(step, {"params": {"x": x}}, {}, force=True)
            return 0
          time.sleep(0.01)
      finally:
        watcher.close()
        ck.close()

    cli.COMMANDS["toy_train"] = (toy_train, "")
    sys.exit(cli.main(["toy_train"]))
  if mode in ("stops2", "stops2_rerun"):
    sharding = NamedSharding(make_mesh((jax.device_count(),), ("data",)), P("data"))
    value = lambda step: np.arange(8, dtype=np.float32) + step
    state = lambda step: {"params": {"w": jax.make_array_from_callback((8,), sharding, lambda i: value(step)[i])}}
    checkpointer = lambda: ckpt_lib.Checkpointer(directory, every_steps=10, keep=2, owner=True)

    def steps(ck):
      ck.wait()
      return {"disk": ck.all_steps(), "orbax": sorted(ck._manager.all_steps())}  # Orbax's listing in this process

    def restored(ck, step):
      w = ck.restore(step, {"params": {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharding)}},
                     items=("params",))["params"]["w"]
      for shard in w.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), value(step)[shard.index])
      return step

    ck = checkpointer()
    if mode == "stops2":
      saved = [s for s in (10, 15, 20, 30, 32) if ck.save(s, state(s), {}, at_stop=s == 32)]
      print("seen " + json.dumps({"saved": saved, "after": steps(ck)}), flush=True)
    else:
      seen = {"resumed": restored(ck, ck.latest_step())}
      ck.save(33, state(33), {}, at_stop=True)  # stopped again right after resuming
      seen["after_stop"] = steps(ck)
      ck.close()
      ck = checkpointer()
      seen["resumed_again"] = restored(ck, ck.latest_step())
      ck.save(40, state(40), {})
      seen["after_periodic"] = steps(ck)
      restored(ck, 40)
      print("seen " + json.dumps(seen), flush=True)
    ck.close()
    return
  if mode == "source2":
    ck = ckpt_lib.Checkpointer(directory)
    if jax.process_index() == 1:
      ck.all_steps = lambda: [1, 2, 3]  # the source's save of step 3 landed after host 0 listed it
    print(f"source {ck.source_step(0, directory)}", flush=True)
    ck.close()
    return
  values = _two_process_values()
  if mode == "save2":
    arrays, _ = _place(values, make_mesh((8,), ("data",)))
    ck = ckpt_lib.Checkpointer(directory)
    ck.save(7, arrays, {"processes": jax.process_count()}, force=True)
    ck.close()
    # Host clocks differ; process 0 decides time-based saves for everyone.
    timed = ckpt_lib.Checkpointer(directory + "_timed", every_minutes=1.0)
    if jax.process_index() == 1:
      ckpt_lib._now = lambda: time.monotonic() + 3600.0
    # Asked at a multiple of TIME_CHECK_STEPS only (a broadcast waits for the step before it).
    print(f"timed decision {timed.should_save(1)} {timed.should_save(ckpt_lib.TIME_CHECK_STEPS)}", flush=True)
    timed.close()
  elif mode == "restore2":
    ck = ckpt_lib.Checkpointer(directory)
    step = ck.latest_step()
    restored = ck.restore(step, _place(values, make_mesh((4, 2), ("fsdp", "tensor")))[1])
    _check_local(restored, values)
    assert restored["params"]["embed"].sharding.spec == P("fsdp")
    ck.close()
    print(f"restored {step} ok", flush=True)


if __name__ == "__main__":
  _worker_main(*sys.argv[1:])


CONFIGS = ["configs/gpt.py:tiny", "configs/bert.py:tiny", "configs/finetune_cls.py", "configs/sft.py", "configs/dpo.py"]


def test_every_key_added_since_the_first_runs_says_what_those_runs_did():
  """A run saved before a config key existed resumes: the key counts as the value that does what
  the run did then (checkpoint._BEFORE_THE_KEY), not as a change to its model or data."""
  from fmjax import config_lib
  first = set(json.load(open(os.path.join(REPO, "tests", "golden", "first_runs_breaking_keys.json"))))
  for spec in CONFIGS:
    config = config_lib.load_config(os.path.join(REPO, spec), [])
    flat = config_lib.flatten(config)
    new = sorted(k for k in flat if ckpt_lib._is_breaking(k) and k not in first | set(ckpt_lib._BEFORE_THE_KEY))
    assert not new, (f"{spec}: config keys {new} are new and would stop every older run from resuming: add each to "
                     "checkpoint._BEFORE_THE_KEY with the value that does what runs saved before it did")
  # A pretraining run saved before all of them, with today's defaults, resumes without a word.
  for spec in CONFIGS[:2]:
    config = config_lib.load_config(os.path.join(REPO, spec), []).to_dict()
    old = json.loads(json.dumps(config))
    for key in ckpt_lib._BEFORE_THE_KEY:
      *parents, leaf = key.split(".")
      node = old
      for p in parents:
        node = node.get(p, {})
      node.pop(leaf, None)
    for key in ("data.bucket_reads", "data.prepare_workers"):  # harmless: where and how fast
      old["data"].pop(key.split(".")[1])
    assert ckpt_lib.config_changes(old, config)[0] == [], spec
  # A fine-tuning run from before attention dropout trained without it: today's 0.1 is a change.
  tuned = config_lib.load_config(os.path.join(REPO, "configs", "finetune_cls.py"), []).to_dict()
  before = json.loads(json.dumps(tuned))
  before["model"].pop("attention_dropout")
  assert ckpt_lib.config_changes(before, tuned)[0] == ["model.attention_dropout: 0.0 -> 0.1"]
