"""The Store protocol itself, against every backend: what the worker relies on, directly."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from structlog.testing import capture_logs

from tests.databases import BACKENDS, postgres_database
from worker.domain.model import CodeRecord, CodeState, FailureStreak, Scope
from worker.store import Store, open_store
from worker.store.base import (
    OutboxEvent,
    Send,
    StateKeys,
    StoredReply,
    TransactionEnded,
    TransientStoreError,
    Writes,
)
from worker.store.keys import scope_key
from worker.store.migrations import migrations
from worker.store.sqlite import SqliteStore
from worker.store.urls import backend_of, path_of

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
LEASE = 10.0
SCOPE = Scope("alice", "app", "login")


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = await open_store(database_url, outbox_lease_seconds=LEASE)
    yield opened
    await opened.close()


def code(attempts: int = 0, scope: Scope = SCOPE, expires: datetime | None = None) -> CodeRecord:
    return CodeRecord(
        code_id="c-1",
        scope=scope,
        key_id="k1",
        digest=b"\x00\x01digest",
        sealed="sealed-token",
        issued_at=NOW,
        expires_at=expires or NOW + timedelta(minutes=5),
        attempts=attempts,
        state=CodeState.ACTIVE,
    )


def reply(body: bytes, fingerprint: bytes | None = b"\x01" * 32) -> StoredReply:
    return StoredReply(body, fingerprint)


def event(n: int) -> OutboxEvent:
    return OutboxEvent(f"e-{n}", "code.issued", b'{"n": %d}' % n, "code.issued")


async def write(store: Store, writes: Writes, now: datetime = NOW) -> list[int]:
    async with store.transaction() as tx:
        rows = await tx.write(writes, now)
    return [row.id for row in rows]


async def test_write_then_load_round_trip(store: Store) -> None:
    writes = Writes(
        codes={SCOPE: code(attempts=2)},
        replies={("issue", "cmd-1"): reply(b'{"status": "issued"}')},
        sends=[Send(scope_key(SCOPE), "dest-1", NOW - timedelta(minutes=1))],
        streaks={"alice": FailureStreak(3, NOW)},
        events=[event(1), event(2)],
    )
    ids = await write(store, writes)
    assert len(ids) == 2
    assert ids[0] < ids[1]
    async with store.transaction() as tx:
        await tx.lock(["scope:x", "user:alice"])
        assert await tx.load_codes([SCOPE, Scope("bob", "app", "login")]) == {
            SCOPE: code(attempts=2)
        }
        assert await tx.load_replies([("issue", "cmd-1"), ("confirm", "cmd-1")]) == {
            ("issue", "cmd-1"): reply(b'{"status": "issued"}')
        }
        sends = await tx.load_sends([scope_key(SCOPE)], ["dest-1"], NOW - timedelta(hours=1))
        assert sends.by_scope == {scope_key(SCOPE): [NOW - timedelta(minutes=1)]}
        assert sends.by_destination == {"dest-1": [NOW - timedelta(minutes=1)]}
        assert await tx.load_sends([scope_key(SCOPE)], [], NOW) == type(sends)({}, {})
        assert await tx.load_streaks(["alice", "bob"]) == {"alice": FailureStreak(3, NOW)}
        await tx.write(Writes(streaks={"alice": None}, codes={SCOPE: code(attempts=3)}), NOW)
    async with store.transaction() as tx:
        assert await tx.load_streaks(["alice"]) == {}
        assert (await tx.load_codes([SCOPE]))[SCOPE].attempts == 3
    assert await store.outbox_backlog() == 2
    assert await store.outbox_oldest() == NOW


async def test_load_state_is_the_four_loads_at_once(store: Store) -> None:
    other = Scope("bob", "app", "login")
    await write(
        store,
        Writes(
            replies={("issue", "cmd-1"): reply(b"stored")},
            codes={SCOPE: code(attempts=1)},
            sends=[Send(scope_key(SCOPE), "dest-1", NOW), Send(scope_key(other), "dest-2", NOW)],
            streaks={"alice": FailureStreak(2, NOW)},
        ),
    )
    since = NOW - timedelta(hours=1)
    async with store.transaction() as tx:
        state = await tx.load_state(
            StateKeys(
                replies=[("issue", "cmd-1"), ("confirm", "cmd-1")],
                scopes={SCOPE, other},
                users={"alice", "bob"},
                send_scope_keys={scope_key(SCOPE)},
                destination_keys={"dest-1", "dest-2"},
                since=since,
            )
        )
        assert state.replies == {("issue", "cmd-1"): reply(b"stored")}
        assert state.codes == await tx.load_codes([SCOPE, other])
        assert state.streaks == {"alice": FailureStreak(2, NOW)}
        assert state.sends == await tx.load_sends([scope_key(SCOPE)], ["dest-1", "dest-2"], since)
        assert state.sends.by_destination == {"dest-1": [NOW], "dest-2": [NOW]}
        empty = await tx.load_state(StateKeys(set(), set(), set(), set(), set(), since))
        assert (empty.replies, empty.codes, empty.streaks) == ({}, {}, {})
        assert (empty.sends.by_scope, empty.sends.by_destination) == ({}, {})


async def test_a_transaction_cancelled_as_it_begins_leaves_the_store_usable(
    store: Store,
) -> None:
    """SQLite's BEGIN runs on the connection's thread and finishes even when the caller is
    cancelled: what it opened must be closed, or every later transaction fails."""

    async def begin_and_wait() -> None:
        async with store.transaction() as tx:
            await tx.load_codes([SCOPE])  # the first step begins the transaction
            await asyncio.Event().wait()

    for _ in range(3):
        task = asyncio.create_task(begin_and_wait())
        await asyncio.sleep(0)  # the task has asked to begin
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    ids = await write(store, Writes(events=[event(1)]))
    assert [row.id for row in await store.claim_outbox(NOW, 1, 10, ignore_leases=True)] == ids


async def test_a_reply_is_stored_once(store: Store) -> None:
    await write(store, Writes(replies={("confirm", "c"): reply(b"first")}))
    await write(
        store,
        Writes(
            replies={
                ("confirm", "c"): reply(b"second", b"\x02" * 32),
                ("issue", "c"): reply(b"other", None),
            }
        ),
    )
    async with store.transaction() as tx:
        found = await tx.load_replies([("confirm", "c"), ("issue", "c")])
    assert found == {("confirm", "c"): reply(b"first"), ("issue", "c"): reply(b"other", None)}


async def test_a_failed_transaction_leaves_nothing(store: Store) -> None:
    relayed = await write(store, Writes(events=[event(0)]))
    await store.forget_outbox(relayed)

    async def fail() -> None:
        async with store.transaction() as tx:
            await tx.load_codes([SCOPE])
            raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError):
        await fail()
    with pytest.raises((sqlite3.IntegrityError, asyncpg.NotNullViolationError)):
        # The codes go in first, then the send's NOT NULL scope key fails the write.
        await write(
            store,
            Writes(codes={SCOPE: code()}, sends=[Send(None, None, NOW)], events=[event(1)]),  # type: ignore[arg-type]
        )
    async with store.transaction() as tx:
        assert await tx.load_codes([SCOPE]) == {}
    # The relayed row is gone all the same: the failed transactions gave it back.
    assert await store.outbox_backlog() == 0
    assert await store.outbox_oldest() is None


async def test_write_ends_a_transaction(store: Store) -> None:
    """SQLite commits in the write's own trip, so every store refuses a step after it."""
    async with store.transaction() as tx:
        await tx.write(Writes(codes={SCOPE: code()}), NOW)
        with pytest.raises(TransactionEnded, match="ends a transaction"):
            await tx.load_codes([SCOPE])
    async with store.transaction() as tx:
        assert list(await tx.load_codes([SCOPE])) == [SCOPE]


async def test_claim_outbox_honours_leases(store: Store) -> None:
    ids = await write(store, Writes(events=[event(n) for n in range(5)]))
    assert await store.claim_outbox(NOW, LEASE, 100) == []
    expired = NOW + timedelta(seconds=LEASE + 1)
    claimed = await store.claim_outbox(expired, 30, 3)
    assert [row.id for row in claimed] == ids[:3]
    assert claimed[0].event == event(0)
    rest = await store.claim_outbox(expired, 30, 100)
    assert [row.id for row in rest] == ids[3:]
    assert await store.claim_outbox(expired, 30, 100) == []
    everything = await store.claim_outbox(expired, 30, 100, ignore_leases=True)
    assert [row.id for row in everything] == ids
    after = await store.claim_outbox(expired, 30, 2, ignore_leases=True, after_id=ids[1])
    assert [row.id for row in after] == ids[2:4]


async def test_delete_outbox(store: Store) -> None:
    ids = await write(store, Writes(events=[event(n) for n in range(3)]))
    await store.delete_outbox(ids[:2])
    await store.delete_outbox([])
    assert await store.outbox_backlog() == 1
    remaining = await store.claim_outbox(NOW, 1, 10, ignore_leases=True)
    assert [row.id for row in remaining] == ids[2:]


async def test_forgotten_outbox_rows_are_never_claimed_again(store: Store) -> None:
    ids = await write(store, Writes(events=[event(n) for n in range(4)]))
    await store.forget_outbox(ids[:3])
    await store.forget_outbox([])
    remaining = await store.claim_outbox(NOW, 1, 10, ignore_leases=True)
    assert [row.id for row in remaining] == ids[3:]
    assert await store.outbox_backlog() == 1


async def test_forgotten_outbox_rows_go_without_another_write(
    store: Store, database_url: str
) -> None:
    """Seen from a second store (another process): the rows go on their own, and soon."""
    ids = await write(store, Writes(events=[event(n) for n in range(2)]))
    other = await open_store(database_url, outbox_lease_seconds=LEASE)
    try:
        assert await other.outbox_backlog() == 2
        await store.forget_outbox(ids)
        async with asyncio.timeout(10):
            while await other.outbox_backlog():
                await asyncio.sleep(0.05)
    finally:
        await other.close()


async def test_forgotten_outbox_rows_are_deleted_by_close(database_url: str) -> None:
    first = await open_store(database_url, outbox_lease_seconds=LEASE)
    ids = await write(first, Writes(events=[event(n) for n in range(3)]))
    await first.forget_outbox(ids[1:])
    await first.close()
    reopened = await open_store(database_url, outbox_lease_seconds=LEASE)
    try:
        remaining = await reopened.claim_outbox(NOW, 1, 10, ignore_leases=True)
        assert [row.id for row in remaining] == ids[:1]
    finally:
        await reopened.close()


async def test_sweep_deletes_old_rows_in_limited_batches(store: Store) -> None:
    old = NOW - timedelta(hours=2)
    await write(
        store,
        Writes(
            codes={
                Scope(f"u{n}", "app", "login"): code(scope=Scope(f"u{n}", "app", "login"))
                for n in range(3)
            }
            | {SCOPE: code(expires=NOW + timedelta(hours=1))},
            sends=[Send(f"s{n}", None, old) for n in range(5)] + [Send("s", None, NOW)],
            streaks={"old": FailureStreak(1, old), "new": FailureStreak(1, NOW)},
        ),
    )
    await write(store, Writes(replies={("issue", f"r{n}"): reply(b"r") for n in range(3)}), now=old)
    later = NOW + timedelta(minutes=30)
    sweep = [await store.sweep(later, 60, 3600, 3600, limit=2) for _ in range(4)]
    assert [s.codes for s in sweep] == [2, 1, 0, 0]
    assert [s.replies for s in sweep] == [2, 1, 0, 0]
    assert [s.sends for s in sweep] == [2, 2, 1, 0]
    assert [s.streaks for s in sweep] == [1, 0, 0, 0]
    async with store.transaction() as tx:
        assert list(await tx.load_codes([SCOPE])) == [SCOPE]
        assert list(await tx.load_streaks(["old", "new"])) == ["new"]


async def test_stores_opening_together_migrate_once(database_url: str) -> None:
    stores = await asyncio.gather(*(open_store(database_url) for _ in range(6)))
    try:
        await asyncio.gather(*(s.ping() for s in stores))
    finally:
        for s in stores:
            await s.close()
    backend = backend_of(database_url)
    assert backend is not None
    versions = [version for version, _ in migrations(backend)]
    if backend == "sqlite":
        conn = sqlite3.connect(path_of(database_url))
        try:
            [(user_version,)] = conn.execute("PRAGMA user_version").fetchall()
        finally:
            conn.close()
        assert user_version == versions[-1]
    else:
        pg = await asyncpg.connect(database_url)
        try:
            rows = await pg.fetch("SELECT version FROM schema_version ORDER BY version")
        finally:
            await pg.close()
        assert [row["version"] for row in rows] == versions, "each migration recorded once"


async def test_replies_stored_before_fingerprints_load_without_one(database_url: str) -> None:
    """A database at schema version 1, with a reply in it, migrates on open: the old row
    loads with no fingerprint (the worker replays it as before) and new rows keep theirs."""
    backend = backend_of(database_url)
    assert backend is not None
    first = dict(migrations(backend))[1]
    if backend == "sqlite":
        conn = sqlite3.connect(path_of(database_url))
        try:
            conn.executescript(first)
            conn.executescript(
                "PRAGMA user_version=1; INSERT INTO replies (kind, command_id, reply, created_at) "
                "VALUES ('issue', 'old', x'7b7d', 0);"
            )
        finally:
            conn.close()
    else:
        pg = await asyncpg.connect(database_url)
        try:
            await pg.execute(first)
            await pg.execute(
                "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, "
                "applied_at TIMESTAMPTZ NOT NULL DEFAULT now()); "
                "INSERT INTO schema_version (version) VALUES (1); "
                "INSERT INTO replies (kind, command_id, reply, created_at) "
                "VALUES ('issue', 'old', decode('7b7d', 'hex'), now())"
            )
        finally:
            await pg.close()
    store = await open_store(database_url, outbox_lease_seconds=LEASE)
    try:
        await write(store, Writes(replies={("issue", "new"): reply(b"[]")}))
        async with store.transaction() as tx:
            found = await tx.load_replies([("issue", "old"), ("issue", "new")])
        assert found == {("issue", "old"): reply(b"{}", None), ("issue", "new"): reply(b"[]")}
    finally:
        await store.close()


async def test_locked_transactions_of_two_stores_serialise(store: Store, database_url: str) -> None:
    """Read-modify-write of one code from two stores (two processes' worth): no lost update."""
    await increment_from_two_stores(store, database_url)


async def increment_from_two_stores(store: Store, database_url: str) -> None:
    other = await open_store(database_url, outbox_lease_seconds=LEASE)
    await write(store, Writes(codes={SCOPE: code()}))

    async def increment(s: Store) -> None:
        async with s.transaction() as tx:
            await tx.lock([f"scope:{scope_key(SCOPE)}", "user:alice"])
            current = (await tx.load_codes([SCOPE]))[SCOPE]
            await asyncio.sleep(0)  # let the other store's transaction run into the lock
            await tx.write(Writes(codes={SCOPE: code(attempts=current.attempts + 1)}), NOW)

    try:
        await asyncio.gather(*(increment(s) for _ in range(10) for s in (store, other)))
    finally:
        await other.close()
    async with store.transaction() as tx:
        assert (await tx.load_codes([SCOPE]))[SCOPE].attempts == 20


@asynccontextmanager
async def postgres_set(*, migrated: bool = False, **settings: str) -> AsyncIterator[str]:
    """A fresh PostgreSQL database whose sessions start with ``settings``, as a DBA or a
    managed service may have set them for the database or the role; ``migrated``: its
    schema made (a store opened and closed) before they are set."""
    if "postgresql" not in BACKENDS:
        pytest.skip("PostgreSQL is not among OTP_TEST_BACKENDS")
    async with postgres_database() as url:
        if migrated:
            store = await open_store(url, outbox_lease_seconds=LEASE)
            await store.close()
        admin = await asyncpg.connect(url)
        try:
            for name, value in settings.items():
                await admin.execute(
                    f"ALTER DATABASE \"{url.rsplit('/', 1)[1]}\" SET {name} = '{value}'"
                )
        finally:
            await admin.close()
        yield url


async def test_locking_holds_on_a_server_that_defaults_to_repeatable_read() -> None:
    # The snapshot would be taken by the lock statement, before it waits: the write then
    # fails with a serialization error, or (for inserts) decides on stale rows.
    async with postgres_set(default_transaction_isolation="repeatable read") as url:
        store = await open_store(url, outbox_lease_seconds=LEASE)
        try:
            await increment_from_two_stores(store, url)
        finally:
            await store.close()


async def test_a_statement_timeout_while_waiting_for_a_lock_is_an_error_of_the_moment() -> None:
    # Retried and requeued, not taken for a bug: that would dead-letter the batch's commands.
    # Migrated first: on a slow host the migrations themselves could outlast 200 ms.
    async with postgres_set(migrated=True, statement_timeout="200ms") as url:
        holder = await open_store(url, outbox_lease_seconds=LEASE)
        waiter = await open_store(url, outbox_lease_seconds=LEASE)
        held, done = asyncio.Event(), asyncio.Event()

        async def hold() -> None:
            async with holder.transaction() as tx:
                await tx.lock(["scope:timeout"])
                held.set()
                await done.wait()

        holding = asyncio.create_task(hold())
        try:
            await held.wait()
            with pytest.raises(TransientStoreError, match="QueryCanceledError"):
                async with waiter.transaction() as tx:
                    await tx.lock(["scope:timeout"])
        finally:
            done.set()
            await holding
            await holder.close()
            await waiter.close()


async def test_ping_fails_after_close(database_url: str) -> None:
    opened = await open_store(database_url)
    await opened.ping()
    await opened.close()
    # aiosqlite: "no active connection"; the PostgreSQL pool: closed, as a transient error.
    with pytest.raises((ValueError, TransientStoreError)):
        await opened.ping()


async def test_closing_a_locked_sqlite_store_leaves_its_relayed_rows_and_does_not_raise(
    tmp_path: Path,
) -> None:
    # The deferred delete of relayed outbox rows ran at close with the full 30 s busy wait
    # and raised: a SIGTERM with another process holding the write lock exited 1.
    path = tmp_path / "locked.db"
    store = await open_store(f"sqlite:///{path}", outbox_lease_seconds=LEASE)
    relayed = await write(store, Writes(events=[event(0), event(1)]))
    await store.forget_outbox(relayed)  # deleted with the next write, or at close
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with capture_logs() as logs:
            await asyncio.wait_for(store.close(), 15)
    finally:
        other.execute("ROLLBACK")
        other.close()
    [warning] = [e for e in logs if e["event"].startswith("relayed outbox rows not deleted")]
    assert "locked" in warning["error"]
    reopened = await open_store(f"sqlite:///{path}", outbox_lease_seconds=LEASE)
    try:
        assert await reopened.outbox_backlog() == 2  # published again at the next start
    finally:
        await reopened.close()


async def test_a_full_sqlite_database_is_an_error_of_the_moment(tmp_path: Path) -> None:
    # SQLite's own page limit gives the same SQLITE_FULL as a full disk, without filling one.
    store = await open_store(f"sqlite:///{tmp_path}/full.db", outbox_lease_seconds=LEASE)
    assert isinstance(store, SqliteStore)
    try:
        await write(store, Writes(replies={("issue", "first"): reply(b"{}")}))
        db = store._db
        pages = next(iter(await db.execute_fetchall("PRAGMA page_count")))[0]
        await db.execute(f"PRAGMA max_page_count={pages}")
        many = Writes(replies={("issue", f"c-{i}"): reply(b"x" * 2000) for i in range(50)})
        with pytest.raises(TransientStoreError, match="full"):
            await write(store, many)
        await db.execute("PRAGMA max_page_count=1073741823")
        await write(store, many)  # room again: the same batch goes through
        async with store.transaction() as tx:
            assert len(await tx.load_replies(list(many.replies))) == 50
    finally:
        await store.close()
