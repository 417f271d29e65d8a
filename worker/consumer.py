"""The command path: batches of deliveries, one transaction each, replies, acks.

Deliveries wait in an in-memory inbox while a batch is in the store; the next batch takes
all of them at once, so batches grow with load and a commit is shared by many commands
(group commit). Nothing is acked before its batch has committed and its reply is out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from contracts.replies import ConfirmResult, IssueResult
from contracts.topology import (
    CONFIRM_ROUTING_KEY,
    ERROR_TYPE_HEADER,
    REASON_HEADER,
    REDACTED_HEADER,
    ROUTING_KEY_HEADER,
)
from worker.amqp import json_message
from worker.domain.model import Policy
from worker.log import get_logger
from worker.parsing import Command, Rejection, parse_command
from worker.relay import OutboxRelay
from worker.service import CommandHandler, Handled
from worker.store.base import Store, TransientStoreError

log = get_logger(__name__)

STORE_RETRIES = 5
Observer = Callable[[str, Handled | Rejection, float], None]


class CommandConsumer:
    def __init__(
        self,
        *,
        store: Store,
        handler: CommandHandler,
        policy: Policy,
        replies: AbstractExchange,
        dead_letters: AbstractExchange,
        relay: OutboxRelay,
        batch_size: int,
        publish_timeout: float,
        observe: Observer | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._handler = handler
        self._policy = policy
        self._replies = replies
        self._dead_letters = dead_letters
        self._relay = relay
        self._batch_size = batch_size
        self._timeout = publish_timeout
        self._observe = observe
        self._clock = clock
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._busy = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.last_delivery_at = 0.0

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self._idle.clear()
        self._inbox.put_nowait(message)

    async def run(self) -> None:
        while True:
            batch = [await self._inbox.get()]
            while len(batch) < self._batch_size and not self._inbox.empty():
                batch.append(self._inbox.get_nowait())
            self._busy = True
            try:
                await self._process(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch failed; its commands are requeued")
                await _settle(batch, requeue=True)
            finally:
                self._busy = False
                if self._inbox.empty():
                    self._idle.set()

    async def drain(self, timeout: float) -> None:
        """Waits until every delivery received so far has been handled."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    async def _process(self, batch: Sequence[AbstractIncomingMessage]) -> None:
        started = asyncio.get_running_loop().time()
        valid: list[tuple[AbstractIncomingMessage, Command]] = []
        rejected: list[tuple[AbstractIncomingMessage, Rejection]] = []
        work = []
        for message in batch:
            try:
                parsed = parse_command(message.routing_key or "", message.body, self._policy)
            except Exception:
                work.append(self._give_up(message, None))
                continue
            if isinstance(parsed, Rejection):
                rejected.append((message, parsed))
            else:
                valid.append((message, parsed))
        work += [self._reject(message, rejection, started) for message, rejection in rejected]
        if valid:
            work.append(self._apply(valid, started))
        await asyncio.gather(*work)

    async def _apply(
        self, valid: Sequence[tuple[AbstractIncomingMessage, Command]], started: float
    ) -> None:
        commands = [command for _, command in valid]
        for attempt in range(STORE_RETRIES):
            try:
                async with self._store.transaction() as tx:
                    handled, rows = await self._handler.handle_batch(tx, commands, self._clock())
                break
            except TransientStoreError as exc:
                log.warning("store busy; retrying batch", attempt=attempt + 1, error=str(exc))
                await asyncio.sleep(0.05 * 2**attempt)
            except Exception:
                await self._isolate(valid, started)
                return
        else:
            log.error("store unavailable; requeueing batch", size=len(valid))
            await _settle([m for m, _ in valid], requeue=True)
            return
        await asyncio.gather(
            *(
                self._reply(message, outcome)
                for (message, _), outcome in zip(valid, handled, strict=True)
            )
        )
        self._relay.submit(rows)
        for (message, command), outcome in zip(valid, handled, strict=True):
            structlog.contextvars.bind_contextvars(
                command_id=command.command_id, code_id=outcome.code_id
            )
            log.info(
                "command handled",
                command=message.routing_key,
                status=outcome.status,
                replayed=outcome.replayed,
            )
            structlog.contextvars.clear_contextvars()
            if self._observe:
                self._observe(message.routing_key or "", outcome, started)

    async def _isolate(
        self, valid: Sequence[tuple[AbstractIncomingMessage, Command]], started: float
    ) -> None:
        """A batch failed for no transient reason: find the command that breaks it.

        The others are handled one by one; the culprit is dead-lettered, not retried forever.
        """
        if len(valid) > 1:
            for item in valid:
                await self._apply([item], started)
            return
        message, command = valid[0]
        await self._give_up(message, command.command_id)

    async def _give_up(self, message: AbstractIncomingMessage, command_id: str | None) -> None:
        """A bug, not bad input: park the command for an operator instead of looping on it."""
        structlog.contextvars.bind_contextvars(command_id=command_id)
        log.exception("command failed; dead-lettering it")
        structlog.contextvars.clear_contextvars()
        try:
            await self._dead_letter(
                message, "internal error while handling the command", "internal_error"
            )
        except Exception:
            await _settle([message], requeue=True)
            return
        await _ack(message)

    async def _reply(self, message: AbstractIncomingMessage, outcome: Handled) -> None:
        await self._send_reply(message, outcome.reply, outcome.reply_type)
        await _ack(message)

    async def _send_reply(
        self, message: AbstractIncomingMessage, reply: dict[str, Any], reply_type: str
    ) -> None:
        if not message.reply_to:
            return
        await self._replies.publish(
            json_message(
                orjson.dumps(reply),
                type=reply_type,
                correlation_id=message.correlation_id,
                persistent=False,
            ),
            routing_key=message.reply_to,
            mandatory=False,
            timeout=self._timeout,
        )

    async def _reject(
        self, message: AbstractIncomingMessage, rejection: Rejection, started: float
    ) -> None:
        """Reply ``rejected``, park the original in the dead-letter queue, ack: never requeue."""
        structlog.contextvars.bind_contextvars(command_id=rejection.command_id)
        log.warning(
            "command rejected",
            command=message.routing_key,
            error_type=rejection.error.type,
            error=rejection.error.message,
            fields=[f.loc for f in rejection.error.fields],
        )
        structlog.contextvars.clear_contextvars()
        try:
            await self._dead_letter(message, rejection.reason, rejection.error.type)
        except Exception:
            log.exception("could not dead-letter a rejected command; requeueing it")
            await _settle([message], requeue=True)
            return
        model = IssueResult if rejection.kind == "issue" else ConfirmResult
        reply = model(command_id=rejection.command_id, status="rejected", error=rejection.error)
        await self._send_reply(message, reply.to_wire(), model.__name__)
        await _ack(message)
        if self._observe:
            self._observe(message.routing_key or "", rejection, started)

    async def _dead_letter(
        self, message: AbstractIncomingMessage, reason: str, error_type: str
    ) -> None:
        body, redacted = redact(message.routing_key or "", message.body)
        headers: dict[str, Any] = dict(message.headers or {})
        headers[REASON_HEADER] = reason[:1000]
        headers[ERROR_TYPE_HEADER] = error_type
        headers[ROUTING_KEY_HEADER] = message.routing_key or ""
        if redacted:
            headers[REDACTED_HEADER] = "code"
        await self._dead_letters.publish(
            _copy_of(message, body, headers),
            routing_key=message.routing_key or "",
            timeout=self._timeout,
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


def _copy_of(message: AbstractIncomingMessage, body: bytes, headers: dict[str, Any]) -> Any:
    import aio_pika

    return aio_pika.Message(
        body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


async def _ack(message: AbstractIncomingMessage) -> None:
    try:
        await message.ack()
    except Exception as exc:  # channel gone: the broker redelivers, the reply is replayed
        log.info("ack lost with its channel; the command will be redelivered", error=repr(exc))


async def _settle(messages: Sequence[AbstractIncomingMessage], *, requeue: bool) -> None:
    for message in messages:
        try:
            await message.nack(requeue=requeue)
        except Exception as exc:
            log.info("nack lost with its channel", error=repr(exc))
