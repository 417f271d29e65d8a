"""What the notifier remembers: which ``code.issued`` events it has delivered, for a while.

A redelivered or republished event (the outbox publishes at least once) must not send a
second message. The table lives in the service's database but belongs to the notifier alone,
so the notifier creates it itself (idempotently) instead of going through the worker's
migrations. Rows older than the retention are swept; by then no copy of the event is left.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import aiosqlite

from worker.store.sqlite import path_of

_CREATE = (
    "CREATE TABLE IF NOT EXISTS deliveries ("
    " event_id TEXT PRIMARY KEY,"
    " delivered_at {time} NOT NULL,"
    " attempts INTEGER NOT NULL)"
)
_CREATE_INDEX = "CREATE INDEX IF NOT EXISTS deliveries_delivered_at ON deliveries (delivered_at)"


class DeliveryStore(Protocol):
    async def delivered(self, event_id: str) -> int | None:
        """The attempts the delivery took, or None when it was never delivered."""

    async def remember(self, event_id: str, attempts: int, now: datetime) -> None: ...

    async def sweep(self, before: datetime, limit: int = 1000) -> int: ...

    async def close(self) -> None: ...


class SqliteDeliveryStore:
    """One connection; WAL with ``synchronous=NORMAL``, since a lost row costs at most a resend."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, url: str) -> SqliteDeliveryStore:
        path = Path(path_of(url))
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        await db.execute("PRAGMA busy_timeout = 10000")
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = NORMAL")
        await db.execute(_CREATE.format(time="REAL"))
        await db.execute(_CREATE_INDEX)
        return cls(db)

    async def delivered(self, event_id: str) -> int | None:
        rows = list(
            await self._db.execute_fetchall(
                "SELECT attempts FROM deliveries WHERE event_id = ?", (event_id,)
            )
        )
        return int(rows[0][0]) if rows else None

    async def remember(self, event_id: str, attempts: int, now: datetime) -> None:
        await self._db.execute(
            "INSERT INTO deliveries (event_id, delivered_at, attempts) VALUES (?, ?, ?)"
            " ON CONFLICT (event_id) DO NOTHING",
            (event_id, now.timestamp(), attempts),
        )

    async def sweep(self, before: datetime, limit: int = 1000) -> int:
        cursor = await self._db.execute(
            "DELETE FROM deliveries WHERE event_id IN"
            " (SELECT event_id FROM deliveries WHERE delivered_at < ? LIMIT ?)",
            (before.timestamp(), limit),
        )
        return cursor.rowcount

    async def close(self) -> None:
        await self._db.close()


class PostgresDeliveryStore:
    def __init__(self, pool: Any) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str) -> PostgresDeliveryStore:
        import asyncpg

        pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
        async with pool.acquire() as conn:
            # Two notifiers starting together may race on the catalogue; one of them wins.
            try:
                await conn.execute(_CREATE.format(time="TIMESTAMPTZ"))
                await conn.execute(_CREATE_INDEX)
            except (asyncpg.UniqueViolationError, asyncpg.DuplicateTableError):
                pass
        return cls(pool)

    async def delivered(self, event_id: str) -> int | None:
        value = await self._pool.fetchval(
            "SELECT attempts FROM deliveries WHERE event_id = $1", event_id
        )
        return None if value is None else int(value)

    async def remember(self, event_id: str, attempts: int, now: datetime) -> None:
        await self._pool.execute(
            "INSERT INTO deliveries (event_id, delivered_at, attempts) VALUES ($1, $2, $3)"
            " ON CONFLICT (event_id) DO NOTHING",
            event_id,
            now.astimezone(UTC),
            attempts,
        )

    async def sweep(self, before: datetime, limit: int = 1000) -> int:
        status: str = await self._pool.execute(
            "DELETE FROM deliveries WHERE event_id IN"
            " (SELECT event_id FROM deliveries WHERE delivered_at < $1 LIMIT $2)",
            before.astimezone(UTC),
            limit,
        )
        return int(status.rsplit(" ", 1)[-1])

    async def close(self) -> None:
        await self._pool.close()


async def open_delivery_store(url: str) -> DeliveryStore:
    if url.startswith("sqlite:"):
        return await SqliteDeliveryStore.open(url)
    if url.startswith(("postgresql:", "postgres:")):
        return await PostgresDeliveryStore.open(url)
    raise ValueError(f"unsupported database URL scheme: {url.split(':', 1)[0]!r}")
