"""Crashes, cut connections, lost consumers, SIGTERM: nothing lost, nothing applied twice."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import orjson
import pytest

from contracts.topology import (
    COMMAND_QUEUE,
    DEAD_LETTER_QUEUE,
    ERROR_TYPE_HEADER,
    UNDELIVERABLE_QUEUE,
)
from tests.conftest import WorkerFactory
from tests.databases import BACKENDS, POSTGRES_BASE
from tests.proxy import proxied
from tests.support import (
    Producer,
    cancel_parking_consumer,
    channel_on,
    consumers_of,
    declare_topology,
    event_log,
    producer,
    queued_commands,
    worker_env,
)
from worker.amqp import declare_queue
from worker.notifier.retry import NOTIFIER_QUEUE_SPEC
from worker.store import open_store

Spawn = Callable[..., subprocess.Popen[bytes]]


async def wait_until(
    predicate: Callable[[], bool], timeout: float = 30, every: float = 0.05
) -> None:
    async def _poll() -> None:
        while not predicate():
            await asyncio.sleep(every)

    await asyncio.wait_for(_poll(), timeout)


def replies_by_command(otp: Producer) -> dict[str, list[dict[str, Any]]]:
    seen: dict[str, list[dict[str, Any]]] = {}
    for message in otp.reply_messages:
        body = orjson.loads(message.body)
        seen.setdefault(body["command_id"], []).append(body)
    return seen


def _own_scope(command_id: str) -> dict[str, Any]:
    """A command's id, and a user of its own: no two commands share a scope."""
    return {"command_id": command_id, "user": f"user-of-{command_id}", "client": "test-app"}


def issue_command(command_id: str) -> dict[str, Any]:
    return {**_own_scope(command_id), "channel": "none", "reveal": True}


def confirm_unknown_code(command_id: str) -> dict[str, Any]:
    """A confirm that finds no code: answered ``not_found``, with no event to publish."""
    return {**_own_scope(command_id), "code": "000000"}


def issue_commands(prefix: str, count: int) -> dict[str, dict[str, Any]]:
    return {f"{prefix}-{i}": issue_command(f"{prefix}-{i}") for i in range(count)}


async def publish_all(
    otp: Producer, commands: list[dict[str, Any]]
) -> list[asyncio.Future[dict[str, Any]]]:
    """All at once, not one publisher confirm after another: the burst is still arriving when
    the victim dies, so it dies holding deliveries."""
    return await asyncio.gather(*(otp.send("code.issue", c) for c in commands))


def reply_bodies(otp: Producer) -> dict[str, list[bytes]]:
    """Every reply's bytes, by command_id, in the order they came."""
    seen: dict[str, list[bytes]] = {}
    for message in otp.reply_messages:
        seen.setdefault(orjson.loads(message.body)["command_id"], []).append(message.body)
    return seen


async def assert_resent_commands_get_the_same_replies(
    otp: Producer, sent: dict[str, dict[str, Any]], answered: set[str]
) -> None:
    """Sends ``answered`` commands again, same command_id and body, as a client retrying
    would: each must get its first reply again, byte for byte, and change nothing."""
    assert answered, "no command was answered before the fault"
    first = {c: bodies[0] for c, bodies in reply_bodies(otp).items() if c in answered}
    again = await asyncio.gather(*(otp.send("code.issue", sent[c]) for c in sorted(answered)))
    await asyncio.wait_for(asyncio.gather(*again), 30)
    for command_id, bodies in reply_bodies(otp).items():
        if command_id in answered:
            assert len(bodies) >= 2, f"{command_id} was not answered again"
            assert set(bodies) == {first[command_id]}, f"{command_id} answered differently"


async def test_sigkill_mid_burst_loses_nothing_and_changes_no_reply(
    amqp_url: str, database_url: str, tmp_path: Path, spawn: Spawn
) -> None:
    """The burst is published at once, so the kill lands with deliveries held and a third of
    it answered; the worker started after it answers the rest, and a command answered before
    the kill, sent again, gets that answer again, byte for byte."""
    total = 1500
    env = worker_env(amqp_url, database_url, tmp_path / "var", OTP_REVEAL_CLIENTS="test-app")
    first = spawn("worker", env, "worker-1.log")
    async with producer(amqp_url) as otp, event_log(amqp_url, "code.issued") as events:
        await wait_until(lambda: "worker consuming" in (tmp_path / "worker-1.log").read_text())
        sent = issue_commands("crash", total)
        publishing = asyncio.create_task(publish_all(otp, list(sent.values())))
        await wait_until(lambda: len(otp.reply_messages) >= total // 3, timeout=60)
        first.send_signal(signal.SIGKILL)
        assert len(otp.reply_messages) < total, "the kill came too late to test anything"
        await asyncio.to_thread(first.wait, 10)
        answered_before = set(replies_by_command(otp))
        futures = await publishing
        spawn("worker", env, "worker-2.log")
        await asyncio.wait_for(asyncio.gather(*futures), 90)

        replies = replies_by_command(otp)
        assert set(replies) == set(sent)
        for command_id, bodies in replies.items():
            assert all(b == bodies[0] for b in bodies), f"{command_id} got different replies"
            assert bodies[0]["status"] == "issued"
        code_ids = {bodies[0]["code_id"] for bodies in replies.values()}
        assert len(code_ids) == total
        # Whether the kill caught a committed batch unacked is luck; what a client retrying
        # a command the dead worker answered gets is not: that answer, from the stored reply.
        await assert_resent_commands_get_the_same_replies(otp, sent, answered_before)
        await events.wait_for(lambda e: code_ids <= {b["code_id"] for b in e.bodies}, timeout=60)


async def test_cut_connection_mid_burst_resumes_without_restart(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    """Cut a third of the way through a burst, the worker reconnects by itself and answers
    the rest; a command answered before the cut, sent again, gets that answer again."""
    total = 600
    async with proxied(amqp_url, reconnect_interval=0.5) as (proxy, url):
        worker = await start_worker(amqp_url=url, reveal_clients="test-app")
        async with producer(amqp_url) as otp, event_log(amqp_url, "code.issued") as events:
            sent = issue_commands("cut", total)
            publishing = asyncio.create_task(publish_all(otp, list(sent.values())))
            await wait_until(lambda: len(otp.reply_messages) >= total // 3)
            await proxy.cut()
            answered_before = set(replies_by_command(otp))
            assert len(answered_before) < total, "the cut came too late to test anything"
            assert worker.connection is not None
            await wait_until(lambda: not worker.connection.connected.is_set())  # type: ignore[union-attr]
            await proxy.restore()
            futures = await publishing
            await asyncio.wait_for(asyncio.gather(*futures), 60)
            replies = replies_by_command(otp)
            assert set(replies) == set(sent)
            for command_id, bodies in replies.items():
                assert all(b == bodies[0] for b in bodies), f"{command_id} got different replies"
            code_ids = {bodies[0]["code_id"] for bodies in replies.values()}
            assert len(code_ids) == total
            await assert_resent_commands_get_the_same_replies(otp, sent, answered_before)
            await events.wait_for(
                lambda e: code_ids <= {b["code_id"] for b in e.bodies}, timeout=60
            )
            assert proxy.connections >= 2
            assert await worker.consuming()
            after = await otp.issue(user="after-the-cut")
            assert after["status"] == "issued"


async def test_stop_finishes_while_the_broker_is_unreachable(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    """Shutdown must not wait for a broker that is gone: cancelling the consumer used to
    wait, unbounded, for aio-pika to restore the channel first."""
    async with proxied(amqp_url, reconnect_interval=0.5) as (proxy, url):
        worker = await start_worker(amqp_url=url)
        await proxy.cut()
        assert worker.connection is not None
        await wait_until(lambda: not worker.connection.connected.is_set())  # type: ignore[union-attr]
        await asyncio.wait_for(worker.stop(), 60)


async def test_a_consumer_check_the_broker_is_slow_to_answer_leaves_the_deliveries_be(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    # The check's passive declare ran on the consuming channel: aiormq closes a channel
    # whose call outlasts its timeout (5 s), and every delivery not yet acked on it came
    # back, to be answered a second time. /readyz and /metrics run the same check.
    async with proxied(amqp_url) as (proxy, url):
        worker = await start_worker(
            amqp_url=url, consumer_check_seconds=3600, reveal_clients="test-app"
        )
        assert worker._queue is not None
        consuming = await worker._queue.channel.get_underlay_channel()
        async with producer(amqp_url) as otp:
            proxy.hold_from_broker()
            check = asyncio.create_task(worker.consuming())
            futures = [await otp.send("code.issue", issue_command(f"slow-{i}")) for i in range(5)]
            async with asyncio.timeout(30):  # delivered: on their way to the worker, held
                while await queued_commands(amqp_url):
                    await asyncio.sleep(0.05)
            assert not await check  # no answer within its 5 s
            proxy.release()
            replies = await asyncio.wait_for(asyncio.gather(*futures), 30)
            assert {r["status"] for r in replies} == {"issued"}
            # One more round trip after the release, for anything still to come in.
            assert (await otp.issue(user="after-the-hold"))["status"] == "issued"
            assert not consuming.is_closed, "the check closed the consuming channel"
            assert len(otp.reply_messages) == 6, "a delivery came back and was answered twice"
        assert await worker.consuming()


async def test_a_lost_consumer_is_detected_and_restored(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    worker = await start_worker()
    assert await worker.consuming()
    assert worker._queue is not None and worker._tag is not None
    channel = await worker._queue.channel.get_underlay_channel()
    await channel.basic_cancel(worker._tag)
    # Lost, unless the watchdog (a check every 0.5 s) already found it lost and restored it.
    assert not await worker.consuming() or worker.consumer_restores >= 1
    await wait_until(lambda: worker.consumer_restores >= 1, timeout=20)
    async with producer(amqp_url) as otp:
        assert (await otp.issue(user="restored"))["status"] == "issued"
    assert await worker.consuming()


async def next_dead_letter(
    channel: aio_pika.abc.AbstractChannel,
) -> aio_pika.abc.AbstractIncomingMessage:
    dead_letters = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
    async with asyncio.timeout(20):
        while (parked := await dead_letters.get(no_ack=True, fail=False)) is None:
            await asyncio.sleep(0.05)
    return parked


async def test_a_lost_parking_consumer_is_detected_and_restored(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    """The consumer of otp.worker.undeliverable is watched too: unwatched, it stayed lost,
    and commands the broker gave up on never reached the dead letters."""
    worker = await start_worker()
    await cancel_parking_consumer(worker)
    assert worker._parking is not None
    lost = await consumers_of(amqp_url, UNDELIVERABLE_QUEUE) == 0
    assert lost or worker._parking.restores >= 1  # or already found lost, and restored
    async with asyncio.timeout(20):
        while await consumers_of(amqp_url, UNDELIVERABLE_QUEUE) == 0:
            await asyncio.sleep(0.1)
    assert worker._parking is not None and worker._parking.restores >= 1
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(b'{"command_id": "given-up"}'), routing_key=UNDELIVERABLE_QUEUE
        )
        parked = await next_dead_letter(channel)
    finally:
        await connection.close()
    assert parked.body == b'{"command_id": "given-up"}'
    assert parked.headers[ERROR_TYPE_HEADER] == "delivery_limit"


async def test_a_command_batchs_ack_never_settles_a_command_being_parked(
    amqp_url: str, start_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch acks with one ``multiple`` ack up to its last delivery tag: on a channel shared
    with the parking consumer, it acked a command whose parking was still under way. Its
    failure's requeue then met an unknown delivery tag, and the command was lost."""
    import worker.parking

    real_park = worker.parking.park
    gate = asyncio.Event()
    parks = 0

    async def slow_then_failing_park(*args: Any, **kwargs: Any) -> None:
        nonlocal parks
        parks += 1
        if parks == 1:
            await gate.wait()
            raise RuntimeError("the dead-letter exchange is away")
        await real_park(*args, **kwargs)

    monkeypatch.setattr(worker.parking, "park", slow_then_failing_park)
    await start_worker()
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(b'{"command_id": "given-up"}'), routing_key=UNDELIVERABLE_QUEUE
        )
        await wait_until(lambda: parks == 1)
        async with producer(amqp_url) as otp:  # a batch is acked while the park waits
            assert (await otp.issue(user="meanwhile"))["status"] == "issued"
        gate.set()
        parked = await next_dead_letter(channel)
    finally:
        await connection.close()
    assert parked.body == b'{"command_id": "given-up"}'
    assert parks == 2


async def test_sigterm_finishes_in_flight_work_and_exits_zero(
    amqp_url: str, database_url: str, tmp_path: Path, spawn: Spawn
) -> None:
    """SIGTERM lands once the worker holds every command of a burst and has answered only a
    part of it: it must answer the rest, ack it and publish every event before it exits.

    Confirms of codes that do not exist come first: they stage no event, so the relay is
    idle when SIGTERM comes and waiting for it gives the command batches no time. The
    issues come last, and their events go to the notifier's quorum queue, as deployed: each
    confirm waits for the queue's commit, so the relay is behind when the last batch is done.
    Either drain missing from ``Worker.stop`` fails this test."""
    # The answers given before the signal are mostly those of the worker's own start (its
    # "worker consuming" line comes after a second consume and a log flush): on a slow host
    # hundreds of them, whatever the burst's size, so the confirms leave a wide margin.
    total, confirms = 5500, 5000
    env = worker_env(
        amqp_url,
        database_url,
        tmp_path / "var",
        OTP_REVEAL_CLIENTS="test-app",
        OTP_PREFETCH=str(total),  # the whole burst is delivered at once: none in transit
        OTP_BATCH_SIZE="16",
    )
    commands = [("code.confirm", confirm_unknown_code(f"term-{i}")) for i in range(confirms)]
    commands += [("code.issue", issue_command(f"term-{i}")) for i in range(confirms, total)]
    await declare_topology(amqp_url)
    async with channel_on(amqp_url) as channel:
        await declare_queue(channel, NOTIFIER_QUEUE_SPEC)
    async with (
        producer(amqp_url) as otp,
        event_log(amqp_url, "code.issued") as events,
        channel_on(amqp_url) as looking,
    ):
        await asyncio.gather(*(otp.send(key, body) for key, body in commands))
        # The signal must come soon after the burst is delivered: one channel kept open and
        # asked every 5 ms, not a connection opened per look.
        waiting = await looking.declare_queue(COMMAND_QUEUE, passive=True)
        process = spawn("worker", env, "worker-term.log")
        log_path = tmp_path / "worker-term.log"
        await wait_until(lambda: "worker consuming" in log_path.read_text(), every=0.01)
        async with asyncio.timeout(30):
            while (await waiting.declare()).message_count:
                await asyncio.sleep(0.005)
        process.send_signal(signal.SIGTERM)
        answered_at_signal = len(otp.reply_messages)
        assert answered_at_signal < confirms // 2, "SIGTERM came with too little in flight"
        assert await asyncio.to_thread(process.wait, 60) == 0
        assert "worker stopped" in (tmp_path / "worker-term.log").read_text()
        left = await commands_left(amqp_url)
        assert not left, f"{len(left)} commands it held went back to the queue: {left[:3]}"
        assert await outbox_backlog(database_url) == 0, "committed events were not published"
        # Replies were published before the exit; they may still be on their way to us.
        await wait_until(lambda: len(otp.reply_messages) >= total, timeout=10)
        replies = replies_by_command(otp)
        assert set(replies) == {body["command_id"] for _, body in commands}
        twice = [c for c, bodies in replies.items() if len(bodies) > 1]
        assert not twice, f"answered twice: {twice[:3]}"
        code_ids = {b[0]["code_id"] for b in replies.values() if b[0]["status"] == "issued"}
        assert len(code_ids) == total - confirms
        await events.wait_for(lambda e: code_ids <= {b["code_id"] for b in e.bodies}, timeout=10)


async def commands_left(url: str) -> list[str]:
    """The command_id of every command waiting in the queue (taken unacked: they stay)."""
    async with channel_on(url) as channel:
        queue = await channel.declare_queue(COMMAND_QUEUE, passive=True)
        left = []
        while (message := await queue.get(fail=False)) is not None:
            left.append(orjson.loads(message.body)["command_id"])
        return left


async def outbox_backlog(database_url: str) -> int:
    """Events committed and not yet published, asked of the store once the worker is gone."""
    store = await open_store(database_url)
    try:
        return await store.outbox_backlog()
    finally:
        await store.close()


def run_until_exit(
    module: str, env: dict[str, str], cwd: Path, timeout: float = 60
) -> tuple[int, list[str]]:
    """Runs ``python -m module`` to its end: (exit code, stderr lines)."""
    result = subprocess.run(
        [sys.executable, "-m", module],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )
    return result.returncode, result.stderr.strip().splitlines()


def test_bad_configuration_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    base = worker_env("amqp://guest:guest@127.0.0.1:1/", "sqlite:///x.db", tmp_path)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    # Dev mode writes the keys it generates into OTP_VAR_DIR: here, into a file's place.
    dev = {k: v for k, v in base.items() if k not in ("OTP_SECRET_KEY", "OTP_DELIVERY_KEY")}
    for variable, value, env in (
        ("OTP_CODE_LENGTH", "12", base),
        ("OTP_MAX_ATTEMPTS", "many", base),
        ("OTP_DELIVERY_KEY", "not-a-key", base),
        ("OTP_SECRET_KEY", "", base),
        ("OTP_TEMPLATES_DIR", str(tmp_path / "missing"), base),  # was passed over quietly
        ("OTP_VAR_DIR", str(a_file), {**dev, "OTP_DEV": "true"}),  # was a traceback
    ):
        code, lines = run_until_exit("worker", {**env, variable: value}, tmp_path)
        assert code == 2, lines
        assert len(lines) == 1 and variable in lines[0], lines


@pytest.mark.parametrize("module", ["worker", "worker.notifier"])
def test_lifetimes_that_disagree_name_both_variables(module: str, tmp_path: Path) -> None:
    env = worker_env("amqp://guest:guest@127.0.0.1:1/", "sqlite:///x.db", tmp_path)
    env.update(OTP_DEFAULT_TTL_SECONDS="1000", OTP_MAX_TTL_SECONDS="900")
    code, lines = run_until_exit(module, env, tmp_path)
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert "OTP_DEFAULT_TTL_SECONDS" in lines[0] and "OTP_MAX_TTL_SECONDS" in lines[0], lines


BAD_URLS = [
    ("OTP_AMQP_URL", "notaurl"),
    ("OTP_AMQP_URL", "amqp//guest:s3cret@127.0.0.1:5672/"),  # the colon forgotten
    ("OTP_AMQP_URL", "http://guest:s3cret@127.0.0.1:5672/"),
    ("OTP_AMQP_URL", "amqp://guest:s3cret@:5672/"),
    ("OTP_AMQP_URL", "amqp://guest:s3cret@127.0.0.1:99999/"),
    ("OTP_AMQP_URL", "amqp://guest:s3cret/"),  # no host: the password reads as the port
    ("OTP_DATABASE_URL", "mysql://otp:s3cret@127.0.0.1/otp"),
    ("OTP_DATABASE_URL", "sqlite:"),
    ("OTP_DATABASE_URL", "postgresql://otp:s3cret@127.0.0.1:port/otp"),
    ("OTP_SMS_GATEWAY_URL", "gw.example/sms?key=s3cret"),  # no scheme: "unsupported protocol"
    ("OTP_SMS_GATEWAY_URL", "http://[::1/sms?key=s3cret"),  # httpx: InvalidURL at each SMS
    ("OTP_SMS_GATEWAY_URL", "https://user:s3cret@/sms"),
    ("OTP_SMS_GATEWAY_URL", "https://gw.example:s3cret/sms"),
]


@pytest.mark.parametrize(("variable", "value"), BAD_URLS)
@pytest.mark.parametrize("module", ["worker", "worker.notifier"])
def test_a_bad_url_is_one_line_naming_the_variable(
    module: str, variable: str, value: str, tmp_path: Path
) -> None:
    # A broker URL without a host used to hang for ever (aio-pika retrying "host and port
    # was not specified", quietly); an unknown database scheme ended in a traceback.
    env = worker_env("amqp://guest:guest@127.0.0.1:1/", f"sqlite:///{tmp_path}/x.db", tmp_path)
    env[variable] = value
    code, lines = run_until_exit(module, env, tmp_path, timeout=20)
    assert code == 2, lines
    assert len(lines) == 1 and variable in lines[0], lines
    assert "s3cret" not in lines[0]


@pytest.mark.parametrize("module", ["worker", "worker.notifier"])
def test_unreachable_broker_is_one_line(module: str, tmp_path: Path) -> None:
    # Both open their SQLite store before the broker: a start that failed without closing it
    # used to leave the process hanging on the store's thread instead of exiting.
    env = worker_env("amqp://guest:guest@127.0.0.1:1/", f"sqlite:///{tmp_path}/x.db", tmp_path)
    code, lines = run_until_exit(module, env, tmp_path)
    assert code == 1
    assert len(lines) == 1 and "127.0.0.1:1" in lines[0], lines


@pytest.mark.parametrize("module", ["worker", "worker.notifier"])
def test_help_answers_without_starting_and_arguments_are_refused(
    module: str, tmp_path: Path
) -> None:
    # --help used to start the service: open the store, connect, consume.
    env = worker_env("amqp://guest:guest@127.0.0.1:1/", f"sqlite:///{tmp_path}/x.db", tmp_path)
    run = functools.partial(
        subprocess.run, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    helped = run([sys.executable, "-m", module, "--help"])
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith(f"usage: python -m {module}")
    assert "OTP_" in helped.stdout and helped.stderr == ""
    assert not (tmp_path / "x.db").exists()
    refused = run([sys.executable, "-m", module, "--prefetch", "10"])
    assert refused.returncode == 2
    assert "unrecognized arguments: --prefetch 10" in refused.stderr
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("module", ["worker", "worker.notifier"])
def test_a_vhost_the_broker_will_not_open_is_one_line(
    module: str, amqp_url: str, tmp_path: Path
) -> None:
    # It was a traceback of aiormq's: "Expected one of ['Connection.OpenOk'], got ...".
    url = amqp_url.rsplit("/", 1)[0] + "/otp-no-such-vhost"
    env = worker_env(url, f"sqlite:///{tmp_path}/x.db", tmp_path)
    code, lines = run_until_exit(module, env, tmp_path)
    assert code == 1
    assert len(lines) == 1, lines
    assert "would not open vhost 'otp-no-such-vhost'" in lines[0], lines


@pytest.mark.parametrize("module", ["worker", "worker.notifier"])
async def test_sigterm_while_starting_stops_at_once(
    module: str, tmp_path: Path, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    # A broker address that takes the connection and never answers: the start waits on it,
    # as on a broker that hangs. An operator's SIGTERM must not wait for that to end.
    async with silent_broker() as (url, accepted):
        env = worker_env(url, f"sqlite:///{tmp_path}/x.db", tmp_path)
        process = spawn(module, env, "starting.log")
        await asyncio.wait_for(accepted.wait(), 30)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
        assert "stopped before it had started" in (tmp_path / "starting.log").read_text()


@pytest.mark.parametrize("module", ["worker", "worker.notifier"])
async def test_a_broker_that_never_answers_is_one_line(module: str, tmp_path: Path) -> None:
    async with silent_broker() as (url, _):
        env = worker_env(url, f"sqlite:///{tmp_path}/x.db", tmp_path)
        env["OTP_AMQP_CONNECT_TIMEOUT_SECONDS"] = "0.5"
        code, lines = await asyncio.to_thread(run_until_exit, module, env, tmp_path)
    assert code == 1
    assert len(lines) == 1 and "no answer within 0.5 s" in lines[0], lines


@contextlib.asynccontextmanager
async def silent_broker() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """An AMQP URL whose server takes connections and never says a word, like a hung broker;
    the event is set once a connection came."""
    accepted = asyncio.Event()
    links: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        links.append(writer)
        accepted.set()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"amqp://guest:guest@127.0.0.1:{port}/", accepted
    finally:
        server.close()
        for writer in links:
            writer.transport.abort()
        await server.wait_closed()


@pytest.mark.parametrize("module", ["worker", "worker.notifier"])
def test_unreachable_postgres_is_one_line(module: str, tmp_path: Path) -> None:
    env = worker_env("amqp://guest:guest@127.0.0.1:1/", "postgresql://x@127.0.0.1:1/x", tmp_path)
    code, lines = run_until_exit(module, env, tmp_path)
    assert code == 1
    assert len(lines) == 1 and "cannot connect to PostgreSQL" in lines[0], lines


@pytest.mark.skipif("postgresql" not in BACKENDS, reason="PostgreSQL not among the backends")
@pytest.mark.parametrize("module", ["worker", "worker.notifier"])
@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://no_such_role_otp@{urlsplit(POSTGRES_BASE).netloc.rpartition('@')[2]}/x",
        f"{POSTGRES_BASE}/no_such_database_otp",
    ],
    ids=["role", "database"],
)
def test_a_postgres_refusal_is_one_line(module: str, url: str, tmp_path: Path) -> None:
    env = worker_env("amqp://guest:guest@127.0.0.1:1/", url, tmp_path)
    code, lines = run_until_exit(module, env, tmp_path)
    assert code == 1
    assert len(lines) == 1 and "PostgreSQL refused the connection" in lines[0], lines


@pytest.mark.parametrize("module", ["worker", "worker.notifier"])
@pytest.mark.parametrize("kind", ["a directory", "not a database"])
def test_a_sqlite_file_that_cannot_be_used_is_one_line(
    module: str, kind: str, tmp_path: Path
) -> None:
    target = tmp_path / "otp.db"
    if kind == "a directory":
        target.mkdir()
    else:
        target.write_bytes(b"these are not the pages of a SQLite database\n" * 200)
    env = worker_env("amqp://guest:guest@127.0.0.1:1/", f"sqlite:///{target}", tmp_path)
    code, lines = run_until_exit(module, env, tmp_path)
    assert code == 1
    assert len(lines) == 1, lines
    assert "cannot open the store: SQLite cannot " in lines[0] and str(target) in lines[0]


async def test_a_queue_declared_with_other_arguments_stops_the_worker_in_one_line(
    amqp_url: str, tmp_path: Path
) -> None:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(COMMAND_QUEUE, durable=True)  # classic, no dead-lettering
    finally:
        await connection.close()
    env = worker_env(amqp_url, f"sqlite:///{tmp_path}/x.db", tmp_path)
    code, lines = await asyncio.to_thread(run_until_exit, "worker", env, tmp_path)
    assert code == 1
    assert len(lines) == 1, lines
    assert "PRECONDITION_FAILED" in lines[0] and COMMAND_QUEUE in lines[0], lines
