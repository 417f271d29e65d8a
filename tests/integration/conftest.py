"""The notifier's fixtures: real SMTP and HTTP servers, and in-process notifiers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from tests.conftest import make_settings
from tests.integration.notifier_support import Gateway, SmtpServer
from worker.notifier.app import Notifier
from worker.notifier.retry import retry_queue_specs
from worker.settings import Keys, Settings

BACKOFF = 0.05
MAX_ATTEMPTS = 4
MOST_ATTEMPTS: int = next(
    m.le for m in Settings.model_fields["notifier_max_attempts"].metadata if hasattr(m, "le")
)
NotifierFactory = Callable[..., Awaitable[Notifier]]


@pytest.fixture
async def smtp() -> AsyncIterator[SmtpServer]:
    server = SmtpServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    gw = Gateway()
    await gw.start()
    yield gw
    await gw.stop()


async def delete_retry_queues(url: str) -> None:
    """The shared fixtures know only the service's queues; the delay queues go here: every
    tier a notifier of these tests may declare, with the tests' backoff or the default, up
    to the most attempts the settings allow (a test that keeps the default of 5 declares a
    fifth tier), so none is left to route a parked message into a later test's queue."""
    tiers = {
        spec.name: spec
        for base in (BACKOFF, Settings.model_fields["notifier_backoff_base_seconds"].default)
        for spec in retry_queue_specs(MOST_ATTEMPTS, base).values()
    }
    connection = await aio_pika.connect(url)
    try:
        for spec in tiers.values():
            channel = await connection.channel()
            await channel.queue_delete(spec.name)
            await channel.close()
    finally:
        await connection.close()


@pytest.fixture
async def start_notifier(
    amqp_url: str, database_url: str, tmp_path: Path, smtp: SmtpServer
) -> AsyncIterator[NotifierFactory]:
    started: list[Notifier] = []

    async def factory(**overrides: Any) -> Notifier:
        values: dict[str, Any] = {
            "smtp_host": "127.0.0.1",
            "smtp_port": smtp.port,
            "notifier_backoff_base_seconds": BACKOFF,
            "notifier_max_attempts": MAX_ATTEMPTS,
        }
        values.update(overrides)
        url = values.pop("amqp_url", amqp_url)  # e.g. through a proxy the test cuts
        settings = make_settings(url, database_url, tmp_path, **values)
        notifier = Notifier(settings, Keys(settings, need_secret=False))
        await notifier.start()
        started.append(notifier)
        return notifier

    yield factory
    for notifier in started:
        await notifier.stop()
    await delete_retry_queues(amqp_url)
