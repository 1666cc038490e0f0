"""Sequence classification / regression fine-tuning of a pretrained BERT (or GPT).

  fmjax finetune --config=configs/finetune_cls.py:task=pydoc_family \
      --config.init_from=workdirs/bert_tiny --workdir=workdirs/ft_pydoc
  fmjax finetune --config=configs/finetune_cls.py:task=glue/sst2,size=base,peft=lora \
      --config.init_from=... --workdir=...
  fmjax sweep --config=configs/finetune_cls.py --config.init_from=workdirs/bert_tiny --workdir=workdirs/ft_sweep

Args (comma list): task=pydoc_family | glue/<name> | csv | jsonl; model=bert|gpt; size=tiny|mini|small|
base|...; peft=none|lora|adapter|bitfit|head; llama (with model=gpt, for the trunk of a
`configs/gpt.py:SIZE,llama` run: its SwiGLU width differs from GPT-2's MLP at every size but tiny). The
model settings must match the init_from run (its family, size and llama or not); its tokenizer settings
are taken over automatically. Give the PEFT method as the `peft=` arg: it also sets the learning rate for
it (3x, as few trainable parameters take larger steps), which `--config.finetune.peft=...` alone leaves at
full fine-tuning's.
"""

import os

from fmjax import config_lib

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str = "task=pydoc_family"):
  flags, kv = config_lib.parse_arg(arg)
  unknown = sorted(set(kv) - {"task", "model", "size", "peft"}) + [f for f in flags if f != "llama"]
  if unknown:
    raise config_lib.ConfigError(f"unknown finetune_cls config arg(s) {unknown}; use task=, model=, size=, peft=, "
                                 "llama")
  family = kv.get("model", "bert")
  if family not in ("bert", "gpt"):
    raise config_lib.ConfigError(f"model={family!r} is not one of ['bert', 'gpt']")
  llama = "llama" in flags
  if llama and family != "gpt":
    raise config_lib.ConfigError("llama is a decoder's architecture: give it with model=gpt")
  size = kv.get("size", "tiny")
  c = config_lib.load_module(os.path.join(_HERE, f"{family}.py")).get_config(size + (",llama" if llama else ""))
  task = kv.get("task", "pydoc_family")
  c.name = f"finetune_{task.replace('/', '_')}_{c.name}"
  c.init_from = ""  # a `fmjax train` workdir: its trunk is loaded, the head is new
  c.task = config_lib.task_section(task)
  c.finetune = config_lib.finetune_section(family, kv.get("peft", "none"))
  # BERT's fine-tuning dropout, on hidden states and attention probabilities alike (training then
  # runs the xla attention kernel; model.attention_dropout=0 keeps the fused one).
  c.model.update(dropout=0.1, attention_dropout=0.1)
  c.data.seq_len = 128
  c.train.update(batch_size=32, steps=300, log_every=25, eval_every=100, seed=0)
  # BERT's fine-tuning recipe (Devlin et al., 2019): small rate, 10% warmup (of these 300 steps: set
  # optim.warmup_steps with train.steps), linear decay to 0.
  c.optim.update(lr=1e-3 if size in ("tiny", "mini") else 3e-5, schedule="linear", warmup_steps=30,
                 min_lr_ratio=0.0, weight_decay=0.01, clip_norm=1.0)
  if c.finetune.peft != "none":
    c.optim.lr = c.optim.lr * 3  # few trainable parameters take larger steps
  c.checkpoint.update(every_steps=0, keep=1)
  return c


def get_sweep():
  """Learning rates x seeds on the task of `--config` (default pydoc_family), mean ± std over seeds
  (`fmjax sweep` writes finetune.md). A sweep over tasks adds `{"config": ["task=sst2", ...]}`;
  the other args of `--config` (model=, peft=) stay in every run. The rates suit tiny and mini models;
  BERT-base on GLUE has its own sweep, experiments/bert_base/glue.py."""
  from fmjax import sweep
  return [{"command": "finetune", **e} for e in sweep.product({"optim.lr": [3e-4, 1e-3]}, {"train.seed": [0, 1, 2]})]
