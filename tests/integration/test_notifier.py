"""The notifier against real servers: RabbitMQ, SQLite, an aiosmtpd server, an HTTP gateway."""

from __future__ import annotations

import asyncio
import re
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from structlog.testing import capture_logs

from tests.conftest import WorkerFactory
from tests.integration.conftest import (
    BACKOFF,
    MAX_ATTEMPTS,
    NotifierFactory,
    delete_retry_queues,
)
from tests.integration.notifier_support import (
    Gateway,
    SmtpServer,
    crafted_event,
    failing_first,
    publish_event,
)
from tests.proxy import proxied
from tests.support import event_log, producer, start_process, worker_env
from worker.amqp import declare_exchanges, declare_queue
from worker.notifier.retry import NOTIFIER_QUEUE_SPEC, delay_ms, retry_queue_name
from worker.notifier.transports import SmtpTransport


def assert_no_code_logged(logs: list[dict[str, Any]], codes: list[str]) -> None:
    assert logs, "the notifier logged nothing: the check would be empty"
    text = repr(logs)
    for code in codes:
        assert not re.search(rf"\b{code}\b", text), "a plaintext code reached a log line"


async def test_english_and_german_mail_carry_the_code(
    amqp_url: str, start_worker: WorkerFactory, start_notifier: NotifierFactory, smtp: SmtpServer
) -> None:
    await start_notifier()
    await start_worker(reveal_clients="test-app")
    with capture_logs() as logs:
        async with producer(amqp_url) as otp, event_log(amqp_url) as events:
            en = await otp.issue(
                user="alice",
                reveal=True,
                channel="email",
                destination="alice@example.org",
                context={"app_name": "Acme"},
            )
            de = await otp.issue(
                user="bob",
                reveal=True,
                channel="email",
                destination="bob@example.de",
                locale="de-AT",
            )
            await events.wait_for(lambda e: len(e.named("code.delivered")) == 2)
    by_rcpt = {tuple(m.to): m for m in smtp.mails}
    assert len(smtp.mails) == 2
    alice, bob = by_rcpt[("alice@example.org",)], by_rcpt[("bob@example.de",)]
    assert alice.message["Subject"] == "Your Acme verification code"
    assert en["code"] in alice.text and en["code"] in alice.html
    assert bob.message["Subject"] == "Ihr Bestätigungscode für test-app"
    assert de["code"] in bob.text and "gültig" in bob.text
    assert alice.message["X-OTP-Code-Id"] == en["code_id"]
    delivered = events.named("code.delivered")
    assert {d["code_id"] for d in delivered} == {en["code_id"], de["code_id"]}
    assert all(d["attempts"] == 1 and d["channel"] == "email" for d in delivered)
    assert_no_code_logged(logs, [en["code"], de["code"]])


async def test_sms_reaches_the_gateway(
    amqp_url: str,
    start_worker: WorkerFactory,
    start_notifier: NotifierFactory,
    gateway: Gateway,
) -> None:
    gateway.statuses = [503, 429]
    await start_notifier(sms_gateway_url=gateway.url)
    await start_worker(reveal_clients="test-app")
    async with producer(amqp_url) as otp, event_log(amqp_url) as events:
        issued = await otp.issue(
            user="dave", reveal=True, channel="sms", destination="+4915112345678"
        )
        await events.wait_for(lambda e: e.named("code.delivered"))
    assert len(gateway.requests) == 1
    request = gateway.requests[0]
    assert set(request) == {"to", "text", "code_id"}
    assert request["to"] == "+4915112345678"
    assert request["code_id"] == issued["code_id"]
    assert issued["code"] in request["text"]
    assert events.named("code.delivered")[0]["attempts"] == 3


async def test_sms_without_gateway_fails_permanently(
    amqp_url: str, start_notifier: NotifierFactory
) -> None:
    await start_notifier()
    async with event_log(amqp_url) as events:
        await publish_event(amqp_url, crafted_event("123456", channel="sms", destination="+49151"))
        await events.wait_for(lambda e: e.named("code.delivery_failed"))
    failed = events.named("code.delivery_failed")[0]
    assert failed["reason"] == "no_sms_gateway_configured"
    assert failed["attempts"] == 1


async def test_transient_smtp_failures_are_retried_from_the_broker(
    amqp_url: str, start_worker: WorkerFactory, start_notifier: NotifierFactory, smtp: SmtpServer
) -> None:
    smtp.answers = ["451 4.3.0 busy", "451 4.3.0 still busy"]
    notifier = await start_notifier()
    await start_worker(reveal_clients="test-app")
    with capture_logs() as logs:
        async with producer(amqp_url) as otp, event_log(amqp_url) as events:
            issued = await otp.issue(
                user="erin", reveal=True, channel="email", destination="erin@example.org"
            )
            await events.wait_for(lambda e: e.named("code.delivered"))
            # Times out if the retries happened in-process, on the first delivery.
            await notifier.wait_handled(3)
    # One handling per delivery from the broker: the first, and one back from each tier.
    assert notifier.handled == 3
    parked = [e["queue"] for e in logs if e["event"] == "delivery will be retried"]
    assert parked == [retry_queue_name(delay_ms(n, BACKOFF)) for n in (1, 2)]
    assert len(smtp.mails) == 1
    assert issued["code"] in smtp.mails[0].text
    assert smtp.answers == []
    delivered = events.named("code.delivered")
    assert [d["attempts"] for d in delivered] == [3]
    assert not events.named("code.delivery_failed")
    assert_no_code_logged(logs, [issued["code"]])


async def test_retries_run_out(
    amqp_url: str, start_notifier: NotifierFactory, smtp: SmtpServer
) -> None:
    smtp.answers = ["421 4.7.0 go away"] * MAX_ATTEMPTS
    notifier = await start_notifier()
    async with event_log(amqp_url) as events:
        await publish_event(amqp_url, crafted_event("123456"))
        await events.wait_for(lambda e: e.named("code.delivery_failed"))
        await notifier.wait_handled(MAX_ATTEMPTS)
    # Every attempt was a delivery from the broker: back from a delay queue each time.
    assert notifier.handled == MAX_ATTEMPTS
    failed = events.named("code.delivery_failed")[0]
    assert failed["attempts"] == MAX_ATTEMPTS
    assert failed["reason"].startswith("retries_exhausted")
    assert smtp.mails == []


@pytest.mark.parametrize("outage", ["back_in_time", "stays_down"])
async def test_a_store_outage_is_waited_out_in_the_retry_tiers(
    amqp_url: str,
    start_notifier: NotifierFactory,
    smtp: SmtpServer,
    monkeypatch: pytest.MonkeyPatch,
    outage: str,
) -> None:
    # A requeue would come back at once: the quorum queue's delivery limit would be used up
    # within milliseconds of a database restart, and the event dead-lettered unsent.
    notifier = await start_notifier()
    store = notifier.store
    assert store is not None
    failures = MAX_ATTEMPTS - 1 if outage == "back_in_time" else MAX_ATTEMPTS
    gone = ConnectionResetError("the database went away")
    monkeypatch.setattr(store, "claim", failing_first(failures, gone, store.claim))
    body = crafted_event("577215")
    with capture_logs() as logs:
        async with event_log(amqp_url) as events:
            await publish_event(amqp_url, body)
            await events.wait_for(
                lambda e: e.named("code.delivered") or e.named("code.delivery_failed")
            )
            await notifier.wait_handled(MAX_ATTEMPTS)
    assert notifier.handled == MAX_ATTEMPTS
    parked = [e["queue"] for e in logs if e["event"] == "delivery will be retried"]
    assert parked == [retry_queue_name(delay_ms(n, BACKOFF)) for n in range(1, MAX_ATTEMPTS)]
    if outage == "back_in_time":
        [mail] = smtp.mails
        assert "577215" in mail.text
        assert [d["attempts"] for d in events.named("code.delivered")] == [MAX_ATTEMPTS]
    else:
        assert smtp.mails == []
        [failed] = events.named("code.delivery_failed")
        assert failed["reason"] == "retries_exhausted: store_unavailable"
        assert failed["attempts"] == MAX_ATTEMPTS
    assert_no_code_logged(logs, ["577215"])


async def test_an_error_no_transport_sorted_is_retried_not_requeued(
    amqp_url: str,
    start_notifier: NotifierFactory,
    smtp: SmtpServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unsorted = RuntimeError("a library error nobody sorted, quoting 141592")
    # On the class, so the notifier's own transport has it; the first send fails.
    flaky = failing_first(1, unsorted, SmtpTransport.send_email)
    monkeypatch.setattr(SmtpTransport, "send_email", flaky)
    notifier = await start_notifier()
    with capture_logs() as logs:
        async with event_log(amqp_url) as events:
            await publish_event(amqp_url, crafted_event("141592"))
            await events.wait_for(lambda e: e.named("code.delivered"))
            await notifier.wait_handled(2)
    [error] = [e for e in logs if e["event"] == "delivery failed unexpectedly"]
    assert error["error"] == "RuntimeError"
    parked = [e["queue"] for e in logs if e["event"] == "delivery will be retried"]
    assert parked == [retry_queue_name(delay_ms(1, BACKOFF))]
    assert [d["attempts"] for d in events.named("code.delivered")] == [2]
    assert len(smtp.mails) == 1
    assert_no_code_logged(logs, ["141592"])


async def test_permanent_smtp_failure_is_reported(
    amqp_url: str, start_worker: WorkerFactory, start_notifier: NotifierFactory, smtp: SmtpServer
) -> None:
    smtp.answers = ["550 5.1.1 no such user"]
    await start_notifier()
    await start_worker(reveal_clients="test-app")
    async with producer(amqp_url) as otp, event_log(amqp_url) as events:
        issued = await otp.issue(
            user="frank", reveal=True, channel="email", destination="nobody@example.org"
        )
        await events.wait_for(lambda e: e.named("code.delivery_failed"))
    failed = events.named("code.delivery_failed")[0]
    assert failed["code_id"] == issued["code_id"]
    assert failed["attempts"] == 1
    assert "550" in failed["reason"]
    assert smtp.mails == []
    assert not events.named("code.delivered")


async def test_the_notifier_resumes_after_its_connection_is_cut(
    amqp_url: str, start_notifier: NotifierFactory, smtp: SmtpServer
) -> None:
    async with proxied(amqp_url) as (proxy, url):
        await start_notifier(amqp_url=url)
        async with event_log(amqp_url) as events:
            await publish_event(amqp_url, crafted_event("111111"))
            await smtp.wait_for(lambda: len(smtp.mails) == 1)
            await proxy.cut()
            # Published while the notifier is cut off: the event waits in its durable queue.
            await publish_event(amqp_url, crafted_event("222222"))
            await proxy.restore()
            await smtp.wait_for(lambda: len(smtp.mails) == 2, timeout=30)
            await events.wait_for(lambda e: len(e.named("code.delivered")) == 2)
        assert "222222" in smtp.mails[1].text
        assert proxy.connections == 2


async def test_a_repeated_event_is_delivered_once(
    amqp_url: str, start_notifier: NotifierFactory, smtp: SmtpServer
) -> None:
    notifier = await start_notifier()
    body = crafted_event("246810")
    async with event_log(amqp_url) as events:
        await publish_event(amqp_url, body, body)  # both may be in flight at once
        await notifier.wait_handled(2)
        await publish_event(amqp_url, body)  # and one after the first was delivered
        await notifier.wait_handled(3)
        await events.wait_for(lambda e: e.named("code.delivered"))
    assert len(smtp.mails) == 1
    assert "246810" in smtp.mails[0].text
    delivered = events.named("code.delivered")
    assert len({d["event_id"] for d in delivered}) == 1, "republished under one event_id"


async def test_an_expired_code_is_not_sent(
    amqp_url: str, start_notifier: NotifierFactory, smtp: SmtpServer
) -> None:
    notifier = await start_notifier()
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    async with event_log(amqp_url) as events:
        await publish_event(amqp_url, crafted_event("135790", expires_at=past))
        await events.wait_for(lambda e: e.named("code.delivery_failed"))
    await notifier.wait_handled(1)
    failed = events.named("code.delivery_failed")[0]
    assert failed["reason"] == "expired"
    assert failed["attempts"] == 0
    assert smtp.mails == []


async def test_an_address_a_mail_header_would_read_differently_is_not_sent(
    amqp_url: str, start_notifier: NotifierFactory, smtp: SmtpServer
) -> None:
    # From an older worker or another producer: the worker refuses it at issue, but a mail
    # library reads victim@example.org out of this To header, past the destination's cap.
    await start_notifier()
    body = crafted_event("662607", destination="(x1)victim@example.org")
    async with event_log(amqp_url) as events:
        await publish_event(amqp_url, body)
        await events.wait_for(lambda e: e.named("code.delivery_failed"))
    [failed] = events.named("code.delivery_failed")
    assert failed["reason"] == "invalid_destination"
    assert failed["attempts"] == 0
    assert smtp.mails == []


async def test_channel_none_is_acknowledged_and_ignored(
    amqp_url: str, start_notifier: NotifierFactory, smtp: SmtpServer
) -> None:
    notifier = await start_notifier()
    async with event_log(amqp_url) as events:
        await publish_event(amqp_url, crafted_event("111222", channel="none", destination=None))
        await notifier.wait_handled(1)
    assert smtp.mails == []
    assert [b["event"] for b in events.bodies] == ["code.issued"]


async def test_dev_console_prints_the_code_and_only_there(
    amqp_url: str, start_notifier: NotifierFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    notifier = await start_notifier(notifier_console=True)
    with capture_logs() as logs:
        async with event_log(amqp_url) as events:
            await publish_event(amqp_url, crafted_event("975310"))
            await events.wait_for(lambda e: e.named("code.delivered"))
        await notifier.wait_handled(1)
    assert "975310" in capsys.readouterr().out
    assert_no_code_logged(logs, ["975310"])


async def test_sigkill_mid_batch_then_restart_delivers_every_code(
    amqp_url: str,
    database_url: str,
    tmp_path: Path,
    start_worker: WorkerFactory,
    smtp: SmtpServer,
) -> None:
    count, prefetch, hold_after = 200, 32, 60
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    await declare_exchanges(channel)
    await declare_queue(channel, NOTIFIER_QUEUE_SPEC)  # events queue up before the notifier runs
    await connection.close()

    await start_worker(reveal_clients="test-app", code_length=8)
    async with producer(amqp_url) as otp:
        replies = await asyncio.gather(
            *(
                otp.issue(
                    timeout=60,
                    user=f"user{i}",
                    reveal=True,
                    channel="email",
                    destination=f"user{i}@example.org",
                )
                for i in range(count)
            )
        )
    expected = {f"user{i}@example.org": r["code"] for i, r in enumerate(replies)}

    def delivered() -> set[str]:
        return {m.to[0] for m in smtp.mails if expected[m.to[0]] in m.text}

    env = worker_env(
        amqp_url,
        database_url,
        tmp_path / "var",
        OTP_SMTP_HOST="127.0.0.1",
        OTP_SMTP_PORT=str(smtp.port),
        OTP_NOTIFIER_PREFETCH=str(prefetch),
        OTP_NOTIFIER_BACKOFF_BASE_SECONDS=str(BACKOFF),
        OTP_NOTIFIER_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
        # The killed process leaves live claims: their copies wait out the lease, then go out.
        # 5 s: each of the 32 sends in flight must end within it, on a slow host too.
        OTP_NOTIFIER_CLAIM_LEASE_SECONDS="5",
    )
    log_path = tmp_path / "notifier.log"
    smtp.hold_after = hold_after
    first = start_process("worker.notifier", env, log_path)
    try:
        await smtp.wait_for(lambda: len(smtp.mails) >= hold_after, timeout=40)
        first.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait, 10)
        assert len(delivered()) < count, "the kill came after the batch: nothing was tested"
    finally:
        if first.poll() is None:
            first.kill()
        smtp.release()

    second = start_process("worker.notifier", env, log_path)
    try:
        await smtp.wait_for(lambda: len(delivered()) == count, timeout=50)
        second.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(second.wait, 30) == 0
    finally:
        if second.poll() is None:
            second.kill()
        await delete_retry_queues(amqp_url)

    duplicates = len(smtp.mails) - len(delivered())
    assert 0 <= duplicates <= prefetch
    log_text = log_path.read_text()
    assert "notifier consuming" in log_text
    for code in expected.values():
        assert not re.search(rf"\b{code}\b", log_text), "a plaintext code reached the log"


async def test_stop_finishes_the_delivery_in_flight(
    amqp_url: str, start_notifier: NotifierFactory, smtp: SmtpServer
) -> None:
    notifier = await start_notifier()
    smtp.hold_after = 0
    async with event_log(amqp_url) as events:
        await publish_event(amqp_url, crafted_event("864200"))
        await smtp.wait_for(lambda: smtp.held == 1)
        stopping = asyncio.create_task(notifier.stop())
        await asyncio.wait_for(notifier.draining.wait(), 10)  # consumer cancelled, mail held
        assert not stopping.done()
        smtp.release(accept=True)
        await stopping
        await events.wait_for(lambda e: e.named("code.delivered"))
    assert len(smtp.mails) == 1
    assert "864200" in smtp.mails[0].text


@pytest.mark.parametrize("starttls", [False, True])
async def test_a_login_without_starttls_is_warned_about_at_start(
    start_notifier: NotifierFactory, starttls: bool
) -> None:
    with capture_logs() as logs:
        await start_notifier(smtp_username="mailer", smtp_password="pw", smtp_starttls=starttls)
    warned = [e for e in logs if e["event"].startswith("SMTP login without STARTTLS")]
    assert len(warned) == (0 if starttls else 1)
