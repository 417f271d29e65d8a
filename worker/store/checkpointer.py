"""WAL checkpoints on a thread and a connection of their own, off the commit path.

Left to itself, SQLite checkpoints inside the commit that takes the write-ahead log past
1 000 pages: that commit copies the pages back into the database file and syncs it while
its batch (and every command queued behind it) waits. With a large store a batch dirties
pages all over the file, nearly every commit crosses the mark, and the sync of those
scattered pages is most of what a million stored codes cost (bench/RUNS.md, runs 43 to 46).

Here a thread copies committed pages back every ``interval`` seconds with a ``PASSIVE``
checkpoint, which never blocks the writer or readers: the worker's commits only append to
the log. The writer keeps SQLite's own checkpoint (at ``WAL_AUTOCHECKPOINT_PAGES``) as a
backstop, so the log stays bounded should this thread fall behind or fail.

Only with a SQLite that has the fix for the WAL-reset bug (``wal_reset_fixed``): before
it, a checkpoint on one connection starting while another connection's commit resets the
log could later skip committed frames, losing writes and corrupting the file
(https://sqlite.org/wal.html#walresetbug). That is this design's very pattern, twenty
times a second; with one connection doing both, as SQLite does by itself, it cannot occur
(several processes sharing one file are several connections, too: see the README).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from functools import partial
from typing import Any

from worker.log import get_logger

log = get_logger(__name__)

WAL_RESET_FIXED_IN = ((3, 44, 6), (3, 50, 7), (3, 51, 3))
"""The releases with the fix: backports to 3.44 and 3.50, and every release from 3.51.3."""


def wal_reset_fixed(version: tuple[int, int, int] = sqlite3.sqlite_version_info) -> bool:
    """Whether the SQLite this process links has the fix for the WAL-reset bug. A build
    that backported it without a new version number reads as unfixed: the safe side."""
    if version >= WAL_RESET_FIXED_IN[-1]:
        return True
    return any(version[:2] == fixed[:2] and version >= fixed for fixed in WAL_RESET_FIXED_IN)


class Checkpointer:
    def __init__(self, path: str, interval: float) -> None:
        self._path = path
        self._interval = interval
        self._stop = threading.Event()
        # A daemon: a process that ends without closing its store is not held up by it.
        self._thread = threading.Thread(target=self._run, name="otp-sqlite-checkpointer")
        self._thread.daemon = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self.passes = 0
        """Checkpoints run, and checkpoints failed (tests and the curious read them)."""
        self.failures = 0

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            self._log("warning", "background checkpoints off: cannot open the store", exc)
            return
        failing = False
        try:
            while not self._stop.wait(self._interval):
                try:
                    # PASSIVE never waits: a checkpoint another connection runs now is as good.
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    self.failures += 1
                    if not failing:  # once per spell, not every interval
                        self._log(
                            "warning",
                            "background checkpoint failed; the writer's own checkpoint "
                            "bounds the log meanwhile",
                            exc,
                        )
                    failing = True
                    continue
                if failing:
                    self._log("info", "background checkpoints work again")
                failing = False
                self.passes += 1
        finally:
            conn.close()

    def _log(self, level: str, message: str, exc: BaseException | None = None) -> None:
        """Logs on the event loop's thread, where every other line of the process is written."""
        fields: dict[str, Any] = {} if exc is None else {"error": repr(exc)}
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to tell
                self._loop.call_soon_threadsafe(partial(getattr(log, level), message, **fields))
