"""The embedded store: SQLite through aiosqlite, WAL, one writer connection per process.

Every write transaction is ``BEGIN IMMEDIATE``: it takes the database's write lock up front,
so reads inside it see what no other process can change until commit. That is what makes
attempt counting exact across worker processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from worker.domain.model import CodeRecord, CodeState, FailureStreak, Scope
from worker.log import get_logger
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

log = get_logger(__name__)

_CODE_COLUMNS = (
    "scope_key, user, client, purpose, code_id, key_id, digest, sealed, "
    "issued_at, expires_at, attempts, state"
)


def _ts(value: datetime) -> float:
    return value.timestamp()


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _marks(count: int) -> str:
    return ",".join("?" * count)


def path_of(url: str) -> str:
    """``sqlite:///var/otp.db`` is relative, ``sqlite:////abs/otp.db`` absolute."""
    rest = url.split(":", 1)[1]
    if rest.startswith("///"):
        return rest[3:]
    if rest.startswith("//"):
        return rest[2:]
    return rest


class SqliteTransaction:
    def __init__(self, db: aiosqlite.Connection, lease_seconds: float) -> None:
        self._db = db
        self._lease_seconds = lease_seconds

    async def lock(self, keys: Collection[str]) -> None:
        """BEGIN IMMEDIATE already holds the database's single write lock."""

    async def _select(self, sql: str, params: Sequence[Any]) -> Iterable[sqlite3.Row]:
        return await self._db.execute_fetchall(sql, params)

    async def load_replies(self, keys: Collection[ReplyKey]) -> dict[ReplyKey, bytes]:
        if not keys:
            return {}
        by_kind: dict[str, list[str]] = {}
        for kind, command_id in keys:
            by_kind.setdefault(kind, []).append(command_id)
        found: dict[ReplyKey, bytes] = {}
        for kind, ids in by_kind.items():
            # kind first: the primary key (kind, command_id) serves the lookup.
            rows = await self._select(
                "SELECT command_id, reply FROM replies "
                f"WHERE kind = ? AND command_id IN ({_marks(len(ids))})",
                [kind, *ids],
            )
            found.update(((kind, c), r) for c, r in rows)
        return found

    async def load_codes(self, scopes: Collection[Scope]) -> dict[Scope, CodeRecord]:
        if not scopes:
            return {}
        by_key = {scope_key(s): s for s in scopes}
        rows = await self._select(
            f"SELECT {_CODE_COLUMNS} FROM codes WHERE scope_key IN ({_marks(len(by_key))})",
            list(by_key),
        )
        found = {}
        for row in rows:
            scope = by_key[row[0]]
            found[scope] = CodeRecord(
                code_id=row[4],
                scope=scope,
                key_id=row[5],
                digest=row[6],
                sealed=row[7],
                issued_at=_dt(row[8]),
                expires_at=_dt(row[9]),
                attempts=row[10],
                state=CodeState(row[11]),
            )
        return found

    async def load_sends(
        self, scope_keys: Collection[str], destination_keys: Collection[str], since: datetime
    ) -> SendCounts:
        by_scope: dict[str, list[datetime]] = {}
        by_destination: dict[str, list[datetime]] = {}
        if scope_keys:
            rows = await self._select(
                "SELECT scope_key, sent_at FROM sends "
                f"WHERE scope_key IN ({_marks(len(scope_keys))}) AND sent_at > ?",
                [*scope_keys, _ts(since)],
            )
            for key, at in rows:
                by_scope.setdefault(key, []).append(_dt(at))
        if destination_keys:
            rows = await self._select(
                "SELECT destination_key, sent_at FROM sends WHERE destination_key IN "
                f"({_marks(len(destination_keys))}) AND sent_at > ?",
                [*destination_keys, _ts(since)],
            )
            for key, at in rows:
                by_destination.setdefault(key, []).append(_dt(at))
        return SendCounts(by_scope, by_destination)

    async def load_streaks(self, users: Collection[str]) -> dict[str, FailureStreak]:
        if not users:
            return {}
        rows = await self._select(
            "SELECT user, count, last_failure_at FROM streaks "
            f"WHERE user IN ({_marks(len(users))})",
            list(users),
        )
        return {u: FailureStreak(count=c, last_failure_at=_dt(at)) for u, c, at in rows}

    async def write(self, writes: Writes, now: datetime) -> list[OutboxRow]:
        db = self._db
        if writes.codes:
            await db.executemany(
                f"INSERT OR REPLACE INTO codes ({_CODE_COLUMNS}) VALUES ({_marks(12)})",
                [
                    (
                        scope_key(r.scope),
                        r.scope.user,
                        r.scope.client,
                        r.scope.purpose,
                        r.code_id,
                        r.key_id,
                        r.digest,
                        r.sealed,
                        _ts(r.issued_at),
                        _ts(r.expires_at),
                        r.attempts,
                        r.state.value,
                    )
                    for r in writes.codes.values()
                ],
            )
        created = _ts(now)
        if writes.replies:
            await db.executemany(
                "INSERT OR IGNORE INTO replies (kind, command_id, reply, created_at) "
                "VALUES (?,?,?,?)",
                [(k, c, body, created) for (k, c), body in writes.replies.items()],
            )
        if writes.sends:
            await db.executemany(
                "INSERT INTO sends (scope_key, destination_key, sent_at) VALUES (?,?,?)",
                [(s.scope_key, s.destination_key, _ts(s.sent_at)) for s in writes.sends],
            )
        cleared = [u for u, s in writes.streaks.items() if s is None]
        if cleared:
            await db.execute(f"DELETE FROM streaks WHERE user IN ({_marks(len(cleared))})", cleared)
        kept = [(u, s.count, _ts(s.last_failure_at)) for u, s in writes.streaks.items() if s]
        if kept:
            await db.executemany(
                "INSERT OR REPLACE INTO streaks (user, count, last_failure_at) VALUES (?,?,?)", kept
            )
        if not writes.events:
            return []
        lease = created + self._lease_seconds
        rows = await db.execute_fetchall(
            "INSERT INTO outbox (event_id, routing_key, type, body, created_at, lease_until) "
            f"VALUES {','.join(['(?,?,?,?,?,?)'] * len(writes.events))} RETURNING id",
            [
                value
                for e in writes.events
                for value in (e.event_id, e.routing_key, e.type, e.body, created, lease)
            ],
        )
        return [OutboxRow(row[0], event) for row, event in zip(rows, writes.events, strict=True)]


FORGET_DELAY_SECONDS = 0.5
"""How long relayed outbox rows may wait for a write transaction to delete them in."""
_DELETE_CHUNK = 10_000  # below SQLite's limit on bound parameters


class SqliteStore:
    def __init__(self, db: aiosqlite.Connection, outbox_lease_seconds: float) -> None:
        self._db = db
        self._lock = asyncio.Lock()
        self._lease = outbox_lease_seconds
        self._forgotten: list[int] = []
        """Relayed outbox rows, deleted first thing in the next write transaction."""
        self._forget_task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        synchronous: str = "FULL",
        cache_mib: int = 2,
        outbox_lease_seconds: float = 30.0,
    ) -> SqliteStore:
        path = path_of(url)
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None, timeout=30.0)
        try:
            await db.execute("PRAGMA busy_timeout=30000")
            # The page cache is a bound on memory, filled as the database grows; beyond the
            # default 2 MiB it bought no throughput with a million codes stored (README).
            await db.execute(f"PRAGMA cache_size={-1024 * int(cache_mib)}")
            store = cls(db, outbox_lease_seconds)
            await _with_retries(lambda: db.execute("PRAGMA journal_mode=WAL"))
            await db.execute(f"PRAGMA synchronous={synchronous}")
            await _with_retries(store._migrate)
        except BaseException:
            await db.close()
            raise
        return store

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
        async with self._lock:
            try:
                await self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise TransientStoreError(str(exc)) from exc
            forgotten, self._forgotten = self._forgotten, []
            try:
                await self._delete_outbox(forgotten)
                yield self._db
            except BaseException:
                self._forgotten[:0] = forgotten
                await self._db.execute("ROLLBACK")
                raise
            try:
                await self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._forgotten[:0] = forgotten
                await self._db.execute("ROLLBACK")
                raise TransientStoreError(str(exc)) from exc

    async def _delete_outbox(self, ids: Sequence[int]) -> None:
        for start in range(0, len(ids), _DELETE_CHUNK):
            chunk = ids[start : start + _DELETE_CHUNK]
            await self._db.execute(f"DELETE FROM outbox WHERE id IN ({_marks(len(chunk))})", chunk)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTransaction]:
        try:
            async with self._write() as db:
                yield SqliteTransaction(db, self._lease)
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise TransientStoreError(str(exc)) from exc
            raise

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
                (_ts(now) + lease_seconds, ignore_leases, _ts(now), after_id, limit),
            )
        return sorted(
            (OutboxRow(r[0], OutboxEvent(r[1], r[2], r[3], r[4])) for r in rows),
            key=lambda row: row.id,
        )

    async def delete_outbox(self, ids: Collection[int]) -> None:
        if not ids:
            return
        async with self._write():
            await self._delete_outbox(list(ids))

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
        return None if rows[0][0] is None else _dt(rows[0][0])

    async def sweep(
        self,
        now: datetime,
        code_retention_seconds: float,
        reply_retention_seconds: float,
        send_window_seconds: float,
        limit: int,
    ) -> SweepResult:
        at = _ts(now)
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
        if self._forget_task is not None:
            self._forget_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._forget_task
        try:
            await self._flush_forgotten()
        finally:
            await self._db.close()


async def _with_retries(step: Callable[[], Awaitable[object]], attempts: int = 40) -> None:
    """Switching to WAL and migrating need locks that SQLite refuses at once, without its
    busy handler, while other processes open the same new file: retry those briefly."""
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
