"""One ``code.issued`` message, from receipt to ack.

The order is: attempt the delivery (claiming the event first, see ``store.py``), remember it,
publish the outcome event (or park the message in a delay queue) with publisher confirms, and
only then ack. A crash at any point leaves the message unacked, so it comes back; what was
already sent is found in the store, and the outcome event is republished under the same
deterministic ``event_id``.
"""

from __future__ import annotations

import contextlib
import uuid
from datetime import UTC, datetime

import structlog
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from contracts.events import CodeDelivered, CodeDeliveryFailed, CodeIssued
from contracts.topology import EVENTS_EXCHANGE, event_routing_key
from worker import settlement
from worker.amqp import Publisher, json_properties
from worker.log import get_logger
from worker.notifier.delivery import Busy, Delivered, Deliverer, Failed, Outcome, Retry, Skip
from worker.notifier.retry import ATTEMPT_HEADER

log = get_logger(__name__)

_OUTCOME_NAMESPACE = uuid.UUID("5b0c5a0e-8a8e-4c43-9a55-5f3b8e0f7a10")


def outcome_event_id(event_id: str, outcome: str) -> str:
    """The same input event always yields the same outcome id, so subscribers deduplicate."""
    return str(uuid.uuid5(_OUTCOME_NAMESPACE, f"{event_id}/{outcome}"))


class MessageHandler:
    def __init__(
        self,
        *,
        deliverer: Deliverer,
        publisher: Publisher,
        retry_queues: dict[int, str],
        claim_wait_queue: str,
        publish_timeout: float,
    ) -> None:
        self._deliverer = deliverer
        self._publisher = publisher
        self._retry_queues = retry_queues
        self._claim_wait_queue = claim_wait_queue
        self._timeout = publish_timeout
        self._in_flight: set[str] = set()

    async def handle(self, message: AbstractIncomingMessage) -> None:
        structlog.contextvars.clear_contextvars()
        try:
            event = CodeIssued.model_validate_json(message.body)
        except ValidationError:
            log.warning("not a code.issued event; dead-lettering it", message_id=message.message_id)
            await settlement.reject(message, requeue=False)
            return
        attempt = _attempt_of(message)
        structlog.contextvars.bind_contextvars(
            event_id=event.event_id, code_id=event.code_id, channel=event.channel, attempt=attempt
        )
        if event.event_id in self._in_flight:
            # The copy in flight will deliver it, retry it, or come back if we die.
            log.info("duplicate of an event in flight; dropped")
            await settlement.ack(message)
            return
        self._in_flight.add(event.event_id)
        try:
            outcome = await self._deliverer.attempt(event, attempt, datetime.now(UTC))
            await self._settle(message, event, attempt, outcome)
        except Exception as exc:
            log.warning("delivery interrupted; message requeued", error=repr(exc))
            with contextlib.suppress(Exception):
                await settlement.nack(message, requeue=True)
        finally:
            self._in_flight.discard(event.event_id)

    async def _settle(
        self, message: AbstractIncomingMessage, event: CodeIssued, attempt: int, outcome: Outcome
    ) -> None:
        to = event.destination
        match outcome:
            case Skip():
                pass
            case Delivered(attempts=attempts, earlier=earlier):
                log.info("delivered", destination=to, attempts=attempts, earlier=earlier)
                await self._publish_outcome(
                    CodeDelivered(**_echo(event, "delivered"), attempts=attempts)
                )
            case Failed(reason=reason, attempts=attempts):
                log.warning("delivery failed", destination=to, reason=reason, attempts=attempts)
                await self._publish_outcome(
                    CodeDeliveryFailed(
                        **_echo(event, "delivery_failed"), attempts=attempts, reason=reason
                    )
                )
            case Retry(reason=reason):
                queue = self._retry_queues[attempt]
                log.info("delivery will be retried", destination=to, reason=reason, queue=queue)
                await self._park(message, queue, attempt + 1)
            case Busy():
                # Acking it would lose the event if the claimant dies before it delivers; the
                # parked copy comes back and then finds it delivered, or the claim expired.
                queue = self._claim_wait_queue
                log.debug("another notifier is delivering it; parked", queue=queue)
                await self._park(message, queue, attempt)
        await settlement.ack(message)

    async def _publish_outcome(self, event: CodeDelivered | CodeDeliveryFailed) -> None:
        await self._publisher.publish(
            EVENTS_EXCHANGE,
            event_routing_key(event.event),
            event.model_dump_json().encode(),
            json_properties(type=event.event, message_id=event.event_id),
            timeout=self._timeout,
        )

    async def _park(self, message: AbstractIncomingMessage, queue: str, next_attempt: int) -> None:
        """The original body (sealed code only) waits in a delay queue, then comes back."""
        await self._publisher.publish(
            "",
            queue,
            message.body,
            json_properties(
                type=message.type or "code.issued",
                message_id=message.message_id,
                headers={ATTEMPT_HEADER: next_attempt},
            ),
            timeout=self._timeout,
        )


def _attempt_of(message: AbstractIncomingMessage) -> int:
    value = (message.headers or {}).get(ATTEMPT_HEADER, 1)
    return value if isinstance(value, int) and value >= 1 else 1


def _echo(event: CodeIssued, outcome: str) -> dict[str, object]:
    return {
        "event_id": outcome_event_id(event.event_id, outcome),
        "occurred_at": datetime.now(UTC),
        "code_id": event.code_id,
        "user": event.user,
        "client": event.client,
        "purpose": event.purpose,
        "channel": event.channel,
    }
