"""Does pretraining help? Tiny BERT fine-tuned on pydoc_family from a pretrained trunk vs from random init.

  fmjax train --config=configs/bert.py:tiny --workdir=workdirs/pretrain_helps/pretrain
  fmjax sweep --config=experiments/pretrain_helps/config.py --workdir=workdirs/pretrain_helps/finetune

Both arms share everything (model, tokenizer, task, steps, learning rate, seeds) except where the
trunk's weights come from. See README.md for the table.
"""

import os

from fmjax import config_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN = "workdirs/pretrain_helps/pretrain"  # relative to the repository root, outside git


def get_config(arg: str = ""):
  c = config_lib.load_module(os.path.join(_ROOT, "configs", "finetune_cls.py")).get_config("task=pydoc_family")
  c.name = "pretrain_helps"
  c.data.seq_len = 64  # the opening of a docstring names its topic; halves the step time
  c.train.update(steps=300, eval_every=100, log_every=25)
  c.optim.update(lr=1e-3, warmup_steps=30)
  return c


def get_sweep():
  """Pretrained vs random trunk x 3 seeds, run by `fmjax finetune`."""
  from fmjax import sweep
  return [{"command": "finetune", **e} for e in sweep.product({"init_from": [PRETRAIN, ""]},
                                                               {"train.seed": [0, 1, 2]})]
