"""The notifier's composition root: broker, store, renderer and transports.

``Notifier`` runs in-process (tests start it directly) or under ``python -m worker.notifier``.
Per message the order is: attempt the delivery, remember it, publish the outcome event (or
park the message in a retry tier) with publisher confirms, and only then ack. A crash at any
point leaves the message unacked, so it comes back; what was already sent is found in the
store, and the outcome event is republished under the same deterministic ``event_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime, timedelta

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    ConsumerTag,
)
from pydantic import ValidationError

from contracts.events import CodeDelivered, CodeDeliveryFailed, CodeIssued
from contracts.topology import DEAD_LETTERS, EVENTS_EXCHANGE, event_routing_key
from worker.amqp import declare_exchanges, declare_queue, json_message
from worker.domain.sealing import Sealer
from worker.log import get_logger
from worker.notifier.delivery import Delivered, Deliverer, Failed, Outcome, Retry, Skip
from worker.notifier.render import Renderer
from worker.notifier.retry import (
    ATTEMPT_HEADER,
    NOTIFIER_QUEUE_SPEC,
    retry_queue_specs,
)
from worker.notifier.store import DeliveryStore, open_delivery_store
from worker.notifier.transports import (
    ConsoleTransport,
    EmailTransport,
    HttpSmsTransport,
    SmsTransport,
    SmtpConfig,
    SmtpTransport,
)
from worker.settings import Keys, Settings

log = get_logger(__name__)

SHUTDOWN_GRACE_SECONDS = 30.0
_OUTCOME_NAMESPACE = uuid.UUID("5b0c5a0e-8a8e-4c43-9a55-5f3b8e0f7a10")


def outcome_event_id(event_id: str, outcome: str) -> str:
    """The same input event always yields the same outcome id, so subscribers deduplicate."""
    return str(uuid.uuid5(_OUTCOME_NAMESPACE, f"{event_id}/{outcome}"))


class Notifier:
    def __init__(
        self,
        settings: Settings,
        keys: Keys | None = None,
        *,
        email: EmailTransport | None = None,
        sms: SmsTransport | None = None,
    ) -> None:
        self.settings = settings
        self.keys = keys or Keys(settings, need_secret=False)
        self._email = email
        self._sms = sms
        self._http: HttpSmsTransport | None = None
        self.store: DeliveryStore | None = None
        self.connection: AbstractRobustConnection | None = None
        self._publish: AbstractChannel | None = None
        self._events: AbstractExchange | None = None
        self._queue: AbstractQueue | None = None
        self._tag: ConsumerTag | None = None
        self._deliverer: Deliverer | None = None
        self._retry_queues: dict[int, str] = {}
        self._in_flight: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping = False
        self.draining = asyncio.Event()
        self.handled = 0
        self._progress = asyncio.Event()

    @property
    def retry_queue_names(self) -> list[str]:
        return sorted(set(self._retry_queues.values()))

    async def start(self) -> None:
        s = self.settings
        self.store = await open_delivery_store(s.database_url)
        self._build_deliverer(self.store)
        self.connection = await aio_pika.connect_robust(
            s.amqp_url, client_properties={"connection_name": "otp-notifier"}
        )
        self._publish = await self.connection.channel(publisher_confirms=True)
        consume = await self.connection.channel(publisher_confirms=False)
        await consume.set_qos(prefetch_count=s.notifier_prefetch)
        exchanges = await declare_exchanges(self._publish)
        self._events = exchanges[EVENTS_EXCHANGE]
        await declare_queue(self._publish, DEAD_LETTERS)
        specs = retry_queue_specs(s.notifier_max_attempts, s.notifier_backoff_base_seconds)
        for failed, spec in specs.items():
            await declare_queue(self._publish, spec)
            self._retry_queues[failed] = spec.name
        self._queue = await declare_queue(consume, NOTIFIER_QUEUE_SPEC)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="deliveries-sweeper")
        self._tag = await self._queue.consume(self._on_message)
        log.info("notifier consuming", queue=self._queue.name, prefetch=s.notifier_prefetch)

    def _build_deliverer(self, store: DeliveryStore) -> None:
        s = self.settings
        console = s.notifier_console if s.notifier_console is not None else s.dev
        email, sms = self._email, self._sms
        if console:
            email = email or ConsoleTransport()
            sms = sms or ConsoleTransport()
        if email is None:
            password = s.smtp_password.get_secret_value() if s.smtp_password else None
            email = SmtpTransport(
                SmtpConfig(
                    host=s.smtp_host,
                    port=s.smtp_port,
                    sender=s.smtp_from,
                    username=s.smtp_username,
                    password=password,
                    starttls=s.smtp_starttls,
                    timeout=s.smtp_timeout_seconds,
                )
            )
        if sms is None:
            self._http = HttpSmsTransport(s.sms_gateway_url, s.sms_timeout_seconds)
            sms = self._http
        self._deliverer = Deliverer(
            store=store,
            sealer=Sealer(self.keys.delivery, self.keys.delivery_previous),
            renderer=Renderer(s.templates_dir),
            email=email,
            sms=sms,
            max_attempts=s.notifier_max_attempts,
        )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        """Runs each delivery as its own task, so up to ``prefetch`` proceed at once."""
        task = asyncio.create_task(self._handle(message))
        self._tasks.add(task)
        self._idle.clear()
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.handled += 1
        self._progress.set()
        if not self._tasks:
            self._idle.set()

    async def wait_handled(self, count: int, timeout: float = 20) -> None:
        """Until ``count`` messages were settled in total: lets tests wait without sleeping."""

        async def _wait() -> None:
            while self.handled < count:
                self._progress.clear()
                await self._progress.wait()

        await asyncio.wait_for(_wait(), timeout)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            event = CodeIssued.model_validate_json(message.body)
        except ValidationError:
            log.warning("not a code.issued event; dead-lettering it", message_id=message.message_id)
            await message.reject(requeue=False)
            return
        attempt = _attempt_of(message)
        structlog.contextvars.bind_contextvars(
            event_id=event.event_id, code_id=event.code_id, channel=event.channel, attempt=attempt
        )
        if event.event_id in self._in_flight:
            # The copy in flight will deliver it, retry it, or come back if we die.
            log.info("duplicate of an event in flight; dropped")
            await message.ack()
            return
        self._in_flight.add(event.event_id)
        try:
            assert self._deliverer is not None
            outcome = await self._deliverer.attempt(event, attempt, datetime.now(UTC))
            await self._settle(message, event, attempt, outcome)
        except Exception as exc:
            log.warning("delivery interrupted; message requeued", error=repr(exc))
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
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
        await message.ack()

    async def _publish_outcome(self, event: CodeDelivered | CodeDeliveryFailed) -> None:
        assert self._events is not None
        await self._events.publish(
            json_message(
                event.model_dump_json().encode(), type=event.event, message_id=event.event_id
            ),
            routing_key=event_routing_key(event.event),
            timeout=self.settings.publish_timeout_seconds,
        )

    async def _park(self, message: AbstractIncomingMessage, queue: str, next_attempt: int) -> None:
        """The original body (sealed code only) waits in a delay queue, then comes back."""
        assert self._publish is not None
        await self._publish.default_exchange.publish(
            json_message(
                message.body,
                type=message.type or "code.issued",
                message_id=message.message_id,
                headers={ATTEMPT_HEADER: next_attempt},
            ),
            routing_key=queue,
            timeout=self.settings.publish_timeout_seconds,
        )

    async def _sweep_forever(self) -> None:
        s = self.settings
        while True:
            try:
                assert self.store is not None
                before = datetime.now(UTC) - timedelta(seconds=s.notifier_dedup_retention_seconds)
                swept = await self.store.sweep(before)
                if swept:
                    log.info("swept delivery records", count=swept)
            except Exception as exc:  # the sweeper must outlive a locked database
                log.warning("sweep failed", error=repr(exc))
            await asyncio.sleep(s.sweep_interval_seconds)

    async def stop(self) -> None:
        """Stop consuming, let in-flight deliveries finish (and settle), then close; idempotent."""
        if self._stopping:
            return
        self._stopping = True
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(self._tag, timeout=5)
        self.draining.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), SHUTDOWN_GRACE_SECONDS)
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        connection, self.connection = self.connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()
        http, self._http = self._http, None
        if http is not None:
            await http.close()
        store, self.store = self.store, None
        if store is not None:
            await store.close()
        log.info("notifier stopped")


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
