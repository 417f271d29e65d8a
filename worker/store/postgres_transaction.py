"""One PostgreSQL transaction: advisory locks, then the batch-shaped reads and one write.

``PostgresStore.transaction`` (``postgres.py``) opens it at READ COMMITTED; ``lock`` is what
makes it safe against other worker processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from worker.domain.model import CodeRecord, CodeState, FailureStreak, Scope
from worker.store.base import (
    OutboxRow,
    ReplyKey,
    SendCounts,
    State,
    StateKeys,
    StoredReply,
    TransactionEnded,
    Writes,
    code_row,
    load_state_one_by_one,
)
from worker.store.keys import scope_key

_CODE_COLUMNS = (
    "scope_key, user_name, client, purpose, code_id, key_id, digest, sealed, "
    "issued_at, expires_at, attempts, state"
)
_CODE_TYPES = (
    "text[], text[], text[], text[], text[], text[], bytea[], text[], "
    "timestamptz[], timestamptz[], int[], text[]"
)


def lock_id(key: str) -> int:
    """A stable signed 64-bit id for a lock key (Python's ``hash`` differs per process)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _as_is(value: datetime) -> datetime:
    """timestamptz columns take datetimes as they are."""
    return value


def _unnest(types: str) -> str:
    params = ", ".join(f"${i}::{t.strip()}" for i, t in enumerate(types.split(","), 1))
    return f"SELECT * FROM unnest({params})"


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width


class PostgresTransaction:
    def __init__(self, conn: asyncpg.Connection, lease_seconds: float) -> None:
        self._conn = conn
        self._lease = timedelta(seconds=lease_seconds)
        self._written = False

    def _check_open(self) -> None:
        """SQLite commits in ``write``; refusing steps after it here too keeps the stores
        interchangeable."""
        if self._written:
            raise TransactionEnded

    async def lock(self, keys: Collection[str]) -> None:
        """Advisory locks in the given (sorted) order: every process takes them in the same
        order, so concurrent batches queue up instead of deadlocking."""
        self._check_open()
        ids = list(dict.fromkeys(lock_id(key) for key in keys))
        if ids:
            await self._conn.execute(
                "SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS t(k)", ids
            )

    async def load_replies(self, keys: Collection[ReplyKey]) -> dict[ReplyKey, StoredReply]:
        self._check_open()
        if not keys:
            return {}
        kinds, ids = zip(*keys, strict=True)
        rows = await self._conn.fetch(
            "SELECT r.kind, r.command_id, r.reply, r.fingerprint FROM replies r "
            "JOIN unnest($1::text[], $2::text[]) AS k(kind, command_id) "
            "USING (kind, command_id)",
            list(kinds),
            list(ids),
        )
        return {
            (r[0], r[1]): StoredReply(bytes(r[2]), None if r[3] is None else bytes(r[3]))
            for r in rows
        }

    async def load_codes(self, scopes: Collection[Scope]) -> dict[Scope, CodeRecord]:
        self._check_open()
        if not scopes:
            return {}
        by_key = {scope_key(s): s for s in scopes}
        rows = await self._conn.fetch(
            f"SELECT {_CODE_COLUMNS} FROM codes WHERE scope_key = ANY($1::text[])", list(by_key)
        )
        return {
            by_key[r[0]]: CodeRecord(
                code_id=r[4],
                scope=by_key[r[0]],
                key_id=r[5],
                digest=bytes(r[6]),
                sealed=r[7],
                issued_at=r[8],
                expires_at=r[9],
                attempts=r[10],
                state=CodeState(r[11]),
            )
            for r in rows
        }

    async def load_sends(
        self, scope_keys: Collection[str], destination_keys: Collection[str], since: datetime
    ) -> SendCounts:
        self._check_open()
        found: list[dict[str, list[datetime]]] = [{}, {}]
        for index, (column, keys) in enumerate(
            (("scope_key", scope_keys), ("destination_key", destination_keys))
        ):
            if not keys:
                continue
            rows = await self._conn.fetch(
                f"SELECT {column}, sent_at FROM sends "
                f"WHERE {column} = ANY($1::text[]) AND sent_at > $2",
                list(keys),
                since,
            )
            for key, at in rows:
                found[index].setdefault(key, []).append(at)
        return SendCounts(found[0], found[1])

    async def load_streaks(self, users: Collection[str]) -> dict[str, FailureStreak]:
        self._check_open()
        if not users:
            return {}
        rows = await self._conn.fetch(
            "SELECT user_name, count, last_failure_at FROM streaks "
            "WHERE user_name = ANY($1::text[])",
            list(users),
        )
        return {u: FailureStreak(count=c, last_failure_at=at) for u, c, at in rows}

    async def load_state(self, wanted: StateKeys) -> State:
        return await load_state_one_by_one(self, wanted)

    async def write(self, writes: Writes, now: datetime) -> list[OutboxRow]:
        """One statement per table, whatever the batch size: arrays in, ``unnest`` inside."""
        self._check_open()
        self._written = True
        conn = self._conn
        if writes.codes:
            codes = [code_row(r, _as_is) for r in writes.codes.values()]
            updates = ", ".join(
                f"{c} = EXCLUDED.{c}" for c in _CODE_COLUMNS.replace(" ", "").split(",")[1:]
            )
            await conn.execute(
                f"INSERT INTO codes ({_CODE_COLUMNS}) {_unnest(_CODE_TYPES)} "
                f"ON CONFLICT (scope_key) DO UPDATE SET {updates}",
                *_columns(codes, 12),
            )
        if writes.replies:
            replies = [(k, c, r.body, r.fingerprint) for (k, c), r in writes.replies.items()]
            await conn.execute(
                "INSERT INTO replies (kind, command_id, reply, fingerprint, created_at) "
                "SELECT k, c, r, f, $5 FROM unnest($1::text[], $2::text[], $3::bytea[], "
                "$4::bytea[]) AS t(k, c, r, f) ON CONFLICT DO NOTHING",
                *_columns(replies, 4),
                now,
            )
        if writes.sends:
            sends = [(s.scope_key, s.destination_key, s.sent_at) for s in writes.sends]
            await conn.execute(
                "INSERT INTO sends (scope_key, destination_key, sent_at) "
                + _unnest("text[], text[], timestamptz[]"),
                *_columns(sends, 3),
            )
        cleared = [u for u, s in writes.streaks.items() if s is None]
        if cleared:
            await conn.execute("DELETE FROM streaks WHERE user_name = ANY($1::text[])", cleared)
        kept = [(u, s.count, s.last_failure_at) for u, s in writes.streaks.items() if s]
        if kept:
            await conn.execute(
                "INSERT INTO streaks (user_name, count, last_failure_at) "
                + _unnest("text[], int[], timestamptz[]")
                + " ON CONFLICT (user_name) DO UPDATE SET count = EXCLUDED.count, "
                "last_failure_at = EXCLUDED.last_failure_at",
                *_columns(kept, 3),
            )
        if not writes.events:
            return []
        events = [(e.event_id, e.routing_key, e.type, e.body) for e in writes.events]
        rows = await conn.fetch(
            "INSERT INTO outbox (event_id, routing_key, type, body, created_at, lease_until) "
            "SELECT e, r, t, b, $5, $6 FROM unnest($1::text[], $2::text[], $3::text[], "
            "$4::bytea[]) AS u(e, r, t, b) RETURNING id, event_id",
            *_columns(events, 4),
            now,
            now + self._lease,
        )
        ids = {event_id: row_id for row_id, event_id in rows}
        return [OutboxRow(ids[e.event_id], e) for e in writes.events]
