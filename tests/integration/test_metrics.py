"""Metrics and health endpoints of a real worker, after real traffic, on every backend."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from contracts.topology import DEAD_LETTER_QUEUE
from tests.conftest import WorkerFactory
from tests.support import cancel_parking_consumer, declare_topology, producer
from worker.app import Worker
from worker.store.sqlite import SqliteStore

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


async def scrape_until(port: int, done: Callable[[Samples], bool]) -> Samples:
    """The reply reaches the test a moment before the worker records it: wait for that."""
    async with asyncio.timeout(15):
        while not done(samples := await scrape(port)):
            await asyncio.sleep(0.05)
    return samples


async def get(port: int, path: str) -> int:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"http://127.0.0.1:{port}{path}")).status_code


def count(samples: Samples, name: str, *, default: float | None = None, **labels: str) -> float:
    """A series' value. A series that is not there fails the test, so a renamed or unexported
    metric cannot pass for a zero; ``default`` is for polling before a labelled series exists."""
    value = samples.get((name, frozenset(labels.items())), default)
    assert value is not None, f"no series {name}{labels or ''} in the scrape"
    return value


async def start(start_worker: WorkerFactory, **overrides: object) -> tuple[Worker, int]:
    worker = await start_worker(
        metrics_port=0, metrics_host="127.0.0.1", reveal_clients="test-app", **overrides
    )
    assert worker.metrics_port is not None
    return worker, worker.metrics_port


async def test_commands_are_counted_by_type_and_status(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    _, port = await start(start_worker)
    async with producer(amqp_url) as otp:
        issued = await otp.issue(user="m", reveal=True)
        await otp.issue(user="m2")
        wrong = "000000" if issued["code"] != "000000" else "111111"
        assert (await otp.confirm(user="m", code=wrong))["status"] == "invalid"
        assert (await otp.confirm(user="m", code=issued["code"]))["status"] == "confirmed"
        assert (await otp.call("code.issue", b"{"))["status"] == "rejected"

    def recorded(s: Samples) -> bool:
        return count(s, "otp_command_duration_seconds_count", default=0, command="issue") == 3

    samples = await scrape_until(port, recorded)
    total = "otp_commands_total"
    assert count(samples, total, command="issue", status="issued") == 2
    assert count(samples, total, command="issue", status="rejected") == 1
    assert count(samples, total, command="confirm", status="invalid") == 1
    assert count(samples, total, command="confirm", status="confirmed") == 1
    assert count(samples, "otp_command_duration_seconds_count", command="confirm") == 2
    assert count(samples, "otp_command_batch_size_sum") == 5  # each delivery in one batch
    assert count(samples, "otp_consuming") == 1
    assert count(samples, "otp_command_queue_consumers") == 1
    assert count(samples, "otp_command_queue_messages") == 0
    assert count(samples, "otp_dead_letter_messages") == 1  # the rejected "{", parked
    relayed = await scrape_until(port, lambda s: count(s, "otp_outbox_backlog") == 0)
    assert count(relayed, "otp_outbox_oldest_age_seconds") == 0


async def test_a_backlog_is_taken_in_batches_and_the_histogram_shows_it(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    """Commands waiting when the worker starts arrive together: fewer batches than commands."""
    await declare_topology(amqp_url)
    async with producer(amqp_url) as otp:
        pending = [
            await otp.send(
                "code.issue",
                {"command_id": f"backlog-{i}", "user": f"b{i}", "client": "a", "channel": "none"},
            )
            for i in range(30)
        ]
        _, port = await start(start_worker)
        replies = await asyncio.wait_for(asyncio.gather(*pending), 15)
    assert {r["status"] for r in replies} == {"issued"}
    samples = await scrape(port)
    assert count(samples, "otp_command_batch_size_sum") == 30
    assert 1 <= count(samples, "otp_command_batch_size_count") < 30
    assert count(samples, "otp_command_batch_size_bucket", le="512.0") == count(
        samples, "otp_command_batch_size_count"
    )


def late(samples: Samples, over: str = "0.25") -> float:
    """Timers the event loop ran more than ``over`` seconds late."""
    lag = "otp_event_loop_lag_seconds"
    return count(samples, f"{lag}_count", default=0) - count(
        samples, f"{lag}_bucket", default=0, le=over
    )


async def loop_lag_shows_a_stall(port: int) -> None:
    """The app's loop is the test's: holding it up is a stall the histogram must show."""
    await scrape_until(port, lambda s: count(s, "otp_event_loop_lag_seconds_count", default=0) > 1)
    before = late(await scrape(port))
    time.sleep(0.6)  # the stimulus, not a wait: blocks every task on the loop for 0.6 s
    samples = await scrape_until(port, lambda s: late(s) > before)
    assert late(samples, over="0.5") >= 1  # one timer 0.55 s late or more: the whole stall


async def test_a_blocked_event_loop_shows_as_loop_lag(start_worker: WorkerFactory) -> None:
    _, port = await start(start_worker)
    await loop_lag_shows_a_stall(port)


async def test_a_full_disk_is_retried_counted_and_then_gets_through(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    worker, port = await start(start_worker)
    if not isinstance(worker.store, SqliteStore):
        pytest.skip("SQLite's page limit stands in for a full disk")
    db = worker.store._db
    async with producer(amqp_url) as otp:
        await otp.issue(user="before")
        pages = next(iter(await db.execute_fetchall("PRAGMA page_count")))[0]
        await db.execute(f"PRAGMA max_page_count={pages}")  # SQLITE_FULL, as on a full disk
        calls = asyncio.gather(*(otp.issue(user=f"full-{i}", timeout=60) for i in range(40)))
        await scrape_until(port, lambda s: count(s, "otp_store_retries_total") >= 1)
        await db.execute("PRAGMA max_page_count=1073741823")
        replies = await calls
    assert {r["status"] for r in replies} == {"issued"}  # none dead-lettered for the moment


async def test_outbox_backlog_shows_unrelayed_events(
    amqp_url: str, start_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Committed rows are neither handed to the relay nor claimable (long lease): they wait."""
    worker, port = await start(start_worker, outbox_lease_seconds=3600)
    assert worker.relay is not None
    monkeypatch.setattr(worker.relay, "submit", lambda rows: None)
    async with producer(amqp_url) as otp:
        await otp.issue(user="b1")
        await otp.issue(user="b2")
    samples = await scrape_until(port, lambda s: count(s, "otp_outbox_backlog") == 2)
    assert count(samples, "otp_outbox_oldest_age_seconds") > 0


async def test_ready_until_the_consumer_is_cancelled(start_worker: WorkerFactory) -> None:
    worker, port = await start(start_worker, consumer_check_seconds=3600)
    assert await get(port, "/readyz") == 200
    assert await get(port, "/healthz") == 200
    assert await get(port, "/nope") == 404
    assert worker._queue is not None and worker._tag is not None
    await worker._queue.cancel(worker._tag)
    assert await get(port, "/readyz") == 503
    assert await get(port, "/healthz") == 200
    assert count(await scrape(port), "otp_consuming") == 0


async def test_commands_waiting_for_a_lost_consumer_and_gone_dead_letters_show(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    worker, port = await start(start_worker, consumer_check_seconds=3600)
    assert worker._queue is not None and worker._tag is not None
    await worker._queue.cancel(worker._tag)
    async with producer(amqp_url) as otp:
        for n in range(3):
            await otp.send("code.issue", {"command_id": f"w{n}", "user": "w", "client": "c"})
        samples = await scrape_until(port, lambda s: count(s, "otp_command_queue_messages") == 3)
        assert count(samples, "otp_consuming") == 0
        assert count(samples, "otp_dead_letter_messages") == 0
        await otp.channel.queue_delete(DEAD_LETTER_QUEUE)
    gone = await scrape(port)
    assert math.isnan(count(gone, "otp_dead_letter_messages"))
    assert count(gone, "otp_command_queue_messages") == 3  # the worker's channels are unharmed


async def test_not_ready_while_the_parking_consumer_is_lost(start_worker: WorkerFactory) -> None:
    """Without it, commands the broker gave up on never reach the dead letters."""
    worker, port = await start(start_worker, consumer_check_seconds=3600)
    assert await get(port, "/readyz") == 200
    await cancel_parking_consumer(worker)
    assert await get(port, "/readyz") == 503
    assert count(await scrape(port), "otp_consuming") == 1  # commands are still consumed


async def test_not_ready_once_the_store_is_closed(start_worker: WorkerFactory) -> None:
    worker, port = await start(start_worker)
    assert await get(port, "/readyz") == 200
    assert worker.store is not None
    await worker.store.close()
    assert await get(port, "/readyz") == 503
    assert await get(port, "/healthz") == 200
