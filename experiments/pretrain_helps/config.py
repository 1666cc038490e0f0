"""Does pretraining help? Tiny BERT fine-tuned on pydoc_family from a pretrained trunk vs from random init.

  fmjax train --config=experiments/pretrain_helps/pretrain.py --workdir=workdirs/pretrain_helps/pretrain
  fmjax sweep --config=experiments/pretrain_helps/config.py --workdir=workdirs/pretrain_helps/finetune

Both arms share everything (model, tokenizer, task, steps, pooling, learning-rate grid, seeds)
except where the trunk's weights come from. Each arm is reported at its own best rate (chosen on
validation, as GLUE results are), in two regimes: all 1400 training labels for 300 steps, and 200
labels for 150 steps. See README.md for the tables.
"""

import os

from fmjax import config_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN = "workdirs/pretrain_helps/pretrain"  # relative to the repository root, outside git
PRETRAIN_STEP = 10_000  # the pretraining checkpoint with the lowest held-out MLM loss (README.md)


def get_config(arg: str = ""):
  del arg
  c = config_lib.load_module(os.path.join(_ROOT, "configs", "finetune_cls.py")).get_config("task=pydoc_family")
  c.name = "pretrain_helps"
  c.data.seq_len = 64  # the opening of a docstring names its topic; halves the step time
  c.train.update(steps=300, eval_every=100, log_every=25, progress_bar=False)
  c.optim.update(lr=1e-3, warmup_steps=30)
  c.init_from_step = PRETRAIN_STEP  # read only by the pretrained arm (init_from=PRETRAIN)
  # MLM trains neither [CLS]'s output nor the pooler; the average of the token states it does train.
  c.finetune.pooling = "mean"
  c.model.update(dropout=0.0, attention_dropout=0.0)  # as in pretraining (configs/bert.py:tiny)
  return c


def get_sweep():
  """{random, pretrained} trunk x {1400, 200} labels x 3 rates x 3 seeds = 36 `fmjax finetune` runs."""
  from fmjax import sweep
  return [{"command": "finetune", **e} for e in sweep.product(
      {"init_from": ["", PRETRAIN]},
      {"task.max_train_examples": [0, 200], "train.steps": [300, 150], "train.eval_every": [100, 50]},
      {"optim.lr": [3e-4, 1e-3, 3e-3]},
      {"train.seed": [0, 1, 2]})]
