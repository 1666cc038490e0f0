"""Zero-shot multiple choice: continuation log-likelihoods against a direct computation, the
metrics, the task formats, and `fmjax eval --task` end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fmjax import cli, config_lib, models, train, zeroshot
from fmjax.config_lib import ConfigError
from fmjax.data import tokenizers

HERE = os.path.dirname(os.path.abspath(__file__))


class ByteTokenizer(tokenizers.Tokenizer):
  """Ids 1..100 from characters; 0 is <eos>, which opens a context."""
  eos_id = bos_id = 0

  def __init__(self):
    pass

  def encode(self, text):
    return [ord(c) % 100 + 1 for c in text]


ITEMS = [
    zeroshot.Item("The cat sat on the", (" mat.", " moon, which was far away.", " roof"), 0),
    zeroshot.Item("x" * 80 + " and then", (" it ended", " nothing"), 1),  # longer than max_len: its start goes
    zeroshot.Item("", (" a", " bb"), 1),
]


@pytest.mark.parametrize("framed", [False, True], ids=["eos_opens", "bos_opens"])
def test_scores_are_the_continuations_log_likelihoods(framed):
  cfg = config_lib.base_config("gpt").model
  cfg.update(vocab_size=128, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_len=64, attention="xla",
             init_std=0.2)
  model = models.build_model(cfg, rngs=nnx.Rngs(0))
  tok, max_len = ByteTokenizer(), 32
  if framed:
    tok.bos_id = 101  # a BOS of the tokenizer's own (Llama's <s>) opens each context
  # batch_size 3 over 7 rows: the last batch is padded, and rows of different items share batches.
  got = zeroshot.score(model, tok, ITEMS, max_len=max_len, batch_size=3)
  for item, logliks in zip(ITEMS, got):
    assert logliks.shape == (len(item.choices),)
    for choice, loglik in zip(item.choices, logliks):
      cont = tok.encode(choice)
      seq = ([tok.bos_id] + tok.encode(item.context) + cont)[-(max_len + 1):]
      logp_TV = jax.nn.log_softmax(model(jnp.asarray([seq[:-1]]))[0], axis=-1)
      want = sum(float(logp_TV[t, seq[t + 1]]) for t in range(len(seq) - 1 - len(cont), len(seq) - 1))
      np.testing.assert_allclose(loglik, want, rtol=1e-5, atol=1e-4)
  assert len({round(float(x), 3) for ll in got for x in ll}) > 5  # not one number for every choice


def test_a_contexts_trailing_whitespace_is_scored_with_the_choice():
  """As in lm-evaluation-harness: "sat on the " + "mat" is tokenised as "sat on the" + " mat", not as a lone
  space token and a word piece; both spellings of an item give the same rows, and fitting counts those tokens."""
  from fmjax.data import tokenizers as tok_lib
  rng = np.random.default_rng(0)
  words = "the cat sat on mat roof a big small red".split()
  tok = tok_lib.train([" ".join(rng.choice(words, 12)) for _ in range(200)], "bpe", 300, "clm")
  assert tok.encode("sat on the ")[-1:] == tok.encode(" ") and len(tok.encode(" mat")) == 1  # what goes wrong
  trailing = [zeroshot.Item("the cat sat on the ", ("mat", "big roof"), 0),
              zeroshot.Item("the big cat\n ", ("sat", "small"), 1)]
  leading = [zeroshot.Item("the cat sat on the", (" mat", " big roof"), 0),
             zeroshot.Item("the big cat", ("\n sat", "\n small"), 1)]
  got, want = zeroshot.encode_rows(tok, trailing, 32), zeroshot.encode_rows(tok, leading, 32)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert got["weights"][0].sum() == 1  # " mat" is one token
  # "sat" is one token, "\nsat" two: with one position to score in, only the item without the newline fits.
  items = [zeroshot.Item("the cat\n", ("sat", "on"), 0), zeroshot.Item("the cat", (" sat", " on"), 0)]
  assert zeroshot.fitting(tok, items, 1) == (items[1:], 1)


def test_acc_picks_the_total_and_acc_norm_the_per_character_likelihood():
  items = [zeroshot.Item("q", (" short", " a much longer answer"), 1),
           zeroshot.Item("q", (" yes", " no"), 0),
           # lm-evaluation-harness divides by the choice's characters without the joining space, not
           # by bytes: -4.0 / 4 beats -3.3 / 3 per character, where per byte (-3.3 / 6) it would lose.
           zeroshot.Item("q", (" ééé", " abcd"), 1)]
  logliks = [np.array([-6.0, -10.0]), np.array([-1.0, -2.0]), np.array([-3.3, -4.0])]
  m = zeroshot.metrics(items, logliks)
  assert m == {"acc": 1 / 3, "acc_norm": 1.0, "chance": 0.5, "items": 3}


def test_items_with_a_choice_longer_than_the_positions_are_left_out():
  items = [zeroshot.Item("c", (" ab", " " + "x" * 40), 0), zeroshot.Item("c", (" ab", " cd"), 1)]
  assert zeroshot.fitting(ByteTokenizer(), items, 32) == ([items[1]], 1)


def test_task_formats():
  hella = zeroshot._hellaswag({"activity_label": b"Making a cake", "context": b"She mixes the flour [title] then",
                               "endings": [b"bakes it [step] well.", b"eats the bowl."], "label": 0})
  assert hella == zeroshot.Item("Making a cake: She mixes the flour. then", (" bakes it well.", " eats the bowl."), 0)
  arc = zeroshot._arc({"question": b"What melts ice?", "answerKey": 2,
                       "choices": {"label": [0, 1, 2], "text": [b"cold", b"dark", b"heat"]}})
  assert arc == zeroshot.Item("Question: What melts ice?\nAnswer:", (" cold", " dark", " heat"), 2)
  with pytest.raises(ConfigError, match="unknown zero-shot task 'hellaswg'; did you mean 'hellaswag'"):
    zeroshot.load_items("hellaswg")


def test_piqa_through_tfds(tfds_online, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=5):
    split, items = zeroshot.load_items("piqa", data_dir=str(tmp_path), limit=3)
  assert split == "validation" and len(items) == 3
  assert all(i.context.startswith("Question: ") and i.context.endswith("\nAnswer:") for i in items)
  assert all(len(i.choices) == 2 and i.label in (0, 1) for i in items)


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
  """A GPT workdir: one step on a small text corpus."""
  root = tmp_path_factory.mktemp("zeroshot")
  rng = np.random.default_rng(0)
  words = "the cat dog sat ran on under mat roof a big small red".split()
  (root / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(words, 40)) for _ in range(120)) + "\n")
  config = config_lib.load_config(os.path.join(HERE, os.pardir, "configs", "gpt.py") + ":tiny", [
      "data.dataset=text_files", f"data.files={root / 'corpus.txt'}", f"data.cache_dir={root / 'cache'}",
      "data.tokenizer.vocab_size=300", "model.vocab_size=384", "data.seq_len=32", "train.batch_size=8",
      "train.steps=1", "train.eval_batches=0", "train.progress_bar=false", "checkpoint.async_save=false"])
  train.run(config, str(root / "gpt"))
  return root


def test_eval_task_through_the_cli(gpt_run, capsys):
  items = gpt_run / "items.jsonl"
  items.write_text("".join(json.dumps({"context": f"the cat sat on the {w}", "choices": [" mat", " roof", " red"],
                                       "label": i % 3}) + "\n" for i, w in enumerate(["big", "small", "red", "a"])))
  workdir = gpt_run / "gpt"
  assert cli.main(["eval", f"--workdir={workdir}", f"--task=jsonl:{items}", "--limit=3"]) == 0
  out = capsys.readouterr().out
  assert "(file, 3 items, step 1): acc " in out and "(chance 0.3333)" in out
  saved = json.loads((workdir / "eval_jsonl_items.json").read_text())  # one file per task file
  assert saved["items"] == 3 and saved["step"] == 1 and 0.0 <= saved["acc"] <= 1.0
  assert saved == {"workdir": str(workdir), **zeroshot.run(str(workdir), f"jsonl:{items}", limit=3)}


def test_eval_task_mistakes_are_one_line(gpt_run, tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"context": "c", "choices": [" a", " b"], "label": 2}) + "\n")
  boolean = tmp_path / "boolean.jsonl"  # true is no index
  boolean.write_text(json.dumps({"context": "c", "choices": [" a", " b"], "label": True}) + "\n")
  bert = tmp_path / "bert"
  bert.mkdir()
  (bert / "config.json").write_text(json.dumps({"model": {"family": "bert"}, "train": {}}))
  classifier = tmp_path / "classifier"
  classifier.mkdir()
  (classifier / "config.json").write_text(json.dumps({"model": {"family": "bert"}, "train": {}, "task": {}}))
  for argv, error in (
      ([f"--workdir={gpt_run / 'gpt'}", f"--task=jsonl:{bad}"], f"{bad}:1 is not {{\"context\": str, \"choices\""),
      ([f"--workdir={gpt_run / 'gpt'}", f"--task=jsonl:{boolean}"], "\"label\": index of the right one}\n"),
      ([f"--workdir={gpt_run / 'gpt'}", "--task=jsonl:/nonexistent.jsonl"], "--task=jsonl:/nonexistent.jsonl: no such"),
      ([f"--workdir={gpt_run / 'gpt'}", "--task=piqa", "--limit=-1"], "--limit must be 0 (all items) or more"),
      ([f"--workdir={gpt_run / 'gpt'}", "--task=continuation", "--limit=3"], "a limit of 3 (--limit, or "
       "train.zeroshot_limit) is below the 4 passages the continuation task needs"),
      ([f"--workdir={bert}", "--task=piqa"], "holds a BERT (masked LM); zero-shot multiple choice scores a causal"),
      ([f"--workdir={classifier}", "--task=piqa"], "holds a BERT classifier; zero-shot multiple choice scores a"),
  ):
    assert cli.main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and error in err, err


def test_a_tfds_task_prepared_elsewhere_is_read_from_config_data_data_dir(gpt_run, tfds_online, monkeypatch, capsys):
  """The message for a TFDS task not prepared here says to pass --config.data.data_dir=DIR: --task takes it."""
  tfds = pytest.importorskip("tensorflow_datasets")
  from fmjax.data import sources
  seen, load = [], sources.load_tfds
  monkeypatch.setattr(sources, "load_tfds", lambda name, split, data_dir, **kw: seen.append(data_dir) or load(
      name, split, data_dir, **kw))
  workdir, prepared = gpt_run / "gpt", str(gpt_run / "tfds")
  with tfds.testing.mock_data(num_examples=5):
    assert cli.main(["eval", f"--workdir={workdir}", "--task=piqa", "--limit=2",
                     f"--config.data.data_dir={prepared}"]) == 0
  assert seen == [prepared] and "piqa (validation, 2 items, step 1): acc " in capsys.readouterr().out
  # Any other data override (or one for a task not in TFDS) is still refused.
  for argv in (["--task=piqa", "--config.data.files=x"], ["--task=continuation", f"--config.data.data_dir={prepared}"]):
    assert cli.main(["eval", f"--workdir={workdir}", *argv]) == 2
    assert "overrides are for perplexity on other text, not --task" in capsys.readouterr().err


def test_the_continuation_task_is_built_from_the_runs_held_out_documents(gpt_run):
  from fmjax import generate
  from fmjax.data import sources
  config = generate.restore_run(str(gpt_run / "gpt")).config
  split, items = zeroshot.load_items("continuation", config=config, limit=6)
  passages = [w[at:at + 36] for d in sources.documents(config, "eval") for w in [d.split()]
              for at in range(0, len(w) - 35, 36)]
  assert split == "eval" and len(items) == 6
  for i, item in enumerate(items):
    assert item.label == i % 4 and len(item.choices) == 4 and len(set(item.choices)) == 4
    assert item.context == " ".join(passages[i][:24])
    assert item.choices[item.label] == " " + " ".join(passages[i][24:36])
  result = zeroshot.run(str(gpt_run / "gpt"), "continuation", limit=6)
  assert result["items"] == 6 and result["chance"] == 0.25 and result["split"] == "eval"


def test_a_training_run_scores_its_zero_shot_tasks_at_each_eval(gpt_run, tmp_path):
  """train.zeroshot_tasks: scored with the run's sharded params at every eval, as `fmjax eval
  --task` scores the saved checkpoint afterwards."""
  config = config_lib.load_config(os.path.join(HERE, os.pardir, "configs", "gpt.py") + ":tiny", [
      "data.dataset=text_files", f"data.files={gpt_run / 'corpus.txt'}", f"data.cache_dir={gpt_run / 'cache'}",
      "data.tokenizer.vocab_size=300", "model.vocab_size=384", "data.seq_len=32", "train.batch_size=8",
      "train.steps=4", "train.eval_every=2", "train.eval_batches=1", "train.progress_bar=false",
      "checkpoint.async_save=false", "train.zeroshot_tasks=continuation", "train.zeroshot_limit=12"])
  workdir = tmp_path / "run"
  result = train.run(config, str(workdir))
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl") if "eval/continuation_acc" in line]
  assert [r["step"] for r in rows] == [2, 4] and "eval/loss" in rows[0]
  after = zeroshot.run(str(workdir), "continuation", limit=12)
  assert (result["eval"]["continuation_acc"], result["eval"]["continuation_acc_norm"]) == (
      after["acc"], after["acc_norm"])
  bert = config_lib.load_config(os.path.join(HERE, os.pardir, "configs", "bert.py") + ":tiny",
                                ["train.zeroshot_tasks=continuation"])
  with pytest.raises(ConfigError, match="scores a causal LM's continuations; this run trains a bert"):
    train.run(bert, str(tmp_path / "bert"))
  assert not os.path.exists(tmp_path / "bert")


def test_the_continuation_task_of_an_sft_run_says_where_to_score_instead():
  config = config_lib.load_config("configs/sft.py")
  with pytest.raises(ConfigError, match="an SFT run has none; score its init_from run, or pass --task=jsonl:FILE"):
    zeroshot.load_items("continuation", config=config)


def test_a_damaged_config_json_is_one_line(tmp_path):
  (tmp_path / "config.json").write_text("[1]")  # a list: no run's config
  with pytest.raises(ConfigError, match=r"config.json has no model: it is damaged or not an fmjax run's") as e:
    zeroshot.run(str(tmp_path), "continuation")
  assert "\n" not in str(e.value)
