"""GPT-2-style decoder pretrained with causal LM.

  fmjax train --config=configs/gpt.py:tiny,runlocal --workdir=workdirs/gpt_tiny
  fmjax train --config=configs/gpt.py:small --config.data.dataset=c4/en:3.1.0 --workdir=gs://BUCKET/gpt2

Sizes: tiny, small (GPT-2 124M), medium (350M), large (774M), xl (1.5B).
`runlocal` shrinks batch, sequence and steps so the run finishes on a laptop CPU.
`llama` makes it Llama's architecture at that size: rotary positions, RMSNorm, a SwiGLU MLP of
width 8/3 d (rounded up to a multiple of 256), no biases and an untied output layer
(`fmjax export` writes it as a Hugging Face LlamaForCausalLM). Grouped-query attention is one more
setting: `--config.model.num_kv_heads=4`; Qwen2's architecture adds `--config.model.qkv_bias=true`, Qwen3's
`--config.model.qk_norm=true` (exported as Qwen2ForCausalLM, Qwen3ForCausalLM).
"""

from fmjax import config_lib

SIZES = {  # num_layers, d_model, num_heads
    "tiny": (2, 128, 4),
    "small": (12, 768, 12),
    "medium": (24, 1024, 16),
    "large": (36, 1280, 20),
    "xl": (48, 1600, 25),
}


def get_config(arg: str = "tiny"):
  size, runlocal = config_lib.size_arg(arg, SIZES, "gpt", extra=("llama",))
  llama = "llama" in config_lib.parse_arg(arg)[0]
  c = config_lib.base_config("gpt")
  c.name = f"{'llama' if llama else 'gpt'}_{size}"
  layers, d, heads = SIZES[size]
  c.model.update(num_layers=layers, d_model=d, num_heads=heads, d_ff=4 * d)
  if llama:
    c.model.update(positions="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, tie_embeddings=False,
                   d_ff=-(-8 * d // 3 // 256) * 256)
  if size == "tiny":
    c.model.max_len = 256
    c.data.seq_len = 128
    c.data.tokenizer.vocab_size = 2048
    c.model.vocab_size = 2048
    c.train.update(batch_size=16, steps=600, log_every=25, eval_every=200)
    c.optim.update(lr=3e-3, warmup_steps=50)
  else:
    c.model.vocab_size = 50304  # GPT-2's 50257, padded to a multiple of 128
    c.data.tokenizer.vocab_size = 50257
    c.data.seq_len = 1024
    c.model.dtype = "bfloat16"
    c.model.fused_loss_chunk = 8192  # measured faster and leaner than full logits (benchmarks/README.md)
    c.train.update(batch_size=512, steps=600_000 if size == "small" else 400_000)
    c.optim.update(lr={"small": 6e-4, "medium": 3e-4, "large": 2.5e-4, "xl": 2e-4}[size], warmup_steps=2000)
    if size == "xl":
      # Measured on an H100 (benchmarks/README.md): 48 unrolled layers did not compile within
      # 150 s and 8 x 1024 without remat ran out of memory; scan with dots_no_batch was fastest.
      c.model.update(scan_layers=True, remat="dots_no_batch")
  if runlocal:
    c.model.dtype = "float32"
    c.data.seq_len = min(c.data.seq_len, 128)
    c.train.update(batch_size=8, steps=20, log_every=5, eval_every=10, eval_batches=2)
    c.optim.warmup_steps = 2  # a tenth of the run: the rate reaches optim.lr and decays
    c.checkpoint.every_steps = 10
  return c


def get_sweep():
  """Learning-rate sweep for the tiny model:

    fmjax sweep --config=configs/gpt.py:tiny,runlocal --workdir=workdirs/gpt_sweep
  """
  return [{"optim.lr": lr} for lr in (1e-3, 3e-3, 1e-2)]
