"""Keeping candidate codes out of the dead letters, whatever shape the body came in.

A confirm's candidate may be the real code, and a rejected confirm does not use the code up.
For a body parked under any routing key but ``code.issue``:

- JSON object with a top-level ``code`` string: every ``code`` member, at any depth, is
  replaced. The producer said where the candidate is; the rest stays readable.
- Other JSON (a list, a nested or misspelled ``code``, a missing one): the ``code`` members
  and every run of four or more digits in any key or value are replaced.
- Not JSON (not UTF-8, a trailing comma, cut off): the same on the raw bytes read as
  latin-1, so every other byte stays as it came.
- Compressed or binary (a ``content_encoding`` such as gzip, a compression format's magic
  bytes, or mostly control bytes): no digit would show, so the whole body is replaced.

Codes are at least six digits (``MIN_CODE_LENGTH``); runs of four, also with one space, dash,
dot, underscore or slash between digits, leave a margin for how a user typed one. A
``code.issue`` body has no candidate, so only its ``code`` members go (a confirm sent to the
wrong key); its phone numbers and TTLs stay.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from contracts.topology import ISSUE_ROUTING_KEY

MARK = "[redacted]"
_MAX_DEPTH = 64

# A digit as text: any Unicode digit, runs joined by at most one separator.
_DIGITS = re.compile(r"\d(?:[ \t._/-]?\d){3,}")
# In raw bytes read as latin-1: a digit is ASCII or a JSON \u escape of one, then the NULs
# of a UTF-16 or UTF-32 encoding (bounded, so the pattern cannot backtrack far). Another
# \u escape is kept when no digit follows it: its hex digits are not a code.
_RAW_DIGIT = r"(?:[0-9]|\\u003[0-9])\x00{0,3}"
_RAW_DIGITS = re.compile(
    r"(?P<escape>\\u(?!003[0-9])[0-9a-f]{4}(?![0-9]))"
    rf"|{_RAW_DIGIT}(?:(?:[ \t._/-]\x00{{0,3}})?{_RAW_DIGIT}){{3,}}",
    re.IGNORECASE,
)
# A "code" member in text that is not JSON: the key quoted or not, any case, \u escapes
# allowed; the value a string (possibly unterminated) in either quote, or a bare token.
_RAW_KEY = "".join(rf"(?:{c}|\\u00{ord(c):02x}|\\u00{ord(c.upper()):02x})" for c in "code")
_RAW_CODE_MEMBER = re.compile(
    rf"(?P<key>(?<![\w\\])[\"']?{_RAW_KEY}[\"']?\s*[:=]\s*)"
    r"(?P<value>\"(?:[^\"\\]|\\.)*\"?|'(?:[^'\\]|\\.)*'?|[^\s,}\]]+)",
    re.IGNORECASE,
)


class _TooDeep(Exception):
    pass


def redact(
    routing_key: str, body: bytes, content_encoding: str | None = None
) -> tuple[bytes, bool]:
    """The body safe to park, and whether anything in it was replaced (``MARK`` alone, when
    the body was compressed or binary)."""
    scrub_digits = routing_key != ISSUE_ROUTING_KEY
    if scrub_digits and body and (_encoded(content_encoding) or _looks_binary(body)):
        return MARK.encode(), True
    try:
        data = orjson.loads(body)
        cleaned = _clean(data, scrub_digits and not _names_its_candidate(data), 0)
    except (orjson.JSONDecodeError, _TooDeep):
        return _clean_raw(body, scrub_digits)
    if cleaned == data and not _repeats_a_key(body):
        return body, False
    # Written anew also when only a key repeats: a reader keeps the last of two equal keys,
    # so the earlier one, which may hold the code, is in the bytes but not in ``data``.
    return orjson.dumps(cleaned), True


def _repeats_a_key(body: bytes) -> bool:
    """Whether any object in ``body`` (JSON that orjson has read) has a key twice."""
    repeated = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal repeated
        repeated = repeated or len({key for key, _ in items}) < len(items)
        return dict(items)

    try:
        json.loads(body, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return True  # read differently than orjson did: rewrite, to be safe
    return repeated


_PLAIN_ENCODINGS = {"", "identity", "utf-8", "utf8", "us-ascii", "ascii"}
# gzip, zlib (default, best and no compression), bzip2, xz, zstd, zip
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"\x78\x9c", b"\x78\xda", b"\x78\x01", b"BZh",
                     b"\xfd7zXZ", b"\x28\xb5\x2f\xfd", b"PK\x03\x04")  # fmt: skip
_CONTROL = frozenset(range(0x20)) - {0x00, 0x09, 0x0A, 0x0D} | {0x7F}


def _encoded(content_encoding: str | None) -> bool:
    return (content_encoding or "").strip().lower() not in _PLAIN_ENCODINGS


def _looks_binary(body: bytes) -> bool:
    """Compressed, or mostly control bytes (NUL aside: UTF-16 and UTF-32 text has many)."""
    if body.startswith(_COMPRESSED_MAGIC):
        return True
    controls = sum(1 for byte in body if byte in _CONTROL)
    return controls * 20 > len(body)


def _names_its_candidate(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("code"), str) and bool(data["code"])


def _is_code_key(key: str) -> bool:
    return key.strip().casefold() == "code"


def _clean(value: Any, scrub_digits: bool, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise _TooDeep
    if isinstance(value, dict):
        return {
            _scrub(key) if scrub_digits else key: (
                MARK if _is_code_key(key) else _clean(item, scrub_digits, depth + 1)
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_clean(item, scrub_digits, depth + 1) for item in value]
    if not scrub_digits or isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return _scrub(value)
    return MARK if _DIGITS.search(repr(value)) else value


def _scrub(text: str) -> str:
    return _DIGITS.sub(MARK, text)


def _clean_raw(body: bytes, scrub_digits: bool) -> tuple[bytes, bool]:
    text = body.decode("latin-1")
    cleaned = _RAW_CODE_MEMBER.sub(lambda m: f'{m["key"]}"{MARK}"', text)
    if scrub_digits:
        cleaned = _RAW_DIGITS.sub(lambda m: m["escape"] or MARK, cleaned)
    if cleaned == text:
        return body, False
    return cleaned.encode("latin-1"), True
