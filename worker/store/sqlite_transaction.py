"""One SQLite write transaction: the batch-shaped reads and the one write of a batch.

It runs inside ``SqliteStore``'s ``BEGIN IMMEDIATE`` (``sqlite.py``), so what it reads no
other process can change before it commits.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import aiosqlite

from worker.domain.model import CodeRecord, CodeState, FailureStreak, Scope
from worker.store.base import OutboxRow, ReplyKey, SendCounts, Writes
from worker.store.keys import scope_key

_CODE_COLUMNS = (
    "scope_key, user, client, purpose, code_id, key_id, digest, sealed, "
    "issued_at, expires_at, attempts, state"
)


def ts(value: datetime) -> float:
    """Times are stored as Unix seconds (REAL): compact, and ordered in indexes."""
    return value.timestamp()


def from_ts(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def marks(count: int) -> str:
    """``?,?,?``: the placeholders of an ``IN (...)`` list."""
    return ",".join("?" * count)


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
                f"WHERE kind = ? AND command_id IN ({marks(len(ids))})",
                [kind, *ids],
            )
            found.update(((kind, c), r) for c, r in rows)
        return found

    async def load_codes(self, scopes: Collection[Scope]) -> dict[Scope, CodeRecord]:
        if not scopes:
            return {}
        by_key = {scope_key(s): s for s in scopes}
        rows = await self._select(
            f"SELECT {_CODE_COLUMNS} FROM codes WHERE scope_key IN ({marks(len(by_key))})",
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
                issued_at=from_ts(row[8]),
                expires_at=from_ts(row[9]),
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
                f"WHERE scope_key IN ({marks(len(scope_keys))}) AND sent_at > ?",
                [*scope_keys, ts(since)],
            )
            for key, at in rows:
                by_scope.setdefault(key, []).append(from_ts(at))
        if destination_keys:
            rows = await self._select(
                "SELECT destination_key, sent_at FROM sends WHERE destination_key IN "
                f"({marks(len(destination_keys))}) AND sent_at > ?",
                [*destination_keys, ts(since)],
            )
            for key, at in rows:
                by_destination.setdefault(key, []).append(from_ts(at))
        return SendCounts(by_scope, by_destination)

    async def load_streaks(self, users: Collection[str]) -> dict[str, FailureStreak]:
        if not users:
            return {}
        rows = await self._select(
            f"SELECT user, count, last_failure_at FROM streaks WHERE user IN ({marks(len(users))})",
            list(users),
        )
        return {u: FailureStreak(count=c, last_failure_at=from_ts(at)) for u, c, at in rows}

    async def write(self, writes: Writes, now: datetime) -> list[OutboxRow]:
        db = self._db
        if writes.codes:
            await db.executemany(
                f"INSERT OR REPLACE INTO codes ({_CODE_COLUMNS}) VALUES ({marks(12)})",
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
                        ts(r.issued_at),
                        ts(r.expires_at),
                        r.attempts,
                        r.state.value,
                    )
                    for r in writes.codes.values()
                ],
            )
        created = ts(now)
        if writes.replies:
            await db.executemany(
                "INSERT OR IGNORE INTO replies (kind, command_id, reply, created_at) "
                "VALUES (?,?,?,?)",
                [(k, c, body, created) for (k, c), body in writes.replies.items()],
            )
        if writes.sends:
            await db.executemany(
                "INSERT INTO sends (scope_key, destination_key, sent_at) VALUES (?,?,?)",
                [(s.scope_key, s.destination_key, ts(s.sent_at)) for s in writes.sends],
            )
        cleared = [u for u, s in writes.streaks.items() if s is None]
        if cleared:
            await db.execute(f"DELETE FROM streaks WHERE user IN ({marks(len(cleared))})", cleared)
        kept = [(u, s.count, ts(s.last_failure_at)) for u, s in writes.streaks.items() if s]
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
