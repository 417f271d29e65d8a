"""Parking a command the worker cannot process in ``otp.dead-letter``, with its reason.

The body stays as it came, with one exception: a confirm's candidate code is redacted,
because the contract forbids plaintext codes in dead letters and the candidate may be right.
"""

from __future__ import annotations

from typing import Any

import orjson
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from contracts.topology import (
    CONFIRM_ROUTING_KEY,
    ERROR_TYPE_HEADER,
    REASON_HEADER,
    REDACTED_HEADER,
    ROUTING_KEY_HEADER,
)
from worker.amqp import copy_message


async def park(
    exchange: AbstractExchange,
    message: AbstractIncomingMessage,
    reason: str,
    error_type: str,
    timeout: float,
) -> None:
    """Publishes the dead letter with publisher confirms; raises when it is not confirmed."""
    body, redacted = redact(message.routing_key or "", message.body)
    headers: dict[str, Any] = dict(message.headers or {})
    headers[REASON_HEADER] = reason[:1000]
    headers[ERROR_TYPE_HEADER] = error_type
    headers[ROUTING_KEY_HEADER] = message.routing_key or ""
    if redacted:
        headers[REDACTED_HEADER] = "code"
    await exchange.publish(
        copy_message(message, body, headers), routing_key=message.routing_key or "", timeout=timeout
    )


def redact(routing_key: str, body: bytes) -> tuple[bytes, bool]:
    """A confirm command's candidate may be the real code: it never reaches the dead letters."""
    if routing_key != CONFIRM_ROUTING_KEY or b"code" not in body:
        return body, False
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body, False
    if isinstance(data, dict) and "code" in data:
        data["code"] = "[redacted]"
        return orjson.dumps(data), True
    return body, False
