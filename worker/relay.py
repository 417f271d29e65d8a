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

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._lease / 2)
            self._wake.clear()
            try:
                while self._pending:
                    rows, self._pending = self._pending, []
                    await self._publish(rows)
                self._idle.set()
                await self.relay_leftovers()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the relay must outlive any single failure
                log.warning("outbox relay pass failed", error=repr(exc))
                self._idle.set()

    async def _publish(self, rows: Sequence[OutboxRow]) -> int:
        results = await asyncio.gather(
            *(self._publish_one(row) for row in rows), return_exceptions=True
        )
        done = [row.id for row, ok in zip(rows, results, strict=True) if ok is True]
        failed = len(rows) - len(done)
        if failed:
            log.warning("events not confirmed; kept for retry", count=failed)
        await self._store.delete_outbox(done)
        return len(done)

    async def _publish_one(self, row: OutboxRow) -> bool:
        event = row.event
        await self._publisher.publish(
            EVENTS_EXCHANGE,
            event.routing_key,
            event.body,
            json_properties(type=event.type, message_id=event.event_id),
            timeout=self._timeout,
        )
        return True
