"""The state the domain decides on."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum


@dataclass(frozen=True, slots=True)
class Scope:
    """A scope has at most one active code."""

    user: str
    client: str
    purpose: str


class CodeState(StrEnum):
    ACTIVE = "active"
    CONFIRMED = "confirmed"
    LOCKED = "locked"


@dataclass(frozen=True, slots=True)
class CodeRecord:
    """The latest code of a scope. Holds its HMAC and its sealed form, never the plaintext."""

    code_id: str
    scope: Scope
    key_id: str
    digest: bytes
    sealed: str
    issued_at: datetime
    expires_at: datetime
    attempts: int
    state: CodeState

    def is_expired(self, now: datetime) -> bool:
        return now >= self.expires_at


@dataclass(frozen=True, slots=True)
class FailureStreak:
    """Consecutive failed confirmations of one user."""

    count: int
    last_failure_at: datetime


@dataclass(frozen=True, slots=True)
class Policy:
    """Every tunable of the decisions, from the operator's settings."""

    code_length: int = 6
    default_ttl: timedelta = timedelta(seconds=300)
    max_ttl: timedelta = timedelta(seconds=900)
    max_attempts: int = 5
    resend_cooldown: timedelta = timedelta(seconds=30)
    max_sends_per_scope: int = 5
    max_sends_per_destination: int = 10
    send_window: timedelta = timedelta(hours=1)
    max_consecutive_failures: int = 20
    failure_pause: timedelta = timedelta(hours=1)
    reveal_clients: frozenset[str] = frozenset()
    reveal_broker_users: frozenset[str] = frozenset()
    """Empty: ``reveal_clients`` alone decides. Otherwise a reveal must also come from one of
    these broker users, as the message's ``user_id`` says (RabbitMQ refuses a publish whose
    ``user_id`` is not the connection's own user)."""
