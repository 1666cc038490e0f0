"""PII scrubbing: what is replaced, what is left alone, and the counts written beside the cache."""

import json
import os

import pytest

from fmjax import config_lib
import fmjax.data as data
from fmjax.data import pii

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("text, expected, kind", [
    ("mail bob.smith+tag@example.co.uk today", "mail <EMAIL> today", "EMAIL"),
    ("call +1 (555) 123-4567 now", "call <PHONE> now", "PHONE"),
    ("or 555.123.4567.", "or <PHONE>.", "PHONE"),
    ("+44 20 7946 0958", "<PHONE>", "PHONE"),
    ("+33 1 23 45 67 89 or +15551234567", "<PHONE> or <PHONE>", "PHONE"),
    ("toll-free 1-800-555-0199, (020) 7946 0958", "toll-free <PHONE>, <PHONE>", "PHONE"),
    ("mail josé.pérez@example.com", "mail <EMAIL>", "EMAIL"),
    ("联系support@example.com", "联系<EMAIL>", "EMAIL"),  # no spaces between the words before it
    ("+44 (0)20 7946 0958, +1.555.123.4567 or +91-9876543210", "<PHONE>, <PHONE> or <PHONE>", "PHONE"),
    ("иван.петров@example.ru, 张伟@example.cn; メールはinfo@example.jpまで",
     "<EMAIL>, <EMAIL>; メールは<EMAIL>まで", "EMAIL"),
    ("card 4111 1111 1111 1111 ok", "card <CARD> ok", "CARD"),
    ("card 4012-8888-8888-1881", "card <CARD>", "CARD"),
    ("host 192.168.0.1:80", "host <IP_ADDRESS>:80", "IP_ADDRESS"),
    ("v6 2001:db8::ff00:42:8329 and fe80::1", "v6 <IP_ADDRESS> and <IP_ADDRESS>", "IP_ADDRESS"),
])
def test_scrub_replaces(text, expected, kind):
  out, counts = pii.scrub(text)
  assert out == expected
  assert set(counts) == {kind} and counts[kind] == expected.count(pii.PLACEHOLDERS[kind])


@pytest.mark.parametrize("text", [
    "Python 3.11.7 was released on 2023-12-04.", "slice a[1::2] and b[::-1]", "999.1.1.1 is no address",
    "card 4111 1111 1111 1112 fails Luhn", "port 8080, pid 12345678", "x = 1.5e-10; y = 3 * 4",
    "see section 1.2.3.4.5 of the spec",
    # Lists of numbers are not phone numbers, and the decimals of a number are not a card.
    "the years 1990 1995 2000", "sizes 100 200 300 bytes", "subnet 192.168.100", "555-1234",
    "0.1 + 0.2 gives 0.30000000000000004 and 4111111111111111.5 is a float",
    "signed: +3.140000, +000000120, x = +1234567, +2023-12-04, +1 200 000",
    "batch sizes 128 256-1024, hidden 512 768-3072",
])
def test_scrub_leaves_ordinary_text(text):
  assert pii.scrub(text) == (text, {})


def test_no_float_is_taken_for_a_card():
  """The digits after a decimal point pass the Luhn check one time in ten."""
  rng = __import__("random").Random(0)
  floats = [repr(rng.random()) for _ in range(2000)]
  assert [f for f in floats if pii.scrub(f)[1]] == []


def test_scan_totals():
  counts = pii.scan(["a@b.org and c@d.com", "10.0.0.1", "nothing"])
  assert counts == {"EMAIL": 2, "IP_ADDRESS": 1}


def test_prepare_scrubs_and_writes_counts(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  filler = "some ordinary words about tokens and models and data " * 4
  docs = [f"{filler} contact user{i}@example.com or 192.168.1.{i} {filler}" for i in range(40)]
  (corpus / "a.txt").write_text("\n\n".join(docs))
  config = config_lib.load_module(os.path.join(HERE, "..", "configs", "bert.py")).get_config("tiny")
  config.data.update(dataset="text_files", files=str(corpus / "*.txt"), cache_dir=str(tmp_path / "cache"),
                     seq_len=32, pii_scrub=True, max_predictions=5)
  config.data.tokenizer.vocab_size = 300
  path = data.prepare(config)
  counts = json.load(open(os.path.join(path, "pii_counts.json")))
  assert counts["train"]["EMAIL"] + counts["eval"]["EMAIL"] == 40
  assert counts["train"]["IP_ADDRESS"] + counts["eval"]["IP_ADDRESS"] == 40
  tok = data.load_tokenizer(os.path.join(path, "tokenizer"))
  email = tok.hf.token_to_id("<EMAIL>")
  assert email is not None and email not in tok.special_ids  # one token, and maskable like any word
  rows = data.make_loader(config, batch_size=4).data.rows(__import__("numpy").arange(8))["tokens"]
  text = " ".join(tok.decode(r) for r in rows)
  assert "<EMAIL>" in text and "example" not in text and "192" not in text
