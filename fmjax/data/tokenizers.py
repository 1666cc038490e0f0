"""Tokenizers: trained offline on the corpus (HF `tokenizers`), or loaded from Hugging Face files.

Kinds (config.data.tokenizer.kind):
  bpe        byte-level BPE (GPT-2 style): every string round-trips exactly; `<|endoftext|>` is EOS and pad.
  wordpiece  BERT WordPiece, lower-cased: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4.
  unigram    SentencePiece-style unigram LM (HF `tokenizers`' implementation) with the specials of the objective.
  hf         load config.data.tokenizer.path: a tokenizer.json, a BERT vocab.txt, or a directory holding one of
             those or GPT-2's vocab.json + merges.txt.
Trained tokenizers are cached under <cache_dir>/tokenizers/, keyed by the corpus, kind and vocab size.

A run that carries its own tokenizer (SFT, import-hf, a release bundle) keeps it in <workdir>/tokenizer/
and records `data.tokenizer.path="tokenizer"`, relative to the workdir, so the run still works after a
move; whoever reads a run's config.json calls `resolve_tokenizer_path(config, workdir)`. A tokenizer's
Jinja chat template (`Tokenizer.chat_template`, read from a Hugging Face directory) travels with it, as
chat_template.jinja beside tokenizer.json (`fmjax.data.chat` renders conversations with it).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from typing import Iterable, Iterator

import tokenizers as hf
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from fmjax import files
from fmjax.config_lib import ConfigError

EOS = "<|endoftext|>"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Tokenizers train on at most this much text: enough for a good vocabulary, bounded time on c4-sized data.
MAX_TRAIN_CHARS = 200_000_000
_META = "fmjax_tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers also looks first


class Tokenizer:
  """A thin wrapper over `tokenizers.Tokenizer` that knows fmjax's special ids, and its chat template if it has one."""

  chat_template: str | None = None  # Jinja source (`fmjax.data.chat`); None: fmjax's built-in one serves

  def __init__(self, tok: hf.Tokenizer, kind: str, chat_template: str | None = None):
    self.hf = tok
    self.kind = kind
    self.chat_template = chat_template
    get = tok.token_to_id
    self.eos_id = _first(get, (EOS, "</s>", "<|end_of_text|>", "[SEP]"))  # GPT-2, Llama 2 / Mistral, Llama 3
    # What opens a causal LM's document (and every prompt): the token the tokenizer's own template puts
    # before a text (Llama's <s>, Llama 3's <|begin_of_text|>), else EOS, as in GPT-2, whose
    # <|endoftext|> both ends one document and opens the next, and in fmjax's own tokenizers.
    self.bos_id = _template_opener(tok)
    if self.bos_id is None:
      self.bos_id = self.eos_id
    self.cls_id = _first(get, ("[CLS]", "<s>"))
    self.sep_id = _first(get, ("[SEP]", "</s>"))
    self.mask_id = _first(get, ("[MASK]", "<mask>"))
    self.unk_id = _first(get, ("[UNK]", "<unk>"))
    pad = _first(get, ("[PAD]", "<pad>"))
    self.pad_id = pad if pad is not None else self.eos_id if self.eos_id is not None else 0
    # The structural specials only: masking and the unigram baseline skip these. PII placeholders
    # are special to HF (kept whole) but are ordinary text to the model.
    self.special_ids = {i for i in (self.eos_id, self.bos_id, self.cls_id, self.sep_id, self.mask_id, self.unk_id,
                                    pad) if i is not None}

  @property
  def frames_documents(self) -> bool:
    """True where documents open with a BOS of their own and end with EOS (<s> ... </s>): EOS then opens
    nothing, and the target after it (the next document's BOS) is not the document's to predict."""
    return self.bos_id != self.eos_id

  @functools.cached_property
  def _reader(self) -> hf.Tokenizer:
    """What `encode` uses (`_reading_specials_as_text`), made on first use."""
    return _reading_specials_as_text(self.hf)

  @property
  def vocab_size(self) -> int:
    """Ids the tokenizer can produce, special tokens included."""
    return self.hf.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without any added special tokens.

    Text is only ever text: a special token's name written in it (`<|endoftext|>`, `[SEP]`) is read
    as those characters, not as the token, so a document that quotes one is not cut in two. Special
    ids come only from the code that places them (packing, fill-mask, fine-tuning pairs).
    """
    return self._reader.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """`encode(text)`, and each id's (start, end) characters in `text`."""
    enc = self._reader.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets

  @functools.cached_property
  def added_special_ids(self) -> frozenset[int]:
    """Ids of every token whose name `hf` reads as that token in text (the ones `encode` reads as characters)."""
    return frozenset(i for i, t in self.hf.get_added_tokens_decoder().items() if t.special)

  def encode_opening(self, text: str) -> list[int]:
    """Ids of `text` at the start of a document: `bos_id`, then `encode(text)`. Generation, SFT and
    zero-shot scoring open every prompt so, as pretraining opens every document."""
    return [self.bos_id, *self.encode(text)]

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """`encode` over many texts at once (parallel in Rust)."""
    return [e.ids for e in self._reader.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Text of `ids`; for byte-level BPE, decode(encode(s)) == s."""
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def identity(self) -> str:
    """A hash of the full tokenizer definition (vocab, merges, normalizer...), for cache keys."""
    import hashlib
    return hashlib.sha256(self.hf.to_str().encode()).hexdigest()[:16]

  def save(self, directory: str) -> None:
    """Writes tokenizer.json (loadable by HF), fmjax's small metadata file and the chat template if there is one,
    locally or into a bucket (there through a local copy, tokenizer.json last: it marks the directory whole)."""
    if files.is_remote(directory):
      with tempfile.TemporaryDirectory() as tmp:
        self.save(tmp)
        files.copy_tree(tmp, directory)
      return
    os.makedirs(directory, exist_ok=True)
    if self.chat_template is not None:
      with open(os.path.join(directory, CHAT_TEMPLATE_FILE), "w", encoding="utf-8") as f:
        f.write(self.chat_template)
    self.hf.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, _META), "w") as f:
      json.dump({"kind": self.kind}, f)


def _template_opener(tok: hf.Tokenizer) -> int | None:
  """The special token `tok`'s post-processor puts before a text (its BOS), if it puts one there."""
  try:
    enc = tok.encode("x")
  except Exception:  # pylint: disable=broad-except  # the Rust side's bare Exception: a WordPiece without [UNK]
    return None
  return enc.ids[0] if enc.ids and enc.special_tokens_mask[0] else None


def _with_add_bos_token(tok: hf.Tokenizer, config_path: str) -> hf.Tokenizer:
  """`tok` with a BOS first or not, as `add_bos_token` in tokenizer_config.json beside it says (transformers lets
  that setting overrule tokenizer.json's template); as it is where the file says nothing."""
  from tokenizers import processors
  cfg = files.read_json(config_path)
  add = cfg.get("add_bos_token") if isinstance(cfg, dict) else None
  if not isinstance(add, bool) or add == (_template_opener(tok) is not None):
    return tok
  if not add:
    tok.post_processor = None  # it only placed special tokens: ids are the text's alone
    return tok
  bos = cfg.get("bos_token")
  bos = bos.get("content") if isinstance(bos, dict) else bos
  if not isinstance(bos, str) or tok.token_to_id(bos) is None:
    raise ConfigError(f"{config_path} sets add_bos_token but its bos_token {bos!r} is not a token of the "
                      "tokenizer.json beside it; copy both files again from the model's repository")
  template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                           special_tokens=[(bos, tok.token_to_id(bos))])
  tok.post_processor = template if tok.post_processor is None else processors.Sequence([tok.post_processor, template])
  return tok


def _read_chat_template(directory: str) -> str | None:
  """The chat template of a tokenizer directory, where transformers finds it: chat_template.jinja, else
  tokenizer_config.json's `chat_template` (a string, or a list of named templates: the one named "default")."""
  path = os.path.join(directory, CHAT_TEMPLATE_FILE)
  if os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        return f.read()
    except UnicodeDecodeError:
      from fmjax.data import sources
      raise sources.not_utf8(path) from None
  cfg = files.read_json(os.path.join(directory, "tokenizer_config.json"))
  template = cfg.get("chat_template") if isinstance(cfg, dict) else None
  if isinstance(template, list):
    template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
  return template if isinstance(template, str) and template.strip() else None


def _first(get, names):
  for n in names:
    i = get(n)
    if i is not None:
      return i
  return None


RUN_TOKENIZER = "tokenizer"  # a run's own tokenizer: <workdir>/tokenizer/, recorded relative to the workdir
# The data keys that decide a trained tokenizer (the corpus it is trained on), besides data.tokenizer.
CORPUS_KEYS = ("dataset", "files", "feature", "train_split", "data_dir", "pii_scrub")


def resolve_tokenizer_path(config, workdir: str):
  """Points `config` (read from `workdir`/config.json; a dict or ConfigDict) at the run's tokenizer; returns it.

  A relative `data.tokenizer.path` that exists under the workdir is taken from there (else it stays
  relative to the current directory, as a user wrote it). Runs written before paths were relative
  recorded `<old workdir>/tokenizer`: once that is gone, the workdir's own tokenizer/ stands in.
  """
  tok = config["data"]["tokenizer"] if "data" in config else None
  if not tok or tok["kind"] != "hf" or not tok["path"]:
    return config
  path, own = os.path.expanduser(tok["path"]), os.path.join(workdir, RUN_TOKENIZER)
  under = os.path.join(workdir, path)
  if not os.path.isabs(path) and not files.is_remote(path) and files.exists(under):
    tok["path"] = files.absolute(under)  # absolute, or the bucket's path: loading copies it down
  elif (os.path.isabs(path) and not os.path.exists(path) and os.path.basename(os.path.normpath(path)) == RUN_TOKENIZER
        and files.exists(os.path.join(own, "tokenizer.json"))):
    tok["path"] = files.absolute(own)
  return config


def _reading_specials_as_text(tok: hf.Tokenizer) -> hf.Tokenizer:
  """A copy of `tok` that encodes special tokens' names in text as ordinary text.

  The PII placeholders (`<EMAIL>`) are special to HF only so that they stay whole; in the copy they
  are plain added tokens, which stay whole too. Ids, vocabulary and `tok` itself (whose definition
  keys the caches) are unchanged.
  """
  from fmjax.data import pii
  spec = json.loads(tok.to_str())
  placeholders = set(pii.PLACEHOLDERS.values())
  specials = set()
  for added in spec.get("added_tokens") or []:
    if added["content"] in placeholders:
      added["special"] = False
    elif added.get("special"):
      specials.add(added["content"])
  model = spec.get("model") or {}
  if model.get("type") == "Unigram":
    # A unigram vocabulary holds the specials as pieces too: priced out, the text's own pieces win.
    unk = model.get("unk_id")
    model["vocab"] = [[piece, -1e4 if piece in specials and i != unk else score]
                      for i, (piece, score) in enumerate(model["vocab"])]
  reader = hf.Tokenizer.from_str(json.dumps(spec))
  reader.encode_special_tokens = True
  return reader


def _from_file(path: str) -> hf.Tokenizer:
  try:
    return hf.Tokenizer.from_file(path)
  except Exception as e:  # the Rust side raises a bare Exception for a file it cannot parse
    raise ConfigError(f"{path} is not a valid tokenizer.json ({e}); copy it again from where it came from") from None


def load_tokenizer(directory: str) -> Tokenizer:
  """Loads a tokenizer saved by `Tokenizer.save` (or any directory with a tokenizer.json), local or in a bucket."""
  directory = files.local_copy(directory) if files.is_remote(directory) else directory
  path = os.path.join(directory, "tokenizer.json")
  if not os.path.exists(path):
    raise ConfigError(f"no tokenizer.json in {directory!r}; point at a directory written by Tokenizer.save")
  kind = "hf"
  meta = os.path.join(directory, _META)
  if os.path.exists(meta):
    try:
      with open(meta) as f:
        kind = json.load(f).get("kind", "hf")
    except (ValueError, AttributeError):
      raise ConfigError(f"{meta} is damaged (not a JSON object); copy the tokenizer directory again from where the "
                        "run was made") from None
  return Tokenizer(_from_file(path), kind, _read_chat_template(directory))


def load_hf(path: str) -> Tokenizer:
  """Loads Hugging Face tokenizer files: tokenizer.json, BERT vocab.txt, or GPT-2 vocab.json + merges.txt."""
  path = files.local_copy(path) if files.is_remote(path) else os.path.expanduser(path)
  if not path:
    raise ConfigError("data.tokenizer.kind='hf' needs data.tokenizer.path (tokenizer.json, vocab.txt or a "
                      "directory with vocab.json + merges.txt)")
  if not os.path.exists(path):
    where = "" if os.path.isabs(path) else " (relative: read from the run's workdir, else the current directory)"
    raise ConfigError(f"data.tokenizer.path={path!r} does not exist{where}; point it at the tokenizer files")
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, "tokenizer.json")):
      return load_hf(os.path.join(path, "tokenizer.json"))
    if os.path.exists(os.path.join(path, "vocab.txt")):
      return load_hf(os.path.join(path, "vocab.txt"))
    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if os.path.exists(vocab) and os.path.exists(merges):
      try:
        tok = hf.Tokenizer(models.BPE.from_file(vocab, merges))
      except Exception as e:  # pylint: disable=broad-except
        raise ConfigError(f"{vocab} + {merges} are not a valid GPT-2 vocabulary ({e}); copy them again") from None
      tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
      tok.decoder = decoders.ByteLevel()
      if tok.token_to_id(EOS) is not None:
        tok.add_special_tokens([EOS])
      return Tokenizer(tok, "hf")
    raise ConfigError(f"{path!r} has no tokenizer.json, vocab.txt or vocab.json + merges.txt")
  if os.path.basename(path) in ("vocab.json", "merges.txt"):
    raise ConfigError(f"data.tokenizer.path={path!r} is half of a GPT-2 vocabulary; point it at the directory that "
                      "holds vocab.json and merges.txt")
  if path.endswith(".json"):  # with what tokenizer_config.json (and chat_template.jinja) beside it say
    beside = os.path.dirname(path)
    tok = _with_add_bos_token(_from_file(path), os.path.join(beside, "tokenizer_config.json"))
    return Tokenizer(tok, "hf", _read_chat_template(beside))
  if path.endswith(".txt"):
    from fmjax.data import sources
    try:
      with open(path, encoding="utf-8") as f:
        vocab = [line.rstrip("\n") for line in f]
    except UnicodeDecodeError:
      raise sources.not_utf8(path) from None
    # Cased BERT vocabularies hold upper-case word pieces; uncased ones never do.
    lowercase = not any(t[:1].isupper() for t in vocab if not (t.startswith("[") and t.endswith("]")))
    tok = hf.Tokenizer(models.WordPiece.from_file(path, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens([t for t in BERT_SPECIALS if t in set(vocab)])
    return Tokenizer(tok, "hf")
  raise ConfigError(f"data.tokenizer.path={path!r}: expected tokenizer.json, vocab.txt or a directory")


def train(texts: Iterable[str], kind: str, vocab_size: int, objective: str,
          extra_specials: tuple[str, ...] = ()) -> Tokenizer:
  """Trains a tokenizer of `kind` on `texts`; `extra_specials` (e.g. PII placeholders) are kept whole."""
  specials = list(BERT_SPECIALS) if objective == "mlm" else [EOS]
  if kind == "bpe":
    tok = hf.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + list(extra_specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  elif kind == "wordpiece":
    specials = list(BERT_SPECIALS)
    tok = hf.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials + list(extra_specials),
                                        show_progress=False)
  elif kind == "unigram":
    if objective != "mlm":
      specials = [EOS, "<unk>"]
    unk = "[UNK]" if objective == "mlm" else "<unk>"
    tok = hf.Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials + list(extra_specials),
                                      unk_token=unk, show_progress=False)
  else:
    raise ConfigError(f"data.tokenizer.kind={kind!r} is not one of ['bpe', 'wordpiece', 'unigram', 'hf']")
  try:
    tok.train_from_iterator(_capped(texts), trainer=trainer)
  except Exception as e:  # pylint: disable=broad-except
    if type(e) is not Exception:  # the corpus's own errors (ConfigError...) pass through
      raise
    # The Rust trainer raises a bare Exception, e.g. a unigram vocabulary smaller than the corpus's characters.
    raise ConfigError(f"training a {kind} tokenizer of data.tokenizer.vocab_size={vocab_size} failed ({e}); raise "
                      "data.tokenizer.vocab_size (e.g. 8192)") from None
  tok.add_special_tokens(specials + list(extra_specials))
  return Tokenizer(tok, kind)


def _capped(texts: Iterable[str]) -> Iterator[str]:
  total = 0
  for t in texts:
    yield t
    total += len(t)
    if total >= MAX_TRAIN_CHARS:
      return


def get_tokenizer(config, workdir: str | None = None) -> Tokenizer:
  """The tokenizer for `config`: HF files for kind 'hf', else trained on the train split (cached).

  With `workdir`, the run's own tokenizer (`workdir/tokenizer`, `save_run_tokenizer`) wins when it
  has one: a run keeps the token ids it started with, whatever its corpus files became since.
  """
  from fmjax.data import pii, sources

  t = config.data.tokenizer
  own = os.path.join(workdir, RUN_TOKENIZER) if workdir else None
  what = "the tokenizer"
  if own and files.exists(os.path.join(own, "tokenizer.json")):
    tok, what = load_tokenizer(own), f"the run's tokenizer ({own})"
  elif t.kind == "hf":
    tok, what = load_hf(t.path), f"the tokenizer of data.tokenizer.path={t.path!r}"
  else:
    sources.check_config(config)
    extra = tuple(pii.PLACEHOLDERS.values()) if config.data.pii_scrub else ()
    key = sources.identity_hash({"corpus": sources.corpus_identity(config, "train"), "kind": t.kind,
                                 "vocab_size": t.vocab_size, "objective": config.train.objective,
                                 "extra": extra, "version": 1})
    rel = os.path.join("tokenizers", f"{t.kind}-{t.vocab_size}-{key}")
    directory = sources.fetch_shared(config, rel, "tokenizer.json")  # from a bucket cache_dir, if it has it
    if os.path.exists(os.path.join(directory, "tokenizer.json")):
      tok = load_tokenizer(directory)
    else:
      texts = sources.documents(config, "train")
      if config.data.pii_scrub:
        texts = (pii.scrub(x)[0] for x in texts)
      seen = []
      def counted(it):
        for x in it:
          seen.append(1)
          yield x
      tok = train(counted(texts), t.kind, t.vocab_size, config.train.objective, extra)
      if not seen:
        raise ConfigError(f"dataset {config.data.dataset!r} split {config.data.train_split!r} has no text "
                          "(empty corpus); check data.dataset, data.files and data.train_split")
      if not _save_atomic(tok, directory):
        # Another process trained it at the same time (a sweep's runs starting together) and saved
        # first: take theirs, so that all of them share its cache. WordPiece and Unigram training
        # differ from process to process, and ids of another vocabulary would be another dataset.
        tok = load_tokenizer(directory)
      sources.share(config, rel)
  _check_fits(config, tok, what)
  return tok


def save_run_tokenizer(tok: Tokenizer, workdir: str) -> None:
  """Keeps `tok` as the run's own tokenizer, `workdir/tokenizer` (what `get_tokenizer(config, workdir)` reads)."""
  own = os.path.join(workdir, RUN_TOKENIZER)
  if files.exists(os.path.join(own, "tokenizer.json")):
    kept = load_tokenizer(own)
    if (kept.identity(), kept.chat_template) == (tok.identity(), tok.chat_template):
      return
    files.path(own).rmtree()  # left by a fresh start that never saved a checkpoint: this start's settings win
    files.forget(own)
  if files.is_remote(own):  # a bucket: tokenizer.json, written last, marks it whole
    tok.save(own)
    files.forget(own)
    return
  _save_atomic(tok, own)


def _save_atomic(tok: Tokenizer, directory: str) -> bool:
  """Saves `tok` to `directory` whole; False where another process saved one there first (kept)."""
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  tmp = files.make_temp_dir(os.path.dirname(directory))
  try:
    tok.save(tmp)
    os.rename(tmp, directory)
    return True
  except OSError:
    if not os.path.exists(os.path.join(directory, "tokenizer.json")):
      raise
    return False  # lost a race to another process
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _check_fits(config, tok: Tokenizer, what: str) -> None:
  if tok.vocab_size > config.model.vocab_size:
    raise ConfigError(f"{what} has {tok.vocab_size} ids but model.vocab_size={config.model.vocab_size}; "
                      f"raise model.vocab_size to at least {tok.vocab_size}")
  if config.train.objective == "clm" and tok.eos_id is None:
    raise ConfigError(f"{what} has no end-of-text token (<|endoftext|>, </s> or [SEP]) for causal LM")
  if config.train.objective == "mlm":
    missing = [n for n, i in (("[CLS]", tok.cls_id), ("[SEP]", tok.sep_id), ("[MASK]", tok.mask_id)) if i is None]
    if missing:
      raise ConfigError(f"masked LM needs tokenizer tokens {missing}, which {what} lacks; use kind 'wordpiece' or a "
                        "BERT vocab")
