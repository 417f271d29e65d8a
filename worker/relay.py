"""The outbox relay: publishes committed events with publisher confirms, then forgets them.

Rows committed by this process are handed over in memory and published at once. A row whose
publish failed, or whose process died, keeps its lease until it runs out; the periodic claim
then picks it up (and on start every leftover is claimed before consuming).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime

from contracts.topology import EVENTS_EXCHANGE
from worker.amqp import Publisher, json_properties
from worker.log import get_logger
from worker.store.base import OutboxRow, Store

log = get_logger(__name__)


class OutboxRelay:
    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        *,
        publish_timeout: float,
        lease_seconds: float,
        batch_size: int = 500,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._timeout = publish_timeout
        self._lease = lease_seconds
        self._batch_size = batch_size
        self._pending: list[OutboxRow] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def submit(self, rows: Sequence[OutboxRow]) -> None:
        if rows:
            self._pending.extend(rows)
            self._idle.clear()
            self._wake.set()

    async def relay_leftovers(self, *, everything: bool = False) -> int:
        """Claims rows whose lease ran out (every row, when ``everything``) and publishes them."""
        total, after_id = 0, 0
        while True:
            rows = await self._store.claim_outbox(
                datetime.now(UTC),
                self._lease,
                self._batch_size,
                ignore_leases=everything,
                after_id=after_id,
            )
            if not rows:
                return total
            total += await self._publish(rows)
            after_id = rows[-1].id
            if len(rows) < self._batch_size:
                return total

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def drain(self, timeout: float) -> None:
        """Waits until everything submitted so far was published (or gave up)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    async def stop(self, timeout: float = 5.0) -> None:
        """Cancels the relay and waits at most ``timeout`` for it to end: what it was
        publishing keeps its outbox row, so nothing is lost by not waiting longer."""
        if self._task is not None:
            self._task.cancel()
            _, running = await asyncio.wait([self._task], timeout=timeout)
            if running:
                log.warning("outbox relay did not stop in time", seconds=timeout)

    async def _run(self) -> None:
        """Publishes what is submitted as it comes; every half lease, claims leftovers.

        Leftovers are only rows whose publish failed or whose process died, and their
        lease must run out first, so scanning more often would find nothing: it would
        only cost a write transaction per pass."""
        loop = asyncio.get_running_loop()
        interval = self._lease / 2
        next_scan = loop.time() + interval
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11, wait_for's inner task could
            # swallow the cancel of stop() when the timeout had already run out.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(next_scan):
                    await self._wake.wait()
            self._wake.clear()
            try:
                while self._pending:
                    rows, self._pending = self._pending, []
                    await self._publish(rows)
                self._idle.set()
                if loop.time() >= next_scan:
                    next_scan = loop.time() + interval
                    await self.relay_leftovers()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the relay must outlive any single failure
                log.warning("outbox relay pass failed", error=repr(exc))
                self._idle.set()

    async def _publish(self, rows: Sequence[OutboxRow]) -> int:
        outcomes = await self._publisher.publish_confirmed(
            [
                (
                    EVENTS_EXCHANGE,
                    row.event.routing_key,
                    row.event.body,
                    json_properties(type=row.event.type, message_id=row.event.event_id),
                )
                for row in rows
            ],
            timeout=self._timeout,
        )
        done = [row.id for row, error in zip(rows, outcomes, strict=True) if error is None]
        failed = len(rows) - len(done)
        if failed:
            error = next(e for e in outcomes if e is not None)
            log.warning("events not confirmed; kept for retry", count=failed, error=repr(error))
        await self._store.forget_outbox(done)
        return len(done)
