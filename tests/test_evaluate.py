"""`fmjax eval`: held-out perplexity and MLM accuracy from a checkpoint, checked against a direct computation."""

import errno
import json
import os
import re
import math
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fmjax import cli, data, evaluate, files, generate, objectives
from fmjax.config_lib import ConfigError
from test_generate import make_workdir


def direct_metrics(workdir, batches):
  """Loss and accuracy summed over the first `batches` eval batches, computed without the eval step."""
  model, config, _ = generate.load_run(str(workdir))
  loader = data.make_loader(config, "eval", shuffle=False)
  loss_fn = nnx.jit(objectives.get_loss_fn(config))
  totals = np.zeros(3)
  for step in range(batches):
    batch = {k: jnp.asarray(v) for k, v in loader.host_batch(step).items()}
    _, aux = loss_fn(model, batch)
    totals += [float(aux["loss_sum"]), float(aux["weight_sum"]), float(aux["correct_sum"])]
  return totals[0] / totals[1], totals[2] / totals[1], loader.num_batches


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_eval_matches_direct_loss_and_writes_eval_json(tmp_path_factory, family, capsys):
  workdir, _ = make_workdir(tmp_path_factory, family)
  assert cli.main(["eval", f"--workdir={workdir}", "--batches=2"]) == 0
  assert "perplexity" in capsys.readouterr().out
  result = json.loads((workdir / "eval.json").read_text())
  loss, accuracy, num_batches = direct_metrics(workdir, 2)
  assert result["batches"] == 2 and result["step"] == 0 and num_batches > 2
  assert result["objective"] == {"gpt": "clm", "bert": "mlm"}[family]
  np.testing.assert_allclose(result["loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(result["accuracy"], accuracy, atol=1e-6)
  assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
  # An untrained model is close to uniform over the vocabulary.
  assert abs(result["loss"] - math.log(512)) < 0.5
  # By default the whole held-out split is scored.
  assert evaluate.run(str(workdir))["batches"] == num_batches


def test_eval_on_a_run_it_cannot_write_prints_its_metrics_and_says_so(tmp_path_factory, monkeypatch, capsys):
  workdir, _ = make_workdir(tmp_path_factory, "gpt")

  real = files.write_json

  def read_only(path, *args, **kwargs):
    if path.startswith(str(workdir)):
      raise OSError(errno.EROFS, "Read-only file system", path)
    return real(path, *args, **kwargs)

  monkeypatch.setattr("fmjax.files.write_json", read_only)
  assert cli.main(["eval", f"--workdir={workdir}", "--batches=1"]) == 0
  out, err = capsys.readouterr()
  assert "perplexity" in out
  assert err.strip() == f"warning: could not write {workdir}/eval.json (Read-only file system); the metrics are " \
                        "on stdout only"


def test_a_run_config_missing_an_architecture_key_is_one_line(tmp_path_factory, tmp_path, capsys):
  workdir, _ = make_workdir(tmp_path_factory, "gpt")
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  saved = json.loads((copy / "config.json").read_text())
  del saved["model"]["d_ff"]
  (copy / "config.json").write_text(json.dumps(saved))
  for argv in (["eval", f"--workdir={copy}"], ["export", f"--workdir={copy}", f"--out={tmp_path / 'hf'}"]):
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"error: {copy}/config.json has no model.d_ff: it is damaged or not " \
                                              "an fmjax run's; copy it again from where the run was made"


def test_a_hand_edited_run_config_is_one_line_for_every_reader(tmp_path_factory, tmp_path, capsys):
  """`"dtype": "fp16"` or `"batch_size": 0` in config.json ended eval and generate in a traceback."""
  workdir, _ = make_workdir(tmp_path_factory, "gpt")
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  saved = json.loads((copy / "config.json").read_text())
  for section, key, value, says in (("model", "dtype", "fp16", "model.dtype='fp16' is not one of"),
                                    ("train", "batch_size", 0, "train.batch_size=0 and data.seq_len")):
    (copy / "config.json").write_text(json.dumps({**saved, section: {**saved[section], key: value}}))
    for argv in (["eval", f"--workdir={copy}", "--batches=1"], ["generate", f"--workdir={copy}", "--prompt=hi"],
                 ["export", f"--workdir={copy}", f"--out={tmp_path / 'hf'}"]):
      assert cli.main(argv) == 2, argv
      err = capsys.readouterr().err
      assert err.startswith(f"error: {copy}/config.json is damaged or hand-edited (copy it again from where the run "
                            f"was made): {says}") and err.count("\n") == 1, (argv, err)
  assert not (tmp_path / "hf").exists()


def test_eval_rejects_what_it_cannot_score(tmp_path):
  with pytest.raises(ConfigError, match="has no config.json"):
    evaluate.run(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"name": "x"}))
  with pytest.raises(ConfigError, match="is not an fmjax run"):
    evaluate.run(str(tmp_path))


def test_eval_scores_other_text_with_config_data_overrides(tmp_path_factory, tmp_path, capsys):
  """A run whose corpus files moved (or another corpus) is scored with --config.data.*, with the
  run's own tokenizer: the moved files score exactly as they did in place."""
  import shutil
  workdir, config = make_workdir(tmp_path_factory, "gpt")
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  corpus = os.path.dirname(config.data.files.split(",")[0])
  shutil.copytree(corpus, tmp_path / "moved")
  saved = json.loads((run / "config.json").read_text())
  saved["data"]["files"] = "/no/longer/here/*.txt"
  (run / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ConfigError, match="matches no file text_files reads"):
    evaluate.run(str(run), batches=2)
  moved = evaluate.run(str(run), batches=2, data_overrides=[f"data.files={tmp_path}/moved/*.txt"])
  assert moved["loss"] == evaluate.run(str(workdir), batches=2)["loss"]
  assert moved["data_overrides"] == [f"data.files={tmp_path}/moved/*.txt"] and (run / "eval_data.json").exists()
  # Another corpus: the offline fmjax_corpus's held-out split.
  assert cli.main(["eval", f"--workdir={run}", "--batches=1", "--config.data.dataset=fmjax_corpus"]) == 0
  assert "dataset fmjax_corpus" in capsys.readouterr().out
  # Only the data may change.
  for bad, match in ((["--config.model.num_layers=1"], "takes --config.data.\\* overrides only"),
                     (["--config.data.tokenizer.kind=bpe"], "takes --config.data.\\* overrides only"),
                     (["--config.data.files=x", "--task=continuation"], "not --task"),
                     ([f"--config.data.seq_len={2 * config.data.seq_len}"], "longer than the rows"),
                     (["--config.data.shard_docs=0"], "data.shard_docs=0 must be at least 1")):
    assert cli.main(["eval", f"--workdir={run}", *bad]) == 2
    assert re.search(match, capsys.readouterr().err), bad


def test_eval_of_data_files_scores_those_files_for_a_run_of_another_corpus(tmp_path_factory, tmp_path, capsys):
  """README: `fmjax eval --config.data.files=...` scores those files with the run's tokenizer, also for a
  run trained on another dataset (it used to score that dataset again, quietly, under data.files)."""
  workdir, config = make_workdir(tmp_path_factory, "gpt")
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  data.save_run_tokenizer(data.get_tokenizer(config), str(run))
  saved = json.loads((run / "config.json").read_text())
  saved["data"].update(dataset="fmjax_corpus", files="")
  (run / "config.json").write_text(json.dumps(saved))
  assert cli.main(["eval", f"--workdir={run}", "--batches=1", f"--config.data.files={config.data.files}"]) == 0
  assert "dataset text_files" in capsys.readouterr().out
  result = json.loads((run / "eval_data.json").read_text())
  assert result["loss"] == evaluate.run(str(workdir), batches=1)["loss"]


def test_scoring_another_corpus_tokenises_its_held_out_split_only(tmp_path_factory, tmp_path):
  """`fmjax eval --config.data.dataset=c4/en:3.1.0` scores C4's validation split: its train split
  (hundreds of millions of documents) is never tokenised for it, in a mixture's items neither, and
  the figures keep the names of the datasets as given."""
  workdir, config = make_workdir(tmp_path_factory, "gpt")
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  data.save_run_tokenizer(data.get_tokenizer(config), str(run))
  saved = json.loads((run / "config.json").read_text())
  saved["data"]["cache_dir"] = str(tmp_path / "cache")  # nothing prepared there yet
  (run / "config.json").write_text(json.dumps(saved))

  def entries():
    root = tmp_path / "cache" / "datasets"
    for name in sorted(os.listdir(root)):
      meta = root / name / "meta.json"
      if meta.exists() and "mixture" not in json.loads(meta.read_text()):
        yield name, {k: s["num_docs"] for k, s in json.loads(meta.read_text())["splits"].items()}

  alone = evaluate.run(str(run), batches=1, data_overrides=["data.dataset=fmjax_corpus"])
  ((name, docs),) = entries()
  assert name.startswith("fmjax_corpus-") and docs["train"] == docs["eval"] < 100, docs  # 312 in its train split
  three = "fmjax_corpus=1,text_files=1,text_files(train_split=train)=1"  # the last two named by their whole items
  mixed = evaluate.run(str(run), batches=1, data_overrides=[f"data.dataset={three}"])
  assert len(list(entries())) == 2 and all(docs["train"] == docs["eval"] for _, docs in entries())
  assert mixed["fmjax_corpus_loss"] == alone["loss"]
  assert mixed["text_files_train_split_train_loss"] == mixed["text_files_loss"]  # the same held-out rows


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_a_run_with_grad_accum_is_scored_in_its_micro_batches(tmp_path_factory, tmp_path, family, monkeypatch):
  """A run that needed train.grad_accum (a whole batch did not fit) is scored as many rows at once as it
  trained on: `fmjax eval` ran whole batches before, which could run out of memory. The figures are the
  same, and --batches still counts batches of train.batch_size rows."""
  from fmjax import train
  workdir, _ = make_workdir(tmp_path_factory, family)
  accumulated = tmp_path / "accum"
  shutil.copytree(workdir, accumulated, ignore=shutil.ignore_patterns("eval*.json"))
  saved = json.loads((accumulated / "config.json").read_text())
  batch_size = saved["train"]["batch_size"]
  saved["train"]["grad_accum"] = 2
  (accumulated / "config.json").write_text(json.dumps(saved))
  seen = []
  real = train.evaluate
  monkeypatch.setattr(train, "evaluate", lambda step, params, loader, n: seen.append(loader.batch_size) or
                      real(step, params, loader, n))
  whole, split = evaluate.run(str(workdir), batches=2), evaluate.run(str(accumulated), batches=2)
  assert seen == [batch_size, batch_size // 2]
  assert (whole["batches"], whole["batch_size"]) == (2, batch_size)
  assert (split["batches"], split["batch_size"]) == (4, batch_size // 2)
  for key in ("loss", "accuracy"):
    np.testing.assert_allclose(split[key], whole[key], rtol=1e-6, err_msg=key)
