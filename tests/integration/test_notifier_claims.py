"""Claims: two notifier processes holding copies of one event send it once, on every backend."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiosqlite
import asyncpg
import pytest
from structlog.testing import capture_logs

from contracts.events import CodeIssued
from tests.databases import BACKENDS, temporary_database
from tests.integration.conftest import BACKOFF, NotifierFactory, delete_retry_queues
from tests.integration.notifier_support import (
    SmtpServer,
    crafted_event,
    failing_first,
    publish_event,
    relay_config,
)
from tests.integration.test_faults import wait_until
from tests.support import TEST_DELIVERY_KEY, event_log, worker_env
from worker.domain.sealing import Sealer
from worker.notifier.delivery import Delivered, Deliverer, Retry
from worker.notifier.render import Renderer
from worker.notifier.store import (
    AlreadyDelivered,
    Claimed,
    ClaimedElsewhere,
    DeliveryStore,
    open_delivery_store,
)
from worker.notifier.transports import ConsoleTransport, SmtpTransport
from worker.store.urls import path_of

PARKED = "another notifier is delivering it; parked"


async def test_two_processes_with_copies_of_one_event_send_one_mail(
    amqp_url: str,
    database_url: str,
    tmp_path: Path,
    smtp: SmtpServer,
    spawn: Callable[..., object],
) -> None:
    env = worker_env(
        amqp_url,
        database_url,
        tmp_path / "var",
        OTP_SMTP_HOST="127.0.0.1",
        OTP_SMTP_PORT=str(smtp.port),
        OTP_NOTIFIER_PREFETCH="1",  # the claimant's held copy fills its slot: B gets the other
        OTP_NOTIFIER_BACKOFF_BASE_SECONDS=str(BACKOFF),
        OTP_LOG_LEVEL="debug",
    )
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    for log in logs:
        spawn("worker.notifier", env, log.name)
    await wait_until(
        lambda: all(p.exists() and "notifier consuming" in p.read_text() for p in logs)
    )
    smtp.hold_after = 0  # the claimant's DATA waits: its claim stays live meanwhile
    body = crafted_event("918273")
    try:
        async with event_log(amqp_url) as events:
            await publish_event(amqp_url, body, body)
            await smtp.wait_for(lambda: smtp.held >= 1)
            await wait_until(lambda: any(PARKED in p.read_text() for p in logs))
            assert smtp.held == 1, "both processes reached the SMTP server"
            smtp.release(accept=True)
            # Both copies settle: the claimant's, and the parked one finding it delivered.
            await events.wait_for(lambda e: len(e.named("code.delivered")) >= 2, timeout=30)
    finally:
        await delete_retry_queues(amqp_url)
    assert len(smtp.mails) == 1
    assert "918273" in smtp.mails[0].text
    assert len({d["event_id"] for d in events.named("code.delivered")}) == 1


@pytest.mark.parametrize("failures", [1, 1000], ids=["once", "always"])
async def test_a_sent_mail_whose_recording_fails_is_not_sent_again(
    amqp_url: str,
    start_notifier: NotifierFactory,
    smtp: SmtpServer,
    monkeypatch: pytest.MonkeyPatch,
    failures: int,
) -> None:
    notifier = await start_notifier()
    store = notifier.store
    assert store is not None
    locked = sqlite3.OperationalError("database is locked")
    monkeypatch.setattr(
        store, "mark_delivered", failing_first(failures, locked, store.mark_delivered)
    )
    body = crafted_event("271828")
    with capture_logs() as logs:
        async with event_log(amqp_url) as events:
            await publish_event(amqp_url, body)
            await events.wait_for(lambda e: len(e.named("code.delivered")) >= 1, timeout=10)
            await notifier.wait_handled(1)
    [mail] = smtp.mails
    assert "271828" in mail.text
    [delivered] = events.named("code.delivered")
    assert delivered["code_id"] == body["code_id"] and delivered["attempts"] == 1
    warnings = [e for e in logs if e["event"].startswith("delivered, but recording it failed")]
    assert len(warnings) == (1 if failures > 1 else 0)
    for warning in warnings:
        assert warning["code_id"] == body["code_id"]
        assert warning["event_id"] == body["event_id"]
        assert "271828" not in repr(warning) and "carol@example.org" not in repr(warning)


@contextlib.asynccontextmanager
async def _deliverer(
    database_url: str, smtp: SmtpServer, lease: float, smtp_timeout: float = 5.0
) -> AsyncIterator[tuple[Deliverer, DeliveryStore]]:
    """A notifier's delivery step alone, against the real store and SMTP server."""
    transport = SmtpTransport(relay_config(smtp, timeout=smtp_timeout, pool_size=0))
    store = await open_delivery_store(database_url)
    try:
        yield (
            Deliverer(
                store=store,
                sealer=Sealer(TEST_DELIVERY_KEY.encode()),
                renderer=Renderer(),
                email=transport,
                sms=ConsoleTransport(),
                max_attempts=4,
                claim_lease_seconds=lease,
            ),
            store,
        )
    finally:
        await transport.close()
        await store.close()


async def test_a_claimant_that_lost_its_claim_leaves_the_new_one_and_says_so(
    database_url: str, smtp: SmtpServer
) -> None:
    lease = 30.0
    smtp.hold(after=0)
    event = CodeIssued.model_validate(crafted_event("141421"))
    with capture_logs() as logs:
        async with _deliverer(database_url, smtp, lease) as (deliverer, store):
            first = asyncio.create_task(deliverer.attempt(event, 1, datetime.now(UTC)))
            await smtp.wait_for(lambda: smtp.held == 1)
            # As if the lease had run out meanwhile: a copy elsewhere takes the claim over.
            later = datetime.now(UTC) + timedelta(seconds=lease + 1)
            assert await store.claim(event.event_id, "copy", later, lease) == Claimed("copy")
            smtp.release(accept=True)
            assert await first == Delivered(1)
            # The new claim stands: its own attempt decides what to record.
            assert await store.claim(event.event_id, "x", later, lease) == ClaimedElsewhere()
    assert len(smtp.mails) == 1
    [warning] = [e for e in logs if e["event"].startswith("delivered, but the claim had been")]
    assert warning["code_id"] == event.code_id and warning["event_id"] == event.event_id


async def test_a_send_that_would_outlast_its_claim_is_cut_off_before_the_lease_ends(
    database_url: str, smtp: SmtpServer
) -> None:
    # Each step answers within the SMTP timeout, but the four of them take longer than the
    # lease: a copy elsewhere could take the claim over and send the mail a second time.
    # 3 s: the lease bounds the second attempt's whole session too, on a slow host.
    lease = 3.0
    smtp.slow_sessions, smtp.step_delay = 1, 1.2
    event = CodeIssued.model_validate(crafted_event("161803"))
    # An SMTP timeout far above a step's delay: only the lease may cut the send off, also
    # when a slow host stretches a step.
    async with _deliverer(database_url, smtp, lease, smtp_timeout=10.0) as (deliverer, _):
        first = asyncio.create_task(deliverer.attempt(event, 1, datetime.now(UTC)))
        # The copy looks once the first attempt gave up, or once its claim has run out.
        await asyncio.wait({first}, timeout=lease + 0.1)
        second = await deliverer.attempt(event, 1, datetime.now(UTC))
        outcome = await first
    [mail] = smtp.mails
    assert "161803" in mail.text
    assert outcome == Retry("send_outlasted_claim_lease")
    assert second == Delivered(1)


async def test_a_claim_is_exclusive_until_its_lease_runs_out(database_url: str) -> None:
    store = await open_delivery_store(database_url)
    now = datetime.now(UTC)
    try:
        assert await store.claim("e1", "a", now, 10) == Claimed("a")
        assert await store.claim("e1", "b", now + timedelta(seconds=5), 10) == ClaimedElsewhere()
        # The claimant died: after the lease, the next copy takes over and sends.
        assert await store.claim("e1", "b", now + timedelta(seconds=11), 10) == Claimed("b")
        await store.release("e1", "a")  # a stale claimant cannot drop the new claim
        assert await store.claim("e1", "c", now + timedelta(seconds=12), 10) == ClaimedElsewhere()
        # The stale claimant's delivery does not overwrite the new claim, and it learns so.
        assert not await store.mark_delivered("e1", "a", 1, now + timedelta(seconds=12))
        assert await store.claim("e1", "c", now + timedelta(seconds=12), 10) == ClaimedElsewhere()
        assert await store.mark_delivered("e1", "b", 2, now + timedelta(seconds=13))
        assert not await store.mark_delivered("e1", "a", 1, now + timedelta(seconds=14))
        far = now + timedelta(days=1)
        assert await store.claim("e1", "d", far, 10) == AlreadyDelivered(2)
        # A released claim (retry, failure) is free at once.
        assert await store.claim("e2", "a", now, 10) == Claimed("a")
        await store.release("e2", "a")
        assert await store.claim("e2", "b", now, 10) == Claimed("b")
    finally:
        await store.close()


async def test_a_delivery_is_remembered_until_the_sweep_forgets_it(database_url: str) -> None:
    store = await open_delivery_store(database_url)
    now = datetime.now(UTC)
    cutoff = now - timedelta(days=7)  # what a retention of 7 days sweeps at ``now``
    try:
        for n in range(3):
            await store.mark_delivered(f"old{n}", "t", 1, cutoff - timedelta(seconds=1 + n))
        await store.mark_delivered("recent", "t", 2, cutoff + timedelta(seconds=1))
        assert await store.sweep(cutoff, limit=2) == 2  # a sweep deletes in bounded batches
        assert await store.sweep(cutoff, limit=2) == 1
        assert await store.sweep(cutoff) == 0
        for n in range(3):  # forgotten: a copy arriving now would be sent again
            assert await store.claim(f"old{n}", "x", now, 10) == Claimed("x")
        assert await store.claim("recent", "x", now, 10) == AlreadyDelivered(2)
    finally:
        await store.close()


async def test_the_notifier_sweeps_deliveries_older_than_the_retention(
    amqp_url: str, database_url: str, start_notifier: NotifierFactory, smtp: SmtpServer
) -> None:
    retention = timedelta(days=1)
    old, recent = crafted_event("505050"), crafted_event("606060")
    store = await open_delivery_store(database_url)
    try:
        now = datetime.now(UTC)
        await store.mark_delivered(old["event_id"], "t", 1, now - retention - timedelta(minutes=1))
        await store.mark_delivered(
            recent["event_id"], "t", 3, now - retention + timedelta(minutes=1)
        )
    finally:
        await store.close()
    with capture_logs() as logs:
        notifier = await start_notifier(
            notifier_dedup_retention_seconds=int(retention.total_seconds())
        )
        await wait_until(lambda: any(e["event"] == "swept delivery records" for e in logs))
    [swept] = [e for e in logs if e["event"] == "swept delivery records"]
    assert swept["count"] == 1
    async with event_log(amqp_url) as events:
        await publish_event(amqp_url, old, recent)
        await events.wait_for(lambda e: len(e.named("code.delivered")) == 2)
        await notifier.wait_handled(2)
    [mail] = smtp.mails  # the forgotten one went out again; the remembered one did not
    assert "505050" in mail.text
    attempts = {d["code_id"]: d["attempts"] for d in events.named("code.delivered")}
    assert attempts == {old["code_id"]: 1, recent["code_id"]: 3}


async def test_rows_of_the_table_before_claims_still_count_as_delivered(
    database_url: str,
) -> None:
    legacy = (
        "CREATE TABLE deliveries (event_id TEXT PRIMARY KEY,"
        " delivered_at {time} NOT NULL, attempts INTEGER NOT NULL)"
    )
    if database_url.startswith("sqlite:"):
        Path(path_of(database_url)).parent.mkdir(parents=True, exist_ok=True)
        async with aiosqlite.connect(path_of(database_url)) as db:
            await db.execute(legacy.format(time="REAL"))
            await db.execute("INSERT INTO deliveries VALUES ('old', 1.0, 3)")
            await db.commit()
    else:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(legacy.format(time="TIMESTAMPTZ"))
            await conn.execute("INSERT INTO deliveries VALUES ('old', now(), 3)")
        finally:
            await conn.close()
    store = await open_delivery_store(database_url)
    try:
        assert await store.claim("old", "x", datetime.now(UTC), 10) == AlreadyDelivered(3)
        assert await store.claim("new", "x", datetime.now(UTC), 10) == Claimed("x")
    finally:
        await store.close()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_notifiers_opening_a_new_store_together_all_open(
    backend: str, tmp_path: Path
) -> None:
    """Replicas started at once on a new store each set its schema up.

    SQLite refuses the WAL switch and the schema's write lock at once, without the busy
    handler, while other connections open the same new file: a few of 100 opens did.
    PostgreSQL's ``CREATE TABLE IF NOT EXISTS`` is not safe against a concurrent one: two
    notifiers started together on a new database failed with 'type "deliveries" already
    exists' until the schema was set up under the migrations' advisory lock."""
    for round_ in range(25 if backend == "sqlite" else 10):
        directory = tmp_path / str(round_)
        directory.mkdir()
        async with temporary_database(backend, directory) as url:
            opened = await asyncio.gather(
                *(open_delivery_store(url) for _ in range(4)), return_exceptions=True
            )
            stores = [s for s in opened if not isinstance(s, BaseException)]
            try:
                assert len(stores) == 4, [s for s in opened if isinstance(s, BaseException)]
                assert await stores[0].claim("e", "x", datetime.now(UTC), 10) == Claimed("x")
                assert await stores[1].claim("e", "y", datetime.now(UTC), 10) != Claimed("y")
            finally:
                for store in stores:
                    await store.close()
