"""Chat templates: conversations written as the model's own template writes them, tokenised for SFT and chat.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`. Its text
is what a Jinja chat template renders, as transformers' `apply_chat_template` renders it: a sandboxed
environment with trim_blocks and lstrip_blocks, `raise_exception`, `tojson` and `strftime_now`, given
`messages`, `add_generation_prompt`, `bos_token` and `eos_token` (the texts of `Tokenizer.bos_id` and
`eos_id`, which `fmjax export` writes as the tokenizer's) and `tools` / `documents` (None). The template
is the tokenizer's own (`Tokenizer.chat_template`: a Hugging Face directory's chat_template.jinja or
tokenizer_config.json `chat_template`, kept in a run's tokenizer/), else BUILTIN_TEMPLATE, plain text that
opens with the BOS (the EOS of fmjax's own tokenizers, which opens every document) and ends each assistant
turn with EOS:

  <bos>System:\\n{content}\\nUser:\\n{content}\\nAssistant:\\n{content}<eos>User:\\n{content}\\nAssistant:\\n...

Token ids are transformers' own: the rendered text encoded whole, with the template's markup read as its
special tokens (`<|eot_id|>`, `<|im_start|>`); no opener is added, since the template writes its own BOS if
it has one. Text is only ever text (`Tokenizer.encode`): where a message's content spells a special token's
name, the text between the template's own special tokens is encoded with `encode`, so the name stays
characters and a user's message never ends a turn.

The tokens an assistant writes (`encode`'s `trained`) are each assistant message's content and the end of
its turn after it: the template's text up to and including the first special token there (`<|eot_id|>`,
`<|im_end|>`, the built-in template's EOS), what a model must learn to emit to stop.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re
from typing import Sequence

import jinja2
import numpy as np
from jinja2 import ext, sandbox

from fmjax import files
from fmjax.config_lib import ConfigError

ROLES = ("system", "user", "assistant")
BUILTIN_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ (message['role'] | capitalize) + ':\\n' + message['content'] }}"
    "{{ eos_token if message['role'] == 'assistant' else '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:\\n' }}{% endif %}")
# Stands in for message i's content in a second rendering, which tells the template's text from the messages':
# private-use characters, which no template writes.
_SLOT = re.compile("\ue000([0-9]+)\ue001")


def _slot(i: int) -> str:
  return f"\ue000{i}\ue001"


# ----------------------------------------------------------------------------- rendering


class _Generation(ext.Extension):
  """`{% generation %} ... {% endgeneration %}`, which some templates put around an assistant's text for
  transformers' assistant masks: the text as it is (fmjax finds an assistant's tokens itself)."""
  tags = {"generation"}

  def parse(self, parser):
    next(parser.stream)
    return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # Jinja's own tojson escapes HTML characters (< as \u003c), which no model was trained on.
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format_):
  return datetime.datetime.now().strftime(format_)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
  """`source` compiled in a sandbox (templates come from model repositories: untrusted code)."""
  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[ext.loopcontrols, _Generation])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
  try:
    return env.from_string(source)
  except jinja2.TemplateSyntaxError as e:
    raise ConfigError(f"the chat template does not parse ({e.message}, line {e.lineno}); fix it, or set "
                      "sft.chat_template to one that does") from None


def template_of(tok) -> str:
  """The chat template `tok` renders conversations with: its own, else BUILTIN_TEMPLATE."""
  return tok.chat_template if tok.chat_template is not None else BUILTIN_TEMPLATE


def render(tok, messages: Sequence[dict], template: str, *, add_generation_prompt: bool = False) -> str:
  """The text of a conversation in `template`, as transformers' `apply_chat_template(..., tokenize=False)`."""
  token = lambda i: "" if i is None else tok.hf.id_to_token(i)
  try:
    return compile_template(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, tools=None, documents=None,
        bos_token=token(tok.bos_id), eos_token=token(tok.eos_id))
  except jinja2.TemplateError as e:  # raise_exception("Conversation roles must alternate ..."), say
    raise ConfigError(f"the chat template refuses the conversation: {e}") from None


def read_template(spec: str, key: str = "sft.chat_template") -> str:
  """A chat template given as its Jinja source, a file holding one, or a Hugging Face tokenizer directory."""
  if "{{" in spec or "{%" in spec:
    template = spec
  else:
    path = os.path.expanduser(spec)
    if files.isdir(path):
      from fmjax.data import tokenizers
      template = tokenizers._read_chat_template(files.local_copy(path))  # pylint: disable=protected-access
      if template is None:
        raise ConfigError(f"{key}={spec!r} is a directory without a chat template (chat_template.jinja, or "
                          "chat_template in tokenizer_config.json); pass the template or a file holding it")
    elif files.exists(path):
      try:
        template = files.read_text(path)
      except UnicodeDecodeError:
        from fmjax.data import sources
        raise sources.not_utf8(files.local_copy(path)) from None
    else:
      raise ConfigError(f"{key}={spec!r} is neither a Jinja template ({{% ... %}}, {{{{ ... }}}}) nor a file; pass "
                        "the template or the path of a file holding it")
  compile_template(template)  # one that does not parse is refused before any work
  return template


def check_messages(messages, *, needs_assistant: bool = True) -> str | None:
  """What is wrong with a conversation as SFT reads it (None: nothing), said as the end of a sentence.
  `needs_assistant=False`: a prompt's messages, which need no assistant message."""
  if not isinstance(messages, list) or not messages:
    what = "an empty list" if messages == [] else "null" if messages is None else f"a JSON {type(messages).__name__}"
    return f"holds {what}, not a list of messages"
  for j, m in enumerate(messages):
    if not isinstance(m, dict):
      return f"has message {j} as a JSON {type(m).__name__}, not an object with a role and a content"
    if m.get("role") not in ROLES:
      return f"has message {j} of role {m.get('role')!r}; the roles are {', '.join(ROLES)}"
    if not isinstance(m.get("content"), str):
      return f"has message {j} whose content is {json.dumps(m.get('content'))[:40]}, not text"
  if needs_assistant and not any(m["role"] == "assistant" for m in messages):
    return "has no assistant message, so nothing to learn"
  return None


# ----------------------------------------------------------------------------- tokenising


def _content_spans(tok, messages: Sequence[dict], template: str, add_generation_prompt: bool
                   ) -> tuple[str, list[tuple[int, int, int]]]:
  """(text, slots): the rendered conversation and where each message's content lies in it, as
  (start, end, message index), found by rendering it again with markers for the contents.

  A template may trim a content (Llama 3's `| trim`): a slot holds what the text has there, the content
  or the content stripped. Any other change to it is refused: the slots would not be known.
  """
  text = render(tok, messages, template, add_generation_prompt=add_generation_prompt)
  marked = render(tok, [{**m, "content": _slot(i)} for i, m in enumerate(messages)], template,
                  add_generation_prompt=add_generation_prompt)
  pieces = _SLOT.split(marked)  # template text, message index, template text, ...
  slots, at = [], len(pieces[0])
  ok = text.startswith(pieces[0])
  for k in range(1, len(pieces) if ok else 0, 2):
    i, after = int(pieces[k]), pieces[k + 1]
    content = messages[i]["content"]
    seen = next((c for c in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip()))
                 if text.startswith(c + after, at)), None)
    if seen is None:
      ok = False
      break
    slots.append((at, at + len(seen), i))
    at += len(seen) + len(after)
  if not ok or at != len(text):
    raise ConfigError("the chat template changes a message's text other than by trimming it, so fmjax cannot tell "
                      "the messages from the template's markup; set sft.chat_template to one that writes each "
                      "content as it is")
  return text, slots


def _in_spans(offsets, spans) -> np.ndarray:
  """Whether each token, at characters [start, end), overlaps any of `spans` [a, b); a token whose span is empty
  (its offsets trimmed) by where it starts."""
  tokens, spans = np.asarray(offsets, np.int64).reshape(-1, 1, 2), np.asarray(spans, np.int64).reshape(1, -1, 2)
  start, end, a, b = tokens[..., 0], tokens[..., 1], spans[..., 0], spans[..., 1]
  return np.where(end > start, (start < b) & (a < end), (a <= start) & (start < b)).any(axis=1)


def _tokenise(tok, text: str, slots) -> tuple[list[int], list[tuple[int, int]]]:
  """Ids of `text` with each one's character span: transformers' (the text whole, special tokens read as
  tokens), unless a content spells a special token; then the text between the template's own special
  tokens is read with `Tokenizer.encode`, which keeps names as characters."""
  enc = tok.hf.encode(text, add_special_tokens=False)
  special = np.isin(np.asarray(enc.ids, np.int64), list(tok.added_special_ids))
  in_content = _in_spans(enc.offsets, [(a, b) for a, b, _ in slots])
  if not (special & in_content).any():
    return list(enc.ids), list(enc.offsets)
  ids, offsets, at = [], [], 0
  for k in np.flatnonzero(special & ~in_content):  # the template's own special tokens
    (s, e), run = enc.offsets[k], text[at:enc.offsets[k][0]]
    run_ids, run_offsets = tok.encode_with_offsets(run)
    ids += [*run_ids, enc.ids[k]]
    offsets += [*((at + a, at + b) for a, b in run_offsets), (s, e)]
    at = e
  run_ids, run_offsets = tok.encode_with_offsets(text[at:])
  return ids + run_ids, offsets + [(at + a, at + b) for a, b in run_offsets]


def _encode(tok, messages: Sequence[dict], template: str, add_generation_prompt: bool = False,
            respond_from: int = 0):
  """(ids, offsets, turns): turns holds (content start, content end, turn end) in characters for each
  assistant content from message `respond_from` on, the turn's end being that of the first special token the
  template writes after the content and before the next message's (none: the content's end)."""
  text, slots = _content_spans(tok, messages, template, add_generation_prompt)
  ids, offsets = _tokenise(tok, text, slots)
  specials = np.flatnonzero(np.isin(np.asarray(ids, np.int64), list(tok.added_special_ids)))
  starts = sorted(a for a, _, _ in slots)
  turns = []
  for a, b, i in slots:
    if messages[i]["role"] != "assistant" or i < respond_from:
      continue
    before = next((s for s in starts if s >= b and s > a), len(text))  # the next content, where this turn is over
    end = next((e for s, e in (offsets[k] for k in specials) if b <= s and e <= before), b)
    turns.append((a, b, end))
  return ids, offsets, turns


def encode(tok, messages: Sequence[dict], template: str, respond_from: int = 0) -> tuple[list[int], list[int]]:
  """(ids, trained) of a conversation: its tokens in `template`, and 1 for each token an assistant writes
  (its messages' contents and the end of turn after each), 0 for the rest (system, user, role headers).
  `respond_from`: only the assistant messages from that index on are trained (a preference pair's reply,
  after a prompt that may hold assistant turns of its own)."""
  ids, offsets, turns = _encode(tok, messages, template, respond_from=respond_from)
  return ids, _in_spans(offsets, [(a, end) for a, _, end in turns]).astype(int).tolist()


def encode_prompt(tok, prompt: str, template: str) -> list[int]:
  """Ids that ask for a reply to `prompt`: a one-user-message conversation with the generation prompt."""
  return _encode(tok, [{"role": "user", "content": prompt}], template, add_generation_prompt=True)[0]


def end_of_turn(tok, template: str) -> list[int]:
  """The ids `template` writes after an assistant's message to end its turn (empty: none)."""
  ids, offsets, turns = _encode(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                template)
  (_, content_end, end), = turns
  return [i for i, (s, e) in zip(ids, offsets) if content_end <= s and e <= end]


def end_of_turn_id(tok, template: str) -> int | None:
  """The special token that ends an assistant's turn in `template` (`<|eot_id|>`, `<|im_end|>`; the EOS of the
  built-in template), where that end is one special token; else None (also where the template refuses a
  conversation of a user's message and an assistant's)."""
  try:
    ids = end_of_turn(tok, template)
  except ConfigError:
    return None
  return ids[0] if len(ids) == 1 and ids[0] in tok.added_special_ids else None
