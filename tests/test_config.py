"""Configs: sizes, locking with "did you mean", up-front validation, CLI errors."""

import errno
import json
import os
import re
import subprocess
import sys

import pytest

from fmjax import cli, config_lib, models, sharding
from fmjax.config_lib import ConfigError


def test_sizes_and_runlocal():
  c = config_lib.load_config("configs/gpt.py:small")
  assert (c.model.num_layers, c.model.d_model, c.model.num_heads) == (12, 768, 12)
  c = config_lib.load_config("configs/gpt.py:xl,runlocal")
  assert c.model.d_model == 1600 and c.train.batch_size == 8 and c.model.dtype == "float32"
  assert c.model.scan_layers and c.model.remat == "dots_no_batch"  # the measured GPU setting (benchmarks/README.md)
  c = config_lib.load_config("configs/bert.py:base")
  assert (c.model.num_layers, c.model.d_model, c.train.objective) == (12, 768, "mlm")
  assert config_lib.load_config("configs/gpt.py:size=small").model.d_model == 768  # as finetune_cls.py's size=
  for arg, error in [("tiny,small", r"names 2 sizes \['tiny', 'small'\]"), ("size=smal", "did you mean 'small'"),
                     ("foo=1", r"unknown gpt config arg\(s\) \['foo=1'\]")]:
    with pytest.raises(ConfigError, match=error):  # once taken silently as tiny
      config_lib.load_config(f"configs/gpt.py:{arg}")


def test_override_types():
  c = config_lib.load_config("configs/gpt.py:tiny", ["train.steps=7", "optim.lr=1e-3",
                                                    "model.scan_layers=true", "data.dataset=lm1b"])
  assert c.train.steps == 7 and isinstance(c.train.steps, int)
  assert c.optim.lr == 1e-3 and c.model.scan_layers is True and c.data.dataset == "lm1b"


def test_misspelt_key_suggests():
  with pytest.raises(ConfigError, match=r"did you mean 'learning_rate'|did you mean 'lr'"):
    config_lib.load_config("configs/gpt.py:tiny", ["optim.lrr=1"])
  with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
    config_lib.load_config("configs/gpt.py:tiny", ["train.batch_sise=4"])


def test_bad_values_fail_before_compile():
  with pytest.raises(ConfigError, match="does not divide by the data-parallel size 8"):
    config_lib.validate(config_lib.load_config("configs/gpt.py:tiny", ["train.batch_size=12"]), 8)
  # 16 is a multiple of 8; its micro-batches of 2 are not: the line says which to change.
  with pytest.raises(ConfigError, match=r"per micro-batch 2\) does not divide .*; make train.batch_size / "
                     r"train.grad_accum=8 a multiple of 8 \(lower grad_accum or raise the batch\)"):
    config_lib.validate(config_lib.load_config("configs/gpt.py:tiny", ["train.batch_size=16", "train.grad_accum=8"]),
                        8)
  with pytest.raises(ConfigError, match="num_heads=3 does not divide model.d_model=128"):
    config_lib.load_config("configs/gpt.py:tiny", ["model.num_heads=3"])
  with pytest.raises(ConfigError, match="needs 16 devices but 8 are available"):
    config_lib.validate(config_lib.load_config("configs/gpt.py:tiny", ["mesh.data=4", "mesh.fsdp=4"]), 8)
  with pytest.raises(ConfigError, match="longer than the model allows"):
    config_lib.load_config("configs/gpt.py:tiny", ["data.seq_len=4096"])
  with pytest.raises(ConfigError, match="model.attention='flash' is not one of"):
    config_lib.load_config("configs/gpt.py:tiny", ["model.attention=flash"])
  with pytest.raises(ConfigError, match="expected an integer"):
    config_lib.load_config("configs/gpt.py:tiny", ["train.steps=ten"])
  with pytest.raises(ConfigError, match="train.log_every=0 must be at least 1"):
    config_lib.load_config("configs/gpt.py:tiny", ["train.log_every=0"])
  # With fewer devices than the mesh needs, that is the error, not the batch against the mesh.
  config = config_lib.load_config("configs/gpt.py:tiny", ["mesh.data=3"])
  with pytest.raises(ConfigError, match="needs 3 devices but 8 are available"):
    config_lib.validate(config, 8)
  with pytest.raises(ConfigError, match=r"logical_axis_rules=\('foo',\) must be \(logical axis, mesh axes\) pairs"):
    config_lib.load_config("configs/gpt.py:tiny", ["logical_axis_rules=foo"])
  with pytest.raises(ConfigError, match="maps 'mlp' to 'model', which is not a mesh axis"):
    config_lib.load_config("configs/gpt.py:tiny", ["logical_axis_rules=((\"mlp\", \"model\"),)"])
  with pytest.raises(ConfigError, match="train.profile_steps=-1 and train.profile_start=5 must be non-negative"):
    config_lib.load_config("configs/gpt.py:tiny", ["train.profile_steps=-1"])
  with pytest.raises(ConfigError, match="profile_start=100 is not before train.steps=50, so nothing would be traced"):
    config_lib.load_config("configs/gpt.py:tiny", ["train.steps=50", "train.profile_steps=3", "train.profile_start=100"])


def test_logical_axis_rules_name_every_logical_axis():
  """The override replaces the whole list: a name it leaves out was a traceback at init (a parameter's)
  or a silently replicated activation (batch), and a misspelt one a rule nothing reads."""
  rules = [list(r) for r in config_lib.DEFAULT_RULES]
  with pytest.raises(ConfigError, match="no rule for length, vocab, mlp, heads, kv, layers, norm: it replaces"):
    config_lib.load_config("configs/gpt.py:tiny", ["logical_axis_rules=(('batch', 'data'), ('embed', 'fsdp'))"])
  typo = [["embd", "fsdp"] if name == "embed" else [name, axes] for name, axes in rules]
  with pytest.raises(ConfigError, match="names 'embd', which no model uses .*did you mean 'embed'"):
    config_lib.load_config("configs/gpt.py:tiny", [f"logical_axis_rules={typo}"])
  tensor_vocab = [[name, "tensor" if name == "vocab" else axes] for name, axes in rules]
  config = config_lib.load_config("configs/gpt.py:tiny", [f"logical_axis_rules={tensor_vocab}"])  # a whole list
  assert dict(sharding.logical_rules(config))["vocab"] == "tensor"
  # A list written before grouped-query attention has no kv_heads: fine for a model whose every head has its own
  # keys and values (num_kv_heads 0 or num_heads), refused for one whose key/value heads would read it.
  before_gqa = [r for r in tensor_vocab if r[0] != "kv_heads"]
  for kv_heads in (0, 4):
    config_lib.load_config("configs/gpt.py:tiny", [f"logical_axis_rules={before_gqa}",
                                                   f"model.num_kv_heads={kv_heads}"])
  with pytest.raises(ConfigError, match="^logical_axis_rules has no rule for kv_heads: it replaces the whole list"):
    config_lib.load_config("configs/gpt.py:tiny,llama", [f"logical_axis_rules={before_gqa}", "model.num_kv_heads=2"])


def test_a_minus_one_mesh_axis_takes_the_devices_left():
  config = config_lib.load_config("configs/gpt.py:tiny", ["mesh.data=-1", "mesh.fsdp=2", "mesh.tensor=2"])
  sizes = sharding.mesh_shape(config, 16)
  assert sizes == {"dcn_data": 1, "data": 4, "fsdp": 2, "tensor": 2}
  assert sharding.data_parallel_size(sizes) == 8  # data x fsdp; tensor-parallel devices share rows
  with pytest.raises(ConfigError, match=r"fixed axes \(4 devices\) do not divide the 6 available"):
    sharding.mesh_shape(config, 6)
  # The batch divides by data x fsdp (8 ways on 16 devices), not by data alone.
  with pytest.raises(ConfigError, match="does not divide by the data-parallel size 8"):
    config_lib.validate(config_lib.load_config("configs/gpt.py:tiny", [
        "mesh.data=-1", "mesh.fsdp=2", "mesh.tensor=2", "train.batch_size=12"]), 16)


@pytest.mark.parametrize("text,error", [
    ("def get_config(arg=None):\n  return base_config(\n", r"broken.py:2: SyntaxError while loading it"),
    ("def get_config(arg=None):\n  x = 1\n  return x / 0\n", r"broken.py:3: ZeroDivisionError while calling get_config"),
    ("def get_config(arg=None):\n  return 3\n", r"get_config must return a ConfigDict with a `model` section"),
    ("x = 1\n", r"has no get_config\(arg\) function"),
])
def test_a_broken_config_file_is_one_line(tmp_path, capsys, text, error):
  (tmp_path / "broken.py").write_text(text)
  code = cli.main(["train", f"--config={tmp_path}/broken.py", f"--workdir={tmp_path}/w"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and err.count("\n") == 0 and re.search(error, err), err
  assert not os.path.exists(tmp_path / "w")


def test_cli_workdir_and_override_mistakes_are_one_line(tmp_path, capsys):
  (tmp_path / "file").write_text("")
  for argv, error in [([f"--workdir={tmp_path}/file"], "must name a directory"),
                      (["--workdir="], "must name a directory"),
                      (["--config.model", f"--workdir={tmp_path}/w"], "--config.model needs a value")]:
    code = cli.main(["train", "--config=configs/gpt.py:tiny", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and error in err, err
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("spec,overrides,error", [
    ("gpt", ["train.objective=mlm"], "train.objective='mlm' does not train a gpt"),
    ("bert", ["train.objective=clm"], "train.objective='clm' does not train a bert"),
    ("gpt", ["optim.lr=-1"], "optim.lr=-1.0 must be a finite rate >= 0"),
    ("gpt", ["data.seed=-1"], r"data.seed=-1 must be in \[0, 2\*\*32\)"),
    ("gpt", ["train.steps=1e20"], "train.steps=100000000000000000000 is beyond the 2,147,483,647 steps"),
    ("bert", ["model.type_vocab_size=0"], "model.type_vocab_size=0 must be at least 1"),
    ("gpt", ["model.layer_norm_eps=-1"], r"model.layer_norm_eps must be in \(0, 1\)"),
    ("gpt", ["model.init_std=1e30"], r"model.init_std must be in \(0, 1\]"),
    ("gpt", ["checkpoint.every_minutes=nan"], "checkpoint.every_minutes=nan must be at least 0"),
    ("gpt", ["data.prefetch=-1"], "data.prefetch=-1 must be at least 0"),
    ("gpt", ["optim.lr=nan"], "optim.lr=nan must be a finite rate"),
    ("gpt", ["optim.b2=2"], r"optim.b2=2.0 must be in \[0, 1\)"),
    ("gpt", ["optim.schedule=wsd", "optim.decay_fraction=0"], r"optim.decay_fraction=0.0 must be in \(0, 1\]"),
    ("gpt", ["optim.eps=0"], r"optim.eps=0.0 must be finite and > 0 \(e.g. 1e-8\)"),
    ("gpt", ["optim.warmup_steps=-5"], "optim.warmup_steps=-5 must be at least 0"),
    ("gpt", ["model.init_std=-1"], r"model.init_std must be in \(0, 1\] \(GPT-2 and BERT use 0.02\), got -1.0"),
    ("gpt", ["model.attention_dropout=1.0"], r"model.attention_dropout must be in \[0, 1\), got 1.0"),
    ("bert", ["model.attention_dropout=0.1", "model.attention=splash"], "model.attention=splash has no "
     "attention-probability dropout; set model.attention=auto"),
    ("gpt", ["train.eval_batches=-1"], "train.eval_batches=-1 must be at least 0"),
    ("gpt", ["checkpoint.every_steps=-5"], r"checkpoint.every_steps=-5 must be at least 0 \(0 turns it off\)"),
    ("gpt", ["model.fused_loss_chunk=-5"], r"model.fused_loss_chunk=-5 must be at least 0 \(0: whole logits"),
    ("gpt", ["checkpoint.keep=-1"], r"checkpoint.keep=-1 must be at least 0 \(0 keeps every save\)"),
    ("bert", ["data.mask_rate=1.5"], r"data.mask_rate=1.5 must be in \(0, 1\)"),
    ("bert", ["data.max_predictions=0"], "data.max_predictions=0 at least 1"),
    ("bert", ["data.max_predictions=200"], "data.max_predictions=200 exceeds data.seq_len=128; lower it"),
    ("bert", ["data.seq_len=512", "model.max_len=512"], r"data.max_predictions=20 masks at most 3.9% of a row of "
     r"data.seq_len=512, not data.mask_rate=0.15; set data.max_predictions=77"),
    ("gpt", ["mesh.data=1", "mesh.fsdp=3"], "model.d_model=128 does not divide by mesh.fsdp=3"),
    ("gpt", ["mesh.data=1", "mesh.tensor=3"], "model.vocab_size=2048 does not divide by mesh.tensor=3"),
    # The decoder's architecture choices.
    ("gpt", ["model.norm=batchnorm"], r"model.norm='batchnorm' is not one of \['layernorm', 'rmsnorm'\]"),
    ("gpt", ["model.positions=alibi"], r"model.positions='alibi' is not one of \['learned', 'rope'\]"),
    ("gpt", ["model.mlp=relu"], r"model.mlp='relu' is not one of \['gelu', 'swiglu'\]"),
    ("gpt", ["model.num_kv_heads=3"], r"model.num_kv_heads=3 must divide model.num_heads=4 \(grouped-query"),
    ("gpt", ["model.num_kv_heads=-2"], r"model.num_kv_heads=-2 must divide model.num_heads=4"),
    ("gpt", ["model.positions=rope", "model.d_model=120", "model.num_heads=8"],
     "model.positions=rope rotates pairs of each head's 15 dimensions, which must be even"),
    ("gpt", ["model.rope_theta=0"], r"model.rope_theta=0.0 must be positive"),
    # Qwen's: biases on q, k and v where no other projection has one, a head width of its own, q/k norms.
    ("gpt", ["model.qkv_bias=true"], r"^model.qkv_bias=true puts biases on the q, k and v projections of a model with "
     r"no others \(model.use_bias=false, as Qwen2 has\), and model.use_bias=true has them in every projection already; "
     "drop model.qkv_bias or set model.use_bias=false$"),
    ("gpt", ["model.head_dim=-8"], r"^model.head_dim=-8 must be a whole number, at least 0 \(each attention head's "
     r"width; 0: model.d_model / model.num_heads\)$"),
    ("gpt", ["model.positions=rope", "model.head_dim=33"],
     r"^model.positions=rope rotates pairs of each head's 33 dimensions, which must be even; .* \(or "
     r"model.head_dim\)$"),
    ("gpt", ["model.num_heads=3"], "^model.num_heads=3 does not divide model.d_model=128; change one, or set "
     r"model.head_dim \(each head's width\)$"),
    ("bert", ["model.qk_norm=true", "model.head_dim=64"],
     "^model.head_dim=64, model.qk_norm=true is a decoder choice: BERT has learned positions"),
    ("bert", ["model.use_bias=false", "model.qkv_bias=true"], "^model.use_bias=false, model.qkv_bias=true is a decoder "
     "choice"),
    # Rotary scaling: a kind fmjax lacks, a factor that scales nothing or backwards, a parameter its kind ignores.
    ("gpt", ["model.positions=rope", "model.rope_scaling=yarn"],
     r"model.rope_scaling='yarn' is not one of \['none', 'linear', 'llama3'\]"),
    ("gpt", ["model.rope_scaling=linear", "model.rope_factor=4"],
     "^model.rope_scaling=linear scales rotary positions, and this model has model.positions=learned; set "
     "model.positions=rope or model.rope_scaling=none$"),
    ("gpt", ["model.positions=rope", "model.rope_scaling=linear", "model.rope_factor=0"],
     r"^model.rope_factor=0.0 must be positive \(how many times longer"),
    ("gpt", ["model.positions=rope", "model.rope_scaling=llama3"],
     "^model.rope_scaling=llama3 with model.rope_factor=1.0 scales nothing; set model.rope_factor"),
    ("gpt", ["model.positions=rope", "model.rope_factor=8"],
     "^model.rope_factor=8.0 is not read under model.rope_scaling=none .*; set model.rope_scaling, or drop it$"),
    ("gpt", ["model.positions=rope", "model.rope_scaling=linear", "model.rope_factor=8",
             "model.rope_original_max_len=4096"], "^model.rope_original_max_len=4096 is not read under "
     "model.rope_scaling=linear"),
    ("gpt", ["model.positions=rope", "model.rope_scaling=llama3", "model.rope_factor=8", "model.rope_low_freq_factor=4",
             "model.rope_high_freq_factor=1"], r"^model.rope_low_freq_factor=4.0 and model.rope_high_freq_factor=1.0 "
     "must be positive with low below high"),
    ("gpt", ["model.positions=rope", "model.rope_scaling=llama3", "model.rope_factor=8",
             "model.rope_original_max_len=0"], "^model.rope_original_max_len=0 must be a positive whole number"),
    ("bert", ["model.rope_scaling=llama3", "model.rope_factor=8"],
     "^model.rope_scaling=llama3, model.rope_factor=8.0 is a decoder choice: BERT has learned positions"),
    ("bert", ["model.positions=rope"], "model.positions=rope is a decoder choice: BERT has learned positions"),
    ("bert", ["model.num_kv_heads=2", "model.tie_embeddings=false"],
     "model.num_kv_heads=2, model.tie_embeddings=false is a decoder choice"),
    # 3 key/value heads for 6 query heads: the query heads split over mesh.tensor=2, the key/value heads cannot.
    ("gpt", ["model.d_model=96", "model.num_heads=6", "model.num_kv_heads=3", "mesh.data=4", "mesh.tensor=2"],
     r"^model.num_kv_heads=3 does not divide by mesh.tensor=2 \(logical axis 'kv_heads' is sharded over it\)"),
    # DPO: its settings, and micro-batches of whole row pairs (a chosen row, a rejected row).
    ("dpo", ["dpo.beta=0"], r"^dpo.beta=0.0 must be positive and finite"),
    ("dpo", ["dpo.label_smoothing=0.5"], r"^dpo.label_smoothing=0.5 must be in \[0, 0.5\)"),
    ("dpo", ["dpo.eval_percent=100"], r"^dpo.eval_percent=100 must be in \[0, 100\)"),
    ("dpo", ["train.batch_size=16", "train.grad_accum=16"],
     r"^train.batch_size=16 must be a multiple of 2 x train.grad_accum=16: DPO rows come in pairs"),
    ("dpo", ["finetune.peft=head"], r"^finetune.peft='head' trains a classifier's new head alone, and DPO has none "
     r".*; for DPO set finetune.peft= one of none, lora, adapter, bitfit$"),
])
def test_values_that_would_train_wrongly_are_refused(spec, overrides, error):
  """Each of these once ran to the end (or failed deep in a compile): a bidirectional model on
  next-token prediction, no masked positions, a negative rate, a mesh that cannot split the model."""
  with pytest.raises(ConfigError, match=error):
    config_lib.validate(config_lib.load_config(f"configs/{spec}.py:tiny", overrides), 8)


def test_qwen_architectures_validate_and_bitfit_finds_their_q_k_v_biases():
  """Qwen2's (Llama's with biases on q, k and v alone) and Qwen3's (with q/k norms, heads wider than d_model /
  num_heads, which then need not divide d_model) are valid decoders; BitFit trains Qwen2's biases."""
  qwen2 = ["model.qkv_bias=true", "model.rope_theta=1000000"]
  qwen3 = ["model.qk_norm=true", "model.d_model=96", "model.num_heads=5", "model.head_dim=32"]
  for extra in (qwen2, qwen3):
    config_lib.validate(config_lib.load_config("configs/gpt.py:tiny,llama", extra), 8)
  assert models.head_dim(config_lib.load_config("configs/gpt.py:tiny,llama", qwen3).model) == 32
  config_lib.load_config("configs/sft.py", ["model.use_bias=false", "model.qkv_bias=true", "finetune.peft=bitfit"])
  with pytest.raises(ConfigError, match=r"^finetune.peft=bitfit trains the biases alone, and this model has none"):
    config_lib.load_config("configs/sft.py", ["model.use_bias=false", "model.qk_norm=true", "finetune.peft=bitfit"])


def test_cli_one_line_error():
  proc = subprocess.run([sys.executable, "-m", "fmjax.cli", "train", "--config=configs/gpt.py:tiny",
                         "--config.optim.lrr=1", "--workdir=/tmp/never_created_fmjax"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "did you mean" in lines[0], proc.stderr


def test_demo_flag_mistake_is_one_line_naming_the_demo_command():
  # `fmjax` has no demo command: the line names `python -m fmjax.demo`, which `make demo` runs.
  proc = subprocess.run([sys.executable, "-m", "fmjax.demo", "--stepz=3"], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
  assert lines == ["error: python -m fmjax.demo: unrecognized arguments: --stepz=3 "
                   "(see python -m fmjax.demo --help)"], proc.stderr


def test_cli_out_of_memory_is_one_line():
  # A real XLA allocation failure on this CPU: a 512 GiB MLP weight.
  proc = subprocess.run([sys.executable, "-m", "fmjax.cli", "bench", "--config=configs/gpt.py:tiny",
                         "--config.model.d_ff=1073741824", "--steps=1", "--warmup=1"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert lines[0].startswith("error: out of device memory (") and "549755813888 bytes" in lines[0]
  # batch_size is the global batch: the advice keeps it and splits it (grad_accum), never halves it.
  assert "raise train.grad_accum" in lines[0] and "lower train.batch_size" not in lines[0]
  assert "fmjax plan" in lines[0]


@pytest.mark.parametrize("text,detail", [
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 25769803776 bytes.",
     "Out of memory while trying to allocate 25769803776 bytes."),  # GPU
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 100.5G "
     "of 95.74G hbm.\nLargest program allocations in hbm:\n  1. Size: 4.00G", "XLA:TPU compile permanent error."),
    ("INTERNAL: Error dispatching computation: Out of memory allocating 1024 bytes.",
     "Error dispatching computation: Out of memory allocating 1024 bytes."),  # CPU
])
def test_out_of_memory_message(text, detail, monkeypatch, capsys):
  import jax
  error = jax.errors.JaxRuntimeError(text)
  message = cli.out_of_memory_message(error)
  assert message.startswith(f"out of device memory ({detail}") and "\n" not in message
  monkeypatch.setattr("fmjax.bench.run", lambda *a, **k: (_ for _ in ()).throw(error))
  assert cli.main(["bench", "--config=configs/gpt.py:tiny"]) == 2
  assert capsys.readouterr().err.count("\n") == 1
  # On a GPU it also names XLA's memory fraction, unless the user set it already.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95" in cli.out_of_memory_message(error)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  assert "MEM_FRACTION" not in cli.out_of_memory_message(error)
  # Any other runtime error is a bug to see in full, not a user's mistake.
  other = jax.errors.JaxRuntimeError("INTERNAL: ptxas exited with non-zero error code")
  assert cli.out_of_memory_message(other) is None
  monkeypatch.setattr("fmjax.bench.run", lambda *a, **k: (_ for _ in ()).throw(other))
  with pytest.raises(jax.errors.JaxRuntimeError, match="ptxas"):
    cli.main(["bench", "--config=configs/gpt.py:tiny"])


def test_cli_unknown_command(capsys):
  assert cli.main(["trian"]) == 2
  assert capsys.readouterr().err.strip() == "error: unknown command 'trian'; did you mean 'train'? (`fmjax --help` " \
                                            "lists the commands)"


def test_output_into_a_closed_pipe_stops_quietly(tmp_path):
  """`fmjax sweep --print_commands | head -1`: the reader leaves early, and the command stops as `cat` does
  (exit 141, 128 + SIGPIPE), not in a BrokenPipeError traceback."""
  (tmp_path / "sweep.py").write_text("from fmjax import config_lib\n\ndef get_config(arg=''):\n  return "
                                     "config_lib.base_config('gpt')\n\ndef get_sweep():\n  return [{'optim.lr': i / "
                                     "1e4} for i in range(1, 2000)]\n")
  root = os.path.join(os.path.dirname(__file__), "..")
  for argv in (["--help"], ["sweep", f"--config={tmp_path / 'sweep.py'}", f"--workdir={tmp_path / 'runs'}",
                            "--print_commands"]):
    read, write = os.pipe()
    os.close(read)  # a reader that has already gone
    done = subprocess.run([sys.executable, "-m", "fmjax.cli", *argv], stdout=write, stderr=subprocess.PIPE,
                          text=True, cwd=root, env={**os.environ, "PYTHONPATH": root}, timeout=120)
    os.close(write)
    assert done.returncode == cli.BROKEN_PIPE_EXIT_CODE and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("config", ["configs", "tests/golden/first_runs_breaking_keys.json"])
def test_a_config_that_is_not_a_python_file_is_one_line(config, tmp_path, capsys):
  assert cli.main(["train", f"--config={config}", f"--workdir={tmp_path / 'w'}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err == f"error: --config={config} is not a Python config file; pass --config=configs/NAME.py[:args] (a " \
                "run's config.json is read by the commands that take --workdir alone, e.g. fmjax eval)", err


@pytest.mark.parametrize("errno_,fix", [(errno.ENOTDIR, "a part of the path is a file"),
                                        (errno.EROFS, "pass a path this user can write"),
                                        (errno.ENOSPC, "free space there")])
def test_a_path_the_system_refuses_is_one_line_naming_it(errno_, fix, monkeypatch, capsys):
  def refused(*args, **kwargs):
    raise OSError(errno_, os.strerror(errno_), "/runs/x/.lock")

  monkeypatch.setattr("fmjax.train.run", refused)
  assert cli.main(["train", "--config=configs/gpt.py:tiny", "--workdir=/runs/x"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: {os.strerror(errno_)}: /runs/x/.lock; {fix}") and "\n" not in err, err
  monkeypatch.setattr("fmjax.train.run", lambda *a: (_ for _ in ()).throw(OSError("no path: not the user's")))
  with pytest.raises(OSError, match="not the user's"):
    cli.main(["train", "--config=configs/gpt.py:tiny", "--workdir=/runs/x"])


@pytest.mark.parametrize("spec", ["experiments/bert_base/config.py:phase=1", "experiments/bert_base/config.py:phase=2",
                                  "experiments/gpt2_124m/config.py", "experiments/scaling_tiny/config.py",
                                  "experiments/pretrain_helps/config.py", "experiments/pretrain_helps/pretrain.py",
                                  *(f"experiments/decoder_choices/config.py:{v}"
                                    for v in ("gpt2", "swiglu", "llama_mqa")),
                                  "configs/finetune_cls.py:task=glue/sst2",
                                  "configs/sft.py", "configs/dpo.py", "configs/dpo.py:small"])
def test_experiment_configs_load_and_validate(spec):
  config_lib.load_config(spec)


@pytest.mark.parametrize("command,spec,error", [
    ("train", "finetune_cls.py", "this is a fine-tuning (classification) config (it has the `task` section): run it "
     "with `fmjax finetune`, not `fmjax train`"),
    ("train", "sft.py", "this is an SFT config (it has the `sft` section): run it with `fmjax sft`"),
    ("finetune", "bert.py:tiny", "`fmjax finetune` needs a fine-tuning (classification) config (with a `task` section"),
    ("sft", "gpt.py:tiny", "`fmjax sft` needs an SFT config (with a `sft` section, e.g. configs/sft.py); this one is "
     "a pretraining config: run it with `fmjax train`"),
    ("dpo", "gpt.py:tiny", "`fmjax dpo` needs a DPO config (with a `dpo` section, e.g. configs/dpo.py); this one is "
     "a pretraining config: run it with `fmjax train`"),
    ("train", "dpo.py", "this is a DPO config (it has the `dpo` section): run it with `fmjax dpo`, not `fmjax train`"),
    ("sft", "dpo.py", "this is a DPO config (it has the `dpo` section): run it with `fmjax dpo`, not `fmjax sft`"),
])
def test_a_config_run_by_the_wrong_command_is_one_line_and_leaves_nothing(command, spec, error, tmp_path, capsys):
  """Once `fmjax train` pretrained a fine-tuning config to the end, and the other way round a traceback."""
  code = cli.main([command, f"--config=configs/{spec}", f"--workdir={tmp_path / 'w'}"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and err.startswith("error: ") and error in err and "\n" not in err, err
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("line,error", [
    ("c.model.num_layer = 3", "get_config sets 'model.num_layer', which is not an fmjax setting; did you mean "
     "'num_layers'"),
    ("c.train.update(step=5)", "get_config sets 'train.step', which is not an fmjax setting; did you mean 'steps'"),
    ("c.data.tokenizer.vocab = 5", "'data.tokenizer.vocab', which is not an fmjax setting; did you mean 'vocab_size'"),
    ("c.trian = dict(steps=5)", "get_config sets 'trian.steps', which is not an fmjax setting; did you mean 'train'"),
    # A command's own sections are checked the same way.
    ("c.finetune = config_lib.finetune_section(); c.finetune.polling = 'mean'", "'finetune.polling', which is not "
     "an fmjax setting; did you mean 'pooling'"),
    ("c.task = config_lib.task_section(); c.task.max_train_example = 200", "'task.max_train_example', which is not "
     "an fmjax setting; did you mean 'max_train_examples'"),
    ("c.sft = config_lib.sft_section(); c.sft.prompt = 'q'", "'sft.prompt', which is not an fmjax setting; did you "
     "mean 'prompt_key'"),
    ("c.dpo = config_lib.dpo_section(); c.dpo.betta = 0.2", "'dpo.betta', which is not an fmjax setting; did you "
     "mean 'beta'"),
])
def test_a_typo_inside_a_config_file_is_refused(tmp_path, line, error):
  """The lock covers overrides; a key that get_config itself misspells was once kept beside the real
  one, and the default trained (a 2-layer model for `num_layer = 3`)."""
  path = tmp_path / "mine.py"
  path.write_text("from fmjax import config_lib\n\ndef get_config(arg=None):\n"
                  "  c = config_lib.base_config('gpt')\n"
                  f"  {line}\n  return c\n")
  with pytest.raises(ConfigError, match=re.escape(error)):
    config_lib.load_config(str(path))
  path.write_text(path.read_text().replace(line, "c.release = dict(license='mit')  # model card fields, free-form"))
  assert config_lib.load_config(str(path)).release.license == "mit"


def test_a_bucket_path_with_no_library_to_reach_it_is_one_line(monkeypatch, capsys):
  """Without TensorFlow (an ARM host) and gcsfs, fsspec raises "Please install gcsfs ..." from deep in
  `files.exists(workdir)`: that was a traceback. Any other ImportError is a bug to see whole."""
  def missing(*a, **k):
    raise ImportError("Please install gcsfs to access Google Storage")
  monkeypatch.setattr("fmjax.train.run", missing)
  assert cli.main(["train", "--config=configs/gpt.py:tiny", "--workdir=gs://b/run"]) == 2
  err = capsys.readouterr().err
  assert err == ("error: Please install gcsfs to access Google Storage (`pip install 'fmjax[gcs]'` brings gcsfs, "
                 "for gs:// paths), or pass a local path\n")
  monkeypatch.setattr("fmjax.train.run", lambda *a, **k: __import__("no_such_module_fmjax"))
  with pytest.raises(ImportError):
    cli.main(["train", "--config=configs/gpt.py:tiny", "--workdir=gs://b/run"])


def test_an_unreachable_bucket_is_one_line(monkeypatch, capsys):
  """gs:// paths go through TensorFlow's file system; without network or credentials it raises an
  OpError, which was a 30-line traceback."""
  tf = pytest.importorskip("tensorflow")
  error = tf.errors.FailedPreconditionError(None, None, "Error executing an HTTP request: libcurl code 6 meaning "
                                            "'Couldn't resolve host name'\n\twhen reading gs://b/run/config.json")
  monkeypatch.setattr("fmjax.evaluate.run", lambda *a, **k: (_ for _ in ()).throw(error))
  assert cli.main(["eval", "--workdir=gs://b/run"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: a bucket path failed (FailedPreconditionError: Error "
                                                   "executing an HTTP request: libcurl code 6")
  assert "credentials" in err
  # A local file's TensorFlow error (a damaged record) is a bug to see whole, not the network's.
  local = tf.errors.DataLossError(None, None, "corrupted record at 12 in /data/x.tfrecord")
  monkeypatch.setattr("fmjax.evaluate.run", lambda *a, **k: (_ for _ in ()).throw(local))
  with pytest.raises(tf.errors.DataLossError):
    cli.main(["eval", "--workdir=/tmp/run"])


@pytest.mark.parametrize("command", ["bench", "plan"])
def test_bench_and_plan_refuse_a_fine_tuning_config(command, capsys):
  assert cli.main([command, "--config=configs/finetune_cls.py"]) == 2
  assert capsys.readouterr().err.startswith(f"error: `fmjax {command}` measures the pretraining step, not a "
                                            "fine-tuning config's classifier")


def test_a_recorded_config_with_a_damaged_model_size_is_refused_in_one_line():
  saved = config_lib.to_dict(config_lib.load_config("configs/gpt.py:tiny"))
  assert config_lib.check_saved(saved, "config.json") is saved
  for key, value in (("num_heads", "four"), ("d_model", 0), ("num_layers", 2.5), ("vocab_size", True),
                     ("family", "llama")):
    bad = {**saved, "model": {**saved["model"], key: value}}
    with pytest.raises(ConfigError, match=re.escape(f"config.json has model.{key}={value!r}, where the model needs")):
      config_lib.check_saved(bad, "config.json")


@pytest.mark.parametrize("edit,error", [
    (("data", "seq_len", "abc"), "data.seq_len='abc', where a run records a whole number"),
    (("train", "batch_size", 8.5), "train.batch_size=8.5, where a run records a whole number"),
    (("model", "scan_layers", "no"), "model.scan_layers='no', where a run records true or false"),
    (("optim", "lr", True), "optim.lr=True, where a run records a number"),
    # A null is no run's value either: the model and batch checks below compared it, a TypeError traceback.
    (("model", "dropout", None), "model.dropout=None, where a run records a number"),
    (("train", "batch_size", None), "train.batch_size=None, where a run records a whole number"),
    ((None, "optim", "fast"), "optim='fast', where a run records a section of settings"),
    (("model", "dtype", "fp16"), r"model.dtype='fp16' is not one of \['float32', 'bfloat16', 'float16'\]"),
    (("model", "dropout", 1.0), r"model.dropout must be in \[0, 1\), got 1.0"),
    (("train", "batch_size", 0), "train.batch_size=0 and data.seq_len=128, where a run has at least 1 row of at least "
     "2 tokens"),
])
def test_a_recorded_config_with_a_value_no_run_writes_is_refused_in_one_line(edit, error):
  """A hand-edited config.json (`"dtype": "fp16"`, `"batch_size": 0`) ended `fmjax eval`, `generate` and
  `export` in a TypeError or a ZeroDivisionError deep inside them."""
  saved = config_lib.to_dict(config_lib.load_config("configs/gpt.py:tiny"))
  section, key, value = edit
  bad = json.loads(json.dumps(saved))
  (bad[section] if section else bad)[key] = value
  with pytest.raises(ConfigError, match=r"^config.json is damaged or hand-edited \(copy it again from where the run "
                                        rf"was made\): {error}") as e:
    config_lib.check_saved(bad, "config.json")
  assert "\n" not in str(e.value)


def test_a_recorded_config_missing_what_the_model_reads_is_refused_and_newer_keys_are_not_needed():
  saved = config_lib.to_dict(config_lib.load_config("configs/bert.py:tiny"))
  for section, key, missing in (("model", "dropout", "model.dropout"), ("model", "type_vocab_size",
                                "model.type_vocab_size"), (None, "data", "data"), (None, "train", "train")):
    bad = json.loads(json.dumps(saved))
    del (bad[section] if section else bad)[key]
    with pytest.raises(ConfigError, match=rf"^config.json has no {missing}: it is damaged or not an fmjax run's; copy "
                                          "it again from where the run was made$"):
      config_lib.check_saved(bad, "config.json")
  # A run saved before a key existed (every key the model reads with a default, say) is read as it was.
  older = json.loads(json.dumps(saved))
  for key in ("attention_dropout", "fused_loss_chunk", *models.ARCHITECTURE_DEFAULTS):
    del older["model"][key]
  del older["optim"]["mu_dtype"], older["data"]["shard_docs"]
  assert config_lib.check_saved(older, "config.json") is older
  tuned = config_lib.to_dict(config_lib.load_config("configs/finetune_cls.py"))  # its task and finetune sections
  assert config_lib.check_saved(tuned, "config.json") is tuned


@pytest.mark.parametrize("command", ["eval", "report", "release", "export", "import-hf", "plan", "generate", "sweep"])
def test_a_misspelt_flag_is_one_line_for_every_command(command, capsys):
  """Usage mistakes end as every bad input does: one `error:` line and exit code 2 (argparse printed its
  usage block first)."""
  assert cli.main([command, "--workdri=/tmp/x"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: fmjax {command}: ") and err.endswith(f"(see fmjax {command} --help)\n"), err
  assert err.count("\n") == 1, err
