"""DPO: the loss against a direct computation, packed row pairs, reference log-probs, a run that learns a
preference, exact resume, LoRA, and the data formats (text and conversations) with their refusals."""

import json
import math
import os
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fmjax import cli, config_lib, data, dpo, evaluate, generate, models, report, sft
from fmjax.config_lib import ConfigError
from fmjax.data import chat
from test_generate import make_workdir
from test_sft import TWO_TURNS, CharTokenizer


# ----------------------------------------------------------------------------- loss and packing

TINY_MODEL = ["model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.d_ff=64", "model.vocab_size=64",
              "model.max_len=32", "model.attention=xla"]


def _random_pairs(rng, n, most=9):
  """Encoded pairs (chosen, rejected) of random ids: a prompt (its opening id included) and a trained reply each."""
  def sequence(prompt):
    reply = rng.integers(1, 64, size=rng.integers(1, most)).tolist()
    return prompt + reply, [0] * len(prompt) + [1] * len(reply)
  pairs = []
  for _ in range(n):
    prompt = [0] + rng.integers(1, 64, size=rng.integers(0, 4)).tolist()
    pairs.append((sequence(prompt), sequence(prompt)))
  return pairs


def _one_a_row(sequences, T):
  """[M, T + 1] ids and trained weights of each (ids, trained) sequence alone in a row of its own, padded after it
  (which a causal model does not read)."""
  ids, trained = np.zeros((len(sequences), T + 1), np.int32), np.zeros((len(sequences), T + 1), np.float32)
  for i, (seq_ids, seq_trained) in enumerate(sequences):
    ids[i, :len(seq_ids)], trained[i, :len(seq_ids)] = seq_ids, seq_trained
  return ids, trained


def _alone_logps(model, ids, trained):
  """log pi(reply | prompt) of each row's sequence (`_one_a_row`): per-token log-softmax, summed over the reply."""
  logits = model(ids[:, :-1], positions_BT=jnp.broadcast_to(jnp.arange(ids.shape[1] - 1), ids[:, :-1].shape))
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), ids[:, 1:, None], -1)[..., 0]
  return jnp.sum(logp * trained[:, 1:], axis=-1)


def test_the_loss_and_its_gradient_equal_a_direct_computation_from_each_sequence_alone():
  """Packed row pairs (several pairs a row, a pair's sequences in the same segment of the chosen and the rejected
  row) give each sequence the log-prob it has alone, and the loss and its gradient are DPO's, computed pair by
  pair from per-token log-softmax: for plain DPO and conservative DPO (label smoothing)."""
  config = config_lib.load_config("configs/dpo.py", TINY_MODEL + ["data.seq_len=16"])
  model = models.build_model(config.model, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  pairs = _random_pairs(rng, 7)
  rows = dpo.pack_pairs(pairs, 16)
  N, S = len(rows["inputs"]), rows["segment_ids"].max() + 1
  assert N % 2 == 0 and N < 2 * len(pairs) and S > 2  # packed: row pairs of several pairs each
  # Segment k of chosen row 2p and of rejected row 2p + 1 hold the same pair.
  where = [(2 * p, k) for p in range(N // 2) for k in range(1, rows["segment_ids"][2 * p].max() + 1)]
  assert len(where) == len(pairs)
  assert all(rows["segment_ids"][r + 1].max() == rows["segment_ids"][r].max() for r in range(0, N, 2))
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  batch["reference"] = jnp.asarray(rng.normal(-20.0, 3.0, size=(N, S)), jnp.float32)

  packed = nnx.jit(dpo.sequence_logps, static_argnums=2)(model, batch, S)
  one_a_row = _one_a_row([s for pair in pairs for s in pair], 16)  # chosen, rejected, chosen, ...
  alone = nnx.jit(_alone_logps)(model, *one_a_row)
  for (r, k), want_chosen, want_rejected in zip(where, alone[0::2], alone[1::2]):
    np.testing.assert_allclose(packed[r, k], want_chosen, rtol=1e-5)
    np.testing.assert_allclose(packed[r + 1, k], want_rejected, rtol=1e-5)
  reference_P2 = np.array([[batch["reference"][r + side, k] for side in (0, 1)] for r, k in where])

  for beta, eps in ((0.5, 0.0), (0.1, 0.2)):
    def direct(model):
      logp_P2 = _alone_logps(model, *one_a_row).reshape(-1, 2)
      margin_P = beta * ((logp_P2[:, 0] - reference_P2[:, 0]) - (logp_P2[:, 1] - reference_P2[:, 1]))
      return jnp.sum(-(1 - eps) * jax.nn.log_sigmoid(margin_P) - eps * jax.nn.log_sigmoid(-margin_P))

    (loss_sum, aux), grads = nnx.jit(nnx.value_and_grad(
        lambda m: dpo.loss(m, batch, beta=beta, label_smoothing=eps), has_aux=True))(model)
    want, want_grads = nnx.jit(nnx.value_and_grad(direct))(model)
    assert aux["weight_sum"] == len(pairs)
    np.testing.assert_allclose(loss_sum, want, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), nnx.to_pure_dict(grads),
                 nnx.to_pure_dict(want_grads))
  # The rewards are beta times the log-ratios, the accuracy counts the pairs whose chosen reward is the larger.
  ratio = np.asarray(packed - batch["reference"])
  chosen, rejected = (np.array([ratio[r + side, k] for r, k in where]) for side in (0, 1))
  np.testing.assert_allclose(aux["rewards/chosen_sum"], 0.1 * chosen.sum(), rtol=1e-5)
  np.testing.assert_allclose(aux["rewards/margins_sum"], 0.1 * (chosen - rejected).sum(), rtol=1e-5)
  assert aux["correct_sum"] == (chosen > rejected).sum()


def test_row_pairs_stay_together_in_every_batch_and_micro_batch():
  """Each micro-batch (`train._micro_batches`: rows strided by grad_accum) holds whole row pairs, chosen row first;
  an epoch draws every row pair once, and the eval loader reads them in order, the last batch padded."""
  from fmjax import train
  rows = {"inputs": np.arange(12 * 4, dtype=np.int32).reshape(12, 4), "segment_ids": np.ones((12, 4), np.int32),
          "loss_weights": np.ones((12, 4), np.float32)}
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  loader = dpo.PairLoader(rows, 8, device, seed=3, shuffle=True, accum=2)
  seen = []
  for step in range(3):  # two epochs of 6 row pairs, 4 a batch
    ids = loader.dataset_rows(step)
    for micro in np.asarray(train._micro_batches({"x": jnp.asarray(ids)}, 2)["x"]):
      assert (micro[0::2] % 2 == 0).all() and (micro[1::2] == micro[0::2] + 1).all(), micro
      seen += list(micro[0::2] // 2)
  assert sorted(seen) == sorted(list(range(6)) * 2)
  epochs = loader.draw(np.arange(12), 6)
  assert sorted(epochs[:6]) == sorted(epochs[6:]) == list(range(6)) and list(epochs[:6]) != list(epochs[6:])
  eval_loader = dpo.PairLoader(rows, 4, device, seed=0, shuffle=False)
  assert eval_loader.num_batches == 3
  np.testing.assert_array_equal(np.concatenate([eval_loader.dataset_rows(s) for s in range(3)]), np.arange(12))
  assert list(dpo.PairLoader(rows, 8, device, seed=0, shuffle=False).dataset_rows(1)) == [8, 9, 10, 11, -1, -1, -1, -1]


# ----------------------------------------------------------------------------- data


def test_text_and_conversational_pairs_are_written_as_sft_writes_them(tmp_path, chat_tokenizer_dirs):
  """A text pair is two (prompt, completion) rows; a conversation (explicit prompt, or two whole conversations
  sharing it) is written in the chat template as SFT writes it, trained on the reply alone: an assistant turn
  inside the prompt is context, not trained."""
  tok = data.load_hf(str(chat_tokenizer_dirs["chatml"]))
  template = tok.chat_template
  text = dpo.Pair("What is 2 plus 2?", " 4.", " 5.")
  assert dpo.encode_pair(tok, text, template) == (sft.encode_example(tok, "What is 2 plus 2?", " 4."),
                                                  sft.encode_example(tok, "What is 2 plus 2?", " 5."))
  prompt, good, bad = TWO_TURNS[:3], [{"role": "assistant", "content": "6."}], [{"role": "assistant", "content": "7."}]
  path = tmp_path / "prefs.jsonl"
  path.write_text(json.dumps({"prompt": prompt, "chosen": good, "rejected": bad}) + "\n"
                  + json.dumps({"chosen": prompt + good, "rejected": prompt + bad, "score": 0.5}) + "\n"
                  + json.dumps({"prompt": "What is 2 plus 2?", "chosen": " 4.", "rejected": " 5."}) + "\n")
  explicit, implicit, plain = dpo.read_pairs(str(path))
  assert explicit == implicit and plain == text and implicit.where == f"{path}:2"
  chosen, rejected = dpo.encode_pair(tok, explicit, template)
  ids, trained = sft.encode_conversation(tok, sft.Conversation(tuple(TWO_TURNS[:3] + good)), template)
  assert chosen[0] == ids
  # SFT learns both assistant turns; the pair only its reply ("6." and its end of turn).
  assert tok.decode([i for i, w in zip(ids, trained) if w]) == "4.<|im_end|>6.<|im_end|>"
  assert tok.decode([i for i, w in zip(*chosen) if w]) == "6.<|im_end|>"
  assert tok.decode([i for i, w in zip(*rejected) if w]) == "7.<|im_end|>"
  k = chosen[1].index(1)  # the two sequences share the prompt's tokens, the reply's header included
  assert k > 0 and chosen[0][:k] == rejected[0][:k] and rejected[1].index(1) == k
  # A run's rows: the template is the tokenizer's own (a plain one gets the built-in template, and keeps it).
  config = config_lib.load_config("configs/dpo.py", [f"data.files={path}", "dpo.eval_percent=0", "data.seq_len=128",
                                                     "dpo.pack=false"])
  rows = dpo.load_rows(config, tok)["train"]
  assert len(rows["inputs"]) == 6 and dpo.num_pairs(rows) == 3
  trained_text = [tok.decode(r[w > 0]) for r, w in zip(rows["targets"], rows["loss_weights"])]
  as_sft = [tok.decode([i for i, w in zip(*sft.encode_example(tok, "What is 2 plus 2?", reply)) if w])
            for reply in (" 4.", " 5.")]
  assert trained_text[:2] == ["6.<|im_end|>", "7.<|im_end|>"] and trained_text[4:] == as_sft
  plain_tok = data.Tokenizer(tok.hf, "hf")  # the tokenizer without its chat template
  dpo.load_rows(config, plain_tok)
  assert plain_tok.chat_template == chat.BUILTIN_TEMPLATE


def test_a_pair_whose_prompt_leaves_no_reply_token_is_dropped_and_counted(tmp_path, caplog):
  T = 8
  path = tmp_path / "x.jsonl"
  path.write_text(json.dumps({"prompt": "p" * (T - 1), "chosen": "XY", "rejected": "Z"}) + "\n"
                  + json.dumps({"prompt": "q" * T, "chosen": "X", "rejected": "Y"}) + "\n"
                  + json.dumps({"prompt": "r", "chosen": "X" * 20, "rejected": "Y"}) + "\n")
  config = config_lib.load_config("configs/dpo.py", [f"data.files={path}", f"dpo.eval_files={path}",
                                                     f"data.seq_len={T}"])
  with caplog.at_level("INFO", logger="fmjax"):
    rows = dpo.load_rows(config, CharTokenizer())["train"]
  assert dpo.num_pairs(rows) == 2
  assert (f"DPO train: dropped 1 pairs whose prompt (with the token that opens it) is longer than "
          f"data.seq_len={T}; cut 3 replies at the row end") in caplog.text
  long = tmp_path / "long.jsonl"
  long.write_text(json.dumps({"prompt": "q" * T, "chosen": "X", "rejected": "Y"}) + "\n")
  config = config_lib.load_config("configs/dpo.py", [f"data.files={long}", "dpo.eval_percent=0", f"data.seq_len={T}"])
  with pytest.raises(ConfigError, match=rf"^every training pair has a prompt longer than data.seq_len={T} \(1 "
                                        r"dropped\); raise data.seq_len"):
    dpo.load_rows(config, CharTokenizer())


@pytest.mark.parametrize("row,said", [
    ({"prompt": "a", "chosen": "b"}, r"has no 'rejected' field \(has \['chosen', 'prompt'\]\); set dpo.prompt_key"),
    ({"prompt": "a", "chosen": "b", "rejected": None}, r"has a JSON str in 'chosen' and null in 'rejected'; write "
                                                      r"both replies as text, or both as lists of messages"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"},
     r"has a JSON list in 'prompt' beside text replies"),
    ({"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": [{"role": "assistant",
                                                                                      "content": "c"}]},
     r"has a JSON str in 'prompt' beside replies that are lists of messages"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}],
      "rejected": [{"role": "assistant", "content": "c"}]}, r"'chosen' has no assistant message, so nothing to learn"),
    ({"prompt": [{"role": "robot", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}],
      "rejected": [{"role": "assistant", "content": "c"}]}, r"'prompt' has message 0 of role 'robot'"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     r"'chosen' and 'rejected' share their first 2 messages \(the prompt\), and 'chosen' has no assistant message"),
    (["a", "b"], r"has no 'chosen' or 'rejected' field \(has a JSON list\)"),
])
def test_a_malformed_pair_is_one_line_naming_the_file_and_line(tmp_path, row, said):
  path = tmp_path / "prefs.jsonl"
  path.write_text(json.dumps({"prompt": "ok", "chosen": "yes", "rejected": "no"}) + "\n" + json.dumps(row) + "\n")
  with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:2 {said}") as e:
    dpo.read_pairs(str(path))
  assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- runs


def _preferences(path, n, seed, conversations=False):
  """Arithmetic prompts; the chosen reply is a sentence with the answer, the rejected one the same words in a
  shuffled order: the same length, and the reference model (random) prefers neither. `conversations`: as
  messages, every other row as two whole conversations (the prompt implicit)."""
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for i in range(n):
      a, b = rng.integers(0, 9, size=2)
      words = f"Sure, {a} plus {b} is {a + b}.".split()
      shuffled = words
      while shuffled == words:
        shuffled = list(rng.permutation(words))
      prompt, chosen, rejected = f"Please add {a} and {b}.", " ".join(words), " ".join(shuffled)
      if not conversations:
        row = {"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}
      else:
        asked, said = [{"role": "user", "content": prompt}], lambda text: [{"role": "assistant", "content": text}]
        row = ({"prompt": asked, "chosen": said(chosen), "rejected": said(rejected)} if i % 2 else
               {"chosen": asked + said(chosen), "rejected": asked + said(rejected)})
      f.write(json.dumps(row) + "\n")


def _flags(tmp_path, pretrain, steps, *more):
  return [f"init_from={pretrain}", f"data.files={tmp_path / 'prefs.jsonl'}", "data.seq_len=64", "train.batch_size=16",
          f"train.steps={steps}", "train.log_every=1", "train.progress_bar=false", "optim.lr=2e-3",
          "optim.warmup_steps=0", "optim.schedule=constant", "checkpoint.async_save=false", "dpo.eval_percent=20",
          *more]


def _train_rows(workdir):
  return [m for m in report.read_metrics(str(workdir)) if "train/loss" in m]


def test_a_dpo_run_starts_at_log_2_learns_the_preference_and_its_workdir_is_an_sft_workdir(tmp_path,
                                                                                          tmp_path_factory):
  """Step 0 (policy = reference): loss log 2, rewards exactly 0. A short run raises the held-out reward accuracy
  well above chance and the policy's log-prob margin of chosen over rejected; eval, generate and results.json
  read the workdir."""
  pretrain, _ = make_workdir(tmp_path_factory, "gpt")
  _preferences(tmp_path / "prefs.jsonl", 120, seed=0)
  workdir = tmp_path / "dpo"
  # train.steps=0 scores the held-out pairs with the start's model: the reference's own margin.
  before = dpo.run(config_lib.load_config("configs/dpo.py", _flags(tmp_path, pretrain, 0)), str(workdir))["eval"]
  assert before["rewards/accuracies"] == 0.0 and before["rewards/margins"] == 0.0  # every reward is 0: ties
  result = dpo.run(config_lib.load_config("configs/dpo.py", _flags(tmp_path, pretrain, 10, "train.eval_every=10")),
                   str(workdir))
  first = _train_rows(workdir)[0]
  assert first["train/rewards/chosen"] == first["train/rewards/rejected"] == first["train/rewards/margins"] == 0.0
  assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-6) and first["train/rewards/accuracies"] == 0.0
  after = result["eval"]
  margin = lambda m: m["logps/chosen"] - m["logps/rejected"]
  assert after["rewards/accuracies"] > 0.9 and after["rewards/margins"] > 1.0, after
  assert margin(after) > margin(before) + 10.0, (before, after)
  assert after["loss"] < 0.5 * math.log(2)
  # Read apart from the run's own labels: the trained model, scored by the direct computation on fresh pairs,
  # raised the chosen reply's log-prob over the rejected one's, against init_from's model, on nearly every pair.
  _preferences(tmp_path / "fresh.jsonl", 24, seed=9)
  policy, _, tok = generate.load_run(str(workdir))
  reference, _, _ = generate.load_run(str(pretrain))
  fresh = dpo.read_pairs(str(tmp_path / "fresh.jsonl"))
  sequences = [sft.encode_example(tok, p.prompt, reply) for p in fresh for reply in (p.chosen, p.rejected)]
  ids, trained = _one_a_row(sequences, 64)
  score = nnx.jit(_alone_logps)
  ratio_P2 = np.asarray(score(policy, ids, trained) - score(reference, ids, trained)).reshape(-1, 2)
  assert (ratio_P2[:, 0] > ratio_P2[:, 1]).mean() > 0.9, ratio_P2
  results = json.loads((workdir / "results.json").read_text())
  assert results["eval"] == after and results["step"] == 10
  assert results["pairs"]["train"] + results["pairs"]["eval"] == 120 and results["pairs"]["eval"] > 10
  # fmjax eval reads the saved reference: the run's own numbers, with init_from gone.
  os.rename(pretrain, str(pretrain) + ".moved")
  try:
    scored = evaluate.run(str(workdir))
  finally:
    os.rename(str(pretrain) + ".moved", pretrain)
  for k, v in after.items():
    assert scored[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
  assert isinstance(generate.run(str(workdir), prompts=["Please add 3 and 4."], max_new_tokens=4,
                                 temperature=0)[0], str)


def _sigterm_at(monkeypatch, step):
  """A SIGTERM as the loader reads `step`'s batch: the run saves at the next step boundary and stops."""
  read = dpo.PairLoader.global_batch

  def global_batch(self, s):
    if s == step and self.shuffle:
      os.kill(os.getpid(), signal.SIGTERM)
    return read(self, s)
  monkeypatch.setattr(dpo.PairLoader, "global_batch", global_batch)


def test_a_run_stopped_by_sigterm_resumes_bitwise_and_recomputes_the_reference_bitwise(tmp_path, tmp_path_factory,
                                                                                      monkeypatch):
  """4 straight steps (`fmjax finetune` given the DPO config, with gradient accumulation) equal 2 steps, a SIGTERM,
  and a resume: losses and rewards bit for bit. The resume finds no saved reference and computes it again from
  init_from: the same numbers, bit for bit."""
  pretrain, _ = make_workdir(tmp_path_factory, "gpt")
  _preferences(tmp_path / "prefs.jsonl", 48, seed=1)
  flags = _flags(tmp_path, pretrain, 4, "train.grad_accum=2", "train.eval_every=0", "checkpoint.every_steps=100")
  assert cli.main(["finetune", "--config=configs/dpo.py", f"--workdir={tmp_path / 'straight'}",
                   *(f"--config.{f}" for f in flags)]) == 0
  _sigterm_at(monkeypatch, 2)
  first = dpo.run(config_lib.load_config("configs/dpo.py", flags), str(tmp_path / "resumed"))
  monkeypatch.undo()
  assert first["preempted"] and first["step"] == 3 and not (tmp_path / "resumed" / "results.json").exists()
  reference = tmp_path / "resumed" / dpo.REFERENCE_FILE
  saved = dict(np.load(reference))
  reference.unlink()
  assert dpo.run(config_lib.load_config("configs/dpo.py", flags), str(tmp_path / "resumed"))["step"] == 4
  again = np.load(reference)
  assert set(again.files) == set(saved)
  for k in saved:
    np.testing.assert_array_equal(again[k], saved[k], err_msg=k)
  keys = ("train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/logps/chosen", "train/grad_norm")
  straight, resumed = ([tuple(m[k] for k in keys) for m in _train_rows(tmp_path / w)] for w in ("straight", "resumed"))
  assert len(straight) == 4 and resumed == straight, (straight, resumed)
  assert straight[0][1:3] == (0.0, 0.0)  # step 0's rewards, through micro-batches too


def test_lora_dpo_on_conversations_trains_the_factors_alone_and_generate_chat_reads_it(
    tmp_path, tmp_path_factory, chat_tokenizer_dirs):
  """The reference is init_from's model (a chat model's tokenizer, ChatML), which the LoRA model computes at step 0
  (B = 0): rewards 0 there. Every parameter but the LoRA factors stays init_from's, bit for bit; `generate --chat`
  asks in the run's template, and export merges the factors."""
  from fmjax import interop
  pretrain, _ = make_workdir(tmp_path_factory, "gpt", chat_tokenizer_dirs["chatml"])
  _preferences(tmp_path / "prefs.jsonl", 40, seed=2, conversations=True)
  workdir = tmp_path / "lora"
  dpo.run(config_lib.load_config("configs/dpo.py", _flags(tmp_path, pretrain, 3, "finetune.peft=lora",
                                                          "optim.lr=1e-2", "train.batch_size=8",
                                                          "train.eval_every=0", "dpo.eval_percent=0")), str(workdir))
  assert json.loads((workdir / "results.json").read_text())["pairs"]["train"] == 40  # none dropped
  rows = _train_rows(workdir)
  assert rows[0]["train/rewards/chosen"] == rows[0]["train/rewards/rejected"] == 0.0
  assert rows[-1]["train/rewards/margins"] != 0.0
  flat = lambda params: {jax.tree_util.keystr(p): np.asarray(x)
                         for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(params))}
  before, after = flat(generate.restore_run(str(pretrain)).params), flat(generate.restore_run(str(workdir)).params)
  factors = {k for k in after if k.endswith(("['lora_a']", "['lora_b']"))}
  assert factors and set(after) - factors == set(before)
  for k in before:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  assert all(after[k].any() for k in factors if k.endswith("['lora_b']"))
  assert isinstance(generate.run(str(workdir), prompts=["Please add 3 and 4."], max_new_tokens=4, temperature=0,
                                 chat=True)[0], str)
  assert os.path.exists(os.path.join(interop.export(str(workdir), str(tmp_path / "hf")), "model.safetensors"))


def test_a_failed_start_is_one_line_and_leaves_no_workdir(tmp_path, tmp_path_factory):
  pretrain, _ = make_workdir(tmp_path_factory, "gpt")
  (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a"}\n')
  _preferences(tmp_path / "prefs.jsonl", 20, seed=3)
  for overrides, message in (([f"data.files={tmp_path / 'bad.jsonl'}"], r"bad.jsonl:2 has no 'chosen' or 'rejected'"),
                             ([f"init_from={tmp_path / 'nowhere'}"], "holds no checkpoints/"),
                             (["train.batch_size=6", "train.grad_accum=2"], r"train.batch_size=6 must be a multiple "
                                                                            r"of 2 x train.grad_accum=2")):
    config = config_lib.load_config("configs/dpo.py", _flags(tmp_path, pretrain, 1)[:3])
    with pytest.raises(ConfigError, match=message) as e:
      config_lib.apply_overrides(config, overrides)
      dpo.run(config, str(tmp_path / "new"))
    assert "\n" not in str(e.value) and not (tmp_path / "new").exists()
  with pytest.raises(ConfigError, match=r"^this is a DPO config \(it has the `dpo` section\): run it with "
                                        r"`fmjax dpo`, not `fmjax sft`$"):
    sft.run(config_lib.load_config("configs/dpo.py"), str(tmp_path / "new"))
