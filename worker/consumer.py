"""The command path: batches of deliveries, one transaction each, replies, acks.

Deliveries wait in an in-memory inbox while a batch is in the store; the next batch takes
all of them at once, so batches grow with load and one commit serves many commands (group
commit). A batch goes through two stages: *prepare* (parse, one transaction) and *finish*
(replies, dead letters, acks). Batch N+1 is prepared while batch N finishes, and batches
finish in delivery order. Nothing is acked before its batch has committed and its reply
is out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import orjson
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from contracts.replies import ConfirmResult, IssueResult
from worker import log as log_lines
from worker.amqp import Outgoing, Publisher, json_properties
from worker.domain.model import Policy
from worker.log import get_logger
from worker.parking import park
from worker.parsing import Command, Rejection, command_id_hint, parse_command
from worker.relay import OutboxRelay
from worker.service import CommandHandler, Handled
from worker.settlement import Settlement, requeue_all
from worker.store.base import OutboxRow, Store, TransientStoreError

log = get_logger(__name__)

STORE_RETRIES = 5
Observer = Callable[[str, Handled | Rejection, float], None]
Step = Callable[[], Awaitable[None]]
Valid = tuple[AbstractIncomingMessage, Command]


@dataclass
class _Prepared:
    """What is left to do for a batch once its transaction has committed."""

    settlement: Settlement = field(default_factory=Settlement)
    steps: list[Step] = field(default_factory=list)


async def _run_steps(steps: Sequence[Step]) -> None:
    """Runs a batch's steps together. Nearly always there is one (the replies) or none, and
    then without ``gather``, whose task per step was part of what each batch costs."""
    if len(steps) == 1:
        await steps[0]()
    elif steps:
        await asyncio.gather(*(step() for step in steps))


class CommandConsumer:
    def __init__(
        self,
        *,
        store: Store,
        handler: CommandHandler,
        policy: Policy,
        replies: Publisher,
        dead_letters: AbstractExchange,
        relay: OutboxRelay,
        batch_size: int,
        publish_timeout: float,
        observe: Observer | None = None,
        observe_batch: Callable[[int], None] | None = None,
        on_store_retry: Callable[[], None] | None = None,
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
        self._observe_batch = observe_batch
        self._on_store_retry = on_store_retry
        self._clock = clock
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._finishing: asyncio.Task[None] | None = None
        self._open_batches = 0
        """Taken from the inbox and not yet finished: counted, because batch N+1 is already
        being prepared while batch N finishes."""
        self._idle = asyncio.Event()
        self._idle.set()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self._idle.clear()
        self._inbox.put_nowait(message)

    async def run(self) -> None:
        try:
            while True:
                batch = [await self._inbox.get()]
                while len(batch) < self._batch_size and not self._inbox.empty():
                    batch.append(self._inbox.get_nowait())
                self._open_batches += 1
                if self._observe_batch is not None:
                    self._observe_batch(len(batch))
                try:
                    prepared = await self._prepare(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("batch failed; its commands are requeued")
                    prepared = _Prepared(steps=[partial(requeue_all, batch)])
                if self._finishing is not None:
                    await self._finishing
                self._finishing = asyncio.create_task(self._finish(batch, prepared))
        finally:
            if self._finishing is not None:
                with contextlib.suppress(Exception):
                    await self._finishing

    async def drain(self, timeout: float) -> None:
        """Waits until every delivery received so far has been handled."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    async def _finish(self, batch: Sequence[AbstractIncomingMessage], prepared: _Prepared) -> None:
        try:
            await _run_steps(prepared.steps)
            await prepared.settlement.flush()
            log_lines.flush()
        except Exception:
            log.exception("finishing a batch failed; its commands are requeued")
            await requeue_all(batch)
        finally:
            self._open_batches -= 1
            if self._open_batches == 0 and self._inbox.empty():
                self._idle.set()

    async def _prepare(self, batch: Sequence[AbstractIncomingMessage]) -> _Prepared:
        started = asyncio.get_running_loop().time()
        prepared = _Prepared()
        valid: list[Valid] = []
        for message in batch:
            try:
                parsed = parse_command(
                    message.routing_key or "", message.body, self._policy, message.user_id
                )
            except Exception:
                command_id = command_id_hint(message.body)
                log.exception(
                    "parsing a command failed unexpectedly",
                    command_id=command_id,
                    command=message.routing_key,
                )
                prepared.steps.append(
                    partial(self._give_up, message, command_id, prepared.settlement)
                )
                continue
            if isinstance(parsed, Rejection):
                prepared.steps.append(
                    partial(self._reject, message, parsed, started, prepared.settlement)
                )
            else:
                valid.append((message, parsed))
        if valid:
            await self._apply(valid, started, prepared)
        return prepared

    async def _apply(self, valid: Sequence[Valid], started: float, prepared: _Prepared) -> None:
        commands = [command for _, command in valid]
        for attempt in range(STORE_RETRIES):
            try:
                async with self._store.transaction() as tx:
                    handled, rows = await self._handler.handle_batch(tx, commands, self._clock())
                break
            except TransientStoreError as exc:
                log.warning("store busy; retrying batch", attempt=attempt + 1, error=str(exc))
                if self._on_store_retry is not None:
                    self._on_store_retry()
                await asyncio.sleep(0.05 * 2**attempt)
            except Exception:
                log.exception("batch failed; handling its commands one by one", size=len(valid))
                await self._isolate(valid, started, prepared)
                return
        else:
            log.error("store unavailable; requeueing batch", size=len(valid))
            for message, _ in valid:
                prepared.settlement.requeue(message)
            return
        prepared.steps.append(
            partial(self._deliver, valid, handled, rows, started, prepared.settlement)
        )

    async def _isolate(self, valid: Sequence[Valid], started: float, prepared: _Prepared) -> None:
        """A batch failed for no transient reason: find the command that breaks it.

        The others are handled one by one; the culprit is dead-lettered, not retried forever.
        """
        if len(valid) > 1:
            for item in valid:
                await self._apply([item], started, prepared)
            return
        message, command = valid[0]
        prepared.steps.append(
            partial(self._give_up, message, command.command_id, prepared.settlement)
        )

    async def _deliver(
        self,
        valid: Sequence[Valid],
        handled: Sequence[Handled | Rejection],
        rows: Sequence[OutboxRow],
        started: float,
        settlement: Settlement,
    ) -> None:
        self._relay.submit(rows)
        now = datetime.now(UTC)
        replies: list[Outgoing] = []
        refused: list[Step] = []
        for (message, command), outcome in zip(valid, handled, strict=True):
            if isinstance(outcome, Rejection):  # a reused command_id: like a malformed command
                refused.append(partial(self._reject, message, outcome, started, settlement))
                continue
            if message.reply_to:
                replies.append(self._reply(message, outcome.reply, outcome.reply_type, now))
            settlement.ack(message)
            log.info(
                "command handled",
                command_id=command.command_id,
                code_id=outcome.code_id,
                command=message.routing_key,
                status=outcome.status,
                replayed=outcome.replayed,
            )
            if self._observe:
                self._observe(message.routing_key or "", outcome, started)
        await self._replies.publish_many(replies, timeout=self._timeout)
        await _run_steps(refused)

    @staticmethod
    def _reply(
        message: AbstractIncomingMessage, reply: dict[str, Any], reply_type: str, now: datetime
    ) -> Outgoing:
        assert message.reply_to
        properties = json_properties(
            type=reply_type, correlation_id=message.correlation_id, persistent=False, timestamp=now
        )
        return "", message.reply_to, orjson.dumps(reply), properties

    async def _reject(
        self,
        message: AbstractIncomingMessage,
        rejection: Rejection,
        started: float,
        settlement: Settlement,
    ) -> None:
        """Reply ``rejected``, park the original in the dead-letter queue, ack: never requeue."""
        command_id = command_id_hint(message.body)  # bounded, unlike the reply's echo
        log.warning(
            "command rejected",
            command_id=command_id,
            command=message.routing_key,
            error_type=rejection.error.type,
            error=rejection.error.message,
            fields=[f.loc for f in rejection.error.fields],
        )
        try:
            await park(
                self._dead_letters, message, rejection.reason, rejection.error.type, self._timeout
            )
        except Exception:
            log.exception(
                "could not dead-letter a rejected command; requeueing it", command_id=command_id
            )
            settlement.requeue(message)
            return
        model = IssueResult if rejection.kind == "issue" else ConfirmResult
        reply = model(command_id=rejection.command_id, status="rejected", error=rejection.error)
        if message.reply_to:
            outgoing = self._reply(message, reply.to_wire(), model.__name__, datetime.now(UTC))
            await self._replies.publish_many([outgoing], timeout=self._timeout)
        settlement.ack(message)
        if self._observe:
            self._observe(message.routing_key or "", rejection, started)

    async def _give_up(
        self, message: AbstractIncomingMessage, command_id: str | None, settlement: Settlement
    ) -> None:
        """A bug, not bad input: park the command for an operator instead of looping on it."""
        log.error("command failed; dead-lettering it", command_id=command_id)
        try:
            await park(
                self._dead_letters,
                message,
                "internal error while handling the command",
                "internal_error",
                self._timeout,
            )
        except Exception:
            log.exception(
                "could not dead-letter a failed command; requeueing it", command_id=command_id
            )
            settlement.requeue(message)
            return
        settlement.ack(message)
