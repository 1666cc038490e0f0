"""KV-cache decoding, sampling filters, batched left padding, and the `fmjax generate` command."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fmjax import checkpoint as ckpt_lib, cli, config_lib, data, generate, models, optim, sharding, train

TINY = ["model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.d_ff=128", "model.vocab_size=512",
        "model.max_len=64", "model.attention=xla", "data.seq_len=32", "data.tokenizer.vocab_size=512",
        "data.max_predictions=6", "train.batch_size=8", "train.eval_batches=2", "train.progress_bar=false",
        "mesh.data=1"]


# configs/gpt.py:tiny,llama (rotary positions, RMSNorm, SwiGLU, no biases, an untied head), 2 key/value heads for 4;
# llama3: with Llama 3.1's rotary scaling of 8 positions of pretraining, which the decoded rows pass; qwen: with
# Qwen's q/k/v biases and q/k norms (the cache holds keys normed, then rotated) and heads 24 wide (d_model / 4 = 16).
SPECS = {"gpt": ("configs/gpt.py:tiny", []), "bert": ("configs/bert.py:tiny", []),
         "llama": ("configs/gpt.py:tiny,llama", ["model.num_kv_heads=2"]),
         "llama3": ("configs/gpt.py:tiny,llama", ["model.num_kv_heads=2", "model.rope_scaling=llama3",
                                                  "model.rope_factor=4", "model.rope_original_max_len=8"]),
         "qwen": ("configs/gpt.py:tiny,llama", ["model.num_kv_heads=2", "model.qkv_bias=true", "model.qk_norm=true",
                                                "model.head_dim=24"])}


def _unrolled_and_scanned(family):
  spec, extra = SPECS[family]
  unrolled = models.build_model(config_lib.load_config(spec, TINY + extra).model, rngs=nnx.Rngs(0))
  if family == "qwen":  # biases (zeros) and norm scales (ones) at init would hide a path that skipped them
    state = nnx.state(unrolled, nnx.Param)
    rng = np.random.default_rng(0)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
        lambda p, x: x if str(p[-1].key) == "kernel" else x + 0.3 * rng.standard_normal(x.shape).astype(x.dtype),
        nnx.to_pure_dict(state)))
    nnx.update(unrolled, state)
  # The scanned model gets the same weights stacked: cheaper than a second eager init.
  scanned_cfg = config_lib.load_config(spec, TINY + extra + ["model.scan_layers=true"]).model
  graphdef, state = nnx.split(models.abstract_model(scanned_cfg))
  nnx.replace_by_pure_dict(state, models.stack_layers(nnx.to_pure_dict(nnx.state(unrolled))))
  return {False: unrolled, True: nnx.merge(graphdef, state)}


@pytest.fixture(scope="module")
def gpts():
  """Tiny GPTs with unrolled and scanned layers (built once: eager init costs seconds)."""
  return _unrolled_and_scanned("gpt")


@pytest.fixture(scope="module")
def llamas():
  """`gpts` with Llama's architecture and grouped-query attention."""
  return _unrolled_and_scanned("llama")


@pytest.fixture(scope="module")
def scaled_llamas():
  """`llamas` with llama3 rotary scaling."""
  return _unrolled_and_scanned("llama3")


@pytest.fixture(scope="module")
def qwens():
  """`llamas` with q/k/v biases, q/k norms and heads of their own width, biases and scales off their init."""
  return _unrolled_and_scanned("qwen")


def make_workdir(tmp_path_factory, family, tokenizer_dir=None):
  """A run workdir without training: config.json, a tokenizer and data cache, a step-0 checkpoint.

  Built once per test session (tests only read it, or add eval.json) from a few of CPython's own
  documentation topics as text files. `family`: gpt, bert or llama (`SPECS`); `tokenizer_dir`: Hugging Face
  tokenizer files to use (data.tokenizer.kind=hf) rather than a BPE trained on those topics.
  """
  import pydoc_data.topics
  root = tmp_path_factory.getbasetemp() / "fmjax_tiny_runs"
  spec, extra = SPECS[family]
  workdir = root / f"{family}_run"
  if tokenizer_dir is not None:
    workdir = root / f"{family}_run_{os.path.basename(tokenizer_dir)}"
    extra = extra + ["data.tokenizer.kind=hf", f"data.tokenizer.path={tokenizer_dir}"]
  if (workdir / "config.json").exists():
    return workdir, config_lib.load_config(spec, _workdir_overrides(root) + extra)
  corpus = root / "corpus"
  if not corpus.exists():  # written once: touching the files would change the corpus identity
    corpus.mkdir(parents=True)
    for name in sorted(pydoc_data.topics.topics)[:24]:
      (corpus / f"{name}.txt").write_text(pydoc_data.topics.topics[name])
  config = config_lib.load_config(spec, _workdir_overrides(root) + extra)
  data.get_tokenizer(config)
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  tx = optim.make_optimizer(config)
  spec = train.state_spec(config, mesh, tx)
  state = train.init_state(config, spec, tx)
  os.makedirs(workdir, exist_ok=True)
  config_lib.save_json(config, str(workdir / "config.json"))
  checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  checkpointer.save(0, state, {"step": 0, "config": config_lib.to_dict(config)}, force=True)
  checkpointer.close()
  return workdir, config


def _workdir_overrides(root):
  return TINY + ["data.dataset=text_files", f"data.files={root / 'corpus'}/*.txt", f"data.cache_dir={root / 'cache'}"]


@nnx.jit
def _forward(model, tokens_BT):
  return model(tokens_BT)


def uncached_greedy(model, prompt, n, width=16):
  """Greedy decoding by full forward passes, no cache: the reference for the cached loop.

  The row is right-padded to a fixed width (one compile); causality keeps the pad out of the
  positions that are read.
  """
  ids = list(prompt)
  for _ in range(n):
    row = np.zeros((1, width), np.int32)
    row[0, :len(ids)] = ids
    ids.append(int(jnp.argmax(_forward(model, jnp.asarray(row))[0, len(ids) - 1])))
  return ids[len(prompt):]


@pytest.mark.parametrize("family", ["gpt", "llama", "llama3", "qwen"])
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_cached_logits_equal_uncached_forward_at_every_position(gpts, llamas, scaled_llamas, qwens, family, scan):
  """Prefill of left-padded prompts, then one token a step: each position's logits are the full forward
  pass's, with learned positions and with rotary ones (the cache holds keys already rotated, by scaled
  frequencies too, and normed first with q/k norms) read by grouped query heads."""
  model = {"gpt": gpts, "llama": llamas, "llama3": scaled_llamas, "qwen": qwens}[family][scan]
  rng = np.random.default_rng(0)
  rows = [rng.integers(1, 512, size=n).tolist() for n in (11, 6)]  # full rows: prompt then teacher-forced tokens
  prompt_lens = (7, 2)
  P = max(prompt_lens)
  steps = 4
  tokens = np.zeros((2, P), np.int32)
  seg = np.zeros((2, P), np.int32)
  pos = np.zeros((2, P), np.int32)
  for b, (row, n) in enumerate(zip(rows, prompt_lens)):
    tokens[b, P - n:], seg[b, P - n:], pos[b, P - n:] = row[:n], 1, np.arange(n)
  decode = nnx.jit(lambda m, t, c, p, s: m.decode(t, c, positions_BT=p, segment_ids_BT=s))
  cache = model.init_cache(2, P + steps)
  logits, cache = decode(model, jnp.asarray(tokens), cache, jnp.asarray(pos), jnp.asarray(seg))
  got = [[np.asarray(logits[b, P - n:])] for b, n in enumerate(prompt_lens)]
  for i in range(steps):
    nxt = np.array([[row[n + i]] for row, n in zip(rows, prompt_lens)], np.int32)
    p = np.array([[n + i] for n in prompt_lens], np.int32)
    logits, cache = decode(model, jnp.asarray(nxt), cache, jnp.asarray(p), jnp.ones((2, 1), jnp.int32))
    for b in range(2):
      got[b].append(np.asarray(logits[b]))
  assert int(cache["index"]) == P + steps
  for b, (row, n) in enumerate(zip(rows, prompt_lens)):
    want = np.asarray(model(jnp.asarray([row[:n + steps]], jnp.int32))[0])
    np.testing.assert_allclose(np.concatenate(got[b]), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_greedy_with_cache_equals_greedy_without_and_ignores_batch_neighbours(gpts, llamas, family):
  model = (gpts if family == "gpt" else llamas)[True]
  prompts = [[5, 17, 99, 3, 250, 8, 41], [7], [300, 301, 302]]
  batched = generate.generate(model, prompts, 6, temperature=0.0)
  for prompt, out in zip(prompts, batched):
    assert out == uncached_greedy(model, prompt, 6)
  # Sampling: a row's draws depend on its own logits and row index only, not on the rest of the batch.
  alone = generate.generate(model, prompts[:1], 6, temperature=1.0, top_k=20, seed=3)
  together = generate.generate(model, prompts, 6, temperature=1.0, top_k=20, seed=3)
  assert alone[0] == together[0]
  assert generate.generate(model, prompts, 6, temperature=1.0, top_k=20, seed=4) != together  # the seed matters


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_eos_stops_a_row_and_max_len_is_checked(gpts, llamas, family):
  model = (gpts if family == "gpt" else llamas)[False]  # llama: model.max_len, without a position table
  prompt = [5, 17, 99]
  first = uncached_greedy(model, prompt, 3)
  eos = first[-1]
  assert generate.generate(model, [prompt], 3, temperature=0.0, eos_id=eos) == [first[:first.index(eos)]]
  # Several stop ids (a chat template's end of turn beside EOS): a row ends at the first of them it writes.
  absent = next(i for i in range(5, 512) if i not in first)
  for stops in ([eos, first[1]], [absent, first[1]], (first[1], absent)):
    assert generate.generate(model, [prompt, prompt[:2]], 3, temperature=0.0, eos_id=stops)[0] == \
        first[:first.index(first[1])]
  assert generate.generate(model, [prompt], 3, temperature=0.0, eos_id=[absent]) == [first]
  with pytest.raises(config_lib.ConfigError, match="exceeds 64, the positions the model was trained on; lower "
                     "--max_new_tokens to 61 or shorten the prompt"):
    generate.generate(model, [prompt], 62, temperature=0.0)
  # A prompt that fills the positions alone: no --max_new_tokens helps, and the line says so.
  with pytest.raises(config_lib.ConfigError, match="^the prompt is 64 tokens, and the model was trained on 64 "
                     "positions: shorten it to at most 63 tokens"):
    generate.generate(model, [prompt * 21 + [5]], 1, temperature=0.0)


def test_top_k_and_top_p_masks():
  probs = np.array([[0.5, 0.25, 0.15, 0.1], [0.1, 0.15, 0.25, 0.5]])
  logits = jnp.log(jnp.asarray(probs, jnp.float32))
  kept = lambda **kw: np.isfinite(np.asarray(generate.mask_logits(logits, **kw)))
  np.testing.assert_array_equal(kept(top_k=2), [[1, 1, 0, 0], [0, 0, 1, 1]])
  np.testing.assert_array_equal(kept(top_k=0), np.ones((2, 4)))
  # Nucleus: the smallest set whose mass reaches top_p (mass before 0.15 is 0.75).
  np.testing.assert_array_equal(kept(top_p=0.7), [[1, 1, 0, 0], [0, 0, 1, 1]])
  np.testing.assert_array_equal(kept(top_p=0.76), [[1, 1, 1, 0], [0, 1, 1, 1]])
  np.testing.assert_array_equal(kept(top_p=0.01), [[1, 0, 0, 0], [0, 0, 0, 1]])  # the top token always stays
  np.testing.assert_array_equal(kept(top_k=3, top_p=0.6), [[1, 1, 0, 0], [0, 0, 1, 1]])
  # Kept values are the original logits; draws only ever land inside the mask.
  np.testing.assert_allclose(np.asarray(generate.mask_logits(logits, top_k=2))[0, :2], np.log(probs[0, :2]), rtol=1e-6)
  draws = jax.vmap(lambda k: generate.sample_logits(logits, k, temperature=1.0, top_p=0.76))(
      jax.random.split(jax.random.key(0), 500))
  assert set(np.asarray(draws[:, 0]).tolist()) == {0, 1, 2} and set(np.asarray(draws[:, 1]).tolist()) == {1, 2, 3}
  np.testing.assert_array_equal(generate.sample_logits(logits, jax.random.key(0), temperature=0.0), [0, 3])


def test_generate_cli_gpt_sampling_and_bert_fill_mask(tmp_path_factory, capsys):
  gpt_dir, _ = make_workdir(tmp_path_factory, "gpt")
  model, config, tok = generate.load_run(str(gpt_dir))
  # `fmjax generate` opens every prompt with EOS, as a document opens in training.
  want = tok.decode(generate.generate(model, [[tok.eos_id] + tok.encode("The for")], 5, temperature=0.0,
                                      eos_id=tok.eos_id)[0])
  capsys.readouterr()  # TFDS's own messages from building the tokenizer's corpus
  assert cli.main(["generate", f"--workdir={gpt_dir}", "--prompt=The for", "--prompt=x", "--max_new_tokens=5",
                   "--temperature=0"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("The for" + want + "\n") and out.count("-" * 40) == 2
  prompts = tmp_path_factory.mktemp("prompts") / "prompts.txt"
  prompts.write_text("x\n\nThe for\n")  # one a line; blank lines skipped
  assert cli.main(["generate", f"--workdir={gpt_dir}", f"--prompt_file={prompts}", "--max_new_tokens=5",
                   "--temperature=0"]) == 0
  out = capsys.readouterr().out
  assert out.count("-" * 40) == 2 and "\nThe for" + want + "\n" in out
  latin1 = prompts.parent / "latin1.txt"
  latin1.write_bytes("caf\xe9\n".encode("latin1"))
  for bad, said in ((latin1, "is not UTF-8 text (byte 3)"), (prompts.parent, "is not a file")):
    assert cli.main(["generate", f"--workdir={gpt_dir}", f"--prompt_file={bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and err.count("\n") == 0, err

  bert_dir, _ = make_workdir(tmp_path_factory, "bert")
  capsys.readouterr()
  assert cli.main(["generate", f"--workdir={bert_dir}", "--text=The [MASK] statement [MASK] here.",
                   "--top_k=3"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 and all(line.startswith("[MASK] -> ") and line.count("'") == 6 for line in lines)

  assert cli.main(["generate", f"--workdir={bert_dir}", "--text=The [mask] statement.", "--top_k=2"]) == 0
  assert capsys.readouterr().out.count("[MASK] -> ") == 1  # the mask token in lower case too
  assert cli.main(["generate", f"--workdir={bert_dir}", "--text=The [MASK] here.", "--top_k=-1"]) == 2
  assert "--top_k=-1: give how many predictions to show per [MASK]" in capsys.readouterr().err

  assert cli.main(["generate", f"--workdir={bert_dir}", "--prompt=x"]) == 2
  assert "holds a BERT: pass --text" in capsys.readouterr().err
  assert cli.main(["generate", f"--workdir={bert_dir}", "--text=The [MASK] here.", "--chat"]) == 2
  assert "holds a BERT, which has no chat; --chat is for a GPT" in capsys.readouterr().err
  # Sampling settings mean nothing to fill-mask: said, not ignored.
  assert cli.main(["generate", f"--workdir={bert_dir}", "--text=The [MASK] here.", "--temperature=0.5",
                   "--seed=3"]) == 2
  assert "--temperature, --seed are for GPT sampling; drop them" in capsys.readouterr().err


def test_generate_continues_a_rotary_run_and_stays_within_its_trained_positions(tmp_path_factory, capsys):
  workdir, config = make_workdir(tmp_path_factory, "llama")
  model, _, tok = generate.load_run(str(workdir))
  assert not hasattr(model, "wpe") and model.max_len == config.model.max_len == 64
  prompt = [tok.eos_id] + tok.encode("The for")
  want = generate.generate(model, [prompt], 5, temperature=0.0)[0]
  assert want == uncached_greedy(model, prompt, 5)
  capsys.readouterr()
  assert cli.main(["generate", f"--workdir={workdir}", "--prompt=The for", "--max_new_tokens=5",
                   "--temperature=0"]) == 0
  assert capsys.readouterr().out.startswith("The for" + tok.decode(want) + "\n")
  with pytest.raises(config_lib.ConfigError, match=f"exceeds {config.data.seq_len}, the positions the model was "):
    generate.run(str(workdir), prompts=["The for"], max_new_tokens=config.data.seq_len, temperature=0.0)


def test_a_run_saved_before_the_architecture_choices_reads_as_gpt2(tmp_path_factory, tmp_path):
  """A config.json without model.positions, norm, mlp, num_kv_heads, use_bias, tie_embeddings and rope_theta is a
  GPT-2 run's: it loads, and generates as it did."""
  import shutil
  workdir, _ = make_workdir(tmp_path_factory, "gpt")
  old = tmp_path / "old"
  shutil.copytree(workdir, old)
  saved = json.loads((old / "config.json").read_text())
  for key in models.ARCHITECTURE_DEFAULTS:
    del saved["model"][key]
  (old / "config.json").write_text(json.dumps(saved))
  model, config, _ = generate.load_run(str(old))
  assert "positions" not in config.model and hasattr(model, "wpe")
  now, _, _ = generate.load_run(str(workdir))
  prompts = [[5, 17, 99], [7]]
  assert generate.generate(model, prompts, 4, temperature=0.0) == generate.generate(now, prompts, 4, temperature=0.0)


def test_chat_with_a_model_that_never_saw_a_chat_template_warns(tmp_path_factory, caplog):
  """`--chat` on a pretraining run (or a base model imported without a chat template) asks in the built-in
  template, which it never saw: said in one warning, not silently."""
  gpt_dir, _ = make_workdir(tmp_path_factory, "gpt")
  logger = logging.getLogger("fmjax")
  logger.addHandler(caplog.handler)  # a run's setup_logging stops fmjax's records reaching the root logger
  try:
    with caplog.at_level("WARNING", logger="fmjax"):
      assert len(generate.run(str(gpt_dir), prompts=["hi"], max_new_tokens=2, temperature=0.0, chat=True)) == 1
      said = {r.getMessage() for r in caplog.records if "has no chat template" in r.getMessage()}  # root's too
      assert len(said) == 1 and all("\n" not in m and "tune it on conversations first" in m for m in said), said
      caplog.clear()
      generate.run(str(gpt_dir), prompts=["hi"], max_new_tokens=2, temperature=0.0)
      assert "has no chat template" not in caplog.text
  finally:
    logger.removeHandler(caplog.handler)


def test_a_rotary_run_saved_before_rope_scaling_reads_as_unscaled(tmp_path_factory, tmp_path):
  """A Llama-architecture run whose config.json predates model.rope_scaling and its parameters loads as the
  unscaled model it trained, and generates as it did."""
  import shutil
  workdir, _ = make_workdir(tmp_path_factory, "llama")
  old = tmp_path / "old"
  shutil.copytree(workdir, old)
  saved = json.loads((old / "config.json").read_text())
  for key in ("rope_scaling", *models.ROPE_SCALING_READS["llama3"]):
    del saved["model"][key]
  (old / "config.json").write_text(json.dumps(saved))
  model, config, _ = generate.load_run(str(old))
  assert "rope_scaling" not in config.model and model.rope == models.rope_settings(config.model)
  assert model.rope[2:4] == ("none", 1.0)
  now, _, _ = generate.load_run(str(workdir))
  prompts = [[5, 17, 99], [7]]
  assert generate.generate(model, prompts, 4, temperature=0.0) == generate.generate(now, prompts, 4, temperature=0.0)


def test_a_finetune_workdir_is_refused_in_one_line(tmp_path):
  """A classifier's checkpoint ({trunk, head}) has no LM head: say so, and what to pass instead."""
  config = config_lib.load_config("configs/finetune_cls.py:task=pydoc_family,model=gpt", TINY)
  config_lib.save_json(config, str(tmp_path / "config.json"))
  with pytest.raises(config_lib.ConfigError, match=r"is a `fmjax finetune` \(classifier\) workdir.*pass the "
                     r"--workdir of a pretraining \(`fmjax train`\) or `fmjax sft` run") as e:
    generate.run(str(tmp_path), prompts=["hi"])
  assert "\n" not in str(e.value) and os.listdir(tmp_path) == ["config.json"]


def test_a_workdir_without_checkpoints_or_with_a_damaged_config_is_one_line_and_left_as_it_was(tmp_path):
  config = config_lib.load_config("configs/gpt.py:tiny", TINY)
  config_lib.save_json(config, str(tmp_path / "config.json"))
  with pytest.raises(config_lib.ConfigError, match=r"holds no checkpoint yet; train first") as e:
    generate.run(str(tmp_path), prompts=["hi"])
  assert "\n" not in str(e.value) and os.listdir(tmp_path) == ["config.json"]  # a reader makes no checkpoints/
  # A hand-edited size is named, before anything is built from it.
  saved = json.loads((tmp_path / "config.json").read_text())
  saved["model"]["num_heads"] = "four"
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(config_lib.ConfigError, match=r"config.json has model.num_heads='four', where the model needs "
                                                   r"family gpt or bert and positive whole sizes") as e:
    generate.run(str(tmp_path), prompts=["hi"])
  assert "\n" not in str(e.value)


def test_sampling_settings_that_are_not_numbers_are_refused(gpts):
  for temperature in (float("nan"), float("inf")):
    with pytest.raises(config_lib.ConfigError, match=rf"need a finite temperature >= 0.*temperature={temperature}"):
      generate.generate(gpts[False], [[5, 17]], 2, temperature=temperature)
  for seed in (-1, 2**32, 10**20):  # 10**20 ended in an OverflowError traceback from JAX
    with pytest.raises(config_lib.ConfigError, match=rf"^--seed={seed} must be in \[0, 2\*\*32\)$"):
      generate.generate(gpts[False], [[5, 17]], 2, seed=seed)


def test_usage_mistakes_are_one_line(capsys):
  assert cli.main(["generate", "--workdir=/tmp/never", "--promt=hi"]) == 2
  assert capsys.readouterr().err == ("error: fmjax generate: unrecognized arguments: --promt=hi "
                                     "(see fmjax generate --help)\n")


class _SmallTokenizer:
  """A run's tokenizer cut to its first `vocab_size` ids (as when model.vocab_size is padded); records decodes."""

  def __init__(self, tok, vocab_size):
    self.tok, self.vocab_size, self.decoded = tok, vocab_size, []

  def __getattr__(self, name):
    return getattr(self.tok, name)

  def decode(self, ids, **kw):
    self.decoded += [int(i) for i in ids]
    return self.tok.decode(ids, **kw)


def test_sampling_and_fill_mask_never_pick_ids_beyond_the_tokenizer(gpts, tmp_path_factory, monkeypatch):
  model = gpts[False]
  prompts = [[5, 17, 99], [7]]
  for kw in ({"temperature": 0.0}, {"temperature": 1.5}, {"temperature": 1.5, "top_k": 400, "top_p": 0.99}):
    outs = generate.generate(model, prompts, 12, seed=1, vocab_size=40, **kw)
    assert all(0 <= t < 40 for row in outs for t in row), (kw, outs)
  logits = jnp.zeros((2, 512)).at[:, 400].set(9.0)  # the likeliest id is a padding row
  assert np.asarray(generate.sample_logits(logits, jax.random.key(0), temperature=0.0, vocab_size=300)).max() < 300
  # `fmjax generate` limits both families to its tokenizer's ids.
  for family, kw in (("gpt", {"prompts": ["The for", "x"], "temperature": 1.5, "max_new_tokens": 12}),
                     ("bert", {"text": "The [MASK] statement [MASK] here.", "top_k": 30})):
    workdir, _ = make_workdir(tmp_path_factory, family)
    m, config, tok = generate.load_run(str(workdir))
    small = _SmallTokenizer(tok, 40)
    monkeypatch.setattr(generate, "_load", lambda *a, small=small, m=m, config=config: (m, config, small, 1))
    results = generate.run(str(workdir), **kw)
    assert len(results) == 2 and small.decoded and max(small.decoded) < 40, (family, small.decoded)
    monkeypatch.undo()


def test_generation_stays_within_the_positions_training_used(tmp_path_factory, tmp_path):
  """The tiny configs' position tables have 256 rows for rows of 128 tokens: rows past 128 never trained."""
  import shutil
  from fmjax import interop
  workdir, config = make_workdir(tmp_path_factory, "gpt")
  trained = config.data.seq_len
  assert trained < config.model.max_len
  with pytest.raises(config_lib.ConfigError, match=f"exceeds {trained}, the positions the model was trained on"):
    generate.run(str(workdir), prompts=["The for"], max_new_tokens=trained, temperature=0.0)
  assert len(generate.run(str(workdir), prompts=["x"], max_new_tokens=trained - 8, temperature=0.0)) == 1
  bert_dir, bert = make_workdir(tmp_path_factory, "bert")
  with pytest.raises(config_lib.ConfigError, match=f"longer than {bert.data.seq_len}, the positions the model"):
    generate.run(str(bert_dir), text="word " * bert.data.seq_len + "[MASK].")
  model, _, tok = generate.load_run(str(bert_dir))  # the function alone: its position table is the limit
  assert len(generate.fill_mask(model, tok, "The [MASK] statement.")) == 1
  with pytest.raises(config_lib.ConfigError, match=f"longer than {bert.model.max_len}, the positions"):
    generate.fill_mask(model, tok, "word " * bert.model.max_len + "[MASK].")
  # An imported model was trained on its whole position table.
  imported = tmp_path / "imported"
  shutil.copytree(workdir, imported)
  (imported / interop.IMPORT_INFO).write_text("{}")
  assert generate.trained_positions(config, str(imported)) == config.model.max_len


def test_a_run_started_from_another_keeps_the_positions_that_run_trained(tmp_path_factory, tmp_path):
  """SFT or continued pretraining on shorter rows than init_from's does not untrain its positions."""
  import shutil
  from fmjax import interop
  workdir, config = make_workdir(tmp_path_factory, "gpt")
  imported = tmp_path / "imported"  # trained (upstream) on its whole table of 64
  shutil.copytree(workdir, imported)
  (imported / interop.IMPORT_INFO).write_text("{}")

  def started_from(name, source, seq_len):
    run_dir = tmp_path / name
    shutil.copytree(workdir, run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    saved["data"]["seq_len"], saved["init_from"] = seq_len, str(source)
    (run_dir / "config.json").write_text(json.dumps(saved))
    return run_dir, interop.read_run_config(str(run_dir))

  sft_dir, sft = started_from("sft", imported, 16)
  assert generate.trained_positions(sft, str(sft_dir)) == config.model.max_len
  # 1 + 1 + 40 tokens: past this run's rows of 16, within the imported model's 64.
  assert len(generate.run(str(sft_dir), prompts=["x"], max_new_tokens=40, temperature=0.0)) == 1
  # Through a chain of runs, the longest rows any of them trained on; a source that moved away: its own.
  again_dir, again = started_from("again", workdir, 16)
  assert generate.trained_positions(again, str(again_dir)) == config.data.seq_len
  chained_dir, chained = started_from("chained", sft_dir, 8)
  assert generate.trained_positions(chained, str(chained_dir)) == config.model.max_len
  gone_dir, gone = started_from("gone", tmp_path / "nowhere", 16)
  assert generate.trained_positions(gone, str(gone_dir)) == 16
  with pytest.raises(config_lib.ConfigError, match="exceeds 16, the positions the model was trained on"):
    generate.run(str(gone_dir), prompts=["x"], max_new_tokens=40, temperature=0.0)


def test_identical_rows_draw_independently_at_the_tempered_frequencies():
  probs = np.array([0.5, 0.25, 0.15, 0.1])
  logits = jnp.log(jnp.asarray(np.tile(probs, (4000, 1)), jnp.float32))
  for temperature in (0.5, 2.0):
    draws = np.asarray(generate.sample_logits(logits, jax.random.key(0), temperature=temperature))
    want = probs ** (1 / temperature) / (probs ** (1 / temperature)).sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / len(draws), want, atol=0.03)


def test_each_generated_token_is_a_fresh_draw(gpts):
  """An untrained model's next-token distribution is near uniform over 512 ids: independent draws rarely repeat."""
  (out,) = generate.generate(gpts[False], [[5, 17, 99]], 24, temperature=1.0, seed=0)
  assert len(out) == 24 and len(set(out)) > 16, out


def test_greedy_generation_puts_each_new_token_one_position_past_the_last(gpts):
  """Position embeddings scaled up until they decide the argmax: the cached loop continues each left-padded
  prompt exactly as full forward passes of the unpadded prompt do."""
  model = nnx.clone(gpts[False])
  model.wpe.embedding[...] = model.wpe.embedding[...] * 50
  prompts = [[5, 17, 99, 3, 250], [7], [300, 301]]
  for prompt, out in zip(prompts, generate.generate(model, prompts, 8, temperature=0.0)):
    assert out == uncached_greedy(model, prompt, 8), prompt
