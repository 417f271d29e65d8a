"""One SQLite write transaction: the batch-shaped reads and the one write of a batch.

It is a ``BEGIN IMMEDIATE`` transaction, so what it reads no other process can change
before it commits.

aiosqlite runs every call on the connection's own thread, one trip there and back per
statement; a batch needs about a dozen statements, and under load each trip costs the event
loop a wake-up, the thread a wait for a CPU, and both a wait for the GIL. So each step here
is one plain ``sqlite3`` function that runs all its statements in one trip, through
``run_in_thread``, and a batch takes two trips: the first step also begins the transaction
(and deletes the relayed outbox rows waiting for one), and ``write`` also commits it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiosqlite

from worker.domain.model import CodeRecord, CodeState, FailureStreak, Scope
from worker.store.base import (
    OutboxRow,
    ReplyKey,
    SendCounts,
    State,
    StateKeys,
    StoredReply,
    TransactionEnded,
    TransientStoreError,
    Writes,
    code_row,
)
from worker.store.keys import scope_key

T = TypeVar("T")

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


def run_in_thread(db: aiosqlite.Connection, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
    """Runs ``fn(connection, *args)`` on the aiosqlite connection's thread, in its queue.

    aiosqlite has no public way to run several statements in one trip; ``_execute`` is what
    its own ``backup``, ``iterdump`` and ``create_function`` use (the version is pinned in
    pyproject.toml, and every store test goes through here)."""
    conn = db._conn  # the sqlite3.Connection, only ever used on its own thread
    result: Awaitable[T] = db._execute(fn, conn, *args)  # type: ignore[no-untyped-call]
    return result


def _select(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    return conn.execute(sql, params).fetchall()


def _load_replies(
    conn: sqlite3.Connection, keys: Collection[ReplyKey]
) -> dict[ReplyKey, StoredReply]:
    by_kind: dict[str, list[str]] = {}
    for kind, command_id in keys:
        by_kind.setdefault(kind, []).append(command_id)
    found: dict[ReplyKey, StoredReply] = {}
    for kind, ids in by_kind.items():
        # kind first: the primary key (kind, command_id) serves the lookup.
        rows = _select(
            conn,
            "SELECT command_id, reply, fingerprint FROM replies "
            f"WHERE kind = ? AND command_id IN ({marks(len(ids))})",
            [kind, *ids],
        )
        found.update(((kind, c), StoredReply(r, f)) for c, r, f in rows)
    return found


def _load_codes(conn: sqlite3.Connection, scopes: Collection[Scope]) -> dict[Scope, CodeRecord]:
    if not scopes:
        return {}
    by_key = {scope_key(s): s for s in scopes}
    rows = _select(
        conn,
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


def _load_sends(
    conn: sqlite3.Connection,
    scope_keys: Collection[str],
    destination_keys: Collection[str],
    since: datetime,
) -> SendCounts:
    counts = SendCounts({}, {})
    for column, keys, into in (
        ("scope_key", scope_keys, counts.by_scope),
        ("destination_key", destination_keys, counts.by_destination),
    ):
        if keys:
            rows = _select(
                conn,
                f"SELECT {column}, sent_at FROM sends "
                f"WHERE {column} IN ({marks(len(keys))}) AND sent_at > ?",
                [*keys, ts(since)],
            )
            for key, at in rows:
                into.setdefault(key, []).append(from_ts(at))
    return counts


def _load_streaks(conn: sqlite3.Connection, users: Collection[str]) -> dict[str, FailureStreak]:
    if not users:
        return {}
    rows = _select(
        conn,
        f"SELECT user, count, last_failure_at FROM streaks WHERE user IN ({marks(len(users))})",
        list(users),
    )
    return {u: FailureStreak(count=c, last_failure_at=from_ts(at)) for u, c, at in rows}


def _load_state(conn: sqlite3.Connection, wanted: StateKeys) -> State:
    return State(
        replies=_load_replies(conn, wanted.replies),
        codes=_load_codes(conn, wanted.scopes),
        sends=_load_sends(conn, wanted.send_scope_keys, wanted.destination_keys, wanted.since),
        streaks=_load_streaks(conn, wanted.users),
    )


def _write(
    conn: sqlite3.Connection, writes: Writes, created: float, lease: float
) -> list[OutboxRow]:
    if writes.codes:
        conn.executemany(
            f"INSERT OR REPLACE INTO codes ({_CODE_COLUMNS}) VALUES ({marks(12)})",
            [code_row(r, ts) for r in writes.codes.values()],
        )
    if writes.replies:
        conn.executemany(
            "INSERT OR IGNORE INTO replies (kind, command_id, reply, fingerprint, created_at) "
            "VALUES (?,?,?,?,?)",
            [(k, c, r.body, r.fingerprint, created) for (k, c), r in writes.replies.items()],
        )
    if writes.sends:
        conn.executemany(
            "INSERT INTO sends (scope_key, destination_key, sent_at) VALUES (?,?,?)",
            [(s.scope_key, s.destination_key, ts(s.sent_at)) for s in writes.sends],
        )
    cleared = [u for u, s in writes.streaks.items() if s is None]
    if cleared:
        conn.execute(f"DELETE FROM streaks WHERE user IN ({marks(len(cleared))})", cleared)
    kept = [(u, s.count, ts(s.last_failure_at)) for u, s in writes.streaks.items() if s]
    if kept:
        conn.executemany(
            "INSERT OR REPLACE INTO streaks (user, count, last_failure_at) VALUES (?,?,?)", kept
        )
    if not writes.events:
        return []
    rows = _select(
        conn,
        "INSERT INTO outbox (event_id, routing_key, type, body, created_at, lease_until) "
        f"VALUES {','.join(['(?,?,?,?,?,?)'] * len(writes.events))} RETURNING id",
        [
            value
            for e in writes.events
            for value in (e.event_id, e.routing_key, e.type, e.body, created, lease)
        ],
    )
    return [OutboxRow(row[0], event) for row, event in zip(rows, writes.events, strict=True)]


def _write_and_commit(
    conn: sqlite3.Connection, writes: Writes, created: float, lease: float
) -> list[OutboxRow]:
    rows = _write(conn, writes, created, lease)
    commit(conn)
    return rows


def commit(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("COMMIT")
    except sqlite3.OperationalError as exc:  # busy: the caller rolls back and retries
        raise TransientStoreError(str(exc)) from exc


def begin(conn: sqlite3.Connection, forgotten: Sequence[int]) -> None:
    """``BEGIN IMMEDIATE`` and the delete of relayed outbox rows, in one trip."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        raise TransientStoreError(str(exc)) from exc
    try:
        delete_outbox(conn, forgotten)
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _begin_then(
    conn: sqlite3.Connection, forgotten: Sequence[int], fn: Callable[..., T], *args: Any
) -> T:
    begin(conn, forgotten)
    return fn(conn, *args)


def _nothing(conn: sqlite3.Connection) -> None:
    pass


def rollback_if_open(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


DELETE_CHUNK = 10_000  # below SQLite's limit on bound parameters


def delete_outbox(conn: sqlite3.Connection, ids: Sequence[int]) -> None:
    for start in range(0, len(ids), DELETE_CHUNK):
        chunk = ids[start : start + DELETE_CHUNK]
        conn.execute(f"DELETE FROM outbox WHERE id IN ({marks(len(chunk))})", chunk)


class SqliteTransaction:
    """Begins with its first step and ends with ``write`` (or, if no write comes, when
    ``SqliteStore.transaction`` commits it); ``SqliteStore.transaction`` rolls back what
    did not commit."""

    def __init__(
        self,
        db: aiosqlite.Connection,
        lease_seconds: float,
        take_forgotten: Callable[[], list[int]],
    ) -> None:
        self._db = db
        self._lease_seconds = lease_seconds
        self._take_forgotten = take_forgotten
        self.forgotten: list[int] = []
        """Relayed outbox rows this transaction deletes: given back if it does not commit."""
        self.begun = False
        self.committed = False

    def _step(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        if self.committed:
            raise TransactionEnded
        if self.begun:
            return run_in_thread(self._db, fn, *args)
        # Marked before the trip: cancelled while the thread runs BEGIN, the caller must
        # still roll back whatever it opened.
        self.begun = True
        self.forgotten = self._take_forgotten()
        return run_in_thread(self._db, _begin_then, self.forgotten, fn, *args)

    async def lock(self, keys: Collection[str]) -> None:
        """BEGIN IMMEDIATE already holds the database's single write lock."""

    async def load_replies(self, keys: Collection[ReplyKey]) -> dict[ReplyKey, StoredReply]:
        return await self._step(_load_replies, keys)

    async def load_codes(self, scopes: Collection[Scope]) -> dict[Scope, CodeRecord]:
        return await self._step(_load_codes, scopes)

    async def load_sends(
        self, scope_keys: Collection[str], destination_keys: Collection[str], since: datetime
    ) -> SendCounts:
        return await self._step(_load_sends, scope_keys, destination_keys, since)

    async def load_streaks(self, users: Collection[str]) -> dict[str, FailureStreak]:
        return await self._step(_load_streaks, users)

    async def load_state(self, wanted: StateKeys) -> State:
        return await self._step(_load_state, wanted)

    async def write(self, writes: Writes, now: datetime) -> list[OutboxRow]:
        created = ts(now)
        rows = await self._step(_write_and_commit, writes, created, created + self._lease_seconds)
        self.committed = True
        return rows

    async def begin(self) -> None:
        """Begins now, in a trip of its own (for statements run on the connection itself)."""
        await self._step(_nothing)

    async def finish(self) -> None:
        """Commits a transaction that had steps but no ``write``."""
        if self.begun and not self.committed:
            await run_in_thread(self._db, commit)
            self.committed = True
