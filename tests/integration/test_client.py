"""The producer client against the real broker and an in-process worker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from asyncio import FIRST_COMPLETED
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import pytest

from contracts.client import (
    OtpClient,
    OtpConnectionLost,
    OtpError,
    OtpNoReply,
    OtpRefused,
    OtpTimeout,
    OtpUnroutable,
)
from contracts.events import CodeConfirmed, CodeIssued
from contracts.topology import (
    COMMANDS_EXCHANGE,
    EVENTS_EXCHANGE,
)
from tests.conftest import WorkerFactory
from tests.proxy import proxied
from tests.support import AUDIT, ROOT, channel_on, declare_topology, queued_commands


async def unacked_events(url: str) -> int:
    """Deliveries not yet acked on the vhost's exclusive queues (the subscriptions'), as
    the broker counts them; an exclusive queue cannot be inspected from another connection."""
    vhost = unquote(urlsplit(url).path[1:]) or "/"
    listing = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "-q",
        "list_queues",
        "-p",
        vhost,
        "exclusive",
        "messages_unacknowledged",
        "--no-table-headers",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await listing.communicate()
    return sum(
        int(unacked)
        for exclusive, unacked in (line.split("\t") for line in out.decode().splitlines() if line)
        if exclusive == "true"
    )


def confirmed_event(user: str) -> CodeConfirmed:
    """A ``code.confirmed`` event as the worker would publish it, with a fresh id."""
    return CodeConfirmed(
        event_id=str(uuid.uuid4()),
        occurred_at=datetime.now(UTC),
        code_id="c1",
        user=user,
        client="c",
        purpose="login",
        attempts_used=1,
    )


async def until_queued(url: str, count: int) -> None:
    """Waits (the per-test timeout bounds it) until ``count`` commands wait for a worker."""
    while await queued_commands(url) < count:
        await asyncio.sleep(0.05)


async def queued_once_settled(url: str, count: int, timeout: float = 10) -> int:
    """The commands waiting for a worker once ``count`` are there (or ``timeout`` passed):
    a publish whose confirm the client stopped waiting for may still be on its way."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(until_queued(url, count), timeout)
    return await queued_commands(url)


async def test_issue_then_confirm(amqp_url: str, start_worker: WorkerFactory) -> None:
    await start_worker(reveal_clients="test-app")
    async with OtpClient.connect(amqp_url) as otp:
        issued = await otp.issue(user="alice", client="test-app", channel="none", reveal=True)
        assert issued.status == "issued"
        assert issued.code is not None
        AUDIT.codes.add(issued.code)
        wrong = await otp.confirm(user="alice", client="test-app", code="not-it")
        assert (wrong.status, wrong.attempts_left) == ("invalid", 4)
        confirmed = await otp.confirm(user="alice", client="test-app", code=issued.code)
        assert confirmed.status == "confirmed"
        assert confirmed.code_id == issued.code_id


async def test_invalid_command_fails_before_the_broker(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    await start_worker()
    async with OtpClient.connect(amqp_url) as otp:
        with pytest.raises(ValueError, match=r"E\.164"):
            await otp.issue(user="alice", client="c", channel="sms", destination="12345")


async def test_timeout_when_no_worker_consumes(amqp_url: str) -> None:
    await declare_topology(amqp_url)
    async with OtpClient.connect(amqp_url) as otp:
        with pytest.raises(OtpTimeout, match="2 attempt") as raised:
            await otp.issue(user="alice", client="c", channel="none", timeout=0.2, retries=1)
    # The retry re-published the same command: both copies wait for a worker.
    assert await queued_once_settled(amqp_url, 2) == 2
    assert raised.value.attempts == 2


async def test_calls_still_waiting_when_the_client_closes_end_at_once(amqp_url: str) -> None:
    # Each remaining attempt used to wait its whole timeout for a connection that the
    # client itself had closed: 40 s here.
    await declare_topology(amqp_url)
    async with OtpClient.connect(amqp_url) as otp:
        call = asyncio.create_task(
            otp.issue(user="alice", client="c", channel="none", timeout=20, retries=2)
        )
        await asyncio.wait_for(until_queued(amqp_url, 1), 10)
    with pytest.raises(OtpConnectionLost):
        await asyncio.wait_for(call, 10)


async def test_unroutable_when_no_worker_ever_ran(amqp_url: str) -> None:
    await declare_topology(amqp_url, with_queue=False)
    async with OtpClient.connect(amqp_url) as otp:
        with pytest.raises(OtpUnroutable, match=r"code\.issue"):
            await otp.issue(user="alice", client="c", channel="none", timeout=2)


async def test_a_command_the_broker_refuses_is_one_clear_error(amqp_url: str) -> None:
    """A nack (here a full queue that rejects publishes) queued nothing: no retry, no wait."""
    await declare_topology(amqp_url, with_queue=False)
    async with channel_on(amqp_url) as channel:
        full = await channel.declare_queue(
            "", exclusive=False, auto_delete=True,
            arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
        )  # fmt: skip
        await full.bind(COMMANDS_EXCHANGE, "code.issue")
        async with OtpClient.connect(amqp_url) as otp:
            with pytest.raises(OtpRefused, match=r"refused 'code\.issue'") as raised:
                await otp.issue(
                    user="alice", client="c", channel="none", command_id="r-1", timeout=5
                )
    assert raised.value.command_id == "r-1"
    assert isinstance(raised.value, OtpNoReply)


async def test_missing_topology_is_one_clear_error(amqp_url: str) -> None:
    with pytest.raises(OtpError, match=r"otp\.commands"):
        async with OtpClient.connect(amqp_url):
            pass


async def test_retried_call_is_idempotent(amqp_url: str, start_worker: WorkerFactory) -> None:
    await declare_topology(amqp_url)
    async with OtpClient.connect(amqp_url) as otp, otp.subscribe("code.issued") as stream:
        command_id = str(uuid.uuid4())
        call = asyncio.create_task(
            otp.issue(
                user="alice",
                client="c",
                channel="none",
                command_id=command_id,
                timeout=0.3,
                retries=200,
            )
        )
        await until_queued(amqp_url, 2)  # at least one retry is waiting
        await start_worker()
        first = await call
        again = await otp.issue(user="alice", client="c", channel="none", command_id=command_id)
        assert first.status == "issued"
        assert again == first
        # A sentinel issued after every copy was handled: its event comes after alice's.
        await otp.issue(user="sentinel", client="c", channel="none")
        users: list[str] = []
        async for event in stream:
            users.append(event.user)
            if event.user == "sentinel":
                break
    assert users.count("alice") == 1


async def test_a_publish_not_confirmed_in_time_is_published_again(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    """The broker takes the command but its confirm does not come back in time (the proxy
    holds everything the broker sends): that attempt timed out, and the retry goes out."""
    await declare_topology(amqp_url)
    async with proxied(amqp_url) as (proxy, url), OtpClient.connect(url) as otp:
        proxy.hold_from_broker()
        call = asyncio.create_task(
            # 10 s: the retry's wait for its confirm covers starting a worker below.
            otp.issue(user="alice", client="c", channel="none", timeout=10, retries=1)
        )
        published_again = asyncio.create_task(until_queued(amqp_url, 2))
        done, _ = await asyncio.wait({call, published_again}, return_when=FIRST_COMPLETED)
        if call in done:  # it gave up before publishing again: say why
            published_again.cancel()
            await call
        await start_worker()
        proxy.release()
        issued = await call
        assert issued.status == "issued"
        assert proxy.connections == 1


async def test_no_confirm_on_any_attempt_is_a_timeout(amqp_url: str) -> None:
    await declare_topology(amqp_url)
    async with proxied(amqp_url) as (proxy, url), OtpClient.connect(url) as otp:
        proxy.hold_from_broker()
        with pytest.raises(OtpTimeout, match="2 attempt") as raised:
            await otp.issue(user="alice", client="c", channel="none", timeout=0.5, retries=1)
        assert raised.value.attempts == 2
    assert await queued_once_settled(amqp_url, 2) == 2


async def test_a_call_whose_connection_drops_is_published_again_after_reconnecting(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    await declare_topology(amqp_url)
    async with proxied(amqp_url) as (proxy, url), OtpClient.connect(url) as otp:
        call = asyncio.create_task(
            otp.issue(user="alice", client="c", channel="none", timeout=30, retries=1)
        )
        await until_queued(amqp_url, 1)  # published; its reply would come on this connection
        await proxy.cut()
        await proxy.restore()
        # The drop ended the first attempt at once (its timeout is 30 s); the second went out
        # on the new connection, with direct reply-to consumed there again.
        await until_queued(amqp_url, 2)
        await start_worker()
        issued = await call
        assert issued.status == "issued"
        assert proxy.connections == 2


async def test_a_call_without_retries_reports_the_lost_connection(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    await start_worker()
    async with proxied(amqp_url) as (proxy, url), OtpClient.connect(url) as otp:
        await proxy.cut()
        with pytest.raises(OtpConnectionLost, match="1 attempt") as raised:
            await otp.issue(user="alice", client="c", channel="none", timeout=0.5)
        assert isinstance(raised.value, OtpNoReply)
        await proxy.restore()
        issued = await otp.issue(user="alice", client="c", channel="none", timeout=10)
        assert issued.status == "issued"


async def test_events_are_parsed_and_deduplicated(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    await start_worker()
    repeated = confirmed_event("bob")
    async with OtpClient.connect(amqp_url) as otp, otp.subscribe("code.*") as stream:
        async with channel_on(amqp_url) as channel:
            exchange = await channel.get_exchange(EVENTS_EXCHANGE)
            for _ in range(2):  # what an outbox relay does after a crash
                await exchange.publish(
                    aio_pika.Message(repeated.model_dump_json().encode()),
                    routing_key="code.confirmed",
                )
        await otp.issue(user="alice", client="c", channel="none")
        seen: list[Any] = []
        async for event in stream:
            seen.append(event)
            if isinstance(event, CodeIssued):
                break
    assert [type(e) for e in seen] == [CodeConfirmed, CodeIssued]
    assert seen[0] == repeated
    assert seen[1].user == "alice"


async def test_a_subscription_goes_on_after_a_reconnect(amqp_url: str) -> None:
    await declare_topology(amqp_url)

    def confirmed(user: str) -> bytes:
        return confirmed_event(user).model_dump_json().encode()

    async with (
        proxied(amqp_url) as (proxy, url),
        OtpClient.connect(url) as otp,
        otp.subscribe("code.*") as stream,
        channel_on(amqp_url) as channel,
    ):
        exchange = await channel.get_exchange(EVENTS_EXCHANGE)
        events = aiter(stream)
        for user in ("before", "buffered-1", "buffered-2"):
            await exchange.publish(aio_pika.Message(confirmed(user)), "code.confirmed")
        assert (await anext(events)).user == "before"
        # The other two reached the client (the loop relays them while rabbitmqctl runs)
        # and are not acked yet: their acks will have no channel to go to.
        while await unacked_events(amqp_url) < 2:
            pass
        await proxy.cut()
        await proxy.restore()
        assert [(await anext(events)).user for _ in range(2)] == ["buffered-1", "buffered-2"]
        # Events sent before the new queue is bound are lost (that is documented); keep
        # sending until one arrives, which only happens once the subscription is back.
        next_event = asyncio.ensure_future(anext(events))
        while not next_event.done():
            await exchange.publish(aio_pika.Message(confirmed("after")), "code.confirmed")
            await asyncio.wait([next_event], timeout=0.1)
        assert next_event.result().user == "after"
        assert proxy.connections == 2


async def test_events_yields_each_event_of_the_pattern_once(amqp_url: str) -> None:
    await declare_topology(amqp_url)
    probe, repeated, last = (confirmed_event(u) for u in ("probe", "bob", "carol"))
    async with OtpClient.connect(amqp_url) as otp, channel_on(amqp_url) as channel:
        exchange = await channel.get_exchange(EVENTS_EXCHANGE)

        async def publish(event: CodeConfirmed, routing_key: str = "code.confirmed") -> None:
            await exchange.publish(aio_pika.Message(event.model_dump_json().encode()), routing_key)

        async with aclosing(otp.events("code.*")) as stream:
            # events() subscribes on the first step and cannot say when: the probe repeats,
            # under one event_id, until it arrives; the copies after it must not.
            first = asyncio.ensure_future(anext(stream))
            while not first.done():
                await publish(probe)
                await asyncio.wait([first], timeout=0.05)
            await publish(repeated)
            await publish(repeated)  # what an outbox relay does after a crash
            await publish(confirmed_event("elsewhere"), "audit.code.confirmed")  # not code.*
            await publish(last)
            seen = [first.result()]
            async for event in stream:
                seen.append(event)
                if event.user == "carol":
                    break
    assert [e.user for e in seen] == ["probe", "bob", "carol"]
    assert seen[1] == repeated


BLOCKER = """
import importlib.abc, sys
BLOCKED = ("aiosqlite", "asyncpg", "structlog", "cryptography", "orjson", "pydantic_settings",
           "worker", "yaml", "jsonschema")
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked: {name}")
        return None
sys.meta_path.insert(0, Refuse())
import contracts.client, contracts.asyncapi
assert not any(m.split(".")[0] in BLOCKED for m in sys.modules), sorted(sys.modules)
print("ok")
"""


def test_contracts_import_without_worker_packages() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", BLOCKER], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


CANCELLED_CONNECT = """
import asyncio
from contracts.client import OtpClient

async def main():
    async def silent(reader, writer):  # takes the connection, never answers: a hung broker
        await reader.read()
    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    url = f"amqp://guest:guest@127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    try:
        async with asyncio.timeout(0.5):  # the caller's own bound, shorter than the client's
            async with OtpClient.connect(url, timeout=30):
                pass
    except TimeoutError:
        print("timed out")
    server.close()

asyncio.run(main())
"""


def test_a_connect_cancelled_by_the_caller_leaves_nothing_running() -> None:
    # aio-pika's reconnect task outlived such a cancel and kept the program from exiting.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", CANCELLED_CONNECT],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "timed out"
    assert "Reconnecting" not in result.stderr, result.stderr
