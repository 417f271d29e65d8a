"""Keeps one aio-pika consumer alive: aio-pika can come back from a reconnect without it.

aio-pika issues #231 and #626: after some reconnects the robust channel is restored but the
consumer is not, and the process sits idle while its queue fills. ``ConsumerWatchdog`` owns the
consumer tag, asks the channel and the broker every ``interval`` seconds whether the consumer
is still registered, and re-registers it after two failed checks in a row.

The watch loop ends on ``stop()`` by checking an event, not only by being cancelled: on
Python 3.11 ``asyncio.wait_for`` (used inside aiormq's RPCs and formerly here) returns the
result instead of raising when a cancellation arrives in the same loop iteration as the reply,
so a loop that relied on ``task.cancel()`` alone could swallow it and run forever, and whoever
awaited the task (``Worker.stop()``) hung with it.

The first consume is retried too (``consume_at_start``): RabbitMQ 3.10 closes the whole
connection with 541 INTERNAL_ERROR when a consumer arrives at a quorum queue that another
process declared a moment earlier, while the queue's Raft leader is still starting
(``{badmatch,{error,noproc}}`` in ``rabbit_quorum_queue:consume/3`` in the broker's log).
Replicas started together on a fresh vhost run into it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    ConsumerTag,
)
from aiormq.exceptions import ChannelInvalidStateError, ConnectionClosed

from worker.amqp import queue_counts
from worker.log import get_logger

log = get_logger(__name__)

OnMessage = Callable[[AbstractIncomingMessage], Awaitable[Any]]
STOP_GRACE_SECONDS = 10.0
START_CONSUME_SECONDS = 30.0
"""How long the first consume keeps trying while the broker closes the connection under it:
long enough for the robust connection to come back (aio-pika reconnects after 5 s)."""
RETRY_PAUSE_SECONDS = 0.5


async def consume_at_start(
    queue: AbstractQueue, on_message: OnMessage, *, seconds: float = START_CONSUME_SECONDS
) -> ConsumerTag:
    """``queue.consume``, tried again when the broker closes the connection under it.

    The robust connection comes back by itself and the robust channel waits for it, so a
    second consume succeeds. Only a closed connection (or a channel that is not open yet
    again) is retried, and for at most ``seconds``; then its error is raised, for the entry
    point to report. Any other error (no such queue, access refused) is raised at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    last: BaseException | None = None
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                return await queue.consume(on_message, timeout=10)
        except TimeoutError:
            if last is not None:
                raise last from None
            raise
        except (ConnectionClosed, ChannelInvalidStateError) as exc:
            if loop.time() + RETRY_PAUSE_SECONDS >= deadline:
                raise
            last = exc
            log.warning(
                "connection closed as we began consuming; consuming again once it is back",
                queue=queue.name,
                error=repr(exc),
            )
            await asyncio.sleep(RETRY_PAUSE_SECONDS)


class ConsumerWatchdog:
    def __init__(
        self,
        queue: AbstractQueue,
        on_message: OnMessage,
        connection: AbstractRobustConnection,
        interval: float,
    ) -> None:
        self.queue = queue
        self._on_message = on_message
        self._connection = connection
        self._interval = interval
        self.tag: str | None = None
        self.restores = 0
        self.broker_consumers = 0
        self.broker_messages = 0
        """Consumers and ready messages the broker counted on the queue at the last check."""
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Registers the consumer, then starts watching it."""
        self.tag = await consume_at_start(self.queue, self._on_message)
        self._task = asyncio.create_task(self._watch(), name=f"watchdog-{self.queue.name}")

    async def consuming(self) -> bool:
        """True when our consumer is registered on a live channel and the broker counts a
        consumer on the queue (AMQP tells how many, not whose: with several replicas
        another's counts too; the channel's own registry is what speaks for ours). The queue
        is counted also when ours is gone: its backlog matters most then."""
        if self.tag is None or self._connection.is_closed or self.queue.channel.is_closed:
            return False
        try:
            async with asyncio.timeout(2):
                channel = await self.queue.channel.get_underlay_channel()
            # Not on the consuming channel: a slow answer would close it (queue_counts).
            declared = await queue_counts(self._connection, self.queue.name, timeout=5)
        except Exception:
            return False
        self.broker_consumers = declared.consumer_count or 0
        self.broker_messages = declared.message_count or 0
        return self.tag in getattr(channel, "consumers", {}) and bool(declared.consumer_count)

    async def cancel_consumer(self) -> None:
        """Stops deliveries (shutdown): the watchdog stops first, so it will not restore them."""
        await self.stop()
        await self._cancel()

    async def _cancel(self) -> None:
        """Bounded as a whole: aio-pika's ``cancel`` first waits, with no timeout, for the
        robust channel to be restored, which with the broker gone is never."""
        if self.tag is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self.queue.cancel(self.tag)

    async def stop(self) -> None:
        """Ends the watch loop; idempotent. Cancels it only if it does not end on its own."""
        self._stop.set()
        task, self._task = self._task, None
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=STOP_GRACE_SECONDS)
        if not done:
            log.warning("consumer watchdog did not stop; cancelling it")
            task.cancel()
            await asyncio.wait({task}, timeout=STOP_GRACE_SECONDS)

    async def _pause(self, seconds: float) -> bool:
        """Sleeps, or returns early when stopping; True means keep going."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        return not self._stop.is_set()

    async def _watch(self) -> None:
        while await self._pause(self._interval):
            if not self._connection.connected.is_set() or await self.consuming():
                continue
            if not await self._pause(self._interval / 2):
                return
            if not self._connection.connected.is_set() or await self.consuming():
                continue
            if self._stop.is_set():
                return
            await self._restore()

    async def _restore(self) -> None:
        log.warning("consumer lost; restoring it", queue=self.queue.name)
        await self._cancel()
        try:
            self.tag = await self.queue.consume(self._on_message, timeout=10)
            self.restores += 1
        except Exception as exc:
            log.warning("consumer restore failed; will retry", error=repr(exc))
