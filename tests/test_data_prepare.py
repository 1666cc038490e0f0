"""prepare(): cache keys, idempotence, atomicity, TFDS by name (mocked), local files, and bad-input errors."""

import glob
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fmjax import config_lib, files
import fmjax.data as data
from fmjax.data import corpus, packing
from fmjax.data import sources

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny(family, cache_dir, **over):
  config = config_lib.load_module(os.path.join(HERE, "..", "configs", f"{family}.py")).get_config("tiny")
  config.data.cache_dir = str(cache_dir)
  for k, v in over.items():
    *parents, leaf = k.split(".")
    node = config
    for p in parents:
      node = node[p]
    assert leaf in node, k
    node[leaf] = v
  return config


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.getbasetemp() / "fmjax_data_cache"  # shared by the test_data_* files


def write_corpus(directory, n_docs=60):
  directory.mkdir(parents=True, exist_ok=True)
  words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jumbo pianos".split()
  rng = np.random.default_rng(0)
  blocks = [" ".join(rng.choice(words, size=int(rng.integers(20, 60)))) for _ in range(n_docs)]
  (directory / "a.txt").write_text("\n\n".join(blocks[: n_docs // 2]) + "\n")
  with open(directory / "b.jsonl", "w") as f:
    for text in blocks[n_docs // 2:]:
      f.write(json.dumps({"body": text, "id": 1}) + "\n")
  return blocks


def test_prepare_is_idempotent_and_keyed(cache_dir):
  config = tiny("gpt", cache_dir)
  path = data.prepare(config)
  stamp = os.path.getmtime(os.path.join(path, "meta.json"))
  assert data.prepare(config) == path and os.path.getmtime(os.path.join(path, "meta.json")) == stamp
  meta = json.load(open(os.path.join(path, "meta.json")))
  assert meta["splits"]["train"]["num_rows"] > 1000 and meta["splits"]["eval"]["num_rows"] >= 50
  # Filled under a temporary name and renamed: with a plain directory's permissions, not tempfile's
  # 0700, so others sharing data.cache_dir can read it.
  umask = os.umask(0)
  os.umask(umask)
  entries = [path, *glob.glob(os.path.join(str(cache_dir), "tokenizers", "*"))]
  assert len(entries) >= 2  # the dataset and the tokenizer trained for it
  for entry in entries:
    assert os.stat(entry).st_mode & 0o777 == 0o777 & ~umask, entry
  for key, value in (("data.seq_len", 64), ("train.objective", "mlm"), ("data.eval_split", "train")):
    other = tiny("gpt", cache_dir, **{key: value})
    if key == "train.objective":
      other.data.tokenizer.kind = "wordpiece"
    assert data.cache_path(other, data.get_tokenizer(other)) != path, key
  # Masking and shuffling settings act at load time: same cache.
  same = tiny("gpt", cache_dir, **{"data.seed": 3, "data.mask_rate": 0.2})
  assert data.prepare(same) == path


def arrays(path) -> dict[str, bytes]:
  """Every array file of a prepared cache, by its path in the entry."""
  return {os.path.relpath(f, path): open(f, "rb").read() for f in sorted(glob.glob(f"{path}/*/**/*.bin",
                                                                                   recursive=True))}


def test_prepare_command_prints_the_path_alone_on_stdout_and_its_notes_on_stderr(tmp_path, monkeypatch, capsys):
  from fmjax import cli
  argv = ["data", "prepare", f"--config={HERE}/../configs/gpt.py:tiny", f"--config.data.cache_dir={tmp_path}",
          "--config.data.shard_docs=100", "--config.data.prepare_workers=1"]
  real = packing._write_part

  def dies_on_the_third_part(*args):
    if args[3] == 2:
      raise KeyboardInterrupt
    return real(*args)

  monkeypatch.setattr(packing, "_write_part", dies_on_the_third_part)
  assert cli.main(argv) == 130
  assert capsys.readouterr().err.strip().endswith(
      "interrupted: the parts made so far are kept: rerun the same command to go on")

  def terminated_on_the_third_part(*args):  # a scheduler's SIGTERM, delivered to this process
    if args[3] == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(*args)

  monkeypatch.setattr(packing, "_write_part", terminated_on_the_third_part)
  assert cli.main(argv) == 143  # it once died of the signal, with no line
  assert capsys.readouterr().err.strip().endswith(
      "stopped: the parts made so far are kept: rerun the same command to go on")
  monkeypatch.undo()
  assert cli.main(argv) == 0
  out, err = capsys.readouterr()
  assert out.strip().count("\n") == 0 and packing.is_prepared(out.strip())  # a script may read the path
  assert "2 of 5 parts were made by an earlier prepare; making the other 3" in err, err
  assert "train: 312 documents" in err and "in 4 part(s)" in err


def test_a_script_without_a_main_guard_stops_in_one_line_rather_than_hang(tmp_path):
  # Prepare workers start by importing the script that started them (spawn): its unguarded call
  # would prepare again in each of them and wait for ever on the parent's lock.
  script = tmp_path / "no_guard.py"
  script.write_text(f"""import sys
sys.path.insert(0, {os.path.join(HERE, '..')!r})
from fmjax import config_lib, data
config = config_lib.load_config({os.path.join(HERE, '..', 'configs', 'gpt.py')!r} + ":tiny", [
    "data.cache_dir={tmp_path / 'cache'}", "data.shard_docs=100", "data.prepare_workers=2"])
print(data.prepare(config))
""")
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
  assert proc.returncode != 0, proc.stdout
  assert ("error: the script that called fmjax ran again in a prepare worker process: put its fmjax calls under "
          "`if __name__ == \"__main__\":`, or set data.prepare_workers=1") in proc.stderr, proc.stderr[-2000:]
  assert "ConfigError: a prepare process died while 2 made parts at once" in proc.stderr  # the script's own error


def test_interrupted_prepare_leaves_nothing_readable_and_keeps_its_finished_parts(tmp_path, monkeypatch):
  config = tiny("gpt", tmp_path / "a", **{"data.shard_docs": 100, "data.prepare_workers": 1})
  real, made = packing._write_part, []

  def dies_on_the_third_part(config, tok, split, part, records, store):
    if len(made) == 2:
      raise KeyboardInterrupt
    made.append((split, part))
    return real(config, tok, split, part, records, store)

  monkeypatch.setattr(packing, "_write_part", dies_on_the_third_part)
  with pytest.raises(KeyboardInterrupt):
    data.prepare(config)
  (store,) = glob.glob(str(tmp_path / "a" / "datasets" / "*"))
  assert store.endswith(".parts") and not packing.is_prepared(store)  # nothing a run reads
  assert sorted(os.listdir(os.path.join(store, "train"))) == ["part-00000", "part-00001"]  # no half part either

  made.clear()
  monkeypatch.setattr(packing, "_write_part", lambda *a: made.append(a[2:4]) or real(*a))
  path = data.prepare(config)
  assert os.listdir(tmp_path / "a" / "datasets") == [os.path.basename(path)]
  assert packing.is_prepared(path) and ("train", 0) not in made and ("train", 1) not in made and ("train", 2) in made
  meta = json.load(open(os.path.join(path, "train", "meta.json")))
  assert [p["name"] for p in meta["parts"]] == [f"part-{k:05d}" for k in range(len(meta["parts"]))]
  assert len(meta["parts"]) == -(-sources.record_count(config, "train") // 100) >= 3
  # The same cache as one prepare that was never stopped.
  assert arrays(path) == arrays(data.prepare(tiny("gpt", tmp_path / "b", **{"data.shard_docs": 100,
                                                                         "data.prepare_workers": 1})))


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_parts_made_by_a_pool_of_processes_equal_those_made_in_one(tmp_path, family):
  """The parts of a split do not depend on who made them; batches read across their boundaries."""
  over = {"data.shard_docs": 64, "data.seq_len": 32}
  one = data.prepare(tiny(family, tmp_path / "one", **over, **{"data.prepare_workers": 1}))
  if family == "gpt":  # the pool costs seconds of process start-up: once is enough
    pool = data.prepare(tiny(family, tmp_path / "pool", **over, **{"data.prepare_workers": 2}))
    assert os.path.basename(pool) == os.path.basename(one) and arrays(pool) == arrays(one)
  meta = json.load(open(os.path.join(one, "train", "meta.json")))
  assert len(meta["parts"]) >= 3 and meta["num_rows"] == sum(p["num_rows"] for p in meta["parts"])
  split = data.make_loader(tiny(family, tmp_path / "one", **over), "train", batch_size=2).data
  ids = np.arange(meta["num_rows"])
  got = split.rows(ids)["inputs" if family == "gpt" else "tokens"]
  first = 0
  for p in meta["parts"]:  # row r of the split is row r - first of its part
    part = np.fromfile(os.path.join(one, "train", p["name"], "tokens.bin"), dtype=meta["dtype"])
    want = [part[r * 32:r * 32 + 32] for r in range(p["num_rows"])]
    np.testing.assert_array_equal(got[first:first + p["num_rows"]], want)
    first += p["num_rows"]
  shuffled = np.random.default_rng(0).permutation(ids)  # rows of several parts in one call, in any order
  for key, value in split.rows(shuffled).items():
    np.testing.assert_array_equal(value, split.rows(ids)[key][shuffled], err_msg=key)


def test_text_files_txt_and_jsonl_with_held_out_split(tmp_path):
  blocks = write_corpus(tmp_path / "corpus")
  config = tiny("gpt", tmp_path / "cache", **{
      "data.dataset": "text_files", "data.files": f"{tmp_path}/corpus/*.txt,{tmp_path}/corpus/*.jsonl",
      "data.feature": "body", "data.seq_len": 32, "data.tokenizer.vocab_size": 300})
  train, held = list(sources.documents(config, "train")), list(sources.documents(config, "eval"))
  assert held and train and not set(train) & set(held)
  assert sorted(train + held) == sorted(blocks)  # every block of .txt and every .jsonl record, once
  loader = data.make_loader(config, batch_size=4)
  assert loader.host_batch(0)["inputs"].shape == (4, 32)
  # Touching a file changes the corpus identity, hence the cache key.
  before = sources.corpus_identity(config, "train")
  with open(tmp_path / "corpus" / "a.txt", "a") as f:
    f.write("\nmore words here\n")
  assert sources.corpus_identity(config, "train") != before


def test_text_files_reads_compressed_and_parquet_corpora_as_their_plain_copies(tmp_path, caplog):
  """Corpora as published (FineWeb's Parquet, Dolma's .json.gz, the Pile's multi-frame .jsonl.zst, a .txt.gz) give
  the documents, in the order and with the record numbers, of the same text written plainly."""
  import gzip

  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard
  blocks = write_corpus(tmp_path / "plain")
  txt, jsonl = (tmp_path / "plain" / "a.txt").read_bytes(), (tmp_path / "plain" / "b.jsonl").read_bytes()
  lines = jsonl.splitlines(keepends=True)
  packed = tmp_path / "packed"
  packed.mkdir()
  (packed / "a.txt.gz").write_bytes(gzip.compress(txt))
  (packed / "b.json.gz").write_bytes(gzip.compress(jsonl))
  frames = zstandard.ZstdCompressor()
  (packed / "c.jsonl.zst").write_bytes(frames.compress(b"".join(lines[:7])) + frames.compress(b"".join(lines[7:])))
  bodies = [json.loads(line)["body"] for line in lines]
  pq.write_table(pa.table({"id": list(range(len(bodies) + 1)), "body": bodies[:3] + [None] + bodies[3:]}),
                 packed / "d.parquet", row_group_size=7)
  for name in ("notes.json", "e.parquet.gz", "f.jsonl.bz2"):  # not read: a plain .json is one value, not lines
    (packed / name).write_text("{}")
  paths = corpus.resolve_files(f"{packed}/*")
  assert [os.path.basename(p) for p in paths] == ["a.txt.gz", "b.json.gz", "c.jsonl.zst", "d.parquet"]

  def read(*names, directory=packed):
    return [(key.split(":")[1], text) for key, text in corpus.file_documents([str(directory / n) for n in names],
                                                                             "body")]
  plain_txt, plain_jsonl = read("a.txt", directory=tmp_path / "plain"), read("b.jsonl", directory=tmp_path / "plain")
  assert read("a.txt.gz") == plain_txt and read("b.json.gz") == read("c.jsonl.zst") == plain_jsonl
  with caplog.at_level("WARNING", logger="fmjax"):
    rows = read("d.parquet")
  assert [t for _, t in rows] == [t for _, t in plain_jsonl] and rows[3][0] == "4"  # row 3 is null: skipped
  assert f"skipped 1 record(s) whose 'body' is null (the first at {packed / 'd.parquet'} row 3)" in caplog.text

  config = tiny("gpt", tmp_path / "cache", **{
      "data.dataset": "text_files", "data.files": f"{packed}/*", "data.feature": "body", "data.seq_len": 32,
      "data.tokenizer.vocab_size": 300})
  train, held = list(sources.documents(config, "train")), list(sources.documents(config, "eval"))
  half = len(blocks) // 2
  assert sorted(train + held) == sorted(blocks[:half] + 3 * blocks[half:])

  (packed / "cut.jsonl.gz").write_bytes(gzip.compress(jsonl)[:-20])
  (packed / "cut.jsonl.zst").write_bytes(b"not zstd at all")
  for name, what in (("cut.jsonl.gz", "gzip"), ("cut.jsonl.zst", "Zstandard")):
    with pytest.raises(config_lib.ConfigError, match=rf"^{packed / name} is damaged or not {what} data \(.*\); "
                                                     "copy it again$"):
      read(name)
  with pytest.raises(config_lib.ConfigError, match=r"d.parquet has no column 'text'; set data.feature to one of "
                                                   r"\['id', 'body'\]$"):
    list(corpus.file_documents([str(packed / "d.parquet")], "text"))
  with pytest.raises(config_lib.ConfigError, match=r"d.parquet: column 'id' holds int64, not text; set data.feature"):
    list(corpus.file_documents([str(packed / "d.parquet")], "id"))
  (packed / "bad.parquet").write_bytes(b"PAR1 but not really")
  with pytest.raises(config_lib.ConfigError, match=r"bad.parquet is not a Parquet file fmjax can read \(.*\); copy"):
    read("bad.parquet")


def whole_file_documents(paths, feature):
  """text_files' documents as it made them before it streamed: each .txt file read whole and split by the
  regex. Keys and splits of caches prepared then must stay those of the streamed reading."""
  base = os.path.commonpath([os.path.dirname(p) for p in paths])
  for path in paths:
    key = os.path.relpath(path, base)
    if path.endswith(".jsonl"):  # read as ever (one record a line): what changed is how .txt is read
      for line, record in sources.jsonl_records(path, warn=False):
        if record[feature] is not None and record[feature].strip():
          yield f"{key}:{line - 1}", record[feature].strip()
      continue
    with open(path, encoding="utf-8-sig") as f:
      blocks = corpus._BLANK_LINES.split(f.read())
    yield from ((f"{key}:{i}", block.strip()) for i, block in enumerate(blocks) if block.strip())


def streamed_splits(paths, feature, data_dir):
  """(key, text) of each split as TextFiles hands them to TFDS, in that order."""
  builder = corpus.TextFiles(paths=paths, feature=feature, data_dir=str(data_dir))
  return {name: [(key, example["text"]) for key, example in examples]
          for name, examples in builder._split_generators(None).items()}


def test_text_files_streams_the_documents_keys_and_splits_of_whole_file_reads(tmp_path, caplog):
  c = tmp_path / "c"
  (c / "sub").mkdir(parents=True)
  words = "kayak fjord zebra quartz lynx oxide nymph glyph".split()
  rng = np.random.default_rng(0)
  line = lambda: " ".join(rng.choice(words, size=int(rng.integers(1, 8))))
  para = lambda: "\n".join(line() for _ in range(rng.integers(1, 4)))
  files = {  # each an edge of the blank-line rule, as bytes
      "lead_trail.txt": f"\n\n \n\n{para()}\n\n\n{para()}\n \t\n\n\n".encode(),
      "space_lines.txt": f"{para()}\n \n \n \n{para()}\n\t\n\n \n{para()}\n\n  \n\n\t\n{para()}".encode(),
      "crlf.txt": f"{para()}\r\n\r\n \r\n{para()}\r\n\r\n{para()}\r{para()}\r\r{para()}\r\n".encode(),
      "bom.txt": b"\xef\xbb\xbf" + f"\n{para()}\n\n{para()}".encode(),
      "no_newline.txt": f"{para()}\n\n{para()}".encode(),
      "one_block.txt": "\n".join(para() for _ in range(300)).encode(),
      "other_space.txt": f"{para()}\n\x0c\n{para()}\n\u2028\n{para()}\n\x85 \n\n\u3000{para()}\n \x0c\n{para()}"
                       f"\n\t\u3000\n{para()}\n".encode(),
      "empty.txt": b"", "blank.txt": b" \n\n\t\n",
      "sub/many.txt": "\n\n".join(para() for _ in range(60)).encode(),
      "rows.jsonl": b"\xef\xbb\xbf" + "\r\n".join(  # blank lines between the records, and none at the end
          [json.dumps({"body": text}) for text in ["  a record  ", None, "   ", "cut \ud83d short", para(), ""]]
          + ["", " ", json.dumps({"body": para()})]).encode(),
      "sub/more.jsonl": "".join(json.dumps({"body": para(), "id": i}) + "\n" for i in range(40)).encode()}
  pieces = ["kayak", "fjord zebra", " ", "\t", "\n", "\n", "\r\n", "\r", " \n", "\x0c"]
  for i in range(20):  # and whatever else these pieces make
    files[f"sub/random{i}.txt"] = "".join(rng.choice(pieces, size=int(rng.integers(0, 40)))).encode()
  for name, raw in files.items():
    (c / name).write_bytes(raw)
  paths = corpus.resolve_files(f"{c}/**/*")
  assert len(paths) == len(files)
  want = corpus._assign_splits(list(whole_file_documents(paths, "body")))
  assert len(want["train"]) > 50 and len(want["validation"]) > 5
  with caplog.at_level("WARNING", logger="fmjax"):
    assert streamed_splits(paths, "body", tmp_path / "tfds") == want
  # Read three times, the files are told of once (as when they were read once).
  messages = [r.getMessage() for r in caplog.records]
  assert sum("skipped 1 record(s) whose 'body' is null" in m for m in messages) == 1, messages
  assert sum("replaced 1 lone surrogate escape(s)" in m for m in messages) == 1, messages

  # The fallback rules of a corpus that the hash holds out none of, or all of; ties go to the first document.
  texts = [f"document {i}" for i in range(100)]
  held, kept = [[t for t in texts if (sources.text_hash(t) % 100 < 10) == h][:3] for h in (True, False)]
  for name, docs in (("held", held), ("kept", kept)):
    (tmp_path / name).mkdir()
    (tmp_path / name / "a.txt").write_text("\n\n".join(docs[::-1] + docs))  # every document twice
    (tmp_path / name / "b.txt").write_text("\n\n".join(docs))
    paths = corpus.resolve_files(f"{tmp_path / name}/*.txt")
    want = corpus._assign_splits(list(whole_file_documents(paths, "body")))
    assert want["train"] and want["validation"]
    assert streamed_splits(paths, "body", tmp_path / "tfds") == want

  # A file edited between the readings of the splits would mix two corpora: refused.
  builder = corpus.TextFiles(paths=paths, feature="body", data_dir=str(tmp_path / "tfds"))
  train, validation = builder._split_generators(None).values()
  list(train)
  with open(paths[0], "a") as f:
    f.write("\n\nan edit")
  with pytest.raises(config_lib.ConfigError, match=r"^data.files changed while 2 file\(s\) were being prepared; "):
    list(validation)


def test_text_files_splits_a_corpus_in_the_memory_of_a_document_not_of_the_corpus(tmp_path):
  import tracemalloc
  words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jumbo pianos".split()
  rng = np.random.default_rng(0)
  # About 30 MB in documents of about 2 kB (long lines: tracemalloc slows each allocation, hence each line).
  blocks = ["\n".join(" ".join(rng.choice(words, size=80)) for _ in range(rng.integers(2, 7))) for _ in range(200)]
  with open(tmp_path / "big.txt", "w") as f:
    f.write("".join(f"{i} {blocks[i % 200]}\n\n" for i in range(16_000)))  # each document unique
  with open(tmp_path / "big.jsonl", "w") as f:
    f.write("".join(json.dumps({"text": f"{i} {blocks[i % 200]}"}) + "\n" for i in range(3_000)))
  size = os.path.getsize(tmp_path / "big.txt") + os.path.getsize(tmp_path / "big.jsonl")
  builder = corpus.TextFiles(paths=corpus.resolve_files(f"{tmp_path}/big.*"), feature="text",
                             data_dir=str(tmp_path / "tfds"))
  tracemalloc.start()
  try:
    counts = {name: sum(1 for _ in examples) for name, examples in builder._split_generators(None).items()}
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert sum(counts.values()) == 19_000 and counts["validation"] > 1_000, counts
  assert size > 25e6 and peak < size / 50, f"peak {peak / 1e6:.1f} MB reading a corpus of {size / 1e6:.1f} MB"


def test_the_offset_of_a_files_first_bad_byte_counts_characters_cut_by_the_chunks_it_is_read_in(tmp_path,
                                                                                                 monkeypatch):
  monkeypatch.setattr(sources, "_DECODE_CHUNK", 3)  # cuts the 2-, 3- and 4-byte characters
  good = "a\u00e9\u20ac\U0001f600b".encode()
  for bad in (b"\xff", b"\xe9x", b"\xe2\x82", b"\xf0\x9f\x98"):  # a lone byte, a cut character, one cut at the end
    for raw in (bad + good, good + bad, good * 3 + bad + good):
      (tmp_path / "x.txt").write_bytes(raw)
      with pytest.raises(UnicodeDecodeError) as e:
        raw.decode("utf-8")
      assert f"x.txt is not UTF-8 text (byte {e.value.start});" in str(sources.not_utf8(str(tmp_path / "x.txt")))
  (tmp_path / "x.txt").write_bytes(good * 3)
  assert "x.txt is not UTF-8 text;" in str(sources.not_utf8(str(tmp_path / "x.txt")))


def test_tfds_dataset_by_name_through_mock_data(tmp_path, tfds_online):
  config = tiny("gpt", tmp_path, **{"data.dataset": "lm1b", "data.seq_len": 16, "data.tokenizer.vocab_size": 300})
  with tfds.testing.mock_data(num_examples=40):
    docs = list(sources.documents(config, "train"))
    path = data.prepare(config)
  assert len(docs) == 40
  meta = json.load(open(os.path.join(path, "meta.json")))
  assert meta["splits"]["train"]["num_docs"] == 40 and meta["dataset"] == "lm1b"
  batch = data.make_loader(config, batch_size=2).host_batch(0)
  assert batch["inputs"].shape == (2, 16)

  glue = tiny("bert", tmp_path, **{"data.dataset": "glue/sst2", "data.feature": "sentence",
                                   "data.seq_len": 16, "data.max_predictions": 4})
  with tfds.testing.mock_data(num_examples=30):
    assert len(list(sources.documents(glue, "eval"))) == 30
    data.prepare(glue)


@pytest.mark.parametrize("over, match", [
    ({"data.dataset": "lm1bb"}, "unknown dataset 'lm1bb': did you mean 'lm1b'"),
    ({"data.dataset": "glue/sst2"}, r"has no feature 'text'; set data.feature to one of \['idx', 'label', 'sentence'\]"),
    ({"data.seq_len": 512}, "longer than the model allows"),
    ({"data.data_dir": "/nonexistent/tfds"}, "does not exist"),
    ({"data.data_dir": "FILE"}, "is a file; give the directory that holds the TFDS datasets"),
    ({"data.dataset": "fmjax_corpus=0,lm1b=1"}, r"'fmjax_corpus=0' is not NAME=WEIGHT with a weight above 0; a "
     r"mixture names each dataset with its weight, e.g. data.dataset='c4/en:3.1.0=3,wikipedia/20230601.en=1'"),
    ({"data.dataset": "lm1b=1,lm1b=2"}, "names 'lm1b' twice; give each dataset once, with its weight"),
    ({"data.dataset": "fmjax_corpus=1,glue/sst2=1"}, r"dataset 'glue/sst2' has no feature 'text'; in a mixture give "
     r"this dataset its own feature in data.dataset, 'glue/sst2\(feature=...\)=WEIGHT', with feature one of "
     r"\['idx', 'label', 'sentence'\]"),
    ({"data.dataset": "fmjax_corpus=1,lm1b(feture=text)=1"}, r"data.dataset item 'lm1b\(feture=text\)': 'feture=text' "
     r"is not one of its own settings; did you mean 'feature'\? give KEY=VALUE pairs split by ';'"),
    ({"data.dataset": "fmjax_corpus=1,lm1b(feature=text=1"}, "settings of one dataset go in parentheses after its "
     "name and before its weight"),
    ({"data.dataset": "fmjax_corpus=1,lm1bb=1"}, "unknown dataset 'lm1bb': did you mean 'lm1b'"),
    ({"data.dataset": "fmjax_corpus=1,lm1b=100"}, r"a batch of 16 rows gives 'fmjax_corpus' \(share 0.0099\) no row; "
     "raise its weight in data.dataset, or train.batch_size"),
    ({"data.cache_dir": "FILE/sub"}, r"data.cache_dir='.*/notes.txt/sub' cannot be made \(.*/notes.txt is a file\)"),
    ({"data.dataset": "text_files", "data.files": "/nonexistent/*.txt"}, "matches no file text_files reads"),
    ({"data.dataset": "text_files", "data.files": "EMPTY"}, "empty corpus"),
    ({"data.dataset": "text_files", "data.files": "DIR"}, r"names a directory, not files; give globs of its files, "
     r"e.g. --config.data.files='.*/corpus/\*\*/\*.jsonl,.*/corpus/\*\*/\*.txt'"),
    ({"data.tokenizer.path": "vocab.txt"}, "data.tokenizer.path='vocab.txt' is read only with data.tokenizer.kind='hf' "
     r"\(kind 'wordpiece' trains one on the corpus\)"),
    ({"data.tokenizer.vocab_size": 0}, "vocab_size=0 leaves a wordpiece vocabulary no room beside its special tokens"),
    # 5 special tokens and one piece of text at least:
    ({"data.tokenizer.vocab_size": 5}, r"vocab_size=5 leaves .* no room .*; use at least 6 \(e.g. 8192\)"),
])
def test_bad_input_is_one_clear_line_and_no_cache(tmp_path, over, match, tfds_online):
  if over.get("data.files") == "EMPTY":
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    over = {**over, "data.files": str(tmp_path / "empty.txt")}
  if over.get("data.files") == "DIR":  # a folder of text, named as if it were a file
    write_corpus(tmp_path / "corpus")
    over = {**over, "data.files": str(tmp_path / "corpus")}
  if "FILE" in str(over.get("data.data_dir", "")) + str(over.get("data.cache_dir", "")):  # a file where a folder goes
    (tmp_path / "notes.txt").write_text("not a folder")
    over = {k: v.replace("FILE", str(tmp_path / "notes.txt")) for k, v in over.items()}
  config = tiny("bert", tmp_path / "cache", **over)
  with tfds.testing.mock_data(num_examples=5):
    with pytest.raises(config_lib.ConfigError, match=match) as e:
      data.prepare(config)
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "cache" / "datasets") or not os.listdir(tmp_path / "cache" / "datasets")
  assert not os.path.exists(tmp_path / "cache" / "tokenizers") or not os.listdir(tmp_path / "cache" / "tokenizers")


def test_a_directory_as_data_files_suggests_globs_of_the_kinds_it_holds(tmp_path):
  """A FineWeb-like folder (Parquet, .jsonl.zst) gets globs that match its files, not .txt ones that match none."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  (tmp_path / "corpus" / "data").mkdir(parents=True)
  pq.write_table(pa.table({"text": ["a document"]}), tmp_path / "corpus" / "data" / "part-0.parquet")
  (tmp_path / "corpus" / "d.jsonl.zst").write_bytes(b"")
  (tmp_path / "corpus" / "README.md").write_text("about")
  (tmp_path / "empty").mkdir()
  folder = str(tmp_path / "corpus")
  with pytest.raises(config_lib.ConfigError) as e:
    sources.check_config(tiny("gpt", tmp_path / "cache", **{"data.dataset": "text_files", "data.files": folder}))
  assert str(e.value).endswith(f"e.g. --config.data.files='{folder}/**/*.jsonl.zst,{folder}/**/*.parquet'")
  config = tiny("gpt", tmp_path / "cache", **{"data.dataset": "text_files", "data.files": str(tmp_path / "empty")})
  with pytest.raises(config_lib.ConfigError, match="names a directory that holds no file text_files reads"):
    sources.check_config(config)


def test_a_split_one_dataset_of_a_mixture_lacks_is_set_in_its_item(tmp_path):
  """Wikipedia has a train split only: the message says which setting, and in a mixture, that the item takes it."""
  import types
  wiki = "wikipedia/20230601.en"
  config = tiny("gpt", tmp_path, **{"data.dataset": f"c4/en:3.1.0=3,{wiki}(train_split=train[:99%]; "
                                    "eval_split=train[99%:])=1"})
  (c4, _), (item, _) = sources.mixture(config.data.dataset)
  # One mixture however its weights and settings are written: the same items, shares and cache entries.
  assert sources.mixture(f"c4/en:3.1.0 = 6, {wiki}(eval_split=train[99%:];train_split=train[:99%]) = 2") == [
      (c4, 0.75), (item, 0.25)]
  assert [sources.corpus_identity(sources.component(config, i), "eval")["split"] for i in (c4, item)] == [
      "validation", "train[99%:]"]
  assert sources.corpus_identity(config, "train")["mixture"][1][2]["split"] == "train[:99%]"
  builder = types.SimpleNamespace(info=types.SimpleNamespace(splits={"train": None}))
  alone = sources.component(config, wiki)
  with pytest.raises(config_lib.ConfigError, match=r"^dataset 'wikipedia/20230601.en' has no split 'validation'; set "
                     r"data.eval_split to one of \['train'\] \(a TFDS split spec: e.g. 'train\[99%:\]', with train_split "
                     r"cut to the rest, 'train\[:99%\]'\)$"):
    sources._check_split(alone, builder, "validation", "eval")
  with pytest.raises(config_lib.ConfigError, match=r"has no split 'validation'; in a mixture give this dataset its "
                     r"own eval_split in data.dataset, 'wikipedia/20230601.en\(eval_split=...\)=WEIGHT', with "
                     r"eval_split one of \['train'\] \(a TFDS split spec"):
    with sources.in_item(wiki):
      sources._check_split(alone, builder, "validation+test", "eval")
  with pytest.raises(config_lib.ConfigError, match=r"^data.seq_len"):  # any other error passes as it was
    with sources.in_item(wiki):
      raise config_lib.ConfigError("data.seq_len is wrong")


def test_a_held_out_split_that_reads_trained_records_is_refused_before_anything_is_made(tmp_path, capsys):
  """Following 'set data.eval_split to train[99%:]' alone leaves data.train_split=train: every held-out
  document would be trained on too. Training and `fmjax data prepare` refuse it in one line."""
  write_corpus(tmp_path / "c")
  over = {"data.dataset": "text_files", "data.files": str(tmp_path / "c" / "*"), "data.eval_split": "train[90%:]"}
  config = tiny("gpt", tmp_path / "cache", **over)
  with pytest.raises(config_lib.ConfigError, match=r"^dataset 'text_files': data.eval_split='train\[90%:\]' reads "
                     r"records that data.train_split='train' trains on, so held-out figures would be on trained text; "
                     r"set data.train_split to e.g. 'train\[:90%\]'$"):
    sources.check_held_out_apart(config)
  from fmjax import cli
  argv = ["data", "prepare", "--config=configs/gpt.py:tiny", *(f"--config.{k}={v}" for k, v in over.items()),
          f"--config.data.cache_dir={tmp_path / 'cache'}"]
  assert cli.main(argv) == 2
  assert "set data.train_split to e.g. 'train[:90%]'" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "cache" / "datasets")
  from fmjax import train
  with pytest.raises(config_lib.ConfigError, match="reads records that data.train_split='train' trains on"):
    train.run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")
  # In a mixture, the item that needs it is told to take its own train_split.
  config.data.update(dataset=f"fmjax_corpus=1,text_files(files={tmp_path}/c/*; eval_split=train)=1",
                     eval_split="validation")
  with pytest.raises(config_lib.ConfigError, match=r"in a mixture give this dataset its own train_split in "
                     r"data.dataset, 'text_files\(train_split=...\)=WEIGHT'"):
    sources.check_held_out_apart(config)
  for train_split, eval_split in [("train", "validation"), ("train[:90%]", "train[90%:]"),
                                  ("train[:100]", "train[100:]"), ("train[10%:]+validation", "train[:10%]"),
                                  ("train[:-100]", "train[-100:]")]:
    config.data.update(dataset="text_files", train_split=train_split, eval_split=eval_split)
    sources.check_held_out_apart(config)  # apart (or, with negative bounds, not known without the split's size)
  for train_split, eval_split in [("train[:95%]", "train[90%:]"), ("train", "validation+train[:5]"), ("all", "test")]:
    config.data.update(train_split=train_split, eval_split=eval_split)
    with pytest.raises(config_lib.ConfigError, match="reads records that data.train_split"):
      sources.check_held_out_apart(config)


def test_data_files_beside_another_dataset_are_refused_before_anything_is_made(tmp_path, capsys):
  """`--config.data.files=notes/*.txt` without data.dataset=text_files used to train on the config's own
  dataset (fmjax_corpus), quietly. Training and `fmjax data prepare` refuse it in one line; a mixture's
  shared data.files (read by its text_files items) is not refused."""
  write_corpus(tmp_path / "c")
  config = tiny("gpt", tmp_path / "cache", **{"data.files": str(tmp_path / "c" / "*")})
  match = (r"^data.files='.*' is read only with data.dataset='text_files' \(data.dataset is 'fmjax_corpus', which "
           r"would be trained on instead\); add --config.data.dataset=text_files, or drop data.files$")
  with pytest.raises(config_lib.ConfigError, match=match):
    sources.check_files_read(config)
  from fmjax import cli, train
  assert cli.main(["data", "prepare", "--config=configs/gpt.py:tiny", f"--config.data.files={tmp_path}/c/*",
                   f"--config.data.cache_dir={tmp_path / 'cache'}"]) == 2
  assert "add --config.data.dataset=text_files" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "cache" / "datasets")
  with pytest.raises(config_lib.ConfigError, match=match):
    train.run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")
  config.data.dataset = "text_files"
  sources.check_files_read(config)
  config.data.dataset = "fmjax_corpus=1,text_files=1"
  sources.check_files_read(config)
  # A mixture with no item that reads the shared data.files (none is text_files, or each has files of its own).
  for dataset in ("fmjax_corpus=1,lm1b=1", f"fmjax_corpus=1,text_files(files={tmp_path}/c/*)=1"):
    config.data.dataset = dataset
    with pytest.raises(config_lib.ConfigError, match=r"^data.files='.*' is read only by a text_files item of "
                                                     r"the mixture, and data.dataset='.*' has none that reads it; "
                                                     r"add one "):
      sources.check_files_read(config)


def test_files_of_a_mixture_item_that_moved_are_named_in_its_item(tmp_path):
  """A mixture item with files of its own takes their new place in data.dataset (--config.data.files does not
  reach it), in training's check and in `fmjax eval`'s loaders alike; shared files are still data.files."""
  config = tiny("gpt", tmp_path / "cache", **{"data.dataset": "text_files(files=/moved/*.txt)=1,fmjax_corpus=1"})
  item_hint = (r"\(text that moved: give this item its new files in data.dataset, "
               r"'text_files\(files=NEW_GLOB\)=WEIGHT'\)$")
  with pytest.raises(config_lib.ConfigError, match=item_hint):
    sources.check_config(config)
  with pytest.raises(config_lib.ConfigError, match=item_hint):
    data.held_out_loaders(config, tok=object())  # the run's tokenizer: never reached, the check comes first
  config.data.update(dataset="text_files=1,fmjax_corpus=1", files="/moved/*.txt")
  with pytest.raises(config_lib.ConfigError, match=r"\(text that moved: --config.data.files=NEW_GLOB\)$"):
    sources.check_config(config)


def test_fmjax_data_imports_without_tensorflow():
  import subprocess
  import sys
  code = ("import sys; import fmjax.data; "
          "assert 'tensorflow' not in sys.modules and 'tensorflow_datasets' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_null_text_non_utf8_and_one_document_corpora_are_one_line(tmp_path, caplog):
  (tmp_path / "c").mkdir()
  rows = [{"text": None}] + [{"text": f"document number {i} has words"} for i in range(12)]
  (tmp_path / "c" / "n.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  config = tiny("gpt", tmp_path / "cache", **{"data.dataset": "text_files", "data.files": str(tmp_path / "c" / "n.jsonl")})
  with caplog.at_level("WARNING", logger="fmjax"):
    docs = list(sources.documents(config, "train")) + list(sources.documents(config, "eval"))
  assert len(docs) == 12 and "None" not in docs  # a JSON null is no text, never the string "None"
  assert sum("skipped 1 record(s) whose 'text' is null" in r.getMessage() for r in caplog.records) == 1  # read thrice
  cases = [("latin1.txt", "first block\n\ncaf\xe9 au lait\n".encode("latin-1"), r"latin1.txt is not UTF-8 text \(byte 16\)"),
           ("one.txt", b"one single huge line of text " * 1000, "holds 1 document, and text_files needs at least 2"),
           ("list.jsonl", b'{"text": "a b c"}\n["a", "b"]\n', r"list.jsonl:2 is a JSON list, not an object; each line"),
           ("num.jsonl", b'{"text": "a b c"}\n{"text": 5}\n', r"num.jsonl:2: 'text' is a JSON int, not text; fix the")]
  for name, raw, match in cases:
    (tmp_path / name).write_bytes(raw)
    bad = tiny("gpt", tmp_path / "cache", **{"data.dataset": "text_files", "data.files": str(tmp_path / name)})
    with pytest.raises(config_lib.ConfigError, match=match) as e:
      data.prepare(bad)
    assert "\n" not in str(e.value)


def test_a_jsonl_lone_surrogate_escape_is_replaced_not_a_traceback(tmp_path, caplog):
  """Scraped text cut inside an emoji keeps half its surrogate pair (`\\ud83d`), which JSON allows
  and UTF-8 cannot hold: it becomes U+FFFD, and whole pairs stay the characters they are."""
  (tmp_path / "c").mkdir()
  lines = [json.dumps({"text": f"document number {i} has a few more words than that"}) for i in range(40)]
  lines += ['{"text": "cut short \\ud83d here"}', '{"text": "a whole pair \\ud83d\\ude00 here"}']
  (tmp_path / "c" / "s.jsonl").write_text("\n".join(lines) + "\n")
  config = tiny("gpt", tmp_path / "cache", **{"data.dataset": "text_files",
                                              "data.files": str(tmp_path / "c" / "s.jsonl"),
                                              "data.seq_len": 16, "data.tokenizer.vocab_size": 300})
  with caplog.at_level("WARNING", logger="fmjax"):
    path = data.prepare(config)
  docs = list(sources.documents(config, "train")) + list(sources.documents(config, "eval"))
  assert len(docs) == 42 and "cut short \ufffd here" in docs and "a whole pair \U0001f600 here" in docs
  assert sum("replaced 1 lone surrogate escape(s)" in r.getMessage() and "s.jsonl:41" in r.getMessage()
             for r in caplog.records) == 1
  meta = json.load(open(os.path.join(path, "meta.json")))
  assert meta["splits"]["train"]["num_docs"] + meta["splits"]["eval"]["num_docs"] == 42


def test_every_jsonl_reader_takes_a_lone_surrogate_as_u_fffd(tmp_path, caplog):
  """Tasks, SFT rows and zero-shot items read .jsonl through one reader: a lone surrogate anywhere in a
  record (a list of choices, a key) becomes U+FFFD there too, where it failed later with a traceback."""
  path = tmp_path / "r.jsonl"
  path.write_text('{"context": "ok", "choices": [" a \\udc00", " b"], "label": 0}\n'
                  '{"prompt\\ud800": "x", "completion": "a whole pair \\ud83d\\ude00"}\n')
  with caplog.at_level("WARNING", logger="fmjax"):
    records = [r for _, r in sources.jsonl_records(str(path))]
  assert records == [{"context": "ok", "choices": [" a \ufffd", " b"], "label": 0},
                     {"prompt\ufffd": "x", "completion": "a whole pair \U0001f600"}]
  assert f"replaced 2 lone surrogate escape(s) (\\ud800-\\udfff without its pair) with U+FFFD (the first at {path}:1)" \
      in caplog.text, caplog.text


def test_a_mixture_names_its_dataset_too_short_for_a_row(tmp_path):
  (tmp_path / "short.txt").write_text("\n\n".join(["kayak fjord", "zebra"] + [f"word{i}" for i in range(5)]) + "\n")
  config = tiny("gpt", tmp_path / "cache", **{"data.dataset": "fmjax_corpus=3,text_files=1",
                                              "data.files": str(tmp_path / "short.txt")})
  with pytest.raises(config_lib.ConfigError, match=r"^dataset 'text_files' split 'train' has \d+ tokens, not enough "
                     "for one row of data.seq_len=128; lower data.seq_len or use more text$"):
    data.prepare(config)


def test_unreadable_files_and_a_record_without_the_field_are_one_line_and_a_byte_order_mark_is_read(tmp_path,
                                                                                                      monkeypatch):
  blocks = write_corpus(tmp_path / "c")
  (tmp_path / "c" / "z.txt").write_text("first block\n\nsecond block\n")
  os.chmod(tmp_path / "c" / "z.txt", 0)
  real = open
  def refusing(path, *args, **kwargs):  # as chmod 000 does, also where the tests run as root (root reads anyway)
    if os.path.basename(str(path)) in ("z.txt", "z.jsonl"):
      raise PermissionError(13, "Permission denied", str(path))
    return real(path, *args, **kwargs)
  monkeypatch.setattr(corpus, "open", refusing, raising=False)
  monkeypatch.setattr(sources, "open", refusing, raising=False)
  (tmp_path / "c" / "z.jsonl").write_text('{"body": "a record"}\n')
  for name in ("z.txt", "z.jsonl"):  # read as TFDS builds the corpus (the first check reads a.txt's two documents)
    files_glob = f"{tmp_path}/c/a.txt,{tmp_path}/c/{name}"
    config = tiny("gpt", tmp_path / "cache", **{"data.dataset": "text_files", "data.files": files_glob,
                                                "data.feature": "body", "data.tokenizer.vocab_size": 300})
    with pytest.raises(config_lib.ConfigError, match=rf"c/{name} cannot be read \(Permission denied\); make it "
                       r"readable by this user \(e.g. `chmod a\+r .*`\) or leave it out") as e:
      data.prepare(config)
    assert "\n" not in str(e.value)
  # A record that lacks the field the lines before it have is that record's fault, not data.feature's.
  rows = [{"body": f"document {i} here"} for i in range(5)] + [{"bdy": "a typo"}]
  (tmp_path / "typo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  config = tiny("gpt", tmp_path / "cache", **{"data.dataset": "text_files", "data.files": str(tmp_path / "typo.jsonl"),
                                              "data.feature": "body"})
  with pytest.raises(config_lib.ConfigError, match=r"typo.jsonl:6 has no field 'body' \(only \['bdy'\]\), though "
                     "earlier records have it; fix the record or remove it"):
    list(corpus.file_documents(corpus.resolve_files(config.data.files), "body"))
  # A .jsonl and a .txt that open with a UTF-8 byte-order mark (as Windows tools write them) are text.
  (tmp_path / "bom").mkdir()
  (tmp_path / "bom" / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "c" / "b.jsonl").read_bytes())
  (tmp_path / "bom" / "a.txt").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "c" / "a.txt").read_bytes())
  config = tiny("gpt", tmp_path / "cache", **{"data.dataset": "text_files", "data.files": f"{tmp_path}/bom/*",
                                              "data.feature": "body", "data.tokenizer.vocab_size": 300})
  docs = list(sources.documents(config, "train")) + list(sources.documents(config, "eval"))
  assert sorted(docs) == sorted(blocks)


@pytest.mark.parametrize("resolves", [False, True])
def test_a_community_dataset_that_cannot_be_looked_up_is_one_line(tmp_path, monkeypatch, resolves):
  """TFDS looks `huggingface:` names up on the Hub, prepared or not: offline, ~25 s of retries, then a traceback."""
  for var in sources._PROXY_VARS:
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(sources, "_resolves", lambda host: resolves)
  def offline(*args, **kwargs):
    raise ConnectionError("[Errno -2] Name or service not known")
  monkeypatch.setattr(tfds, "builder", offline)
  config = tiny("gpt", tmp_path / "cache", **{"data.dataset": "huggingface:wikitext"})
  why = ("is looked up on the Hugging Face Hub, and this machine cannot reach it" if not resolves else
         r"could not be looked up \(ConnectionError: \[Errno -2\] Name or service not known\)")
  with pytest.raises(config_lib.ConfigError, match=rf"dataset 'huggingface:wikitext' {why}.*; run where it is "
                     "reachable, or write its text to .jsonl files and use --config.data.dataset=text_files") as e:
    data.prepare(config)
  assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "cache")


@pytest.mark.parametrize("over, match", [
    ({"data.dataset": "nosuchds"}, "unknown dataset 'nosuchds'"),
    ({"data.tokenizer.kind": "foo"}, r"data.tokenizer.kind='foo' is not one of"),
    ({"data.tokenizer.vocab_size": 100}, "data.tokenizer.vocab_size=100 leaves byte-level BPE no merges"),
])
def test_bad_data_settings_fail_before_a_workdir_exists(tmp_path, over, match):
  from fmjax import train
  with pytest.raises(config_lib.ConfigError, match=match) as e:
    train.run(tiny("gpt", tmp_path / "cache", **over), str(tmp_path / "w"))
  assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "w")


def test_a_dataset_that_cannot_be_downloaded_is_one_line(tmp_path, monkeypatch, tfds_online):
  """A download that fails once begun (its hosts resolve): TFDS's error becomes one line saying where to prepare it."""
  config = tiny("gpt", tmp_path / "cache", **{"data.dataset": "lm1b", "data.data_dir": str(tmp_path)})
  builder_cls = type(sources._builder(config))
  def offline(*args, **kwargs):
    raise ConnectionError("Failed to resolve 'www.statmt.org'")
  monkeypatch.setattr(builder_cls, "download_and_prepare", offline)
  with pytest.raises(config_lib.ConfigError, match=r"dataset 'lm1b' is not prepared in data.data_dir=.*ConnectionError"
                     r".*`tfds build lm1b --data_dir=DIR`") as e:
    data.prepare(config)
  assert "\n" not in str(e.value)


def test_an_unreachable_tfds_download_fails_at_once_before_any_workdir(tmp_path, monkeypatch):
  """Offline, TFDS retries each URL for about 3.5 minutes before it gives up; fmjax asks DNS first."""
  from fmjax import finetune, tasks, train
  asked = []
  monkeypatch.setattr(sources, "_resolves", lambda host: asked.append(host) and False)
  for proxy in sources._PROXY_VARS:
    monkeypatch.delenv(proxy, raising=False)
  config = tiny("gpt", tmp_path / "cache", **{"data.dataset": "lm1b", "data.data_dir": str(tmp_path)})
  with pytest.raises(config_lib.ConfigError, match=r"dataset 'lm1b' is not prepared in data.data_dir=.*no address "
                     r"for www.statmt.org: no network\?\); prepare it on a machine with internet \(`tfds build lm1b "
                     r"--data_dir=DIR`\)") as e:
    train.run(config, str(tmp_path / "run"))
  assert "\n" not in str(e.value) and asked == ["www.statmt.org"]
  assert not os.path.exists(tmp_path / "run")

  glue = config_lib.load_config(os.path.join(HERE, "..", "configs", "finetune_cls.py") + ":task=glue/sst2",
                                [f"data.cache_dir={tmp_path / 'cache'}", f"data.data_dir={tmp_path}"])
  with pytest.raises(config_lib.ConfigError, match=r"dataset 'glue/sst2' is not prepared .*\(no address for "):
    tasks.load_task(glue)
  with pytest.raises(config_lib.ConfigError, match=r"no address for "):
    finetune.run(glue, str(tmp_path / "ft"))
  assert not os.path.exists(tmp_path / "ft")

  # Behind a proxy the proxy resolves names, so TFDS is left to try; a host that resolves passes too.
  builder = sources._builder(config)
  monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
  sources.check_downloadable("lm1b", builder, str(tmp_path))
  monkeypatch.delenv("HTTPS_PROXY")
  monkeypatch.setattr(sources, "_resolves", lambda host: True)
  sources.check_downloadable("lm1b", builder, str(tmp_path))


def test_a_start_that_fails_after_creating_its_workdir_removes_it(tmp_path, monkeypatch):
  """E.g. a dataset whose download fails once begun: nothing was saved, so nothing is left."""
  from fmjax import train
  def failing_prepare(*args, **kwargs):
    raise config_lib.ConfigError("dataset 'x' could not be downloaded")
  monkeypatch.setattr(data, "prepare", failing_prepare)
  write_corpus(tmp_path / "corpus")
  config = tiny("gpt", tmp_path / "cache", **{"data.dataset": "text_files", "data.files": str(tmp_path / "corpus" / "*.txt")})
  with pytest.raises(config_lib.ConfigError, match="could not be downloaded"):
    train.run(config, str(tmp_path / "new"))
  assert not os.path.exists(tmp_path / "new")
  (tmp_path / "mine").mkdir()  # a directory the user made is theirs: it stays
  with pytest.raises(config_lib.ConfigError):
    train.run(config, str(tmp_path / "mine"))
  assert os.path.isdir(tmp_path / "mine")


def test_a_rerun_after_a_failed_start_takes_its_own_init_froms_tokenizer(tmp_path, monkeypatch):
  """A start from init_from=A that fails before training leaves A's tokenizer in a directory the
  user made; the rerun from B must read B's ids, not the leftover (a resume alone trusts it)."""
  from fmjax import train
  write_corpus(tmp_path / "corpus")

  def config(vocab, **kw):
    return tiny("gpt", tmp_path / "cache", **{
        "data.dataset": "text_files", "data.files": str(tmp_path / "corpus" / "a.txt"), "data.tokenizer.vocab_size": vocab,
        "data.seq_len": 16, "train.batch_size": 8, "train.steps": 1, "train.eval_batches": 0,
        "train.progress_bar": False, "checkpoint.async_save": False, **kw})

  for name, vocab in (("a", 300), ("b", 320)):
    train.run(config(vocab), str(tmp_path / name))
  identity = lambda run: data.load_tokenizer(str(tmp_path / run / "tokenizer")).identity()
  assert identity("a") != identity("b")

  def out_of_memory(*args, **kwargs):
    raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
  real_prepare = data.prepare
  monkeypatch.setattr(data, "prepare", out_of_memory)
  (tmp_path / "w").mkdir()
  with pytest.raises(RuntimeError, match="out of memory"):
    train.run(config(280, init_from=str(tmp_path / "a")), str(tmp_path / "w"))
  assert identity("w") == identity("a")  # what the failed start wrote
  with pytest.raises(RuntimeError, match="out of memory"):  # not only a setting: any failure before training
    train.run(config(280, init_from=str(tmp_path / "a")), str(tmp_path / "new"))
  assert not os.path.exists(tmp_path / "new")

  monkeypatch.setattr(data, "prepare", real_prepare)
  train.run(config(280, init_from=str(tmp_path / "b")), str(tmp_path / "w"))
  assert identity("w") == identity("b")


def test_a_start_that_loses_the_lock_of_a_new_workdir_leaves_it_to_the_winner(tmp_path, monkeypatch):
  """Two starts on one new workdir: the second finds it locked; its clean-up must not remove the
  workdir the first is training in (it did: both had seen it missing)."""
  import subprocess
  import sys
  from fmjax import train
  from fmjax.data import sources
  workdir = tmp_path / "w"
  holder = ("import os, sys, time\nfrom fmjax import checkpoint as c\nos.makedirs(sys.argv[1])\n"
            "lock = c.lock_workdir(sys.argv[1]); print('locked', flush=True); time.sleep(60)\n")
  procs = []
  real = sources.check_config

  def first_start_meanwhile(config):  # this start has seen no workdir; another takes it now
    procs.append(subprocess.Popen([sys.executable, "-c", holder, str(workdir)], stdout=subprocess.PIPE, text=True))
    assert procs[0].stdout.readline().strip() == "locked"
    return real(config)
  monkeypatch.setattr(sources, "check_config", first_start_meanwhile)
  try:
    with pytest.raises(config_lib.ConfigError, match="another fmjax process is training in"):
      train.run(tiny("gpt", tmp_path / "cache"), str(workdir))
    assert os.path.isdir(workdir)
  finally:
    for proc in procs:
      proc.kill()


def test_parts_read_through_tf_data_begin_where_files_begin_and_equal_those_read_by_index(tmp_path, monkeypatch):
  """A dataset TFDS prepared as TFRecord has no random access: a read that starts inside a file
  reads it from its start. Its parts are whole files (at least data.shard_docs records each), each
  read through a split spec of its own (`train[78:156]`), and hold what indexing the records gives."""
  import tensorflow_datasets as tfds
  from fmjax.data import corpus
  over = {"data.shard_docs": 100, "data.prepare_workers": 1, "data.train_split": "train[:90%]+validation[:5]"}
  config = tiny("gpt", tmp_path / "tf_data", **over)
  as_tfrecord = lambda config: corpus.FmjaxCorpus(data_dir=str(tmp_path / "tfds"), file_format="tfrecord")
  as_tfrecord(None).download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=4))
  lengths = as_tfrecord(None).info.splits["train"].shard_lengths
  assert len(lengths) == 4 and sum(lengths) == 312, lengths
  by_index = data.prepare(tiny("gpt", tmp_path / "index", **over))
  monkeypatch.setattr(sources, "_builder", as_tfrecord)
  monkeypatch.setattr(corpus.FmjaxCorpus, "as_data_source", lambda *a, **k: 1 / 0)  # as for TFRecord
  assert sources.record_count(config, "train") == 286
  assert sources._sub_spec(sources._builder(config), "train[:90%]+validation[:5]", 250, 290) == \
      "train[250:281]+validation[0:5]"  # 281 = 90% of the 312 train records
  starts = list(itertools.accumulate([0] + lengths[:-1])) + [281]  # the 5 validation records begin a piece
  assert sources.file_starts(config, "train") == starts
  plan = [records for split, _, records in packing._plan(config) if split == "train"]
  cuts = packing._cuts(starts, 286, 100)
  assert [a for a, _ in plan] == cuts and set(cuts) <= set(starts) and len(plan) < len(starts)
  assert all(b - a >= 100 for a, b in plan[:-1]) and plan[-1][1] == 286
  for a, b in plan:  # no read skips records to reach its first
    spec = sources._sub_spec(sources._builder(config), "train[:90%]+validation[:5]", a, b)
    read = sources._builder(config).info.splits[spec].file_instructions
    assert read and all(f.skip == 0 for f in read), (spec, read)
  tf_data = data.prepare(config)
  monkeypatch.undo()  # the same cuts, read by index
  monkeypatch.setattr(sources, "file_starts", lambda config, split: starts if split == "train" else None)
  assert arrays(tf_data) == arrays(data.prepare(tiny("gpt", tmp_path / "index_cut_alike", **over)))
  assert arrays(tf_data) != arrays(by_index)  # a sanity check: other cuts, other rows


def test_a_part_cut_elsewhere_by_an_earlier_prepare_is_made_again(tmp_path, monkeypatch):
  config = tiny("gpt", tmp_path / "a", **{"data.shard_docs": 100, "data.prepare_workers": 1})
  want = arrays(data.prepare(config))
  real, made = packing._write_part, []

  def dies_on_the_third_part(*args):
    if len(made) == 2:
      raise KeyboardInterrupt
    made.append(args[3])
    return real(*args)

  other = tiny("gpt", tmp_path / "b", **{"data.shard_docs": 100, "data.prepare_workers": 1})
  monkeypatch.setattr(packing, "_write_part", dies_on_the_third_part)
  monkeypatch.setattr(sources, "file_starts", lambda config, split: [0, 150])  # an older cut of train
  with pytest.raises(KeyboardInterrupt):
    data.prepare(other)
  assert made == [0, 1]
  monkeypatch.undo()
  got = data.prepare(other)  # part 0 holds records [0, 150), not [0, 100): made again, as part 1 is
  assert arrays(got) == want
  # The same in a bucket (here a local directory), where a part counts as made by its meta.json.
  bucket, tok = str(tmp_path / "bucket" / "entry"), data.get_tokenizer(other)
  monkeypatch.setattr(sources, "file_starts", lambda config, split: [0, 150])
  packing._prepare_in_bucket(other, tok, bucket, str(tmp_path / "scratch"))
  assert files.read_json(f"{bucket}/train/part-00000/meta.json")["records"] == [0, 150]
  os.remove(f"{bucket}/meta.json")  # as if stopped before process 0 finished
  monkeypatch.undo()
  packing._prepare_in_bucket(other, tok, bucket, str(tmp_path / "scratch"))
  assert arrays(bucket) == want


def test_two_processes_building_the_tfds_corpus_at_once_take_turns(tmp_path):
  """A sweep's runs, or two prepares, on a cache whose TFDS corpus is not built yet: one builds it,
  the other waits and reads it (TFDS alone failed the second one's rename)."""
  import threading
  config = tiny("gpt", tmp_path)
  builders = [sources._builder(config) for _ in range(2)]
  assert builders[0] is not builders[1] and not builders[0].is_prepared()
  start, errors = threading.Barrier(2), []

  def build(builder):
    start.wait()
    try:
      sources._prepare_ours(config, builder)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=build, args=(b,)) for b in builders]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  assert [b.info.splits["train"].num_examples for b in builders] == [312, 312]


def test_two_processes_preparing_one_cache_take_turns(tmp_path, monkeypatch):
  """Processes of one host that prepare the same entry at once (every process of a multi-process
  run calls prepare): one makes it, the other waits and uses it; nothing half made is left."""
  import threading
  config = tiny("gpt", tmp_path, **{"data.shard_docs": 100, "data.prepare_workers": 1})
  tok = data.get_tokenizer(config)
  data.prepare(tiny("gpt", tmp_path, **{"data.shard_docs": 100, "data.prepare_workers": 1,
                                        "data.seq_len": 64}))  # builds the TFDS corpus once, outside the race
  real, made = packing._write_part, []

  def slow(*args):
    made.append(args[2:4])
    time.sleep(0.2)
    return real(*args)

  monkeypatch.setattr(packing, "_write_part", slow)
  # What a killed worker of an earlier attempt left behind.
  leftover = os.path.join(packing.cache_path(config, tok) + ".parts", "train", ".tmp-killed")
  os.makedirs(leftover)
  paths = []
  threads = [threading.Thread(target=lambda: paths.append(data.prepare(config, tok))) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(paths) == 2 and paths[0] == paths[1] and packing.is_prepared(paths[0])
  assert len(made) == len(set(made)) == sum(len(s["parts"]) for s in json.load(open(
      os.path.join(paths[0], "meta.json")))["splits"].values())  # each part made once
  entries = os.listdir(tmp_path / "datasets")
  assert os.path.basename(paths[0]) in entries and not [e for e in entries if e.endswith((".parts", ".lock"))]
  assert not glob.glob(os.path.join(paths[0], "*", ".tmp-*"))


def test_a_part_whose_records_hold_no_tokens_is_skipped(tmp_path):
  """Records the tokenizer turns into nothing (control characters, for WordPiece) make parts with
  no rows; the loader and the unigram baseline read around them."""
  blocks = write_corpus(tmp_path / "corpus")
  with open(tmp_path / "corpus" / "c.jsonl", "w") as f:
    for _ in range(10):
      f.write(json.dumps({"body": "\u0007\u0007"}) + "\n")
  config = tiny("bert", tmp_path / "cache", **{
      "data.dataset": "text_files", "data.files": f"{tmp_path}/corpus/*.jsonl", "data.feature": "body",
      "data.seq_len": 32, "data.tokenizer.vocab_size": 300, "data.shard_docs": 1, "data.prepare_workers": 1})
  path = data.prepare(config)
  parts = [p for s in json.load(open(os.path.join(path, "meta.json")))["splits"].values() for p in s["parts"]]
  assert any(p["num_rows"] == 0 for p in parts) and len(blocks)
  loader = data.make_loader(config, "train", batch_size=4)
  assert loader.host_batch(0)["segment_ids"].shape == (4, 32)
  assert 0 < data.unigram_baseline(config) < 10


def test_a_resume_on_other_rows_is_told(tmp_path, caplog):
  """A checkpoint records its cache's fingerprint; resuming on a cache with other rows says so."""
  from fmjax import train
  one = data.prepare(tiny("gpt", tmp_path, **{"data.prepare_workers": 1}))
  parts = data.prepare(tiny("gpt", tmp_path, **{"data.shard_docs": 100, "data.prepare_workers": 1}))
  fingerprint = train._check_data(one, None)
  assert fingerprint != packing.fingerprint(parts)
  with caplog.at_level("WARNING", logger="fmjax"):
    assert train._check_data(one, (5, {"data": fingerprint}, [])) == fingerprint
    assert not [r for r in caplog.records if r.name == "fmjax"]
    train._check_data(parts, (5, {"data": fingerprint}, []))
    assert "holds other rows than those this run trained on" in caplog.text
    caplog.clear()
    train._check_data(one, (5, {}, []))  # a checkpoint from before fingerprints, on a cache of one part
    assert not [r for r in caplog.records if r.name == "fmjax"]
    train._check_data(parts, (5, {}, []))
    assert "this run's checkpoint is older than parts" in caplog.text


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_a_cache_damaged_since_it_was_prepared_is_one_line_or_made_again(tmp_path, family):
  """A resume reads the cache its run prepared: a file of it cut short, garbled or gone is one line
  naming the entry to delete (not an IndexError at some batch), and an entry that lost its
  meta.json is made again, with the same rows."""
  write_corpus(tmp_path / "corpus")
  config = tiny(family, tmp_path / "cache", **{
      "data.dataset": "text_files", "data.files": f"{tmp_path}/corpus/*.jsonl", "data.feature": "body",
      "data.seq_len": 32, "data.tokenizer.vocab_size": 300, "data.prepare_workers": 1})
  path = data.prepare(config)
  pristine, whole = str(tmp_path / "pristine"), arrays(path)
  shutil.copytree(path, pristine)

  def cut(name, size):
    with open(os.path.join(path, name), "r+b") as f:
      f.truncate(size)

  damages = [
      (lambda: cut("train/part-00000/tokens.bin", 100), "train",
       r"part-00000/tokens\.bin holds 50 elements where its meta\.json counts \d+: the prepared cache is damaged"),
      (lambda: cut("meta.json", 20), "fingerprint", r"is damaged \(meta\.json does not parse: "),
      (lambda: cut("train/meta.json", 20), "train", r"is damaged \(train/meta\.json does not parse: "),
      (lambda: os.remove(os.path.join(path, "tokenizer", "tokenizer.json")), "fingerprint",
       r"is damaged \(tokenizer/tokenizer\.json is missing\)"),
  ]
  for damage, read, match in damages:
    damage()
    with pytest.raises(config_lib.ConfigError, match=match) as e:
      packing.fingerprint(path) if read == "fingerprint" else data.make_loader(config, "train", batch_size=4)
    assert "\n" not in str(e.value) and str(e.value).endswith("to prepare it again"), e.value
    assert path in str(e.value)
    shutil.rmtree(path)
    shutil.copytree(pristine, path)
  # The least an array may hold: a stream's last row reads one token past it, a row layout none.
  split = json.loads(open(os.path.join(path, "train", "meta.json")).read())
  least = split["parts"][0]["num_rows"] * 32 + (split["layout"] == "stream")
  itemsize = np.dtype(split["dtype"]).itemsize
  cut("train/part-00000/tokens.bin", least * itemsize)
  data.make_loader(config, "train", batch_size=4)
  cut("train/part-00000/tokens.bin", (least - 1) * itemsize)
  with pytest.raises(config_lib.ConfigError, match=rf"holds {least - 1} elements where its meta\.json counts {least}:"):
    data.make_loader(config, "train", batch_size=4)
  shutil.rmtree(path)
  shutil.copytree(pristine, path)
  os.remove(os.path.join(path, "meta.json"))
  assert data.prepare(config) == path and arrays(path) == whole
  assert packing.fingerprint(path) == packing.fingerprint(pristine)
