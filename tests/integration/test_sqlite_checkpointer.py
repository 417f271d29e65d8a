"""The SQLite store's background checkpointer: committed pages reach the database file
without the writer copying them back, a failing checkpoint is told once, and closing the
store ends the thread."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from tests.conftest import WorkerFactory
from tests.integration.test_store_contract import SCOPE, code, write
from worker.settings import Settings
from worker.store.base import Writes
from worker.store.checkpointer import Checkpointer
from worker.store.sqlite import SqliteStore

THREAD = "otp-sqlite-checkpointer"


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


async def until(predicate: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(20):
        while not predicate():
            await asyncio.sleep(0.01)
    assert predicate(), what


def checkpointer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD]


async def test_committed_pages_reach_the_database_file_off_the_commit_path(
    tmp_path: Path,
) -> None:
    path = tmp_path / "otp.db"
    store = await SqliteStore.open(f"sqlite:///{path}", checkpoint_interval=0.01)
    try:
        await write(store, Writes(codes={SCOPE: code()}))
        # One small commit: SQLite itself would not checkpoint before 1 000 pages of log.
        await until(lambda: codes_in_file(path) == 1, "the code never reached the file")
        assert store.checkpointer is not None
        assert store.checkpointer.passes > 0
    finally:
        await store.close()


async def test_without_it_a_small_commit_stays_in_the_log(tmp_path: Path) -> None:
    # What the test above waits for does not happen by itself.
    path = tmp_path / "otp.db"
    store = await SqliteStore.open(f"sqlite:///{path}", checkpoint_interval=0)
    try:
        await write(store, Writes(codes={SCOPE: code()}))
        assert store.checkpointer is None
        assert codes_in_file(path) == 0
        assert checkpointer_threads() == []
    finally:
        await store.close()


async def test_closing_the_store_ends_the_thread(tmp_path: Path) -> None:
    store = await SqliteStore.open(f"sqlite:///{tmp_path / 'otp.db'}", checkpoint_interval=30)
    assert [t.is_alive() for t in checkpointer_threads()] == [True]
    await store.close()  # without waiting out the 30 s interval
    assert checkpointer_threads() == []


async def test_a_failing_checkpoint_is_told_once_not_every_time(tmp_path: Path) -> None:
    path = tmp_path / "not-a-database"
    path.write_bytes(b"not a database at all" * 512)
    checkpointer = Checkpointer(str(path), 0.001)
    with capture_logs() as logs:
        checkpointer.start()
        try:
            await until(lambda: checkpointer.failures >= 5, "the checkpoints did not fail")
            await asyncio.sleep(0)  # the thread's lines are written on the loop
        finally:
            await checkpointer.stop()
        await asyncio.sleep(0)
    warnings = [line for line in logs if "background checkpoint failed" in line["event"]]
    assert len(warnings) == 1
    assert "not a database" in warnings[0]["error"]
    assert checkpointer.passes == 0


async def test_the_worker_runs_one_by_default(start_worker: WorkerFactory) -> None:
    assert Settings.model_fields["sqlite_checkpoint_interval_seconds"].default > 0
    worker = await start_worker()
    if not isinstance(worker.store, SqliteStore):
        pytest.skip("the checkpointer is the SQLite store's")
    assert worker.store.checkpointer is not None
    await until(lambda: worker.store.checkpointer.passes > 0, "no checkpoint ran")  # type: ignore[union-attr]


def test_a_negative_interval_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OTP_SQLITE_CHECKPOINT_INTERVAL_SECONDS", "-1")
    with pytest.raises(ValidationError, match="sqlite_checkpoint_interval_seconds"):
        Settings(_env_file=None, var_dir=tmp_path)  # type: ignore[call-arg]
