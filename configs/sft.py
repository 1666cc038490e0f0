"""GPT supervised fine-tuning (SFT) or continued pretraining from a `fmjax train` checkpoint.

  fmjax sft --config=configs/sft.py --config.init_from=workdirs/gpt_tiny \
      --config.data.files=train.jsonl --workdir=workdirs/sft
  fmjax sft --config=configs/sft.py --config.init_from=workdirs/gpt_tiny \
      --config.data.files=train.jsonl --config.finetune.peft=lora --workdir=workdirs/sft_lora
  fmjax generate --workdir=workdirs/sft --prompt="..." --temperature=0
  fmjax generate --workdir=workdirs/sft --prompt="..." --chat   # trained on conversations: a reply
  fmjax eval --workdir=workdirs/sft          # completion-token loss on the held-out rows
  fmjax export --workdir=workdirs/sft_lora --out=hf_sft   # LoRA merged into the kernels

data.files: JSONL rows {"prompt": ..., "completion": ...}; the loss is on the completion tokens
(and the EOS after them) only. Rows without a prompt are continued pretraining on their text.
Rows {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]} are conversations,
written in the tokenizer's chat template (sft.chat_template overrides it; fmjax's own tokenizers take a
built-in one) and trained on each assistant message and the end of turn after it.
The model's shape and the tokenizer are taken from init_from, so only training settings matter
here. Arg: a size of configs/gpt.py (tiny default; its model used only without init_from). A
data.seq_len longer than the init_from model's max_len (e.g. :small's 1024 on a tiny GPT of 256)
is lowered to that max_len, and the log says so: the pretrained position table cannot grow.

finetune.peft: none (every parameter trains) | lora | adapter | bitfit, with finetune.lora_rank,
lora_alpha, lora_targets, adapter_dim, adapter_targets as in configs/finetune_cls.py (`head`
has no head to train here: GPT's output layer is its token table, or Llama's pretrained lm_head).
LoRA and adapters start where init_from's model is (their update is 0) and run unrolled
(model.scan_layers=false).
Few trainable parameters usually take a larger rate: raise optim.lr with them (3x is a start).
"""

import os

from fmjax import config_lib

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str = "tiny"):
  c = config_lib.load_module(os.path.join(_HERE, "gpt.py")).get_config(arg or "tiny")
  c.name = c.name.replace("gpt_", "sft_gpt_")
  c.init_from = ""  # a `fmjax train` workdir (GPT): its latest params are the starting point
  c.data.dataset = "text_files"  # SFT reads data.files itself as JSONL: (prompt, completion) rows, conversations
  c.data.files = ""
  c.sft = config_lib.sft_section()
  c.finetune = config_lib.peft_section()  # PEFT, as classification's finetune section (its pooling and head aside)
  c.model.dropout = 0.0
  c.train.update(batch_size=16, steps=200, log_every=10, eval_every=50)
  # A fine-tuning schedule: a lower rate than pretraining, short warmup, linear decay to 0.
  c.optim.update(lr=c.optim.lr / 3, schedule="linear", warmup_steps=10, min_lr_ratio=0.0)
  c.checkpoint.update(every_steps=100, keep=2)
  return c
