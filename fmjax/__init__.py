"""fmjax: pretrain and fine-tune BERT- and GPT-style foundation models in JAX/Flax NNX."""

__version__ = "0.1.0"
