"""GLUE fine-tuning of BERT-base as in Devlin et al. (2019): batch 32, 3 epochs, 10% warmup, seq 128.

  fmjax sweep --config=experiments/bert_base/glue.py --print_commands \
      --config.init_from=gs://BUCKET/bert_base/phase2 --workdir=gs://BUCKET/bert_base/glue
  fmjax finetune --config=experiments/bert_base/glue.py:task=glue/rte \
      --config.init_from=gs://BUCKET/bert_base/phase2 --workdir=gs://BUCKET/bert_base/rte

The sweep runs the 8 GLUE tasks of README.md's table x learning rates {2e-5, 3e-5, 5e-5} (the
paper's grid, less 4e-5) x seeds {0, 1, 2} (72 runs); an MNLI run scores both its dev sets
(`accuracy`, `accuracy_mismatched`), so MNLI-m and -mm come from the same models as in the paper.
`fmjax sweep` writes finetune.md with the best rate per task on the dev set, mean ± std over
seeds. GLUE is read through TFDS from `data.data_dir` (e.g. `--config.data.data_dir=gs://BUCKET/tfds`).
"""

import math
import os

from fmjax import config_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Training examples per task (TFDS glue/*), for 3 epochs at batch 32.
TRAIN_EXAMPLES = {"mnli": 392_702, "qqp": 363_846, "qnli": 104_743, "sst2": 67_349,
                  "cola": 8_551, "stsb": 5_749, "mrpc": 3_668, "rte": 2_490}
LRS = (2e-5, 3e-5, 5e-5)
SEEDS = (0, 1, 2)
EPOCHS = 3


def get_config(arg: str = "task=glue/mnli"):
  flags, kv = config_lib.parse_arg(arg)
  if flags or set(kv) - {"task"}:
    raise config_lib.ConfigError(f"unknown bert_base/glue.py config arg(s) {flags + sorted(set(kv) - {'task'})}; "
                                 "use task=glue/<name>")
  name = kv.get("task", "glue/mnli").removeprefix("glue/")
  if name not in TRAIN_EXAMPLES:
    raise config_lib.ConfigError(f"task={kv['task']!r}: use one of {[f'glue/{t}' for t in TRAIN_EXAMPLES]}")
  c = config_lib.load_module(os.path.join(_ROOT, "configs", "finetune_cls.py")).get_config(
      f"task=glue/{name},size=base")
  c.name = f"bert_base_glue_{name}"
  steps = math.ceil(EPOCHS * TRAIN_EXAMPLES[name] / 32)
  c.train.update(batch_size=32, steps=steps, eval_every=math.ceil(steps / EPOCHS), log_every=min(100, steps))
  c.optim.update(lr=3e-5, warmup_steps=steps // 10)
  return c


def get_sweep():
  """GLUE tasks x learning rates x seeds: 72 `fmjax finetune` runs."""
  from fmjax import sweep
  return [{"command": "finetune", **e} for e in sweep.product(
      {"config": [f"task=glue/{t}" for t in TRAIN_EXAMPLES]}, {"optim.lr": list(LRS)}, {"train.seed": list(SEEDS)})]
