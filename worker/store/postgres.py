"""The scale-out store: PostgreSQL through an asyncpg pool, for any number of worker processes.

Transactions run at READ COMMITTED. What makes attempt counting exact across processes is
``lock``: every row a batch reads or writes is named by one of its lock keys (command id,
scope, user, destination), and each key maps to a transaction-scoped advisory lock taken in
the caller's sorted order, so two batches that share a key run one after the other and batches
that share none never wait for each other. Loads happen after ``lock`` and therefore see every
commit of an earlier holder.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from worker.domain.model import CodeRecord, CodeState, FailureStreak, Scope
from worker.store.base import (
    OutboxEvent,
    OutboxRow,
    ReplyKey,
    SendCounts,
    SweepResult,
    TransientStoreError,
    Writes,
)
from worker.store.keys import scope_key
from worker.store.migrations import migrations

MIGRATION_LOCK_ID = 0x6F74705F736368  # "otp_sch": one advisory lock id for schema changes
ACQUIRE_TIMEOUT_SECONDS = 10.0

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.InterfaceError,
    OSError,
    TimeoutError,
)

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


def _unnest(types: str) -> str:
    params = ", ".join(f"${i}::{t.strip()}" for i, t in enumerate(types.split(","), 1))
    return f"SELECT * FROM unnest({params})"


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width


class PostgresTransaction:
    def __init__(self, conn: asyncpg.Connection, lease_seconds: float) -> None:
        self._conn = conn
        self._lease = timedelta(seconds=lease_seconds)

    async def lock(self, keys: Collection[str]) -> None:
        """Advisory locks in the given (sorted) order: every process takes them in the same
        order, so concurrent batches queue up instead of deadlocking."""
        ids = list(dict.fromkeys(lock_id(key) for key in keys))
        if ids:
            await self._conn.execute(
                "SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS t(k)", ids
            )

    async def load_replies(self, keys: Collection[ReplyKey]) -> dict[ReplyKey, bytes]:
        if not keys:
            return {}
        kinds, ids = zip(*keys, strict=True)
        rows = await self._conn.fetch(
            "SELECT r.kind, r.command_id, r.reply FROM replies r "
            "JOIN unnest($1::text[], $2::text[]) AS k(kind, command_id) "
            "USING (kind, command_id)",
            list(kinds),
            list(ids),
        )
        return {(r[0], r[1]): bytes(r[2]) for r in rows}

    async def load_codes(self, scopes: Collection[Scope]) -> dict[Scope, CodeRecord]:
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
        if not users:
            return {}
        rows = await self._conn.fetch(
            "SELECT user_name, count, last_failure_at FROM streaks "
            "WHERE user_name = ANY($1::text[])",
            list(users),
        )
        return {u: FailureStreak(count=c, last_failure_at=at) for u, c, at in rows}

    async def write(self, writes: Writes, now: datetime) -> list[OutboxRow]:
        """One statement per table, whatever the batch size: arrays in, ``unnest`` inside."""
        conn = self._conn
        if writes.codes:
            codes = [
                (
                    scope_key(r.scope),
                    r.scope.user,
                    r.scope.client,
                    r.scope.purpose,
                    r.code_id,
                    r.key_id,
                    r.digest,
                    r.sealed,
                    r.issued_at,
                    r.expires_at,
                    r.attempts,
                    r.state.value,
                )
                for r in writes.codes.values()
            ]
            updates = ", ".join(
                f"{c} = EXCLUDED.{c}" for c in _CODE_COLUMNS.replace(" ", "").split(",")[1:]
            )
            await conn.execute(
                f"INSERT INTO codes ({_CODE_COLUMNS}) {_unnest(_CODE_TYPES)} "
                f"ON CONFLICT (scope_key) DO UPDATE SET {updates}",
                *_columns(codes, 12),
            )
        if writes.replies:
            replies = [(k, c, body) for (k, c), body in writes.replies.items()]
            await conn.execute(
                "INSERT INTO replies (kind, command_id, reply, created_at) "
                "SELECT k, c, r, $4 FROM unnest($1::text[], $2::text[], $3::bytea[]) AS t(k, c, r) "
                "ON CONFLICT DO NOTHING",
                *_columns(replies, 3),
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


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool, outbox_lease_seconds: float) -> None:
        self._pool = pool
        self._lease = outbox_lease_seconds

    @classmethod
    async def open(
        cls, url: str, *, outbox_lease_seconds: float = 30.0, pool_size: int = 5
    ) -> PostgresStore:
        try:
            pool = await asyncpg.create_pool(
                url, min_size=1, max_size=pool_size, command_timeout=60
            )
        except TRANSIENT_ERRORS as exc:
            raise TransientStoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        store = cls(pool, outbox_lease_seconds)
        try:
            await store._migrate()
        except BaseException:
            await pool.close()
            raise
        return store

    async def _migrate(self) -> None:
        """Under a session advisory lock, so processes starting together apply each file once."""
        async with self._pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version ("
                    "version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
                current = await conn.fetchval(
                    "SELECT coalesce(max(version), 0) FROM schema_version"
                )
                for version, sql in migrations("postgresql"):
                    if version > current:
                        async with conn.transaction():
                            await conn.execute(sql)
                            await conn.execute(
                                "INSERT INTO schema_version (version) VALUES ($1)", version
                            )
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_SECONDS) as conn:
                yield conn
        except TRANSIENT_ERRORS as exc:
            raise TransientStoreError(f"{type(exc).__name__}: {exc}") from exc

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresTransaction]:
        async with self._connection() as conn, conn.transaction():
            yield PostgresTransaction(conn, self._lease)

    async def claim_outbox(
        self,
        now: datetime,
        lease_seconds: float,
        limit: int,
        *,
        ignore_leases: bool = False,
        after_id: int = 0,
    ) -> list[OutboxRow]:
        """SKIP LOCKED: relays of several processes claim disjoint rows without waiting."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "UPDATE outbox SET lease_until = $1 WHERE id IN (SELECT id FROM outbox "
                "WHERE ($2 OR lease_until <= $3) AND id > $4 ORDER BY id LIMIT $5 "
                "FOR UPDATE SKIP LOCKED) RETURNING id, event_id, routing_key, body, type",
                now + timedelta(seconds=lease_seconds),
                ignore_leases,
                now,
                after_id,
                limit,
            )
        return sorted(
            (OutboxRow(r[0], OutboxEvent(r[1], r[2], bytes(r[3]), r[4])) for r in rows),
            key=lambda row: row.id,
        )

    async def delete_outbox(self, ids: Collection[int]) -> None:
        if not ids:
            return
        async with self._connection() as conn:
            await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", list(ids))

    async def forget_outbox(self, ids: Collection[int]) -> None:
        """Relayed rows: deleted at once, since the pool's connections write concurrently."""
        await self.delete_outbox(ids)

    async def outbox_backlog(self) -> int:
        async with self._connection() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM outbox"))

    async def outbox_oldest(self) -> datetime | None:
        async with self._connection() as conn:
            oldest: datetime | None = await conn.fetchval("SELECT min(created_at) FROM outbox")
            return oldest

    async def sweep(
        self,
        now: datetime,
        code_retention_seconds: float,
        reply_retention_seconds: float,
        send_window_seconds: float,
        limit: int,
    ) -> SweepResult:
        """Small batches of rows nobody holds (SKIP LOCKED): the sweeper never blocks a batch."""
        plan = (
            ("codes", "expires_at", code_retention_seconds),
            ("replies", "created_at", reply_retention_seconds),
            ("sends", "sent_at", send_window_seconds),
            ("streaks", "last_failure_at", send_window_seconds),
        )
        counts = []
        async with self._connection() as conn:
            for table, column, retention in plan:
                status = await conn.execute(
                    f"DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} "
                    f"WHERE {column} < $1 LIMIT $2 FOR UPDATE SKIP LOCKED))",
                    now - timedelta(seconds=retention),
                    limit,
                )
                counts.append(int(status.rsplit(" ", 1)[-1]))
        return SweepResult(*counts)

    async def ping(self) -> None:
        async with self._connection() as conn:
            await asyncio.wait_for(conn.fetchval("SELECT 1"), ACQUIRE_TIMEOUT_SECONDS)

    async def close(self) -> None:
        await self._pool.close()
