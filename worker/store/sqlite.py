"""The embedded store: SQLite through aiosqlite, WAL, one writer connection per process.

Every write transaction is ``BEGIN IMMEDIATE``: it takes the database's write lock up front,
so reads inside it see what no other process can change until commit. That is what makes
attempt counting exact across worker processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import aiosqlite

from worker.log import get_logger
from worker.store.base import (
    OutboxRow,
    StoreRefused,
    SweepResult,
    TransientStoreError,
    claimed_rows,
)
from worker.store.checkpointer import Checkpointer, wal_reset_fixed
from worker.store.migrations import migrations
from worker.store.sqlite_transaction import (
    SqliteTransaction,
    delete_outbox,
    from_ts,
    rollback_if_open,
    run_in_thread,
    ts,
)
from worker.store.urls import path_of

log = get_logger(__name__)


TRANSIENT_ERROR_NAMES = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_IOERR")


def is_transient(exc: BaseException) -> bool:
    """An error of the moment, not of the commands: another process holds the write lock,
    or the disk is full or failing. The consumer retries such a batch and then requeues it,
    where an error of its own making would have its commands dead-lettered one by one
    (a full disk would otherwise cost every command of the moment its reply)."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    name = getattr(exc, "sqlite_errorname", None) or ""
    return name.startswith(TRANSIENT_ERROR_NAMES) or "locked" in str(exc) or "busy" in str(exc)


FORGET_DELAY_SECONDS = 0.5
"""How long relayed outbox rows may wait for a write transaction to delete them in."""
CLOSE_BUSY_MS = 2000
"""How long closing waits for a locked store to delete the relayed outbox rows."""
WAL_AUTOCHECKPOINT_PAGES = 10_000
"""The worker's connection checkpoints in the commit that takes the log past this many
pages (~40 MiB; SQLite's own default is 1 000). With a large store a batch dirties pages
all over the file, so at 1 000 nearly every commit also copied its pages back into the
database and synced it; at 10 000 one in ten does, over a log in which pages written twice
are copied once (the 1M-prestored run's ratio to the empty store: 0.70-0.82 at 10 000
against 0.63-0.68 at 1 000, bench/RUNS.md)."""
NOTIFIER_WAL_AUTOCHECKPOINT_PAGES = 100_000
"""The notifier's mark, ten times the worker's: with a worker on the file the log never
gets there, so the worker's connection is the only one that checkpoints. Two connections
checkpointing one log are what SQLite's WAL-reset bug (before 3.51.3) needs; a notifier
at 1 000 would also checkpoint in each of its commits while the worker's log sat between
the marks. Alone on a file, the notifier still bounds its log (~400 MiB)."""


class SqliteStore:
    def __init__(self, db: aiosqlite.Connection, outbox_lease_seconds: float) -> None:
        self._db = db
        self._lock = asyncio.Lock()
        self._lease = outbox_lease_seconds
        self._forgotten: list[int] = []
        """Relayed outbox rows, deleted first thing in the next write transaction."""
        self._forget_task: asyncio.Task[None] | None = None
        self.checkpointer: Checkpointer | None = None
        self.checkpoints = "in the commits"
        """Where WAL checkpoints happen and why, for the worker's start line (not logged
        here: a start that fails must stay one line)."""

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        synchronous: str = "FULL",
        cache_mib: int = 2,
        outbox_lease_seconds: float = 30.0,
        checkpoint_interval: float = 0.0,
    ) -> SqliteStore:
        """``checkpoint_interval`` > 0 moves WAL checkpoints to a thread of their own
        (``worker.store.checkpointer``); 0 leaves them to SQLite, inside the commits."""
        path = path_of(url)
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = await open_wal(path, busy_ms=30_000, timeout=30.0)
        try:
            # The page cache is a bound on memory, filled as the database grows; beyond the
            # default 2 MiB it bought no throughput with a million codes stored (README).
            await db.execute(f"PRAGMA cache_size={-1024 * int(cache_mib)}")
            store = cls(db, outbox_lease_seconds)
            await db.execute(f"PRAGMA synchronous={synchronous}")
            await retry_locked(store._migrate)
            if checkpoint_interval > 0 and path != ":memory:":
                store._start_checkpointer(path, checkpoint_interval)
        except BaseException:
            await db.close()
            raise
        return store

    def _start_checkpointer(self, path: str, interval: float) -> None:
        if not wal_reset_fixed():
            self.checkpoints = (
                f"in the commits: SQLite {sqlite3.sqlite_version} has the WAL-reset bug, which "
                "a checkpoint on a second connection could hit (fixed in 3.51.3, 3.50.7, 3.44.6)"
            )
            return
        self.checkpointer = Checkpointer(path, interval)
        self.checkpointer.start()
        self.checkpoints = f"on a thread of their own, every {interval:g} s"

    async def _migrate(self) -> None:
        async with self._write() as db:
            rows = list(await db.execute_fetchall("PRAGMA user_version"))
            current = rows[0][0]
            for version, sql in migrations("sqlite"):
                if version > current:
                    for statement in _statements(sql):
                        await db.execute(statement)
                    await db.execute(f"PRAGMA user_version={version}")

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction for the store's own upkeep (the commands' go through
        ``transaction``): begun and committed in trips of their own."""
        async with self.transaction() as tx:
            await tx.begin()
            yield self._db

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTransaction]:
        async with self._lock:
            tx = SqliteTransaction(self._db, self._lease, self._take_forgotten)
            try:
                yield tx
                await tx.finish()
            except BaseException as exc:
                if not tx.committed:
                    self._forgotten[:0] = tx.forgotten
                    if tx.begun:
                        # Queued behind any step still running on the thread (after a
                        # cancel, say): closes what it opened, so the next BEGIN works.
                        await run_in_thread(self._db, rollback_if_open)
                if is_transient(exc):
                    raise TransientStoreError(str(exc)) from exc
                raise

    def _take_forgotten(self) -> list[int]:
        forgotten, self._forgotten = self._forgotten, []
        return forgotten

    async def claim_outbox(
        self,
        now: datetime,
        lease_seconds: float,
        limit: int,
        *,
        ignore_leases: bool = False,
        after_id: int = 0,
    ) -> list[OutboxRow]:
        async with self._write() as db:
            rows = await db.execute_fetchall(
                "UPDATE outbox SET lease_until = ? WHERE id IN (SELECT id FROM outbox "
                "WHERE (? OR lease_until <= ?) AND id > ? ORDER BY id LIMIT ?) "
                "RETURNING id, event_id, routing_key, body, type",
                (ts(now) + lease_seconds, ignore_leases, ts(now), after_id, limit),
            )
        return claimed_rows(rows)

    async def delete_outbox(self, ids: Collection[int]) -> None:
        if not ids:
            return
        async with self._write():
            await run_in_thread(self._db, delete_outbox, list(ids))

    async def forget_outbox(self, ids: Collection[int]) -> None:
        """Deletes relayed rows in the next write transaction, not in one of their own.

        SQLite has one writer: a transaction (and a synchronous commit) per relay pass would
        hold up the command batches. If no write comes within ``FORGET_DELAY_SECONDS`` the
        rows are deleted on their own. Should the process die first, they are relayed again
        (the event stream is at-least-once; ``event_id`` tells the copies apart).
        """
        if not ids:
            return
        self._forgotten.extend(ids)
        if self._forget_task is None:
            self._forget_task = asyncio.create_task(self._flush_forgotten_later())

    async def _flush_forgotten_later(self) -> None:
        try:
            await asyncio.sleep(FORGET_DELAY_SECONDS)
            await self._flush_forgotten()
        except Exception as exc:  # kept: the next write transaction deletes them
            log.warning("deleting relayed outbox rows failed; retried later", error=repr(exc))
        finally:
            self._forget_task = None

    async def _flush_forgotten(self) -> None:
        if self._forgotten:
            async with self._write():
                pass  # every write transaction starts by deleting them

    async def outbox_backlog(self) -> int:
        await self._flush_forgotten()
        async with self._lock:
            rows = list(await self._db.execute_fetchall("SELECT count(*) FROM outbox"))
        return int(rows[0][0])

    async def outbox_oldest(self) -> datetime | None:
        await self._flush_forgotten()
        async with self._lock:
            rows = list(await self._db.execute_fetchall("SELECT min(created_at) FROM outbox"))
        return None if rows[0][0] is None else from_ts(rows[0][0])

    async def sweep(
        self,
        now: datetime,
        code_retention_seconds: float,
        reply_retention_seconds: float,
        send_window_seconds: float,
        limit: int,
    ) -> SweepResult:
        at = ts(now)
        plan = (
            ("codes", "scope_key", "expires_at", at - code_retention_seconds),
            ("replies", "rowid", "created_at", at - reply_retention_seconds),
            ("sends", "id", "sent_at", at - send_window_seconds),
            ("streaks", "user", "last_failure_at", at - send_window_seconds),
        )
        counts = []
        for table, key, column, before in plan:
            if table == "replies":
                sql = (
                    "DELETE FROM replies WHERE (kind, command_id) IN (SELECT kind, command_id "
                    "FROM replies WHERE created_at < ? LIMIT ?)"
                )
            else:
                sql = (
                    f"DELETE FROM {table} WHERE {key} IN "
                    f"(SELECT {key} FROM {table} WHERE {column} < ? LIMIT ?)"
                )
            async with self._write() as db:
                cursor = await db.execute(sql, (before, limit))
                counts.append(cursor.rowcount)
        return SweepResult(*counts)

    async def ping(self) -> None:
        async with self._lock:
            await self._db.execute_fetchall("SELECT 1")

    async def close(self) -> None:
        """Deletes the relayed outbox rows still waiting for a write, then closes. Never
        raises for them, and waits for a locked store only ``CLOSE_BUSY_MS``: rows left
        behind are only published again at the next start (subscribers dedupe), while a
        close that raised turned a clean SIGTERM into exit 1, a minute later."""
        if self._forget_task is not None:
            self._forget_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._forget_task
        try:
            if self._forgotten:
                await self._db.execute(f"PRAGMA busy_timeout={CLOSE_BUSY_MS}")
                await self._flush_forgotten()
        except Exception as exc:
            log.warning(
                "relayed outbox rows not deleted at close; they are published again at the "
                "next start",
                rows=len(self._forgotten),
                error=repr(exc),
            )
        finally:
            try:
                if self.checkpointer is not None:
                    await self.checkpointer.stop()
            finally:  # a cancelled stop must not leave the writer's (non-daemon) thread
                await self._db.close()


async def open_wal(
    path: str | Path,
    *,
    busy_ms: int,
    timeout: float = 5.0,
    autocheckpoint_pages: int = WAL_AUTOCHECKPOINT_PAGES,
) -> aiosqlite.Connection:
    """A connection to ``path`` in WAL mode, with a busy handler of ``busy_ms``.

    A path SQLite cannot open, or a file that is not a SQLite database, raises
    ``StoreRefused``: no retry mends it, and at start it is one line, not a traceback."""
    try:
        db = await aiosqlite.connect(path, isolation_level=None, timeout=timeout)
    except sqlite3.Error as exc:
        raise StoreRefused(f"SQLite cannot open {path}: {exc}") from exc
    try:
        await db.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
        # Processes opening a new file together (replicas starting at once) are refused the
        # locks this needs without the busy handler being asked: retried.
        await retry_locked(lambda: db.execute("PRAGMA journal_mode=WAL"))
        await db.execute(f"PRAGMA wal_autocheckpoint={int(autocheckpoint_pages)}")
    except BaseException as exc:
        await db.close()  # an open connection's thread would keep the process from exiting
        if isinstance(exc, sqlite3.DatabaseError) and not is_transient(exc):
            raise StoreRefused(f"SQLite cannot use {path}: {exc}") from exc
        raise
    return db


async def retry_locked(step: Callable[[], Awaitable[object]], attempts: int = 40) -> None:
    """Switching to WAL and creating the schema need locks that SQLite refuses at once,
    without its busy handler, while other connections open the same new file: retry those
    briefly. Used by the worker's store and the notifier's."""
    for attempt in range(attempts):
        try:
            await step()
            return
        except (sqlite3.OperationalError, TransientStoreError) as exc:
            if ("locked" not in str(exc) and "busy" not in str(exc)) or attempt == attempts - 1:
                raise
            await asyncio.sleep(min(0.02 * (attempt + 1), 0.5))


def _statements(script: str) -> list[str]:
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
