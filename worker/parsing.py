"""Step 2 of handling: bytes on the wire to a valid command, or a rejection that says why."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import orjson
from pydantic import ValidationError

from contracts._base import MAX_COMMAND_ID_LENGTH, NUL_MESSAGE, fields_with_nul
from contracts.commands import ConfirmCode, IssueCode
from contracts.replies import ErrorInfo, ErrorType, FieldError
from contracts.topology import CONFIRM_ROUTING_KEY, ISSUE_ROUTING_KEY, MAX_BODY_BYTES
from worker.domain.model import Policy
from worker.domain.policy import RevealRefusal, resolve_ttl, reveal_refusal

Kind = Literal["issue", "confirm"]
Command = IssueCode | ConfirmCode

KIND_OF_ROUTING_KEY: dict[str, Kind] = {ISSUE_ROUTING_KEY: "issue", CONFIRM_ROUTING_KEY: "confirm"}
MODEL_OF_KIND: dict[Kind, type[IssueCode] | type[ConfirmCode]] = {
    "issue": IssueCode,
    "confirm": ConfirmCode,
}


@dataclass(frozen=True, slots=True)
class Rejection:
    kind: Kind
    command_id: str | None
    error: ErrorInfo

    @property
    def reason(self) -> str:
        return f"{self.error.type}: {self.error.message}"


def kind_of(command: Command) -> Kind:
    return "issue" if isinstance(command, IssueCode) else "confirm"


def parse_command(
    routing_key: str, body: bytes, policy: Policy, broker_user: str | None = None
) -> Command | Rejection:
    """``broker_user`` is the message's ``user_id`` property: the broker user that published
    it, as the broker has checked."""
    kind = KIND_OF_ROUTING_KEY.get(routing_key)
    if kind is None:
        guessed: Kind = "confirm" if b'"code"' in body else "issue"
        return _reject(guessed, body, "validation_error", f"unknown routing key {routing_key!r}")
    if len(body) > MAX_BODY_BYTES:
        return _reject(kind, body, "too_large", f"body exceeds {MAX_BODY_BYTES} bytes")
    try:
        command = MODEL_OF_KIND[kind].model_validate_json(body)
    except ValidationError as exc:
        return _from_validation(kind, body, exc)
    if b"\\u0000" in body and (named := fields_with_nul(command)):
        errors = [FieldError(loc=name, msg=NUL_MESSAGE) for name in named]
        return _reject(kind, body, "validation_error", "invalid command", errors)
    if isinstance(command, IssueCode):
        try:
            resolve_ttl(policy, command.ttl_seconds)
        except ValueError as exc:
            return _reject(
                kind,
                body,
                "validation_error",
                "invalid command",
                [FieldError(loc="ttl_seconds", msg=str(exc))],
            )
        refusal = reveal_refusal(policy, command.client, broker_user) if command.reveal else None
        if refusal is RevealRefusal.CLIENT:
            return _reject(
                kind,
                body,
                "reveal_not_permitted",
                f"client {command.client!r} may not ask for the plaintext code",
            )
        if refusal is RevealRefusal.BROKER_USER:
            return _reject(
                kind,
                body,
                "reveal_not_permitted",
                "the plaintext code is only for commands published by a broker user allowed "
                f"to reveal, named in the message's user_id (user_id: {broker_user!r})",
            )
    return command


def _from_validation(kind: Kind, body: bytes, exc: ValidationError) -> Rejection:
    errors = exc.errors(include_url=False, include_input=False)
    types = {e["type"] for e in errors}
    if "json_invalid" in types:
        return _reject(kind, b"", "invalid_json", "body is not valid UTF-8 JSON")
    if "model_type" in types and all(not e["loc"] for e in errors):
        return _reject(kind, body, "invalid_json", "body must be a JSON object")
    fields = [
        FieldError(
            loc=".".join(str(part) for part in e["loc"]) or "(body)",
            msg=e["msg"].removeprefix("Value error, "),
        )
        for e in errors
    ]
    return _reject(kind, body, "validation_error", "invalid command", fields)


def _reject(
    kind: Kind,
    body: bytes,
    error_type: ErrorType,
    message: str,
    fields: list[FieldError] | None = None,
) -> Rejection:
    return Rejection(
        kind, _command_id_of(body), ErrorInfo(type=error_type, message=message, fields=fields or [])
    )


def _command_id_of(body: bytes, *, longest: int | None = None) -> str | None:
    """The command_id of a body that is a JSON object with a string one, valid or not: the
    contract echoes it unless the body "was not a JSON object with one". With ``longest``,
    only one of 1 to ``longest`` characters."""
    if not body or len(body) > 16 * MAX_BODY_BYTES:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, dict):
        value = data.get("command_id")
        if isinstance(value, str) and (longest is None or 0 < len(value) <= longest):
            return value
    return None


_RAW_COMMAND_ID = re.compile(
    rb'"command_id"\s*:\s*"([^"\\\x00-\x1f]{1,%d})"' % MAX_COMMAND_ID_LENGTH
)


def command_id_hint(body: bytes) -> str | None:
    """For log lines only: the command_id, also from a body that is not valid JSON.

    A reply echoes only a command_id of a JSON object (the contract says so); an operator
    following one message through the logs takes what can be found.
    """
    found = _command_id_of(body, longest=MAX_COMMAND_ID_LENGTH)
    if found is not None or len(body) > MAX_BODY_BYTES:
        return found
    match = _RAW_COMMAND_ID.search(body)
    return match[1].decode("utf-8", "replace") if match else None
