"""The two commands producers publish to ``otp.commands``."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator

from contracts._base import ClientName, CommandId, Purpose, StrictCommand, UserName

Channel = Literal["email", "sms", "none"]

_ATOM = r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x9f\s])+"
"""RFC 5322's atext, and any non-ASCII character but spaces (RFC 6531). Not the characters a
mail header treats as syntax (``,`` ``<`` ``(`` ``"`` ``:`` …): a mail library reading
``a,victim@example.org`` back from the To header finds two recipients, and
``(1)victim@example.org`` one that escapes the per-destination send cap."""
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL = re.compile(rf"^(?=[^@]{{1,64}}@){_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*$")
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
_BCP47 = re.compile(r"^[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*$")
"""The shape of a BCP 47 tag (private use ``x-…`` and irregular ``i-…`` tags included), not
its registry: an unknown language falls back to English, as the contract says."""


def is_email_address(value: str) -> bool:
    return _EMAIL.match(value) is not None


MAX_CONTEXT_KEYS = 16
ContextValue = Annotated[str, Field(max_length=256)]


class IssueCode(StrictCommand):
    """``code.issue``: generate (or resend) the one active code of a scope."""

    command_id: CommandId
    user: UserName
    client: ClientName
    purpose: Purpose = "login"
    ttl_seconds: Annotated[int, Field(ge=1)] | None = None
    channel: Channel
    destination: Annotated[str | None, Field(default=None, max_length=254, validate_default=True)]
    locale: Annotated[str, Field(min_length=2, max_length=35)] = "en"
    context: dict[str, ContextValue] = Field(default_factory=dict)
    force_new: bool = False
    reveal: Annotated[
        bool,
        Field(
            description=(
                "Return the plaintext code in the reply. Only for clients the operator lists "
                "(OTP_REVEAL_CLIENTS) and, where the operator also lists broker users "
                "(OTP_REVEAL_BROKER_USERS), only in a message whose AMQP `user_id` property "
                "names one of them; otherwise the command is rejected (reveal_not_permitted)."
            )
        ),
    ] = False

    @field_validator("locale")
    @classmethod
    def _locale_is_bcp47(cls, value: str) -> str:
        if not _BCP47.match(value):
            raise ValueError("locale must be a BCP 47 language tag such as 'en' or 'de-AT'")
        return value

    @field_validator("context")
    @classmethod
    def _context_is_small(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_CONTEXT_KEYS:
            raise ValueError(f"context may hold at most {MAX_CONTEXT_KEYS} keys")
        return value

    @field_validator("destination")
    @classmethod
    def _destination_fits_channel(cls, value: str | None, info: ValidationInfo) -> str | None:
        channel = info.data.get("channel")
        if channel == "email":
            if value is None:
                raise ValueError("destination is required for channel 'email'")
            if not is_email_address(value):
                raise ValueError("destination must be an e-mail address for channel 'email'")
        elif channel == "sms":
            if value is None:
                raise ValueError("destination is required for channel 'sms'")
            if not _E164.match(value):
                raise ValueError("destination must be an E.164 phone number such as +4915112345678")
        return value


class ConfirmCode(StrictCommand):
    """``code.confirm``: check a candidate against the scope's active code."""

    command_id: CommandId
    user: UserName
    client: ClientName
    purpose: Purpose = "login"
    code: Annotated[str, Field(min_length=1, max_length=32)]

    def __repr_args__(self):  # type: ignore[no-untyped-def]
        # The candidate may be the real code: keep it out of reprs and tracebacks.
        for name, value in super().__repr_args__():
            yield name, ("***" if name == "code" else value)
