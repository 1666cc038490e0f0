"""KV-cache decoding, sampling filters, batched left padding, and the `fmjax generate` command."""

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


def tiny_model(scan=False, seed=0):
  config = config_lib.load_config("configs/gpt.py:tiny", TINY + [f"model.scan_layers={scan}"])
  return models.build_model(config.model, rngs=nnx.Rngs(seed))


def make_workdir(root, family, *overrides):
  """A run workdir without training: config.json, the tokenizer's corpus and a step-0 checkpoint.

  The corpus is a few of CPython's own documentation topics, as text files (tokenizer training
  and packing take well under a second).
  """
  import pydoc_data.topics
  corpus = root / "corpus"
  corpus.mkdir(parents=True, exist_ok=True)
  for name in sorted(pydoc_data.topics.topics)[:24]:
    (corpus / f"{name}.txt").write_text(pydoc_data.topics.topics[name])
  config = config_lib.load_config(f"configs/{family}.py:tiny", TINY + [
      "data.dataset=text_files", f"data.files={corpus}/*.txt", f"data.cache_dir={root / 'cache'}", *overrides])
  data.get_tokenizer(config)
  workdir = root / f"{family}_run"
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


def uncached_greedy(model, prompt, n):
  ids = list(prompt)
  for _ in range(n):
    logits_1TV = model(jnp.asarray([ids], jnp.int32))
    ids.append(int(jnp.argmax(logits_1TV[0, -1])))
  return ids[len(prompt):]


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_cached_logits_equal_uncached_forward_at_every_position(scan):
  model = tiny_model(scan)
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


def test_greedy_with_cache_equals_greedy_without_and_ignores_batch_neighbours():
  model = tiny_model(scan=True, seed=1)
  prompts = [[5, 17, 99, 3, 250, 8, 41], [7], [300, 301, 302]]
  batched = generate.generate(model, prompts, 6, temperature=0.0)
  for prompt, out in zip(prompts, batched):
    assert out == uncached_greedy(model, prompt, 6)
  # Sampling: a row's draws depend on its own logits and row index only, not on the rest of the batch.
  alone = generate.generate(model, prompts[:1], 6, temperature=1.0, top_k=20, seed=3)
  together = generate.generate(model, prompts, 6, temperature=1.0, top_k=20, seed=3)
  assert alone[0] == together[0]
  assert generate.generate(model, prompts, 6, temperature=1.0, seed=4) != together  # the seed matters


def test_eos_stops_a_row_and_max_len_is_checked():
  model = tiny_model()
  prompt = [5, 17, 99]
  first = uncached_greedy(model, prompt, 3)
  assert generate.generate(model, [prompt], 3, temperature=0.0, eos_id=first[1]) == [first[:1]]
  with pytest.raises(config_lib.ConfigError, match="exceeds the model's max_len 64"):
    generate.generate(model, [prompt], 62, temperature=0.0)


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


def test_generate_cli_gpt_sampling_and_bert_fill_mask(tmp_path, capsys):
  gpt_dir, _ = make_workdir(tmp_path, "gpt")
  model, config, tok = generate.load_run(str(gpt_dir))
  want = tok.decode(generate.generate(model, [tok.encode("The for")], 5, temperature=0.0, eos_id=tok.eos_id)[0])
  assert cli.main(["generate", f"--workdir={gpt_dir}", "--prompt=The for", "--prompt=x", "--max_new_tokens=5",
                   "--temperature=0"]) == 0
  assert capsys.readouterr().out.startswith("The for" + want + "\n")

  bert_dir, _ = make_workdir(tmp_path, "bert")
  assert cli.main(["generate", f"--workdir={bert_dir}", "--text=The [MASK] statement [MASK] here.",
                   "--top_k=3"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 and all(line.startswith("[MASK] -> ") and line.count("'") == 6 for line in lines)

  assert cli.main(["generate", f"--workdir={bert_dir}", "--prompt=x"]) == 2
  assert "holds a BERT: pass --text" in capsys.readouterr().err
