"""Events the service publishes on ``otp.events``, routed by their name."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter

from contracts._base import OpenMessage, UtcDatetime
from contracts.commands import Channel


class _EventBase(OpenMessage):
    event_id: str
    occurred_at: UtcDatetime
    code_id: str
    user: str
    client: str
    purpose: str


class CodeIssued(_EventBase):
    event: Literal["code.issued"] = "code.issued"
    channel: Channel
    destination: str | None
    locale: str
    context: dict[str, str]
    expires_at: UtcDatetime
    resent: bool
    sealed_code: str


class CodeConfirmed(_EventBase):
    event: Literal["code.confirmed"] = "code.confirmed"
    attempts_used: int


class CodeAttemptFailed(_EventBase):
    event: Literal["code.attempt_failed"] = "code.attempt_failed"
    reason: Literal["invalid", "expired"]
    attempts_left: int


class CodeLocked(_EventBase):
    event: Literal["code.locked"] = "code.locked"
    attempts_used: int


class CodeDelivered(_EventBase):
    event: Literal["code.delivered"] = "code.delivered"
    channel: Channel
    attempts: int


class CodeDeliveryFailed(_EventBase):
    event: Literal["code.delivery_failed"] = "code.delivery_failed"
    channel: Channel
    attempts: int
    reason: str


Event = Annotated[
    CodeIssued
    | CodeConfirmed
    | CodeAttemptFailed
    | CodeLocked
    | CodeDelivered
    | CodeDeliveryFailed,
    Field(discriminator="event"),
]
EVENT_TYPES: tuple[type[_EventBase], ...] = (
    CodeIssued,
    CodeConfirmed,
    CodeAttemptFailed,
    CodeLocked,
    CodeDelivered,
    CodeDeliveryFailed,
)
EVENT_NAMES = tuple(t.model_fields["event"].default for t in EVENT_TYPES)

_event_adapter: TypeAdapter[Any] = TypeAdapter(Event)


def parse_event(body: bytes | str) -> Any:
    """Parses any event body into its model (unknown fields are ignored)."""
    return _event_adapter.validate_json(body)
