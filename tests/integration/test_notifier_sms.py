"""How the notifier sorts an HTTP SMS gateway's failures, against a real HTTP server."""

from __future__ import annotations

import logging

import pytest

from tests.integration.conftest import MAX_ATTEMPTS, NotifierFactory
from tests.integration.notifier_support import Gateway, crafted_event, publish_event
from tests.support import EventLog, event_log
from worker.notifier.render import Sms
from worker.notifier.transports import HttpSmsTransport


def settled(events: EventLog) -> bool:
    return bool(events.named("code.delivered") or events.named("code.delivery_failed"))


@pytest.mark.parametrize("status", [400, 404])
async def test_a_gateway_4xx_fails_at_once_without_a_retry(
    amqp_url: str, start_notifier: NotifierFactory, gateway: Gateway, status: int
) -> None:
    # Enough refusals for every attempt: a retried 4xx would fail as retries_exhausted.
    gateway.statuses = [status] * MAX_ATTEMPTS
    notifier = await start_notifier(sms_gateway_url=gateway.url)
    async with event_log(amqp_url) as events:
        await publish_event(amqp_url, crafted_event("271828", channel="sms", destination="+49151"))
        await events.wait_for(settled)
        await notifier.wait_handled(1)
    assert gateway.hits == 1
    assert not events.named("code.delivered")
    [failed] = events.named("code.delivery_failed")
    assert failed["reason"] == f"sms_gateway_{status}"
    assert failed["attempts"] == 1
    assert notifier.handled == 1, "the message came back from a delay queue"


async def test_a_gateway_that_stalls_past_the_timeout_is_retried(
    amqp_url: str, start_notifier: NotifierFactory, gateway: Gateway
) -> None:
    gateway.stalls = 1  # never answered: only the timeout ends it, however long it is
    # The timeout bounds the retry's successful request too: 2 s, for a slow host.
    notifier = await start_notifier(sms_gateway_url=gateway.url, sms_timeout_seconds=2.0)
    async with event_log(amqp_url) as events:
        await publish_event(amqp_url, crafted_event("161803", channel="sms", destination="+49152"))
        await events.wait_for(settled)
        await notifier.wait_handled(2)
    assert notifier.handled == 2, "the retry came back from a delay queue"
    assert not events.named("code.delivery_failed")
    [delivered] = events.named("code.delivered")
    assert delivered["attempts"] == 2
    assert gateway.hits == 2
    assert gateway.hung_up == 1, "the notifier did not give up on the stalled request"
    [request] = gateway.requests
    assert "161803" in request["text"]


async def test_an_answer_whose_body_breaks_after_the_status_is_not_sent_again(
    amqp_url: str, start_notifier: NotifierFactory, gateway: Gateway
) -> None:
    # The gateway took the SMS and said 200; only its body failed to decode. Reading it as
    # a failure would send the SMS again on the retry.
    gateway.garbled = 1
    notifier = await start_notifier(sms_gateway_url=gateway.url)
    async with event_log(amqp_url) as events:
        await publish_event(amqp_url, crafted_event("314159", channel="sms", destination="+49153"))
        await events.wait_for(settled)
        await notifier.wait_handled(1)
    assert gateway.hits == 1 and gateway.garbled == 0
    [request] = gateway.requests
    assert "314159" in request["text"]
    [delivered] = events.named("code.delivered")
    assert delivered["attempts"] == 1
    assert notifier.handled == 1, "the message came back from a delay queue"


async def test_the_gateway_url_and_its_credentials_stay_out_of_the_logs(gateway: Gateway) -> None:
    """The URL is where a gateway's credentials go; httpx logs each request's URL at INFO."""
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    capture = Capture()
    logging.getLogger().addHandler(capture)
    try:
        url = f"http://gw-user:gw-pass-XYZ@127.0.0.1:{gateway.port}/sms?apikey=gw-key-XYZ"
        sms = HttpSmsTransport(url, timeout=5)
        await sms.send_sms("+49151", Sms(text="your code"), "code-1")
        await sms.close()
    finally:
        logging.getLogger().removeHandler(capture)
    assert gateway.hits == 1
    assert not [line for line in records if "XYZ" in line]
