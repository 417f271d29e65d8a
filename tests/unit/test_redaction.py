"""No candidate code reaches the dead letters, whatever shape its command came in."""

from __future__ import annotations

import gzip
import json
import zlib

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.domain.codes import MAX_CODE_LENGTH, MIN_CODE_LENGTH
from worker.redaction import MARK, redact

CODE = "424242"
CONFIRM = {"command_id": "c-1", "user": "u", "client": "app", "code": CODE}
ISSUE = {
    "command_id": "i-1",
    "user": "u",
    "client": "app",
    "channel": "sms",
    "destination": "+4915112345678",
}

BAD_BODIES = {
    "latin-1 name": b'{"command_id":"x","user":"J\xfcrgen","client":"c","code":"424242"}',
    "trailing comma": b'{"command_id":"x","user":"u","client":"c","code":"424242",}',
    "cut off": b'{"command_id":"x","user":"u","client":"c","code":"4242',
    "escaped key": b'{"\\u0063ode":"424242","command_id":"x","user":"u","client":"c"}',
    "escaped key, not JSON": b'{"\\u0063ode":"424242",}',
    "escaped digits, not JSON": b'{"code":"\\u0034\\u0032\\u0034\\u0032\\u0034\\u0032",}',
    "a list": b'[{"code":"424242"}]',
    "nested": b'{"command_id":"x","user":"u","client":"c","data":{"code":"424242"}}',
    "deeply nested": b'{"a":' * 100 + b'{"code":"424242"}' + b"}" * 100,
    "a number": b'{"command_id":"x","user":"u","client":"c","code":424242}',
    "a number, nested": b'{"command_id":"x","c":[424242]}',
    "misspelled key": b'{"command_id":"x","user":"u","client":"c","kode":"424242"}',
    "capitalised key": b'{"command_id":"x","Code":"424242"}',
    "spaced digits": b'{"command_id":"x","otp":"424 242"}',
    "python repr": b"{'command_id': 'x', 'code': '424242'}",
    "utf-16": json.dumps({**CONFIRM, "x": 1}).encode("utf-16"),
    "utf-16 without BOM": json.dumps({**CONFIRM, "x": 1}).encode("utf-16-be"),
    "after another escape": b'{"u":"\\u0424242424"',
    # A JSON reader keeps the last of two equal keys: the body read back has nothing to hide.
    "a code key twice": b'{"command_id":"c","user":"u","client":"c","code":"424242",'
    b'"code":"[redacted]","x":1}',
    "a code key twice, nested": b'{"command_id":"c","d":{"code":"424242","code":"x"}}',
}


def digits_left(body: bytes) -> bool:
    """Any sign of the code: its digits, also spaced, escaped or UTF-16 encoded."""
    text = body.decode("latin-1").replace("\x00", "")
    for escaped in range(10):
        text = text.replace(f"\\u003{escaped}", str(escaped))
    squeezed = "".join(ch for ch in text if ch not in " -._/")
    return "4242" in squeezed


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_a_bad_confirm_loses_its_candidate(body: bytes) -> None:
    assert digits_left(body)
    redacted, flagged = redact("code.confirm", body)
    assert flagged
    assert not digits_left(redacted), redacted


@pytest.mark.parametrize("routing_key", ["", "otp.worker.commands", "code.confirmm"])
def test_an_unknown_routing_key_counts_as_a_confirm(routing_key: str) -> None:
    redacted, flagged = redact(routing_key, BAD_BODIES["trailing comma"])
    assert flagged and not digits_left(redacted)


def test_digits_outside_a_code_member_are_scrubbed_under_an_unknown_routing_key() -> None:
    body = b'{"command_id":"x","otp":"424242",}'
    redacted, flagged = redact("code.delete", body)
    assert flagged
    assert redacted == b'{"command_id":"x","otp":"[redacted]",}'


def test_a_confirm_of_the_right_shape_keeps_everything_but_its_code() -> None:
    body = {**CONFIRM, "extra": "order 12345", "data": {"code": "1"}}
    redacted, flagged = redact("code.confirm", orjson.dumps(body))
    assert flagged
    assert orjson.loads(redacted) == {**body, "code": MARK, "data": {"code": MARK}}


def test_a_code_key_in_another_case_is_redacted_at_any_depth() -> None:
    body = {**CONFIRM, "data": {"Code": "135790"}}
    redacted, flagged = redact("code.confirm", orjson.dumps(body))
    assert flagged
    assert orjson.loads(redacted) == {**CONFIRM, "code": MARK, "data": {"Code": MARK}}


def test_a_code_that_is_not_a_string_is_redacted() -> None:
    body = {**CONFIRM, "data": {"code": 135790}}
    redacted, _ = redact("code.confirm", orjson.dumps(body))
    assert orjson.loads(redacted) == {**CONFIRM, "code": MARK, "data": {"code": MARK}}
    redacted, flagged = redact("code.issue", b'{"command_id":"i","code":424242}')
    assert flagged and orjson.loads(redacted) == {"command_id": "i", "code": MARK}


def test_json_of_the_wrong_shape_keeps_its_structure() -> None:
    body = b'[{"command_id":"c-1","code":424242,"note":"call 0151 2345 678"},true,null,1.5]'
    redacted, flagged = redact("code.confirm", body)
    assert flagged
    assert orjson.loads(redacted) == [
        {"command_id": "c-1", "code": MARK, "note": f"call {MARK}"},
        True,
        None,
        1.5,
    ]


def test_a_body_that_is_not_json_keeps_every_other_byte() -> None:
    body = b'{"command_id":"x-9","user":"J\xfcrgen","client":"c","code":"424242",}'
    redacted, flagged = redact("code.confirm", body)
    assert flagged
    assert redacted == b'{"command_id":"x-9","user":"J\xfcrgen","client":"c","code":"[redacted]",}'


def test_raw_scrubbing_keeps_escapes_that_are_no_digits() -> None:
    body = b'{"u":"J\\u00fcrgen","\\u0063ode":"x",}'
    redacted, _ = redact("code.confirm", body)
    assert redacted == b'{"u":"J\\u00fcrgen","\\u0063ode":"[redacted]",}'


@pytest.mark.parametrize(
    "body",
    [
        b'{"command_id":"c-1","user":"u","client":"app"}',
        b'{"command_id":"c-1","user":"u","client":"app","purpose":"log in"}',
        b'{"barcode":"x","code_id":"y",}',
        b"",
        b"not json at all",
    ],
)
def test_nothing_to_hide_changes_nothing(body: bytes) -> None:
    assert redact("code.confirm", body) == (body, False)


def test_an_issue_keeps_its_numbers() -> None:
    body = orjson.dumps(
        {"command_id": "i", "channel": "sms", "destination": "+4915112345678", "ttl_seconds": 1200}
    )
    assert redact("code.issue", body) == (body, False)
    assert redact("code.issue", body[:-1] + b",}") == (body[:-1] + b",}", False)


def test_an_issue_with_a_code_key_twice_loses_both() -> None:
    body = b'{"command_id":"i","channel":"none","code":"424242","code":"[redacted]"}'
    redacted, flagged = redact("code.issue", body)
    assert flagged and CODE.encode() not in redacted


def test_a_confirm_sent_as_an_issue_loses_its_code() -> None:
    redacted, flagged = redact("code.issue", orjson.dumps(CONFIRM))
    assert flagged and orjson.loads(redacted) == {**CONFIRM, "code": MARK}
    redacted, flagged = redact("code.issue", BAD_BODIES["latin-1 name"])
    assert flagged and CODE.encode() not in redacted


def test_a_scrubbed_run_is_shorter_than_any_code() -> None:
    assert redact("code.confirm", b'{"x":"123"}') == (b'{"x":"123"}', False)
    assert redact("code.confirm", b'{"x":"1234"}')[1]
    assert MIN_CODE_LENGTH > 4


garbage = st.binary(max_size=40)
codes = st.integers(MIN_CODE_LENGTH, MAX_CODE_LENGTH).flatmap(
    lambda n: st.text("0123456789", min_size=n, max_size=n)
)


@given(garbage, codes, garbage)
def test_no_code_survives_among_garbage(before: bytes, code: str, after: bytes) -> None:
    body = before + code.encode() + after
    redacted, flagged = redact("code.confirm", body)
    assert flagged
    assert code.encode() not in redacted


@given(st.recursive(st.none() | st.booleans() | st.text(max_size=8), st.lists), codes)
def test_no_code_survives_in_any_json(shape: object, code: str) -> None:
    body = orjson.dumps([shape, {"k": f"my code is {code}"}])
    redacted, flagged = redact("code.confirm", body)
    assert flagged
    assert code.encode() not in redacted


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "x-custom"])
def test_a_compressed_confirm_is_replaced_whole(encoding: str) -> None:
    body = gzip.compress(orjson.dumps(CONFIRM))
    assert redact("code.confirm", body, encoding) == (MARK.encode(), True)


def test_a_text_body_with_a_compressing_encoding_is_replaced_whole() -> None:
    assert redact("code.confirm", orjson.dumps(CONFIRM), "br") == (MARK.encode(), True)


@pytest.mark.parametrize(
    "body",
    [
        gzip.compress(orjson.dumps(CONFIRM)),  # no content_encoding said so
        zlib.compress(orjson.dumps(CONFIRM)),
        bytes(range(1, 32)) * 4 + b"4242",
    ],
    ids=["gzip", "zlib", "control bytes"],
)
def test_a_binary_confirm_is_replaced_whole(body: bytes) -> None:
    assert redact("code.confirm", body) == (MARK.encode(), True)


def test_text_in_utf16_or_with_a_plain_encoding_is_still_redacted_in_place() -> None:
    body = orjson.dumps(CONFIRM).decode().encode("utf-16")
    redacted, flagged = redact("code.confirm", body, "utf-8")
    assert flagged and redacted != MARK.encode() and not digits_left(redacted)


def test_an_issue_is_never_replaced_whole() -> None:
    body = gzip.compress(orjson.dumps(ISSUE))
    assert redact("code.issue", body, "gzip") == (body, False)
