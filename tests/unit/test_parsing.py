"""From wire bytes to a command or a clear rejection."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta

import orjson
import pytest
from pydantic import ValidationError

from contracts.commands import ConfirmCode, IssueCode
from contracts.replies import IssueResult
from contracts.topology import MAX_BODY_BYTES
from worker.domain.model import Policy
from worker.masking import mask_destination
from worker.parsing import Rejection, command_id_hint, parse_command

POLICY = Policy(reveal_clients=frozenset({"qa"}), max_ttl=timedelta(seconds=900))
ISSUE = {"command_id": "c", "user": "u", "client": "app", "channel": "none"}
CONFIRM = {"command_id": "c", "user": "u", "client": "app", "code": "123456"}


def parse(body: object, routing_key: str = "code.issue") -> IssueCode | ConfirmCode | Rejection:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_command(routing_key, raw, POLICY)


def rejection(body: object, routing_key: str = "code.issue") -> Rejection:
    result = parse(body, routing_key)
    assert isinstance(result, Rejection), result
    return result


def test_a_minimal_issue_gets_defaults() -> None:
    command = parse(ISSUE)
    assert isinstance(command, IssueCode)
    assert (command.purpose, command.locale, command.context) == ("login", "en", {})
    assert not command.force_new and not command.reveal


def test_a_confirm() -> None:
    command = parse(
        {"command_id": "c", "user": "u", "client": "a", "code": "123456"}, "code.confirm"
    )
    assert isinstance(command, ConfirmCode)
    assert "123456" not in repr(command)


@pytest.mark.parametrize(
    ("changes", "loc"),
    [
        ({"extra": 1}, "extra"),
        ({"command_id": ""}, "command_id"),
        ({"command_id": "x" * 129}, "command_id"),
        ({"user": ""}, "user"),
        ({"purpose": "Log In"}, "purpose"),
        ({"ttl_seconds": "300"}, "ttl_seconds"),
        ({"ttl_seconds": 0}, "ttl_seconds"),
        ({"ttl_seconds": 901}, "ttl_seconds"),
        ({"ttl_seconds": 10**30}, "ttl_seconds"),
        ({"channel": "pigeon"}, "channel"),
        ({"channel": "email"}, "destination"),
        ({"channel": "email", "destination": "not-an-address"}, "destination"),
        ({"channel": "sms", "destination": "015112345678"}, "destination"),
        ({"locale": "english!"}, "locale"),
        ({"context": {str(i): "v" for i in range(17)}}, "context"),
        ({"context": {"k": "v" * 257}}, "context.k"),
        ({"force_new": "yes"}, "force_new"),
    ],
)
def test_invalid_fields_are_named(changes: dict[str, object], loc: str) -> None:
    result = rejection({**ISSUE, **changes})
    assert result.error.type == "validation_error"
    assert loc in [f.loc for f in result.error.fields]
    # The reply echoes the command_id, an invalid one too: the contract's null is only for
    # a body that was not a JSON object with one.
    assert result.command_id == {**ISSUE, **changes}["command_id"]


@pytest.mark.parametrize(
    "changes",
    [
        {"locale": "x-private"},
        {"locale": "i-klingon"},
        {"locale": "tlh"},
        {"locale": "zh-Hant-TW"},
        {"context": {"": "empty key", "k" * 100: "long key"}},
    ],
)
def test_what_the_contract_allows_is_accepted(changes: dict[str, object]) -> None:
    # The contract asks a BCP 47 tag (an unknown one falls back to English) and a context
    # of at most 16 string keys with values of at most 256 characters: no more than that.
    command = parse({**ISSUE, **changes})
    assert isinstance(command, IssueCode)
    assert command.model_dump(include=set(changes)) == changes


@pytest.mark.parametrize(
    ("kind", "changes", "loc"),
    [
        ("code.issue", {"command_id": "a\x00"}, "command_id"),
        ("code.issue", {"user": "u\x00"}, "user"),
        ("code.issue", {"client": "\x00"}, "client"),
        ("code.issue", {"context": {"app_name": "A\x00"}}, "context"),
        ("code.issue", {"context": {"a\x00": "A"}}, "context"),
        ("code.confirm", {"user": "u\x00"}, "user"),
        ("code.confirm", {"code": "12345\x00"}, "code"),
    ],
)
def test_a_nul_character_is_refused_in_any_field(
    kind: str, changes: dict[str, object], loc: str
) -> None:
    # PostgreSQL stores no NUL in text: the batch failed there, and the command was parked
    # as internal_error without a reply.
    base = ISSUE if kind == "code.issue" else CONFIRM
    result = rejection({**base, **changes}, kind)
    assert result.error.type == "validation_error"
    assert [f.loc for f in result.error.fields] == [loc]
    assert "\x00" not in repr(result)


@pytest.mark.parametrize(
    "address",
    [
        "(x1)victim@example.org",  # read from a To header: victim@example.org, uncapped
        "a,victim@example.org",  # two recipients
        "bob<victim@example.org",
        '"quoted"@example.org',
        "a..b@example.org",
        ".a@example.org",
        "a b@example.org",
        "a\u00a0b@example.org",
        "a@b@example.org",
        "x" * 65 + "@example.org",
    ],
)
def test_addresses_a_mail_header_would_read_differently_are_refused(address: str) -> None:
    result = rejection({**ISSUE, "channel": "email", "destination": address})
    assert result.error.type == "validation_error"
    assert [f.loc for f in result.error.fields] == ["destination"]


@pytest.mark.parametrize(
    "address", ["a.b+c@mail.example.org", "o'brien@example.ie", "jörg@example.de", "x@y"]
)
def test_valid_destinations(address: str) -> None:
    assert isinstance(parse({**ISSUE, "channel": "email", "destination": address}), IssueCode)
    assert isinstance(
        parse({**ISSUE, "channel": "sms", "destination": "+4915112345678"}), IssueCode
    )


@pytest.mark.parametrize(
    ("body", "error_type"),
    [
        (b"{", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'"text"', "invalid_json"),
        (b"", "invalid_json"),
    ],
)
def test_bodies_that_are_not_json_objects(body: bytes, error_type: str) -> None:
    result = rejection(body)
    assert result.error.type == error_type
    assert result.command_id is None


def test_too_large() -> None:
    body = orjson.dumps({**ISSUE, "context": {"k": "x" * 70_000}})
    result = rejection(body)
    assert result.error.type == "too_large"
    assert result.command_id == "c"


def test_a_body_of_exactly_the_limit_is_accepted_one_byte_more_is_too_large() -> None:
    body = orjson.dumps(ISSUE)
    body += b" " * (MAX_BODY_BYTES - len(body))
    assert isinstance(parse(body), IssueCode)
    assert rejection(body + b" ").error.type == "too_large"


@pytest.mark.parametrize(
    "changes", [{"code": 424242}, {"code": "424242", "extra": 1}], ids=["number", "extra field"]
)
def test_a_rejected_confirm_never_quotes_its_code(changes: dict[str, object]) -> None:
    result = rejection({"command_id": "c", "user": "u", "client": "a", **changes}, "code.confirm")
    assert result.error.type == "validation_error"
    messages = [result.error.message, *(f.msg for f in result.error.fields)]
    assert "424242" not in repr(result)
    assert not any("424242" in m for m in messages)


def test_reveal_only_for_listed_clients() -> None:
    assert rejection({**ISSUE, "reveal": True}).error.type == "reveal_not_permitted"
    assert isinstance(parse({**ISSUE, "client": "qa", "reveal": True}), IssueCode)


def test_reveal_from_a_broker_user_not_listed_is_rejected_and_says_which_it_was() -> None:
    policy = replace(POLICY, reveal_broker_users=frozenset({"svc-qa"}))
    body = json.dumps({**ISSUE, "client": "qa", "reveal": True}).encode()
    assert isinstance(parse_command("code.issue", body, policy, "svc-qa"), IssueCode)
    for broker_user in ("guest", None):
        refused = parse_command("code.issue", body, policy, broker_user)
        assert isinstance(refused, Rejection)
        assert (refused.error.type, refused.command_id) == ("reveal_not_permitted", "c")
        assert f"user_id: {broker_user!r}" in refused.error.message
    # Without reveal the broker user does not matter.
    plain = json.dumps({**ISSUE, "client": "qa"}).encode()
    assert isinstance(parse_command("code.issue", plain, policy, None), IssueCode)


def test_unknown_routing_key() -> None:
    assert rejection(ISSUE, "code.delete").error.type == "validation_error"


@pytest.mark.parametrize(
    ("value", "masked"),
    [
        ("alice@example.org", "a***@example.org"),
        ("+4915112345678", "+49********678"),
        ("weird", "***"),
        (None, None),
    ],
)
def test_destinations_are_masked(value: str | None, masked: str | None) -> None:
    assert mask_destination(value) == masked


@pytest.mark.parametrize(
    ("body", "command_id"),
    [
        (b'{"command_id":"c-1","code":"424242"}', "c-1"),
        (b'{"command_id":"c-2","user":"J\xfcrgen","code":"424242"}', "c-2"),
        (b'{"command_id": "c-3", "code": "424242",}', "c-3"),
        (b'[{"command_id":"c-4"}]', "c-4"),
        (b'{"command_id":"c\\"5"}', 'c"5'),
        (b'{"command_id":' + b'"' + b"x" * 129 + b'"}', None),
        (b'{"user":"u","code":"424242"}', None),
        (b"garbage", None),
    ],
)
def test_a_command_id_for_the_logs_is_found_in_any_body(
    body: bytes, command_id: str | None
) -> None:
    assert command_id_hint(body) == command_id


@pytest.mark.parametrize("code", [482913, "48291" * 8])
def test_a_producers_validation_error_never_quotes_a_candidate_code(code: object) -> None:
    """``ConfirmCode(...)`` in a producer: its error is likely logged, with a real code."""
    with pytest.raises(ValidationError) as raised:
        ConfirmCode(command_id="c", user="u", client="c", code=code)  # type: ignore[arg-type]
    assert "48291" not in str(raised.value)
    assert "code" in str(raised.value)


def test_a_bad_reply_is_reported_without_its_revealed_code() -> None:
    with pytest.raises(ValidationError) as raised:
        IssueResult.model_validate({"command_id": "c", "status": "issued", "code": 428571})
    assert "428571" not in str(raised.value)
