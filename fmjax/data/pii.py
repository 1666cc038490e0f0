"""PII scrubbing: e-mail addresses, phone numbers, IP addresses and card numbers become placeholders.

`scrub(text)` returns the cleaned text and a Counter of what it replaced; `scan(texts)` totals the
counts for a report. Matching is by regular expressions with validity checks (IP ranges, the Luhn
checksum for cards) to keep false positives on ordinary numbers, versions and dates low. It is a
best-effort filter, not a guarantee.
"""

from __future__ import annotations

import collections
import ipaddress
import re
from typing import Iterable

PLACEHOLDERS = {"EMAIL": "<EMAIL>", "CARD": "<CARD>", "IP_ADDRESS": "<IP_ADDRESS>", "PHONE": "<PHONE>"}

# Scripts written without spaces between words (Chinese, Japanese, Korean): a local part is either
# a run of them or a run of other word characters, so an address written straight after a word in
# one of them ("联系support@example.com") does not take that word in.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
_EMAIL = re.compile(rf"(?:(?<![^\W{_CJK}])(?<![.%+-])(?:[^\W{_CJK}]|[.%+-])+|(?<![{_CJK}])[{_CJK}]+)"
                    rf"@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{{2,}}(?![A-Za-z0-9-])")
# 13-19 digits, optionally grouped by single spaces or dashes; not the decimals of a number (0.4111...).
_CARD = re.compile(r"(?<![\w.-])\d(?:[ -]?\d){12,18}(?![\w-]|\.\d)")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# Numbers written as phone numbers:
#   international: a country code (no leading 0), perhaps a trunk or area code in brackets, and
#   digits in up to six groups set apart by spaces, dots or dashes (+44 20 7946 0958,
#   +44 (0)20 7946 0958, +1.555.123.4567, +91-9876543210, +15551234567), 9-15 digits in all;
#   an area code in brackets: (555) 123-4567, (020) 7946 0958;
#   North American 3-3-4 groups joined by one dash or dot throughout: 555-123-4567, 1-800-555-0199.
# Groups set apart by spaces alone without a `+` or brackets are not taken: lists of numbers look
# like that; nor are shorter signed numbers (+3.140000, +1234567, +2023-12-04).
_PHONE = re.compile(
    r"(?<![\w+.-])(?<!\d )"
    r"(?:\+[1-9]\d{0,2}(?:[ .-]?\(\d{1,4}\))?[ .-]?\d{1,10}(?:[ .-]\d{1,10}){0,5}"
    r"|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]\d{3,4}"
    r"|(?:1[.-])?\d{3}(?P<sep>[.-])\d{3}(?P=sep)\d{4})"
    r"(?![\w.]\d|\w|[ -]\d)")


def _luhn_ok(digits: str) -> bool:
  total = 0
  for i, ch in enumerate(reversed(digits)):
    n = int(ch)
    if i % 2:
      n = n * 2 - 9 if n > 4 else n * 2
    total += n
  return total % 10 == 0


def _card(m: re.Match) -> str | None:
  digits = re.sub(r"\D", "", m.group())
  return "CARD" if 13 <= len(digits) <= 19 and len(set(digits)) > 1 and _luhn_ok(digits) else None


def _ipv4(m: re.Match) -> str | None:
  return "IP_ADDRESS" if all(int(p) <= 255 for p in m.group().split(".")) else None


def _ipv6(m: re.Match) -> str | None:
  text = m.group()
  try:
    ipaddress.IPv6Address(text)
  except ValueError:
    return None
  # Python slices like `a[1::2]` are valid IPv6 too: demand some address-like hex groups.
  groups = [g for g in text.split(":") if g]
  return "IP_ADDRESS" if len(groups) >= 3 or any(len(g) >= 3 for g in groups) else None


def _phone(m: re.Match) -> str | None:
  digits = re.sub(r"\D", "", m.group())
  return "PHONE" if (9 if m.group().startswith("+") else 7) <= len(digits) <= 15 else None


# Order matters: cards before phones (a phone pattern can eat part of a card number), IPv4 before phones.
_RULES = ((_EMAIL, lambda m: "EMAIL"), (_CARD, _card), (_IPV4, _ipv4), (_IPV6, _ipv6), (_PHONE, _phone))


def scrub(text: str) -> tuple[str, collections.Counter]:
  """Replaces PII in `text` with placeholders such as `<EMAIL>`; returns (text, counts by kind)."""
  counts = collections.Counter()
  for pattern, classify in _RULES:
    def replace(m, classify=classify):
      kind = classify(m)
      if kind is None:
        return m.group()
      counts[kind] += 1
      return PLACEHOLDERS[kind]
    text = pattern.sub(replace, text)
  return text, counts


def scan(texts: Iterable[str]) -> collections.Counter:
  """Total counts of PII by kind over `texts` (for data reports); the texts are not changed."""
  total = collections.Counter()
  for text in texts:
    total.update(scrub(text)[1])
  return total
