"""What the notifier remembers: which ``code.issued`` events it has claimed or delivered.

A redelivered or republished event (the outbox publishes at least once) must not send a
second message, not even when two notifier processes receive copies at the same moment. So a
process first *claims* the event: one atomic upsert inserts a ``claimed`` row with a lease, or
takes over a claim whose lease has run out (its claimant died). Only the claimant sends; it
then marks the row ``delivered``, or releases the claim when the attempt did not deliver (a
retry or a failure), so the next copy may claim it at once. A copy that finds a live claim of
someone else is neither sent nor dropped: the caller parks it and looks again later. Marking
takes the claim's token: a claimant whose lease ran out and was taken over does not overwrite
the new claim, and learns that it lost it.

The table lives in the service's database but belongs to the notifier alone, so the notifier
creates (and extends) it itself, idempotently, instead of going through the worker's
migrations. ``delivered_at`` is the claim time until the delivery is recorded; rows older than
the retention are swept; by then no copy of the event is left.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import aiosqlite

from worker.store.sqlite import NOTIFIER_WAL_AUTOCHECKPOINT_PAGES, open_wal, retry_locked
from worker.store.sqlite_transaction import rollback_if_open, run_in_thread
from worker.store.urls import path_of, store_backend

_CREATE = (
    "CREATE TABLE IF NOT EXISTS deliveries ("
    " event_id TEXT PRIMARY KEY,"
    " delivered_at {time} NOT NULL,"
    " attempts INTEGER NOT NULL,"
    " state TEXT NOT NULL DEFAULT 'delivered',"
    " claimed_until {time},"
    " claim_token TEXT)"
)
_CREATE_INDEX = "CREATE INDEX IF NOT EXISTS deliveries_delivered_at ON deliveries (delivered_at)"
# Tables created before claims existed hold delivered rows only: the default says so.
_ADD_COLUMNS = (
    ("state", "TEXT NOT NULL DEFAULT 'delivered'"),
    ("claimed_until", "{time}"),
    ("claim_token", "TEXT"),
)
# Inserts a claim, or takes over an expired one; a delivered row or a live claim stays as is.
_CLAIM = (
    "INSERT INTO deliveries (event_id, delivered_at, attempts, state, claimed_until, claim_token)"
    " VALUES ({p1}, {p2}, 0, 'claimed', {p3}, {p4})"
    " ON CONFLICT (event_id) DO UPDATE SET delivered_at = excluded.delivered_at,"
    " claimed_until = excluded.claimed_until, claim_token = excluded.claim_token"
    " WHERE deliveries.state = 'claimed' AND deliveries.claimed_until <= excluded.delivered_at"
    " RETURNING claim_token"
)
# Only the holder of the claim marks it; a row gone meanwhile (released by a later claimant
# whose attempt did not deliver) is recorded anyway, so no further copy is sent.
_DELIVERED = (
    "INSERT INTO deliveries (event_id, delivered_at, attempts, state) VALUES ({p1}, {p2}, {p3},"
    " 'delivered') ON CONFLICT (event_id) DO UPDATE SET delivered_at = excluded.delivered_at,"
    " attempts = excluded.attempts, state = 'delivered', claimed_until = NULL, claim_token = NULL"
    " WHERE deliveries.state = 'claimed' AND deliveries.claim_token = {p4}"
    " RETURNING event_id"
)
_RELEASE = (
    "DELETE FROM deliveries WHERE event_id = {p1} AND state = 'claimed' AND claim_token = {p2}"
)
_LOOK = "SELECT state, attempts FROM deliveries WHERE event_id = {p1}"
_SWEEP = (
    "DELETE FROM deliveries WHERE event_id IN"
    " (SELECT event_id FROM deliveries WHERE delivered_at < {p1} LIMIT {p2})"
)
_QMARK = {"p1": "?", "p2": "?", "p3": "?", "p4": "?"}
_DOLLAR = {"p1": "$1", "p2": "$2", "p3": "$3", "p4": "$4"}


@dataclass(frozen=True)
class Claimed:
    """This process owns the event until ``release`` or ``mark_delivered`` (or the lease ends)."""

    token: str


@dataclass(frozen=True)
class AlreadyDelivered:
    attempts: int


@dataclass(frozen=True)
class ClaimedElsewhere:
    """Another process holds a live claim: it is sending right now, or died moments ago."""


ClaimResult = Claimed | AlreadyDelivered | ClaimedElsewhere


class DeliveryStore(Protocol):
    async def claim(
        self, event_id: str, token: str, now: datetime, lease_seconds: float
    ) -> ClaimResult: ...

    async def mark_delivered(self, event_id: str, token: str, attempts: int, now: datetime) -> bool:
        """False when the claim ``token`` lost the event: another process claimed it after
        this claim's lease ran out (and may be sending it, or has delivered it)."""
        ...

    async def release(self, event_id: str, token: str) -> None: ...

    async def sweep(self, before: datetime, limit: int = 1000) -> int: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def _interpret(won: bool, token: str, row: Any) -> ClaimResult:
    if won:
        return Claimed(token)
    if row is not None and row[0] == "delivered":
        return AlreadyDelivered(int(row[1]))
    # No row: the claimant released it between our two statements; the parked copy retries.
    return ClaimedElsewhere()


def _create_schema(conn: sqlite3.Connection) -> None:
    """One write transaction, in one trip to the connection's thread, so two processes do
    not both add a missing column."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_CREATE.format(time="REAL"))
        conn.execute(_CREATE_INDEX)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(deliveries)")}
        for name, kind in _ADD_COLUMNS:
            if name not in columns:
                conn.execute(f"ALTER TABLE deliveries ADD COLUMN {name} {kind.format(time='REAL')}")
        conn.execute("COMMIT")
    except BaseException:
        rollback_if_open(conn)
        raise


class SqliteDeliveryStore:
    """One connection; WAL with ``synchronous=NORMAL``, since a lost row costs at most a resend."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, url: str) -> SqliteDeliveryStore:
        path = Path(path_of(url))
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await open_wal(
            path, busy_ms=10_000, autocheckpoint_pages=NOTIFIER_WAL_AUTOCHECKPOINT_PAGES
        )
        try:
            await db.execute("PRAGMA synchronous = NORMAL")
            await retry_locked(lambda: run_in_thread(db, _create_schema))
        except BaseException:
            # An open connection's thread would keep the process from exiting.
            await db.close()
            raise
        return cls(db)

    async def claim(
        self, event_id: str, token: str, now: datetime, lease_seconds: float
    ) -> ClaimResult:
        stamp = now.timestamp()
        won = list(
            await self._db.execute_fetchall(
                _CLAIM.format(**_QMARK), (event_id, stamp, stamp + lease_seconds, token)
            )
        )
        row = None
        if not won:
            rows = list(await self._db.execute_fetchall(_LOOK.format(**_QMARK), (event_id,)))
            row = rows[0] if rows else None
        return _interpret(bool(won), token, row)

    async def mark_delivered(self, event_id: str, token: str, attempts: int, now: datetime) -> bool:
        rows = await self._db.execute_fetchall(
            _DELIVERED.format(**_QMARK), (event_id, now.timestamp(), attempts, token)
        )
        return bool(list(rows))

    async def release(self, event_id: str, token: str) -> None:
        await self._db.execute(_RELEASE.format(**_QMARK), (event_id, token))

    async def sweep(self, before: datetime, limit: int = 1000) -> int:
        cursor = await self._db.execute(_SWEEP.format(**_QMARK), (before.timestamp(), limit))
        return cursor.rowcount

    async def ping(self) -> None:
        await self._db.execute_fetchall("SELECT 1")

    async def close(self) -> None:
        await self._db.close()


class PostgresDeliveryStore:
    def __init__(self, pool: Any) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str) -> PostgresDeliveryStore:
        from worker.store.postgres import connect_pool, schema_lock

        pool = await connect_pool(url, min_size=1, max_size=4)
        try:
            # Notifiers (and workers) starting together on a new database take turns.
            async with pool.acquire() as conn, schema_lock(conn):
                for statement in (
                    _CREATE.format(time="TIMESTAMPTZ"),
                    _CREATE_INDEX,
                    *(
                        f"ALTER TABLE deliveries ADD COLUMN IF NOT EXISTS {name}"
                        f" {kind.format(time='TIMESTAMPTZ')}"
                        for name, kind in _ADD_COLUMNS
                    ),
                ):
                    await conn.execute(statement)
        except BaseException:
            await pool.close()
            raise
        return cls(pool)

    async def claim(
        self, event_id: str, token: str, now: datetime, lease_seconds: float
    ) -> ClaimResult:
        at = now.astimezone(UTC)
        won = await self._pool.fetchval(
            _CLAIM.format(**_DOLLAR), event_id, at, at + timedelta(seconds=lease_seconds), token
        )
        row = None
        if won is None:
            row = await self._pool.fetchrow(_LOOK.format(**_DOLLAR), event_id)
        return _interpret(won is not None, token, row)

    async def mark_delivered(self, event_id: str, token: str, attempts: int, now: datetime) -> bool:
        marked = await self._pool.fetchval(
            _DELIVERED.format(**_DOLLAR), event_id, now.astimezone(UTC), attempts, token
        )
        return marked is not None

    async def release(self, event_id: str, token: str) -> None:
        await self._pool.execute(_RELEASE.format(**_DOLLAR), event_id, token)

    async def sweep(self, before: datetime, limit: int = 1000) -> int:
        status: str = await self._pool.execute(
            _SWEEP.format(**_DOLLAR), before.astimezone(UTC), limit
        )
        return int(status.rsplit(" ", 1)[-1])

    async def ping(self) -> None:
        await self._pool.fetchval("SELECT 1")

    async def close(self) -> None:
        await self._pool.close()


async def open_delivery_store(url: str) -> DeliveryStore:
    if store_backend(url) == "sqlite":
        return await SqliteDeliveryStore.open(url)
    return await PostgresDeliveryStore.open(url)
