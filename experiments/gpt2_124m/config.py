"""GPT-2 small (124M) on web text, as in nanoGPT / llm.c.

  fmjax train --config=experiments/gpt2_124m/config.py --workdir=gs://BUCKET/gpt2_124m
  fmjax bench --config=experiments/gpt2_124m/config.py --config.train.batch_size=32 --config.train.grad_accum=1

Data: C4 (English) from TFDS, an OpenWebText-class corpus of filtered web pages.
"""

import os

from fmjax import config_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def get_config(arg: str = ""):
  c = config_lib.load_module(os.path.join(_ROOT, "configs", "gpt.py")).get_config("small")
  c.name = "gpt2_124m"
  c.data.update(dataset="c4/en:3.1.0", feature="text", train_split="train", eval_split="validation",
                data_dir="gs://BUCKET/tfds", seq_len=1024)
  # nanoGPT's recipe: ~0.5M tokens a step (480 x 1024; raise train.grad_accum where a device's share does
  # not fit), 600k steps, lr 6e-4 cosine to
  # 6e-5 after 2000 warmup steps, weight decay 0.1, betas (0.9, 0.95), clip 1.0.
  c.train.update(batch_size=480, grad_accum=1, steps=600_000, eval_every=2000, eval_batches=20)
  c.optim.update(lr=6e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95)
  c.checkpoint.update(every_steps=5000, keep=3, keep_period=50_000)
  return c


def get_sweep():
  """A learning-rate sweep at the same token budget."""
  return [{"optim.lr": lr} for lr in (3e-4, 6e-4, 1.2e-3)]
