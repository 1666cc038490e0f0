"""GPT-2's decoder against each later choice alone, and all of them (Llama's), on a laptop CPU.

  fmjax sweep --config=experiments/decoder_choices/config.py --workdir=/tmp/decoder_choices

`arg` names the variant (`VARIANTS`): `gpt2` is a tiny GPT-2 (2 layers, d_model 128, 4 heads);
`rope` ... `untied` each add one later choice to it, `llama` has them all, and `llama_learned` ...
`llama_tied` each take one back; `gpt2_seed1` and
`gpt2_seed2` repeat the baseline with other initialisations, which is how far apart two runs of
one model land here. A SwiGLU MLP has three matrices where GELU's has two, so it takes d_ff 344
(about 8/3 d_model) to keep the parameter count of GELU's 512 (Shazeer 2020 does the same).
"""

from fmjax import config_lib

SWIGLU = {"mlp": "swiglu", "d_ff": 344}
LLAMA = {"positions": "rope", "norm": "rmsnorm", **SWIGLU, "use_bias": False, "tie_embeddings": False}
VARIANTS = {  # name: (model settings, train.seed)
    "gpt2": ({}, 0),
    "gpt2_seed1": ({}, 1),
    "gpt2_seed2": ({}, 2),
    "rope": ({"positions": "rope"}, 0),
    "rmsnorm": ({"norm": "rmsnorm"}, 0),
    "swiglu": (SWIGLU, 0),
    "no_bias": ({"use_bias": False}, 0),
    "untied": ({"tie_embeddings": False}, 0),
    "llama": (LLAMA, 0),
    "llama_mqa": ({**LLAMA, "num_kv_heads": 1}, 0),
    # Llama with one choice taken back to GPT-2's.
    "llama_learned": ({**LLAMA, "positions": "learned"}, 0),
    "llama_layernorm": ({**LLAMA, "norm": "layernorm"}, 0),
    "llama_gelu": ({**LLAMA, "mlp": "gelu", "d_ff": 512}, 0),
    "llama_bias": ({**LLAMA, "use_bias": True}, 0),
    "llama_tied": ({**LLAMA, "tie_embeddings": True}, 0),
}
BATCH, SEQ, STEPS = 16, 128, 256  # 524k tokens: 1.7 passes over fmjax_corpus's training split


def get_config(arg: str = "gpt2"):
  flags, _ = config_lib.parse_arg(arg)
  if len(flags) != 1 or flags[0] not in VARIANTS:
    raise config_lib.ConfigError(f"decoder_choices takes one variant from {list(VARIANTS)}, got {arg!r}")
  settings, seed = VARIANTS[flags[0]]
  c = config_lib.base_config("gpt")
  c.name = f"decoder_choices_{flags[0]}"
  c.model.update(num_layers=2, d_model=128, num_heads=4, d_ff=512, vocab_size=512, max_len=SEQ)
  c.model.update(settings)
  c.data.update(seq_len=SEQ)
  c.data.tokenizer.vocab_size = 512
  c.train.update(batch_size=BATCH, steps=STEPS, seed=seed, log_every=16, eval_every=32, eval_batches=8,
                 progress_bar=False)
  c.optim.update(lr=3e-3, warmup_steps=16, schedule="cosine", min_lr_ratio=0.1)
  c.checkpoint.update(every_steps=1_000_000, async_save=False)  # the final step is always saved
  return c


def get_sweep():
  """The 15 variants, one run each (about 13 minutes on 2 CPU cores)."""
  return [{"config": name} for name in VARIANTS]
