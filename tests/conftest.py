"""Test setup: 8 fake CPU devices, so sharding and multi-host logic run on one CPU.

XLA's CPU backend spends most of a tiny model's test time compiling; the tests compare numbers,
not speed, so they compile at optimisation level 0 (about half the time) and with XLA's older
elemental emitters rather than its MLIR fusion emitters (about 40% less compile time again).
Commands that tests run as subprocesses inherit these flags (some with a device count of their own).
"""

import os
import re

# The user's own flags (an xdist worker's are its controller's, already these), less any device count.
_GIVEN_FLAGS = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()


def xla_flags(devices: int | None = None) -> str:
  """The tests' XLA flags with `devices` fake CPU devices (None: the one CPU device a laptop has), for
  the tests here and the commands they start, so that both compile their programs alike."""
  return " ".join(filter(None, [_GIVEN_FLAGS, f"--xla_force_host_platform_device_count={devices}" if devices else "",
                                "--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"]))


os.environ["XLA_FLAGS"] = xla_flags(8)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

# Many tests compile the same tiny programs; a session-wide persistent cache compiles each once,
# and goes when the session ends.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

_jit_cache = tempfile.mkdtemp(prefix="fmjax_test_jit_")
atexit.register(shutil.rmtree, _jit_cache, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _jit_cache)
os.environ["FMJAX_COMPILATION_CACHE"] = "off"  # commands run as subprocesses compile afresh, as before
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)



import pytest  # noqa: E402


class CudaLowering:
  """What `as_if_on_an_h100` hands a test: the cuDNN kernels a program lowered for CUDA calls."""
  PACKED = {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}  # segment offsets, no mask
  MASKED = {"__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"}  # the mask fallback

  @staticmethod
  def cudnn_calls(traced) -> set[str]:
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.case" not in text and "stablehlo.if" not in text, "a device-side branch syncs the host on a GPU"
    return {c for c in re.findall(r"custom_call @([\w$]+)", text) if c.startswith("__cudnn")}


@pytest.fixture
def tfds_online(monkeypatch):
  """Under `tfds.testing.mock_data` a dataset downloads nothing, but fmjax first checks that an
  unprepared dataset's download hosts resolve (no network here): they do, for these tests."""
  from fmjax.data import sources
  monkeypatch.setattr(sources, "_resolves", lambda host: True)


@pytest.fixture
def as_if_on_an_h100():
  """Lets the cuDNN attention path trace and lower for CUDA on this CPU (nothing runs), as
  `fmjax plan --gpu` does: fmjax compiles for a GPU, and cuDNN's version and compute-capability
  checks pass as on an H100."""
  from fmjax import plan
  if jax.default_backend() == "gpu":
    pytest.skip("a real GPU is here: the GPU tests run the cuDNN path for real")
  with plan.compiling_for_gpu():
    yield CudaLowering()


@pytest.fixture
def traced_steps():
  """Reads a `jax.profiler` trace directory: `(step numbers annotated, events of the jitted train step)`."""
  import glob

  def read(logdir) -> tuple[set[int], int]:
    (path,) = glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb"))
    steps, step_events = set(), 0
    for plane in jax.profiler.ProfileData.from_file(path).planes:
      for line in plane.lines:
        for event in line.events:
          if event.name == "train":
            steps.add(dict(event.stats)["step_num"])
          step_events += "train_step" in event.name
    return steps, step_events
  return read


@pytest.fixture(scope="session")
def framed_tokenizer_dir(tmp_path_factory):
  """A Hugging Face tokenizer directory in Llama's manner: byte-level BPE (320 ids) with <unk>=0, <s>=1 and
  </s>=2, whose tokenizer.json template opens every text with <s>, so that documents are <s> ... </s>."""
  import json

  import pydoc_data.topics
  import tokenizers as hf
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  tok = hf.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(list(pydoc_data.topics.topics.values()), trainers.BpeTrainer(
      vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s>:1 $B:1",
                                                     special_tokens=[("<s>", 1)])
  directory = tmp_path_factory.mktemp("framed_tokenizer")
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
  return directory


# Chat templates as their models ship them: Llama 3's (a BOS first, headers, <|eot_id|>; contents trimmed) and
# ChatML's (Qwen's, with its default system message).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="session")
def chat_tokenizer_dirs(tmp_path_factory):
  """Hugging Face tokenizer directories of chat models, byte-level BPE of 400 ids trained on CPython's docs:
  "llama3" (Llama 3's pre-tokenizer, <|begin_of_text|> put first by its tokenizer.json, its template in
  tokenizer_config.json) and "chatml" (no BOS; its template in chat_template.jinja, as transformers 5 saves it)."""
  import json

  import pydoc_data.topics
  import tokenizers as hf
  from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
  split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")  # Llama 3's
  specials = {"llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>"],
              "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]}
  out = {}
  for name, names in specials.items():
    tok = hf.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=name != "llama3")
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"), byte_level])
                         if name == "llama3" else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(pydoc_data.topics.topics.values()), trainers.BpeTrainer(
        vocab_size=400, special_tokens=names, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    directory = tmp_path_factory.mktemp(f"{name}_tokenizer")
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if name == "llama3":
      tok.post_processor = processors.TemplateProcessing(
          single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
          special_tokens=[("<|begin_of_text|>", 0)])
      config.update(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA3_TEMPLATE)
    else:
      config.update(eos_token="<|im_end|>", pad_token="<|endoftext|>")
      (directory / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    out[name] = directory
  return out
