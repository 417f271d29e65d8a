"""The SQLite store's background checkpointer: committed pages reach the database file
without the writer copying them back, a failing checkpoint is told once, closing the store
ends the thread, and a SQLite with the WAL-reset bug never gets one."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from tests.conftest import WorkerFactory
from tests.integration.test_faults import wait_until
from tests.integration.test_store_contract import SCOPE, code, write
from worker.notifier.store import SqliteDeliveryStore
from worker.settings import Settings
from worker.store.base import Writes
from worker.store.checkpointer import Checkpointer, wal_reset_fixed
from worker.store.sqlite import (
    NOTIFIER_WAL_AUTOCHECKPOINT_PAGES,
    WAL_AUTOCHECKPOINT_PAGES,
    SqliteStore,
)


def codes_in_file(path: Path) -> int | None:
    """The codes the database file itself holds, leaving the write-ahead log aside (None
    while the file cannot be read: a checkpoint may be writing it)."""
    db = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return int(db.execute("SELECT count(*) FROM codes").fetchone()[0])
    except sqlite3.OperationalError as exc:
        return 0 if "no such table" in str(exc) else None
    except sqlite3.DatabaseError:
        return None
    finally:
        db.close()


async def test_committed_pages_reach_the_database_file_off_the_commit_path(
    tmp_path: Path,
) -> None:
    path = tmp_path / "otp.db"
    store = await SqliteStore.open(f"sqlite:///{path}")  # SQLite's own checkpoints
    checkpointer = Checkpointer(str(path), 0.01)
    checkpointer.start()
    try:
        await write(store, Writes(codes={SCOPE: code()}))
        # One small commit: SQLite itself would not checkpoint before 10 000 pages of log.
        await wait_until(lambda: checkpointer.passes > 0 and codes_in_file(path) == 1, every=0.01)
    finally:
        await checkpointer.stop()
        await store.close()


async def test_without_it_a_small_commit_stays_in_the_log(tmp_path: Path) -> None:
    # What the test above waits for does not happen by itself.
    path = tmp_path / "otp.db"
    store = await SqliteStore.open(f"sqlite:///{path}", checkpoint_interval=0)
    try:
        await write(store, Writes(codes={SCOPE: code()}))
        assert store.checkpointer is None
        assert codes_in_file(path) == 0
    finally:
        await store.close()


async def autocheckpoint(store: SqliteStore | SqliteDeliveryStore) -> int:
    rows = list(await store._db.execute_fetchall("PRAGMA wal_autocheckpoint"))
    return int(rows[0][0])


async def test_only_the_workers_connection_checkpoints_a_shared_file(tmp_path: Path) -> None:
    # The worker's mark is ten times SQLite's default (fewer checkpoints inside the
    # commits), the notifier's ten times the worker's: with both on one file the log never
    # reaches the notifier's, and one connection alone checkpoints (the WAL-reset bug of
    # SQLite before 3.51.3 needs two).
    url = f"sqlite:///{tmp_path / 'otp.db'}"
    store = await SqliteStore.open(url, checkpoint_interval=0)
    deliveries = await SqliteDeliveryStore.open(url)
    try:
        assert await autocheckpoint(store) == WAL_AUTOCHECKPOINT_PAGES == 10_000
        assert await autocheckpoint(deliveries) == NOTIFIER_WAL_AUTOCHECKPOINT_PAGES == 100_000
    finally:
        await deliveries.close()
        await store.close()


async def open_where(
    fixed: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interval: float
) -> SqliteStore:
    """A store opened as on a SQLite with (or without) the WAL-reset fix."""
    monkeypatch.setattr("worker.store.sqlite.wal_reset_fixed", lambda: fixed)
    return await SqliteStore.open(f"sqlite:///{tmp_path / 'otp.db'}", checkpoint_interval=interval)


async def test_a_sqlite_with_the_wal_reset_bug_keeps_its_own_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkpoint on a second connection could lose commits there: no thread, and the
    # store says why (the worker's start line carries it; a failing start stays one line).
    store = await open_where(False, tmp_path, monkeypatch, interval=0.01)
    try:
        assert store.checkpointer is None
        assert await autocheckpoint(store) == WAL_AUTOCHECKPOINT_PAGES  # in the commits
        assert "WAL-reset bug" in store.checkpoints
        assert sqlite3.sqlite_version in store.checkpoints
    finally:
        await store.close()


async def test_with_the_fix_the_store_runs_one_and_closing_ends_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_where(True, tmp_path, monkeypatch, interval=30)
    checkpointer = store.checkpointer
    assert checkpointer is not None and checkpointer.running
    assert await autocheckpoint(store) == WAL_AUTOCHECKPOINT_PAGES  # the backstop
    async with asyncio.timeout(10):  # without waiting out the 30 s interval
        await store.close()
    assert not checkpointer.running


async def test_a_failing_checkpoint_is_told_once_not_every_time(tmp_path: Path) -> None:
    path = tmp_path / "not-a-database"
    path.write_bytes(b"not a database at all" * 512)
    checkpointer = Checkpointer(str(path), 0.001)
    with capture_logs() as logs:
        checkpointer.start()
        try:
            await wait_until(lambda: checkpointer.failures >= 5, every=0.01)
            await asyncio.sleep(0)  # the thread's lines are written on the loop
        finally:
            await checkpointer.stop()
        await asyncio.sleep(0)
    warnings = [line for line in logs if "background checkpoint failed" in line["event"]]
    assert len(warnings) == 1
    assert "not a database" in warnings[0]["error"]
    assert checkpointer.passes == 0


async def test_the_worker_runs_one_by_default_where_sqlite_allows(
    start_worker: WorkerFactory,
) -> None:
    assert Settings.model_fields["sqlite_checkpoint_interval_seconds"].default > 0
    with capture_logs() as logs:
        worker = await start_worker()
    if not isinstance(worker.store, SqliteStore):
        pytest.skip("the checkpointer is the SQLite store's")
    assert (worker.store.checkpointer is not None) is wal_reset_fixed()
    [started] = [line for line in logs if line["event"] == "worker consuming"]
    assert started["sqlite_checkpoints"] == worker.store.checkpoints


def test_a_negative_interval_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OTP_SQLITE_CHECKPOINT_INTERVAL_SECONDS", "-1")
    with pytest.raises(ValidationError, match="sqlite_checkpoint_interval_seconds"):
        Settings(_env_file=None, var_dir=tmp_path)  # type: ignore[call-arg]
