"""The ceiling: a bare aio-pika consumer doing only the broker work of one issue command.

Per delivery: publish a reply to ``reply_to`` on the default exchange, publish one persistent
event to ``otp.events`` with publisher confirms and wait for the confirm, then ack. Prefetch
256 (``BENCH_PREFETCH``), the same quorum command queue as the worker (declared from
``contracts.topology.COMMAND_QUEUE_SPEC``), the same event loop (uvloop when installed) and
the same message properties as the worker's (content type, message id, type, timestamp).

Run as ``python -m bench.raw_consumer`` with ``BENCH_AMQP_URL`` set. SIGTERM stops
consuming, lets in-flight deliveries finish and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from datetime import UTC, datetime

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage

from contracts.topology import COMMAND_QUEUE_SPEC, EVENTS_EXCHANGE
from worker.loop import run as run_loop

# Sized like the worker's: an IssueResult reply and a code.issued event with a sealed code.
_REPLY_PAD = "x" * 36
_EVENT_PAD = "x" * 100


def _reply_body(correlation_id: str | None) -> bytes:
    return orjson.dumps(
        {
            "command_id": correlation_id or "",
            "status": "raw",
            "code_id": _REPLY_PAD,
            "expires_at": "2030-01-01T00:00:00.000000Z",
            "resent": False,
        }
    )


def _event_body(event_id: str) -> bytes:
    return orjson.dumps(
        {
            "event": "code.issued",
            "event_id": event_id,
            "occurred_at": "2030-01-01T00:00:00Z",
            "code_id": _REPLY_PAD,
            "user": "bench-user-0000000",
            "client": "bench",
            "purpose": "login",
            "channel": "none",
            "destination": None,
            "locale": "en",
            "context": {},
            "expires_at": "2030-01-01T00:05:00Z",
            "resent": False,
            "sealed_code": _EVENT_PAD * 2,
        }
    )


async def serve() -> None:
    url = os.environ["BENCH_AMQP_URL"]
    prefetch = int(os.environ.get("BENCH_PREFETCH", "256"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    connection = await aio_pika.connect(url, client_properties={"connection_name": "bench-raw"})
    consume = await connection.channel(publisher_confirms=False)
    await consume.set_qos(prefetch_count=prefetch)
    confirmed = await connection.channel(publisher_confirms=True)
    events = await confirmed.declare_exchange(
        EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    spec = COMMAND_QUEUE_SPEC
    queue = await consume.declare_queue(spec.name, durable=spec.durable, arguments=spec.arguments)
    for exchange, routing_key in spec.bindings:
        await queue.bind(exchange, routing_key)
    replies = consume.default_exchange
    in_flight: set[asyncio.Task[None]] = set()

    async def handle(message: AbstractIncomingMessage) -> None:
        now = datetime.now(UTC)
        if message.reply_to:
            await replies.publish(
                aio_pika.Message(
                    _reply_body(message.correlation_id),
                    content_type="application/json",
                    message_id=str(uuid.uuid4()),
                    correlation_id=message.correlation_id,
                    type="IssueResult",
                    timestamp=now,
                    delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
                ),
                routing_key=message.reply_to,
                timeout=10,
            )
        event_id = str(uuid.uuid4())
        await events.publish(
            aio_pika.Message(
                _event_body(event_id),
                content_type="application/json",
                message_id=event_id,
                type="code.issued",
                timestamp=now,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key="code.issued",
            timeout=10,
        )
        await message.ack()

    async def on_message(message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            in_flight.add(task)
        try:
            await handle(message)
        finally:
            if task is not None:
                in_flight.discard(task)

    tag = await queue.consume(on_message)
    print("raw consumer consuming", flush=True)
    await stop.wait()
    with contextlib.suppress(Exception):
        await queue.cancel(tag, timeout=5)
    if in_flight:
        await asyncio.wait(list(in_flight), timeout=30)
    await connection.close()


def main() -> int:
    run_loop(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
