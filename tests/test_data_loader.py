"""The step-indexed loader: determinism, epochs, host splits, packing, masking, eval coverage, prefetch."""

import copy
import logging
import os
import shutil
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmjax import config_lib
import fmjax.data as data
from fmjax.data import masking, packing, sources
from fmjax.data import tokenizers as tok_lib

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


@pytest.fixture(scope="module")
def gpt(cache_dir):
  return tiny("gpt", cache_dir)


@pytest.fixture(scope="module")
def bert(cache_dir):
  return tiny("bert", cache_dir)


def data_sharding(mesh_shape=(8,), names=("data",)):
  mesh = Mesh(np.array(jax.devices()[:int(np.prod(mesh_shape))]).reshape(mesh_shape), names)
  return NamedSharding(mesh, P(names if len(names) > 1 else names[0], None))


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_batch_is_pure_function_of_seed_and_step(family, gpt, bert):
  config = {"gpt": gpt, "bert": bert}[family]
  a, b = data.make_loader(config), data.make_loader(config)
  for step in (0, 7, 1000):
    assert_batches_equal(a.host_batch(step), b.host_batch(step))
  assert not np.array_equal(a.host_batch(0)["inputs"], a.host_batch(1)["inputs"])
  other = data.make_loader(tiny(family, config.data.cache_dir, **{"data.seed": 1}))
  assert not np.array_equal(a.host_batch(0)["inputs"], other.host_batch(0)["inputs"])
  shapes = {k: v.shape for k, v in a.host_batch(0).items()}
  B, T, M = config.train.batch_size, config.data.seq_len, config.data.max_predictions
  R = a.num_runs
  assert 1 < R <= packing.MAX_RUNS  # these rows pack several documents: their runs come along
  common = {"inputs": (B, T), "segment_ids": (B, T), "positions": (B, T), "token_types": (B, T),
            "segment_lengths": (B, R), "segment_offsets": (B, R + 1)}
  if family == "gpt":
    assert shapes == {**common, "targets": (B, T), "loss_weights": (B, T)}
  else:
    assert shapes == {**common, "mlm_positions": (B, M), "mlm_targets": (B, M), "mlm_weights": (B, M)}
  batch = a.host_batch(3)
  assert all(v.dtype == (np.float32 if "weights" in k else np.int32) for k, v in batch.items())


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_cache_counts_the_most_segments_a_row(family, gpt, bert, monkeypatch):
  """`max_segments` in a split's meta is exactly the most runs of segment ids in any row the
  loader reads, so every batch can carry them at one fixed shape; a split with more than
  MAX_RUNS carries none (cuDNN then takes the mask)."""
  config = {"gpt": gpt, "bert": bert}[family]
  for split in ("train", "eval"):
    loader = data.make_loader(config, split)
    rows = loader.data.rows(np.arange(loader.data.num_rows))
    assert loader.data.meta["max_segments"] == packing.most_runs(rows["segment_ids"]) == loader.num_runs
  monkeypatch.setattr(packing, "MAX_RUNS", loader.num_runs - 1)
  loader = data.make_loader(config)
  assert loader.num_runs == 0 and "segment_lengths" not in loader.host_batch(0)


EOS_OPENS = SimpleNamespace(eos_id=0, bos_id=0, frames_documents=False)  # GPT-2's convention: EOS ends and opens


def test_stream_cache_counts_no_segment_for_an_eos_that_opens_a_row(tmp_path):
  """Rows of 4 from documents ending at EOS (0): an EOS in a row's first slot opens the row, no new segment."""
  writer = packing._StreamWriter(str(tmp_path), np.uint16, 4, EOS_OPENS)
  for doc in ([1, 2, 3, 4], [5, 6, 7], [8, 9], [10, 11, 12, 13, 14]):
    writer.add(doc)
  stats = writer.close()
  stream = np.fromfile(tmp_path / "tokens.bin", np.uint16)
  np.testing.assert_array_equal(stream[:16].reshape(4, 4), [[1, 2, 3, 4], [0, 5, 6, 7], [0, 8, 9, 0], [10, 11, 12, 13]])
  assert stats["num_rows"] == 4 and stats["max_segments"] == 2  # row 2 only: [0 8 9 | 0]


def test_a_tokenizer_that_frames_documents_packs_each_as_bos_ids_eos(tmp_path):
  """With a BOS of its own (1; EOS 0), every document, the part's first too, is 1 ids 0, and the BOS opens its
  segment: rows of 4 [1 5 6 0] [1 7 0 1] [8 9 10 0] hold 1, 2 and 1 segments."""
  framed = SimpleNamespace(eos_id=0, bos_id=1, frames_documents=True)
  writer = packing._StreamWriter(str(tmp_path), np.uint16, 4, framed)
  for doc in ([5, 6], [7], [8, 9, 10]):
    writer.add(doc)
  stats = writer.close()
  stream = np.fromfile(tmp_path / "tokens.bin", np.uint16)
  np.testing.assert_array_equal(stream, [1, 5, 6, 0, 1, 7, 0, 1, 8, 9, 10, 0])
  assert stats["num_rows"] == 2 and stats["max_segments"] == 2  # row 1: [1 7 0 | 1]


def test_a_stream_that_ends_on_a_row_boundary_has_no_row_short_of_its_last_target(tmp_path):
  """Row r reads T + 1 tokens from r*T (its inputs, and one on its targets): a stream of exactly 2T
  tokens holds one row; a second would read past the end (and the loader would call the cache damaged)."""
  writer = packing._StreamWriter(str(tmp_path), np.uint16, 4, EOS_OPENS)
  for doc in ([1, 2, 3], [5, 6, 7]):
    writer.add(doc)
  stats = writer.close()
  assert stats["num_stream_tokens"] == 8 and stats["num_rows"] == 1


def test_mlm_segments_pair_a_first_and_a_second_half_cut_at_random_points(tmp_path):
  """Each chunk of T - 3 tokens of a document becomes [CLS] A [SEP] B [SEP], B non-empty whenever the chunk
  has two tokens, at a cut drawn anew for each chunk: B is all that token type 1 (its embedding) trains on."""
  tok = SimpleNamespace(pad_id=0, cls_id=1, sep_id=2)
  T = 16
  writer = packing._RowWriter(str(tmp_path), np.uint16, T, tok)
  docs = [[3], [4, 5]] + [list(range(100 * i, 100 * i + n)) for i, n in enumerate((13, 13, 13, 13, 30), 1)]
  for doc in docs:
    writer.add(doc)
  writer.close()
  rows = [np.fromfile(tmp_path / f"{name}.bin", dtype).reshape(-1, T)
          for name, dtype in (("tokens", np.uint16), ("segment_ids", np.uint16), ("token_types", np.uint8))]
  chunks, cuts = [], []
  for tokens, seg, types_ in zip(*rows):
    for s in np.unique(seg[seg > 0]):
      t, ty = tokens[seg == s], types_[seg == s]
      seps = np.flatnonzero(t == tok.sep_id)
      a, b = list(t[1:seps[0]]), list(t[seps[0] + 1:-1])
      assert t[0] == tok.cls_id and t[-1] == tok.sep_id and len(seps) == (2 if b else 1)
      assert len(a) >= 1 and (len(b) >= 1 or len(a) == 1), (a, b)  # a chunk of 2 or more tokens has both halves
      np.testing.assert_array_equal(ty, [0] * (len(a) + 2) + [1] * (len(b) + 1 if b else 0))
      chunks.append(a + b)
      cuts.append(len(a))
  assert chunks == [doc[s:s + T - 3] for doc in docs for s in range(0, len(doc), T - 3)]
  assert len({cut for chunk, cut in zip(chunks, cuts) if len(chunk) == T - 3}) > 2, cuts


def test_cache_from_before_the_segment_count_says_so(gpt, monkeypatch, caplog):
  real_init = data.PackedSplit.__init__

  def old_cache(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    del self.meta["max_segments"]

  monkeypatch.setattr(data.PackedSplit, "__init__", old_cache)
  with caplog.at_level(logging.INFO, logger="fmjax"):
    loader = data.make_loader(gpt)
  assert loader.num_runs == 0 and "segment_lengths" not in loader.host_batch(0)
  assert "prepared before caches counted segments" in caplog.text and "delete it" in caplog.text


def test_epochs_are_permutations_and_reshuffle(gpt):
  loader = data.make_loader(gpt, batch_size=1)
  N = loader.data.num_rows
  epoch0 = np.concatenate([loader.dataset_rows(s) for s in range(N)])
  epoch1 = np.concatenate([loader.dataset_rows(s) for s in range(N, 2 * N)])
  np.testing.assert_array_equal(np.sort(epoch0), np.arange(N))
  np.testing.assert_array_equal(np.sort(epoch1), np.arange(N))
  assert not np.array_equal(epoch0, epoch1)
  assert not np.array_equal(epoch0, np.arange(N))


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_simulated_hosts_assemble_the_same_global_batch(family, gpt, bert):
  config = {"gpt": gpt, "bert": bert}[family]
  sharding = data_sharding((2, 4), ("data", "fsdp"))
  reference = data.make_loader(config, sharding=sharding)
  for step in (0, 5):
    whole = reference.global_batch(step)
    for hosts in (1, 2, 4):
      parts = [data.make_loader(config, sharding=sharding, process_index=p, process_count=hosts).host_batch(step)
               for p in range(hosts)]
      assert len(parts[0]["inputs"]) == config.train.batch_size // hosts
      joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      assert_batches_equal(joined, whole)
    assert whole["inputs"].sharding == sharding


def test_clm_packing_segments_and_weights(gpt):
  loader = data.make_loader(gpt)
  eos = loader.tokenizer.eos_id
  for step in range(4):
    b = loader.host_batch(step)
    x, seg, pos, w = b["inputs"], b["segment_ids"], b["positions"], b["loss_weights"]
    np.testing.assert_array_equal(b["targets"][:, :-1], x[:, 1:])
    assert (seg > 0).all()  # documents fill every row: no padding at all
    np.testing.assert_array_equal(w, 1.0)  # every next token counts, EOS (the end) and after it (a start)
    # Each EOS opens the next document's segment as its BOS: position 0, a new segment id. So the
    # EOS -> first token target is within a document, and the last token -> EOS one is predicted
    # from its own document only.
    opens = x == eos
    np.testing.assert_array_equal(pos == 0, opens | (np.arange(x.shape[1]) == 0))
    np.testing.assert_array_equal(np.diff(seg, axis=1), opens[:, 1:].astype(np.int32))
    assert (seg[:, 0] == 1).all()
    np.testing.assert_array_equal(b["token_types"], 0)
  assert loader.data.meta["pad_fraction"] < 0.01


def test_clm_cache_holds_the_documents_exactly(gpt):
  path = data.prepare(gpt)
  tok = data.load_tokenizer(os.path.join(path, "tokenizer"))
  stream = np.fromfile(os.path.join(path, "eval", "part-00000", "tokens.bin"), dtype=np.uint16)
  assert stream[-1] == tok.eos_id
  cut = np.flatnonzero(stream == tok.eos_id)
  decoded = [tok.decode(d) for d in np.split(stream, cut + 1)[:-1]]
  decoded = [d.removesuffix("<|endoftext|>") for d in decoded]
  assert decoded == list(sources.documents(gpt, "eval"))


@pytest.fixture(scope="module")
def gpt_framed(cache_dir, framed_tokenizer_dir):
  return tiny("gpt", cache_dir, **{"data.tokenizer.kind": "hf", "data.tokenizer.path": str(framed_tokenizer_dir)})


def test_framed_documents_open_at_their_bos_and_never_target_the_next_one(gpt_framed):
  """A tokenizer with a BOS of its own (Llama's <s>): each document is <s> ids </s>, its segment opens at the <s>
  (position 0), the </s> ends it, and </s> -> the next <s> has weight 0, the one target no document decides."""
  loader = data.make_loader(gpt_framed)
  tok = loader.tokenizer
  bos, eos = tok.bos_id, tok.eos_id
  assert tok.frames_documents
  for step in range(4):
    b = loader.host_batch(step)
    x, y, seg, pos, w = b["inputs"], b["targets"], b["segment_ids"], b["positions"], b["loss_weights"]
    opens = x == bos
    np.testing.assert_array_equal(pos == 0, opens | (np.arange(x.shape[1]) == 0))
    np.testing.assert_array_equal(np.diff(seg, axis=1), opens[:, 1:].astype(np.int32))
    np.testing.assert_array_equal(y == bos, x == eos)
    np.testing.assert_array_equal(w, (y != bos).astype(np.float32))
  rows = loader.data.rows(np.arange(loader.data.num_rows))
  np.testing.assert_array_equal(loader.data.targets(), rows["targets"][rows["loss_weights"] > 0])  # the baseline's

  path = data.prepare(gpt_framed)
  stream = np.fromfile(os.path.join(path, "eval", "part-00000", "tokens.bin"), dtype=np.uint16)
  framed = np.split(stream, np.flatnonzero(stream == bos)[1:])
  assert all(d[0] == bos and d[-1] == eos and eos not in d[:-1] for d in framed)
  assert [tok.decode(d[1:-1]) for d in framed] == list(sources.documents(gpt_framed, "eval"))


def test_bert_rows_structure(bert):
  loader = data.make_loader(bert)
  tok = loader.tokenizer
  rows = loader.data.rows(np.arange(64))
  for tokens, seg, types, pos in zip(rows["tokens"], rows["segment_ids"], rows["token_types"], rows["positions"]):
    ids = [s for s in np.unique(seg) if s > 0]
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    assert (tokens[seg == 0] == tok.pad_id).all() and (pos[seg == 0] == 0).all()
    for s in ids:
      t, ty = tokens[seg == s], types[seg == s]
      assert t[0] == tok.cls_id and t[-1] == tok.sep_id
      np.testing.assert_array_equal(pos[seg == s], np.arange(len(t)))
      seps = np.flatnonzero(t == tok.sep_id)
      assert 1 <= len(seps) <= 2
      np.testing.assert_array_equal(ty, (np.arange(len(t)) > seps[0]).astype(np.int32))  # A=0 .. [SEP], B=1


def test_mlm_masking_rates_and_invariants(bert):
  loader = data.make_loader(bert)
  tok = loader.tokenizer
  special = np.array(sorted(tok.special_ids))
  counts = {"mask": 0, "random": 0, "kept": 0}
  rates = []
  for step in range(40):
    b = loader.host_batch(step)
    orig = loader.data.rows(loader.dataset_rows(step))["tokens"]
    pos, tgt, w = b["mlm_positions"], b["mlm_targets"], b["mlm_weights"].astype(bool)
    rows = np.arange(len(pos))[:, None]
    np.testing.assert_array_equal(np.where(w, orig[rows, pos], 0), tgt)
    assert not np.isin(tgt[w], special).any()  # never a special or pad token
    assert all((np.diff(p[m]) > 0).all() and m[:m.sum()].all() for p, m in zip(pos, w))  # sorted, padding last
    untouched = np.ones_like(orig, bool)
    untouched[np.nonzero(w)[0], pos[w]] = False
    np.testing.assert_array_equal(b["inputs"][untouched], orig[untouched])
    new = b["inputs"][rows, pos][w]
    counts["mask"] += int((new == tok.mask_id).sum())
    counts["kept"] += int((new == tgt[w]).sum())
    counts["random"] += int(((new != tok.mask_id) & (new != tgt[w])).sum())
    assert not np.isin(new[new != tok.mask_id], special).any()
    cand = ((b["segment_ids"] > 0) & ~np.isin(orig, special)).sum(1)
    n = w.sum(1)
    assert (n <= bert.data.max_predictions).all() and (n >= 1).all()
    rates.extend((n / cand)[n < bert.data.max_predictions])
  total = sum(counts.values())
  assert total > 10_000
  assert abs(counts["mask"] / total - 0.8) < 0.02, counts
  assert abs(counts["random"] / total - 0.1) < 0.015, counts
  assert abs(counts["kept"] / total - 0.1) < 0.015, counts
  assert abs(np.mean(rates) - 0.15) < 0.01


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_eval_reads_every_row_once_in_order(family, gpt, bert):
  config = {"gpt": gpt, "bert": bert}[family]
  loader = data.make_loader(config, split="eval", sharding=data_sharding())
  N, B = loader.data.num_rows, loader.batch_size
  assert loader.num_batches == -(-N // B)
  ids = np.concatenate([loader.dataset_rows(s) for s in range(loader.num_batches)])
  np.testing.assert_array_equal(ids[:N], np.arange(N))
  assert (ids[N:] == -1).all()
  last = loader.host_batch(loader.num_batches - 1)
  pad = N - (loader.num_batches - 1) * B
  weights = last["loss_weights" if family == "gpt" else "mlm_weights"]
  assert (weights[pad:] == 0).all() and (last["segment_ids"][pad:] == 0).all() and weights[:pad].sum() > 0
  got = list(loader.iterate(0))
  assert [s for s, _ in got] == list(range(loader.num_batches))
  for s, batch in got:
    assert_batches_equal(batch, loader.host_batch(s))


def test_eval_masks_do_not_depend_on_the_batch_size(bert):
  """Each held-out row keeps one mask whatever batch groups it, so MLM eval figures of the same
  weights agree across runs of other batch sizes (and across an export and import)."""
  def by_row(batch_size):
    config = copy.deepcopy(bert)
    config.train.batch_size = batch_size
    loader = data.make_loader(config, split="eval", sharding=data_sharding())
    rows = {}
    for step in range(loader.num_batches):
      batch = loader.host_batch(step)
      for b, row in enumerate(loader.dataset_rows(step)):
        if row >= 0:
          rows[int(row)] = tuple(batch[k][b].tobytes() for k in ("inputs", "mlm_positions", "mlm_targets"))
    return rows
  small, large = by_row(8), by_row(16)
  assert small == large and len(small) > 16


def test_iterate_prefetches_from_start_step(gpt):
  loader = data.make_loader(gpt, sharding=data_sharding())
  it = loader.iterate(start_step=11)
  for expect in (11, 12, 13):
    step, batch = next(it)
    assert step == expect
    assert isinstance(batch["inputs"], jax.Array)
    assert_batches_equal(batch, loader.host_batch(step))
  it.close()


def test_unigram_baseline(gpt):
  baseline = data.unigram_baseline(gpt)
  assert 3.0 < baseline < np.log(2048) - 0.5  # far better than uniform, far worse than a real model
  assert data.unigram_baseline(gpt) == baseline


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_unigram_baseline_counts_the_targets_the_loss_reads(family, gpt, bert):
  split = data.make_loader({"gpt": gpt, "bert": bert}[family]).data
  rows = split.rows(np.arange(split.num_rows))
  if family == "gpt":
    want = rows["targets"]
  else:
    want = rows["tokens"][(rows["segment_ids"] > 0) & ~np.isin(rows["tokens"], sorted(split.tok.special_ids))]
  np.testing.assert_array_equal(split.targets(), want.ravel())


def test_bad_batch_split(gpt):
  with pytest.raises(config_lib.ConfigError, match="does not split evenly"):
    data.make_loader(gpt, sharding=data_sharding(), batch_size=12)


def test_bucket_arrays_are_read_by_exact_ranges_where_fsspec_has_the_file_system():
  """With gcsfs installed a bucket array's spans are ranged reads (`cat_file(start, end)`); fsspec's
  in-memory file system stands in for a bucket here."""
  fsspec = pytest.importorskip("fsspec")
  from fmjax.data import loader
  stream = np.arange(1000, dtype=np.uint16)
  fs = fsspec.filesystem("memory")
  fs.pipe("memory://fmjax-test/tokens.bin", stream.tobytes())
  reads = []
  real = fs.cat_file
  fs.cat_file = lambda p, start=None, end=None, **kw: reads.append(end - start) or real(p, start=start, end=end, **kw)
  array = loader._BucketArray("memory://fmjax-test/tokens.bin", np.uint16)
  starts = np.array([0, 500, 990 - 7, 31])
  np.testing.assert_array_equal(array.spans(starts, 8), stream[starts[:, None] + np.arange(8)])
  assert reads == [16] * 4  # each span one read of exactly its bytes
  with pytest.raises(config_lib.ConfigError, match="ends before element 1001"):
    array.spans(np.array([993]), 8)


def test_masking_rounds_counts_changes_with_the_step_and_replaces_from_the_whole_vocabulary():
  """Each row predicts round(rate * candidates) tokens (Python's round, as BERT's reference does), at least 1
  and at most M; another step masks other positions; random replacements cover every non-special id."""
  rng = np.random.default_rng(0)
  B, T, V, special = 512, 64, 1000, tuple(range(0, 1000, 2))  # every even id is special
  candidates_B = rng.integers(1, T + 1, B)
  tokens_BT = 2 * rng.integers(0, V // 2, (B, T)) + 1
  seg_BT = (np.arange(T)[None] < candidates_B[:, None]).astype(np.int32)
  kw = dict(seed=0, rows_B=np.arange(B), special_ids=special, vocab_size=V, mask_id=0, rate=0.15, max_predictions=8)
  out = masking.mask_batch(tokens_BT, seg_BT, step=0, **kw)
  np.testing.assert_array_equal(out["mlm_weights"].sum(1), [min(max(round(0.15 * c), 1), 8) for c in candidates_B])
  other = masking.mask_batch(tokens_BT, seg_BT, step=1, **kw)
  assert (other["mlm_positions"] != out["mlm_positions"]).any(1).mean() > 0.5
  w_BM = out["mlm_weights"].astype(bool)
  new = out["inputs"][np.arange(B)[:, None], out["mlm_positions"]][w_BM]
  replaced = new[(new != 0) & (new != out["mlm_targets"][w_BM])]
  counts = np.histogram(replaced, bins=4, range=(0, V))[0]
  assert len(replaced) > 100 and counts.min() > 0.15 * len(replaced) and (replaced % 2 == 1).all(), counts


# ----------------------------------------------------------------------------- mixtures

ODD_WORDS = "zebra quartz vortex jigsaw kayak fjord glyph nymph sphinx waltz".split()


@pytest.fixture(scope="module")
def mixture(cache_dir, tmp_path_factory):
  """fmjax_corpus and a text_files corpus of ten odd words, weighted 3 to 1, batches of 8 rows."""
  corpus = tmp_path_factory.mktemp("odd_words")
  rng = np.random.default_rng(0)
  docs = [" ".join(rng.choice(ODD_WORDS, size=int(rng.integers(30, 80)))) for _ in range(120)]
  (corpus / "odd.txt").write_text("\n\n".join(docs) + "\n")
  config = tiny("gpt", cache_dir, **{"data.dataset": "fmjax_corpus=3,text_files=1",
                                     "data.files": str(corpus / "odd.txt"), "train.batch_size": 8})
  data.prepare(config)
  return config


def test_a_mixture_gives_each_dataset_its_rows_of_every_batch_in_its_own_epochs(mixture, caplog):
  with caplog.at_level(logging.INFO, logger="fmjax"):
    loader = data.make_loader(mixture, "train", sharding=data_sharding())
  assert "each batch of 8 rows holds 6 of fmjax_corpus (75.0%, weight 75.0%), 2 of text_files (25.0%" in caplog.text
  m = loader.mixture
  first, n_odd = int(m["first_C"][1]), int(m["rows_C"][1])
  assert m["first_C"][0] == 0 and m["rows_C"].sum() == loader.data.num_rows and 8 < n_odd < first
  np.testing.assert_array_equal(m["c_B"], [0, 0, 1, 0, 0, 0, 1, 0])  # spread over the batch, not in a block
  steps = -(-n_odd // 2) + 3  # the odd corpus's first epoch, and into its second
  rows_SB = np.stack([loader.dataset_rows(s) for s in range(steps)])
  odd_SB = rows_SB >= first
  assert (odd_SB == (m["c_B"] == 1)).all()  # each row of the batch reads its own dataset, at every step
  # Its samples s*2 + j: the first n_odd of them are its rows, each once, shuffled; then another order.
  odd = rows_SB[:, m["c_B"] == 1].reshape(-1) - first
  assert sorted(odd[:n_odd]) == list(range(n_odd)) and list(odd[:n_odd]) != list(range(n_odd))
  assert list(odd[n_odd:n_odd + 6]) != list(odd[:6])
  # fmjax_corpus moves through its own rows at 6 a step, none repeated within its epoch.
  corpus = rows_SB[:, m["c_B"] == 0].reshape(-1)
  assert len(set(corpus)) == len(corpus) and corpus.max() < first
  # The rows read as the text they come from.
  batch = loader.host_batch(1)
  for b in np.flatnonzero(m["c_B"] == 1):
    words = set(loader.tokenizer.decode(batch["inputs"][b]).replace(tok_lib.EOS, " ").split())
    assert words <= set(ODD_WORDS), words - set(ODD_WORDS)
  assert not set(loader.tokenizer.decode(batch["inputs"][0]).split()) <= set(ODD_WORDS)
  # A pure function of the step: a new loader, or two hosts' halves, give the same rows.
  again = data.make_loader(mixture, "train", sharding=data_sharding())
  np.testing.assert_array_equal(again.dataset_rows(steps + 5), loader.dataset_rows(steps + 5))
  halves = [data.make_loader(mixture, "train", sharding=data_sharding(), process_index=p, process_count=2)
            for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([h.dataset_rows(7) for h in halves]), loader.dataset_rows(7))
  assert_batches_equal({k: np.concatenate([h.host_batch(7)[k] for h in halves]) for k in batch}, loader.host_batch(7))


def test_a_mixture_holds_out_every_row_of_its_datasets_and_is_keyed_by_its_weights(mixture, cache_dir, capsys):
  held_out = data.make_loader(mixture, "eval", sharding=data_sharding())
  rows = np.concatenate([held_out.dataset_rows(s) for s in range(held_out.num_batches)])
  assert sorted(rows[rows >= 0]) == list(range(held_out.data.num_rows))
  apart = data.held_out_loaders(mixture, sharding=data_sharding())  # what training and `fmjax eval` score
  assert list(apart) == ["fmjax_corpus", "text_files"]
  assert sum(one.data.num_rows for one in apart.values()) == held_out.data.num_rows
  from fmjax import cli
  d = mixture.data
  assert cli.main(["data", "prepare", "--config=configs/gpt.py:tiny", f"--config.data.dataset={d.dataset}",
                   f"--config.data.files={d.files}", f"--config.data.cache_dir={d.cache_dir}",
                   "--config.train.batch_size=8"]) in (0, None)
  out = capsys.readouterr()
  assert "mixture: each batch of 8 rows holds 6 of fmjax_corpus (weight 75.0%), 2 of text_files (weight 25.0%)" \
      in out.err
  path = data.prepare(mixture)
  assert out.out.strip() == path
  meta = packing.read_entry(path, "meta.json")
  assert [(m["dataset"], m["share"]) for m in meta["mixture"]] == [("fmjax_corpus", 0.75), ("text_files", 0.25)]
  even = copy.deepcopy(mixture)
  even.data.dataset = "fmjax_corpus=1,text_files=1"
  other = data.prepare(even, held_out.tokenizer)
  # Other weights: another entry and fingerprint over the same prepared datasets.
  assert other != path and packing.fingerprint(other) != packing.fingerprint(path)
  assert [m["entry"] for m in packing.read_entry(other, "meta.json")["mixture"]] == [m["entry"] for m in meta["mixture"]]
  # A dataset's entry deleted since is made again, and the mixture reads as before.
  before = packing.fingerprint(path)
  gone = os.path.join(os.path.dirname(path), meta["mixture"][1]["entry"])
  shutil.rmtree(gone)
  assert data.prepare(mixture) == path and os.path.isdir(gone) and packing.fingerprint(path) == before
  # So is the mixture's own entry, once it lost its meta.json (a copy cut short): it blocked the rename.
  os.remove(os.path.join(path, "meta.json"))
  assert data.prepare(mixture) == path and packing.fingerprint(path) == before


def test_a_mixtures_datasets_can_have_settings_of_their_own(cache_dir, tmp_path, caplog):
  """Two sets of local files, one of them .jsonl with its text under another key: each item names its own files
  and feature, and nothing else of config.data changes."""
  import json
  (tmp_path / "odd.txt").write_text("\n\n".join(" ".join(ODD_WORDS[i % 5:] * 6) for i in range(60)) + "\n")
  other = ["alpha", "beta", "gamma", "delta"]
  (tmp_path / "notes.jsonl").write_text("".join(json.dumps({"body": " ".join(other[i % 4:] * 9), "text": "zebra"})
                                                + "\n" for i in range(60)))
  dataset = f"text_files(files={tmp_path}/*.txt)=1, text_files(feature=body; files={tmp_path}/*.jsonl,{tmp_path}/none*)=1"
  config = tiny("gpt", cache_dir, **{"data.dataset": dataset, "data.feature": "missing", "data.seq_len": 32,
                                     "train.batch_size": 8})
  parts = sources.mixture(dataset)
  assert [sources.component(config, item).data.feature for item, _ in parts] == ["missing", "body"]
  with caplog.at_level(logging.INFO, logger="fmjax"):
    loader = data.make_loader(config, "train", sharding=data_sharding())
  names = [f"text_files(files={tmp_path}/*.txt)", f"text_files(feature=body; files={tmp_path}/*.jsonl,{tmp_path}/none*)"]
  assert f"4 of {names[0]} (50.0%" in caplog.text and f"4 of {names[1]} (50.0%" in caplog.text
  batch, c_B = loader.host_batch(0), loader.mixture["c_B"]
  for b in range(8):  # each row reads its own item's text: the odd words, or the .jsonl lines' body
    words = set(loader.tokenizer.decode(batch["inputs"][b]).replace(tok_lib.EOS, " ").split())
    assert words and words <= set(ODD_WORDS if c_B[b] == 0 else other), (b, words)
  assert list(data.held_out_loaders(config, sharding=data_sharding())) == names
  from fmjax import release
  assert release.data_sources(config) == [f"text_files:{tmp_path}/*.txt", f"text_files:{tmp_path}/*.jsonl",
                                          f"text_files:{tmp_path}/none*"]
  # Only the datasets named twice are called by their whole item.
  assert sources.labels(sources.mixture("lm1b=1,text_files(files=a)=1")) == ["lm1b", "text_files"]


def test_a_mixture_reads_its_documents_in_turn_by_weight_until_all_are_spent():
  """What its tokenizer trains on (and a release scans): each dataset as often as its share."""
  out = list(sources._interleaved([iter("AAAAAAAAA"), iter("bbbbb")], [0.75, 0.25]))
  assert "".join(out[:8]).count("b") == 2 and "".join(out[:12]).count("b") == 3  # 3 to 1, evenly spread
  assert "".join(out) == "AAbAAAbAAAbAbb"  # the first spent, the other goes on to its end
