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
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from worker.store.base import (
    OutboxRow,
    StoreRefused,
    SweepResult,
    TransientStoreError,
    claimed_rows,
)
from worker.store.migrations import migrations
from worker.store.postgres_transaction import PostgresTransaction

MIGRATION_LOCK_ID = 0x6F74705F736368  # "otp_sch": one advisory lock id for schema changes
ACQUIRE_TIMEOUT_SECONDS = 10.0

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: disk full, out of memory,
    # too many connections: the server's state of the moment, not the commands'
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    # A statement_timeout hit while a batch waits for another's locks, a cancel by an
    # operator, idle timeouts, a server that became read-only in a failover: all pass.
    asyncpg.exceptions.QueryCanceledError,
    asyncpg.exceptions.IdleSessionTimeoutError,
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.InterfaceError,
    OSError,
    TimeoutError,
)


async def connect_pool(url: str, **options: Any) -> asyncpg.Pool:
    """``asyncpg.create_pool``, with a server that cannot be reached as a transient error
    that names PostgreSQL (a bare "Connection refused" would not say what refused)."""
    try:
        return await asyncpg.create_pool(url, **options)
    except TRANSIENT_ERRORS as exc:
        raise TransientStoreError(f"cannot connect to PostgreSQL: {exc}") from exc
    except (
        asyncpg.exceptions.InvalidAuthorizationSpecificationError,  # no such role, bad password
        asyncpg.exceptions.InvalidCatalogNameError,  # no such database
    ) as exc:
        raise StoreRefused(f"PostgreSQL refused the connection: {exc}") from exc


@asynccontextmanager
async def schema_lock(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """A session advisory lock held while a process changes the schema: workers and
    notifiers starting together take turns. ``CREATE ... IF NOT EXISTS`` alone is not safe
    against a concurrent ``CREATE`` of the same table (one of them fails with 'type ...
    already exists'), and a migration must run once."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        yield
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool, outbox_lease_seconds: float) -> None:
        self._pool = pool
        self._lease = outbox_lease_seconds

    @classmethod
    async def open(
        cls, url: str, *, outbox_lease_seconds: float = 30.0, pool_size: int = 5
    ) -> PostgresStore:
        pool = await connect_pool(url, min_size=1, max_size=pool_size, command_timeout=60)
        store = cls(pool, outbox_lease_seconds)
        try:
            await store._migrate()
        except BaseException:
            await pool.close()
            raise
        return store

    async def _migrate(self) -> None:
        """Under the schema lock, so processes starting together apply each file once."""
        async with self._pool.acquire() as conn, schema_lock(conn):
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
            for version, sql in migrations("postgresql"):
                if version > current:
                    async with conn.transaction():
                        await conn.execute(sql)
                        await conn.execute(
                            "INSERT INTO schema_version (version) VALUES ($1)", version
                        )

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_SECONDS) as conn:
                yield conn
        except TRANSIENT_ERRORS as exc:
            raise TransientStoreError(f"{type(exc).__name__}: {exc}") from exc

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresTransaction]:
        # READ COMMITTED said, not left to the server: under a default of REPEATABLE READ
        # the snapshot would be taken by the first statement, the lock, before it waits,
        # and the batch would decide on what the lock's last holder had not yet committed.
        async with self._connection() as conn, conn.transaction(isolation="read_committed"):
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
        return claimed_rows(rows)

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
