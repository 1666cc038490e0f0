"""Tokenizers: exact byte-level round trip, BERT special ids, save/load, HF file formats, caching."""

import os

import pytest

from fmjax import config_lib
import fmjax.data as data
from fmjax.data import corpus, pii
from fmjax.data import tokenizers as tokenizers_lib

HERE = os.path.dirname(os.path.abspath(__file__))
TEXTS = ["Hello  wörld!\n\tTabs, 😀 emoji and ünïcödé.", "  leading spaces\r\nand CRLF\n\n\n", "x=1; y = [1::2]",
         "<|endoftext|> as plain text", ""]


def tiny(family, tmp, **over):
  config = config_lib.load_module(os.path.join(HERE, "..", "configs", f"{family}.py")).get_config("tiny")
  config.data.cache_dir = str(tmp)
  for k, v in over.items():
    config_lib.get_path(config, k)  # typo guard
    node = config
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return config


@pytest.fixture(scope="module")
def docs():
  return [t for _, t in corpus.corpus_documents()][:120]


def test_bpe_round_trip_is_exact(docs):
  tok = tokenizers_lib.train(docs, "bpe", 512, "clm")
  for text in TEXTS + docs[:20]:
    assert tok.decode(tok.encode(text)) == text
  assert tok.eos_id is not None and tok.eos_id in tok.special_ids
  assert tok.pad_id == tok.eos_id


def test_wordpiece_specials_and_save_load(docs, tmp_path):
  tok = tokenizers_lib.train(docs, "wordpiece", 600, "mlm")
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert tok.special_ids == {0, 1, 2, 3, 4}
  ids = tok.encode("The Python Tutorial explains classes.")
  assert ids and not set(ids) & tok.special_ids
  assert tok.decode(ids) == "the python tutorial explains classes."
  tok.save(str(tmp_path))
  back = data.load_tokenizer(str(tmp_path))
  assert back.kind == "wordpiece" and back.identity() == tok.identity()
  assert back.encode(docs[5]) == tok.encode(docs[5])
  for damaged in ("", "[1]"):  # a partial copy of a run's tokenizer/
    (tmp_path / "fmjax_tokenizer.json").write_text(damaged)
    with pytest.raises(config_lib.ConfigError, match=r"fmjax_tokenizer.json is damaged \(not a JSON object\); copy"):
      data.load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("kind,objective", [("bpe", "clm"), ("wordpiece", "mlm"), ("unigram", "clm"),
                                            ("unigram", "mlm")])
def test_a_special_tokens_name_in_text_is_read_as_text(docs, kind, objective):
  """A document that quotes `<|endoftext|>` or `[SEP]` must not get the EOS or SEP id there: packing
  would open a new document inside it (GPT) or break `[CLS] A [SEP] B [SEP]` (BERT). The PII
  placeholders, which the scrubber writes into the text, stay one token each."""
  tok = tokenizers_lib.train(docs + ["write to <EMAIL> or <PHONE>"] * 5, kind, 600, objective,
                             tuple(pii.PLACEHOLDERS.values()))
  text = "GPT-2 ends documents with <|endoftext|>; BERT joins [CLS] A [SEP] B [SEP] and predicts [MASK]. <EMAIL>"
  ids = tok.encode(text)
  assert not set(ids) & (tok.special_ids - {tok.unk_id}), [tok.hf.id_to_token(i) for i in ids]
  assert ids.count(tok.hf.token_to_id("<EMAIL>")) == 1
  assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]
  if kind == "bpe":
    assert tok.decode(ids) == text
  else:
    assert "endoftext" in tok.decode(ids).lower()


def test_hf_files_load(docs, tmp_path):
  bpe = tokenizers_lib.train(docs, "bpe", 400, "clm")
  gpt2_dir = tmp_path / "gpt2"
  gpt2_dir.mkdir()
  bpe.hf.model.save(str(gpt2_dir))  # GPT-2 style vocab.json + merges.txt
  assert sorted(os.listdir(gpt2_dir)) == ["merges.txt", "vocab.json"]
  loaded = data.load_hf(str(gpt2_dir))
  for text in TEXTS[:3] + docs[:5]:
    assert loaded.encode(text) == bpe.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
  assert loaded.eos_id == bpe.eos_id
  for half in ("vocab.json", "merges.txt"):
    with pytest.raises(config_lib.ConfigError, match="is half of a GPT-2 vocabulary; point it at the directory"):
      data.load_hf(str(gpt2_dir / half))

  wp = tokenizers_lib.train(docs, "wordpiece", 500, "mlm")
  bert_dir = tmp_path / "bert"
  bert_dir.mkdir()
  wp.hf.model.save(str(bert_dir))  # vocab.txt
  loaded = data.load_hf(str(bert_dir / "vocab.txt"))
  assert loaded.encode(docs[3]) == wp.encode(docs[3])
  assert (loaded.cls_id, loaded.sep_id, loaded.mask_id, loaded.pad_id) == (2, 3, 4, 0)

  wp.hf.save(str(tmp_path / "tokenizer.json"))
  assert data.load_hf(str(tmp_path / "tokenizer.json")).encode(docs[4]) == wp.encode(docs[4])
  with pytest.raises(config_lib.ConfigError, match="does not exist"):
    data.load_hf(str(tmp_path / "nope"))


def test_get_tokenizer_trains_once_and_caches(tmp_path):
  config = tiny("gpt", tmp_path)
  tok = data.get_tokenizer(config)
  assert tok.vocab_size == 2048 and tok.kind == "bpe"
  (tok_dir,) = os.listdir(tmp_path / "tokenizers")
  stamp = os.path.getmtime(tmp_path / "tokenizers" / tok_dir / "tokenizer.json")
  again = data.get_tokenizer(config)
  assert again.identity() == tok.identity()
  assert os.path.getmtime(tmp_path / "tokenizers" / tok_dir / "tokenizer.json") == stamp
  # A different vocabulary size is a different tokenizer.
  config.data.tokenizer.vocab_size = 1024
  assert data.get_tokenizer(config).vocab_size == 1024
  assert len(os.listdir(tmp_path / "tokenizers")) == 2


def test_processes_that_train_one_tokenizer_at_once_all_take_the_one_saved_first(docs, tmp_path, monkeypatch):
  """A sweep's runs start together and each trains the tokenizer; WordPiece comes out differently in
  each process. The ones that lose the race to save it take the saved one, so all of them prepare
  (and share) one cache, the one a later run finds."""
  from fmjax.data import sources
  config = tiny("bert", tmp_path, **{"data.tokenizer.vocab_size": 600})
  theirs = tokenizers_lib.train(docs[:60], "wordpiece", 600, "mlm")  # what another process trained
  real_train, real_fetch, where = tokenizers_lib.train, sources.fetch_shared, []

  def fetch(config, rel, *args, **kwargs):  # the cache entry get_tokenizer saves into
    where.append(real_fetch(config, rel, *args, **kwargs))
    return where[-1]

  def train_while_another_saves(*args, **kwargs):
    mine = real_train(*args, **kwargs)
    tokenizers_lib._save_atomic(theirs, where[-1])  # the other process saves first
    return mine

  monkeypatch.setattr(sources, "fetch_shared", fetch)
  monkeypatch.setattr(tokenizers_lib, "train", train_while_another_saves)
  tok = data.get_tokenizer(config)
  assert tok.identity() == theirs.identity()
  assert tokenizers_lib.load_tokenizer(where[-1]).identity() == theirs.identity()
  monkeypatch.undo()
  assert data.get_tokenizer(config).identity() == theirs.identity()  # a later run: the same


def test_tokenizer_too_big_for_model(tmp_path):
  config = tiny("bert", tmp_path, **{"model.vocab_size": 1000})
  with pytest.raises(config_lib.ConfigError, match="model.vocab_size"):
    data.get_tokenizer(config)


def test_hf_files_that_do_not_fit_name_their_path_in_one_line(docs, tmp_path):
  bpe_dir = tmp_path / "gpt2"
  bpe_dir.mkdir()
  tokenizers_lib.train(docs, "bpe", 400, "clm").hf.model.save(str(bpe_dir))
  cases = [("bert", {"data.tokenizer.path": str(bpe_dir)}, rf"masked LM needs tokenizer tokens \['\[CLS\]', '\[SEP\]', "
            rf"'\[MASK\]'\], which the tokenizer of data.tokenizer.path='{bpe_dir}' lacks"),
           ("gpt", {"data.tokenizer.path": str(bpe_dir), "model.vocab_size": 300},
            rf"the tokenizer of data.tokenizer.path='{bpe_dir}' has 400 ids but model.vocab_size=300"),
           ("bert", {"data.tokenizer.path": str(tmp_path / "vocab.txt")},  # a BERT vocabulary saved as latin-1
            r"vocab.txt is not UTF-8 text \(byte 34\); input files must be UTF-8")]
  # A run's own tokenizer (saved into its workdir) is named as the run's.
  tokenizers_lib.save_run_tokenizer(tokenizers_lib.load_hf(str(bpe_dir)), str(tmp_path / "run"))
  own = tmp_path / "run" / tokenizers_lib.RUN_TOKENIZER
  cases.append(("gpt", {"model.vocab_size": 300},
                rf"the run's tokenizer \({own}\) has 400 ids but model.vocab_size=300"))
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "caf\xe9"]
  (tmp_path / "vocab.txt").write_bytes("\n".join(words).encode("latin-1"))
  for family, over, match in cases:
    with pytest.raises(config_lib.ConfigError, match=match) as e:
      if "data.tokenizer.path" in over:
        data.get_tokenizer(tiny(family, tmp_path / "cache", **{"data.tokenizer.kind": "hf", **over}))
      else:
        data.get_tokenizer(tiny(family, tmp_path / "cache", **over), str(tmp_path / "run"))
    assert "\n" not in str(e.value)


def test_a_vocabulary_the_trainer_cannot_make_is_one_line(docs):
  # Unigram keeps every character of the corpus: 12 pieces cannot hold them (the Rust trainer's bare Exception).
  with pytest.raises(config_lib.ConfigError, match=r"training a unigram tokenizer of data.tokenizer.vocab_size=12 "
                     r"failed \(The vocabulary is not large enough to contain all chars\); raise data.tokenizer"):
    tokenizers_lib.train(docs, "unigram", 12, "mlm")
  # The corpus's own one-line errors pass through unchanged.
  def broken():
    yield from docs[:3]
    raise config_lib.ConfigError("corpus.jsonl:4 has no field 'text'")
  with pytest.raises(config_lib.ConfigError, match=r"^corpus.jsonl:4 has no field 'text'$"):
    tokenizers_lib.train(broken(), "bpe", 400, "clm")


def _small_run(tmp, text_file, steps):
  over = {"model.num_layers": 1, "model.d_model": 32, "model.num_heads": 2, "model.d_ff": 64, "model.vocab_size": 512,
          "data.tokenizer.vocab_size": 512, "data.seq_len": 16, "train.batch_size": 8, "train.steps": steps,
          "train.eval_batches": 0, "train.progress_bar": False, "checkpoint.every_steps": 2,
          "data.dataset": "text_files", "data.files": str(text_file)}
  return tiny("gpt", tmp / "cache", **over)


def test_a_run_keeps_its_tokenizer_when_its_corpus_changes(tmp_path):
  """Editing a text_files corpus between runs must never change the token ids of a run: its resume,
  `generate` and the checkpoint meta all keep the tokenizer it started with (workdir/tokenizer)."""
  from fmjax import checkpoint as ckpt_lib, generate, train
  words = "river stone quiet engine paper window orbit garden signal copper".split()
  text = tmp_path / "corpus.txt"
  text.write_text("\n\n".join(" ".join(words[(i + j) % 10] for j in range(12)) for i in range(60)) + "\n")
  workdir = str(tmp_path / "w")
  train.run(_small_run(tmp_path, text, 2), workdir)
  first = data.load_tokenizer(os.path.join(workdir, data.RUN_TOKENIZER))
  with open(text, "a") as f:  # new words: a BPE trained anew would merge (and number) differently
    f.write("\n\n" + "\n\n".join(f"zebra{i} xylophone quokka {i} jubilant" * 3 for i in range(80)) + "\n")
  assert data.get_tokenizer(_small_run(tmp_path, text, 4)).identity() != first.identity()
  assert train.run(_small_run(tmp_path, text, 4), workdir)["step"] == 4
  assert data.load_tokenizer(os.path.join(workdir, data.RUN_TOKENIZER)).identity() == first.identity()
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    assert checkpointer.restore_meta(4)["tokenizer"] == first.identity()
  finally:
    checkpointer.close()
  text.unlink()  # generate needs no corpus: the run's own tokenizer is in its workdir
  assert generate.load_run(workdir)[2].identity() == first.identity()
  # Nor do fine-tuning and SFT from the run: they read the tokenizer it saved.
  from fmjax import config_lib, finetune, sft
  shape = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.d_ff=64", "model.vocab_size=512",
           "model.max_len=256"]
  ft = config_lib.load_config("configs/finetune_cls.py:model=gpt", shape)
  assert any(c.startswith("data.tokenizer=hf:") for c in finetune.adopt_pretrain_settings(ft, workdir))
  assert data.get_tokenizer(ft).identity() == first.identity()
  sft_config, sft_dir = config_lib.load_config("configs/sft.py", [f"init_from={workdir}"]), str(tmp_path / "s")
  tuned = sft.adopt_tokenizer(sft_config, sft_dir, sft.adopt_shape(sft_config, sft_dir))
  assert tuned.identity() == first.identity()


def test_a_template_that_opens_with_a_bos_frames_documents(framed_tokenizer_dir, docs, tmp_path):
  """Llama's tokenizer puts <s> before a text: documents (and prompts) open with it and end with </s>. fmjax's own
  tokenizers, as GPT-2's, open each with the EOS that ends the one before."""
  import json
  tok = data.load_hf(str(framed_tokenizer_dir))
  assert (tok.bos_id, tok.eos_id, tok.frames_documents) == (1, 2, True) and tok.bos_id in tok.special_ids
  assert tok.encode_opening("Hello") == [1, *tok.encode("Hello")] and 1 not in tok.encode("<s>Hello")
  tok.save(str(tmp_path / "run"))  # a run's own copy keeps the template
  assert data.load_tokenizer(str(tmp_path / "run")).bos_id == 1
  bpe = tokenizers_lib.train(docs, "bpe", 400, "clm")
  assert bpe.bos_id == bpe.eos_id and not bpe.frames_documents
  assert bpe.encode_opening("a") == [bpe.eos_id, *bpe.encode("a")]

  # tokenizer_config.json's add_bos_token overrules the template, as transformers lets it.
  spec = json.loads((framed_tokenizer_dir / "tokenizer.json").read_text())
  tokenizer_config = json.loads((framed_tokenizer_dir / "tokenizer_config.json").read_text())
  for name, template, add, bos in (("off", spec["post_processor"], False, 2), ("on", None, True, 1)):
    d = tmp_path / name
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps(dict(spec, post_processor=template)))
    (d / "tokenizer_config.json").write_text(json.dumps(dict(tokenizer_config, add_bos_token=add)))
    loaded = data.load_hf(str(d))
    assert (loaded.bos_id, loaded.frames_documents) == (bos, add), name
    assert data.load_hf(str(d / "tokenizer.json")).bos_id == bos  # the file named: what is beside it counts too
    assert loaded.encode("a b") == tok.encode("a b")
  (tmp_path / "on" / "tokenizer_config.json").write_text(json.dumps(dict(add_bos_token=True, bos_token="<bos>")))
  with pytest.raises(config_lib.ConfigError, match=r"sets add_bos_token but its bos_token '<bos>' is not a token"):
    data.load_hf(str(tmp_path / "on"))


# Conversations as SFT data holds them: a system message, turns of several lines, contents with spaces around
# them (Llama 3's template trims them), code, and characters beyond ASCII.
CONVERSATIONS = [
    [{"role": "system", "content": "You answer in one line."},
     {"role": "user", "content": "What does the with statement do?"},
     {"role": "assistant", "content": "It wraps a block in a context manager.\nSee PEP 343."},
     {"role": "user", "content": "  And the for statement?\n"},
     {"role": "assistant", "content": " It loops over an iterable. \n\n"}],
    [{"role": "user", "content": "Écris « naïve » en 🙂 majuscules"},
     {"role": "assistant", "content": "x = [1, 2]\n\tprint(x)  # NAÏVE"}],
]


def _auto_tokenizer(directory):
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_conversations_tokenise_as_transformers_apply_chat_template(chat_tokenizer_dirs, name):
  """The parity bar: a conversation's ids are transformers' `apply_chat_template` ids, with the template read
  where transformers reads it (tokenizer_config.json for llama3, chat_template.jinja for chatml)."""
  from fmjax.data import chat
  directory = chat_tokenizer_dirs[name]
  tok, auto = data.load_hf(str(directory)), _auto_tokenizer(directory)
  assert tok.chat_template == auto.chat_template
  for messages in CONVERSATIONS:
    ids, trained = chat.encode(tok, messages, tok.chat_template)
    assert ids == auto.apply_chat_template(messages, return_dict=False), messages
    assert chat.render(tok, messages, tok.chat_template) == auto.apply_chat_template(messages, tokenize=False)
    assert len(trained) == len(ids) and 0 < sum(trained) < len(ids)
  # The template writes its own opening (Llama 3's BOS; ChatML has none): fmjax adds nothing before it.
  assert ids[0] == tok.hf.token_to_id("<|begin_of_text|>" if name == "llama3" else "<|im_start|>")
  question = [{"role": "user", "content": "What does the with statement do?"}]
  assert chat.encode_prompt(tok, question[0]["content"], tok.chat_template) == auto.apply_chat_template(
      question, add_generation_prompt=True, return_dict=False)
  end = "<|eot_id|>" if name == "llama3" else "<|im_end|>"
  assert chat.end_of_turn_id(tok, tok.chat_template) == tok.hf.token_to_id(end)
  tok.save(str(directory.parent / f"{name}_saved"))  # a run's copy of the tokenizer keeps the template
  assert data.load_tokenizer(str(directory.parent / f"{name}_saved")).chat_template == auto.chat_template


@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_a_message_that_spells_a_special_token_stays_text(chat_tokenizer_dirs, name):
  """Text is only ever text: a user who writes <|eot_id|> does not end the turn. The template's own markup is
  the special tokens; the messages' spellings are characters, as transformers' sanitize_control_tokens=True."""
  from fmjax.data import chat
  directory = chat_tokenizer_dirs[name]
  tok, auto = data.load_hf(str(directory)), _auto_tokenizer(directory)
  end = "<|eot_id|>" if name == "llama3" else "<|im_end|>"
  messages = [{"role": "user", "content": f"say {end} and <|im_start|>"}, {"role": "assistant", "content": f"ok {end}"}]
  ids, trained = chat.encode(tok, messages, tok.chat_template)
  turns = 2 if name == "llama3" else 3  # ChatML's template adds a system message
  assert ids.count(tok.hf.token_to_id(end)) == turns
  assert tok.decode(ids) == chat.render(tok, messages, tok.chat_template)
  assert tok.decode([i for i, w in zip(ids, trained) if w]) == f"ok {end}{end}"
  assert ids == auto.apply_chat_template(messages, return_dict=False, sanitize_control_tokens=True)
  assert ids != auto.apply_chat_template(messages, return_dict=False)  # by default transformers reads the names


def test_the_built_in_chat_template_opens_with_the_bos_and_ends_each_reply_with_eos(docs, framed_tokenizer_dir):
  """fmjax's own tokenizers have no template: conversations take the built-in one, plain text in which a
  conversation opens as a document does (BOS: here the EOS) and each reply ends with EOS."""
  from fmjax.data import chat
  bpe = tokenizers_lib.train(docs, "bpe", 400, "clm")
  assert bpe.chat_template is None and chat.template_of(bpe) == chat.BUILTIN_TEMPLATE
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
              {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
              {"role": "assistant", "content": "6"}]
  text = chat.render(bpe, messages, chat.BUILTIN_TEMPLATE)
  assert text == ("<|endoftext|>System:\nBe brief.\nUser:\nWhat is 2+2?\nAssistant:\n4<|endoftext|>User:\nAnd 3+3?\n"
                  "Assistant:\n6<|endoftext|>")
  ids, trained = chat.encode(bpe, messages, chat.BUILTIN_TEMPLATE)
  # The opener is the BOS that `encode_opening` puts before a prompt, as SFT's (prompt, completion) rows open.
  first, second = text[len("<|endoftext|>"):-len("<|endoftext|>")].split("<|endoftext|>")
  assert ids == bpe.encode_opening(first) + [bpe.eos_id] + bpe.encode(second) + [bpe.eos_id]
  assert bpe.decode([i for i, w in zip(ids, trained) if w]) == "4<|endoftext|>6<|endoftext|>"
  assert chat.encode_prompt(bpe, "Hi", chat.BUILTIN_TEMPLATE) == bpe.encode_opening("User:\nHi\nAssistant:\n")
  assert chat.end_of_turn_id(bpe, chat.BUILTIN_TEMPLATE) == bpe.eos_id
  framed = data.load_hf(str(framed_tokenizer_dir))  # <s> ... </s>
  ids, _ = chat.encode(framed, messages[1:3], chat.BUILTIN_TEMPLATE)
  assert (ids[0], ids[-1], ids.count(framed.bos_id)) == (framed.bos_id, framed.eos_id, 1)
