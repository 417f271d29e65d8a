from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer


def _require_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamp must carry a UTC offset")
    return value.astimezone(UTC)


def format_utc(value: datetime) -> str:
    """ISO 8601 with a ``Z`` suffix, as the contract asks."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


UtcDatetime = Annotated[
    datetime,
    AfterValidator(_require_utc),
    PlainSerializer(format_utc, return_type=str, when_used="json"),
]

MAX_COMMAND_ID_LENGTH = 128
CommandId = Annotated[str, Field(min_length=1, max_length=MAX_COMMAND_ID_LENGTH)]
UserName = Annotated[str, Field(min_length=1, max_length=256)]
ClientName = Annotated[str, Field(min_length=1, max_length=128)]
Purpose = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9_.-]+$")]


class StrictCommand(BaseModel):
    """Commands reject unknown fields and do not coerce types. A validation error never
    quotes the input: a confirm's candidate code would end up wherever it is logged."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, hide_input_in_errors=True)


NUL_MESSAGE = "must not contain NUL (U+0000) characters"


def fields_with_nul(command: BaseModel) -> list[str]:
    """The fields of ``command`` whose text (or a map's key or value) holds U+0000.

    Such a command is refused: PostgreSQL stores no NUL in text, so it would fail its whole
    batch there, and be parked as internal_error without a reply, while SQLite took it. A
    check after validation, not a validator on every field, since it costs the hot path
    nothing: the worker looks only when the body holds the escape ``\\u0000``."""
    named = []
    for name, value in command:
        texts = [*value.keys(), *value.values()] if isinstance(value, dict) else [value]
        if any(isinstance(text, str) and "\x00" in text for text in texts):
            named.append(name)
    return named


class OpenMessage(BaseModel):
    """Replies and events: readers ignore fields a later version adds. A validation error
    never quotes the input (a revealed code)."""

    model_config = ConfigDict(extra="ignore", frozen=True, hide_input_in_errors=True)
