"""Plumbing for the scenarios: a vhost, subprocesses, the bench's own broker side.

Everything here cleans up after itself: the vhost is deleted and every process we started is
terminated (SIGTERM, then SIGKILL) also when a scenario fails or the run is interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractQueue,
)
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from prometheus_client.parser import text_string_to_metric_families

from contracts.topology import COMMAND_QUEUE, COMMAND_QUEUE_SPEC, COMMANDS_EXCHANGE
from worker.amqp import declare_exchanges, declare_queue

ROOT = Path(__file__).resolve().parents[1]
BROKER_BASE = os.environ.get("OTP_BENCH_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672")
EVENTS_QUEUE = "bench.events"


class BenchError(Exception):
    """A scenario could not produce a trustworthy figure; the message says why."""


# --------------------------------------------------------------------------- vhost


def _rabbitmqctl(*args: str, check: bool = True) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=check, capture_output=True, timeout=90)


def create_vhost() -> tuple[str, str]:
    name = f"otp-bench-{os.getpid()}-{secrets.token_hex(3)}"
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    except BaseException:
        delete_vhost(name)
        raise
    return name, f"{BROKER_BASE}/{name}"


def delete_vhost(name: str) -> None:
    with contextlib.suppress(Exception):
        _rabbitmqctl("delete_vhost", name, check=False)


# --------------------------------------------------------------------------- processes


class Proc:
    """A child process (worker or raw consumer) with its output in a log file."""

    live: set[Proc] = set()

    def __init__(self, name: str, module: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.module = module
        self.env = env
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as handle:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", self.module],
                env=self.env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=str(self.log_path.parent),
                start_new_session=True,  # Ctrl-C reaches us; we stop the child in order
            )
        Proc.live.add(self)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_alive(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            raise BenchError(
                f"{self.name} exited with {self.popen.returncode}; log tail:\n{self.tail()}"
            )

    async def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit code."""
        popen = self.popen
        if popen is None:
            return None
        try:
            if popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    popen.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + timeout
                while popen.poll() is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                if popen.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        popen.kill()
                    popen.wait(10)
            return popen.returncode
        finally:
            Proc.live.discard(self)

    def kill_now(self) -> None:
        popen = self.popen
        if popen is None or popen.poll() is not None:
            Proc.live.discard(self)
            return
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                popen.kill()
            popen.wait(10)
        Proc.live.discard(self)

    def rss_kib(self) -> int | None:
        return self._status_kib("VmRSS:")

    def peak_rss_kib(self) -> int | None:
        """The kernel's high-water mark of the RSS: a peak between two samples counts too."""
        return self._status_kib("VmHWM:")

    def _status_kib(self, field: str) -> int | None:
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    if line.startswith(field):
                        return int(line.split()[1])
        except (OSError, ValueError):
            return None
        return None

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the process so far."""
        return cpu_seconds_of(self.pid)

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    @classmethod
    def kill_all(cls) -> None:
        for proc in list(cls.live):
            proc.kill_now()


def broker_pid() -> int | None:
    """The local RabbitMQ (beam.smp), to report its CPU share; None when not visible."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "beam.smp":
                    return int(entry.name)
    return None


def cpu_seconds_of(pid: int | None) -> float | None:
    """User + system CPU time of a process so far (from /proc/PID/stat)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- replies


@dataclass
class Replies:
    """Replies on the bench's reply queue: arrival time, correlation id, body. Nothing parsed
    while the clock runs, to keep the bench's own CPU share small and equal for every run."""

    prefix: str = ""
    expected: int = 0
    times: list[float] = field(default_factory=list)
    correlation_ids: list[str] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    stray: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def reset(self, prefix: str, expected: int) -> None:
        self.prefix, self.expected = prefix, expected
        self.times, self.correlation_ids, self.bodies = [], [], []
        self.stray = 0
        self.done.clear()

    async def on_message(self, message: DeliveredMessage) -> None:
        """Called by aiormq itself, with no aio-pika ``IncomingMessage`` built: the bench's
        own CPU competes with the broker and the process under test for the same cores."""
        now = time.perf_counter()
        correlation_id = message.header.properties.correlation_id or ""
        if not correlation_id.startswith(self.prefix):
            self.stray += 1
            return
        self.times.append(now)
        self.correlation_ids.append(correlation_id)
        self.bodies.append(message.body)
        self.changed.set()
        if len(self.times) >= self.expected:
            self.done.set()

    @property
    def count(self) -> int:
        return len(self.times)


# --------------------------------------------------------------------------- broker side


@dataclass
class Outgoing:
    routing_key: str
    body: bytes
    correlation_id: str


class BrokerSide:
    """The bench's connection: publishes commands, collects replies, counts events."""

    def __init__(self, url: str, events_queue_type: str) -> None:
        self.url = url
        self.events_queue_type = events_queue_type
        self.replies = Replies()
        self.connection: AbstractConnection | None = None
        self._confirmed: AbstractChannel | None = None
        self._unconfirmed: AbstractChannel | None = None
        self.commands: AbstractExchange | None = None
        self.reply_queue: AbstractQueue | None = None
        self._admin: AbstractChannel | None = None
        self._fast: aiormq.Channel | None = None

    async def open(self) -> None:
        self.connection = await aio_pika.connect(
            self.url, client_properties={"connection_name": "bench"}, timeout=30
        )
        self._confirmed = await self.connection.channel(publisher_confirms=True)
        exchanges = await declare_exchanges(self._confirmed)
        self.commands = exchanges[COMMANDS_EXCHANGE]
        # The command queue exactly as the worker declares it, so commands can be prefilled
        # before any consumer exists, and the raw consumer gets the same queue.
        await declare_queue(self._confirmed, COMMAND_QUEUE_SPEC)
        arguments: dict[str, Any] = {}
        if self.events_queue_type == "quorum":
            arguments["x-queue-type"] = "quorum"
        events = await self._confirmed.declare_queue(
            EVENTS_QUEUE, durable=True, arguments=arguments
        )
        await events.bind(exchanges["otp.events"], "#")
        self._unconfirmed = await self.connection.channel(publisher_confirms=False)
        consume = await self.connection.channel(publisher_confirms=False)
        await consume.set_qos(prefetch_count=0)
        self.reply_queue = await consume.declare_queue("", exclusive=True, auto_delete=True)
        underlay = await consume.get_underlay_channel()
        await underlay.basic_consume(self.reply_queue.name, self.replies.on_message, no_ack=True)
        self._fast = cast(aiormq.Channel, await self._unconfirmed.get_underlay_channel())

    async def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.connection.close()

    async def _declared(self, name: str) -> Any:
        """Passive declare on a channel of its own (a failure closes the channel)."""
        assert self.connection is not None
        if self._admin is None or self._admin.is_closed:
            self._admin = await self.connection.channel(publisher_confirms=False)
        queue = await self._admin.declare_queue(name, passive=True, timeout=10)
        return queue.declaration_result

    async def queue_counts(self, name: str) -> tuple[int, int]:
        result = await self._declared(name)
        return int(result.message_count), int(result.consumer_count)

    async def purge(self, name: str) -> int:
        assert self.connection is not None
        if self._admin is None or self._admin.is_closed:
            self._admin = await self.connection.channel(publisher_confirms=False)
        queue = await self._admin.get_queue(name, ensure=False)
        result = await queue.purge(timeout=30)
        return int(result.message_count or 0)

    async def ensure_idle(self) -> None:
        """Before a scenario: nobody consumes the command queue and it is empty."""
        deadline = time.monotonic() + 30
        while True:
            messages, consumers = await self.queue_counts(COMMAND_QUEUE)
            if consumers == 0:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{COMMAND_QUEUE} still has {consumers} consumer(s)")
            await asyncio.sleep(0.2)
        if messages:
            await self.purge(COMMAND_QUEUE)
        await self.purge(EVENTS_QUEUE)

    async def wait_consuming(self, proc: Proc, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc.check_alive()
            _, consumers = await self.queue_counts(COMMAND_QUEUE)
            if consumers:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{proc.name} did not start consuming within {timeout:.0f} s")
            await asyncio.sleep(0.1)

    def message(self, item: Outgoing) -> aio_pika.Message:
        assert self.reply_queue is not None
        return aio_pika.Message(
            item.body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            reply_to=self.reply_queue.name,
            correlation_id=item.correlation_id,
        )

    async def publish_confirmed(self, items: Sequence[Outgoing], window: int = 1000) -> None:
        """Persistent commands with publisher confirms, ``window`` outstanding at a time."""
        assert self.commands is not None
        for start in range(0, len(items), window):
            chunk = items[start : start + window]
            await asyncio.gather(
                *(
                    self.commands.publish(self.message(i), routing_key=i.routing_key, timeout=120)
                    for i in chunk
                )
            )

    async def publish_now(self, item: Outgoing) -> None:
        """One persistent command, no confirm and no wait for the socket (the paced
        publisher), straight through aiormq: the cheaper the bench, the less it takes from
        the cores the broker and the process under test share with it."""
        assert self._fast is not None and self.reply_queue is not None
        properties = spec.Basic.Properties(
            content_type="application/json",
            delivery_mode=2,
            reply_to=self.reply_queue.name,
            correlation_id=item.correlation_id,
        )
        await self._fast.basic_publish(
            item.body,
            exchange=COMMANDS_EXCHANGE,
            routing_key=item.routing_key,
            properties=properties,
            wait=False,
        )

    async def count_events(self, at_least: int, timeout: float = 15.0) -> int:
        """Messages in the events queue, waiting a little for the last ones to land."""
        deadline = time.monotonic() + timeout
        last, stable_since = -1, time.monotonic()
        while True:
            count, _ = await self.queue_counts(EVENTS_QUEUE)
            if count != last:
                last, stable_since = count, time.monotonic()
            if count >= at_least and time.monotonic() - stable_since > 0.5:
                return count
            if time.monotonic() > deadline:
                return count
            await asyncio.sleep(0.2)


PROBE_QUEUE = "bench.probe"
PROBE_INTERVAL = 0.05
"""Seconds between the side probe's round trips: often enough to see a stall of 50 ms,
rare enough (20 messages a second) not to add to the load it watches."""


class BrokerProbe:
    """The broker's own stalls while a paced run measures latency.

    One persistent message at a time goes through a quorum queue of its own, on a connection
    of its own, every ``PROBE_INTERVAL``: the path every command takes on its way to a
    consumer (a quorum queue writes each message to its log, and waits for the disk, before
    it delivers it). A command delayed while the probe was too was delayed by the broker or
    the host, not by the consumer under test."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples: list[tuple[float, float]] = []
        """(perf_counter at publish, round trip in ms), one per probe message."""
        self.error: BaseException | None = None
        """What ended the probe early (its connection broke), if anything did."""
        self.ended = asyncio.Event()
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._waiting: dict[str, asyncio.Future[float]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._connection = await aiormq.connect(
            self.url, client_properties={"connection_name": "bench-probe"}
        )
        self._channel = await self._connection.channel()
        await self._channel.queue_declare(
            PROBE_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await self._channel.queue_purge(PROBE_QUEUE)
        await self._channel.basic_consume(PROBE_QUEUE, self._on_message)
        self.samples, self.error = [], None
        self.ended.clear()
        self._task = asyncio.create_task(self._run(), name="broker-probe")

    async def _on_message(self, message: DeliveredMessage) -> None:
        now = time.perf_counter()
        waiting = self._waiting.pop(message.header.properties.correlation_id or "", None)
        if waiting is not None and not waiting.done():
            waiting.set_result(now)
        await message.channel.basic_ack(message.delivery.delivery_tag)

    async def _run(self) -> None:
        assert self._channel is not None
        try:
            for number in itertools.count():
                correlation_id = f"probe-{number}"
                # The channel's own future: failed by aiormq as soon as the connection breaks.
                arrived = self._waiting[correlation_id] = self._channel.create_future()
                sent = time.perf_counter()
                await self._channel.basic_publish(
                    b"probe",
                    routing_key=PROBE_QUEUE,
                    properties=spec.Basic.Properties(
                        correlation_id=correlation_id, delivery_mode=2
                    ),
                    wait=False,
                )
                try:
                    at = await asyncio.wait_for(arrived, 30)
                except TimeoutError:
                    at = time.perf_counter()
                self.samples.append((sent, (at - sent) * 1000))
                await asyncio.sleep(max(0.0, sent + PROBE_INTERVAL - time.perf_counter()))
        except Exception as exc:  # its connection broke: the samples so far still stand
            self.error = exc
        finally:
            self.ended.set()

    async def stop(self) -> list[tuple[float, float]]:
        """Ends the probe and returns its samples."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()  # the queue goes with the bench's vhost
        return self.samples


LOOP_LAG = "otp_event_loop_lag_seconds"
BATCH_SIZE = "otp_command_batch_size"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class WorkerScrape:
    """What the bench reads off a worker's ``/metrics``."""

    lag_buckets: dict[float, float]
    """``otp_event_loop_lag_seconds``: the cumulative count of each bucket, by its upper bound
    in seconds (``inf`` is every timer so far)."""
    batches: float
    """``otp_command_batch_size_count``: batches taken so far."""
    batched: float
    """``otp_command_batch_size_sum``: deliveries in them."""


async def scrape_worker(port: int, timeout: float = 5.0) -> WorkerScrape:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), timeout)  # it closes when done
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise BenchError(f"/metrics answered {head.splitlines()[0]!r}")
    lag: dict[float, float] = {}
    batches = batched = 0.0
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == f"{LOOP_LAG}_bucket":
                lag[float(sample.labels["le"])] = sample.value
            elif sample.name == f"{BATCH_SIZE}_count":
                batches = sample.value
            elif sample.name == f"{BATCH_SIZE}_sum":
                batched = sample.value
    return WorkerScrape(lag, batches, batched)


async def wait_replies(
    replies: Replies, procs: Iterable[Proc], *, stall_timeout: float, what: str
) -> None:
    """Until every expected reply is in; fails when a process dies or replies stall."""
    procs = list(procs)
    last_count, last_progress = replies.count, time.monotonic()
    while not replies.done.is_set():
        for proc in procs:
            proc.check_alive()
        replies.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(replies.changed.wait(), 0.5)
        if replies.count != last_count:
            last_count, last_progress = replies.count, time.monotonic()
        elif time.monotonic() - last_progress > stall_timeout:
            raise BenchError(
                f"{what}: no reply for {stall_timeout:.0f} s, "
                f"{replies.count}/{replies.expected} received"
            )
