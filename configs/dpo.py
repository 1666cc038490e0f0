"""DPO (Direct Preference Optimization) of a GPT from an SFT or pretraining run (`fmjax.dpo`).

  fmjax dpo --config=configs/dpo.py --config.init_from=workdirs/sft \
      --config.data.files=prefs.jsonl --workdir=workdirs/dpo
  fmjax dpo --config=configs/dpo.py --config.init_from=workdirs/sft \
      --config.data.files=prefs.jsonl --config.finetune.peft=lora --workdir=workdirs/dpo_lora
  fmjax generate --workdir=workdirs/dpo --prompt="..." --chat   # trained on conversations: a reply
  fmjax eval --workdir=workdirs/dpo          # DPO loss and rewards on the held-out pairs

data.files: JSONL rows {"prompt": ..., "chosen": ..., "rejected": ...}: text, or lists of messages as Hugging Face
preference datasets hold them (the prompt's conversation and each reply's assistant message; or chosen and
rejected alone, whole conversations whose shared first messages are the prompt), written in the tokenizer's chat
template as SFT writes conversations (dpo.chat_template overrides it). The reference model is init_from's: DPO
usually starts from an SFT run on the same kind of prompts.

train.batch_size counts rows of data.seq_len tokens, as SFT's: half hold chosen replies and half the rejected
replies of the same pairs (several pairs to a row pair when dpo.pack), so it must divide by 2 x train.grad_accum.
The model's shape and the tokenizer come from init_from. Arg: a size of configs/gpt.py (tiny default; its model
used only without init_from). finetune.peft: none | lora | adapter | bitfit, as in configs/sft.py; the reference
is the same init_from model under each.
"""

import os

from fmjax import config_lib

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str = "tiny"):
  c = config_lib.load_module(os.path.join(_HERE, "gpt.py")).get_config(arg or "tiny")
  c.name = c.name.replace("gpt_", "dpo_gpt_")
  c.init_from = ""  # a `fmjax sft` (or `fmjax train`) workdir (GPT): the policy's start and the reference model
  c.data.dataset = "text_files"  # DPO reads data.files itself as JSONL preference pairs
  c.data.files = ""
  c.dpo = config_lib.dpo_section()  # beta 0.1, label smoothing 0 (the paper's DPO), keys, held-out split
  c.finetune = config_lib.peft_section()  # PEFT, as SFT's
  # The policy's forward must be the reference's at step 0 (rewards exactly 0): no dropout.
  c.model.update(dropout=0.0, attention_dropout=0.0)
  c.train.update(batch_size=16, steps=200, log_every=10, eval_every=50)
  # DPO moves a model far less than SFT does: a tenth of configs/sft.py's rate (Zephyr-7B's DPO used 5e-7),
  # a warmup of a tenth of the run, linear decay to 0.
  c.optim.update(lr=c.optim.lr / 30, schedule="linear", warmup_steps=20, min_lr_ratio=0.0)
  c.checkpoint.update(every_steps=100, keep=2)
  return c
