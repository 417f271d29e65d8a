"""The worker's composition root: connects the broker, the store and the handlers.

``Worker`` runs in-process (tests start it directly) or under ``python -m worker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial

from aio_pika.abc import AbstractQueue, AbstractRobustConnection, ConsumerTag

from contracts.topology import (
    COMMAND_QUEUE,
    COMMAND_QUEUE_SPEC,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTERS,
    UNDELIVERABLE,
)
from worker import settlement
from worker.amqp import (
    Publisher,
    connect,
    declare_exchanges,
    declare_queue,
    declare_queue_or_adopt,
    queue_counts,
)
from worker.consumer import CommandConsumer, Observer
from worker.domain.codes import CodeHasher
from worker.domain.sealing import Sealer
from worker.log import get_logger
from worker.metrics import MetricsServer, WorkerMetrics, serve_worker
from worker.parking import park_undeliverable
from worker.parsing import Rejection
from worker.relay import OutboxRelay
from worker.service import CommandHandler, Crypto, Handled
from worker.settings import Keys, Settings
from worker.store import Store, open_store
from worker.store.base import SweepResult
from worker.watchdog import ConsumerWatchdog

log = get_logger(__name__)

SHUTDOWN_GRACE_SECONDS = 30.0
PARKING_PREFETCH = 16
"""Commands from otp.worker.undeliverable parked at once: each waits for its confirm."""


class Worker:
    def __init__(
        self,
        settings: Settings,
        keys: Keys | None = None,
        observe: Observer | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.keys = keys or Keys(settings)
        self._observe = observe
        self.store: Store | None = None
        self.connection: AbstractRobustConnection | None = None
        self.relay: OutboxRelay | None = None
        self.consumer: CommandConsumer | None = None
        self._queue: AbstractQueue | None = None
        self._watchdog: ConsumerWatchdog | None = None
        self._parking: ConsumerWatchdog | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        self.metrics = WorkerMetrics()
        self.metrics_server: MetricsServer | None = None
        self.metrics_port: int | None = None

    async def start(self) -> None:
        s = self.settings
        if s.metrics_port is not None:  # first, so liveness answers while we start
            self.metrics_server = await serve_worker(self, s.metrics_host, s.metrics_port)
            self.metrics_port = self.metrics_server.port
        self.store = await open_store(
            s.database_url,
            synchronous=s.sqlite_synchronous,
            cache_mib=s.sqlite_cache_mib,
            outbox_lease_seconds=s.outbox_lease_seconds,
            checkpoint_interval=s.sqlite_checkpoint_interval_seconds,
        )
        self.connection = await connect(s.amqp_url, "otp-worker", s.amqp_connect_timeout_seconds)
        publish = await self.connection.channel(publisher_confirms=True)
        replies = await self.connection.channel(publisher_confirms=False)
        consume = await self.connection.channel(publisher_confirms=False)
        await consume.set_qos(prefetch_count=s.prefetch)
        # Parking gets a channel of its own: a command batch acks with one `multiple` ack up
        # to its last tag, which on a shared channel settled a command still being parked,
        # and a slow park held up the deliveries of the commands behind it.
        parking = await self.connection.channel(publisher_confirms=False)
        await parking.set_qos(prefetch_count=PARKING_PREFETCH)
        exchanges = await declare_exchanges(publish)
        await declare_queue_or_adopt(self.connection, DEAD_LETTERS)
        undeliverable = await declare_queue(parking, UNDELIVERABLE)
        self._queue = await declare_queue(consume, COMMAND_QUEUE_SPEC)

        self.relay = OutboxRelay(
            self.store,
            Publisher(publish),
            publish_timeout=s.publish_timeout_seconds,
            lease_seconds=s.outbox_lease_seconds,
        )
        leftovers = await self.relay.relay_leftovers(everything=True)
        if leftovers:
            log.info("relayed leftover events", count=leftovers)
        self.relay.start()

        dead_letters = exchanges[DEAD_LETTER_EXCHANGE]
        crypto = Crypto(
            CodeHasher(self.keys.secret, self.keys.secret_previous),
            Sealer(self.keys.delivery, self.keys.delivery_previous),
        )
        policy = s.policy()
        self.consumer = CommandConsumer(
            store=self.store,
            handler=CommandHandler(policy, crypto),
            policy=policy,
            replies=Publisher(replies),
            dead_letters=dead_letters,
            relay=self.relay,
            batch_size=s.batch_size,
            publish_timeout=s.publish_timeout_seconds,
            observe=self._observe_command,
            observe_batch=self.metrics.batch_size.observe,
            on_store_retry=self.metrics.store_retries.inc,
            clock=self.clock,
        )
        self._spawn(self.consumer.run, "command-batches")
        self._watchdog = ConsumerWatchdog(
            self._queue, self.consumer.on_message, self.connection, s.consumer_check_seconds
        )
        await self._watchdog.start()
        self._parking = ConsumerWatchdog(
            undeliverable,
            partial(park_undeliverable, dead_letters, timeout=s.publish_timeout_seconds),
            self.connection,
            s.consumer_check_seconds,
        )
        await self._parking.start()
        self._spawn(self._sweep_forever, "sweeper")
        if policy.reveal_clients and not policy.reveal_broker_users:
            # Not refused: the contract allows it, and tests and trusted back-ends use it.
            log.warning(
                "reveal is allowed on the client field alone, which any producer can set; "
                "set OTP_REVEAL_BROKER_USERS to tie it to the broker users that may reveal",
                reveal_clients=sorted(policy.reveal_clients),
            )
        checkpoints = getattr(self.store, "checkpoints", None)  # SQLite's; None on PostgreSQL
        extra = {} if checkpoints is None else {"sqlite_checkpoints": checkpoints}
        log.info("worker consuming", queue=COMMAND_QUEUE, prefetch=s.prefetch, **extra)

    def _observe_command(self, routing_key: str, outcome: Handled | Rejection, t: float) -> None:
        self.metrics.observe_command(routing_key, outcome, t)
        if self._observe is not None:
            self._observe(routing_key, outcome, t)

    def _spawn(self, target: Callable[[], Awaitable[None]], name: str) -> None:
        self._tasks.append(asyncio.create_task(target(), name=name))  # type: ignore[arg-type]

    @property
    def _tag(self) -> ConsumerTag | None:
        return self._watchdog.tag if self._watchdog is not None else None

    @property
    def consumer_restores(self) -> int:
        return self._watchdog.restores if self._watchdog is not None else 0

    @property
    def broker_consumers(self) -> int:
        return self._watchdog.broker_consumers if self._watchdog is not None else 0

    @property
    def broker_messages(self) -> int:
        """Commands waiting in the queue, as the broker counted at the last consumer check."""
        return self._watchdog.broker_messages if self._watchdog is not None else 0

    async def dead_letters(self) -> int:
        """Messages waiting in ``otp.dead-letter`` (``queue_counts`` says on what channel)."""
        if self.connection is None:
            raise ConnectionError("not connected to the broker")
        declared = await queue_counts(self.connection, DEAD_LETTERS.name, timeout=5)
        return declared.message_count or 0

    async def consuming(self) -> bool:
        """True when our consumer is registered on a live channel and the broker counts it."""
        return self._watchdog is not None and await self._watchdog.consuming()

    async def parking(self) -> bool:
        """The same for the consumer that parks what the broker gave up on."""
        return self._parking is not None and await self._parking.consuming()

    async def _sweep_forever(self) -> None:
        s = self.settings
        while True:
            await asyncio.sleep(s.sweep_interval_seconds)
            with contextlib.suppress(Exception):
                await self.sweep_once()

    async def sweep_once(self) -> SweepResult:
        assert self.store is not None
        s = self.settings
        swept = await self.store.sweep(
            self.clock(),
            code_retention_seconds=s.max_ttl_seconds + s.code_retention_seconds,
            reply_retention_seconds=s.reply_retention_seconds,
            send_window_seconds=3600,
            limit=1000,
        )
        if any((swept.codes, swept.replies, swept.sends, swept.streaks)):
            log.info(
                "swept",
                codes=swept.codes,
                replies=swept.replies,
                sends=swept.sends,
                streaks=swept.streaks,
            )
        return swept

    async def stop(self) -> None:
        """Stop consuming, finish what was received, publish what was committed, close.

        Safe to call more than once: later calls return at once."""
        if self._stopped:
            return
        self._stopped = True
        started = time.monotonic()
        watchdogs = [w for w in (self._watchdog, self._parking) if w is not None]
        await asyncio.gather(*(w.cancel_consumer() for w in watchdogs))
        if self.consumer is not None:
            await self.consumer.drain(SHUTDOWN_GRACE_SECONDS)
        if self.relay is not None:
            await self.relay.drain(max(1.0, SHUTDOWN_GRACE_SECONDS - (time.monotonic() - started)))
            await self.relay.stop()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: on Python 3.11 a cancel landing with a broker reply can be swallowed.
            _, stuck = await asyncio.wait(self._tasks, timeout=10)
            if stuck:
                log.warning("tasks did not stop in time", tasks=[t.get_name() for t in stuck])
        self._tasks.clear()
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await settlement.close_after_writes(self.connection, settlement.FLUSH_SECONDS)
        if self.store is not None:
            await self.store.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        if self.consumer is not None:
            log.info("worker stopped")
