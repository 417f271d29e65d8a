"""The store interface every backend implements.

It is batch-shaped: a transaction loads everything a batch of commands needs in a few queries
and writes all their effects at once, so one commit serves many commands (group commit).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from worker.domain.model import CodeRecord, FailureStreak, Scope
from worker.store.keys import scope_key

ReplyKey = tuple[str, str]
"""(command kind, command_id): the idempotency key."""


@dataclass(frozen=True, slots=True)
class StoredReply:
    """A command's reply, kept for its repeats, and the keyed fingerprint of the command it
    answered: a repeat must be the same command, not only carry the same id. ``None`` for
    rows stored before fingerprints were kept."""

    body: bytes
    fingerprint: bytes | None


class TransientStoreError(Exception):
    """The store could not answer now (locked, connection lost); the batch may be retried."""


class StoreRefused(Exception):
    """The store refused us for a reason no retry mends (unknown role or database, wrong
    password): at start, one line for the entry point to report."""


class TransactionEnded(RuntimeError):
    """A step after ``write``, which ends a transaction on every store."""

    def __init__(self) -> None:
        super().__init__("write() ends a transaction; nothing may follow it")


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    event_id: str
    routing_key: str
    body: bytes
    type: str


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    event: OutboxEvent


def claimed_rows(rows: Iterable[Sequence[Any]]) -> list[OutboxRow]:
    """A claim's ``RETURNING id, event_id, routing_key, body, type`` rows, by id (``RETURNING``
    promises no order)."""
    return sorted(
        (OutboxRow(r[0], OutboxEvent(r[1], r[2], bytes(r[3]), r[4])) for r in rows),
        key=lambda row: row.id,
    )


@dataclass(frozen=True, slots=True)
class Send:
    scope_key: str
    destination_key: str | None
    sent_at: datetime


@dataclass(slots=True)
class Writes:
    """Everything one batch changes, written in its transaction."""

    codes: dict[Scope, CodeRecord] = field(default_factory=dict)
    replies: dict[ReplyKey, StoredReply] = field(default_factory=dict)
    sends: list[Send] = field(default_factory=list)
    streaks: dict[str, FailureStreak | None] = field(default_factory=dict)
    events: list[OutboxEvent] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SendCounts:
    by_scope: dict[str, list[datetime]]
    by_destination: dict[str, list[datetime]]


def code_row(record: CodeRecord, time: Callable[[datetime], Any]) -> tuple[Any, ...]:
    """A code as the values of the ``codes`` columns, in their order in both backends;
    ``time`` turns its datetimes into what the backend stores."""
    return (
        scope_key(record.scope),
        record.scope.user,
        record.scope.client,
        record.scope.purpose,
        record.code_id,
        record.key_id,
        record.digest,
        record.sealed,
        time(record.issued_at),
        time(record.expires_at),
        record.attempts,
        record.state.value,
    )


@dataclass(frozen=True, slots=True)
class StateKeys:
    """What a batch needs loaded: the stored replies of its commands (replays), and their
    codes, sends and failure streaks."""

    replies: Collection[ReplyKey]
    scopes: Collection[Scope]
    users: Collection[str]
    send_scope_keys: Collection[str]
    destination_keys: Collection[str]
    since: datetime
    """Sends at or before this are outside the rate-limit window."""


@dataclass(frozen=True, slots=True)
class State:
    replies: dict[ReplyKey, StoredReply]
    codes: dict[Scope, CodeRecord]
    sends: SendCounts
    streaks: dict[str, FailureStreak]


class StateLoads(Protocol):
    async def load_replies(self, keys: Collection[ReplyKey]) -> dict[ReplyKey, StoredReply]: ...

    async def load_codes(self, scopes: Collection[Scope]) -> dict[Scope, CodeRecord]: ...

    async def load_sends(
        self, scope_keys: Collection[str], destination_keys: Collection[str], since: datetime
    ) -> SendCounts: ...

    async def load_streaks(self, users: Collection[str]) -> dict[str, FailureStreak]: ...


async def load_state_one_by_one(tx: StateLoads, wanted: StateKeys) -> State:
    """``load_state`` for a transaction whose loads cost nothing extra one after another."""
    return State(
        replies=await tx.load_replies(wanted.replies),
        codes=await tx.load_codes(wanted.scopes),
        sends=await tx.load_sends(wanted.send_scope_keys, wanted.destination_keys, wanted.since),
        streaks=await tx.load_streaks(wanted.users),
    )


class Transaction(StateLoads, Protocol):
    async def lock(self, keys: Collection[str]) -> None:
        """Serialise against other processes touching these keys (no-op where the
        transaction already holds the store's write lock)."""

    async def load_state(self, wanted: StateKeys) -> State:
        """All four loads at once: one trip to SQLite's thread, which also begins the
        transaction when it is the first step."""

    async def write(self, writes: Writes, now: datetime) -> list[OutboxRow]:
        """Writes the batch's effects; returns the staged events with their outbox ids.

        The last step of a transaction: SQLite commits in the same trip, and every store
        refuses a step after it."""


@dataclass(frozen=True, slots=True)
class SweepResult:
    codes: int
    replies: int
    sends: int
    streaks: int


class Store(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[Transaction]: ...

    async def claim_outbox(
        self,
        now: datetime,
        lease_seconds: float,
        limit: int,
        *,
        ignore_leases: bool = False,
        after_id: int = 0,
    ) -> list[OutboxRow]:
        """Rows whose lease ran out (their relay died or failed), leased to the caller, by id.

        ``ignore_leases`` takes every row (a starting process relays all leftovers first)."""

    async def delete_outbox(self, ids: Collection[int]) -> None: ...

    async def forget_outbox(self, ids: Collection[int]) -> None:
        """Relayed rows: deleted now or with the store's next write, but before any later
        ``claim_outbox`` sees them. Rows not yet deleted when the process dies are relayed
        again (at-least-once)."""

    async def outbox_backlog(self) -> int: ...

    async def outbox_oldest(self) -> datetime | None:
        """When the oldest unrelayed event was staged: its age is the relay's lag."""

    async def sweep(
        self,
        now: datetime,
        code_retention_seconds: float,
        reply_retention_seconds: float,
        send_window_seconds: float,
        limit: int,
    ) -> SweepResult: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
