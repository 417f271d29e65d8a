"""The notifier's metrics, health and consumer watchdog, against a real broker and servers."""

from __future__ import annotations

import asyncio

from tests.integration.conftest import NotifierFactory
from tests.integration.notifier_support import SmtpServer, crafted_event, publish_event
from tests.integration.test_metrics import count, get, loop_lag_shows_a_stall, scrape, scrape_until
from tests.support import event_log
from worker.notifier.app import Notifier


async def _port(notifier: Notifier) -> int:
    assert notifier.metrics_port is not None
    return notifier.metrics_port


async def test_deliveries_are_counted_by_channel_and_result(
    amqp_url: str, start_notifier: NotifierFactory, smtp: SmtpServer
) -> None:
    notifier = await start_notifier(metrics_port=0, metrics_host="127.0.0.1")
    port = await _port(notifier)
    assert await get(port, "/healthz") == 200
    assert await get(port, "/readyz") == 200
    smtp.answers = ["451 4.3.0 busy"]
    past = "2000-01-01T00:00:00+00:00"
    async with event_log(amqp_url) as events:
        await publish_event(amqp_url, crafted_event("314159"))
        await publish_event(amqp_url, crafted_event("271828", expires_at=past))
        await events.wait_for(
            lambda e: e.named("code.delivered") and e.named("code.delivery_failed")
        )
    samples = await scrape_until(
        port,
        lambda s: (
            count(s, "otp_deliveries_total", default=0, channel="email", result="delivered") == 1
        ),
    )
    assert count(samples, "otp_deliveries_total", channel="email", result="retried") == 1
    assert count(samples, "otp_deliveries_total", channel="email", result="expired") == 1
    # Two SMTP sessions (the 451, then the success): the expired code never reached one.
    assert count(samples, "otp_delivery_duration_seconds_count", channel="email") == 2
    assert count(samples, "otp_delivery_duration_seconds_sum", channel="email") > 0
    await loop_lag_shows_a_stall(port)


async def test_readyz_fails_while_the_consumer_is_lost(
    amqp_url: str, start_notifier: NotifierFactory
) -> None:
    notifier = await start_notifier(
        metrics_port=0, metrics_host="127.0.0.1", consumer_check_seconds=3600
    )
    port = await _port(notifier)
    assert await get(port, "/readyz") == 200
    assert count(await scrape(port), "otp_notifier_consuming") == 1
    await _lose_consumer(notifier)
    assert await get(port, "/readyz") == 503
    assert await get(port, "/healthz") == 200
    assert ("otp_notifier_consuming", frozenset()) in (samples := await scrape(port))
    assert count(samples, "otp_notifier_consuming") == 0


async def _lose_consumer(notifier: Notifier) -> None:
    """What aio-pika #231/#626 leave behind: a live channel without our consumer."""
    watchdog = notifier._watchdog
    assert watchdog is not None and watchdog.tag is not None
    channel = await watchdog.queue.channel.get_underlay_channel()
    restores = notifier.consumer_restores
    await channel.basic_cancel(watchdog.tag)
    # Lost, unless a quick watchdog already found it lost and restored it.
    assert not await notifier.consuming() or notifier.consumer_restores > restores


async def test_a_lost_consumer_is_detected_and_restored(
    amqp_url: str, start_notifier: NotifierFactory, smtp: SmtpServer
) -> None:
    notifier = await start_notifier(consumer_check_seconds=0.2)
    assert await notifier.consuming()
    await _lose_consumer(notifier)
    async with asyncio.timeout(20):
        while notifier.consumer_restores < 1:
            await asyncio.sleep(0.05)
    async with event_log(amqp_url) as events:
        await publish_event(amqp_url, crafted_event("161803"))
        await events.wait_for(lambda e: e.named("code.delivered"))
    assert len(smtp.mails) == 1
    assert await notifier.consuming()
