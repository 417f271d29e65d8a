"""The notifier's composition root: broker, store, renderer, transports, metrics and health.

``Notifier`` runs in-process (tests start it directly) or under ``python -m worker.notifier``.
What happens to each message is ``handling.MessageHandler``'s business; this module wires it
up, runs each message as its own task (up to the prefetch at once), keeps the consumer alive
(``ConsumerWatchdog``), sweeps old delivery records, and shuts down in order.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from contracts.topology import DEAD_LETTER, EVENTS
from worker import settlement
from worker.amqp import Publisher, connect, declare_exchange, declare_queue
from worker.domain.sealing import Sealer
from worker.log import get_logger
from worker.metrics import MetricsServer, NotifierMetrics
from worker.notifier.delivery import Deliverer
from worker.notifier.handling import MessageHandler, outcome_event_id
from worker.notifier.render import Renderer
from worker.notifier.retry import NOTIFIER_QUEUE_SPEC, claim_wait_spec, retry_queue_specs
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
from worker.watchdog import ConsumerWatchdog

log = get_logger(__name__)

SETTLE_SECONDS = 10.0
"""What settling a delivery may take after its send: recording it, publishing its outcome
event (or parking it for a retry) with confirms, acking it."""


def shutdown_grace(settings: Settings) -> float:
    """How long SIGTERM waits for deliveries in flight. A send is cut off at 90 % of the
    claim lease, so each attempt under way ends within the lease: waiting less would
    close the store and the connection under a send the server may already have taken,
    and the message would come back and go out twice."""
    return settings.notifier_claim_lease_seconds + SETTLE_SECONDS


__all__ = ["Notifier", "outcome_event_id"]


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
        self._smtp: SmtpTransport | None = None
        self.store: DeliveryStore | None = None
        self.connection: AbstractRobustConnection | None = None
        self._handler: MessageHandler | None = None
        self._watchdog: ConsumerWatchdog | None = None
        self._retry_queues: dict[int, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sweeper: asyncio.Task[None] | None = None
        self._stop_sweeping = asyncio.Event()
        self._stopping = False
        self.draining = asyncio.Event()
        self.handled = 0
        self._progress = asyncio.Event()
        self.metrics = NotifierMetrics()
        self.metrics_server: MetricsServer | None = None
        self.metrics_port: int | None = None

    @property
    def retry_queue_names(self) -> list[str]:
        return sorted(set(self._retry_queues.values()))

    @property
    def consumer_restores(self) -> int:
        return self._watchdog.restores if self._watchdog is not None else 0

    async def consuming(self) -> bool:
        """True when our consumer is registered on a live channel and the broker counts it."""
        return self._watchdog is not None and await self._watchdog.consuming()

    async def ready(self) -> bool:
        """``/readyz``: the broker counts our consumer and the store answers."""
        if self.store is None or not await self.consuming():
            return False
        await self.store.ping()
        return True

    async def _sample(self) -> None:
        """Refreshes the sampled series before a scrape."""
        self.metrics.consuming.set(1 if await self.consuming() else 0)

    async def start(self) -> None:
        s = self.settings
        if s.metrics_port is not None:  # first, so liveness answers while we start
            self.metrics_server = MetricsServer(
                self.metrics.registry,
                ready=self.ready,
                sample=self._sample,
                loop_lag=self.metrics.loop_lag,
            )
            self.metrics_port = await self.metrics_server.start(s.metrics_host, s.metrics_port)
        self.store = await open_delivery_store(s.database_url)
        deliverer = self._build_deliverer(self.store)
        self.connection = await connect(s.amqp_url, "otp-notifier", s.amqp_connect_timeout_seconds)
        publish = await self.connection.channel(publisher_confirms=True)
        consume = await self.connection.channel(publisher_confirms=False)
        await consume.set_qos(prefetch_count=s.notifier_prefetch)
        # Only what the notifier uses, so it runs as the least-privilege otp-notifier user:
        # the otp.dead-letter queue (and its binding) is the worker's to declare.
        for exchange in (EVENTS, DEAD_LETTER):
            await declare_exchange(publish, exchange)
        specs = retry_queue_specs(s.notifier_max_attempts, s.notifier_backoff_base_seconds)
        for failed, spec in specs.items():
            await declare_queue(publish, spec)
            self._retry_queues[failed] = spec.name
        claim_wait = claim_wait_spec(s.notifier_backoff_base_seconds)
        await declare_queue(publish, claim_wait)
        self._handler = MessageHandler(
            deliverer=deliverer,
            publisher=Publisher(publish),
            retry_queues=self._retry_queues,
            claim_wait_queue=claim_wait.name,
            publish_timeout=s.publish_timeout_seconds,
        )
        queue = await declare_queue(consume, NOTIFIER_QUEUE_SPEC)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="deliveries-sweeper")
        self._watchdog = ConsumerWatchdog(
            queue, self._on_message, self.connection, s.consumer_check_seconds
        )
        await self._watchdog.start()
        log.info("notifier consuming", queue=queue.name, prefetch=s.notifier_prefetch)

    def _build_deliverer(self, store: DeliveryStore) -> Deliverer:
        s = self.settings
        console = s.notifier_console if s.notifier_console is not None else s.dev
        email, sms = self._email, self._sms
        if console:
            email = email or ConsoleTransport()
            sms = sms or ConsoleTransport()
        if email is None:
            password = s.smtp_password.get_secret_value() if s.smtp_password else None
            if s.smtp_username and not s.smtp_starttls:
                # Not refused: a relay on localhost or a private link may be fine without.
                log.warning(
                    "SMTP login without STARTTLS: the password crosses the network "
                    "unencrypted; set OTP_SMTP_STARTTLS=true",
                    smtp_host=s.smtp_host,
                )
            self._smtp = SmtpTransport(
                SmtpConfig(
                    host=s.smtp_host,
                    port=s.smtp_port,
                    sender=s.smtp_from,
                    username=s.smtp_username,
                    password=password,
                    starttls=s.smtp_starttls,
                    timeout=s.smtp_timeout_seconds,
                    pool_size=s.smtp_pool_size,
                )
            )
            email = self._smtp
        if sms is None:
            self._http = HttpSmsTransport(s.sms_gateway_url, s.sms_timeout_seconds)
            sms = self._http
        return Deliverer(
            store=store,
            sealer=Sealer(self.keys.delivery, self.keys.delivery_previous),
            renderer=Renderer(s.templates_dir),
            email=email,
            sms=sms,
            max_attempts=s.notifier_max_attempts,
            claim_lease_seconds=s.notifier_claim_lease_seconds,
            observe=self.metrics.record_delivery,
        )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        """Runs each delivery as its own task, so up to ``prefetch`` proceed at once."""
        assert self._handler is not None
        task = asyncio.create_task(self._handler.handle(message))
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

    async def _sweep_forever(self) -> None:
        """Ends when ``_stop_sweeping`` is set (a cancel alone can be swallowed: watchdog.py)."""
        s = self.settings
        while not self._stop_sweeping.is_set():
            try:
                assert self.store is not None
                before = datetime.now(UTC) - timedelta(seconds=s.notifier_dedup_retention_seconds)
                swept = await self.store.sweep(before)
                if swept:
                    log.info("swept delivery records", count=swept)
            except Exception as exc:  # the sweeper must outlive a locked database
                log.warning("sweep failed", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(s.sweep_interval_seconds):
                    await self._stop_sweeping.wait()

    async def stop(self) -> None:
        """Stop consuming, let in-flight deliveries finish (and settle), then close; idempotent."""
        if self._stopping:
            return
        self._stopping = True
        if self._watchdog is not None:
            await self._watchdog.cancel_consumer()
        self.draining.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), shutdown_grace(self.settings))
        self._stop_sweeping.set()
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None and not (await asyncio.wait({sweeper}, timeout=10))[0]:
            sweeper.cancel()
        connection, self.connection = self.connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await settlement.close_after_writes(connection, settlement.FLUSH_SECONDS)
        http, self._http = self._http, None
        if http is not None:
            await http.close()
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            await smtp.close()
        store, self.store = self.store, None
        if store is not None:
            await store.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        if self._handler is not None:  # a start that failed early says why, and only that
            log.info("notifier stopped")
