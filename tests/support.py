"""Test helpers: a vhost per run, a tiny RPC producer, event collection, worker processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage
from yarl import URL

from contracts.topology import (
    COMMAND_QUEUE,
    COMMAND_QUEUE_SPEC,
    COMMANDS_EXCHANGE,
    DEAD_LETTERS,
    EVENTS_EXCHANGE,
)
from worker.amqp import declare_exchanges, declare_queue

if TYPE_CHECKING:
    from worker.app import Worker

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Audit:
    """Every plaintext code and destination the suite saw; no log file may contain them."""

    codes: set[str] = field(default_factory=set)
    destinations: set[str] = field(default_factory=set)


AUDIT = Audit()
BROKER = os.environ.get("OTP_TEST_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672")


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def create_vhost(name: str) -> str:
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return f"{BROKER}/{name}"


def delete_vhost(name: str) -> None:
    subprocess.run(
        ["rabbitmqctl", "-q", "delete_vhost", name], check=False, capture_output=True, timeout=60
    )


@contextmanager
def broker_user(vhost_url: str) -> Iterator[tuple[str, str]]:
    """A broker user of its own with every permission on the vhost: (name, its URL there).
    Deleted at the end, like the vhost."""
    url = URL(vhost_url)
    name = f"otp-test-user-{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    rabbitmqctl("add_user", name, password)
    try:
        rabbitmqctl("set_permissions", "-p", url.path.lstrip("/"), name, ".*", ".*", ".*")
        yield name, str(url.with_user(name).with_password(password))
    finally:
        subprocess.run(
            ["rabbitmqctl", "-q", "delete_user", name], check=False, capture_output=True, timeout=60
        )


@dataclass
class Producer:
    """Publishes commands like a foreign service and collects replies by correlation id."""

    connection: aio_pika.abc.AbstractConnection
    channel: aio_pika.abc.AbstractChannel
    exchange: aio_pika.abc.AbstractExchange
    reply_queue: aio_pika.abc.AbstractQueue
    replies: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    reply_messages: list[AbstractIncomingMessage] = field(default_factory=list)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        self.reply_messages.append(message)
        body = orjson.loads(message.body)
        if isinstance(body, dict) and isinstance(body.get("code"), str):
            AUDIT.codes.add(body["code"])
        future = self.replies.get(message.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(body)

    async def send(
        self,
        routing_key: str,
        body: dict[str, Any] | bytes,
        *,
        correlation_id: str | None = None,
        user_id: str | None = None,
    ) -> asyncio.Future[dict[str, Any]]:
        correlation_id = correlation_id or str(uuid.uuid4())
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.replies[correlation_id] = future
        if isinstance(body, dict) and isinstance(body.get("destination"), str):
            AUDIT.destinations.add(body["destination"])
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        await self.exchange.publish(
            aio_pika.Message(
                raw,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                reply_to=self.reply_queue.name,
                correlation_id=correlation_id,
                user_id=user_id,
            ),
            routing_key=routing_key,
        )
        return future

    async def call(
        self, routing_key: str, body: dict[str, Any] | bytes, timeout: float = 15
    ) -> dict[str, Any]:
        future = await self.send(routing_key, body)
        return await asyncio.wait_for(future, timeout)

    async def issue(self, timeout: float = 15, **fields: Any) -> dict[str, Any]:
        fields.setdefault("command_id", str(uuid.uuid4()))
        fields.setdefault("client", "test-app")
        fields.setdefault("channel", "none")
        return await self.call("code.issue", fields, timeout)

    async def confirm(self, timeout: float = 15, **fields: Any) -> dict[str, Any]:
        fields.setdefault("command_id", str(uuid.uuid4()))
        fields.setdefault("client", "test-app")
        return await self.call("code.confirm", fields, timeout)


@asynccontextmanager
async def producer(url: str) -> AsyncIterator[Producer]:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            COMMANDS_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
        )
        reply_queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        p = Producer(connection, channel, exchange, reply_queue)
        await reply_queue.consume(p._on_reply, no_ack=True)
        yield p
    finally:
        await connection.close()


@dataclass
class EventLog:
    """Every event published on otp.events while it is open."""

    messages: list[AbstractIncomingMessage] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        self.messages.append(message)
        self.bodies.append(orjson.loads(message.body))
        self.changed.set()

    def named(self, name: str) -> list[dict[str, Any]]:
        return [b for b in self.bodies if b["event"] == name]

    def distinct(self, name: str | None = None) -> list[dict[str, Any]]:
        """The events (of ``name``) once each: a relay publishes an event again when its
        confirm comes later than the outbox lease (tests use a 3 s one), which a slow host
        can do; counting raw messages would then fail where nothing is wrong."""
        seen: dict[str, dict[str, Any]] = {}
        for body in self.bodies if name is None else self.named(name):
            seen.setdefault(body["event_id"], body)
        return list(seen.values())

    async def wait_for(self, predicate: Any, timeout: float = 20) -> None:
        async def _wait() -> None:
            while not predicate(self):
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(_wait(), timeout)


@asynccontextmanager
async def event_log(url: str, pattern: str = "#") -> AsyncIterator[EventLog]:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        await queue.bind(exchange, pattern)
        log = EventLog()
        await queue.consume(log._on_event, no_ack=True)
        yield log
    finally:
        await connection.close()


def worker_env(amqp_url: str, database_url: str, var_dir: Path, **overrides: str) -> dict[str, str]:
    """Environment for a worker or notifier subprocess (keys fixed, so processes agree)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTP_")}
    env.update(
        OTP_AMQP_URL=amqp_url,
        OTP_DATABASE_URL=database_url,
        OTP_SECRET_KEY=TEST_SECRET_KEY,
        OTP_DELIVERY_KEY=TEST_DELIVERY_KEY,
        OTP_VAR_DIR=str(var_dir),
        OTP_LOG_FORMAT="json",
        OTP_RESEND_COOLDOWN_SECONDS="0",
        OTP_MAX_SENDS_PER_SCOPE_PER_HOUR="1000",
        OTP_MAX_SENDS_PER_DESTINATION_PER_HOUR="1000",
        OTP_MAX_CONSECUTIVE_FAILURES="100",
        OTP_CONSUMER_CHECK_SECONDS="1",
        OTP_OUTBOX_LEASE_SECONDS="3",
        PYTHONPATH=str(ROOT),
    )
    env.update(overrides)
    return env


TEST_SECRET_KEY = "test-secret-key-0123456789abcdef"
TEST_DELIVERY_KEY = "aGFwcHktdGVzdGluZy1kZWxpdmVyeS1rZXktMzJieXQ="


def start_process(module: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as handle:  # the child has its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", module],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=str(log_path.parent),
        )


async def cancel_parking_consumer(worker: Worker) -> None:
    """Cancels the worker's consumer of otp.worker.undeliverable on its own channel, as a lost
    consumer looks after some reconnects."""
    parking = worker._parking
    assert parking is not None and parking.tag is not None
    channel = await parking.queue.channel.get_underlay_channel()
    assert list(channel.consumers) == [parking.tag]  # alone on its channel
    await channel.basic_cancel(parking.tag)


async def consumers_of(url: str, queue: str) -> int:
    """The consumers the broker counts on a queue, asked as a foreign client would."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.consumer_count or 0
    finally:
        await connection.close()


@asynccontextmanager
async def channel_on(url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(url)
    try:
        yield await connection.channel()
    finally:
        await connection.close()


async def declare_topology(url: str, *, with_queue: bool = True) -> None:
    """What a worker leaves behind when it is not running: exchanges and, maybe, its queue."""
    async with channel_on(url) as channel:
        await declare_exchanges(channel)
        if with_queue:
            await declare_queue(channel, DEAD_LETTERS)
            await declare_queue(channel, COMMAND_QUEUE_SPEC)


async def queued_commands(url: str) -> int:
    async with channel_on(url) as channel:
        queue = await channel.declare_queue(COMMAND_QUEUE, passive=True)
        return queue.declaration_result.message_count or 0
