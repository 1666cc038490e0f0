"""GPT SFT: completion-only loss weights, packing, init_from, and a short run that learns."""

import io
import json
import logging
import os
import re
import shutil

import jax
import numpy as np
import pytest

from fmjax import cli, config_lib, data, evaluate, generate, interop, metrics as metrics_lib, optim, report, sharding
from fmjax import sft, sweep, train
from fmjax.config_lib import ConfigError
from fmjax.data import chat, tokenizers
from test_generate import make_workdir


class CharTokenizer(tokenizers.Tokenizer):
  eos_id = bos_id = 0  # GPT-2's convention: EOS opens each example

  def __init__(self):
    pass

  def encode(self, text):
    return [ord(c) for c in text]


def test_prompt_tokens_carry_zero_loss_weight_and_rows_pack_apart():
  tok = CharTokenizer()
  examples = [sft.encode_example(tok, "ab", "XY"), sft.encode_example(tok, "c", "Z"),
              sft.encode_example(tok, "", "hello world")]
  # EOS opens each example, as it opens a document in pretraining and every `fmjax generate` prompt.
  assert examples[0] == ([0, 97, 98, 88, 89, 0], [0, 0, 0, 1, 1, 1]) and examples[2][0][:2] == [tok.eos_id, ord("h")]
  rows = sft.pack_rows(examples, 8)
  # EOS "abXY" EOS (5 slots) and EOS "cZ" EOS (3 slots) fill row 0; the 12-slot row is cut at 8.
  assert rows["inputs"].shape == (2, 8)
  np.testing.assert_array_equal(rows["inputs"][0], [0, 97, 98, 88, 89, 0, 99, 90])
  np.testing.assert_array_equal(rows["targets"][0], [97, 98, 88, 89, 0, 99, 90, 0])
  # Weight 1 exactly where the target is a completion token or the EOS after it.
  np.testing.assert_array_equal(rows["loss_weights"][0], [0, 0, 1, 1, 1, 0, 1, 1])
  np.testing.assert_array_equal(rows["segment_ids"][0], [1, 1, 1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(rows["positions"][0], [0, 1, 2, 3, 4, 0, 1, 2])
  np.testing.assert_array_equal(rows["loss_weights"][1], np.ones(8))
  framed = CharTokenizer()
  framed.bos_id = 1  # a tokenizer with a BOS of its own (Llama's <s>) opens each example with it
  assert sft.encode_example(framed, "ab", "XY") == ([1, 97, 98, 88, 89, 0], [0, 0, 0, 1, 1, 1])
  unpacked = sft.pack_rows(examples, 8, pack=False)
  assert unpacked["inputs"].shape == (3, 8) and unpacked["segment_ids"].max() == 1
  assert unpacked["loss_weights"].sum() == rows["loss_weights"].sum()


def test_a_prompt_of_exactly_seq_len_ids_keeps_its_first_completion_target(tmp_path, caplog):
  """Inputs are ids[:T] and targets ids[1:T + 1]: a prompt of T ids (EOS included) leaves the row's last
  target to the first completion token; a prompt of T + 1 ids leaves none, and its row is dropped."""
  T = 8
  path = tmp_path / "x.jsonl"
  path.write_text(json.dumps({"prompt": "p" * (T - 1), "completion": "XY"}) + "\n"
                  + json.dumps({"prompt": "q" * T, "completion": "Z"}) + "\n")
  config = config_lib.load_config("configs/sft.py", [f"data.files={path}", f"sft.eval_files={path}",
                                                     f"data.seq_len={T}"])
  with caplog.at_level(logging.INFO, logger="fmjax"):
    rows = sft.load_rows(config, CharTokenizer())["train"]
  assert rows["inputs"].shape == (1, T)
  np.testing.assert_array_equal(rows["inputs"][0], [0] + [ord("p")] * (T - 1))
  np.testing.assert_array_equal(rows["targets"][0], [ord("p")] * (T - 1) + [ord("X")])
  np.testing.assert_array_equal(rows["loss_weights"][0], [0] * (T - 1) + [1])
  assert (f"SFT train: dropped 1 rows whose prompt (with the token that opens it) is longer than "
          f"data.seq_len={T}; cut 1 completions at the row end") in caplog.text


def test_bad_jsonl_gets_one_line(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_text('{"prompt": "a", "answer": "b"}\n')
  with pytest.raises(ConfigError, match="x.jsonl:1 has no 'completion' field"):
    sft.read_examples(str(path))
  with pytest.raises(ConfigError, match="matches no file"):
    sft.read_examples(str(tmp_path / "none*.jsonl"))
  # The prompt under another name: every prompt would be dropped without a word (as it once was).
  path.write_text('{"question": "a", "completion": "b"}\n{"question": "c", "completion": "d"}\n')
  with pytest.raises(ConfigError, match=r"no row of data.files='.*x.jsonl' has a 'prompt' field, but they have "
                                        r"\['question'\]; set sft.prompt_key"):
    sft.read_examples(str(path))
  assert sft.read_examples(str(path), prompt_key="question") == [("a", "b"), ("c", "d")]
  # Completions alone (with metadata): plain language modelling, no prompt to miss.
  path.write_text('{"completion": "b", "id": "row-1", "n": 3}\n')
  assert sft.read_examples(str(path)) == [("", "b")]
  # Chat messages (lists of objects) are no text: their Python repr was once trained on.
  path.write_text('{"prompt": [{"role": "user", "content": "hi"}], "completion": "hello"}\n')
  with pytest.raises(ConfigError, match=r"x.jsonl:1 has a JSON list in 'prompt', where SFT takes text; write the "
                                        r"prompt and the completion as strings, or a conversation as "
                                        r"\{\"messages\": \[\{\"role\": \.\.\., \"content\": \.\.\.\}, \.\.\.\]\}$"):
    sft.read_examples(str(path))
  path.write_text('{"prompt": "hi", "completion": {"role": "assistant", "content": "hello"}}\n')
  with pytest.raises(ConfigError, match=r"x.jsonl:1 has a JSON dict in 'completion'"):
    sft.read_examples(str(path))
  # A missing eval file names sft.eval_files, the key that is wrong.
  good = tmp_path / "good.jsonl"
  good.write_text('{"prompt": "a", "completion": "b"}\n')
  config = config_lib.load_config("configs/sft.py", [f"data.files={good}", f"sft.eval_files={tmp_path / 'nope.jsonl'}"])
  with pytest.raises(ConfigError, match=r"^sft\.eval_files='.*nope\.jsonl' matches no file; pass "
                                        r"--config\.sft\.eval_files=PATH\.jsonl"):
    sft.load_rows(config, CharTokenizer())


def write_jsonl(path, n=160):
  rng = np.random.default_rng(0)
  with open(path, "w") as f:
    for _ in range(n):
      a, b = rng.integers(0, 9, size=2)
      f.write(json.dumps({"prompt": f"{a} plus {b} is", "completion": f" {a + b}."}) + "\n")


def test_sft_from_pretrained_loads_params_learns_and_resumes(tmp_path, tmp_path_factory, monkeypatch):
  pretrain, _ = make_workdir(tmp_path_factory, "gpt")
  write_jsonl(tmp_path / "train.jsonl")
  workdir = tmp_path / "sft"
  config = config_lib.load_config("configs/sft.py", [
      f"init_from={pretrain}", f"data.files={tmp_path / 'train.jsonl'}", "data.seq_len=32", "train.batch_size=16",
      "train.steps=24", "train.log_every=4", "train.eval_every=24", "train.progress_bar=false", "optim.lr=3e-3",
      "optim.warmup_steps=0", "optim.schedule=constant", "checkpoint.async_save=false", "train.grad_accum=2"])

  # init_from: step-0 params are the pretrained checkpoint's, bit for bit.
  tok = sft.adopt_tokenizer(config, str(workdir), sft.adopt_shape(config, str(workdir)))
  assert config.model.d_model == 64 and config.data.tokenizer.kind == "hf" and tok.eos_id is not None
  mesh = sharding.make_mesh(config)  # 8 fake devices, data parallel
  tx = optim.make_optimizer(config)
  spec = train.state_spec(config, mesh, tx)
  state = sft.init_from_pretrained(config, spec, tx, str(pretrain))
  pretrained = generate.restore_run(str(pretrain)).params
  assert int(state["step"]) == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), jax.device_get(pretrained))

  made = []  # held-out rows go through grad_accum micro-batches, as training's do (and pretraining's eval)
  monkeypatch.setattr(sft, "make_loaders", lambda *a, make=sft.make_loaders, **kw: made.append(make(*a, **kw))
                      or made[-1])
  result = sft.run(config, str(workdir))
  monkeypatch.undo()
  assert made[0][1].batch_size == 8 and made[0][0].batch_size == 16
  losses = [m["train/loss"] for m in report.read_metrics(str(workdir)) if "train/loss" in m]
  assert result["step"] == 24 and losses[-1] < 0.6 * losses[0], losses
  # The tokenizer is recorded relative to the workdir, which may then move: all below reads the moved copy.
  assert json.loads((workdir / "config.json").read_text())["data"]["tokenizer"]["path"] == "tokenizer"
  moved = tmp_path / "sft_moved"
  os.rename(workdir, moved)
  workdir = moved
  # The workdir stands alone: eval scores the held-out completions as the run did, generate uses its tokenizer.
  held_out = evaluate.run(str(workdir))
  assert held_out["loss"] == pytest.approx(result["eval"]["loss"], rel=1e-5)
  # Its rows moved too: eval takes where they are now.
  os.rename(tmp_path / "train.jsonl", tmp_path / "rows.jsonl")
  with pytest.raises(ConfigError, match="matches no file; pass --config.data.files=PATH.jsonl"):
    evaluate.run(str(workdir))
  there = evaluate.run(str(workdir), data_overrides=[f"data.files={tmp_path / 'rows.jsonl'}"])
  assert there["loss"] == pytest.approx(held_out["loss"], rel=1e-6)
  with pytest.raises(ConfigError, match="is an SFT run, scored on its own data; it takes --config.data.files / "
                                        "--config.sft.eval_files"):
    evaluate.run(str(workdir), data_overrides=["data.dataset=wikitext"])
  os.rename(tmp_path / "rows.jsonl", tmp_path / "train.jsonl")
  assert isinstance(generate.run(str(workdir), prompts=["3 plus 4 is"], max_new_tokens=3, temperature=0)[0], str)
  # Rerunning the same command resumes the finished run rather than starting over.
  again = sft.run(config_lib.load_config("configs/sft.py", [f"init_from={pretrain}"] + [
      f"data.files={tmp_path / 'train.jsonl'}", "data.seq_len=32", "train.batch_size=16", "train.steps=24",
      "train.log_every=4", "train.eval_every=24", "train.progress_bar=false", "optim.lr=3e-3",
      "optim.warmup_steps=0", "optim.schedule=constant", "checkpoint.async_save=false", "train.grad_accum=2"]),
      str(workdir))
  assert again["step"] == 24 and again["eval"]["loss"] == pytest.approx(result["eval"]["loss"], rel=1e-6)


def test_fmjax_finetune_runs_an_sft_config_as_fmjax_sft_does(tmp_path, tmp_path_factory):
  """DESIGN's `finetune` covers SFT: given configs/sft.py it once refused ("run it with `fmjax sft`")."""
  pretrain, _ = make_workdir(tmp_path_factory, "gpt")
  write_jsonl(tmp_path / "train.jsonl", 40)
  flags = [f"--config.{o}" for o in (
      f"init_from={pretrain}", f"data.files={tmp_path / 'train.jsonl'}", "data.seq_len=32", "train.batch_size=8",
      "train.steps=2", "train.log_every=1", "train.eval_batches=0", "train.progress_bar=false",
      "optim.warmup_steps=0", "checkpoint.async_save=false")]
  assert cli.main(["sft", "--config=configs/sft.py", f"--workdir={tmp_path / 'sft'}", *flags]) == 0
  # As a sweep's `finetune` run: the sweep reports its loss, and no task metrics (SFT has no task).
  out = io.StringIO()
  result = sweep.run_sweep("configs/sft.py", [{"train.seed": 0}], str(tmp_path / "sweep"), subcommand="finetune",
                           base_overrides=[f[len("--config."):] for f in flags], out=out)
  assert not result["failed"], out.getvalue()
  workdir = tmp_path / "sweep" / "train.seed=0"
  losses = {c: [m["train/loss"] for m in report.read_metrics(str(w)) if "train/loss" in m]
            for c, w in (("finetune", workdir), ("sft", tmp_path / "sft"))}
  assert len(losses["sft"]) == 2 and losses["finetune"] == losses["sft"], losses
  assert "sft" in json.loads((workdir / "config.json").read_text())
  assert not (tmp_path / "sweep" / "finetune.md").exists(), out.getvalue()


def test_seq_len_beyond_the_pretrained_max_len_is_lowered_to_it(tmp_path, tmp_path_factory, caplog):
  """configs/sft.py:small asks for 1024 tokens; a tiny init_from (max_len 64) caps the rows at 64, as logged."""
  pretrain, _ = make_workdir(tmp_path_factory, "gpt")
  config = config_lib.load_config("configs/sft.py:small", [f"init_from={pretrain}"])
  assert config.data.seq_len == 1024
  metrics_lib.log.addHandler(caplog.handler)
  try:
    with caplog.at_level(logging.INFO, logger=metrics_lib.log.name):
      sft.adopt_tokenizer(config, str(tmp_path / "sft"), sft.adopt_shape(config, str(tmp_path / "sft")))
  finally:
    metrics_lib.log.removeHandler(caplog.handler)
  config_lib.validate(config, jax.device_count())
  assert config.model.max_len == 64 and config.data.seq_len == 64
  assert f"data.seq_len=1024 lowered to 64, the model.max_len of {pretrain}" in caplog.text


def test_a_failed_start_leaves_no_trace_in_the_workdir(tmp_path, tmp_path_factory):
  pretrain, _ = make_workdir(tmp_path_factory, "gpt")
  write_jsonl(tmp_path / "good.jsonl", 20)
  (tmp_path / "empty.jsonl").write_text("\n")
  (tmp_path / "bad.jsonl").write_text('{"prompt": "hi", "completion": " there"}\n{"prompt": "oops", "completion": \n')
  (tmp_path / "keys.jsonl").write_text('{"question": "hi", "answer": " there"}\n')
  (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
  bert = tmp_path / "bert_run"  # a BERT workdir: config.json and checkpoints/
  (bert / "checkpoints").mkdir(parents=True)
  cfg = json.loads((pretrain / "config.json").read_text())
  cfg["model"]["family"] = "bert"
  (bert / "config.json").write_text(json.dumps(cfg))
  untrained = tmp_path / "untrained"  # a GPT workdir with no checkpoint yet
  (untrained / "checkpoints").mkdir(parents=True)
  (untrained / "config.json").write_text((pretrain / "config.json").read_text())
  good = f"data.files={tmp_path / 'good.jsonl'}"
  cases = [([f"data.files={tmp_path / 'empty.jsonl'}"], "holds no training rows"),
           ([f"data.files={tmp_path / 'bad.jsonl'}"], "bad.jsonl:2 is not valid JSON"),
           ([f"data.files={tmp_path / 'keys.jsonl'}"], "keys.jsonl:1 has no 'completion' field"),
           ([f"data.files={tmp_path / 'chat.jsonl'}"], "chat.jsonl:1 'messages' has no assistant message"),
           ([good, f"sft.chat_template={tmp_path / 'none.jinja'}"], "none.jinja' is neither a Jinja template"),
           ([good, f"sft.eval_files={tmp_path / 'nope.jsonl'}"], "sft.eval_files="),
           ([good, f"init_from={tmp_path / 'nowhere'}"], "holds no checkpoints/"),
           ([good, f"init_from={bert}"], "holds a bert model"),
           ([good, f"init_from={untrained}"], "holds no checkpoint;")]
  _each_refused_leaving_no_trace(tmp_path, pretrain, cases)


def _each_refused_leaving_no_trace(tmp_path, pretrain, cases, errors=ConfigError):
  """Each (overrides, message) start fails in one line, making no workdir and changing none."""
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "notes.txt").write_text("mine")
  for overrides, message in cases:
    for workdir in (tmp_path / "new", existing):
      config = config_lib.load_config("configs/sft.py", [f"init_from={pretrain}", "data.seq_len=32", *overrides])
      with pytest.raises(errors, match=message) as e:
        sft.run(config, str(workdir))
      assert "\n" not in str(e.value)
      assert not (tmp_path / "new").exists(), overrides
      assert os.listdir(existing) == ["notes.txt"], overrides


def test_rows_that_all_outgrow_seq_len_or_a_damaged_init_from_refuse_the_start_untouched(tmp_path, tmp_path_factory):
  """Every prompt longer than data.seq_len once failed with a TypeError in the loader, and a damaged init_from
  checkpoint was found once the workdir was made: each is one line now, and no workdir is made or changed."""
  pretrain, _ = make_workdir(tmp_path_factory, "gpt")
  long = tmp_path / "long.jsonl"
  long.write_text("".join(json.dumps({"prompt": f"{i} " + "word " * 100, "completion": " ok"}) + "\n"
                          for i in range(6)))
  write_jsonl(tmp_path / "good.jsonl", 20)
  damaged = tmp_path / "damaged"
  shutil.copytree(pretrain, damaged)
  # Cut short, as a partial copy leaves it: the metadata still reads, the arrays do not.
  largest = max((p for p in (damaged / "checkpoints").rglob("*") if p.is_file() and p.parent.name == "d"),
                key=lambda p: p.stat().st_size)
  os.truncate(largest, largest.stat().st_size // 2)
  good = f"data.files={tmp_path / 'good.jsonl'}"
  cases = [([good, f"init_from={damaged}"], r"^checkpoint step 0 in .*damaged.* is damaged"),
           ([f"data.files={long}", "sft.eval_percent=0"],
            r"^every training row has a prompt longer than data.seq_len=32 \(6 dropped\); raise data.seq_len "
            r"\(up to model.max_len=64\) or shorten the prompts$"),
           ([good, f"sft.eval_files={long}"],
            r"^every row of sft.eval_files='.*long.jsonl' has a prompt longer than data.seq_len=32 \(6 dropped\)"),
           ([good, "sft.eval_percent=-5"], r"^sft.eval_percent=-5 must be in \[0, 100\)")]
  _each_refused_leaving_no_trace(tmp_path, pretrain, cases, errors=(ConfigError, ValueError))


def test_a_held_out_split_whose_prompts_all_outgrow_seq_len_is_refused(tmp_path):
  """Rows held out by the hash split but all dropped for their length once left the run with no eval, silently."""
  pick = lambda long, held: next(p for i in range(1000) for p in [("q" * 12 if long else "p") + str(i)]
                                 if sft._held_out((p, "X"), 50) == held)
  rows = [(pick(True, True), "X"), (pick(False, False), "X")]
  path = tmp_path / "x.jsonl"
  path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows))
  config = config_lib.load_config("configs/sft.py", [f"data.files={path}", "data.seq_len=8", "sft.eval_percent=50"])
  with pytest.raises(ConfigError, match=r"^every held-out eval row \(sft.eval_percent=50\) has a prompt longer than "
                                        r"data.seq_len=8 \(1 dropped\); raise data.seq_len \(up to model.max_len=\d+\) "
                                        r"or shorten the prompts, or set sft.eval_percent=0$"):
    sft.load_rows(config, CharTokenizer())
  rows = sft.load_rows(config_lib.load_config("configs/sft.py", [f"data.files={path}", "data.seq_len=16",
                                                                 "sft.eval_percent=50"]), CharTokenizer())
  assert len(rows["train"]["inputs"]) == 1 and len(rows["eval"]["inputs"]) == 1
  for percent in (-5, 100):
    config = config_lib.load_config("configs/sft.py", [f"data.files={path}", f"sft.eval_percent={percent}"])
    with pytest.raises(ConfigError, match=rf"^sft.eval_percent={percent} must be in \[0, 100\)"):
      sft.load_rows(config, CharTokenizer())


def test_null_completions_are_skipped_and_non_utf8_is_one_line(tmp_path, caplog):
  path = tmp_path / "x.jsonl"
  path.write_text('{"prompt": "a", "completion": null}\n{"prompt": null, "completion": "b"}\n')
  with caplog.at_level(logging.WARNING, logger="fmjax"):
    assert sft.read_examples(str(path)) == [("", "b")]  # never the text "None"
  assert any("skipped 1 row(s) whose 'completion' is null" in r.getMessage() for r in caplog.records)
  latin = tmp_path / "latin.jsonl"
  latin.write_bytes('{"prompt": "caf\xe9", "completion": "b"}\n'.encode("latin-1"))
  with pytest.raises(ConfigError, match=r"latin.jsonl is not UTF-8 text \(byte 15\)") as e:
    sft.read_examples(str(latin))
  assert "\n" not in str(e.value)


def test_train_seed_orders_the_rows_as_fine_tuning_does():
  """A sweep's seeds are repeats that differ: the trunk comes from init_from and dropout is off, so the
  row order is all train.seed can change. train.seed=0 keeps data.seed's order."""
  rows = {"inputs": np.arange(64, dtype=np.int32).reshape(16, 4), "segment_ids": np.ones((16, 4), np.int32),
          "loss_weights": np.ones((16, 4), np.float32)}
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def order(*overrides):
    config = config_lib.load_config("configs/sft.py", ["train.batch_size=4", *overrides])
    train_loader, _ = sft.make_loaders(config, None, sharding, rows={"train": rows, "eval": None})
    return np.concatenate([train_loader.dataset_rows(s) for s in range(4)])

  seed0, seed1 = order("train.seed=0"), order("train.seed=1")
  assert sorted(seed0) == sorted(seed1) == list(range(16)) and list(seed0) != list(seed1)
  by_data_seed = sft.RowLoader(rows, 4, sharding, seed=0, shuffle=True)  # the order before train.seed counted
  np.testing.assert_array_equal(seed0, np.concatenate([by_data_seed.dataset_rows(s) for s in range(4)]))
  assert list(order("train.seed=0", "data.seed=3")) != list(seed0)



def _lora_flags(tmp_path, pretrain, steps, *more):
  return [f"init_from={pretrain}", f"data.files={tmp_path / 'train.jsonl'}", "data.seq_len=32", "train.batch_size=16",
          f"train.steps={steps}", "train.log_every=1", "train.eval_every=0", "train.progress_bar=false",
          "optim.lr=1e-2", "optim.warmup_steps=0", "optim.schedule=constant", "checkpoint.async_save=false",
          "checkpoint.every_steps=2", "finetune.peft=lora", *more]


def _flat(params) -> dict:
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(params))
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def _host_loss(config, graphdef, params, batch) -> float:
  from flax import nnx
  from fmjax import objectives
  loss_sum, aux = objectives.get_loss_fn(config)(nnx.merge(graphdef, jax.device_get(params)), batch)
  return float(loss_sum / aux["weight_sum"])


def test_lora_sft_trains_the_factors_alone_and_generate_eval_export_read_its_workdir(tmp_path, tmp_path_factory,
                                                                                       caplog):
  """LoRA SFT starts as the pretrained model (B = 0) and trains only lora_a/lora_b; generate and eval read its
  workdir as the model it trained (LoRA unmerged), export writes LoRA merged into the kernels, and a full SFT
  that starts from it (init_from) starts from those merged weights."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from fmjax import interop, peft
  pretrain, _ = make_workdir(tmp_path_factory, "gpt")
  write_jsonl(tmp_path / "train.jsonl")
  workdir = tmp_path / "lora"
  config = config_lib.load_config("configs/sft.py", _lora_flags(tmp_path, pretrain, 12))
  pretrained = generate.restore_run(str(pretrain))

  # At init the LoRA model computes the pretrained one's loss: B = 0 adds exactly nothing.
  tok = sft.adopt_tokenizer(config, str(workdir), sft.adopt_shape(config, str(workdir)))
  mesh = sharding.make_mesh(config)
  tx = optim.make_optimizer(config)
  spec = train.state_spec(config, mesh, tx)
  state = sft.init_from_pretrained(config, spec, tx, str(pretrain))
  batch = sft.make_loaders(config, tok, sharding.batch_sharding(mesh))[0].host_batch(0)
  assert _host_loss(config, spec.graphdef, state["params"], batch) == _host_loss(
      pretrained.config, pretrained.spec.graphdef, pretrained.params, batch)

  metrics_lib.log.addHandler(caplog.handler)
  try:
    with caplog.at_level(logging.INFO, logger=metrics_lib.log.name):
      result = sft.run(config, str(workdir))
  finally:
    metrics_lib.log.removeHandler(caplog.handler)
  trainable, total = peft.count(spec.abstract["params"], "lora")
  assert 0 < trainable < total / 10 and f"peft=lora: {trainable:,} of {total:,} parameters trainable" in caplog.text
  losses = [m["train/loss"] for m in report.read_metrics(str(workdir)) if "train/loss" in m]
  assert result["step"] == 12 and losses[-1] < 0.92 * losses[0], losses  # 6.25 to 5.49 on the random trunk

  # Every parameter but the LoRA factors is the pretrained one, bit for bit; the factors moved.
  tuned = generate.restore_run(str(workdir))
  before, after = _flat(pretrained.params), _flat(tuned.params)
  factors = {k for k in after if k.endswith(("['lora_a']", "['lora_b']"))}
  assert factors and set(after) - factors == set(before)
  for k in before:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  assert all(after[k].any() for k in factors if k.endswith("['lora_b']"))

  # eval and generate rebuild the LoRA model from config.json: eval scores what the run's own eval did.
  assert evaluate.run(str(workdir))["loss"] == pytest.approx(result["eval"]["loss"], rel=1e-5)
  assert isinstance(generate.run(str(workdir), prompts=["3 plus 4 is"], max_new_tokens=3, temperature=0)[0], str)

  # The export holds the merged kernels: transformers' logits are the unmerged fmjax model's.
  out = interop.export(str(workdir), str(tmp_path / "hf"))
  hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids = batch["inputs"][:2]
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids).long()).logits.numpy()
  model, _, _ = generate.load_run(str(workdir))
  ours = np.asarray(model(jax.numpy.asarray(ids)))[..., :theirs.shape[-1]]
  np.testing.assert_allclose(theirs, ours, atol=1e-4)

  # A full SFT from the LoRA run starts from its merged weights (and trains every parameter).
  full = config_lib.load_config("configs/sft.py", _lora_flags(tmp_path, workdir, 12, "finetune.peft=none"))
  sft.adopt_tokenizer(full, str(tmp_path / "full"), sft.adopt_shape(full, str(tmp_path / "full")))
  full_tx = optim.make_optimizer(full)
  full_spec = train.state_spec(full, mesh, full_tx)
  start = sft.init_from_pretrained(full, full_spec, full_tx, str(workdir))["params"]
  merged = peft.merge_lora(jax.device_get(tuned.params), config.finetune.lora_alpha, config.finetune.lora_rank)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(start), merged)


def test_lora_sft_resumes_bitwise(tmp_path, tmp_path_factory):
  """4 straight LoRA SFT steps equal 2 steps, then the same command with train.steps=4 resuming them."""
  pretrain, _ = make_workdir(tmp_path_factory, "gpt")
  write_jsonl(tmp_path / "train.jsonl", 40)
  run = lambda steps, workdir: sft.run(config_lib.load_config(
      "configs/sft.py", _lora_flags(tmp_path, pretrain, steps, "train.batch_size=8")), str(tmp_path / workdir))
  run(4, "straight")
  run(2, "resumed")
  assert run(4, "resumed")["step"] == 4
  losses = {w: [m["train/loss"] for m in report.read_metrics(str(tmp_path / w)) if "train/loss" in m]
            for w in ("straight", "resumed")}
  assert len(losses["straight"]) == 4 and losses["resumed"] == losses["straight"], losses
  straight, resumed = (_flat(generate.restore_run(str(tmp_path / w)).params) for w in ("straight", "resumed"))
  assert straight.keys() == resumed.keys()
  for k in straight:
    np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)


def test_lora_sft_of_a_llama_run_takes_its_architecture_and_trains_the_factors_of_q_and_kv(tmp_path, tmp_path_factory):
  """configs/sft.py names no architecture: SFT of a Llama run (rotary positions, grouped-query attention ...)
  builds that model from the run's config, and LoRA's `attn.qkv` target wraps its q and kv projections."""
  pretrain, _ = make_workdir(tmp_path_factory, "llama")
  write_jsonl(tmp_path / "train.jsonl", 40)
  workdir = tmp_path / "lora"
  sft.run(config_lib.load_config("configs/sft.py", _lora_flags(tmp_path, pretrain, 2, "train.batch_size=8",
                                                                "train.eval_batches=0")),
          str(workdir))
  model = json.loads((workdir / "config.json").read_text())["model"]
  assert {k: model[k] for k in ("positions", "norm", "mlp", "num_kv_heads", "use_bias", "tie_embeddings")} == {
      "positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "num_kv_heads": 2, "use_bias": False,
      "tie_embeddings": False}
  before, after = _flat(generate.restore_run(str(pretrain)).params), _flat(generate.restore_run(str(workdir)).params)
  factors = {k for k in after if k.endswith(("['lora_a']", "['lora_b']"))}
  assert {k for k in factors if k.startswith("['h']['blocks'][0]")} == {
      f"['h']['blocks'][0]['attn']['{dense}']['lora_{ab}']" for dense in ("q", "kv", "out") for ab in "ab"}
  assert set(after) - factors == set(before)
  for k in before:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def test_peft_sft_refusals_are_one_line_and_adapters_run_unrolled(tmp_path, tmp_path_factory):
  """finetune.peft=head has no head to train in SFT; an adapter SFT run trains (unrolled, from a scanned
  init_from too) but neither exports nor seeds another run (its adapters fold into no weight)."""
  from fmjax import interop
  with pytest.raises(ConfigError, match=r"^finetune.peft='head' trains a classifier's new head alone, and SFT has "
                                        r"none .*; for SFT set finetune.peft= one of none, lora, adapter, bitfit$"):
    config_lib.load_config("configs/sft.py", ["finetune.peft=head"])
  with pytest.raises(ConfigError) as e:  # a Llama's untied output layer is no tied table: the message says so
    config_lib.load_config("configs/sft.py:tiny,llama", ["finetune.peft=head"])
  assert "tied token embeddings" not in str(e.value) and "tie_embeddings=false its pretrained lm_head" in str(e.value)
  pretrain, _ = make_workdir(tmp_path_factory, "gpt")
  scanned = tmp_path / "scanned"  # adopt_shape reads only config.json and that checkpoints/ exists
  (scanned / "checkpoints").mkdir(parents=True)
  cfg = json.loads((pretrain / "config.json").read_text())
  cfg["model"]["scan_layers"] = True
  (scanned / "config.json").write_text(json.dumps(cfg))
  config = config_lib.load_config("configs/sft.py", [f"init_from={scanned}", "finetune.peft=adapter"])
  sft.adopt_shape(config, str(tmp_path / "x"))
  assert not config.model.scan_layers

  write_jsonl(tmp_path / "train.jsonl", 40)
  adapter = tmp_path / "adapter"
  sft.run(config_lib.load_config("configs/sft.py", _lora_flags(tmp_path, pretrain, 1, "finetune.peft=adapter",
                                                               "train.batch_size=8")), str(adapter))
  with pytest.raises(ConfigError, match="^bottleneck adapters have no Hugging Face counterpart") as e:
    interop.export(str(adapter), str(tmp_path / "hf"))
  assert "\n" not in str(e.value)
  _each_refused_leaving_no_trace(tmp_path, pretrain, [
      ([f"data.files={tmp_path / 'train.jsonl'}", f"init_from={adapter}"],
       r"^init_from=.*adapter was fine-tuned with finetune.peft=adapter, whose adapters fold into no weight")])


def test_a_config_is_left_as_given_and_a_stopped_start_lets_the_workdir_go(tmp_path, tmp_path_factory, monkeypatch):
  """From a notebook: the config given runs again as it was (init_from's shape and tokenizer are adopted into the
  run's own copy), and a start stopped once it holds the workdir leaves no lock with the exception kept."""
  from fmjax import checkpoint as ckpt_lib
  pretrain, _ = make_workdir(tmp_path_factory, "gpt")
  write_jsonl(tmp_path / "train.jsonl", n=40)
  config = config_lib.load_config("configs/sft.py", [
      f"init_from={pretrain}", f"data.files={tmp_path / 'train.jsonl'}", "data.seq_len=32", "train.batch_size=8",
      "train.steps=1", "train.eval_every=1", "train.progress_bar=false", "checkpoint.async_save=false"])
  given = config_lib.to_dict(config)
  assert sft.run(config, str(tmp_path / "first"))["step"] == 1
  assert config_lib.to_dict(config) == given

  def ctrl_c(*args):
    raise KeyboardInterrupt
  monkeypatch.setattr(ckpt_lib.Checkpointer, "of_run", ctrl_c)  # Ctrl-C while the checkpoints open
  with pytest.raises(KeyboardInterrupt) as kept:
    sft.run(config, str(tmp_path / "second"))
  ckpt_lib.lock_workdir(str(tmp_path / "second")).release()  # refused while the lock is held
  assert kept.value is not None


# ----------------------------------------------------------------------------- conversations


TWO_TURNS = [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4."},
             {"role": "user", "content": "And 3 plus 3?"}, {"role": "assistant", "content": "6."}]


def test_a_conversation_trains_on_each_assistant_turn_and_its_end_token_by_token(chat_tokenizer_dirs):
  """ChatML: weight 1 on what the assistant writes (its text and <|im_end|>), 0 on the system and user messages and
  every role header, for both turns in one row; the packed row's weights are those of the targets."""
  tok = data.load_hf(str(chat_tokenizer_dirs["chatml"]))
  # The rendered conversation piece by piece, each with the weight its tokens must carry.
  pieces = [("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n", 0),
            ("What is 2 plus 2?", 0), ("<|im_end|>\n<|im_start|>assistant\n", 0), ("4.", 1), ("<|im_end|>", 1),
            ("\n<|im_start|>user\n", 0), ("And 3 plus 3?", 0), ("<|im_end|>\n<|im_start|>assistant\n", 0),
            ("6.", 1), ("<|im_end|>", 1), ("\n", 0)]
  want_ids, want_trained = [], []
  for text, weight in pieces:
    ids = tok.hf.encode(text, add_special_tokens=False).ids
    want_ids += ids
    want_trained += [weight] * len(ids)
  ids, trained = sft.encode_conversation(tok, sft.Conversation(tuple(TWO_TURNS)), tok.chat_template)
  assert ids == want_ids
  assert trained == want_trained, [(tok.decode([i]), w) for i, w in zip(ids, trained)]
  n = len(ids) - 1
  rows = sft.pack_rows([(ids, trained)], n + 8)
  np.testing.assert_array_equal(rows["targets"][0, :n], ids[1:])
  np.testing.assert_array_equal(rows["loss_weights"][0, :n], trained[1:])
  assert rows["loss_weights"][0, n:].sum() == 0


def test_a_file_may_mix_conversations_with_prompt_completion_rows(tmp_path, chat_tokenizer_dirs):
  tok = data.load_hf(str(chat_tokenizer_dirs["llama3"]))
  path = tmp_path / "mixed.jsonl"
  path.write_text(json.dumps({"prompt": "2 plus 2 is", "completion": " 4."}) + "\n"
                  + json.dumps({"messages": TWO_TURNS, "id": 7}) + "\n"
                  # A completion makes a row a pair, as it was before conversations, whatever else it holds.
                  + json.dumps({"prompt": "3 plus 3 is", "completion": " 6.", "messages": "metadata"}) + "\n")
  rows = sft.read_examples(str(path))
  assert rows == [("2 plus 2 is", " 4."), sft.Conversation(tuple(TWO_TURNS)), ("3 plus 3 is", " 6.")]
  assert rows[1].where == f"{path}:2"
  config = config_lib.load_config("configs/sft.py", [f"data.files={path}", "sft.eval_percent=0", "data.seq_len=64",
                                                     "sft.pack=false"])
  packed = sft.load_rows(config, tok)["train"]
  trained = [tok.decode(r[w > 0]) for r, w in zip(packed["targets"], packed["loss_weights"])]
  assert trained == [" 4.<|end_of_text|>", "4.<|eot_id|>6.<|eot_id|>", " 6.<|end_of_text|>"]
  # A tokenizer without a template takes the built-in one, and keeps it: the run's saved tokenizer chats so.
  plain = data.Tokenizer(tok.hf, "hf")
  assert plain.chat_template is None
  sft.load_rows(config, plain)
  assert plain.chat_template == chat.BUILTIN_TEMPLATE


def test_malformed_conversations_and_templates_are_one_line_naming_the_file_and_line(tmp_path, chat_tokenizer_dirs):
  tok = data.load_hf(str(chat_tokenizer_dirs["chatml"]))
  path = tmp_path / "chat.jsonl"
  good = json.dumps({"messages": TWO_TURNS})
  for messages, said in (
      ("hello", r"'messages' holds a JSON str, not a list of messages"),
      ([], r"'messages' holds an empty list, not a list of messages"),
      ([{"role": "user", "content": "hi"}, "hello"],
       r"'messages' has message 1 as a JSON str, not an object with a role and a content"),
      ([{"role": "tool", "content": "{}"}], r"'messages' has message 0 of role 'tool'; the roles are system, user, "
                                            r"assistant"),
      ([{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "hello"}],
       r"'messages' has message 0 whose content is \[\"hi\"\], not text"),
      ([{"role": "user", "content": "hi"}], r"'messages' has no assistant message, so nothing to learn")):
    path.write_text(good + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:2 {said}; fix the row or remove it") as e:
      sft.read_examples(str(path))
    assert "\n" not in str(e.value)
  # The template refuses a conversation (as Llama 2's refuses roles out of turn): that row, in one line.
  path.write_text(good + "\n" + good + "\n")
  refusing = "{% for m in messages %}{% if loop.index0 == 1 %}{{ raise_exception('roles must alternate') }}" \
             "{% endif %}{{ m['content'] }}{% endfor %}"
  config = config_lib.load_config("configs/sft.py", [f"data.files={path}", "sft.eval_percent=0"])
  tok.chat_template = refusing
  with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:1: the chat template refuses the conversation: "
                                        r"roles must alternate$"):
    sft.load_rows(config, tok)
  for spec, said in (("{% for m in messages %}", r"^the chat template does not parse \(.*\); fix it, or set "
                                                  r"sft.chat_template to one that does$"),
                     (str(tmp_path / "nowhere.jinja"), r"^sft.chat_template='.*nowhere.jinja' is neither a Jinja "
                                                       r"template .* nor a file"),
                     (str(tmp_path), r"^sft.chat_template='.*' is a directory without a chat template")):
    with pytest.raises(ConfigError, match=said):
      chat.read_template(spec)
  # A template that writes a message other than as it is (here upper-cased) leaves no way to find the messages.
  tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
  with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:1: the chat template changes a message's text "
                                        r"other than by trimming it"):
    sft.load_rows(config, tok)


def _conversations(path, n, seed=0):
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for _ in range(n):
      a, b = rng.integers(0, 9, size=2)
      f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                       {"role": "assistant", "content": f"{a + b}."}]}) + "\n")


def test_sft_on_conversations_learns_keeps_the_template_and_generate_chat_stops_at_the_end_of_turn(
    tmp_path, tmp_path_factory, chat_tokenizer_dirs, capsys):
  """A run whose tokenizer is a chat model's (ChatML, loaded with data.tokenizer.kind=hf): SFT on conversations
  lowers the held-out loss, its own tokenizer/ keeps the template (set here by sft.chat_template, as a file), and
  `generate --chat` asks in that template and stops at <|im_end|>, which the run learnt to write."""
  pretrain, _ = make_workdir(tmp_path_factory, "gpt", chat_tokenizer_dirs["chatml"])
  _conversations(tmp_path / "train.jsonl", 160)
  template_file = tmp_path / "chatml.jinja"
  template_file.write_text((chat_tokenizer_dirs["chatml"] / "chat_template.jinja").read_text())
  # The run's data.tokenizer.path names the chat model's directory: its template comes with the tokenizer.
  plain = config_lib.load_config("configs/sft.py", [f"init_from={pretrain}"])
  adopted = sft.adopt_tokenizer(plain, str(tmp_path / "x"), sft.adopt_shape(plain, str(tmp_path / "x")))
  assert adopted.chat_template == template_file.read_text()
  workdir = tmp_path / "sft"
  config = config_lib.load_config("configs/sft.py", [
      f"init_from={pretrain}", f"data.files={tmp_path / 'train.jsonl'}", f"sft.chat_template={template_file}",
      "data.seq_len=64", "train.batch_size=16", "train.steps=60", "train.log_every=10", "train.eval_every=10",
      "train.progress_bar=false", "optim.lr=1e-2", "optim.warmup_steps=0", "optim.schedule=constant",
      "checkpoint.async_save=false"])
  result = sft.run(config, str(workdir))
  evals = [m["eval/loss"] for m in report.read_metrics(str(workdir)) if "eval/loss" in m]
  assert len(evals) == 6 and evals[-1] < 0.7 * evals[0], evals  # 2.20 to 1.10 when written
  tok = data.get_tokenizer(interop.read_run_config(str(workdir)), str(workdir))
  assert tok.chat_template == template_file.read_text()
  assert result["eval"]["loss"] == pytest.approx(evaluate.run(str(workdir))["loss"], rel=1e-5)

  # Without stop ids the reply runs on past <|im_end|>; `--chat` cuts it there, and a prompt is the template's.
  model, run_config, _ = generate.load_run(str(workdir))
  im_end, eos = tok.hf.token_to_id("<|im_end|>"), tok.eos_id
  prompt = chat.encode_prompt(tok, "What is 3 plus 4?", tok.chat_template)
  assert tok.decode(prompt).endswith("What is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n")
  raw = generate.generate(model, [prompt], 8, temperature=0.0, max_len=64)[0]
  assert im_end in raw[:6] and eos not in raw[:raw.index(im_end)], tok.decode(raw)
  reply = generate.run(str(workdir), prompts=["What is 3 plus 4?"], max_new_tokens=8, temperature=0.0, chat=True)
  assert reply == [tok.decode(raw[:raw.index(im_end)])]
  capsys.readouterr()
  assert cli.main(["generate", f"--workdir={workdir}", "--prompt=What is 3 plus 4?", "--chat", "--temperature=0",
                   "--max_new_tokens=8"]) == 0
  assert capsys.readouterr().out.startswith(f"What is 3 plus 4?\n{reply[0]}\n----")
  # Resumed with another template, the run would train on other text than it did: refused.
  other = config_lib.load_config("configs/sft.py", [f"init_from={pretrain}", f"data.files={tmp_path / 'train.jsonl'}",
                                                    "data.seq_len=64", "sft.chat_template={{ messages }}"])
  with pytest.raises(ConfigError, match=r"^sft.chat_template='\{\{ messages \}\}' is not the chat template .* started "
                                        r"with"):
    sft.adopt_tokenizer(other, str(workdir), sft.adopt_shape(other, str(workdir)))
