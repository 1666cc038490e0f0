"""The programs a TPU runs besides the train step: `fmjax eval`, zero-shot, fill-mask and a classifier's eval.

On several TPU devices splash attention compiles only per shard (inside `shard_map`, under the run's mesh and axis
rules, as the train step runs it): XLA cannot partition its Mosaic kernel. CPU runs splash in Pallas interpret mode,
which XLA can partition, so these tests watch where the kernel is traced. With libtpu installed, the programs are
also compiled for a TPU topology, as `fmjax plan` compiles the train step.
"""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from fmjax import attention, checkpoint as ckpt_lib, config_lib, data, evaluate, finetune, generate, models, optim
from fmjax import plan, sharding, tasks, train, zeroshot

SPLASH = ["model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.d_ff=64", "model.vocab_size=512",
          "model.max_len=128", "data.seq_len=128", "model.attention=splash", "train.batch_size=8",
          "data.max_predictions=20", "data.tokenizer.vocab_size=512", "train.progress_bar=false"]
WORDS = ("red", "green", "blue", "cat", "dog", "fish", "runs", "sleeps", "the", "a")


@pytest.fixture
def per_shard(monkeypatch):
  """Whether each trace of the splash kernel ran inside a shard_map over the whole mesh."""
  traced = []
  local = attention._splash_local

  def spy(*args, **kwargs):
    mesh = jax.sharding.get_abstract_mesh()
    traced.append(mesh.size == len(jax.devices()) and all(t == AxisType.Manual for t in mesh.axis_types))
    return local(*args, **kwargs)

  monkeypatch.setattr(attention, "_splash_local", spy)
  return traced


def _save_run(workdir, config, params):
  """A run's workdir without training: its config.json and a params checkpoint."""
  os.makedirs(workdir, exist_ok=True)
  config_lib.save_json(config, os.path.join(workdir, "config.json"))
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  checkpointer.save(0, {"params": params}, {"step": 0, "config": config_lib.to_dict(config)}, force=True)
  checkpointer.close()
  return workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """GPT and BERT workdirs that run splash at 128 tokens, over a few of CPython's documentation topics."""
  import pydoc_data.topics
  root = tmp_path_factory.mktemp("splash_runs")
  (root / "corpus").mkdir()
  for name in sorted(pydoc_data.topics.topics)[:24]:
    (root / "corpus" / f"{name}.txt").write_text(pydoc_data.topics.topics[name])
  out = {}
  for family in ("gpt", "bert"):
    config = config_lib.load_config(f"configs/{family}.py:tiny", SPLASH + [
        "data.dataset=text_files", f"data.files={root / 'corpus'}/*.txt", f"data.cache_dir={root / 'cache'}"])
    data.get_tokenizer(config)
    params = train.params_of(models.build_model(config.model, rngs=nnx.Rngs(params=0)))
    out[family] = _save_run(str(root / family), config, params)
  return out


def test_fmjax_eval_runs_splash_per_shard(runs, per_shard):
  assert evaluate.run(runs["gpt"], batches=1)["batches"] == 1
  assert per_shard and all(per_shard)  # before: no axis rules, so the kernel was left to the partitioner


def test_zero_shot_runs_splash_per_shard(runs, per_shard, tmp_path):
  items = tmp_path / "items.jsonl"  # contexts longer than the rows: every row is 128 tokens
  items.write_text("".join(json.dumps({"context": "the cat sat on the mat " * 60, "choices": [" mat", " roof"],
                                       "label": i % 2}) + "\n" for i in range(3)))
  assert zeroshot.run(runs["gpt"], f"jsonl:{items}")["items"] == 3
  assert per_shard and all(per_shard)  # before: no mesh in context at all


def test_fill_mask_of_128_tokens_runs_splash_per_shard(runs, per_shard):
  _, config, tok = generate.load_run(runs["bert"])
  length = lambda k: 3 + len(tok.encode(" ".join(["the"] * k)))  # with [CLS], [MASK] and [SEP]
  k = next(k for k in range(1, config.data.seq_len) if length(k) >= config.data.seq_len)
  assert length(k) == config.data.seq_len
  assert len(generate.run(runs["bert"], text=" ".join(["the"] * k) + " [MASK]")) == 1
  assert per_shard and all(per_shard)  # before: no mesh in context at all


def test_a_classifiers_eval_runs_splash_per_shard(tmp_path, per_shard):
  (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
  rng = np.random.default_rng(0)
  (tmp_path / "task.jsonl").write_text("".join(
      json.dumps({"text": " ".join(rng.choice(WORDS, 6)), "label": ["yes", "no"][i % 2]}) + "\n" for i in range(40)))
  config = config_lib.load_config("configs/finetune_cls.py:task=jsonl", SPLASH + [
      f"task.files={tmp_path / 'task.jsonl'}", "task.text_columns=text", "data.tokenizer.kind=hf",
      f"data.tokenizer.path={tmp_path / 'vocab.txt'}", f"data.cache_dir={tmp_path / 'cache'}",
      "model.attention_dropout=0"])
  task = tasks.load_task(config)
  workdir = _save_run(str(tmp_path / "ft"), config, train.params_of(finetune.model_factory(config, task.num_outputs)()))
  assert finetune.evaluate(workdir)["examples"] == len(task.splits["validation"])
  assert per_shard and all(per_shard)  # before: the classifier was called eagerly, outside any mesh


# ----------------------------------------------------------------------------- compiled for a TPU


def _compile(fn, *args, mesh, rules, splash=True):
  with attention.compiling_for("tpu"), jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    lowered = fn.lower(*args)
    assert ("tpu_custom_call" in lowered.as_text()) == splash  # splash as its Mosaic kernel
    return lowered.compile()


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_eval_zero_shot_and_sampling_compile_for_a_tpu_topology():
  """After the train step, in one process (the splash kernel is made per trace): the eval step at the same
  length, zero-shot rows at another, and sampling with a KV cache, for 4 v5p chips with the state over fsdp."""
  config = config_lib.load_config("configs/gpt.py:tiny", ["mesh.data=1", "mesh.fsdp=4", "model.d_model=64",
                                                          "model.d_ff=128", "train.batch_size=8"])
  devices, _ = plan.tpu_devices("v5p:2x2x1")
  assert plan.compile_step(config, devices).memory_analysis().temp_size_in_bytes > 0
  mesh = sharding.make_mesh(config, devices)
  tx = optim.make_optimizer(config)
  spec = train.state_spec(config, mesh, tx)
  batch_sharding = sharding.batch_sharding(mesh)
  _, eval_step = train.compile_steps(config, spec, tx, batch_sharding)
  rows = lambda T, dtype=jnp.int32, s=batch_sharding: jax.ShapeDtypeStruct((8, T), dtype, sharding=s)
  batch = {k: rows(128, jnp.float32 if k == "loss_weights" else jnp.int32)
           for k in ("inputs", "targets", "loss_weights", "segment_ids", "positions")}
  _compile(eval_step, spec.abstract["params"], batch, mesh=mesh, rules=spec.rules)
  _compile(zeroshot._row_logliks, spec.graphdef, spec.abstract["params"], rows(256), rows(256),
           rows(256, jnp.float32), rows(256), mesh=mesh, rules=spec.rules)

  def sample(params, prompts_BP, key):  # the KV cache takes the xla kernel
    return generate._generate_cached(nnx.merge(spec.graphdef, params), prompts_BP, jnp.ones_like(prompts_BP),
                                     jnp.cumsum(jnp.ones_like(prompts_BP), axis=1) - 1, key, max_new_tokens=8,
                                     temperature=1.0, top_k=40, top_p=0.9, stop_ids=(0,), vocab_size=None)

  key = jax.eval_shape(lambda: jax.random.key(0))
  replicated = sharding.replicated(mesh)
  _compile(jax.jit(sample), spec.abstract["params"], rows(128, s=replicated),
           jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated), mesh=mesh, rules=spec.rules, splash=False)
