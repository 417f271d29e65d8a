"""Parking a command the worker cannot process in ``otp.dead-letter``, with its reason.

The body stays as it came, with one exception: a candidate code is redacted (see
``worker.redaction``), because the contract forbids plaintext codes in dead letters and the
candidate may be right.
"""

from __future__ import annotations

from typing import Any

from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from contracts.topology import (
    ERROR_TYPE_HEADER,
    REASON_HEADER,
    REDACTED_HEADER,
    ROUTING_KEY_HEADER,
)
from worker import settlement
from worker.amqp import copy_message
from worker.log import get_logger
from worker.parsing import command_id_hint
from worker.redaction import MARK, redact

log = get_logger(__name__)


async def park(
    exchange: AbstractExchange,
    message: AbstractIncomingMessage,
    reason: str,
    error_type: str,
    timeout: float,
    routing_key: str | None = None,
) -> None:
    """Publishes the dead letter with publisher confirms; raises when it is not confirmed.

    ``routing_key`` is the command's original one when the message arrives by another route.
    """
    routing_key = routing_key if routing_key is not None else message.routing_key or ""
    body, redacted = redact(routing_key, message.body, message.content_encoding)
    headers: dict[str, Any] = dict(message.headers or {})
    headers[REASON_HEADER] = reason[:1000]
    headers[ERROR_TYPE_HEADER] = error_type
    headers[ROUTING_KEY_HEADER] = routing_key
    if redacted:
        headers[REDACTED_HEADER] = "code"
    copy = copy_message(message, body, headers)
    if redacted and body == MARK.encode():
        copy.content_encoding = None  # the body is the mark now, not a compressed command
    await exchange.publish(copy, routing_key=routing_key, timeout=timeout)


def original_routing_key(message: AbstractIncomingMessage) -> str:
    """The routing key a dead-lettered message was first published with (from ``x-death``)."""
    deaths = (message.headers or {}).get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[-1], dict):
        keys = deaths[-1].get("routing-keys")
        if isinstance(keys, list) and keys:
            key = keys[0]
            return key.decode() if isinstance(key, bytes) else str(key)
    return ""


async def park_undeliverable(
    exchange: AbstractExchange, message: AbstractIncomingMessage, timeout: float
) -> None:
    """A command the broker gave up on after its delivery limit: park it, redacted."""
    try:
        await park(
            exchange,
            message,
            "delivery limit reached: the command failed on every delivery",
            "delivery_limit",
            timeout,
            routing_key=original_routing_key(message),
        )
    except Exception as exc:
        log.warning(
            "could not park an undeliverable command; it stays queued",
            command_id=command_id_hint(message.body),
            error=repr(exc),
        )
        await settlement.nack(message, requeue=True)
        return
    await settlement.ack(message)
