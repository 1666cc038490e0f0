"""BERT encoder pretrained with masked LM.

  fmjax train --config=configs/bert.py:tiny,runlocal --workdir=workdirs/bert_tiny
  fmjax train --config=configs/bert.py:base --config.data.dataset=wikipedia/20230601.en \
      --config.data.train_split='train[:99%]' --config.data.eval_split='train[99%:]' --workdir=gs://BUCKET/bert

Sizes: tiny, mini, small, medium (the compact BERTs of Turc et al., 2019), base (110M), large (340M).
`runlocal` shrinks batch, sequence and steps so the run finishes on a laptop CPU. Wikipedia has a train split
only, so its held-out rows are cut from it.
"""

from fmjax import config_lib

SIZES = {  # num_layers, d_model, num_heads
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}


def get_config(arg: str = "tiny"):
  size, runlocal = config_lib.size_arg(arg, SIZES, "bert")
  c = config_lib.base_config("bert")
  c.name = f"bert_{size}"
  layers, d, heads = SIZES[size]
  c.model.update(num_layers=layers, d_model=d, num_heads=heads, d_ff=4 * d)
  if size in ("tiny", "mini"):
    c.model.max_len = 256
    c.data.seq_len = 128
    c.data.tokenizer.vocab_size = 2048
    c.model.vocab_size = 2048
    c.train.update(batch_size=16, steps=600, log_every=25, eval_every=200)
    c.optim.update(lr=2e-3, warmup_steps=50)
  else:
    c.model.vocab_size = 30592  # BERT's 30522 WordPiece ids, padded to a multiple of 128
    c.data.tokenizer.vocab_size = 30522
    c.model.dtype = "bfloat16"
    c.model.fused_loss_chunk = 8192  # no float32 [B, M, V] logits: fewer bytes a step (benchmarks/README.md)
    c.train.update(batch_size=256, steps=1_000_000)
    c.optim.update(lr=1e-4, warmup_steps=10_000, schedule="linear", min_lr_ratio=0.0)
  if runlocal:
    c.model.dtype = "float32"
    c.data.seq_len = min(c.data.seq_len, 128)
    c.train.update(batch_size=8, steps=20, log_every=5, eval_every=10, eval_batches=2)
    c.optim.warmup_steps = 2  # a tenth of the run: the rate reaches optim.lr and decays
    c.checkpoint.every_steps = 10
  return c


def get_sweep():
  """Learning-rate sweep for the tiny model:

    fmjax sweep --config=configs/bert.py:tiny,runlocal --workdir=workdirs/bert_sweep
  """
  return [{"optim.lr": lr} for lr in (5e-4, 1e-3, 2e-3)]
