"""A look at a store that changes nothing, for ``otp check``.

``open_store`` is the worker's: it creates a missing SQLite file and its directories, and
brings any schema up to date. A check run from the wrong directory, or pointed at the wrong
database, would then report a store it had just made, empty and fine. The probe opens the
store read-only and calls it unreachable unless a worker has already migrated it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import aiosqlite
import asyncpg

from worker.store.migrations import migrations
from worker.store.postgres import TRANSIENT_ERRORS
from worker.store.urls import path_of, store_backend


class NotAnOtpStore(Exception):
    """The database is there but no worker (of this version) has migrated it."""


class StoreProbe(Protocol):
    backend: str
    schema_version: int

    async def outbox_backlog(self) -> int: ...

    async def close(self) -> None: ...


async def probe_store(url: str) -> StoreProbe:
    if store_backend(url) == "sqlite":
        return await SqliteProbe.open(url)
    return await PostgresProbe.open(url)


def _require_migrated(backend: str, found: int) -> int:
    expected = migrations(backend)[-1][0]
    if found == 0:
        raise NotAnOtpStore("not an OTP database: no schema (has a worker ever run on it?)")
    if found < expected:
        raise NotAnOtpStore(
            f"schema version {found}, this otp expects {expected}: a worker of this version "
            "migrates it at start"
        )
    return found


def read_only_uri(url: str) -> str:
    """Read-only, so a missing file is an error rather than a new database. Without a
    ``-wal`` file no process has the database open (the last one to close removes it), and it
    is read as immutable: a read-only connection would otherwise create ``-wal`` and ``-shm``
    files it cannot remove."""
    path = Path(path_of(url)).absolute()
    if not path.is_file():
        raise FileNotFoundError(f"no SQLite database at {path}")
    mode = "mode=ro" if Path(f"{path}-wal").exists() else "mode=ro&immutable=1"
    return f"{path.as_uri()}?{mode}"


class SqliteProbe:
    backend = "sqlite"

    def __init__(self, db: aiosqlite.Connection, schema_version: int) -> None:
        self._db = db
        self.schema_version = schema_version

    @classmethod
    async def open(cls, url: str) -> SqliteProbe:
        db = await aiosqlite.connect(read_only_uri(url), uri=True, timeout=5.0)
        try:
            rows = list(await db.execute_fetchall("PRAGMA user_version"))
            version = _require_migrated("sqlite", int(rows[0][0]))
        except BaseException:
            await db.close()
            raise
        return cls(db, version)

    async def outbox_backlog(self) -> int:
        rows = list(await self._db.execute_fetchall("SELECT count(*) FROM outbox"))
        return int(rows[0][0])

    async def close(self) -> None:
        await self._db.close()


class PostgresProbe:
    backend = "postgresql"

    def __init__(self, conn: asyncpg.Connection, schema_version: int) -> None:
        self._conn = conn
        self.schema_version = schema_version

    @classmethod
    async def open(cls, url: str) -> PostgresProbe:
        """One connection whose transactions are all read-only, so no statement of the probe
        can change the database even by mistake."""
        try:
            conn = await asyncpg.connect(
                url,
                server_settings={
                    "default_transaction_read_only": "on",
                    "application_name": "otp-check",
                },
            )
        except TRANSIENT_ERRORS as exc:
            raise ConnectionError(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            found = 0
            if await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL"):
                found = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
            version = _require_migrated("postgresql", int(found))
        except BaseException:
            await conn.close()
            raise
        return cls(conn, version)

    async def outbox_backlog(self) -> int:
        return int(await self._conn.fetchval("SELECT count(*) FROM outbox"))

    async def close(self) -> None:
        await self._conn.close()
