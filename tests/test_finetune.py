"""Fine-tuning: init_from loads the trunk only (new head), resume, heads, bad checkpoints, sweep summary."""

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fmjax import (checkpoint as ckpt_lib, cli, config_lib, finetune, metrics as metrics_lib, models, report, sweep,
                   tasks)
from fmjax.config_lib import ConfigError
import fmjax.data as data

MODEL = ["model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.d_ff=64", "model.vocab_size=128",
         "model.max_len=32"]
WORDS = ("red", "green", "blue", "cat", "dog", "fish", "runs", "sleeps", "the", "a")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A BERT vocab.txt and a small JSONL task (is an animal named?), so no corpus needs preparing."""
  root = tmp_path_factory.mktemp("ft_files")
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz"]
  (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
  rng = np.random.default_rng(0)
  with open(root / "task.jsonl", "w") as f:
    for _ in range(48):
      words = rng.choice(WORDS, size=rng.integers(3, 8))
      f.write(json.dumps({"text": " ".join(words), "label": int(bool({"cat", "dog", "fish"} & set(words)))}) + "\n")
  return {"vocab": str(root / "vocab.txt"), "task": str(root / "task.jsonl"), "cache": str(root / "cache")}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, files):
  """A pretraining workdir as `fmjax train` leaves it: config.json and a params checkpoint (step 5)."""
  return _pretrain_workdir(tmp_path_factory.mktemp("pretrain"), files)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, pretrained, files):
  """A finished `fmjax finetune` workdir: 2 steps from `pretrained` (tests may rerun it, not change it)."""
  workdir = str(tmp_path_factory.mktemp("finetuned") / "ft")
  finetune.run(ft_config(files, f"init_from={pretrained}"), workdir)
  return workdir


def _pretrain_workdir(workdir, files, *overrides, spec="configs/bert.py:tiny") -> str:
  config = config_lib.load_config(spec, [
      *MODEL, "data.seq_len=16", "data.max_predictions=2", "data.tokenizer.kind=hf",
      f"data.tokenizer.path={files['vocab']}", *overrides])
  params = nnx.to_pure_dict(nnx.state(models.build_model(config.model, rngs=nnx.Rngs(params=7)), nnx.Param))
  checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  checkpointer.save(5, {"params": params}, {"config": config_lib.to_dict(config)}, force=True)
  checkpointer.close()
  config_lib.save_json(config, str(workdir / "config.json"))
  return str(workdir)


def ft_config(files, *overrides, arg="task=jsonl"):
  return config_lib.load_config(f"configs/finetune_cls.py:{arg}", [
      *MODEL, f"data.cache_dir={files['cache']}", f"task.files={files['task']}", "task.text_columns=text",
      "data.seq_len=16", "train.batch_size=8", "train.steps=2", "train.eval_every=100", "train.log_every=1",
      "train.progress_bar=false", "optim.warmup_steps=0", "checkpoint.async_save=false", *overrides])


class _Lines(logging.Handler):
  def __init__(self):
    super().__init__()
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


def _run_logged(config, workdir):
  handler = _Lines()
  metrics_lib.log.addHandler(handler)
  try:
    return finetune.run(config, workdir), "\n".join(handler.lines)
  finally:
    metrics_lib.log.removeHandler(handler)


def _params(workdir, item_tree):
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = checkpointer.latest_step()
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                          checkpointer.item_metadata(step, "params"), is_leaf=lambda x: hasattr(x, "shape"))
  params = checkpointer.restore(step, {"params": abstract}, items=("params",))["params"]
  checkpointer.close()
  return jax.tree.map(np.asarray, params)


def test_init_from_loads_trunk_only_and_resumes(pretrained, files, tmp_path):
  workdir = str(tmp_path / "ft")
  # Head-only fine-tuning: the trunk must come out of training exactly as the pretraining run saved it,
  # but for BERT's pooler, which trains with the head (masked-LM pretraining never trains it).
  config = ft_config(files, f"init_from={pretrained}", "finetune.peft=head")
  result, log = _run_logged(config, workdir)
  assert result["start"] == "init_from" and result["step"] == 2
  assert "loaded trunk embeddings" in log and "initialised: head (2 arrays" in log
  assert "not loaded: mlm_bias, mlm_ln, mlm_transform, opt_state" in log
  assert "trainable (" in log and f"{result['trainable_params']:,} of {result['total_params']:,}" in log
  pre, ft = _params(pretrained, None), _params(workdir, None)
  assert set(ft) == {"trunk", "head"} and "mlm_transform" not in ft["trunk"]
  jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in ft["trunk"].items() if k != "pooler"},
               {k: v for k, v in pre.items() if not k.startswith("mlm") and k != "pooler"})
  assert not np.array_equal(ft["trunk"]["pooler"]["kernel"], pre["pooler"]["kernel"])
  with open(os.path.join(workdir, finetune.RESULTS_FILE)) as f:
    saved = json.load(f)
  assert saved["task"] == "jsonl" and 0.0 <= saved["eval"]["accuracy"] <= 1.0
  # Rerunning with more steps resumes this workdir's own checkpoint, not init_from.
  again, log = _run_logged(ft_config(files, f"init_from={pretrained}", "finetune.peft=head", "train.steps=3"),
                           workdir)
  assert again["start"] == "init_from" and again["resumed_from"] == 2 and again["step"] == 3
  assert "Resumed from step 2" in log
  # `fmjax eval` on a fine-tuning workdir reports the task's metrics.
  from fmjax import evaluate
  metrics = evaluate.run(workdir)
  assert 0.0 <= metrics["accuracy"] <= 1.0, metrics
  # The run keeps its own tokenizer: its eval, export and release do not need init_from where it was.
  recorded = json.load(open(os.path.join(workdir, "config.json")))["data"]["tokenizer"]
  assert recorded["path"] == "tokenizer" and os.path.exists(os.path.join(workdir, "tokenizer", "tokenizer.json"))


def test_lora_from_a_scanned_pretraining_run(files, tmp_path):
  """A trunk saved with stacked layers (model.scan_layers=true, as configs/gpt.py:xl pretrains)
  loads into the unrolled layers that LoRA needs; LoRA leaves the loaded kernels as they were."""
  pretrained = _pretrain_workdir(tmp_path / "pre", files, "model.scan_layers=true")
  workdir = str(tmp_path / "ft")
  result, log = _run_logged(ft_config(files, f"init_from={pretrained}", "finetune.peft=lora"), workdir)
  assert result["start"] == "init_from" and result["step"] == 2 and "loaded trunk" in log
  pre, ft = _params(pretrained, None), _params(workdir, None)
  stacked = pre["encoder"]["blocks"]
  for i in range(2):
    layer = ft["trunk"]["encoder"]["blocks"][str(i)]
    for path, x in jax.tree_util.tree_flatten_with_path(jax.tree.map(lambda a: a[i], stacked))[0]:
      keys = [str(getattr(k, "key", k)) for k in path]
      node = layer
      for k in keys:
        node = node[k] if k in node else node["base"][k]  # a LoRA-wrapped layer keeps its kernel under base
      np.testing.assert_array_equal(node, x, err_msg=f"layer {i} {keys}")


def test_a_tokenizer_a_failed_start_left_is_replaced_by_this_starts(pretrained, files, tmp_path):
  """A start that never saved (out of memory, a NaN, a preemption while compiling) may leave its
  tokenizer behind; a new start there, from another init_from, must train with its own ids."""
  workdir = tmp_path / "ft"
  stale = data.load_hf(files["vocab"])
  stale.hf.add_tokens(["zzstale"])
  stale.save(str(workdir / "tokenizer"))
  finetune.run(ft_config(files, f"init_from={pretrained}", "train.steps=1"), str(workdir))
  assert data.load_tokenizer(str(workdir / "tokenizer")).identity() == data.load_hf(files["vocab"]).identity()


def test_init_from_step_picks_a_checkpoint_or_names_the_ones_there(pretrained, files, tmp_path):
  _, log = _run_logged(ft_config(files, f"init_from={pretrained}", "init_from_step=5", "train.steps=1"),
                       str(tmp_path / "five"))
  assert f"init_from {pretrained} step 5: loaded trunk" in log
  with pytest.raises(ConfigError, match=r"has no checkpoint at init_from_step=7; it holds steps \[5\]") as e:
    finetune.run(ft_config(files, f"init_from={pretrained}", "init_from_step=7"), str(tmp_path / "seven"))
  assert "\n" not in str(e.value)
  assert not (tmp_path / "seven").exists()  # a refused start creates nothing (no config.json, no checkpoints/)


def test_scratch_start_is_logged(files, tmp_path):
  config = ft_config(files, "train.steps=1", "data.tokenizer.kind=hf", f"data.tokenizer.path={files['vocab']}")
  result, log = _run_logged(config, str(tmp_path / "s"))
  assert result["start"] == "scratch" and "Started from scratch" in log
  assert np.isfinite(result["train"]["loss"]) and "loss" in result["eval"]


def test_preempted_finetune_saves_and_resumes_exactly(files, monkeypatch, tmp_path):
  """SIGTERM at step 2 of 4: the step-2 state is saved, no results.json claims a finished run,
  and rerunning the same command ends with the params of an uninterrupted run, bit for bit."""
  overrides = ("train.steps=4", "data.tokenizer.kind=hf", f"data.tokenizer.path={files['vocab']}")
  straight = str(tmp_path / "straight")
  finetune.run(ft_config(files, *overrides), straight)
  workdir = str(tmp_path / "preempted")
  with monkeypatch.context() as m:
    m.setattr(ckpt_lib.PreemptionWatcher, "should_stop", lambda self, step: step == 2)
    result, log = _run_logged(ft_config(files, *overrides), workdir)
  assert result["preempted"] and result["step"] == 2 and "Preempted: saving step 2" in log
  assert not os.path.exists(os.path.join(workdir, finetune.RESULTS_FILE))
  result, log = _run_logged(ft_config(files, *overrides), workdir)
  assert not result["preempted"] and result["step"] == 4 and "Resumed from step 2" in log
  assert os.path.exists(os.path.join(workdir, finetune.RESULTS_FILE))
  jax.tree.map(np.testing.assert_array_equal, _params(workdir, None), _params(straight, None))


def test_a_preempted_finetune_resumes_after_its_init_from_moved(pretrained, files, monkeypatch, tmp_path):
  """The run's checkpoint and config.json hold all it took from init_from: rerunning the same command
  resumes it (as `fmjax sft` does) also once the pretraining workdir has moved or been deleted."""
  source = str(tmp_path / "pretrain")
  shutil.copytree(pretrained, source)
  overrides = (f"init_from={source}", "train.steps=4")
  straight = str(tmp_path / "straight")
  finetune.run(ft_config(files, *overrides), straight)
  workdir = str(tmp_path / "preempted")
  with monkeypatch.context() as m:
    m.setattr(ckpt_lib.PreemptionWatcher, "should_stop", lambda self, step: step == 2)
    assert finetune.run(ft_config(files, *overrides), workdir)["preempted"]
  os.rename(source, str(tmp_path / "moved"))
  result, log = _run_logged(ft_config(files, *overrides), workdir)
  assert not result["preempted"] and result["step"] == 4 and "Resumed from step 2" in log
  assert result["start"] == "init_from" and result["init_from"] == source
  jax.tree.map(np.testing.assert_array_equal, _params(workdir, None), _params(straight, None))
  # A new run still needs its init_from.
  with pytest.raises(ConfigError, match=r"init_from='.*/pretrain' does not exist"):
    finetune.run(ft_config(files, *overrides), str(tmp_path / "new"))


def test_checkpoint_of_another_size_or_family_is_one_line(pretrained, files, tmp_path):
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"holds a bert model \(d_model=32\).*d_model=64\); set "
                                                            r"those model.\* values or use a checkpoint") as e:
    finetune.run(ft_config(files, f"init_from={pretrained}", "model.d_model=64"), str(tmp_path / "a"))
  assert "\n" not in str(e.value)
  # Another family: its own config, not model.family=..., which kept this config's objective and tokenizer
  # and failed again on them.
  other_family = (r"holds a bert model.*this config builds gpt .*; start from a bert config \(configs/bert.py for "
                  r"`fmjax train`, configs/finetune_cls.py:model=bert for `fmjax finetune`\) or use a checkpoint")
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=other_family) as e:
    finetune.run(ft_config(files, f"init_from={pretrained}", arg="task=jsonl,model=gpt"),
                 str(tmp_path / "b"))
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "a" / "checkpoints" / "2")
  # Continued pretraining checks the same, before it reads the source's tokenizer or arrays (it
  # once advised another tokenizer kind, then printed every mismatched array).
  from fmjax import train
  gpt = config_lib.load_config("configs/gpt.py:tiny", [f"init_from={pretrained}", f"data.cache_dir={files['cache']}"])
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=other_family) as e:
    train.run(gpt, str(tmp_path / "c"))
  assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "c")
  hf = tmp_path / "hf"  # what `fmjax export` or a Hugging Face download holds
  hf.mkdir()
  (hf / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
  with pytest.raises(ConfigError, match=rf"init_from={hf} is a Hugging Face model directory; import it first "
                                        rf"\(`fmjax import-hf --model_dir={hf} --workdir=W`\)"):
    finetune.run(ft_config(files, f"init_from={hf}"), str(tmp_path / "d"))


def test_a_classifier_workdir_is_no_init_from_and_a_refused_start_touches_nothing(finetuned, files, tmp_path):
  """A `fmjax finetune` workdir holds {trunk, head}, no language model: one line naming what to pass."""
  new = tmp_path / "new"
  with pytest.raises(ConfigError, match=r"init_from=.* is a `fmjax finetune` \(classifier\) workdir; pass the "
                     r"--workdir of a pretraining \(`fmjax train`\) or `fmjax sft` run") as e:
    finetune.run(ft_config(files, f"init_from={finetuned}"), str(new))
  assert "\n" not in str(e.value) and not new.exists()
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "notes.txt").write_text("mine")
  with pytest.raises(ConfigError, match="classifier"):
    finetune.run(ft_config(files, f"init_from={finetuned}"), str(existing))
  assert os.listdir(existing) == ["notes.txt"]
  from fmjax import sft  # nor is it one for SFT
  with pytest.raises(ConfigError, match=r"is a `fmjax finetune` \(classifier\) workdir"):
    sft.adopt_shape(config_lib.load_config("configs/sft.py", [f"init_from={finetuned}"]), str(new))


def test_a_damaged_init_from_refuses_the_start_before_the_workdir_is_made(pretrained, files, tmp_path):
  """The damaged step was once found after the workdir had config.json, tokenizer/, checkpoints/ and .lock."""
  damaged = tmp_path / "damaged"
  shutil.copytree(pretrained, damaged)
  # Cut short, as a partial copy leaves it: the metadata still reads, the arrays do not.
  largest = max((p for p in (damaged / "checkpoints").rglob("*") if p.is_file() and p.parent.name == "d"),
                key=lambda p: p.stat().st_size)
  os.truncate(largest, largest.stat().st_size // 2)
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "notes.txt").write_text("mine")
  for workdir in (tmp_path / "new", existing):
    with pytest.raises(ckpt_lib.CheckpointDamagedError, match=rf"^checkpoint step 5 in {damaged}/checkpoints is "
                                                              r"damaged") as e:
      finetune.run(ft_config(files, f"init_from={damaged}"), str(workdir))
    assert "\n" not in str(e.value)
  assert not (tmp_path / "new").exists() and os.listdir(existing) == ["notes.txt"]


def test_rerunning_a_finished_run_keeps_its_results(finetuned, pretrained, files):
  """The same command again makes no update: results.json keeps its train metrics and provenance."""
  path = os.path.join(finetuned, finetune.RESULTS_FILE)
  with open(path) as f:
    first = json.load(f)
  assert first["start"] == "init_from" and first["init_from"] == pretrained and first["init_from_step"] == 5
  assert first["resumed_from"] is None and np.isfinite(first["train"]["loss"])
  again, log = _run_logged(ft_config(files, f"init_from={pretrained}"), finetuned)
  assert "Resumed from step 2" in log and again["resumed_from"] == 2
  with open(path) as f:
    rewritten = json.load(f)
  for key in ("train", "start", "init_from", "init_from_step", "step", "task"):
    assert rewritten[key] == first[key], key
  assert rewritten["eval"] == pytest.approx(first["eval"])


def test_eval_of_a_finetune_workdir_names_its_splits_and_honours_batches(finetuned):
  from fmjax import evaluate
  with pytest.raises(ConfigError, match=r"has no split 'test'; pass --split= one of \['train', 'validation'\]") as e:
    evaluate.run(finetuned, split="test")
  assert "\n" not in str(e.value) and not os.path.exists(os.path.join(finetuned, "eval_test.json"))
  full, two = evaluate.run(finetuned, split="train"), evaluate.run(finetuned, split="train", batches=2)
  assert two["batches"] == 2 and two["examples"] == 16  # train.batch_size=8
  assert full["examples"] > 16 and full["batches"] == -(-full["examples"] // 8)
  assert evaluate.run(finetuned, batches=100)["examples"] == evaluate.run(finetuned)["examples"]
  with pytest.raises(ConfigError, match="--batches must be at least 1"):
    evaluate.run(finetuned, batches=0)


def test_a_finetune_with_grad_accum_is_scored_in_its_micro_batches(finetuned, tmp_path, monkeypatch):
  """Examples go through as many at once as training's micro-batches (a run that needed grad_accum
  ran out of memory on whole ones), with the same metrics; --batches counts train.batch_size examples."""
  from fmjax import evaluate
  accumulated = tmp_path / "accum"
  shutil.copytree(finetuned, accumulated, ignore=shutil.ignore_patterns("eval*.json"))
  saved = json.loads((accumulated / "config.json").read_text())
  saved["train"]["grad_accum"] = 2
  (accumulated / "config.json").write_text(json.dumps(saved))
  seen, real = [], finetune.predict_all
  monkeypatch.setattr(finetune, "predict_all", lambda predict, params, rows, batch_size, sharding:
                      seen.append(batch_size) or real(predict, params, rows, batch_size, sharding))
  whole, split = evaluate.run(finetuned, batches=2), evaluate.run(str(accumulated), batches=2)
  assert seen == [8, 4] and whole["examples"] == split["examples"]
  for key in ("accuracy", "loss"):
    assert split[key] == pytest.approx(whole[key], rel=1e-6), key


def test_eval_of_a_finetune_run_whose_task_files_moved_takes_where_they_are_now(finetuned, files, tmp_path):
  from fmjax import evaluate
  want = evaluate.run(finetuned)
  moved = tmp_path / "moved"
  shutil.copytree(finetuned, moved)
  saved = json.loads((moved / "config.json").read_text())
  saved["task"]["files"] = str(tmp_path / "gone.jsonl")
  (moved / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ConfigError, match="matches no file; .*`fmjax eval` of a run whose files moved takes "
                                        "--config.task.files too"):
    evaluate.run(str(moved))
  got = evaluate.run(str(moved), data_overrides=[f"task.files={files['task']}"])
  assert got["accuracy"] == want["accuracy"] and got["loss"] == pytest.approx(want["loss"])
  assert got["data_overrides"] == [f"task.files={files['task']}"] and (moved / "eval.json").exists()
  with pytest.raises(ConfigError, match="is a fine-tuning run, scored on its own data; it takes --config.task.files "
                                        "/ --config.task.validation_files .*not --config.data.files"):
    evaluate.run(str(moved), data_overrides=["data.files=x.txt"])


def test_regression_reports_no_accuracy(files, tmp_path):
  rng = np.random.default_rng(1)
  path = tmp_path / "scores.jsonl"
  path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS, size=4)), "label": round(float(x), 2)}) + "\n"
                          for x in rng.uniform(0, 5, size=40)))
  workdir = str(tmp_path / "reg")
  result = finetune.run(ft_config(files, f"task.files={path}", "task.num_classes=0", "train.steps=1",
                                  "data.tokenizer.kind=hf", f"data.tokenizer.path={files['vocab']}"), workdir)
  assert "loss" in result["train"] and "accuracy" not in result["train"]
  assert set(result["eval"]) == {"pearson", "spearman", "loss"}
  logged = report.read_metrics(workdir)
  assert any("train/loss" in m for m in logged) and not any("train/accuracy" in m for m in logged)
  from fmjax import evaluate, interop
  assert "accuracy" not in evaluate.run(workdir)
  # Exported, it is a Hugging Face regression head (mean squared error), not a one-class classifier.
  with open(os.path.join(interop.export(workdir, str(tmp_path / "hf")), "config.json")) as f:
    hf = json.load(f)
  assert hf["problem_type"] == "regression" and hf["id2label"] == {"0": "LABEL_0"}


def test_a_gpt_classifier_has_no_head_bias_and_exports(files, tmp_path):
  """Hugging Face's GPT2ForSequenceClassification `score` has no bias: nor has fmjax's GPT head (by default)."""
  pytest.importorskip("safetensors")
  from fmjax import interop
  named = tmp_path / "named.jsonl"  # the task's labels as words: the export names its classes by them
  with open(files["task"]) as f, open(named, "w") as out:
    for line in f:
      record = json.loads(line)
      out.write(json.dumps({**record, "label": ["other", "animal"][record["label"]]}) + "\n")
  config = ft_config(files, "train.steps=1", "data.tokenizer.kind=hf", f"data.tokenizer.path={files['vocab']}",
                     f"task.files={named}", arg="task=jsonl,model=gpt")
  assert config.finetune.head_bias is False and ft_config(files).finetune.head_bias is True  # BERT keeps its bias
  workdir = str(tmp_path / "gpt")
  assert finetune.run(config, workdir)["label_names"] == ["animal", "other"]
  assert set(_params(workdir, None)["head"]) == {"kernel"}
  out = interop.export(workdir, str(tmp_path / "hf"))
  with open(os.path.join(out, "config.json")) as f:
    hf = json.load(f)
  assert hf["architectures"] == ["GPT2ForSequenceClassification"]
  assert hf["id2label"] == {"0": "animal", "1": "other"} and hf["label2id"] == {"animal": 0, "other": 1}
  assert "problem_type" not in hf
  assert os.stat(os.path.join(out, "model.safetensors")).st_mode & 0o777 == 0o644
  with open(os.path.join(out, "tokenizer_config.json")) as f:  # HF truncates where fine-tuning did
    assert json.load(f)["model_max_length"] == config.data.seq_len < config.model.max_len
  # A BERT head without a bias exports with a zero one (its logits unchanged).
  workdir = str(tmp_path / "bert")
  finetune.run(ft_config(files, "train.steps=1", "finetune.head_bias=false", "data.tokenizer.kind=hf",
                         f"data.tokenizer.path={files['vocab']}"), workdir)
  assert set(_params(workdir, None)["head"]) == {"kernel"}
  out = interop.export(workdir, str(tmp_path / "hf_bert"))
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["architectures"] == ["BertForSequenceClassification"]  # no MLM head in its weights


def test_cli_finetune_errors_in_one_line(tmp_path, capsys):
  code = cli.main(["finetune", "--config=configs/finetune_cls.py:task=nope", f"--workdir={tmp_path}"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and err.startswith("error: task.name='nope' is not one of") and "\n" not in err


def test_a_llama_trunk_of_any_size_has_its_classifier_config():
  """`configs/gpt.py:small,llama` has a SwiGLU of width 2048 where GPT-2 small's MLP is 3072: a classifier config
  built without the llama arg is refused by init_from's shape check; with it, the shapes and choices match."""
  src = config_lib.load_config("configs/gpt.py:small,llama", [])
  ft = config_lib.load_config("configs/finetune_cls.py:task=pydoc_family,model=gpt,size=small,llama", [])
  ckpt_lib.check_same_model({"model": src.model.to_dict()}, ft.model, "W")  # raises on another shape
  assert ft.model.d_ff == src.model.d_ff == 2048 and (ft.model.mlp, ft.model.norm) == ("swiglu", "rmsnorm")
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"d_ff=2048"):
    ckpt_lib.check_same_model({"model": src.model.to_dict()},
                              config_lib.load_config("configs/finetune_cls.py:model=gpt,size=small", []).model, "W")
  with pytest.raises(ConfigError, match="give it with model=gpt"):
    config_lib.load_config("configs/finetune_cls.py:task=pydoc_family,llama", [])


def test_encode_sentence_pairs():
  class Tok:
    cls_id, sep_id, eos_id, pad_id, bos_id, frames_documents = 2, 3, 7, 0, 7, False

    def encode_batch(self, texts):
      return [[10 + len(w) for w in t.split()] for t in texts]

  rows = finetune.encode([(("a bb ccc", "dddd"), 1.0)], Tok(), "bert", 6)
  # [CLS] a bb [SEP] dddd [SEP]: the longer text lost its last token to fit 6.
  np.testing.assert_array_equal(rows["inputs"][0], [2, 11, 12, 3, 14, 3])
  np.testing.assert_array_equal(rows["token_types"][0], [0, 0, 0, 0, 1, 1])
  np.testing.assert_array_equal(rows["segment_ids"][0], [1, 1, 1, 1, 1, 1])
  gpt = finetune.encode([(("a bb",), 0.0)], Tok(), "gpt", 5)
  np.testing.assert_array_equal(gpt["inputs"][0], [11, 12, 7, 0, 0])
  framed = Tok()
  framed.bos_id, framed.frames_documents = 1, True  # Llama's <s> ... </s>: the row opens with <s>, as HF's does
  gpt = finetune.encode([(("a bb", "ccc"), 0.0)], framed, "gpt", 8)
  np.testing.assert_array_equal(gpt["inputs"][0], [1, 11, 12, 7, 13, 7, 0, 0])


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_pair_truncation_matches_the_exported_tokenizer(files, tmp_path, family):
  """A pair that doesn't fit keeps the tokens HF's `longest_first` keeps: with both texts cut, an odd
  budget's extra token goes to the text that was longer, to the second when they were equal."""
  transformers = pytest.importorskip("transformers")
  from fmjax import interop
  from fmjax.data import tokenizers as tok_lib
  if family == "bert":
    tok = tok_lib.load_hf(files["vocab"])  # one token a word
  else:
    rng = np.random.default_rng(3)
    tok = tok_lib.train([" ".join(rng.choice(WORDS, size=8)) for _ in range(200)], "bpe", 300, "clm")
  model_cfg = config_lib.base_config(family).model
  rng = np.random.default_rng(0)
  # (words in a, words in b): neither, the first, the second, or both too long; equal lengths too.
  lengths = [(3, 4), (14, 2), (2, 14), (5, 9), (9, 5), (8, 7), (7, 8), (8, 8), (12, 12)]
  pairs = [(" ".join(rng.choice(WORDS, na)), " ".join(rng.choice(WORDS, nb))) for na, nb in lengths]
  for seq_len in (12, 13):  # BERT's budget for the texts is seq_len - 3, GPT's seq_len - 2: odd and even both
    out = str(tmp_path / str(seq_len))
    os.makedirs(out)
    interop._export_tokenizer(tok, model_cfg, out, classifier=True, max_length=seq_len)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    rows = finetune.encode([(p, 0.0) for p in pairs], tok, family, seq_len)
    for r, (a, b) in enumerate(pairs):
      theirs = hf_tok(a, b, truncation=True)
      real = rows["segment_ids"][r] == 1
      lengths = (seq_len, len(tok.encode(a)), len(tok.encode(b)))
      assert rows["inputs"][r][real].tolist() == theirs["input_ids"], lengths
      if family == "bert":
        assert rows["token_types"][r][real].tolist() == theirs["token_type_ids"]


def test_gpt_head_pools_the_last_real_token(files):
  config = ft_config(files, "model.dropout=0.0", arg="task=jsonl,model=gpt")
  graphdef, params = nnx.split(finetune.model_factory(config, 4)())

  @jax.jit
  def run(tokens, seg):
    model = nnx.merge(graphdef, params)
    return model(tokens, segment_ids_BT=seg), model.head(model.trunk.hidden(tokens, segment_ids_BT=seg))

  tokens = jnp.array([[5, 6, 7, 8, 0, 0], [5, 6, 7, 8, 9, 10]], jnp.int32)
  seg = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
  base, per_token_BTC = map(np.asarray, run(tokens, seg))
  np.testing.assert_allclose(base[0], per_token_BTC[0, 3], atol=1e-5)  # row 0's last real token is at 3
  np.testing.assert_allclose(base[1], per_token_BTC[1, 5], atol=1e-5)
  padded = np.asarray(run(tokens.at[0, 4:].set(99), seg)[0])
  np.testing.assert_allclose(padded[0], base[0], atol=1e-6)  # pad tokens never reach the head


@pytest.mark.parametrize("arg,pooling", [("task=jsonl", "cls"), ("task=jsonl", "mean"), ("task=jsonl,model=gpt", "auto")])
def test_a_left_padded_row_gives_the_logits_of_its_right_padded_twin(files, arg, pooling):
  """Direct callers may pad either side (a Hugging Face tokenizer with padding_side="left"):
  positions start at the first real token and [CLS] / the last token are found, not assumed."""
  config = ft_config(files, "model.dropout=0.0", "model.attention_dropout=0.0", f"finetune.pooling={pooling}",
                     arg=arg)
  model = finetune.model_factory(config, 3)()
  model.head.kernel[...] = model.head.kernel[...] * 100  # logits of order 1, so a wrong token shows
  run = nnx.jit(lambda m, t, types, seg: m(t, token_types_BT=types, segment_ids_BT=seg))
  tokens = np.array([[2, 6, 7, 3, 8, 3, 0, 0, 0], [2, 6, 7, 8, 9, 10, 11, 3, 0]], np.int32)
  types = np.array([[0, 0, 0, 0, 1, 1, 0, 0, 0], [0] * 9], np.int32)
  seg = (np.arange(9) < np.array([[6], [8]])).astype(np.int32)
  left = lambda a: np.stack([np.roll(row, int((s == 0).sum())) for row, s in zip(a, seg)])
  right_BC = np.asarray(run(model, tokens, types, seg))
  left_BC = np.asarray(run(model, left(tokens), left(types), left(seg)))
  np.testing.assert_allclose(left_BC, right_BC, atol=1e-4)
  assert not np.allclose(right_BC[0], right_BC[1], atol=1e-2)  # the rows differ: not a constant head
  unpadded = np.asarray(run(model, tokens[1:, :8], types[1:, :8], None))  # no segment ids: no padding
  np.testing.assert_allclose(unpadded[0], right_BC[1], atol=1e-4)


def test_mean_pooling_averages_real_tokens_and_drops_the_pooler(files):
  config = ft_config(files, "model.dropout=0.0", "finetune.pooling=mean")
  model = finetune.model_factory(config, 3)()
  assert not hasattr(model.trunk, "pooler")  # unused by mean pooling, so neither loaded nor trained
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(tokens, seg):
    model = nnx.merge(graphdef, params)
    return model(tokens, segment_ids_BT=seg), model.trunk.hidden(tokens, segment_ids_BT=seg)

  tokens = jnp.array([[2, 6, 7, 3, 0, 0], [2, 6, 7, 8, 9, 3]], jnp.int32)
  seg = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
  got_BC, h_BTD = map(np.asarray, run(tokens, seg))
  want_BD = np.stack([h_BTD[0, :4].mean(0), h_BTD[1].mean(0)])
  head = model.head
  want_BC = want_BD @ np.asarray(head.kernel[...]) + np.asarray(head.bias[...])
  np.testing.assert_allclose(got_BC, want_BC, atol=1e-5)
  # A pad token changes nothing: it is neither attended to nor averaged.
  np.testing.assert_allclose(np.asarray(run(tokens.at[0, 4:].set(9), seg)[0]), got_BC, atol=1e-6)


def test_mean_pooling_from_init_from_and_bad_pooling(pretrained, files, tmp_path):
  result, log = _run_logged(ft_config(files, f"init_from={pretrained}", "finetune.pooling=mean"),
                            str(tmp_path / "mean"))
  assert result["start"] == "init_from" and "not loaded: mlm_bias, mlm_ln, mlm_transform, pooler, opt_state" in log
  with pytest.raises(ConfigError, match=r"finetune.pooling='cls' does not apply to gpt; use one of") as e:
    finetune.run(ft_config(files, "finetune.pooling=cls", arg="task=jsonl,model=gpt"), str(tmp_path / "g"))
  assert "\n" not in str(e.value)


def test_batches_are_a_pure_function_of_seed_and_step():
  a = finetune.batch_indices(10, 4, seed=3, step=2)
  np.testing.assert_array_equal(a, finetune.batch_indices(10, 4, seed=3, step=2))
  epoch = np.concatenate([finetune.batch_indices(10, 5, seed=3, step=s) for s in range(2)])
  assert sorted(epoch) == list(range(10))  # one epoch visits every example once
  assert not np.array_equal(finetune.batch_indices(10, 5, seed=4, step=0), epoch[:5])


def test_each_epoch_is_a_new_permutation():
  n, B = 10, 4
  ids = np.concatenate([finetune.batch_indices(n, B, seed=3, step=s) for s in range(5)])  # 2 epochs of 10
  first, second = ids[:n], ids[n:]
  assert sorted(first) == sorted(second) == list(range(n))
  assert not np.array_equal(first, second)  # reshuffled, not the same order every epoch


def test_task_metrics_score_the_logits():
  logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0], [0.5, -1.0], [-2.0, 1.0]])
  labels = np.array([0.0, 0.0, 1.0, 1.0, 1.0])  # predictions 0, 1, 1, 0, 1
  task = tasks.Task("t", ("text",), 2, ("f1", "accuracy"), {}, ("equivalent", "not_equivalent"), positive=0)
  m = finetune.task_metrics(task, logits, labels)
  # F1 of class 0: tp 1 (row 0), fp 1 (row 3), fn 1 (row 1).
  assert m["f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1)) and m["accuracy"] == pytest.approx(3 / 5)
  nll = [np.log(np.exp(row).sum()) - row[int(y)] for row, y in zip(logits, labels)]
  assert m["loss"] == pytest.approx(np.mean(nll))
  reg = tasks.Task("r", ("text",), 0, ("pearson",), {})
  scores, gold = np.array([[1.0], [2.0], [4.0]]), np.array([1.5, 2.0, 3.0])
  assert finetune.task_metrics(reg, scores, gold)["loss"] == pytest.approx((0.25 + 0 + 1) / 3)


def test_sweep_summary_reports_mean_and_std_per_task(tmp_path):
  entries = sweep.product({"config": ["task=pydoc_family"]}, {"optim.lr": [1e-3, 3e-4]}, {"train.seed": [0, 1, 2]})
  runs = sweep.expand("configs/finetune_cls.py", [{"command": "finetune", **e} for e in entries])
  scores = {1e-3: [0.5, 0.6, 0.7], 3e-4: [0.2, 0.3, 0.4]}
  for run in runs:
    entry = dict(run.entry)
    acc = scores[entry["optim.lr"]][entry["train.seed"]]
    os.makedirs(tmp_path / run.name)
    with open(tmp_path / run.name / finetune.RESULTS_FILE, "w") as f:
      json.dump({"task": "pydoc_family", "main_metric": "accuracy", "eval": {"accuracy": acc, "loss": 1.0}}, f)
  summary = finetune.summarize(str(tmp_path), runs)
  assert "| pydoc_family | accuracy | optim.lr=0.001 | 3 | 60.0 ± 10.0 |" in summary["markdown"]
  assert "| pydoc_family | optim.lr=0.0003 | 3 | accuracy 30.0 ± 10.0 |" in summary["markdown"]
  assert os.path.exists(tmp_path / "finetune.md") and os.path.exists(tmp_path / "finetune.csv")


def test_sweep_summary_tunes_the_rate_per_arm(tmp_path):
  """Pretrained vs random trunk x rates x seeds: each arm is reported at its own best rate."""
  entries = sweep.product({"init_from": ["pre", ""]}, {"optim.lr": [1e-3, 3e-3]}, {"train.seed": [0, 1]})
  runs = sweep.expand("configs/finetune_cls.py", [{"command": "finetune", **e} for e in entries])
  scores = {("pre", 1e-3): 0.8, ("pre", 3e-3): 0.6, ("", 1e-3): 0.4, ("", 3e-3): 0.5}
  for run in runs:
    entry = dict(run.entry)
    acc = scores[(entry["init_from"], entry["optim.lr"])] + 0.1 * entry["train.seed"]
    os.makedirs(tmp_path / run.name)
    with open(tmp_path / run.name / finetune.RESULTS_FILE, "w") as f:
      json.dump({"task": "pydoc_family", "main_metric": "accuracy", "eval": {"accuracy": acc}}, f)
  best = finetune.summarize(str(tmp_path), runs)["markdown"].split("\n\n")[0]
  assert "| init_from=pre,optim.lr=0.001 | 2 | 85.0 ± 7.1 |" in best
  assert "| init_from=,optim.lr=0.003 | 2 | 55.0 ± 7.1 |" in best
  assert best.count("| pydoc_family |") == 2


def test_sweep_summary_keeps_apart_the_runs_of_other_config_args(tmp_path):
  """A sweep over `config` args beside the task (peft=, model=, size=) compares those runs: each is an
  arm with its own rows and best rate, never seeds of one setting. The task= part is the row's task."""
  entries = sweep.product({"config": ["task=pydoc_family,peft=head", "task=pydoc_family,peft=lora"]},
                          {"optim.lr": [1e-3, 3e-3]}, {"train.seed": [0, 1]})
  runs = sweep.expand("configs/finetune_cls.py", [{"command": "finetune", **e} for e in entries])
  scores = {("peft=head", 1e-3): 0.3, ("peft=head", 3e-3): 0.4, ("peft=lora", 1e-3): 0.8, ("peft=lora", 3e-3): 0.6}
  for run in runs:
    entry = dict(run.entry)
    acc = scores[(entry["config"].split(",")[1], entry["optim.lr"])] + 0.1 * entry["train.seed"]
    os.makedirs(tmp_path / run.name)
    with open(tmp_path / run.name / finetune.RESULTS_FILE, "w") as f:
      json.dump({"task": "pydoc_family", "main_metric": "accuracy", "eval": {"accuracy": acc}}, f)
  summary = finetune.summarize(str(tmp_path), runs)
  best = summary["markdown"].split("\n\n")[0]
  assert "| pydoc_family | accuracy | config=peft=head,optim.lr=0.003 | 2 | 45.0 ± 7.1 |" in best
  assert "| pydoc_family | accuracy | config=peft=lora,optim.lr=0.001 | 2 | 85.0 ± 7.1 |" in best
  assert best.count("| pydoc_family |") == 2 and len(summary["rows"]) == 4
  assert all(row["seeds"] == 2 for row in summary["rows"])



# ----------------------------------------------------------------------------- export parity with transformers


@nnx.jit
def _classify(model, rows):
  return model(rows["inputs"], token_types_BT=rows["token_types"], segment_ids_BT=rows["segment_ids"])


TEXTS = ["cat", "the red dog runs", "a fish sleeps", "green blue red cat dog fish runs"]
PAIRS = [("cat", "the dog runs"), ("a red fish sleeps", "fish"), ("the", "blue"), ("dog runs", "a cat sleeps")]


def _hf_parity(workdir, out):
  """Exports `workdir`; fmjax's logits of its rows equal HF's of the exported tokenizer's padded batch.

  For TEXTS and PAIRS; returns the pairs' (fmjax rows, HF encoding).
  """
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  from fmjax import data, interop
  model, config, _ = finetune.load_finetuned(workdir)
  tok = data.get_tokenizer(config)
  interop.export(workdir, out)
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  for texts in ([(t,) for t in TEXTS], PAIRS):
    rows = finetune.encode([(t, 0) for t in texts], tok, config.model.family, config.data.seq_len)
    ours = np.asarray(_classify(model, {k: jnp.asarray(rows[k]) for k in ("inputs", "token_types", "segment_ids")}))
    enc = hf_tok(*map(list, zip(*texts)), padding=True, return_tensors="pt")
    # Up to its padding, the exported tokenizer encodes as fmjax does.
    real = rows["segment_ids"][:, :enc["input_ids"].shape[1]] == 1
    np.testing.assert_array_equal(enc["attention_mask"].numpy(), real)
    np.testing.assert_array_equal(np.where(real, enc["input_ids"].numpy(), -1),
                                  np.where(real, rows["inputs"][:, :real.shape[1]], -1))
    with torch.no_grad():
      theirs = hf_model(**enc).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
  return rows, enc


def test_an_exported_gpt_classifier_gives_fmjax_logits_in_transformers(files, tmp_path):
  """Byte-level BPE pads with <eos>, which HF's last-non-pad pooling would skip: the export pads with its own id.

  The model's vocabulary has no row beyond the tokenizer's here, so the export adds one for that id.
  """
  from fmjax.data import tokenizers as tok_lib
  rng = np.random.default_rng(3)
  bpe = tok_lib.train([" ".join(rng.choice(WORDS, size=8)) for _ in range(200)], "bpe", 300, "clm")
  assert bpe.pad_id == bpe.eos_id
  bpe.save(str(tmp_path / "bpe"))
  config = ft_config(files, *MODEL[:4], f"model.vocab_size={bpe.vocab_size}", "train.steps=1",
                     "data.tokenizer.kind=hf", f"data.tokenizer.path={tmp_path / 'bpe' / 'tokenizer.json'}",
                     arg="task=jsonl,model=gpt")
  finetune.run(config, str(tmp_path / "ft"))
  _hf_parity(str(tmp_path / "ft"), str(tmp_path / "hf"))
  with open(tmp_path / "hf" / "config.json") as f:
    hf = json.load(f)
  assert hf["pad_token_id"] == bpe.vocab_size != hf["eos_token_id"] and hf["vocab_size"] == bpe.vocab_size + 1


def test_an_exported_bert_classifier_returns_token_types_and_fmjax_logits_for_pairs(finetuned, tmp_path):
  rows, enc = _hf_parity(finetuned, str(tmp_path / "hf"))
  types = enc["token_type_ids"].numpy()
  assert types.max() == 1
  np.testing.assert_array_equal(types, rows["token_types"][:, :types.shape[1]])


def test_an_mnli_run_scores_both_dev_sets(files, tmp_path, tfds_online):
  """MNLI-m and -mm are one model's two numbers (as in BERT's table), not two fine-tunings."""
  tfds = pytest.importorskip("tensorflow_datasets")
  config = ft_config(files, "train.steps=1", "data.tokenizer.kind=hf", f"data.tokenizer.path={files['vocab']}",
                     arg="task=glue/mnli")
  with tfds.testing.mock_data(num_examples=8):
    result = finetune.run(config, str(tmp_path / "mnli"))
  assert set(result["eval"]) == {"accuracy", "accuracy_mismatched", "loss"}
  assert 0.0 <= result["eval"]["accuracy_mismatched"] <= 1.0


def test_a_start_stopped_once_it_holds_the_workdir_lets_the_workdir_go(pretrained, files, tmp_path, monkeypatch):
  """A notebook keeps the last exception, and with it the frames of the start it stopped: the workdir's
  lock must not stay held by them, or this process's next run there is refused as another process's."""
  def ctrl_c(*args):
    raise KeyboardInterrupt
  monkeypatch.setattr(ckpt_lib.Checkpointer, "of_run", ctrl_c)  # Ctrl-C while the checkpoints open
  with pytest.raises(KeyboardInterrupt) as kept:
    finetune.run(ft_config(files, f"init_from={pretrained}"), str(tmp_path / "ft"))
  ckpt_lib.lock_workdir(str(tmp_path / "ft")).release()  # refused while the lock is held
  assert kept.value is not None


def test_a_classifier_from_a_llama_trunk_takes_its_architecture(files, tmp_path):
  """A Llama trunk (rotary positions, RMSNorm, SwiGLU, one key/value head, no biases, an untied head) loads into
  a classifier whose config names none of those: they come from init_from, as its sizes must match."""
  pretrained = _pretrain_workdir(tmp_path / "pre", files, "model.num_kv_heads=1", spec="configs/gpt.py:tiny,llama")
  config = ft_config(files, f"init_from={pretrained}", "finetune.peft=head", "data.tokenizer.kind=hf",
                     f"data.tokenizer.path={files['vocab']}", arg="task=jsonl,model=gpt")
  result, log = _run_logged(config, str(tmp_path / "ft"))
  assert result["start"] == "init_from" and result["step"] == 2
  assert ("settings from init_from: model.positions='rope', model.norm='rmsnorm', model.mlp='swiglu', "
          "model.num_kv_heads=1, model.use_bias=False, model.tie_embeddings=False") in log
  assert "not loaded: lm_head, opt_state" in log  # the untied output layer is the pretraining head: dropped
  pre, ft = _params(pretrained, None), _params(str(tmp_path / "ft"), None)
  assert set(ft["trunk"]) == {"wte", "h", "ln_f"} and set(ft["trunk"]["h"]["blocks"]["0"]["attn"]) == {"q", "kv", "out"}
  jax.tree.map(np.testing.assert_array_equal, ft["trunk"], {k: v for k, v in pre.items() if k != "lm_head"})
  # The source's one key/value head does not split over this config's mesh.tensor=2: one line, before any compile.
  with pytest.raises(ConfigError, match=r"^model.num_kv_heads=1 does not divide by mesh.tensor=2"):
    finetune.run(ft_config(files, f"init_from={pretrained}", "mesh.data=4", "mesh.tensor=2",
                           arg="task=jsonl,model=gpt"), str(tmp_path / "ft2"))
