"""The pretraining arm of pretrain_helps: tiny BERT, masked LM on `fmjax_corpus`, 20k steps.

  fmjax train --config=experiments/pretrain_helps/pretrain.py --workdir=workdirs/pretrain_helps/pretrain

`configs/bert.py:tiny` trains for 600 steps (the demo's budget). Here the same model and data are
scheduled for 20k steps of 16 x 128 tokens (about 11 passes over the 190k-token corpus per 1k
steps). The recorded run was stopped at step 15.6k, once the held-out MLM loss had risen for 5k
steps; fine-tuning starts from step 10k, the lowest held-out loss (README.md).
"""

import os

from fmjax import config_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def get_config(arg: str = ""):
  del arg
  c = config_lib.load_module(os.path.join(_ROOT, "configs", "bert.py")).get_config("tiny")
  c.name = "pretrain_helps_bert_tiny"
  c.train.update(steps=20_000, eval_every=1000, log_every=200)
  c.checkpoint.update(every_steps=5000, keep_period=5000)
  return c
