"""Prometheus metrics and the health endpoints, for the worker and the notifier.

Each process (and each in-process app in tests) owns a ``CollectorRegistry``, so several apps
can share an interpreter without their series colliding. One tiny asyncio HTTP server per
process answers ``/metrics``, ``/healthz`` (the event loop runs: 200) and ``/readyz`` (the
process can do its job: 200, else 503); no web framework, nothing that blocks the loop.

Worker series (sampled ones are refreshed on each scrape, so an idle worker costs nothing):

- ``otp_commands_total{command,status}`` counter; ``command`` is ``issue``/``confirm``/``other``
- ``otp_command_duration_seconds{command}`` histogram, batch receipt to reply
- ``otp_command_batch_size`` histogram: deliveries taken into one batch (one transaction,
  one commit, one ack); batches of a few commands at a modest load are the group commit
  working as meant, and each batch has a fixed cost (bench/RUNS.md, runs 35 and 36)
- ``otp_outbox_backlog`` gauge (sampled): committed events not yet confirmed by the broker
- ``otp_outbox_oldest_age_seconds`` gauge (sampled): age of the oldest of them, the relay lag
- ``otp_consuming`` gauge (sampled): 1 while our consumer is registered on a live channel
- ``otp_command_queue_consumers`` gauge (sampled): consumers the broker counts on the queue
- ``otp_command_queue_messages`` gauge (sampled): commands waiting there, not yet delivered
- ``otp_dead_letter_messages`` gauge (sampled): messages waiting in ``otp.dead-letter`` for an
  operator (NaN while the queue cannot be read)
- ``otp_event_loop_lag_seconds`` histogram (both processes): how late the event loop runs a
  timer due every 50 ms, while the metrics server runs

Notifier series (``NotifierMetrics``; the notifier calls these, then ``MetricsServer``):

- ``otp_deliveries_total{channel,result}`` counter via ``record_delivery(channel, result)``;
  ``result`` is ``delivered``, ``failed``, ``retried``, ``expired``, ``duplicate`` (delivered
  before) or ``busy`` (another notifier holds the claim)
- ``otp_delivery_duration_seconds{channel}`` histogram via ``record_delivery(..., seconds=)``:
  the transport's time, for attempts that reached the SMTP server or gateway
- ``otp_notifier_consuming`` gauge (sampled): 1 while this notifier's consumer is registered
  on a live channel and the broker counts it (the worker's ``otp_consuming``, named apart so
  that a sum over both jobs never counts notifiers as workers)
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from worker.log import get_logger
from worker.parsing import Rejection
from worker.service import Handled

if TYPE_CHECKING:
    from worker.app import Worker

log = get_logger(__name__)

PROBE_TIMEOUT_SECONDS = 5.0
_COMMANDS = {"code.issue": "issue", "code.confirm": "confirm"}
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LOOP_LAG_INTERVAL_SECONDS = 0.05


class LoopLag:
    """``otp_event_loop_lag_seconds``: how late the event loop runs a timer.

    A loop held up (a callback that blocks, a process starved of CPU) is late with every
    delivery, reply and ack at once, and the command latency alone cannot tell that from a
    slow broker or store; this can. The timer is due every ``LOOP_LAG_INTERVAL_SECONDS``, so
    a stall longer than that always shows (shorter ones may fall between two timers); it
    wakes the loop 20 times a second, which costs nothing measurable."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.histogram = Histogram(
            "otp_event_loop_lag_seconds",
            f"How late the event loop ran a timer due every {LOOP_LAG_INTERVAL_SECONDS} s",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )

    async def run(self, interval: float = LOOP_LAG_INTERVAL_SECONDS) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            self.histogram.observe(max(loop.time() - due, 0.0))


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.commands = Counter(
            "otp_commands",
            "Commands handled, by type and status",
            ["command", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "otp_command_duration_seconds",
            "From a batch's receipt to its replies, per command",
            ["command"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "otp_command_batch_size",
            "Deliveries taken into one batch: one transaction, one commit, one ack",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.store_retries = Counter(
            "otp_store_retries",
            "Command batches retried because the store was busy or unavailable "
            "(locked, connection lost, disk full)",
            registry=r,
        )
        self.outbox_backlog = Gauge(
            "otp_outbox_backlog", "Committed events not yet confirmed by the broker", registry=r
        )
        self.outbox_age = Gauge(
            "otp_outbox_oldest_age_seconds", "Age of the oldest unrelayed event", registry=r
        )
        self.consuming = Gauge("otp_consuming", "1 while this worker consumes commands", registry=r)
        self.queue_consumers = Gauge(
            "otp_command_queue_consumers",
            "Consumers the broker counts on the command queue",
            registry=r,
        )
        self.queue_messages = Gauge(
            "otp_command_queue_messages",
            "Commands waiting in the command queue, not yet delivered to a worker",
            registry=r,
        )
        self.dead_letters = Gauge(
            "otp_dead_letter_messages",
            "Messages waiting in otp.dead-letter for an operator",
            registry=r,
        )
        self.loop_lag = LoopLag(r)

    def observe_command(
        self, routing_key: str, outcome: Handled | Rejection, started: float
    ) -> None:
        """The consumer's ``observe`` hook; ``started`` is the loop time the batch began."""
        command = _COMMANDS.get(routing_key, "other")
        status = outcome.status if isinstance(outcome, Handled) else "rejected"
        self.commands.labels(command, status).inc()
        elapsed = asyncio.get_running_loop().time() - started
        self.latency.labels(command).observe(max(elapsed, 0.0))

    async def sample(self, worker: Worker) -> None:
        """Reads what is cheaper to ask on scrape than to track: outbox and consumer state."""
        self.consuming.set(1 if await worker.consuming() else 0)
        self.queue_consumers.set(worker.broker_consumers)
        self.queue_messages.set(worker.broker_messages)
        try:
            self.dead_letters.set(await worker.dead_letters())
        except Exception:  # gone, or no broker: no number is better than an old one
            self.dead_letters.set(math.nan)
        if worker.store is None:
            return
        with contextlib.suppress(Exception):  # a dead store shows in /readyz, not as a 500
            self.outbox_backlog.set(await worker.store.outbox_backlog())
            oldest = await worker.store.outbox_oldest()
            age = (datetime.now(UTC) - oldest).total_seconds() if oldest else 0.0
            self.outbox_age.set(max(age, 0.0))


class NotifierMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.deliveries = Counter(
            "otp_deliveries",
            "Notifications by channel and result",
            ["channel", "result"],
            registry=self.registry,
        )
        self.delivery_latency = Histogram(
            "otp_delivery_duration_seconds",
            "Time spent delivering one notification (SMTP or HTTP)",
            ["channel"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.consuming = Gauge(
            "otp_notifier_consuming",
            "1 while this notifier consumes its events queue",
            registry=self.registry,
        )
        self.loop_lag = LoopLag(self.registry)

    def record_delivery(self, channel: str, result: str, seconds: float | None = None) -> None:
        self.deliveries.labels(channel, result).inc()
        if seconds is not None:
            self.delivery_latency.labels(channel).observe(seconds)


Probe = Callable[[], Awaitable[bool]]


async def _always() -> bool:
    return True


class MetricsServer:
    """``/metrics``, ``/healthz``, ``/readyz`` over HTTP/1.1, one request per connection."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        ready: Probe = _always,
        sample: Callable[[], Awaitable[None]] | None = None,
        loop_lag: LoopLag | None = None,
    ) -> None:
        self._registry = registry
        self._ready = ready
        self._sample = sample
        self._loop_lag = loop_lag
        self._lag_task: asyncio.Task[None] | None = None
        self._server: asyncio.Server | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> int:
        """Binds (``port`` 0 picks a free one) and returns the bound port."""
        self._server = await asyncio.start_server(self._handle, host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        if self._loop_lag is not None:
            self._lag_task = asyncio.create_task(self._loop_lag.run(), name="loop-lag")
        log.info("metrics listening", host=host, port=self.port)
        return self.port

    async def close(self) -> None:
        if self._lag_task is not None:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_SECONDS * 2):
                request = (await reader.readline()).decode("latin-1").split()
                while (await reader.readline()).strip():
                    pass  # headers: nothing here needs them
                path = request[1].split("?", 1)[0] if len(request) >= 2 else ""
                status, content_type, body = await self._route(path)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _route(self, path: str) -> tuple[str, str, bytes]:
        text = "text/plain; charset=utf-8"
        if path == "/healthz":
            return "200 OK", text, b"ok\n"
        if path == "/readyz":
            if await self._probe():
                return "200 OK", text, b"ready\n"
            return "503 Service Unavailable", text, b"not ready\n"
        if path == "/metrics":
            if self._sample is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._sample(), PROBE_TIMEOUT_SECONDS)
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self._registry)
        return "404 Not Found", text, b"not found\n"

    async def _probe(self) -> bool:
        try:
            return await asyncio.wait_for(self._ready(), PROBE_TIMEOUT_SECONDS)
        except Exception:
            return False


async def serve_worker(worker: Worker, host: str, port: int) -> MetricsServer:
    """Ready means: the broker counts both our consumers and the store answers.

    The parking consumer counts too: without it, commands the broker gave up on never reach
    the dead letters, and nothing else would show it."""

    async def ready() -> bool:
        if worker.store is None or not await worker.consuming() or not await worker.parking():
            return False
        await worker.store.ping()
        return True

    async def sample() -> None:
        await worker.metrics.sample(worker)

    metrics = worker.metrics
    server = MetricsServer(metrics.registry, ready=ready, sample=sample, loop_lag=metrics.loop_lag)
    await server.start(host, port)
    return server
