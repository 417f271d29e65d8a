"""Broker plumbing shared by the worker and the notifier: topology and outgoing messages."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aiormq import spec

from contracts.topology import EXCHANGES, ExchangeSpec, QueueSpec

_EXCHANGE_TYPES = {
    "direct": aio_pika.ExchangeType.DIRECT,
    "topic": aio_pika.ExchangeType.TOPIC,
    "fanout": aio_pika.ExchangeType.FANOUT,
}


async def connect(url: str, name: str) -> AbstractRobustConnection:
    """A robust connection; a broker that is down at start fails fast and quietly, with one
    exception for the entry point to report, instead of the client's reconnect chatter."""
    quiet = [logging.getLogger(n) for n in ("aiormq.connection", "aio_pika.robust_connection")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)
    try:
        return await aio_pika.connect_robust(url, client_properties={"connection_name": name})
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)


async def declare_exchange(channel: AbstractChannel, spec: ExchangeSpec) -> AbstractExchange:
    return await channel.declare_exchange(
        spec.name, _EXCHANGE_TYPES[spec.type], durable=spec.durable
    )


async def declare_exchanges(channel: AbstractChannel) -> dict[str, AbstractExchange]:
    return {spec.name: await declare_exchange(channel, spec) for spec in EXCHANGES}


async def declare_queue(channel: AbstractChannel, spec: QueueSpec) -> AbstractQueue:
    queue = await channel.declare_queue(spec.name, durable=spec.durable, arguments=spec.arguments)
    for exchange, routing_key in spec.bindings:
        await queue.bind(exchange, routing_key)
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


def json_properties(
    *,
    type: str,
    message_id: str | None = None,
    correlation_id: str | None = None,
    persistent: bool = True,
    headers: dict[str, Any] | None = None,
) -> spec.Basic.Properties:
    """Every message the service publishes carries these properties (CONTRACT §2)."""
    return spec.Basic.Properties(
        content_type="application/json",
        message_id=message_id or str(uuid.uuid4()),
        correlation_id=correlation_id,
        message_type=type,
        timestamp=datetime.now(UTC),
        delivery_mode=2 if persistent else 1,
        headers=headers,
    )


class Publisher:
    """Publishes a body with its properties through the channel's AMQP layer (aiormq).

    aio-pika's ``Message`` guards every attribute it sets and costs tens of microseconds to
    build; on the hot paths (a reply and an event for every command) that was about a tenth
    of the worker's CPU. The channel stays aio-pika's robust one: after a reconnect,
    ``get_underlay_channel`` waits for the restored channel, as ``Exchange.publish`` does.
    On a channel with publisher confirms the call returns once the broker confirmed, and a
    nack raises ``aiormq.exceptions.DeliveryError``.
    """

    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: spec.Basic.Properties,
        *,
        timeout: float,
    ) -> None:
        async with asyncio.timeout(timeout):
            underlay = await self._channel.get_underlay_channel()
            await underlay.basic_publish(
                body, exchange=exchange, routing_key=routing_key, properties=properties
            )
