"""Broker plumbing shared by the worker and the notifier: topology and outgoing messages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterable, Sequence
from datetime import UTC, datetime
from random import getrandbits
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aiormq import spec
from aiormq.abc import ChannelFrame, FrameType
from aiormq.exceptions import (
    AMQPConnectionError,
    ChannelInvalidStateError,
    ChannelPreconditionFailed,
)
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from contracts.client import connect_robust
from contracts.topology import EXCHANGES, ExchangeSpec, QueueSpec
from worker.log import get_logger

log = get_logger(__name__)

_EXCHANGE_TYPES = {
    "direct": aio_pika.ExchangeType.DIRECT,
    "topic": aio_pika.ExchangeType.TOPIC,
    "fanout": aio_pika.ExchangeType.FANOUT,
}


async def connect(url: str, name: str, timeout: float) -> AbstractRobustConnection:
    """A robust connection; a broker that is down at start fails fast and quietly, with one
    exception for the entry point to report, instead of the client's reconnect chatter.

    ``timeout`` bounds each attempt, this one and the robust connection's reconnects: a
    broker that accepts the connection and never answers is reported as unreachable. A
    cancelled connect (SIGTERM during start) leaves no reconnect task behind
    (``contracts.client.connect_robust`` says why that matters)."""
    quiet = [logging.getLogger(n) for n in ("aiormq.connection", "aio_pika.robust_connection")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)
    try:
        return await connect_robust(url, name=name, timeout=timeout)
    except TimeoutError:
        raise AMQPConnectionError(f"no answer within {timeout:g} s") from None
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)


async def queue_counts(
    connection: AbstractConnection, queue: str, timeout: float
) -> spec.Queue.DeclareOk:
    """A passive declare of ``queue`` (its message and consumer counts), on a plain channel
    of its own, closed after.

    Never on a channel that consumes or publishes: a passive declare that finds the queue
    gone closes its channel, and so does aiormq when the answer takes longer than
    ``timeout`` (a broker slow for a moment): on the consuming channel, every delivery not
    yet acked would come back and be answered twice. Nor on a robust channel, which
    aio-pika would reopen, racing the close."""
    transport = connection.transport
    if transport is None:
        raise ConnectionError("not connected to the broker")
    async with asyncio.timeout(timeout):
        channel = await transport.connection.channel(publisher_confirms=False)  # one trip less
    try:
        return await channel.queue_declare(queue, passive=True, timeout=timeout)
    finally:
        if not channel.is_closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(timeout):
                    await channel.close()


async def declare_exchange(channel: AbstractChannel, spec: ExchangeSpec) -> AbstractExchange:
    return await channel.declare_exchange(
        spec.name, _EXCHANGE_TYPES[spec.type], durable=spec.durable
    )


async def declare_exchanges(channel: AbstractChannel) -> dict[str, AbstractExchange]:
    return {spec.name: await declare_exchange(channel, spec) for spec in EXCHANGES}


async def declare_queue(channel: AbstractChannel, spec: QueueSpec) -> AbstractQueue:
    queue = await channel.declare_queue(spec.name, durable=spec.durable, arguments=spec.arguments)
    return await _bound(queue, spec)


async def _bound(queue: AbstractQueue, spec: QueueSpec) -> AbstractQueue:
    for exchange, routing_key in spec.bindings:
        await queue.bind(exchange, routing_key)
    return queue


async def declare_queue_or_adopt(
    connection: AbstractRobustConnection, spec: QueueSpec
) -> AbstractQueue:
    """``declare_queue`` on a channel of its own, which stays open so that a reconnect
    declares and binds the queue again.

    When the broker refuses because the queue exists with other arguments (PRECONDITION_FAILED)
    and the spec says ``adopt_existing``, the queue is used as it is: a passive declare on a
    fresh channel (the refusal closed the first), then the bindings, and one warning. Any
    other refusal, or one for another queue, is raised, for the entry point to report."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        return await declare_queue(channel, spec)
    except ChannelPreconditionFailed as exc:
        if not spec.adopt_existing:
            raise
        refusal = exc
    with contextlib.suppress(Exception):
        await channel.close()
    channel = await connection.channel(publisher_confirms=False)
    queue = await _bound(await channel.declare_queue(spec.name, passive=True), spec)
    log.warning(
        "queue exists with other arguments; using it as it is",
        queue=spec.name,
        refusal=str(refusal),
    )
    return queue


def copy_message(
    message: AbstractIncomingMessage, body: bytes, headers: dict[str, Any]
) -> aio_pika.Message:
    """A persistent copy of a received command, its properties kept, for parking or replay."""
    return aio_pika.Message(
        body,
        headers=headers,
        content_type=message.content_type or "application/json",
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


def new_message_id() -> str:
    """A random (version 4) UUID, as text. Message ids need to be unique, not secret; this
    costs a third of ``str(uuid.uuid4())``, which showed in profiles (one per reply)."""
    h = f"{getrandbits(128) & _UUID_RANDOM_BITS | _UUID_V4_BITS:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_UUID_V4_BITS = (0x4 << 76) | (0x2 << 62)  # version 4, variant RFC 4122
_UUID_RANDOM_BITS = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)


def json_properties(
    *,
    type: str,
    message_id: str | None = None,
    correlation_id: str | None = None,
    persistent: bool = True,
    headers: dict[str, Any] | None = None,
    timestamp: datetime | None = None,
) -> spec.Basic.Properties:
    """Every message the service publishes carries these properties (CONTRACT §2)."""
    return spec.Basic.Properties(
        content_type="application/json",
        message_id=message_id or new_message_id(),
        correlation_id=correlation_id,
        message_type=type,
        timestamp=timestamp or datetime.now(UTC),
        delivery_mode=2 if persistent else 1,
        headers=headers,
    )


Outgoing = tuple[str, str, bytes, spec.Basic.Properties]
"""Exchange, routing key, body and properties of one message to publish."""


class Publisher:
    """Publishes bodies with their properties through the channel's AMQP layer (aiormq).

    aio-pika's ``Message`` guards every attribute it sets and costs tens of microseconds to
    build; on the hot paths (a reply and an event for every command) that was about a tenth
    of the worker's CPU. Publishes do not wait for the socket to drain (``wait=False``):
    frames still leave in order through the connection's bounded write queue, so an ack
    sent after a reply cannot overtake it, and a confirm means the broker has the message.
    The channel stays aio-pika's robust one: after a reconnect, ``get_underlay_channel``
    waits for the restored channel, as ``Exchange.publish`` does.

    A batch (a batch's replies, a relay pass's events) goes to that queue as one item
    holding every message's frames: aiormq bounds the queue at 10 items, and one item per
    message made a batch wait on the writer task every ten. This leans on aiormq's channel
    attributes (``write_queue``, ``lock``, ``delivery_tag``, ``confirmations``) as its own
    ``basic_publish`` uses them; tests/integration/test_publisher.py checks the result on
    the broker.
    """

    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel

    async def _underlay(self) -> aiormq.Channel:
        # The concrete channel: its basic_publish takes ``wait``, the abstract one's does not.
        return cast(aiormq.Channel, await self._channel.get_underlay_channel())

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: spec.Basic.Properties,
        *,
        timeout: float,
    ) -> None:
        """On a channel with publisher confirms this returns once the broker confirmed; a
        nack raises ``aiormq.exceptions.DeliveryError``."""
        await self.publish_many([(exchange, routing_key, body, properties)], timeout=timeout)

    async def publish_many(self, messages: Iterable[Outgoing], *, timeout: float) -> None:
        """Publishes in order, under one timeout.

        On a confirming channel, one at a time, each waiting for its confirm. On a channel
        without confirms (the replies') all of them go to the connection's write queue as
        one item: one socket write for a batch's replies instead of one each, and none of
        ``basic_publish``'s per-call machinery (its countdown, timeout, lock and a queue
        item per message), which cost ~15 µs of the ~30 µs a reply took. The frames are
        the ones ``basic_publish`` would send, in the same order and on the same queue, so
        an ack sent after them still cannot overtake them."""
        async with asyncio.timeout(timeout):
            underlay = await self._underlay()
            if underlay.publisher_confirms:
                for message in messages:
                    await _basic_publish(underlay, message)
                return
            if underlay.is_closed:
                raise ChannelInvalidStateError(f"{underlay!r} is closed")
            batch = list(messages)
            if batch:
                await underlay.write_queue.put(_one_item(underlay, batch))

    async def publish_confirmed(
        self, messages: Sequence[Outgoing], *, timeout: float
    ) -> list[BaseException | None]:
        """Publishes all at once on a confirming channel and waits for the confirms together.

        Returns, per message, ``None`` once confirmed, else what went wrong (a nack's
        ``DeliveryError``, the channel's end, or ``TimeoutError`` when no confirm came
        within ``timeout``). The messages go as one item of the write queue, like a batch
        of replies (``publish_many``), each with its confirm registered as
        ``basic_publish`` registers one: no task and no queue item per message."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout(timeout):
                underlay = await self._underlay()
                confirms = await _put_confirmed(underlay, messages)
        except Exception as exc:  # not sent: no confirm will come
            return [exc] * len(messages)
        if confirms:
            await asyncio.wait(confirms, timeout=max(0.0, deadline - loop.time()))
        return [
            confirm.exception()
            if confirm.done() and not confirm.cancelled()
            else TimeoutError("no confirm in time")
            for confirm in confirms
        ]


async def _put_confirmed(
    underlay: aiormq.Channel, messages: Sequence[Outgoing]
) -> list[asyncio.Future[Any]]:
    """The messages' frames as one write-queue item, and a future per message under the
    delivery tag the broker will confirm it by (aiormq resolves them, or fails them when
    the channel closes). Under the channel's lock, so no other publish takes a tag in
    between; the tags are taken and the futures registered only once the item is on the
    queue, with no await in between, so a publish cancelled while it waits for room leaves
    nothing behind, and the writer cannot send the item before its confirms are in place."""
    if not messages:
        return []
    item = _one_item(underlay, messages)
    async with underlay.lock:
        if underlay.is_closed:
            raise ChannelInvalidStateError(f"{underlay!r} is closed")
        await underlay.write_queue.put(item)
        first = underlay.delivery_tag + 1
        underlay.delivery_tag += len(messages)
        confirms = [underlay.create_future() for _ in messages]
        for tag, confirm in enumerate(confirms, start=first):
            underlay.confirmations[tag] = confirm
    return confirms


def _one_item(underlay: aiormq.Channel, messages: Iterable[Outgoing]) -> ChannelFrame:
    """Every message's frames, marshalled for ``underlay`` as one write-queue item."""
    frames: list[FrameType | ContentBody] = []
    for message in messages:
        frames.extend(_publish_frames(underlay.max_content_size, message))
    return ChannelFrame.marshall(channel_number=underlay.number, frames=frames)


def _publish_frames(max_content_size: int, message: Outgoing) -> list[FrameType | ContentBody]:
    """A ``basic.publish`` method frame, its content header and its body frames."""
    exchange, routing_key, body, properties = message
    return [
        spec.Basic.Publish(exchange=exchange, routing_key=routing_key),
        ContentHeader(properties=properties, body_size=len(body)),
        *(
            ContentBody(body[start : start + max_content_size])
            for start in range(0, len(body), max_content_size)
        ),
    ]


def _basic_publish(underlay: aiormq.Channel, message: Outgoing) -> Awaitable[object]:
    """Without waiting for the socket to drain (the class docstring says why that is safe);
    on a confirming channel the awaitable ends with the broker's confirm."""
    exchange, routing_key, body, properties = message
    return underlay.basic_publish(
        body, exchange=exchange, routing_key=routing_key, properties=properties, wait=False
    )
