"""Acknowledging deliveries: with as few frames as possible, and never waiting on a dead channel."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Sequence
from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aiormq.abc import ChannelFrame
from aiormq.exceptions import ChannelInvalidStateError

from worker.log import get_logger

log = get_logger(__name__)


class Settlement:
    """Acks and requeues of one batch, sent once it is done: requeues first, then one
    ``multiple`` ack per channel covering everything delivered up to its last tag.

    Batches leave the inbox in delivery order and are settled in that order, so every
    earlier delivery on a channel is already settled when a batch's multiple ack goes out.
    That holds because the command consumer has its channel to itself (``Worker.start``).
    """

    def __init__(self) -> None:
        self._acks: list[AbstractIncomingMessage] = []
        self._requeues: list[AbstractIncomingMessage] = []

    def ack(self, message: AbstractIncomingMessage) -> None:
        self._acks.append(message)

    def requeue(self, message: AbstractIncomingMessage) -> None:
        self._requeues.append(message)

    async def flush(self) -> None:
        await requeue_all(self._requeues)
        last_by_channel: dict[int, AbstractIncomingMessage] = {}
        for message in self._acks:
            try:
                key = id(message.channel)
            except ChannelInvalidStateError:
                continue  # closed: the broker has requeued it, there is nothing to ack
            held = last_by_channel.get(key)
            if held is None or (message.delivery_tag or 0) > (held.delivery_tag or 0):
                last_by_channel[key] = message
        for message in last_by_channel.values():
            try:
                await ack(message, multiple=True)
            except Exception as exc:  # channel gone: the broker redelivers, replies are replayed
                log.info(
                    "acks lost with their channel; commands will be redelivered", error=repr(exc)
                )
        self._acks.clear()
        self._requeues.clear()


async def requeue_all(messages: Sequence[AbstractIncomingMessage]) -> None:
    for message in messages:
        try:
            await nack(message, requeue=True)
        except Exception as exc:
            log.info("requeue lost with its channel; the broker redelivers", error=repr(exc))


async def ack(message: AbstractIncomingMessage, *, multiple: bool = False) -> None:
    """``message.ack``, given up (``ChannelInvalidStateError``) once its channel closes.

    With room in the connection's write queue the ack frame is queued at once, without
    waiting for the socket to drain: it cannot wait for ever, so it needs none of
    ``_while_open``'s task and wait, which were a good part of what a small batch costs.
    It still leaves after the replies queued before it."""
    # aio-pika raises here once the channel is closed; the concrete channel has the queue.
    channel = cast(aiormq.Channel, message.channel)
    if message.delivery_tag is not None and not channel.write_queue.full():
        await channel.basic_ack(message.delivery_tag, multiple=multiple, wait=False)
        return
    await _while_open(message, message.ack(multiple=multiple))


FLUSH_SECONDS = 5.0
"""How long a closing process waits for its last frames to be written."""


async def flush_writes(connection: AbstractConnection, timeout: float) -> None:
    """Waits until every frame queued on ``connection`` so far has gone to the socket.

    ``ack`` queues its frame without waiting, and closing a connection abandons its write
    queue: a process that acks and then closes must call this in between, or the broker
    redelivers what was handled (a second reply, a dead letter replayed twice). Gives up
    quietly after ``timeout`` or on a connection already gone: then nothing more can be
    written anyway."""
    transport = connection.transport
    if transport is None or transport.connection.is_closed:
        return
    written = asyncio.get_running_loop().create_future()
    with contextlib.suppress(TimeoutError, asyncio.QueueFull):
        async with asyncio.timeout(timeout):
            await transport.connection.write_queue.put(
                ChannelFrame(payload=b"", should_close=False, drain_future=written)
            )
            await written


async def close_after_writes(connection: AbstractConnection, timeout: float) -> None:
    """Closes ``connection`` once the frames queued on it (``ack`` queues without waiting)
    have been written (``flush_writes``): every process that acks closes this way."""
    await flush_writes(connection, timeout)
    await connection.close()


async def nack(message: AbstractIncomingMessage, *, requeue: bool) -> None:
    """``message.nack``, given up (``ChannelInvalidStateError``) once its channel closes."""
    await _while_open(message, message.nack(requeue=requeue))


async def reject(message: AbstractIncomingMessage, *, requeue: bool) -> None:
    """``message.reject``, given up (``ChannelInvalidStateError``) once its channel closes."""
    await _while_open(message, message.reject(requeue=requeue))


async def _while_open(message: AbstractIncomingMessage, send: Coroutine[Any, Any, None]) -> None:
    """Sends an ack, nack or reject, and stops waiting for it when its channel closes.

    aiormq checks that the channel is open, then waits for room in the connection's bounded
    write queue. When the connection dies between the two, nothing drains that queue and
    nothing cancels the wait: the caller (for the command consumer, every batch behind
    this one) would wait for ever on a channel whose deliveries the broker has requeued.
    """
    try:
        closed = message.channel.closing  # aio-pika raises here once the channel is closed
    except BaseException:
        send.close()
        raise
    sent = asyncio.ensure_future(send)
    try:
        await asyncio.wait({sent, closed}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        sent.cancel()
        raise
    finally:
        closed.cancel()  # an observer: cancelling it leaves the channel alone
    if not sent.done():
        sent.cancel()
        raise ChannelInvalidStateError("channel closed before the frame was sent")
    sent.result()
