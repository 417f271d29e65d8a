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
from worker.settings import Keys

BACKOFF = 0.05
MAX_ATTEMPTS = 4
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
    """The shared fixtures know only the service's queues; the delay queues go here."""
    connection = await aio_pika.connect(url)
    try:
        for spec in retry_queue_specs(MAX_ATTEMPTS, BACKOFF).values():
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
