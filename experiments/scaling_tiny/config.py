"""Chinchilla-style scaling on a laptop CPU: 3 tiny GPT sizes x 3 token budgets on fmjax_corpus.

  fmjax sweep --config=experiments/scaling_tiny/config.py --workdir=/tmp/scaling_tiny
  python experiments/scaling_tiny/fit.py --workdir=/tmp/scaling_tiny

`arg` is the model size (xs, s, m). Every run has its own cosine schedule over its own token
budget (Hoffmann et al. 2022 match the schedule length to the run; a longer cosine evaluated
early overstates the loss).
"""

from fmjax import config_lib

SIZES = {  # num_layers, d_model, num_heads, peak lr (smaller models take a larger one)
    "xs": (2, 32, 2, 1e-2),
    "s": (2, 64, 4, 6e-3),
    "m": (2, 128, 4, 3e-3),
}
BATCH, SEQ = 16, 64
# Token budgets as train steps of BATCH * SEQ = 1024 tokens: 128k, 256k and 512k tokens.
STEPS = (128, 256, 512)


def get_config(arg: str = "s"):
  flags, _ = config_lib.parse_arg(arg)
  if len(flags) != 1 or flags[0] not in SIZES:
    raise config_lib.ConfigError(f"scaling_tiny takes one size from {list(SIZES)}, got {arg!r}")
  size = flags[0]
  layers, d, heads, lr = SIZES[size]
  c = config_lib.base_config("gpt")
  c.name = f"scaling_tiny_{size}"
  c.model.update(num_layers=layers, d_model=d, num_heads=heads, d_ff=4 * d, vocab_size=512, max_len=SEQ)
  c.data.update(seq_len=SEQ)
  c.data.tokenizer.vocab_size = 512
  c.train.update(batch_size=BATCH, steps=STEPS[-1], log_every=16, eval_every=32, eval_batches=4,
                 progress_bar=False)
  c.optim.update(lr=lr, warmup_steps=16, schedule="cosine", min_lr_ratio=0.1)
  c.checkpoint.update(every_steps=1_000_000, async_save=False)  # the final step is always saved
  return c


def get_sweep():
  """3 sizes x 3 budgets = 9 runs; about 10 minutes on 2 CPU cores."""
  from fmjax import sweep
  return sweep.product({"config": list(SIZES)}, {"train.steps": list(STEPS)})
