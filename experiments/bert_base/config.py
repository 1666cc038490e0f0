"""BERT-base two-phase pretraining (Devlin et al., 2019), then the GLUE sweep.

  # phase 1: 900k steps of 256 x 128 tokens
  fmjax train --config=experiments/bert_base/config.py:phase=1 --workdir=gs://BUCKET/bert_base/phase1
  # phase 2: 100k steps of 256 x 512 tokens, starting from phase 1's params
  fmjax train --config=experiments/bert_base/config.py:phase=2 \
      --config.init_from=gs://BUCKET/bert_base/phase1 --workdir=gs://BUCKET/bert_base/phase2
  # GLUE: tasks x learning rates x seeds, fine-tuned from phase 2 (glue.py)
  fmjax sweep --config=experiments/bert_base/glue.py --print_commands \
      --config.init_from=gs://BUCKET/bert_base/phase2 --workdir=gs://BUCKET/bert_base/glue

The rate follows one schedule over all 1M steps, as in the paper: 10k steps of warmup to 1e-4, then
linear decay to 0 at step 1M. Phase 1 runs its first 900k steps (it decays to the rate at 900k);
phase 2 starts from that rate and decays to 0 over the last 100k, with no warmup.

Data: English Wikipedia from TFDS (the paper also used BooksCorpus, which TFDS does not carry).
"""

import os

from fmjax import config_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOTAL_STEPS, PHASE1_STEPS, WARMUP, PEAK_LR = 1_000_000, 900_000, 10_000, 1e-4
# The 1M-step schedule's rate at the end of phase 1, as a fraction of the peak.
PHASE1_END_RATIO = (TOTAL_STEPS - PHASE1_STEPS) / (TOTAL_STEPS - WARMUP)


def get_config(arg: str = "phase=1"):
  _, kv = config_lib.parse_arg(arg)
  phase = kv.get("phase", "1")
  if phase not in ("1", "2"):
    raise config_lib.ConfigError(f"phase={phase!r}: use phase=1 (seq 128) or phase=2 (seq 512)")
  c = config_lib.load_module(os.path.join(_ROOT, "configs", "bert.py")).get_config("base")
  c.name = f"bert_base_phase{phase}"
  c.data.update(dataset="wikipedia/20230601.en", train_split="train[:99%]", eval_split="train[99%:]",
                feature="text", data_dir="gs://BUCKET/tfds")
  c.train.batch_size = 256
  if phase == "1":
    c.data.update(seq_len=128, max_predictions=20)
    c.train.steps = PHASE1_STEPS
    # Linear from the peak at WARMUP to PEAK_LR * PHASE1_END_RATIO at 900k: the 1M schedule's line.
    c.optim.update(lr=PEAK_LR, warmup_steps=WARMUP, schedule="linear", min_lr_ratio=PHASE1_END_RATIO)
  else:
    c.data.update(seq_len=512, max_predictions=80)
    c.train.steps = TOTAL_STEPS - PHASE1_STEPS
    # The schedule's tail: from phase 1's last rate down to 0, no second warmup.
    c.optim.update(lr=PEAK_LR * PHASE1_END_RATIO, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
  c.checkpoint.update(every_steps=10_000, keep=3, keep_period=100_000)
  return c
