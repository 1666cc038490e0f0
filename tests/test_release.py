"""`fmjax release`: the bundle, its model card, the PII data report, checksums, and refusals.

The run is a tiny GPT workdir laid out as `fmjax train` writes it (config.json, a checkpoint,
metrics.jsonl) with random weights, over local text files in which every document holds exactly
one e-mail address and one phone number, so the PII counts are known.
"""

import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fmjax import checkpoint as ckpt_lib, cli, config_lib, generate, models, optim, release
from fmjax.config_lib import ConfigError
from fmjax.data import tokenizers as tok_lib

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
STEP, BATCH, SEQ = 20, 8, 32
CARD = {"license": "apache-2.0", "intended_use": "Research on tiny language models.",
        "limitations": "Tiny and trained on very little text; it produces nonsense.",
        "use_restrictions": "Not for any decision about people.", "model_name": "tiny-gpt-test"}


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
      "model.vocab_size=384", "model.d_model=32", "model.num_heads=4", "model.d_ff=64", "model.max_len=64",
      "model.attention=xla", "data.dataset=text_files", f"data.files={files}", f"data.seq_len={SEQ}",
      f"data.cache_dir={root / 'cache'}", "data.pii_scrub=true", f"train.batch_size={BATCH}", "train.steps=40"])
  workdir = root / "run"
  workdir.mkdir()
  config_lib.save_json(config, str(workdir / "config.json"))
  tok_lib.train(_documents(), "bpe", 300, "clm").save(str(workdir / "tokenizer"))

  rng = np.random.default_rng(0)
  abstract = nnx.to_pure_dict(nnx.state(models.abstract_model(config.model), nnx.Param))
  params = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), abstract)
  tx = optim.make_optimizer(config)
  state = {"step": jnp.asarray(STEP, jnp.int32), "params": params, "opt_state": jax.jit(tx.init)(params)}
  checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  checkpointer.save(STEP, state, {"config": config_lib.to_dict(config)}, force=True)
  checkpointer.close()
  with open(workdir / "metrics.jsonl", "w") as f:
    for row in ({"step": 10, "train/loss": 6.1}, {"step": 10, "eval/loss": 5.9, "eval/perplexity": 365.0},
                {"step": 20, "train/loss": 5.2}, {"step": 20, "eval/loss": 5.25, "eval/accuracy": 0.125}):
      f.write(json.dumps(row) + "\n")
  return workdir, config, params, files


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
                   f"| Steps | {STEP} (of 40 planned) |", f"{STEP * BATCH * SEQ:,} (steps x batch {BATCH}",
                   f"| text_files:{files} | PSF-2.0 |", "EMAIL 5", "PHONE 5", "Held-out results at step 20",
                   "| loss | 5.2500 |", "| accuracy | 0.1250 |", CARD["intended_use"], CARD["limitations"],
                   "License: apache-2.0", CARD["use_restrictions"], "| PII scrubbing | on |"):
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
  assert hf["eos_token_id"] == tokenizer.eos_id


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
