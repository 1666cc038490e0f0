"""`fmjax release`: the bundle, its model card, the PII data report, checksums, and refusals.

The run is a tiny GPT workdir laid out as `fmjax train` writes it (config.json, a checkpoint,
metrics.jsonl) with random weights, over local text files in which every document holds exactly
one e-mail address and one phone number, so the PII counts are known. SFT and fine-tuning
workdirs are laid out the same way from their configs, without training.
"""

import hashlib
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fmjax import checkpoint as ckpt_lib, cli, config_lib, evaluate, finetune, generate, interop, models, optim, \
    release, sft, train
from fmjax.config_lib import ConfigError
from fmjax.data import tokenizers as tok_lib

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
STEP, BATCH, SEQ = 20, 8, 32
MODEL = ["model.vocab_size=384", "model.d_model=32", "model.num_heads=4", "model.d_ff=64", "model.max_len=64",
         "model.attention=xla"]
CARD = {"license": "apache-2.0", "intended_use": "Research on tiny language models.",
        "limitations": "Tiny and trained on very little text; it produces nonsense.",
        "use_restrictions": "Not for any decision about people.", "model_name": "tiny-gpt-test",
        "authors": ["A. Researcher", "B. Engineer"]}


def _documents():
  import pydoc_data.topics
  topics = list(pydoc_data.topics.topics.values())[:40]
  # One paragraph each: a blank line would split a document in two.
  return [f"{' '.join(t[:400].split())} Write to user{i}@example.com or call +44 20 7946 {1000 + i}."
          for i, t in enumerate(topics)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("release")
  (root / "data").mkdir()
  (root / "data" / "docs.txt").write_text("\n\n".join(_documents()))
  files = str(root / "data" / "*.txt")
  config = config_lib.load_config(os.path.join(CONFIGS, "gpt.py") + ":tiny", [
      *MODEL, "data.dataset=text_files", f"data.files={files}", f"data.seq_len={SEQ}",
      f"data.cache_dir={root / 'cache'}", "data.pii_scrub=true", f"train.batch_size={BATCH}", "train.steps=40"])
  workdir = root / "run"
  workdir.mkdir()
  config_lib.save_json(config, str(workdir / "config.json"))
  tok_lib.train(_documents(), "bpe", 300, "clm").save(str(workdir / "tokenizer"))

  rng = np.random.default_rng(0)
  abstract = nnx.to_pure_dict(nnx.state(models.abstract_model(config.model), nnx.Param))
  params = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), abstract)
  _save(workdir, config, params, STEP)
  with open(workdir / "metrics.jsonl", "w") as f:
    for row in ({"step": 10, "train/loss": 6.1}, {"step": 10, "eval/loss": 5.9, "eval/perplexity": 365.0},
                {"step": 20, "train/loss": 5.2}, {"step": 20, "eval/loss": 5.25, "eval/accuracy": 0.125}):
      f.write(json.dumps(row) + "\n")
  return workdir, config, params, files


def _save(workdir, config, params, step):
  tx = optim.make_optimizer(config)
  state = {"step": jnp.asarray(step, jnp.int32), "params": params, "opt_state": jax.jit(tx.init)(params)}
  checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), async_save=False, keep=0)
  checkpointer.save(step, state, {"config": config_lib.to_dict(config)}, force=True)
  checkpointer.close()


def _record_config(workdir, cfg):
  """A run whose config is `cfg`: in config.json and in what each of its checkpoints recorded."""
  (workdir / "config.json").write_text(json.dumps(cfg))
  for meta in workdir.glob("checkpoints/*/meta/metadata"):
    meta.write_text(json.dumps(dict(json.loads(meta.read_text()), config=cfg)))


def _card(tmp_path, files, **changes):
  card = dict(CARD, data_licenses={f"text_files:{files}": "PSF-2.0"})
  card.update(changes)
  card = {k: v for k, v in card.items() if v is not None}
  path = tmp_path / "card.json"
  path.write_text(json.dumps(card))
  return str(path)


@pytest.fixture(scope="module")
def bundle(run, tmp_path_factory):
  workdir, _, _, files = run
  tmp = tmp_path_factory.mktemp("bundle")
  out = tmp / "out"
  release.release(str(workdir), str(out), card_path=_card(tmp, files), pii_sample=5)
  return out


def test_bundle_layout_and_checksums_cover_every_file(bundle):
  for name in ("MODEL_CARD.md", "data_report.json", "SHA256SUMS", "hf/config.json", "hf/model.safetensors",
               "hf/tokenizer.json", "hf/tokenizer_config.json", "fmjax/config.json", "fmjax/metrics.jsonl",
               "fmjax/tokenizer/tokenizer.json", f"fmjax/checkpoints/{STEP}/{ckpt_lib.COMMIT_MARKER}"):
    assert (bundle / name).is_file(), name
  listed = {}
  for line in (bundle / "SHA256SUMS").read_text().splitlines():
    digest, path = line.split("  ", 1)
    listed[path] = digest
  on_disk = {os.path.relpath(os.path.join(r, f), bundle) for r, _, fs in os.walk(bundle) for f in fs}
  assert set(listed) == on_disk - {"SHA256SUMS"}
  for path, digest in listed.items():
    assert hashlib.sha256((bundle / path).read_bytes()).hexdigest() == digest, path
  assert not os.path.exists(str(bundle) + ".releasing")


def test_data_report_counts_pii_in_the_sample(bundle):
  report = json.loads((bundle / "data_report.json").read_text())
  assert report["pii_scrub"] is True
  assert report["sample"]["documents"] == 5  # --pii_sample=5 of the 30-odd training documents
  assert report["pii_counts"] == {"CARD": 0, "EMAIL": 5, "IP_ADDRESS": 0, "PHONE": 5}
  assert "scrubbing was on" in report["note"]


def test_model_card_is_filled_from_the_run_and_the_card(bundle, run):
  _, config, params, files = run
  text = (bundle / "MODEL_CARD.md").read_text()
  n = models.param_count(models.abstract_model(config.model))
  n_no_pos = models.param_count(models.abstract_model(config.model), exclude_positions=True)
  for expected in ("# tiny-gpt-test", "GPT-2-style decoder", "| Layers | 2 |", f"{n:,} ({n_no_pos:,} without",
                   f"| Steps | {STEP} (of 40 planned; the run had not finished) |",
                   f"{STEP * BATCH * SEQ:,} (steps x batch {BATCH}",
                   f"| Max sequence length | {SEQ} (trained; the position table has 64 rows, those past {SEQ} "
                   "untrained) |",
                   f"| text_files:{files} | PSF-2.0 |", "EMAIL 5", "PHONE 5", "Held-out results at step 20",
                   "| loss | 5.2500 |", "| accuracy | 0.1250 |", CARD["intended_use"], CARD["limitations"],
                   "License: apache-2.0", CARD["use_restrictions"], "| PII scrubbing | on |",
                   "## Authors\n\nA. Researcher, B. Engineer\n"):
    assert expected in text, expected
  assert "perplexity" not in text  # only the last eval row is reported


def test_bundled_checkpoint_is_a_loadable_workdir_and_hf_weights_load(bundle, run):
  _, config, params, _ = run
  model, loaded_config, tokenizer = generate.load_run(str(bundle / "fmjax"))
  assert loaded_config.data.tokenizer.kind == "hf" and tokenizer.vocab_size == 300
  np.testing.assert_array_equal(np.asarray(nnx.state(model, nnx.Param)["wte"]["embedding"][...]),
                                np.asarray(params["wte"]["embedding"]))
  hf = json.loads((bundle / "hf" / "config.json").read_text())
  assert hf["model_type"] == "gpt2" and hf["architectures"] == ["GPT2LMHeadModel"] and hf["vocab_size"] == 384
  assert hf["eos_token_id"] == tokenizer.eos_id and hf["n_positions"] == 64
  # The tokenizer truncates where training stopped: the position table's rows past it are untrained.
  assert json.loads((bundle / "hf" / "tokenizer_config.json").read_text())["model_max_length"] == SEQ


def test_release_describes_its_checkpoint_not_a_later_start(run, tmp_path, capsys):
  """A resume with other settings rewrites config.json, even one that fails before it saves: the
  card and the bundle keep what the released checkpoint recorded. An unfinished run is released
  with a warning."""
  workdir, config, _, files = run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  later = json.loads((copy / "config.json").read_text())
  later["optim"]["lr"], later["train"]["steps"] = 1e30, 80
  (copy / "config.json").write_text(json.dumps(later))
  assert cli.main(["release", f"--workdir={copy}", f"--out={tmp_path / 'out'}", f"--card={_card(tmp_path, files)}",
                   "--pii_sample=2"]) == 0
  assert capsys.readouterr().err.strip() == ("warning: releasing step 20 of the 40 train.steps planned: the run has "
                                             "not finished (the model card says so)")
  text = (tmp_path / "out" / "MODEL_CARD.md").read_text()
  assert f"lr {config.optim.lr}," in text and "1e+30" not in text and "of 40 planned" in text
  bundled = json.loads((tmp_path / "out" / "fmjax" / "config.json").read_text())
  assert bundled["optim"]["lr"] == config.optim.lr and bundled["train"]["steps"] == 40


def test_release_refuses_non_finite_weights_an_out_inside_the_run_and_no_pii_sample(run, tmp_path):
  workdir, config, params, files = run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  _save(copy, config, jax.tree.map(lambda x: x * jnp.nan, params), STEP + 10)  # diverged, and saved
  with open(copy / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": STEP + 10, "train/loss": float("nan")}) + "\n")
  card = _card(tmp_path, files)
  with pytest.raises(ConfigError, match=rf"checkpoint step {STEP + 10} holds non-finite parameters \(\S+\); "
                                        rf"release an earlier step with --step \(saved: {STEP}\)"):
    release.release(str(copy), str(tmp_path / "out"), card_path=card, pii_sample=2)
  assert not (tmp_path / "out").exists()
  out = release.release(str(copy), str(tmp_path / "out"), card_path=card, pii_sample=2, step=STEP)
  # Its metrics end with the released step: `fmjax report` on the bundle shows that model's losses.
  assert max(json.loads(l)["step"] for l in open(os.path.join(out, "fmjax", "metrics.jsonl"))) == STEP
  with pytest.raises(ConfigError, match="is inside the run's --workdir"):
    release.release(str(copy), str(copy / "release"), card_path=card, pii_sample=2, step=STEP)
  with pytest.raises(ConfigError, match="cannot be made: .*/metrics.jsonl is a file"):
    release.release(str(copy), str(tmp_path / "run" / "metrics.jsonl" / "out"), card_path=card, pii_sample=2)
  with pytest.raises(ConfigError, match="--pii_sample=0 must be at least 1"):
    release.release(str(copy), str(tmp_path / "out2"), card_path=card, pii_sample=0)
  assert not (copy / "release").exists() and not (tmp_path / "out2").exists()


def test_release_refuses_missing_card_fields_with_the_list(run, tmp_path, capsys):
  workdir, _, _, files = run
  card = _card(tmp_path, files, intended_use=None, limitations="", data_licenses={})
  with pytest.raises(ConfigError) as e:
    release.release(str(workdir), str(tmp_path / "out"), card_path=card)
  msg = str(e.value)
  assert msg.startswith("release refused") and "\n" not in msg
  assert "intended_use, limitations, data_licenses[" in msg and f"text_files:{files}" in msg
  assert "license," not in msg and "use_restrictions" not in msg
  assert not (tmp_path / "out").exists()

  # Without any card: every required field is listed, on one line, through the CLI.
  assert cli.main(["release", f"--workdir={workdir}", f"--out={tmp_path / 'out'}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: release refused") and "\n" not in err
  for field in release.REQUIRED_FIELDS[:-1]:
    assert field in err
  assert not (tmp_path / "out").exists()


def test_card_typo_gets_a_suggestion(run, tmp_path):
  workdir, _, _, files = run
  card = _card(tmp_path, files, licence="mit")
  with pytest.raises(ConfigError, match="unknown model card field 'licence'; did you mean 'license'"):
    release.release(str(workdir), str(tmp_path / "out"), card_path=card)
  listed = tmp_path / "list.json"
  listed.write_text('[{"license": "mit"}]')
  with pytest.raises(ConfigError, match=r"list.json holds a JSON list; it must be one object of model card fields"):
    release.release(str(workdir), str(tmp_path / "out"), card_path=str(listed))
  for field, value, want in (("license", ["mit"], 'must be a string, got \\["mit"\\]'),
                             ("use_restrictions", True, "must be a string, got true"),
                             ("authors", [1], "must be a string or a list of strings"),
                             ("data_licenses", {"x": 1}, "must be an object of source: license strings")):
    with pytest.raises(ConfigError, match=f"model card field '{field}' {want}"):
      release.release(str(workdir), str(tmp_path / "out"), card_path=_card(tmp_path, files, **{field: value}))
  assert not os.path.exists(tmp_path / "out")


def test_a_card_saved_as_utf16_is_one_line_through_the_cli(run, tmp_path, capsys):
  """PowerShell's `>` and some editors write UTF-16."""
  workdir, _, _, files = run
  card = tmp_path / "card.json"
  card.write_text(open(_card(tmp_path, files)).read(), encoding="utf-16")
  assert cli.main(["release", f"--workdir={workdir}", f"--out={tmp_path / 'out'}", f"--card={card}"]) == 2
  assert capsys.readouterr().err == f"error: --card={card} is not UTF-8 text (byte 0); save it as UTF-8\n"
  assert not os.path.exists(tmp_path / "out")


def test_release_of_imported_weights_says_the_data_is_unknown(run, tmp_path):
  workdir, _, _, _ = run
  copy = tmp_path / "imported"
  shutil.copytree(workdir, copy)
  (copy / "import.json").write_text(json.dumps({"source": "/models/gpt2", "model_type": "gpt2", "notes": []}))
  card = tmp_path / "card.json"
  card.write_text(json.dumps(dict(CARD, data_licenses={"WebText (upstream GPT-2)": "unknown"})))
  out = release.release(str(copy), str(tmp_path / "out"), card_path=str(card))
  report = json.loads(open(os.path.join(out, "data_report.json")).read())
  assert report["pii_counts"] is None and "/models/gpt2" in report["note"]
  text = open(os.path.join(out, "MODEL_CARD.md")).read()
  assert "Weights imported from Hugging Face (gpt2: /models/gpt2)" in text
  assert "| WebText (upstream GPT-2) | unknown |" in text


def test_moved_bundle_still_generates_evaluates_exports_and_is_an_init_from(run, tmp_path):
  """The bundle records its tokenizer relative to fmjax/, so it works wherever it is moved."""
  workdir, _, params, files = run
  out = tmp_path / "R"
  release.release(str(workdir), str(out), card_path=_card(tmp_path, files), pii_sample=5)
  assert json.loads((out / "fmjax" / "config.json").read_text())["data"]["tokenizer"]["path"] == "tokenizer"
  moved = tmp_path / "R2"
  os.rename(out, moved)
  run_dir = str(moved / "fmjax")

  model, config, tokenizer = generate.load_run(run_dir)
  assert config.data.tokenizer.path == os.path.join(run_dir, "tokenizer") and tokenizer.vocab_size == 300
  assert evaluate.run(run_dir, batches=1)["batches"] == 1
  interop.export(run_dir, str(tmp_path / "hf"))
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 384
  # init_from: SFT and fine-tuning take the moved bundle's tokenizer.
  sft_config = config_lib.load_config(os.path.join(CONFIGS, "sft.py"), [f"init_from={run_dir}", "data.seq_len=32"])
  sft_dir = str(tmp_path / "sft")
  assert sft.adopt_tokenizer(sft_config, sft_dir, sft.adopt_shape(sft_config, sft_dir)).vocab_size == 300
  ft_config = config_lib.load_config(os.path.join(CONFIGS, "finetune_cls.py") + ":model=gpt", [
      "model.vocab_size=384", "model.d_model=32", "model.num_heads=4", "model.d_ff=64", "model.max_len=64",
      "data.seq_len=32"])
  finetune.adopt_pretrain_settings(ft_config, run_dir)
  assert ft_config.data.tokenizer.path == os.path.join(run_dir, "tokenizer")

  # A bundle written before paths were relative recorded the absolute path of its first place.
  legacy = json.loads((moved / "fmjax" / "config.json").read_text())
  legacy["data"]["tokenizer"]["path"] = str(out / "fmjax" / "tokenizer")
  (moved / "fmjax" / "config.json").write_text(json.dumps(legacy))
  assert generate.load_run(run_dir)[2].vocab_size == 300


def test_moved_bundle_is_an_init_from_for_continued_pretraining(run, tmp_path):
  """`fmjax train --config.init_from=` a moved bundle reads the bundle's tokenizer, saved into the new run."""
  workdir, _, _, files = run
  release.release(str(workdir), str(tmp_path / "R"), card_path=_card(tmp_path, files), pii_sample=1)
  os.rename(tmp_path / "R", tmp_path / "R2")
  run_dir = str(tmp_path / "R2" / "fmjax")
  config = config_lib.load_config(os.path.join(CONFIGS, "gpt.py") + ":tiny", [
      *MODEL, "data.dataset=text_files", f"data.files={files}", f"data.seq_len={SEQ}", f"train.batch_size={BATCH}",
      f"data.cache_dir={workdir.parent / 'cache'}", f"init_from={run_dir}", "train.steps=1", "train.eval_batches=0",
      "train.progress_bar=false", "checkpoint.async_save=false"])
  assert train.run(config, str(tmp_path / "more"))["step"] == 1
  assert (tok_lib.load_tokenizer(str(tmp_path / "more" / "tokenizer")).hf.to_str() ==
          tok_lib.load_tokenizer(os.path.join(run_dir, "tokenizer")).hf.to_str())


def test_card_reports_the_eval_of_the_released_step(run, tmp_path):
  workdir, config, params, files = run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  _save(copy, config, params, 10)
  out = release.release(str(copy), str(tmp_path / "out"), card_path=_card(tmp_path, files), step=10, pii_sample=2)
  text = open(os.path.join(out, "MODEL_CARD.md")).read()
  assert "Held-out results at step 10" in text and "| perplexity | 365.0000 |" in text and "5.2500" not in text
  # No eval at the released step: the latest before it, labelled with its own step.
  assert release.eval_results(str(workdir), 15) == (10, {"loss": 5.9, "perplexity": 365.0})
  assert release.eval_results(str(workdir), 5) == (None, {})
  card = release.model_card(config, dict(CARD, data_licenses={}), step=15, params=params,
                            report={"sources": [], "pii_counts": None, "note": "n/a", "pii_scrub": False},
                            evals=(10, {"loss": 5.9}), imported=None)
  assert "No evaluation at the released step 15; the latest before it, at step 10" in card
  imported = release.model_card(config, dict(CARD, data_licenses={}), step=0, params=params,
                                report={"sources": [], "pii_counts": None, "note": "n/a", "pii_scrub": False},
                                evals=(None, {}), imported={"source": "/models/gpt2", "model_type": "gpt2"})
  assert "| Steps | 0 (the imported weights, untrained here) |" in imported and "not finished" not in imported


def test_a_mixture_declares_each_of_its_datasets_as_a_source():
  config = config_lib.load_config("configs/gpt.py:tiny", ["data.dataset=fmjax_corpus=3,text_files=1",
                                                          "data.files=/d/a.txt,/d/b.jsonl"])
  assert release.data_sources(config) == ["fmjax_corpus", "text_files:/d/a.txt", "text_files:/d/b.jsonl"]


def test_release_of_an_sft_run_scans_its_prompts_and_completions(run, tmp_path):
  """Prompts and completions, and conversations' messages, in the order SFT reads them (its config from before
  conversations: no sft.messages_key)."""
  workdir, _, _, _ = run
  copy = tmp_path / "sft"
  shutil.copytree(workdir, copy)
  rows = tmp_path / "sft.jsonl"
  pair = lambda i: (f"Mail user{i}@example.com about", f" call +44 20 7946 {1000 + i}.")
  rows.write_text("".join(json.dumps({"prompt": pair(i)[0], "completion": pair(i)[1]} if i % 2 else {"messages": [
      {"role": "user", "content": pair(i)[0]}, {"role": "assistant", "content": pair(i)[1]}]}) + "\n"
      for i in range(6)))
  cfg = json.loads((copy / "config.json").read_text())
  cfg["data"]["files"] = str(rows)
  cfg["sft"] = {"prompt_key": "prompt", "completion_key": "completion", "eval_files": "", "eval_percent": 10,
                "pack": True}
  [pretraining] = release.data_sources(interop.read_run_config(str(workdir)))
  cfg["init_from"] = str(workdir)  # the trunk's own data comes first: it was trained on it too
  _record_config(copy, cfg)
  card = tmp_path / "card.json"
  card.write_text(json.dumps(dict(CARD, data_licenses={f"text_files:{rows}": "CC0"})))
  with pytest.raises(ConfigError, match=re.escape(pretraining)):
    release.release(str(copy), str(tmp_path / "out"), card_path=str(card), pii_sample=4)
  card.write_text(json.dumps(dict(CARD, data_licenses={f"text_files:{rows}": "CC0", pretraining: "PSF-2.0"})))
  out = release.release(str(copy), str(tmp_path / "out"), card_path=str(card), pii_sample=4)
  assert f"| {pretraining} | PSF-2.0 |" in open(os.path.join(out, "MODEL_CARD.md")).read()
  report = json.loads(open(os.path.join(out, "data_report.json")).read())
  assert report["pii_counts"] == {"CARD": 0, "EMAIL": 4, "IP_ADDRESS": 0, "PHONE": 4}
  assert report["sample"]["documents"] == 4 and "(prompt, completion) rows and conversations" in \
      report["sample"]["method"]
  # The run it started from is scanned too: its trunk learnt from that text first.
  assert report["init_from"]["workdir"] == str(workdir) and report["init_from"]["pii_scrub"] is True
  assert report["init_from"]["pii_counts"]["EMAIL"] == 4 and report["init_from"]["sources"] == [pretraining]
  assert f"Before that, the run it started from (`{workdir}`, sources {pretraining}): PII scan of 4 documents" in \
      open(os.path.join(out, "MODEL_CARD.md")).read()
  # data.pii_scrub=true is a pretraining setting: SFT trained on its rows as they are.
  assert report["pii_scrub"] is False and "scrubbing was off" in report["note"]
  assert "| PII scrubbing | off |" in open(os.path.join(out, "MODEL_CARD.md")).read()


def _finetune_run(tmp_path, peft_mode):
  """A BERT classifier workdir as `fmjax finetune` writes it (LoRA or adapters), random weights."""
  rows = tmp_path / "cls.jsonl"
  rows.write_text("".join(json.dumps({"sentence": f"note {i}: write to user{i}@example.com", "label": i % 2}) + "\n"
                          for i in range(20)))
  config = config_lib.load_config(os.path.join(CONFIGS, "finetune_cls.py") + f":task=jsonl,peft={peft_mode}", [
      "model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.d_ff=64", "model.vocab_size=384",
      "model.max_len=32", "model.attention=xla", "data.seq_len=16", f"task.files={rows}", "task.num_classes=2",
      "finetune.lora_targets=('qkv', 'out')"])
  workdir = tmp_path / f"ft_{peft_mode}"
  workdir.mkdir()
  config_lib.save_json(config, str(workdir / "config.json"))
  tok_lib.train([f"note {i} write to someone" for i in range(50)], "wordpiece", 200, "mlm").save(
      str(workdir / "tokenizer"))
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype),
                        nnx.to_pure_dict(nnx.state(finetune.model_factory(config, 2)(), nnx.Param)))
  checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  checkpointer.save(5, {"step": jnp.asarray(5, jnp.int32), "params": params}, {"config": config_lib.to_dict(config)},
                    force=True)
  checkpointer.close()
  (workdir / "metrics.jsonl").write_text(json.dumps({"step": 5, "eval/accuracy": 0.5}) + "\n")
  card = tmp_path / "card.json"
  card.write_text(json.dumps(dict(CARD, data_licenses={"fmjax_corpus": "PSF-2.0", f"task_files:{rows}": "CC0"})))
  return workdir, config, params, str(card)


@pytest.mark.parametrize("kind,extra,architecture", [
    ("llama", [], "Llama-style decoder (pre-norm RMSNorm, rotary positions (theta 10000), SwiGLU MLP, grouped-query "
                  "attention (2 key/value heads), no biases, untied embeddings, causal LM)"),
    ("qwen2", ["model.qkv_bias=true", "model.tie_embeddings=true", "model.rope_theta=1000000"],
     "Qwen2-style decoder (pre-norm RMSNorm, rotary positions (theta 1000000), SwiGLU MLP, grouped-query attention "
     "(2 key/value heads), biases on q, k and v alone, tied embeddings, causal LM)"),
    ("qwen3", ["model.qk_norm=true", "model.head_dim=16"],
     "Qwen3-style decoder (pre-norm RMSNorm, rotary positions (theta 10000), SwiGLU MLP, grouped-query attention "
     "(2 key/value heads) of 16-wide heads with RMSNorm on each head of q and k, no biases, untied embeddings, "
     "causal LM)")])
def test_release_of_a_llama_architecture_run_is_a_llama_for_causal_lm_and_its_card_says_so(run, tmp_path, kind, extra,
                                                                                           architecture):
  """Llama's architecture (and Qwen2's, Qwen3's) releases as its Hugging Face class, and the card names it."""
  workdir, _, _, files = run
  llama = tmp_path / "llama"
  shutil.copytree(workdir / "tokenizer", llama / "tokenizer")
  config = config_lib.load_config(os.path.join(CONFIGS, "gpt.py") + ":tiny,llama", [
      *MODEL, "model.num_kv_heads=2", *extra, "data.dataset=text_files", f"data.files={files}", f"data.seq_len={SEQ}",
      f"data.cache_dir={tmp_path / 'cache'}", "data.pii_scrub=true", f"train.batch_size={BATCH}",
      f"train.steps={STEP}"])
  config_lib.save_json(config, str(llama / "config.json"))
  rng = np.random.default_rng(1)
  abstract = nnx.to_pure_dict(nnx.state(models.abstract_model(config.model), nnx.Param))
  _save(llama, config, jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), abstract), STEP)
  out = release.release(str(llama), str(tmp_path / "out"), card_path=_card(tmp_path, files), pii_sample=2)
  hf = json.loads(open(os.path.join(out, "hf", "config.json")).read())
  assert (hf["architectures"], hf["num_key_value_heads"], hf["tie_word_embeddings"]) == (
      [f"{kind.title()}ForCausalLM"], 2, kind == "qwen2")
  text = open(os.path.join(out, "MODEL_CARD.md")).read()
  assert architecture in text
  assert f"| Max sequence length | {SEQ} (trained; rotary positions:" in text


def test_release_of_a_finetune_run_exports_as_export_does(tmp_path):
  from safetensors.numpy import load_file
  workdir, config, params, card = _finetune_run(tmp_path, "lora")
  out = release.release(str(workdir), str(tmp_path / "out"), card_path=card, pii_sample=3)
  interop.export(str(workdir), str(tmp_path / "exported"))
  got = load_file(os.path.join(out, "hf", "model.safetensors"))
  want = load_file(str(tmp_path / "exported" / "model.safetensors"))
  assert got.keys() == want.keys() and "classifier.weight" in got
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])
  assert "BertForSequenceClassification" in json.loads(open(os.path.join(out, "hf", "config.json")).read())[
      "architectures"]
  report = json.loads(open(os.path.join(out, "data_report.json")).read())
  assert report["pii_counts"]["EMAIL"] == 3 and "train examples of task jsonl" in report["sample"]["method"]
  text = open(os.path.join(out, "MODEL_CARD.md")).read()
  for expected in ("sequence classification (jsonl)", "| accuracy | 0.5000 |", "AutoModelForSequenceClassification"):
    assert expected in text, expected

  # The card must declare the task's data too; adapters are refused with export's message.
  (tmp_path / "pre_only.json").write_text(json.dumps(dict(CARD, data_licenses={"fmjax_corpus": "PSF-2.0"})))
  with pytest.raises(ConfigError, match=r"data_licenses\['task_files:"):
    release.release(str(workdir), str(tmp_path / "out2"), card_path=str(tmp_path / "pre_only.json"))
  adapter, _, _, card = _finetune_run(tmp_path, "adapter")
  with pytest.raises(ConfigError, match="bottleneck adapters have no Hugging Face counterpart"):
    release.release(str(adapter), str(tmp_path / "out3"), card_path=card)
  assert not (tmp_path / "out3").exists()


def test_release_of_a_classifier_of_imported_weights_declares_the_task_only(run, tmp_path):
  """An imported trunk's config names the placeholder corpus of configs/bert.py, which fine-tuning copies: the
  trunk never learnt from it, so the card neither lists it nor asks a license for it."""
  workdir, _, _, files = run
  imported = tmp_path / "imported"
  shutil.copytree(workdir, imported)
  (imported / "import.json").write_text(json.dumps({"source": "/models/bert", "model_type": "bert", "notes": []}))
  ft, config, _, _ = _finetune_run(tmp_path, "lora")
  cfg = config_lib.to_dict(config)
  cfg["init_from"] = str(imported)
  _record_config(ft, cfg)
  rows = cfg["task"]["files"]
  card = tmp_path / "task_only.json"
  card.write_text(json.dumps(dict(CARD, data_licenses={f"task_files:{rows}": "CC0"})))
  out = release.release(str(ft), str(tmp_path / "out"), card_path=str(card), pii_sample=3)
  text = open(os.path.join(out, "MODEL_CARD.md")).read()
  assert "fmjax_corpus" not in text and f"| task_files:{rows} | CC0 |" in text
  assert json.loads(open(os.path.join(out, "data_report.json")).read())["sources"] == [f"task_files:{rows}"]
  # A trunk that fmjax trained: its run's own data, then the task's.
  cfg["init_from"] = str(workdir)
  _record_config(ft, cfg)
  assert release.data_sources(interop.read_run_config(str(ft))) == [f"text_files:{files}", f"task_files:{rows}"]


def test_release_of_a_run_whose_text_files_moved(run, tmp_path, capsys):
  """The PII report reads the training text: where it moved, --config.data.files says where it is now."""
  workdir, _, _, files = run
  moved_run = tmp_path / "run"
  shutil.copytree(workdir, moved_run)
  saved = json.loads((moved_run / "config.json").read_text())
  saved["data"]["files"] = "/no/longer/here/*.txt"
  _record_config(moved_run, saved)
  shutil.copytree(os.path.dirname(files), tmp_path / "moved")
  now = f"{tmp_path}/moved/*.txt"
  card = _card(tmp_path, now)
  assert cli.main(["release", f"--workdir={moved_run}", f"--out={tmp_path}/a", f"--card={card}",
                   "--pii_sample=5"]) == 2
  assert "/no/longer/here/*.txt" in capsys.readouterr().err  # the run's own path, gone
  assert cli.main(["release", f"--workdir={moved_run}", f"--out={tmp_path}/b", f"--card={card}", "--pii_sample=5",
                   f"--config.data.files={now}"]) == 0
  report = json.loads((tmp_path / "b" / "data_report.json").read_text())
  assert report["sample"]["documents"] == 5 and report["pii_counts"]["EMAIL"] == 5
  assert cli.main(["release", f"--workdir={moved_run}", f"--out={tmp_path}/c", f"--card={card}",
                   "--config.data.dataset=lm1b"]) == 2
  assert "takes --config.data.files, --config.data.data_dir, --config.task.files" in capsys.readouterr().err
