"""Hugging Face interop: import and export parity with `transformers` (PyTorch, CPU, random weights).

Every model here is built from a config in the test (no download). Weights are perturbed away from
HF's init (zero biases, unit norms) so that every mapped tensor matters to the logits.

Shape legend: B batch, T sequence, V vocab, D model, C classes.
"""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fmjax import cli, config_lib, data, generate, interop, models, objectives  # noqa: E402
from fmjax.config_lib import ConfigError  # noqa: E402
from fmjax.data import tokenizers as tok_lib  # noqa: E402

B, T = 2, 16
ATOL = 1e-4


@pytest.fixture(scope="module")
def texts():
  import pydoc_data.topics
  return list(pydoc_data.topics.topics.values())


@pytest.fixture(scope="module")
def bpe(texts):
  return tok_lib.train(texts, "bpe", 320, "clm")


@pytest.fixture(scope="module")
def wordpiece(texts):
  return tok_lib.train(texts, "wordpiece", 320, "mlm")


def _perturb(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.1)
  return model.eval()


def _write_tokenizer_files(tokenizer, directory, tokenizer_class):
  """The files a Hub repo has: vocab.txt (BERT) or vocab.json + merges.txt (GPT-2), no tokenizer.json."""
  os.makedirs(directory, exist_ok=True)
  tokenizer.hf.model.save(str(directory))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": tokenizer_class}, f)


def _gpt2(vocab, seed=0, layers=2, **kw):
  cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=64, **kw)
  return _perturb(transformers.GPT2LMHeadModel(cfg), seed)


def _bert_config(vocab, layers=2, **kw):
  return transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                 intermediate_size=48, max_position_embeddings=64, type_vocab_size=2, **kw)


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory, bpe):
  d = tmp_path_factory.mktemp("hf_gpt2")
  model = _gpt2(bpe.vocab_size, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.05)  # the two rates distinguishable
  model.save_pretrained(d)
  _write_tokenizer_files(bpe, d, "GPT2Tokenizer")
  return d, model


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, wordpiece):
  d = tmp_path_factory.mktemp("hf_bert")
  model = _perturb(transformers.BertForMaskedLM(_bert_config(wordpiece.vocab_size)), 1)
  model.save_pretrained(d)
  _write_tokenizer_files(wordpiece, d, "BertTokenizer")
  return d, model


def _ids(vocab, seed=0, shape=(B, T)):
  return np.random.default_rng(seed).integers(5, vocab, shape).astype(np.int64)


def _hf_logits(model, ids, **kw):
  with torch.no_grad():
    return model(torch.from_numpy(ids), **{k: torch.from_numpy(v) for k, v in kw.items()}).logits.numpy()


@nnx.jit
def _logits(model, ids_BT, token_types_BT=None, segment_ids_BT=None):
  kw = {} if token_types_BT is None else {"token_types_BT": token_types_BT}
  return model(ids_BT, segment_ids_BT=segment_ids_BT, **kw)


def _close(a, b, atol=ATOL):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


def _greedy_in_transformers(hf_model, auto, prompt: str, max_new_tokens: int = 8) -> tuple[str, list[int]]:
  """(transformers' greedy continuation of `prompt`, cut before its first EOS as fmjax cuts one; the prompt's ids
  as the tokenizer `auto` writes them)."""
  import torch
  enc = auto(prompt, return_tensors="pt")
  with torch.no_grad():
    ids = hf_model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=auto.eos_token_id)
  new = ids[0, enc["input_ids"].shape[1]:].tolist()
  if auto.eos_token_id in new:
    new = new[:new.index(auto.eos_token_id)]
  return auto.decode(new), enc["input_ids"][0].tolist()


# ----------------------------------------------------------------------------- import


@pytest.fixture(scope="module")
def gpt_workdir(tmp_path_factory, gpt_dir):
  workdir = tmp_path_factory.mktemp("imported") / "gpt"
  interop.import_hf(str(gpt_dir[0]), str(workdir), overrides=["model.attention=xla"])
  return workdir


def test_gpt2_import_logits_match(gpt_dir, gpt_workdir):
  hf_model = gpt_dir[1]
  model, config, tokenizer = generate.load_run(str(gpt_workdir))
  assert (config.model.num_layers, config.model.d_model, config.model.num_heads, config.model.d_ff,
          config.model.max_len, config.model.vocab_size) == (2, 32, 4, 128, 64, tokenizer.vocab_size)
  ids = _ids(tokenizer.vocab_size)
  _close(_logits(model, jnp.asarray(ids)), _hf_logits(hf_model, ids))


def test_import_into_scanned_layers_stacks_the_same_weights(gpt_dir, gpt_workdir, tmp_path):
  interop.import_hf(str(gpt_dir[0]), str(tmp_path / "w"), overrides=["model.scan_layers=true"])
  config = interop.read_run_config(str(tmp_path / "w"))
  assert config.model.scan_layers
  scanned, unrolled = (interop.read_params(w, interop.run_config_at(w)[1])
                       for w in (str(tmp_path / "w"), str(gpt_workdir)))
  assert scanned["h"]["blocks"]["attn"]["qkv"]["kernel"].shape == (2, 32, 3, 4, 8)
  jax.tree.map(np.testing.assert_array_equal, scanned, interop.normalise_keys(models.stack_layers(unrolled)))


def test_bert_import_mlm_logits_match_with_padding_and_token_types(bert_dir, tmp_path):
  hf_model = bert_dir[1]
  interop.import_hf(str(bert_dir[0]), str(tmp_path / "w"), overrides=["model.attention=xla"])
  model, config, _ = generate.load_run(str(tmp_path / "w"))
  assert config.model.layer_norm_eps == 1e-12 and config.model.d_ff == 48
  ids = _ids(config.model.vocab_size, seed=1)
  types = np.zeros_like(ids)
  types[:, T // 2:] = 1
  mask = np.ones_like(ids)
  mask[1, 11:] = 0  # row 1 is padded: HF masks pad keys, fmjax gives pads their own segment
  ours = _logits(model, jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask))
  theirs = _hf_logits(hf_model, ids, token_type_ids=types, attention_mask=mask)
  real = mask.astype(bool)
  _close(np.asarray(ours)[real], theirs[real])


def test_bert_sequence_classifier_trunk_pooler_and_head_parity(tmp_path, wordpiece, bert_dir, caplog):
  """BertForSequenceClassification: encoder output, pooler and (through `classifier`) logits match."""
  d = tmp_path / "hf_cls"
  hf_model = _perturb(transformers.BertForSequenceClassification(_bert_config(wordpiece.vocab_size, num_labels=3)), 2)
  hf_model.save_pretrained(d)
  _write_tokenizer_files(wordpiece, d, "BertTokenizer")
  interop.import_hf(str(d), str(tmp_path / "w"), overrides=["model.attention=xla"])
  info = json.loads((tmp_path / "w" / interop.IMPORT_INFO).read_text())
  assert any(n.startswith("mlm_transform") for n in info["notes"])  # no MLM head in a classifier: initialised
  model, config, _ = generate.load_run(str(tmp_path / "w"))
  # Its fill-mask guesses at random until the head is trained, and says so; a BertForMaskedLM's does not.
  interop.import_hf(str(bert_dir[0]), str(tmp_path / "mlm"), overrides=["model.attention=xla"])
  for workdir, warned in (("w", True), ("mlm", False)):
    caplog.clear()
    with caplog.at_level("WARNING", logger="fmjax"):
      assert len(generate.run(str(tmp_path / workdir), text="a [MASK] b", top_k=2)) == 1
    assert ("imported without its masked-LM head (mlm_transform, mlm_ln, mlm_bias initialised at random, not "
            "trained since): fill-mask predictions are guesses" in caplog.text) == warned, caplog.text

  ids = _ids(config.model.vocab_size, seed=2)
  h_BTD, pooled_BD = nnx.jit(lambda m, x: m.encode(x))(model, jnp.asarray(ids))
  with torch.no_grad():
    out = hf_model.bert(torch.from_numpy(ids))
  _close(h_BTD, out.last_hidden_state.numpy())
  _close(pooled_BD, out.pooler_output.numpy())

  weights = interop.read_hf_weights(str(d))
  _, head, _ = interop.hf_to_params(weights, config)
  assert head["kernel"].shape == (32, 3)
  _close(pooled_BD @ head["kernel"] + head["bias"], _hf_logits(hf_model, ids))

  # Export with the head: AutoModelForSequenceClassification reproduces the original logits.
  params = dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)), classifier=head)
  interop.export_params(params, config.model, str(tmp_path / "out"))
  back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
  _close(_hf_logits(back, ids), _hf_logits(hf_model, ids))


def test_pytorch_bin_weights_load_like_safetensors(gpt_dir, tmp_path):
  d, hf_model = gpt_dir
  torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
  from_bin = interop.read_hf_weights(str(tmp_path))
  from_st = interop.read_hf_weights(str(d))
  assert set(from_st) <= set(from_bin)
  for name, value in from_st.items():
    np.testing.assert_array_equal(from_bin[name], value)


def test_bert_weights_with_tf_era_layer_norm_names_and_no_model_prefix_import_with_parity(bert_dir, tmp_path):
  """Older BERT files (bert-base-uncased's pytorch_model.bin) name LayerNorm params gamma/beta, and a
  base-model save drops the `bert.` prefix: both import to the same logits."""
  d, hf_model = bert_dir
  old = tmp_path / "old"
  shutil.copytree(d, old, ignore=shutil.ignore_patterns("*.safetensors"))
  renamed = {}
  for name, value in hf_model.state_dict().items():
    if "LayerNorm." in name:
      name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
    renamed[name.removeprefix("bert.")] = value
  assert any(n.endswith(".gamma") for n in renamed) and not any(n.startswith("bert.") for n in renamed)
  torch.save(renamed, old / "pytorch_model.bin")
  interop.import_hf(str(old), str(tmp_path / "w"), overrides=["model.attention=xla"])
  model, config, _ = generate.load_run(str(tmp_path / "w"))
  ids = _ids(config.model.vocab_size, seed=2)
  _close(_logits(model, jnp.asarray(ids)), _hf_logits(hf_model, ids))


# ----------------------------------------------------------------------------- export


def _random_fmjax(family, vocab, seed, **overrides):
  """A tiny fmjax model with random numpy weights (norm scales near 1): no eager JAX init to compile."""
  cfg = config_lib.base_config(family).model
  cfg.update(vocab_size=vocab, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_len=64, attention="xla")
  cfg.update(**overrides)
  graphdef, state = nnx.split(models.abstract_model(cfg))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    base = 1.0 if str(path[-1].key) == "scale" else 0.0
    return jnp.asarray(base + 0.1 * rng.standard_normal(x.shape), x.dtype)

  pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state), cfg


def test_gpt_export_matches_transformers_with_padded_vocab(tmp_path, bpe):
  vocab = 384  # padded beyond the tokenizer's ids: exported as is
  model, cfg = _random_fmjax("gpt", vocab, seed=4)
  interop.export_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg, str(tmp_path), bpe)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert type(hf_model).__name__ == "GPT2LMHeadModel" and hf_model.config.vocab_size == vocab
  ids = _ids(bpe.vocab_size, seed=4)
  theirs = _hf_logits(hf_model, ids)
  assert theirs.shape == (B, T, vocab)
  _close(_logits(model, jnp.asarray(ids)), theirs)


def test_transformers_generate_never_picks_the_padded_vocabulary_rows_of_an_export(tmp_path, bpe):
  """The rows past the tokenizer's ids name no token: fmjax never samples them, and the export's
  generation_config.json has transformers suppress them, even where their logits are the largest."""
  import torch
  vocab = 384
  model, cfg = _random_fmjax("gpt", vocab, seed=6)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  params["wte"]["embedding"] = params["wte"]["embedding"].at[bpe.vocab_size:].mul(50.0)  # padded rows win
  interop.export_params(params, cfg, str(tmp_path), bpe)
  assert transformers.GenerationConfig.from_pretrained(tmp_path).suppress_tokens == list(range(bpe.vocab_size,
                                                                                                vocab))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  ids = torch.tensor(_ids(bpe.vocab_size, seed=6)[:1, :8])
  assert int(hf_model(ids).logits[0, -1].argmax()) >= bpe.vocab_size  # without the suppression it would pick one
  with torch.no_grad():
    out = hf_model.generate(ids, max_new_tokens=6, do_sample=False)
  new = out[0, 8:].tolist()
  assert new and max(new) < bpe.vocab_size, new


def test_bert_export_matches_transformers_scanned_layers(tmp_path, wordpiece):
  model, cfg = _random_fmjax("bert", wordpiece.vocab_size, seed=5, scan_layers=True)
  interop.export_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg, str(tmp_path), wordpiece)
  hf_model = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
  ids = _ids(wordpiece.vocab_size, seed=5)
  types = (np.arange(T)[None] >= 6).astype(np.int64).repeat(B, 0)
  _close(_logits(model, jnp.asarray(ids), jnp.asarray(types)), _hf_logits(hf_model, ids, token_type_ids=types))


def test_gpt_classifier_exports_as_gpt2_for_sequence_classification(tmp_path, bpe):
  model, cfg = _random_fmjax("gpt", bpe.vocab_size, seed=10)
  kernel_DC = np.random.default_rng(10).standard_normal((32, 3)).astype(np.float32)
  params = dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)), classifier={"kernel": kernel_DC,
                                                                          "bias": np.zeros(3, np.float32)})
  interop.export_params(params, cfg, str(tmp_path), bpe)
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
  assert type(hf_model).__name__ == "GPT2ForSequenceClassification"
  ids = _ids(bpe.vocab_size, seed=10)  # no pad (= EOS) ids: HF pools the last token, as fmjax's GPT head does
  h_BTD = nnx.jit(lambda m, x: m.hidden(x))(model, jnp.asarray(ids))
  _close(np.asarray(h_BTD)[:, -1] @ kernel_DC, _hf_logits(hf_model, ids))

  params["classifier"]["bias"] = np.ones(3, np.float32)
  with pytest.raises(ConfigError, match="no bias"):
    interop.export_params(params, cfg, str(tmp_path / "again"))


def test_gpt_classifier_export_pads_with_a_padding_row_and_pools_the_eos_like_fmjax(tmp_path, bpe):
  """The tokenizer pads with <eos>: the export's pad token takes a padding row, and its tokenizer appends <eos>."""
  from fmjax import finetune
  vocab = 384  # padded beyond the tokenizer's ids: the pad token needs no new row
  model, cfg = _random_fmjax("gpt", vocab, seed=11)
  kernel_DC = np.random.default_rng(11).standard_normal((32, 2)).astype(np.float32)
  interop.export_params(dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)), classifier={"kernel": kernel_DC}), cfg,
                        str(tmp_path), bpe)
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
  assert hf_model.config.vocab_size == vocab and hf_model.config.pad_token_id == bpe.vocab_size != bpe.eos_id
  auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
  texts = [("for x in y:", "pass"), ("The with statement", "is used to wrap a block"), ("a", "b")]
  rows = finetune.encode([(t, 0) for t in texts], bpe, "gpt", 2 * T)
  enc = auto(*map(list, zip(*texts)), padding=True, return_tensors="np")
  n = enc["input_ids"].shape[1]
  assert n < 2 * T  # nothing truncated
  np.testing.assert_array_equal(np.where(enc["attention_mask"] == 1, enc["input_ids"], -1),
                                np.where(rows["segment_ids"][:, :n] == 1, rows["inputs"][:, :n], -1))
  h_BTD = nnx.jit(lambda m, x, s: m.hidden(x, segment_ids_BT=s))(model, jnp.asarray(rows["inputs"]),
                                                                jnp.asarray(rows["segment_ids"]))
  last_B = rows["segment_ids"].sum(1) - 1  # fmjax's GPT head: the last real token, the <eos>
  ours_BC = np.asarray(h_BTD)[np.arange(len(texts)), last_B] @ kernel_DC
  _close(_hf_logits(hf_model, enc["input_ids"], attention_mask=enc["attention_mask"]), ours_BC, atol=1e-5)


def test_export_of_an_imported_workdir_round_trips_every_tensor(gpt_dir, gpt_workdir, tmp_path, bpe):
  (tmp_path / "notes.txt").write_text("a file where a folder would go")
  with pytest.raises(ConfigError, match=rf"^--out={tmp_path}/notes.txt/hf cannot be made: {tmp_path}/notes.txt is "
                                        "a file; choose a directory elsewhere$"):
    interop.export(str(gpt_workdir), str(tmp_path / "notes.txt" / "hf"))
  out = tmp_path / "hf"
  assert cli.main(["export", f"--workdir={gpt_workdir}", f"--out={out}", "--format=hf"]) == 0
  original = interop.read_hf_weights(str(gpt_dir[0]))
  exported = interop.read_hf_weights(str(out))
  assert set(exported) == set(original)
  for name in original:
    np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
  # The training recipe travels both ways too: hidden and attention-probability dropout.
  model_cfg = interop.read_run_config(str(gpt_workdir)).model
  assert (model_cfg.dropout, model_cfg.attention_dropout) == (0.1, 0.05)
  hf_in, hf_out = (json.loads((d / "config.json").read_text()) for d in (gpt_dir[0], out))
  assert {k: hf_out[k] for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")} == {
      k: hf_in[k] for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
  # The exported tokenizer loads in transformers and encodes like fmjax's, opening the text with
  # <eos> as `fmjax generate` opens a prompt (and training a document).
  auto = transformers.AutoTokenizer.from_pretrained(out)
  text = "def f(x):\n    return x  # the answer is 42"
  assert auto(text)["input_ids"] == [bpe.eos_id] + bpe.encode(text)
  assert auto(text, add_special_tokens=False)["input_ids"] == bpe.encode(text)
  assert auto.eos_token == tok_lib.EOS


def test_exported_gpt_generates_in_transformers_what_fmjax_generate_does(gpt_workdir, tmp_path):
  """Greedy decoding from a text prompt: transformers with the exported model and tokenizer (which
  opens the prompt with <eos>, as `fmjax generate` does) continues it with fmjax's tokens."""
  out = interop.export(str(gpt_workdir), str(tmp_path / "hf"))
  prompt = "The with statement"
  ours = generate.run(str(gpt_workdir), prompts=[prompt], max_new_tokens=8, temperature=0.0)[0]
  auto = transformers.AutoTokenizer.from_pretrained(out)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert _greedy_in_transformers(hf_model, auto, prompt)[0] == ours


def test_imported_workdir_still_works_after_a_move(gpt_dir, tmp_path, bpe):
  from fmjax import sft
  interop.import_hf(str(gpt_dir[0]), str(tmp_path / "w"), overrides=["model.attention=xla"])
  assert json.loads((tmp_path / "w" / "config.json").read_text())["data"]["tokenizer"]["path"] == "tokenizer"
  moved = tmp_path / "w2"
  os.rename(tmp_path / "w", moved)
  _, config, tokenizer = generate.load_run(str(moved))
  assert config.data.tokenizer.path == str(moved / "tokenizer") and tokenizer.hf.to_str() == bpe.hf.to_str()
  interop.export(str(moved), str(tmp_path / "hf"))
  assert set(interop.read_hf_weights(str(tmp_path / "hf"))) == set(interop.read_hf_weights(str(gpt_dir[0])))
  sft_config = config_lib.load_config("configs/sft.py", [f"init_from={moved}", "data.seq_len=32"])
  sft_dir = str(tmp_path / "sft")
  assert sft.adopt_tokenizer(sft_config, sft_dir, sft.adopt_shape(sft_config, sft_dir)).vocab_size == bpe.vocab_size


def test_exported_bert_tokenizer_adds_cls_and_sep_like_bert(tmp_path, wordpiece):
  _, cfg = _random_fmjax("bert", wordpiece.vocab_size, seed=6)
  interop._export_tokenizer(wordpiece, cfg, str(tmp_path))
  auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
  text = "The while statement is used for repeated execution."
  assert auto(text)["input_ids"] == [wordpiece.cls_id] + wordpiece.encode(text) + [wordpiece.sep_id]
  assert auto.mask_token == "[MASK]" and auto.pad_token_id == wordpiece.pad_id
  # HF reads a special token's name in text as the token (fill-mask pipelines need "[MASK]" so);
  # told to split them, as text, which is how fmjax reads its data.
  quoted = "BERT joins pairs with [SEP] and predicts [MASK]."
  assert auto(quoted, add_special_tokens=False)["input_ids"].count(wordpiece.mask_id) == 1
  assert auto(quoted, add_special_tokens=False, split_special_tokens=True)["input_ids"] == wordpiece.encode(quoted)
  # Sentence pairs carry segment B's token type, which a pair classifier reads.
  pair = auto(text, "It repeats.")
  assert pair["token_type_ids"] == [0] * (len(wordpiece.encode(text)) + 2) + [1] * (len(wordpiece.encode("It repeats.")) + 1)


# ----------------------------------------------------------------------------- Llama


# Llama's architecture (configs/gpt.py:SIZE,llama) at _random_fmjax's size; rope_theta and eps off their
# defaults, so that a mapping that dropped either would show in the logits.
LLAMA = dict(positions="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, tie_embeddings=False, rope_theta=500.0,
             layer_norm_eps=1e-5)


def _llama(vocab, seed=0, layers=2, mistral=False, **kw):
  """A random HF LlamaForCausalLM (MistralForCausalLM): 4 query heads sharing 2 key/value heads, an untied head."""
  settings = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                  rope_theta=500.0, tie_word_embeddings=False)
  cfg = (transformers.MistralConfig if mistral else transformers.LlamaConfig)(**{**settings, **kw})
  return _perturb(transformers.AutoModelForCausalLM.from_config(cfg), seed)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, bpe):
  d = tmp_path_factory.mktemp("hf_llama")
  model = _llama(bpe.vocab_size, seed=12, attention_dropout=0.05)
  model.save_pretrained(d)
  assert (d / "model.safetensors").is_file()
  _write_tokenizer_files(bpe, d, "GPT2Tokenizer")
  return d, model


@pytest.fixture(scope="module")
def llama_workdir(tmp_path_factory, llama_dir):
  workdir = tmp_path_factory.mktemp("imported") / "llama"
  interop.import_hf(str(llama_dir[0]), str(workdir), overrides=["model.attention=xla"])
  return workdir


def test_llama_import_logits_match_with_grouped_query_attention_and_packed_documents(llama_dir, llama_workdir):
  hf_model = llama_dir[1]
  model, config, tokenizer = generate.load_run(str(llama_workdir))
  m = config.model
  assert {k: m[k] for k in (*LLAMA, "num_kv_heads", "d_ff", "max_len", "dropout", "attention_dropout")} == dict(
      LLAMA, num_kv_heads=2, d_ff=48, max_len=64, dropout=0.0, attention_dropout=0.05)
  assert "wpe" not in nnx.state(model, nnx.Param) and "kv" in nnx.state(model, nnx.Param)["h"]["blocks"][0]["attn"]
  ids = _ids(tokenizer.vocab_size, seed=12)
  _close(_logits(model, jnp.asarray(ids)), _hf_logits(hf_model, ids))
  # Two documents packed in one row: fmjax restarts the rotary positions at the second and keeps it from
  # attending the first, which gives HF's logits of each document alone.
  cut = 6
  positions_BT = np.concatenate([np.arange(cut), np.arange(T - cut)])[None]
  segments_BT = np.array([[1] * cut + [2] * (T - cut)])
  packed_BTV = nnx.jit(lambda mdl, x, p, s: mdl(x, positions_BT=p, segment_ids_BT=s))(
      model, jnp.asarray(ids[:1]), jnp.asarray(positions_BT), jnp.asarray(segments_BT))
  _close(packed_BTV, np.concatenate([_hf_logits(hf_model, ids[:1, :cut]), _hf_logits(hf_model, ids[:1, cut:])], 1))


def test_llama_round_trip_keeps_every_tensor_and_generates_in_transformers_what_fmjax_does(llama_dir, llama_workdir,
                                                                                             tmp_path, bpe):
  """The export of the imported workdir is the original checkpoint; greedy decoding (fmjax's KV cache of
  rotated keys) continues a prompt with transformers' tokens."""
  out = tmp_path / "hf"
  assert cli.main(["export", f"--workdir={llama_workdir}", f"--out={out}"]) == 0
  original, exported = (interop.read_hf_weights(str(d)) for d in (llama_dir[0], out))
  assert set(exported) == set(original) and "lm_head.weight" in exported
  for name in original:
    np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
  hf_in, hf_out = (json.loads((d / "config.json").read_text()) for d in (llama_dir[0], out))
  same = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "vocab_size", "attention_bias",
          "mlp_bias", "attention_dropout", "hidden_act", "model_type", "architectures")
  assert {k: hf_out[k] for k in same} == {k: hf_in[k] for k in same}
  assert hf_out["rope_theta"] == 500.0 and hf_out["torch_dtype"] == "float32"
  assert hf_out["bos_token_id"] == hf_out["eos_token_id"] == bpe.eos_id

  prompt = "The with statement"
  ours = generate.run(str(llama_workdir), prompts=[prompt], max_new_tokens=8, temperature=0.0)[0]
  auto = transformers.AutoTokenizer.from_pretrained(out)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  theirs, prompt_ids = _greedy_in_transformers(hf_model, auto, prompt)
  assert prompt_ids[0] == bpe.eos_id  # a prompt opens with <eos>, as in `fmjax generate`
  assert theirs == ours


@pytest.mark.parametrize("kv_heads,tied,use_bias,scan", [(2, False, False, True), (0, True, True, False)],
                         ids=["grouped_untied_scanned", "tied_with_biases"])
def test_llama_export_matches_transformers(tmp_path, bpe, kv_heads, tied, use_bias, scan):
  model, cfg = _random_fmjax("gpt", bpe.vocab_size, seed=13, **dict(LLAMA, tie_embeddings=tied, use_bias=use_bias),
                             num_kv_heads=kv_heads, scan_layers=scan)
  interop.export_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg, str(tmp_path), bpe)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert type(hf_model).__name__ == "LlamaForCausalLM"
  hf = json.loads((tmp_path / "config.json").read_text())
  assert {k: hf[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                             "rms_norm_eps", "rope_theta", "max_position_embeddings", "tie_word_embeddings",
                             "attention_bias", "mlp_bias")} == dict(
      num_attention_heads=4, num_key_value_heads=kv_heads or 4, head_dim=8, intermediate_size=64, rms_norm_eps=1e-5,
      rope_theta=500.0, max_position_embeddings=64, tie_word_embeddings=tied, attention_bias=use_bias,
      mlp_bias=use_bias)
  weights = interop.read_hf_weights(str(tmp_path))
  assert ("lm_head.weight" in weights) != tied
  assert weights["model.layers.1.self_attn.k_proj.weight"].shape == ((kv_heads or 4) * 8, 32)
  ids = _ids(bpe.vocab_size, seed=13)
  _close(_logits(model, jnp.asarray(ids)), _hf_logits(hf_model, ids))


@pytest.mark.parametrize("mistral", [False, True], ids=["tied_llama_with_biases", "mistral"])
def test_tied_llama_with_biases_and_mistral_import_with_parity(bpe, mistral):
  """A Mistral whose window covers its positions is Llama (sliding_window null: Mistral v0.2 on)."""
  kw = dict(sliding_window=None) if mistral else dict(tie_word_embeddings=True, num_key_value_heads=4,
                                                      attention_bias=True, mlp_bias=True)
  hf_model = _llama(bpe.vocab_size, seed=14, layers=1, mistral=mistral, **kw)
  config = _model_config("gpt", hf_model)
  assert (config.model.use_bias, config.model.tie_embeddings, config.model.num_kv_heads) == (
      (False, False, 2) if mistral else (True, True, 0))
  model = nnx.merge(nnx.graphdef(models.abstract_model(config.model)), _fmjax_params_from_hf(hf_model, config))
  ids = _ids(bpe.vocab_size, seed=14)
  _close(_logits(model, jnp.asarray(ids)), _hf_logits(hf_model, ids))
  if not mistral:  # an lm_head that is not the embeddings, under tie_word_embeddings=true: another model
    weights = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"] + 1
    with pytest.raises(ConfigError, match="lm_head.weight differs from the input embeddings, but config.json says "
                                          r"tie_word_embeddings=true; fix config.json \(tie_word_embeddings=false\)"):
      interop.hf_to_params(weights, config)


def test_llama_classifier_exports_as_llama_for_sequence_classification_without_its_lm_head(tmp_path, bpe):
  """A fine-tuned Llama's trunk keeps its (unused) untied lm_head; HF's classifier has none, so it is left out.
  Imported back, the trunk is the same and the lm_head fresh, as a BERT classifier's MLM head is."""
  model, cfg = _random_fmjax("gpt", bpe.vocab_size, seed=17, **LLAMA, num_kv_heads=2)
  kernel_DC = np.random.default_rng(17).standard_normal((32, 3)).astype(np.float32)
  params = dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)), classifier={"kernel": kernel_DC})
  interop.export_params(params, cfg, str(tmp_path), bpe)
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
  assert type(hf_model).__name__ == "LlamaForSequenceClassification"
  assert "lm_head.weight" not in interop.read_hf_weights(str(tmp_path))
  ids = _ids(bpe.vocab_size, seed=17)  # no pad ids: HF pools the last token, as fmjax's GPT head does
  h_BTD = nnx.jit(lambda m, x: m.hidden(x))(model, jnp.asarray(ids))
  _close(np.asarray(h_BTD)[:, -1] @ kernel_DC, _hf_logits(hf_model, ids))

  workdir = tmp_path / "imported"
  interop.import_hf(str(tmp_path), str(workdir), overrides=["model.attention=xla"])
  notes = json.loads((workdir / interop.IMPORT_INFO).read_text())["notes"]
  assert "lm_head: not in the checkpoint, freshly initialised" in notes
  assert any(n.startswith("classification head (3 labels) not imported") for n in notes)
  imported, _, _ = generate.load_run(str(workdir))
  _close(nnx.jit(lambda m, x: m.hidden(x))(imported, jnp.asarray(ids)), h_BTD)
  table_VD = np.asarray(imported.lm_head.embedding[...])
  assert table_VD.shape == imported.wte.embedding.shape and 0.01 < table_VD.std() < 0.05  # normal(init_std 0.02)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_lora_on_grouped_query_attention_merges_into_the_export(tmp_path, bpe, kind):
  """LoRA targets `attn.qkv` reach q and kv in grouped-query attention; export merges them into q_proj,
  k_proj and v_proj (Qwen2's biases as they were; Qwen3's norms follow them), and transformers' logits are
  the unmerged fmjax model's."""
  from fmjax import peft
  model, cfg = _random_fmjax("gpt", bpe.vocab_size, seed=15, **{**LLAMA, **QWEN.get(kind, {})}, num_kv_heads=2)
  ft = config_lib.peft_section("lora")
  ft.lora_rank = 2
  with models.sharded_if_mesh():
    peft.apply(model, ft, nnx.Rngs(15))
  state = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(15)
  pure = jax.tree_util.tree_map_with_path(  # B = 0 at init: make the update count
      lambda p, x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype) if str(p[-1].key) == "lora_b" else x,
      nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  attn = pure["h"]["blocks"][0]["attn"]
  assert all({"lora_a", "lora_b"} <= set(attn[name]) for name in ("q", "kv", "out"))
  params = interop.from_finetune(pure, ml_collections.ConfigDict({"model": cfg, "finetune": ft}))
  assert not any("lora_a" in params["h"]["blocks"][0]["attn"][name] for name in ("q", "kv"))
  interop.export_params(params, cfg, str(tmp_path))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert type(hf_model).__name__ == f"{kind.title()}ForCausalLM"
  ids = _ids(bpe.vocab_size, seed=15)
  _close(_logits(model, jnp.asarray(ids)), _hf_logits(hf_model, ids))


@pytest.mark.parametrize("changes,differs", [
    (dict(positions="rope"), "model.positions=rope (not learned) and from Llama's in model.norm=layernorm (not "
                             "rmsnorm), model.mlp=gelu (not swiglu);"),
    (dict(mlp="swiglu"), "model.mlp=swiglu (not gelu) and from Llama's in model.positions=learned (not rope), "
                         "model.norm=layernorm (not rmsnorm);"),
    (dict(norm="rmsnorm", use_bias=False, tie_embeddings=False),
     "model.norm=rmsnorm (not layernorm), model.use_bias=false (not true), model.tie_embeddings=false (not true) and "
     "from Llama's in model.positions=learned (not rope), model.mlp=gelu (not swiglu);"),
    (dict(LLAMA, qk_norm=True, use_bias=True),  # Llama's with q/k norms, or Qwen3's with biases
     "model.positions=rope (not learned), model.norm=rmsnorm (not layernorm), model.mlp=swiglu (not gelu), "
     "model.qk_norm=true (not false), model.tie_embeddings=false (not true), from Llama's in model.qk_norm=true (not "
     "false) and from Qwen3's in model.use_bias=true (not false);"),
    (dict(LLAMA, qkv_bias=True, qk_norm=True),
     "model.positions=rope (not learned), model.norm=rmsnorm (not layernorm), model.mlp=swiglu (not gelu), "
     "model.use_bias=false (not true), model.qkv_bias=true (not false), model.qk_norm=true (not false), "
     "model.tie_embeddings=false (not true), from Qwen2's in model.qk_norm=true (not false) and from Qwen3's in "
     "model.qkv_bias=true (not false);"),
], ids=["rope_layernorm", "swiglu_learned", "rmsnorm_learned", "qk_norm_with_biases", "qkv_bias_and_qk_norm"])
def test_export_of_a_decoder_hugging_face_lacks_is_one_line_naming_how_it_differs(tmp_path, changes, differs):
  _, cfg = _random_fmjax("gpt", 128, seed=16, **changes)
  with pytest.raises(ConfigError, match=r"^this decoder has no Hugging Face counterpart: it differs from GPT-2's "
                                        rf"architecture in {re.escape(differs)} export takes GPT-2's") as e:
    interop.export_params({}, cfg, str(tmp_path / "out"))
  assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_llama_settings_fmjax_lacks_are_refused_in_one_line(llama_dir, tmp_path):
  hf = json.loads((llama_dir[0] / "config.json").read_text())
  supported = "; fmjax's rotary positions take rope_type default, linear and llama3$"
  yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
  llama3 = dict(SCALINGS["llama3"])
  for changes, match in ((dict(rope_scaling=yarn), r"^unsupported Hugging Face config: rope_type='yarn' \(rope_scaling="
                                                   r"\{'rope_type': 'yarn', 'factor': 4.0, .*\}\)" + supported),
                         (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0}),
                          r"rope_type='dynamic' \(rope_scaling=\{.*\}\)" + supported),
                         (dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}),
                          "rope_type='longrope'.*" + supported),
                         (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5; fmjax rotates every dimension"),
                         (dict(rope_scaling={k: v for k, v in llama3.items() if k != "low_freq_factor"}),
                          r"rope_type='llama3' without low_freq_factor \(rope_scaling="),
                         (dict(rope_scaling=dict(llama3, low_freq_factor=4.0, high_freq_factor=1.0)),
                          r"low_freq_factor=4.0 with high_freq_factor=1.0 \(rope_type 'llama3'\); the low one must be "
                          "positive and below the high one"),
                         (dict(hidden_act="gelu"), "hidden_act='gelu'; fmjax's SwiGLU gates with silu"),
                         (dict(attention_bias=True), "attention_bias=true with mlp_bias=false"),
                         (dict(model_type="mistral", sliding_window=8),
                          r"sliding_window=8 \(below max_position_embeddings=64\)"),
                         (dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"]),
                          r"model_type='qwen2_moe' \(architectures: Qwen2MoeForCausalLM\); fmjax imports gpt2, llama, "
                          "mistral, qwen2, qwen3 and bert checkpoints")):
    with pytest.raises(ConfigError, match=match) as e:
      interop.model_settings_from_hf({**hf, **changes})
    assert "\n" not in str(e.value)
  # Heads of a width of their own (model.head_dim) are fmjax's too.
  assert interop.model_settings_from_hf({**hf, "head_dim": 16})["head_dim"] == 16
  scaled = _copy_with_config(llama_dir[0], tmp_path / "scaled", rope_scaling=yarn)
  with pytest.raises(ConfigError, match="^unsupported Hugging Face config: rope_type='yarn'"):
    interop.import_hf(str(scaled), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


# Rotary scaling, at positions past those of pretraining: original_max_position_embeddings 16 of 64, rows of 48.
# llama3's low/high_freq_factor are off Llama 3's 1 and 4 so that the 4 frequencies of an 8-wide head fall in
# all of its three bands (kept, blended, divided by the factor), and so that a mapping that dropped them shows.
SCALINGS = {"llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 0.5, "high_freq_factor": 2.0,
                       "original_max_position_embeddings": 16},
            "linear": {"rope_type": "linear", "factor": 4.0}}
SCALED_SETTINGS = {"llama3": dict(rope_scaling="llama3", rope_factor=4.0, rope_low_freq_factor=0.5,
                                  rope_high_freq_factor=2.0, rope_original_max_len=16),
                   "linear": dict(rope_scaling="linear", rope_factor=4.0)}
LONG = 48


def _unscaled(model, model_cfg):
  """The same weights without the rotary scaling: the logits a parity test must tell apart from the scaled."""
  cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  cfg.update({k: models.ARCHITECTURE_DEFAULTS[k] for k in ("rope_scaling", *models.ROPE_SCALING_READS["llama3"])})
  return nnx.merge(nnx.graphdef(models.abstract_model(cfg)), nnx.state(model))


@pytest.mark.parametrize("kind,spelling,scan", [("llama3", "rope_scaling", False), ("llama3", "rope_parameters", True),
                                                ("linear", "rope_parameters", False), ("linear", "type", False)],
                         ids=["llama3_as_meta_writes_it", "llama3_transformers5_scanned", "linear_transformers5",
                              "linear_as_type"])
def test_scaled_llama_imports_and_exports_with_parity_past_its_original_positions(tmp_path, bpe, kind, spelling, scan):
  """Llama 3.1 / 3.2's scaling (llama3) and linear, written as transformers 5 does (rope_parameters), as Meta's
  Llama 3.1 and 3.2 config.json and transformers 4 do (rope_theta and rope_scaling), and as older linear configs
  do (`type`): imported logits equal transformers' past original_max_position_embeddings, where the unscaled
  model's differ; the export writes the scaling back as rope_scaling, which transformers reads to the same logits."""
  hf_model = _llama(bpe.vocab_size, seed=21, rope_scaling=dict(SCALINGS[kind]))
  hf_dir = tmp_path / "hf"
  hf_model.save_pretrained(hf_dir)
  _write_tokenizer_files(bpe, hf_dir, "GPT2Tokenizer")
  hf_cfg = json.loads((hf_dir / "config.json").read_text())
  assert hf_cfg["rope_parameters"] == {**SCALINGS[kind], "rope_theta": 500.0} and "rope_scaling" not in hf_cfg
  if spelling != "rope_parameters":
    rope = hf_cfg.pop("rope_parameters")
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if spelling == "type":
      scaling["type"] = scaling.pop("rope_type")
    (hf_dir / "config.json").write_text(json.dumps({**hf_cfg, "rope_theta": rope["rope_theta"],
                                                    "rope_scaling": scaling}))
  interop.import_hf(str(hf_dir), str(tmp_path / "w"), overrides=["model.attention=xla",
                                                                   f"model.scan_layers={str(scan).lower()}"])
  model, config, _ = generate.load_run(str(tmp_path / "w"))
  want = {**{k: models.ARCHITECTURE_DEFAULTS[k] for k in models.ROPE_SCALING_READS["llama3"]},
          **SCALED_SETTINGS[kind], "rope_theta": 500.0}
  assert {k: config.model[k] for k in want} == want
  ids = _ids(bpe.vocab_size, seed=21, shape=(B, LONG))
  hf_BTV = _hf_logits(hf_model, ids)
  if spelling != "rope_parameters":  # transformers reads the rewritten config.json as the model it saved
    _close(_hf_logits(transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval(), ids), hf_BTV, atol=0)
  ours_BTV = _logits(model, jnp.asarray(ids))
  _close(ours_BTV, hf_BTV)
  assert np.abs(np.asarray(_logits(_unscaled(model, config.model), jnp.asarray(ids))) - hf_BTV).max() > 1e-2

  out = tmp_path / "export"
  interop.export(str(tmp_path / "w"), str(out))
  exported = json.loads((out / "config.json").read_text())
  assert exported["rope_scaling"] == SCALINGS[kind] and exported["rope_theta"] == 500.0
  original, weights = interop.read_hf_weights(str(hf_dir)), interop.read_hf_weights(str(out))
  assert set(weights) == set(original)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert reloaded.config.rope_parameters == {**SCALINGS[kind], "rope_theta": 500.0}
  _close(_hf_logits(reloaded, ids), hf_BTV, atol=0)


@pytest.mark.parametrize("kind", ["llama3", "linear"])
def test_scaled_llama_export_matches_transformers_past_its_original_positions(tmp_path, bpe, kind):
  """An fmjax model with rotary scaling (random weights, grouped-query attention) exports to a LlamaForCausalLM
  with the same logits, past the original positions, where the unscaled model's differ."""
  model, cfg = _random_fmjax("gpt", bpe.vocab_size, seed=22, **LLAMA, num_kv_heads=2, **SCALED_SETTINGS[kind])
  interop.export_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg, str(tmp_path), bpe)
  assert json.loads((tmp_path / "config.json").read_text())["rope_scaling"] == SCALINGS[kind]
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert hf_model.config.rope_parameters == {**SCALINGS[kind], "rope_theta": 500.0}
  ids = _ids(bpe.vocab_size, seed=22, shape=(B, LONG))
  ours_BTV, hf_BTV = _logits(model, jnp.asarray(ids)), _hf_logits(hf_model, ids)
  _close(ours_BTV, hf_BTV)
  assert np.abs(np.asarray(_logits(_unscaled(model, cfg), jnp.asarray(ids))) - hf_BTV).max() > 1e-2


@pytest.mark.parametrize("settings", [dict(head_dim=128, theta=500000.0, factor=8.0, original=8192),  # Llama 3.1 8B
                                      dict(head_dim=64, theta=500000.0, factor=32.0, original=8192)],  # Llama 3.2 1B
                         ids=["llama_3.1_8b", "llama_3.2_1b"])
def test_llama3_frequencies_are_transformers_at_llama_3s_own_settings(settings):
  """fmjax's inverse frequencies (float64, rounded once) are transformers' (float32 throughout) to float32's
  precision at Llama 3's sizes, where every band of the rule holds frequencies."""
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  d = settings["head_dim"]
  scaling = {"rope_type": "llama3", "factor": settings["factor"], "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": settings["original"]}
  hf_cfg = transformers.LlamaConfig(hidden_size=d * 4, num_attention_heads=4, head_dim=d,
                                    max_position_embeddings=131072, rope_theta=settings["theta"], rope_scaling=scaling)
  theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
  ours = models.rope_frequencies(d, settings["theta"], "llama3", settings["factor"], 1.0, 4.0, settings["original"])
  assert ours.dtype == np.float32
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=2e-6, atol=0)
  assert not np.allclose(ours, models.rope_frequencies(d, settings["theta"]), rtol=1e-3)


def test_a_llama_3_2_config_of_131072_positions_imports_without_tables_of_that_length(llama_dir, llama_workdir,
                                                                                      tmp_path):
  """Llama 3.2's max_position_embeddings=131072 with its llama3 scaling: the import allocates nothing by the
  positions (no position table: the same parameters as the 64-position model), trains on the config's own rows,
  and generates with a KV cache of the prompt and the new tokens; logits are transformers'."""
  llama_32 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
  hf_dir = _copy_with_config(llama_dir[0], tmp_path / "hf", max_position_embeddings=131072,
                             rope_parameters={**llama_32, "rope_theta": 500000.0})
  config = interop.import_hf(str(hf_dir), str(tmp_path / "w"), overrides=["model.attention=xla"])
  assert config.model.max_len == 131072 and config.data.seq_len == 128
  m = config.model
  assert (m.rope_theta, m.rope_scaling, m.rope_factor, m.rope_original_max_len) == (500000.0, "llama3", 32.0, 8192)
  shapes = lambda w: jax.tree.map(np.shape, interop.read_params(str(w), 0))
  assert shapes(tmp_path / "w") == shapes(llama_workdir)
  model, _, _ = generate.load_run(str(tmp_path / "w"))
  ids = _ids(llama_dir[1].config.vocab_size, seed=23)
  _close(_logits(model, jnp.asarray(ids)),
         _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval(), ids))
  assert len(generate.run(str(tmp_path / "w"), prompts=["The with statement"], max_new_tokens=4,
                          temperature=0.0)) == 1


# ----------------------------------------------------------------------------- Qwen


# What import makes of each (Llama's positions, norm and MLP besides): Qwen2's biases on q, k and v alone, tied as
# Qwen2.5's small sizes are; Qwen3's q/k norms over heads 16 wide (hidden_size / heads is 8: Qwen3-0.6B's heads are
# 128 at 1024 / 16), untied.
QWEN = {"qwen2": dict(use_bias=False, qkv_bias=True, qk_norm=False, head_dim=0, tie_embeddings=True),
        "qwen3": dict(use_bias=False, qkv_bias=False, qk_norm=True, head_dim=16, tie_embeddings=False)}


def _qwen(kind, vocab, seed=0, layers=2, **kw):
  """A random HF Qwen2ForCausalLM or Qwen3ForCausalLM (`QWEN`): 4 query heads sharing 2 key/value heads, rope_theta
  and eps off their defaults."""
  settings = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                  rope_theta=500.0, tie_word_embeddings=QWEN[kind]["tie_embeddings"])
  if kind == "qwen3":
    settings["head_dim"] = QWEN[kind]["head_dim"]
  cfg = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[kind](**{**settings, **kw})
  return _perturb(transformers.AutoModelForCausalLM.from_config(cfg), seed)


@pytest.fixture(scope="module", params=list(QWEN))
def qwen_run(request, tmp_path_factory, bpe):
  """(kind, HF directory, HF model, the fmjax workdir imported from it), for Qwen2 and for Qwen3."""
  kind = request.param
  d = tmp_path_factory.mktemp(f"hf_{kind}")
  model = _qwen(kind, bpe.vocab_size, seed=31)
  model.save_pretrained(d)
  _write_tokenizer_files(bpe, d, "GPT2Tokenizer")
  workdir = tmp_path_factory.mktemp("imported") / kind
  interop.import_hf(str(d), str(workdir), overrides=["model.attention=xla"])
  return kind, d, model, workdir


def test_qwen_import_logits_match_with_grouped_query_attention_and_packed_documents(qwen_run):
  kind, _, hf_model, workdir = qwen_run
  model, config, tokenizer = generate.load_run(str(workdir))
  m = config.model
  want = dict(QWEN[kind], positions="rope", norm="rmsnorm", mlp="swiglu", num_kv_heads=2, rope_theta=500.0,
              layer_norm_eps=1e-5)
  assert {k: m[k] for k in want} == want
  attn = jax.tree.map(np.shape, nnx.to_pure_dict(nnx.state(model, nnx.Param)))["h"]["blocks"][0]["attn"]
  if kind == "qwen2":  # biases on q, k and v; none on the output projection
    assert (attn["q"]["bias"], attn["kv"]["bias"], "bias" in attn["out"]) == ((4, 8), (2, 2, 8), False)
  else:  # a scale over a head's 16 dimensions for q and one for k; no biases
    assert (attn["q_norm"], attn["k_norm"], attn["q"]["kernel"]) == ({"scale": (16,)}, {"scale": (16,)}, (32, 4, 16))
    assert "bias" not in attn["q"]
  ids = _ids(tokenizer.vocab_size, seed=31)
  _close(_logits(model, jnp.asarray(ids)), _hf_logits(hf_model, ids))
  # Two documents packed in one row: each reads as it does alone in transformers.
  cut = 6
  positions_BT = np.concatenate([np.arange(cut), np.arange(T - cut)])[None]
  segments_BT = np.array([[1] * cut + [2] * (T - cut)])
  packed_BTV = nnx.jit(lambda mdl, x, p, s: mdl(x, positions_BT=p, segment_ids_BT=s))(
      model, jnp.asarray(ids[:1]), jnp.asarray(positions_BT), jnp.asarray(segments_BT))
  _close(packed_BTV, np.concatenate([_hf_logits(hf_model, ids[:1, :cut]), _hf_logits(hf_model, ids[:1, cut:])], 1))


def test_qwen_round_trip_keeps_every_tensor_and_generates_in_transformers_what_fmjax_does(qwen_run, tmp_path, bpe):
  """The export of the imported workdir is the original checkpoint, as a Qwen2ForCausalLM / Qwen3ForCausalLM; greedy
  decoding (fmjax's KV cache of keys normed and rotated) continues a prompt with transformers' tokens."""
  kind, hf_dir, _, workdir = qwen_run
  out = tmp_path / "hf"
  assert cli.main(["export", f"--workdir={workdir}", f"--out={out}"]) == 0
  original, exported = (interop.read_hf_weights(str(d)) for d in (hf_dir, out))
  assert set(exported) == set(original) and ("lm_head.weight" in exported) == (kind == "qwen3")
  for name in original:
    np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
  hf_in, hf_out = (json.loads((d / "config.json").read_text()) for d in (hf_dir, out))
  same = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "vocab_size", "hidden_act", "model_type",
          "architectures", "use_sliding_window", "sliding_window") + (("head_dim", "attention_bias") if kind == "qwen3"
                                                                       else ())
  assert {k: hf_out[k] for k in same} == {k: hf_in[k] for k in same}
  assert hf_out["architectures"] == [f"{kind.title()}ForCausalLM"] and hf_out["rope_theta"] == 500.0

  prompt = "The with statement"
  ours = generate.run(str(workdir), prompts=[prompt], max_new_tokens=8, temperature=0.0)[0]
  auto = transformers.AutoTokenizer.from_pretrained(out)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert _greedy_in_transformers(hf_model, auto, prompt)[0] == ours


@pytest.mark.parametrize("kind,settings", [
    ("qwen2", dict(qkv_bias=True, num_kv_heads=2, scan_layers=True)),
    ("qwen3", dict(qk_norm=True, num_kv_heads=2, head_dim=16, tie_embeddings=True)),
    ("llama", dict(head_dim=4)),  # heads of their own width are Llama's too
], ids=["qwen2_grouped_untied_scanned", "qwen3_wide_heads_tied", "llama_narrow_heads"])
def test_qwen_export_matches_transformers(tmp_path, bpe, kind, settings):
  model, cfg = _random_fmjax("gpt", bpe.vocab_size, seed=32, **{**LLAMA, **settings})
  interop.export_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg, str(tmp_path), bpe)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert type(hf_model).__name__ == f"{kind.title()}ForCausalLM"
  K, G = models.head_dim(cfg), settings.get("num_kv_heads") or 4
  assert json.loads((tmp_path / "config.json").read_text())["head_dim"] == K
  weights = interop.read_hf_weights(str(tmp_path))
  assert weights["model.layers.1.self_attn.k_proj.weight"].shape == (G * K, 32)
  assert ("model.layers.1.self_attn.q_proj.bias" in weights) == (kind == "qwen2")
  assert not any(n.endswith(("o_proj.bias", "mlp.down_proj.bias")) for n in weights)
  assert ("model.layers.1.self_attn.k_norm.weight" in weights) == (kind == "qwen3")
  ids = _ids(bpe.vocab_size, seed=32)
  _close(_logits(model, jnp.asarray(ids)), _hf_logits(hf_model, ids))


@pytest.mark.parametrize("kind", list(QWEN))
def test_qwen_classifier_exports_as_its_sequence_classifier(tmp_path, bpe, kind):
  model, cfg = _random_fmjax("gpt", bpe.vocab_size, seed=33, **{**LLAMA, **QWEN[kind]}, num_kv_heads=2)
  kernel_DC = np.random.default_rng(33).standard_normal((32, 3)).astype(np.float32)
  params = dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)), classifier={"kernel": kernel_DC})
  interop.export_params(params, cfg, str(tmp_path), bpe)
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
  assert type(hf_model).__name__ == f"{kind.title()}ForSequenceClassification"
  assert "lm_head.weight" not in interop.read_hf_weights(str(tmp_path))
  ids = _ids(bpe.vocab_size, seed=33)  # no pad ids: HF pools the last token, as fmjax's GPT head does
  h_BTD = nnx.jit(lambda m, x: m.hidden(x))(model, jnp.asarray(ids))
  _close(np.asarray(h_BTD)[:, -1] @ kernel_DC, _hf_logits(hf_model, ids))


def test_qwen_settings_fmjax_lacks_are_refused_in_one_line_and_a_window_that_is_off_imports():
  qwen2 = transformers.Qwen2Config(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64).to_dict()
  qwen3 = {**qwen2, "model_type": "qwen3", "head_dim": 16, "attention_bias": False}
  assert (qwen2["use_sliding_window"], qwen2["layer_types"]) == (False, ["full_attention"] * 2)
  window = dict(use_sliding_window=True, sliding_window=8)
  for hf, match in (({**qwen2, **window, "max_window_layers": 1, "layer_types": None},
                     r"^unsupported Hugging Face config: use_sliding_window=true, sliding_window=8 \(below "
                     r"max_position_embeddings=64\) in 1 of its 2 layers; fmjax's attention sees every earlier "
                     "position$"),
                    ({**qwen3, **window, "layer_types": ["sliding_attention"] * 2},
                     r"use_sliding_window=true, sliding_window=8 \(below max_position_embeddings=64\) in 2 of its 2"),
                    ({**qwen3, "attention_bias": True}, r"^unsupported Hugging Face config: attention_bias=true "
                     r"\(model_type 'qwen3': biases on q_proj, k_proj, v_proj and o_proj, none in the MLP\); fmjax has "
                     r"biases in every projection \(model.use_bias\) or on q, k and v alone \(model.qkv_bias\)$"),
                    ({**qwen2, "layer_types": ["full_attention", "linear_attention"]},
                     "^unsupported Hugging Face config: layer_types holds linear_attention; fmjax's layers are all "
                     "full attention$")):
    with pytest.raises(ConfigError, match=match) as e:
      interop.model_settings_from_hf(hf)
    assert "\n" not in str(e.value)
  # A window no narrower than the positions, one in no layer (max_window_layers past the last), or one switched off
  # (use_sliding_window=false: transformers reads sliding_window as None) sees every earlier position.
  for hf in ({**qwen2, "use_sliding_window": True, "sliding_window": 64},
             {**qwen2, **window, "max_window_layers": 2, "layer_types": None},
             {**qwen3, "sliding_window": 8, "layer_types": ["sliding_attention"] * 2}):
    settings = interop.model_settings_from_hf(hf)
    assert {k: settings[k] for k in QWEN[hf["model_type"]] if k != "tie_embeddings"} == {
        k: v for k, v in QWEN[hf["model_type"]].items() if k != "tie_embeddings"}


# ----------------------------------------------------------------------------- gradients


def _fmjax_params_from_hf(hf_model, config):
  weights = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  params, _, _ = interop.hf_to_params(weights, config)
  return jax.tree.map(jnp.asarray, params)


def _hf_grads(hf_model):
  return {n: p.grad.numpy() for n, p in hf_model.named_parameters() if p.grad is not None}


def _compare_grads(ours_hf, theirs, unused=()):
  """Every HF parameter's grad equals ours; `unused` are ours that HF lacks (they must be zero)."""
  assert set(theirs) == set(ours_hf) - set(unused)
  for name, g in ours_hf.items():
    _close(g, theirs[name] if name in theirs else 0.0)
  assert max(np.abs(g).max() for g in theirs.values()) > 1e-2  # the comparison is not of zeros


def _model_config(family, hf_model):
  config = config_lib.base_config(family)
  config.model.update(interop.model_settings_from_hf(hf_model.config.to_dict()))
  config.model.update(attention="xla", dropout=0.0, attention_dropout=0.0)
  return config


def test_gpt2_clm_loss_gradients_match(bpe):
  hf_model = _gpt2(bpe.vocab_size, seed=7, layers=1)  # one layer: the backward pass compiles in half the time
  ids = _ids(bpe.vocab_size, seed=7)
  loss_t = hf_model(torch.from_numpy(ids), labels=torch.from_numpy(ids)).loss
  loss_t.backward()
  config = _model_config("gpt", hf_model)
  graphdef = nnx.graphdef(models.abstract_model(config.model))

  def loss_fn(params):
    model = nnx.merge(graphdef, params)
    batch = {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
             "positions": None, "segment_ids": None, "loss_weights": jnp.ones((B, T - 1))}
    loss, aux = objectives.clm_loss(model, batch)
    return loss / aux["weight_sum"]

  params = _fmjax_params_from_hf(hf_model, config)
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  _close(loss, loss_t.item())
  _compare_grads(interop.params_to_hf(grads, config.model), _hf_grads(hf_model))


def test_bert_mlm_loss_gradients_match(wordpiece):
  hf_model = _perturb(transformers.BertForMaskedLM(_bert_config(wordpiece.vocab_size, layers=1)), 8)
  ids = _ids(wordpiece.vocab_size, seed=8)
  positions_BM = np.array([[1, 4, 9], [0, 7, 15]])
  labels = np.full_like(ids, -100)
  targets_BM = _ids(wordpiece.vocab_size, seed=9, shape=positions_BM.shape)
  np.put_along_axis(labels, positions_BM, targets_BM, axis=1)
  hf_model(torch.from_numpy(ids), labels=torch.from_numpy(labels)).loss.backward()
  config = _model_config("bert", hf_model)
  graphdef = nnx.graphdef(models.abstract_model(config.model))

  def loss_fn(params):
    model = nnx.merge(graphdef, params)
    logits_BMV = model(jnp.asarray(ids), mlm_positions_BM=jnp.asarray(positions_BM))
    loss, weight, _ = objectives.cross_entropy(logits_BMV, jnp.asarray(targets_BM), jnp.ones(positions_BM.shape))
    return loss / weight

  grads = jax.jit(jax.grad(loss_fn))(_fmjax_params_from_hf(hf_model, config))
  pooler = ("bert.pooler.dense.weight", "bert.pooler.dense.bias")  # BertForMaskedLM has no pooler
  _compare_grads(interop.params_to_hf(grads, config.model), _hf_grads(hf_model), unused=pooler)


# ----------------------------------------------------------------------------- tokenizers


SAMPLES = ["Hello World, the  quick brown fox's déjà vu: x = [1, 2]\n\tdef f(): return 42",
           "UPPER case and MiXeD, numbers 3.14159 and e-mail a.b@example.com!",
           "  leading spaces, trailing tabs\t\t", "<|endoftext|> between documents <|endoftext|>"]


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_hf_tokenizer_files_encode_like_transformers(kind, tmp_path, texts, bpe, wordpiece):
  tokenizer, cls = (wordpiece, "BertTokenizer") if kind == "wordpiece" else (bpe, "GPT2Tokenizer")
  _write_tokenizer_files(tokenizer, tmp_path, cls)
  ours = data.load_hf(str(tmp_path))
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
  for text in SAMPLES + texts[:20]:
    # fmjax reads a special token's name in text as text, as transformers does when told to split them.
    assert ours.encode(text) == theirs(text, add_special_tokens=False, split_special_tokens=True)["input_ids"], \
        text[:60]


# ----------------------------------------------------------------------------- bad input


def test_unsupported_architecture_is_one_clear_line(gpt_dir, tmp_path):
  src = tmp_path / "t5"
  src.mkdir()
  (src / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}))
  with pytest.raises(ConfigError, match=r"unsupported architecture: model_type='t5'.*T5ForConditionalGeneration") as e:
    interop.import_hf(str(src), str(tmp_path / "w"))
  assert "\n" not in str(e.value)
  assert not (tmp_path / "w").exists()


def test_config_weight_shape_mismatch_is_one_clear_line(gpt_dir, tmp_path):
  src = tmp_path / "bad"
  src.mkdir()
  for f in os.listdir(gpt_dir[0]):
    os.symlink(gpt_dir[0] / f, src / f)
  cfg = json.loads((gpt_dir[0] / "config.json").read_text())
  cfg["n_embd"] = 64
  (src / "config.json").unlink()
  (src / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConfigError, match=r"do not match config.json: transformer.wte.weight has shape \(\d+, 32\)") as e:
    interop.import_hf(str(src), str(tmp_path / "w"))
  assert "\n" not in str(e.value)
  assert not (tmp_path / "w").exists() and not (tmp_path / "w.importing").exists()


def test_missing_tokenizer_is_one_clear_line_through_the_cli(gpt_dir, tmp_path, capsys):
  src = tmp_path / "notok"
  src.mkdir()
  for f in ("config.json", "model.safetensors"):
    os.symlink(gpt_dir[0] / f, src / f)
  assert cli.main(["import-hf", f"--model_dir={src}", f"--workdir={tmp_path / 'w'}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "no tokenizer files" in err and "\n" not in err


def test_a_sentencepiece_tokenizer_model_alone_is_named_with_its_conversion(gpt_dir, tmp_path):
  """A Llama 2 / Mistral directory with tokenizer.model only: the message names it and how to write tokenizer.json,
  not "no tokenizer files" beside the very file the model's repository has."""
  src = tmp_path / "spm"
  src.mkdir()
  for f in ("config.json", "model.safetensors"):
    os.symlink(gpt_dir[0] / f, src / f)
  (src / "tokenizer.model").write_bytes(b"\x0a\x00")
  with pytest.raises(ConfigError, match=r"SentencePiece tokenizer.model but no tokenizer.json.*save_pretrained") as e:
    interop.import_hf(str(src), str(tmp_path / "w"))
  assert "\n" not in str(e.value) and not (tmp_path / "w").exists()
  assert not (tmp_path / "w").exists()


def test_export_refuses_unmerged_lora_params(tmp_path):
  model, cfg = _random_fmjax("gpt", 128, seed=9)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  params["h"]["blocks"][0]["attn"]["qkv"]["lora_a"] = np.zeros((32, 4), np.float32)
  with pytest.raises(ConfigError, match="no Hugging Face counterpart.*lora_a.*merge"):
    interop.export_params(params, cfg, str(tmp_path / "out"))


def test_corrupt_hf_files_are_one_line_naming_the_file(gpt_dir, tmp_path):
  broken = tmp_path / "broken"
  shutil.copytree(gpt_dir[0], broken)
  weights = broken / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:100])  # a truncated download
  with pytest.raises(ConfigError, match=r"model.safetensors cannot be read .*download it again") as e:
    interop.read_hf_weights(str(broken))
  assert "\n" not in str(e.value)
  (broken / "tokenizer.json").write_text("<html>not a tokenizer</html>")
  with pytest.raises(ConfigError, match=r"tokenizer.json is not a valid tokenizer.json") as e:
    interop.read_hf_tokenizer(str(broken))
  assert "\n" not in str(e.value)


def test_layer_norm_epsilon_comes_from_the_hf_config_and_goes_back_to_it():
  for hf, key in ((transformers.GPT2Config(layer_norm_epsilon=1e-3), "layer_norm_epsilon"),
                  (transformers.BertConfig(layer_norm_eps=1e-3), "layer_norm_eps"),
                  (transformers.LlamaConfig(rms_norm_eps=1e-3), "rms_norm_eps")):
    settings = interop.model_settings_from_hf(hf.to_dict())
    assert settings["layer_norm_eps"] == 1e-3, hf.model_type
    model_cfg = config_lib.base_config(settings["family"]).model
    model_cfg.update(settings)
    assert interop.hf_config(model_cfg)[key] == 1e-3


def test_a_llama_config_json_keeps_the_key_order_of_earlier_exports():
  """A Llama's config.json is written as before Qwen (the same bytes, so a release's checksums stay the same): its
  biases after rope_scaling. Qwen's keys follow the same order, with no mlp_bias."""
  model_cfg = config_lib.load_config("configs/gpt.py:tiny,llama").model
  assert list(interop.hf_config(model_cfg)) == [
      "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
      "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
      "rms_norm_eps", "rope_theta", "rope_scaling", "attention_bias", "mlp_bias", "attention_dropout",
      "initializer_range", "tie_word_embeddings", "dtype", "torch_dtype"]
  model_cfg.update(use_bias=False, qk_norm=True)
  qwen3 = interop.hf_config(model_cfg)
  assert qwen3["model_type"] == "qwen3" and qwen3["attention_bias"] is False and "mlp_bias" not in qwen3
  assert list(qwen3).index("attention_bias") == list(qwen3).index("rope_scaling") + 1


def _copy_with_config(src, dst, **changes):
  """A copy of the HF directory `src` whose config.json has `changes`."""
  shutil.copytree(src, dst)
  cfg = json.loads((dst / "config.json").read_text())
  (dst / "config.json").write_text(json.dumps({**cfg, **changes}))
  return dst


def test_overrides_that_would_import_another_model_are_refused(gpt_dir, tmp_path):
  """The head count splits the same qkv kernel another way, and a layer count below the checkpoint's
  drops layers: either would import a model with other logits, silently."""
  for override, match in (("model.num_heads=2", r"--config.model.num_heads=2 contradicts .*config.json \(num_heads=4"),
                          ("model.layer_norm_eps=0.1", r"layer_norm_eps=0.1 contradicts"),
                          ("model.num_layers=1", r"num_layers=1 contradicts .*\(num_layers=2 there\)")):
    with pytest.raises(ConfigError, match=match) as e:
      interop.import_hf(str(gpt_dir[0]), str(tmp_path / "w"), overrides=[override])
    assert "\n" not in str(e.value) and not (tmp_path / "w").exists()
  # A config.json that says fewer layers than the weights hold is the same mismatch.
  fewer = _copy_with_config(gpt_dir[0], tmp_path / "fewer", n_layer=1)
  with pytest.raises(ConfigError, match=r"holds layers up to transformer.h.1 but the config has 1; fix config.json"):
    interop.import_hf(str(fewer), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_a_finetuning_or_sft_config_is_refused_naming_the_command_to_run_after(gpt_dir, bert_dir, tmp_path, capsys):
  """Under such a config the workdir would be a classifier or SFT run that holds a bare LM: `generate`
  and `finetune --config.init_from=` would refuse it as a classifier, and `eval` find no SFT data."""
  for model_dir, spec, command in ((bert_dir[0], "configs/finetune_cls.py", "finetune"),
                                   (gpt_dir[0], "configs/sft.py", "sft")):
    assert cli.main(["import-hf", f"--model_dir={model_dir}", f"--workdir={tmp_path / 'w'}", f"--config={spec}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"is a `fmjax {command}` config" in err, err
    assert f"fmjax {command} --config={spec} --config.init_from={tmp_path / 'w'}" in err
    assert not (tmp_path / "w").exists()


def test_damaged_or_mismatched_hf_files_are_one_line(gpt_dir, bert_dir, tmp_path):
  listed = _copy_with_config(gpt_dir[0], tmp_path / "listed")
  (listed / "config.json").write_text(json.dumps(["gpt2"]))
  utf16 = _copy_with_config(gpt_dir[0], tmp_path / "utf16")
  (utf16 / "config.json").write_text((utf16 / "config.json").read_text(), encoding="utf-16")
  typed = _copy_with_config(gpt_dir[0], tmp_path / "typed", n_embd="32")
  sharded = _copy_with_config(gpt_dir[0], tmp_path / "sharded")
  (sharded / "model.safetensors").rename(sharded / "model-00001-of-00001.safetensors")
  (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
  swapped = _copy_with_config(gpt_dir[0], tmp_path / "swapped", model_type="bert")  # GPT-2 weights, a BERT config
  for f in ("vocab.json", "merges.txt"):
    (swapped / f).unlink()
  shutil.copy(bert_dir[0] / "vocab.txt", swapped)
  bpe_bert = _copy_with_config(bert_dir[0], tmp_path / "bpe_bert")  # a BERT with GPT-2's tokenizer files
  (bpe_bert / "vocab.txt").unlink()
  for f in ("vocab.json", "merges.txt"):
    shutil.copy(gpt_dir[0] / f, bpe_bert)
  ours = tmp_path / "fmjax_run"  # an fmjax workdir given where an HF directory goes
  ours.mkdir()
  (ours / "config.json").write_text(json.dumps({"model": {"family": "gpt"}, "data": {}}))
  for src, match in ((ours, r"is an fmjax workdir, which needs no import: pass it as --workdir \(generate, eval, "
                            r"export\) or --config.init_from"),
                     (listed, "config.json holds a JSON list, not a Hugging Face model config"),
                     (utf16, "config.json is not UTF-8 text"),
                     (typed, "config.json has a value of the wrong type .*'d_model'"),
                     (sharded, "model.safetensors.index.json has no \"weight_map\""),
                     (swapped, "holds none of the tensors of a BERT model .*use the config.json that belongs"),
                     (bpe_bert, r"has no \[CLS\], \[SEP\], \[MASK\], which a bert model needs")):
    with pytest.raises(ConfigError, match=match) as e:
      interop.import_hf(str(src), str(tmp_path / "w"))
    assert "\n" not in str(e.value) and not (tmp_path / "w").exists(), src
  (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
  with pytest.raises(ConfigError, match="model.safetensors.index.json has no \"weight_map\" object"):
    interop.import_hf(str(sharded), str(tmp_path / "w"))
  # The index read right, the sharded checkpoint imports.
  (sharded / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"transformer.wte.weight": "model-00001-of-00001.safetensors"}}))
  interop.import_hf(str(sharded), str(tmp_path / "w"), overrides=["model.attention=xla", "model.dropout=0.0"])
  assert (tmp_path / "w" / "checkpoints").is_dir()


def test_a_llama_whose_tokenizer_opens_with_bos_is_prompted_and_exported_with_it(tmp_path, framed_tokenizer_dir):
  """Llama's tokenizer frames a text <s> ... </s>: an imported Llama is prompted from <s>, as transformers prompts it
  (greedy tokens equal); its export's tokenizer and config name <s> the BOS; and a classifier's rows
  (<s> a </s> b </s>) are what its exported tokenizer makes."""
  from fmjax import finetune
  hf_dir = tmp_path / "hf_llama"
  hf_model = _llama(320, seed=21)
  hf_model.save_pretrained(hf_dir)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(framed_tokenizer_dir / name, hf_dir / name)
  workdir = tmp_path / "run"
  interop.import_hf(str(hf_dir), str(workdir), overrides=["model.attention=xla"])
  assert "documents and prompts open with <s> (the tokenizer's BOS) and end with </s>" in json.loads(
      (workdir / interop.IMPORT_INFO).read_text())["notes"]
  prompt = "The with statement"
  ours = generate.run(str(workdir), prompts=[prompt], max_new_tokens=8, temperature=0.0)[0]
  auto = transformers.AutoTokenizer.from_pretrained(hf_dir)
  theirs, prompt_ids = _greedy_in_transformers(hf_model, auto, prompt)
  assert prompt_ids[0] == auto.bos_token_id == 1 and theirs == ours

  out = tmp_path / "export"
  interop.export(str(workdir), str(out))
  hf_out = json.loads((out / "config.json").read_text())
  assert (hf_out["bos_token_id"], hf_out["eos_token_id"]) == (1, 2)
  exported = transformers.AutoTokenizer.from_pretrained(out)
  tok = interop.run_tokenizer(str(workdir), interop.read_run_config(str(workdir)))
  assert exported(prompt)["input_ids"] == tok.encode_opening(prompt) == prompt_ids
  assert (exported.bos_token, exported.eos_token) == ("<s>", "</s>")

  model, cfg = _random_fmjax("gpt", 320, seed=21, **LLAMA)
  kernel_DC = np.random.default_rng(21).standard_normal((32, 2)).astype(np.float32)
  interop.export_params(dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)), classifier={"kernel": kernel_DC}), cfg,
                        str(tmp_path / "classifier"), tok)
  auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "classifier")
  texts = [("for x in y:", "pass"), ("The with statement", "is used to wrap a block")]
  rows = finetune.encode([(t, 0) for t in texts], tok, "gpt", 2 * T)
  enc = auto(*map(list, zip(*texts)), padding=True, return_tensors="np")
  n = enc["input_ids"].shape[1]
  assert n < 2 * T and (rows["inputs"][:, 0] == 1).all()
  np.testing.assert_array_equal(np.where(enc["attention_mask"] == 1, enc["input_ids"], -1),
                                np.where(rows["segment_ids"][:, :n] == 1, rows["inputs"][:, :n], -1))


# ----------------------------------------------------------------------------- chat templates


CHATS = [[{"role": "system", "content": "You answer in one line."},
          {"role": "user", "content": "What is a with block?"},
          {"role": "assistant", "content": "A block run inside a context manager."},
          {"role": "user", "content": " And a for loop?\n"},
          {"role": "assistant", "content": "A loop over an iterable."}],
         [{"role": "user", "content": "Écris « naïve »"}, {"role": "assistant", "content": "NAÏVE"}]]


def test_a_chat_template_survives_import_sft_and_export(tmp_path, chat_tokenizer_dirs):
  """A Llama 3 chat model's template goes from its tokenizer_config.json into the imported run's tokenizer/, on to
  an SFT run that starts from it (init_from) and that run's own tokenizer/, and into its export's
  tokenizer_config.json: transformers' `apply_chat_template` on the export gives fmjax's ids (the original's too),
  and its generation_config stops at <|eot_id|> as `fmjax generate --chat` does."""
  from fmjax import sft
  from fmjax.data import chat
  hf_dir = tmp_path / "hf_llama"
  _llama(400, seed=31).save_pretrained(hf_dir)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(chat_tokenizer_dirs["llama3"] / name, hf_dir / name)
  original = transformers.AutoTokenizer.from_pretrained(hf_dir)
  workdir = tmp_path / "imported"
  interop.import_hf(str(hf_dir), str(workdir), overrides=["model.attention=xla"])
  assert (workdir / "tokenizer" / "chat_template.jinja").read_text() == original.chat_template
  assert any("chat template is kept" in n for n in json.loads((workdir / interop.IMPORT_INFO).read_text())["notes"])

  rows = tmp_path / "chat.jsonl"
  rows.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS * 4))
  tuned = tmp_path / "sft"
  sft.run(config_lib.load_config("configs/sft.py", [
      f"init_from={workdir}", f"data.files={rows}", "sft.eval_percent=0", "data.seq_len=64", "train.batch_size=8",
      "train.steps=1", "train.progress_bar=false", "checkpoint.async_save=false"]), str(tuned))
  tok = interop.run_tokenizer(str(tuned), interop.read_run_config(str(tuned)))
  assert tok.chat_template == original.chat_template

  out = tmp_path / "export"
  interop.export(str(tuned), str(out))
  assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == original.chat_template
  exported = transformers.AutoTokenizer.from_pretrained(out)
  for messages in CHATS:
    ours = chat.encode(tok, messages, tok.chat_template)[0]
    assert exported.apply_chat_template(messages, return_dict=False) == ours
    assert original.apply_chat_template(messages, return_dict=False) == ours
  question = CHATS[1][:1]
  assert exported.apply_chat_template(question, add_generation_prompt=True, return_dict=False) == chat.encode_prompt(
      tok, question[0]["content"], tok.chat_template)
  generation = json.loads((out / "generation_config.json").read_text())
  assert generation["eos_token_id"] == [tok.eos_id, tok.hf.token_to_id("<|eot_id|>")]


def test_an_export_of_a_run_trained_in_the_built_in_template_chats_in_it(tmp_path, bpe):
  """fmjax's own tokenizer has no template; SFT gives its run the built-in one, which the export writes: transformers
  then writes a conversation, and a prompt for a reply, in fmjax's ids (its BOS and EOS are the export's)."""
  from fmjax.data import chat
  tok = tok_lib.Tokenizer(bpe.hf, bpe.kind, chat.BUILTIN_TEMPLATE)
  model, cfg = _random_fmjax("gpt", 384, seed=5)
  interop.export_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg, str(tmp_path), tok)
  exported = transformers.AutoTokenizer.from_pretrained(tmp_path)
  for messages in CHATS:
    assert exported.apply_chat_template(messages, return_dict=False) == chat.encode(tok, messages,
                                                                                    chat.BUILTIN_TEMPLATE)[0]
  assert exported.apply_chat_template(CHATS[1][:1], add_generation_prompt=True, return_dict=False) == \
      chat.encode_prompt(tok, CHATS[1][0]["content"], chat.BUILTIN_TEMPLATE)
  # A reply ends with EOS, where generation stops already.
  assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == tok.eos_id
  # Nor does a pretraining run's export (no template) claim one.
  interop.export_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg, str(tmp_path / "plain"), bpe)
  assert "chat_template" not in json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())
