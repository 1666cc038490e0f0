"""GPT SFT: completion-only loss weights, packing, init_from, and a short run that learns."""

import json

import jax
import numpy as np
import pytest

from fmjax import config_lib, evaluate, generate, metrics as metrics_lib, optim, sharding, sft, train
from fmjax.config_lib import ConfigError
from test_generate import make_workdir


class CharTokenizer:
  eos_id = 0

  def encode(self, text):
    return [ord(c) for c in text]


def test_prompt_tokens_carry_zero_loss_weight_and_rows_pack_apart():
  tok = CharTokenizer()
  examples = [sft.encode_example(tok, "ab", "XY"), sft.encode_example(tok, "c", "Z"),
              sft.encode_example(tok, "", "hello world")]
  assert examples[0] == ([97, 98, 88, 89, 0], 2) and examples[2][0][0] == tok.eos_id
  rows = sft.pack_rows(examples, 8)
  # "abXY" + EOS (4 slots) and "cZ" + EOS (2 slots) share row 0; the 12-slot row is cut at 8.
  assert rows["inputs"].shape == (2, 8)
  np.testing.assert_array_equal(rows["inputs"][0], [97, 98, 88, 89, 99, 90, 0, 0])
  np.testing.assert_array_equal(rows["targets"][0], [98, 88, 89, 0, 90, 0, 0, 0])
  # Weight 1 exactly where the target is a completion token or the EOS after it.
  np.testing.assert_array_equal(rows["loss_weights"][0], [0, 1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(rows["segment_ids"][0], [1, 1, 1, 1, 2, 2, 0, 0])
  np.testing.assert_array_equal(rows["positions"][0], [0, 1, 2, 3, 0, 1, 0, 0])
  np.testing.assert_array_equal(rows["loss_weights"][1], np.ones(8))
  unpacked = sft.pack_rows(examples, 8, pack=False)
  assert unpacked["inputs"].shape == (3, 8) and unpacked["segment_ids"].max() == 1
  assert unpacked["loss_weights"].sum() == rows["loss_weights"].sum()


def test_bad_jsonl_gets_one_line(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_text('{"prompt": "a", "answer": "b"}\n')
  with pytest.raises(ConfigError, match="x.jsonl:1 has no 'completion' field"):
    sft.read_examples(str(path))
  with pytest.raises(ConfigError, match="matches no file"):
    sft.read_examples(str(tmp_path / "none*.jsonl"))


def write_jsonl(path, n=160):
  rng = np.random.default_rng(0)
  with open(path, "w") as f:
    for _ in range(n):
      a, b = rng.integers(0, 9, size=2)
      f.write(json.dumps({"prompt": f"{a} plus {b} is", "completion": f" {a + b}."}) + "\n")


def test_sft_from_pretrained_loads_params_learns_and_resumes(tmp_path, tmp_path_factory):
  pretrain, _ = make_workdir(tmp_path_factory, "gpt")
  write_jsonl(tmp_path / "train.jsonl")
  workdir = tmp_path / "sft"
  config = config_lib.load_config("configs/sft.py", [
      f"init_from={pretrain}", f"data.files={tmp_path / 'train.jsonl'}", "data.seq_len=32", "train.batch_size=8",
      "train.steps=24", "train.log_every=4", "train.eval_every=24", "train.progress_bar=false", "optim.lr=3e-3",
      "optim.warmup_steps=0", "optim.schedule=constant", "checkpoint.async_save=false"])

  # init_from: step-0 params are the pretrained checkpoint's, bit for bit.
  tok = sft.adopt_init_from(config, str(workdir))
  assert config.model.d_model == 64 and config.data.tokenizer.kind == "hf" and tok.eos_id is not None
  mesh = sharding.make_mesh(config)  # 8 fake devices, data parallel
  tx = optim.make_optimizer(config)
  spec = train.state_spec(config, mesh, tx)
  state = sft.init_from_pretrained(config, spec, tx, str(pretrain))
  pretrained = generate.restore_run(str(pretrain)).params
  assert int(state["step"]) == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), jax.device_get(pretrained))

  result = sft.run(config, str(workdir))
  losses = [m["train/loss"] for m in metrics_lib.read_jsonl(str(workdir / "metrics.jsonl")) if "train/loss" in m]
  assert result["step"] == 24 and losses[-1] < 0.6 * losses[0], losses
  # The workdir stands alone: eval scores the held-out completions as the run did, generate uses its tokenizer.
  held_out = evaluate.run(str(workdir))
  assert held_out["loss"] == pytest.approx(result["eval"]["loss"], rel=1e-5)
  assert isinstance(generate.run(str(workdir), prompts=["3 plus 4 is"], max_new_tokens=3, temperature=0)[0], str)
  # Rerunning the same command resumes the finished run rather than starting over.
  again = sft.run(config_lib.load_config("configs/sft.py", [f"init_from={pretrain}"] + [
      f"data.files={tmp_path / 'train.jsonl'}", "data.seq_len=32", "train.batch_size=8", "train.steps=24",
      "train.log_every=4", "train.eval_every=24", "train.progress_bar=false", "optim.lr=3e-3",
      "optim.warmup_steps=0", "optim.schedule=constant", "checkpoint.async_save=false"]), str(workdir))
  assert again["step"] == 24 and again["eval"]["loss"] == pytest.approx(result["eval"]["loss"], rel=1e-6)
