"""Inspecting and replaying ``otp.dead-letter`` without losing a message.

Both walk the queue with ``basic.get`` and keep every message they do not settle unacked
until the walk ends: an unacked message is not handed out again on the same channel, so each
is seen once, and the ``finally`` returns all of them (``nack(requeue=True)``). If the process
dies mid-walk, the broker requeues them with the channel. A replayed message is acked only
after its copy on ``otp.commands`` is confirmed by the broker (publisher confirms,
``mandatory``): a crash in between duplicates a command, which its ``command_id`` makes
harmless, and never loses one.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from contracts.client import connect_once
from contracts.topology import (
    COMMAND_ROUTING_KEYS,
    COMMANDS_EXCHANGE,
    DEAD_LETTER_QUEUE,
    ERROR_TYPE_HEADER,
    REASON_HEADER,
    REDACTED_HEADER,
    REPLAYS_HEADER,
    ROUTING_KEY_HEADER,
)
from worker import settlement
from worker.amqp import copy_message

DIAGNOSTIC_HEADERS = (REASON_HEADER, ERROR_TYPE_HEADER, ROUTING_KEY_HEADER, REDACTED_HEADER)
BROKER_HEADER_PREFIXES = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")


@dataclass(frozen=True)
class DeadLetter:
    """What an operator needs to decide on a dead letter."""

    message_id: str | None
    routing_key: str
    error_type: str | None
    reason: str | None
    command_id: str | None
    redacted: bool
    replays: int
    body: Any

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> DeadLetter:
        headers = dict(message.headers or {})
        try:
            body: Any = json.loads(message.body)
        except ValueError:
            body = message.body.decode("utf-8", "replace")
        command_id = body.get("command_id") if isinstance(body, dict) else None
        return cls(
            message_id=message.message_id,
            routing_key=_text(headers.get(ROUTING_KEY_HEADER)) or message.routing_key or "",
            error_type=_text(headers.get(ERROR_TYPE_HEADER)),
            reason=_text(headers.get(REASON_HEADER)),
            command_id=command_id if isinstance(command_id, str) else None,
            redacted=REDACTED_HEADER in headers,
            replays=_int(headers.get(REPLAYS_HEADER)),
            body=body,
        )

    def matches(self, wanted: str) -> bool:
        return wanted in (self.message_id, self.command_id)

    def why_not_replayable(self) -> str | None:
        if self.redacted:
            return "its code was redacted, so replaying it would count a wrong attempt"
        if self.routing_key not in COMMAND_ROUTING_KEYS:
            return f"routing key {self.routing_key!r} is not a command"
        return None

    def as_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class ReplayReport:
    replayed: list[DeadLetter]
    skipped: list[tuple[DeadLetter, str]]
    found: bool


async def list_dead_letters(url: str, *, limit: int, timeout: float) -> list[DeadLetter]:
    """Every dead letter (up to ``limit``), each once; all of them stay in the queue."""
    seen: list[DeadLetter] = []

    async def visit(message: AbstractIncomingMessage, channel: AbstractChannel) -> Step:
        seen.append(DeadLetter.of(message))
        return Step(ack=False)

    await _walk(url, timeout, limit, visit)
    return seen


async def replay_dead_letters(
    url: str, *, wanted: str | None, limit: int, timeout: float
) -> ReplayReport:
    """Re-publishes the chosen dead letters to ``otp.commands``; ``wanted=None`` means all."""
    report = ReplayReport([], [], found=False)

    async def visit(message: AbstractIncomingMessage, channel: AbstractChannel) -> Step:
        letter = DeadLetter.of(message)
        if wanted is not None and not letter.matches(wanted):
            return Step(ack=False)
        report.found = True
        problem = letter.why_not_replayable()
        if problem is not None:
            report.skipped.append((letter, problem))
            return Step(ack=False, stop=wanted is not None)
        commands = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=False)
        await commands.publish(
            _replayable_copy(message, letter),
            routing_key=letter.routing_key,
            mandatory=True,
            timeout=timeout,
        )
        report.replayed.append(letter)
        return Step(ack=True, stop=wanted is not None)

    await _walk(url, timeout, limit, visit)
    return report


@dataclass(frozen=True)
class Step:
    """What to do with the message just visited, and whether the walk is over."""

    ack: bool
    stop: bool = False


Visitor = Callable[[AbstractIncomingMessage, AbstractChannel], Awaitable[Step]]


async def _walk(url: str, timeout: float, limit: int, visit: Visitor) -> None:
    """Gets messages one by one; a message not acked is handed back when the walk ends."""
    connection = await connect_once(url, timeout)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue: AbstractQueue = await channel.declare_queue(
            DEAD_LETTER_QUEUE, passive=True, timeout=timeout
        )
        # Only what is there now: a replayed command that is dead-lettered again lands at
        # the tail, and walking on would replay it again, up to ``limit`` times.
        waiting = queue.declaration_result.message_count or 0
        held: list[AbstractIncomingMessage] = []
        try:
            for _ in range(min(limit, waiting)):
                message = await queue.get(no_ack=False, fail=False, timeout=timeout)
                if message is None:
                    break
                held.append(message)
                step = await visit(message, channel)
                if step.ack:
                    await settlement.ack(message)
                    held.pop()
                if step.stop:
                    break
        finally:
            for message in held:
                if not channel.is_closed:
                    await settlement.nack(message, requeue=True)
    finally:
        await settlement.close_after_writes(connection, timeout)


def _replayable_copy(message: AbstractIncomingMessage, letter: DeadLetter) -> aio_pika.Message:
    """The original command and properties; our diagnostics off, a replay count on."""
    headers = {
        key: value
        for key, value in (message.headers or {}).items()
        if key not in DIAGNOSTIC_HEADERS and not key.startswith(BROKER_HEADER_PREFIXES)
    }
    headers[REPLAYS_HEADER] = letter.replays + 1
    return copy_message(message, message.body, headers)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
