"""fmjax's data layer: datasets -> tokenizer -> packed cache -> step-indexed sharded batches.

  tok = get_tokenizer(config)         # trained offline on the train split (cached), or HF files
  path = prepare(config)              # tokenise, pack and cache train and eval (idempotent)
  loader = make_loader(config, "train", sharding)
  for step, batch in loader.iterate(start_step): ...

TensorFlow / TFDS are imported only when a dataset is read, so this package imports without them.
"""

from fmjax.data.loader import Loader, PackedSplit, held_out_loaders, host_rows, make_loader, unigram_baseline
from fmjax.data.packing import cache_path, prepare
from fmjax.data.tokenizers import (CORPUS_KEYS, RUN_TOKENIZER, Tokenizer, get_tokenizer, load_hf, load_tokenizer,
                                   resolve_tokenizer_path, save_run_tokenizer)

__all__ = ["CORPUS_KEYS", "Loader", "PackedSplit", "RUN_TOKENIZER", "Tokenizer", "cache_path", "get_tokenizer", "held_out_loaders", "host_rows", "load_hf",
           "load_tokenizer", "make_loader", "prepare", "resolve_tokenizer_path", "save_run_tokenizer",
           "unigram_baseline"]
