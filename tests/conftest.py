"""Shared fixtures: one RabbitMQ vhost per test run, cleaned between tests; fresh databases."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from contracts.topology import (
    COMMAND_QUEUE,
    DEAD_LETTER_QUEUE,
    EXCHANGES,
    NOTIFIER_QUEUE,
    UNDELIVERABLE_QUEUE,
)
from tests.databases import BACKENDS, temporary_database
from tests.support import (
    AUDIT,
    TEST_DELIVERY_KEY,
    TEST_SECRET_KEY,
    create_vhost,
    delete_vhost,
    start_process,
)
from worker.app import Worker
from worker.log import configure
from worker.settings import Keys, Settings

SERVICE_QUEUES = (COMMAND_QUEUE, DEAD_LETTER_QUEUE, NOTIFIER_QUEUE, UNDELIVERABLE_QUEUE)

# A slow, shared CI host stretches single examples past Hypothesis's 200 ms deadline and trips
# its too_slow check: neither says anything about the code under test.
hypothesis_settings.register_profile(
    "slow-host", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
hypothesis_settings.load_profile("slow-host")


@pytest.fixture(scope="session")
def vhost_url() -> Iterator[str]:
    name = f"otp-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    url = create_vhost(name)
    try:
        yield url
    finally:
        delete_vhost(name)


async def _reset_vhost(url: str) -> None:
    """Deletes every queue and exchange the service declares, so each test starts bare."""
    connection = await aio_pika.connect(url)
    try:
        for name in SERVICE_QUEUES:
            channel = await connection.channel()
            with contextlib.suppress(Exception):  # absent is as good as deleted
                await channel.queue_delete(name)
            if not channel.is_closed:
                await channel.close()
        channel = await connection.channel()
        for spec in EXCHANGES:
            await channel.exchange_delete(spec.name)
        await channel.close()
    finally:
        await connection.close()


@pytest.fixture
async def amqp_url(vhost_url: str) -> AsyncIterator[str]:
    await _reset_vhost(vhost_url)
    yield vhost_url
    await _reset_vhost(vhost_url)


@pytest.fixture(params=BACKENDS)
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Every test that touches the store runs once per backend."""
    async with temporary_database(request.param, tmp_path) as url:
        yield url


def make_settings(amqp_url: str, database_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "amqp_url": amqp_url,
        "database_url": database_url,
        "secret_key": TEST_SECRET_KEY,
        "delivery_key": TEST_DELIVERY_KEY,
        "var_dir": tmp_path / "var",
        "log_format": "json",
        "resend_cooldown_seconds": 0,
        "max_sends_per_scope_per_hour": 1000,
        "max_sends_per_destination_per_hour": 1000,
        "max_consecutive_failures": 100,
        "consumer_check_seconds": 0.5,
        "outbox_lease_seconds": 3,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


WorkerFactory = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def start_worker(
    amqp_url: str, database_url: str, tmp_path: Path
) -> AsyncIterator[WorkerFactory]:
    """Starts in-process workers against this test's vhost and database; stops them after."""
    started: list[Worker] = []

    async def factory(clock: Callable[[], datetime] | None = None, **overrides: Any) -> Worker:
        url = overrides.pop("amqp_url", amqp_url)
        settings = make_settings(url, database_url, tmp_path, **overrides)
        worker = Worker(settings, Keys(settings), clock=clock) if clock else Worker(settings)
        await worker.start()
        started.append(worker)
        return worker

    yield factory
    for worker in started:
        await worker.stop()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Starts ``python -m <module>`` subprocesses; kills leftovers at teardown."""
    processes: list[subprocess.Popen[bytes]] = []

    def factory(
        module: str, env: dict[str, str], log_name: str = "process.log"
    ) -> subprocess.Popen[bytes]:
        process = start_process(module, env, tmp_path / log_name)
        processes.append(process)
        return process

    yield factory
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


@pytest.fixture(scope="session", autouse=True)
def audited_logs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """In-process workers log JSON at debug level into the session's folder, for the audit."""
    path = tmp_path_factory.getbasetemp() / "in-process.log"
    with path.open("a", encoding="utf-8") as stream:
        configure("json", "debug", stream=stream)
        # The tests' own SMTP server is the user's mailbox: of course it sees codes.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
        yield path


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fails the run if any log line of the whole suite holds a code or a full destination."""
    basetemp = session.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    leaks = audit_log_files(sorted(Path(basetemp).rglob("*.log")), AUDIT.codes, AUDIT.destinations)
    if leaks:
        session.exitstatus = 1
        print(f"\nLOG AUDIT FAILED: {len(leaks)} leak(s), e.g. {leaks[:3]}")


def audit_log_files(files: list[Path], codes_seen: set[str], destinations: set[str]) -> list[str]:
    codes = sorted(codes_seen, key=len, reverse=True)
    leaks: list[str] = []
    if not files or not (codes or destinations):
        return leaks
    pattern = (
        re.compile("(?<![0-9A-Za-z.:_-])(?:" + "|".join(map(re.escape, codes)) + ")(?![0-9A-Za-z])")
        if codes
        else None
    )
    for file in files:
        if file.name.endswith(".console.log"):  # the dev console transport's output IS delivery
            continue
        text = file.read_text(errors="replace")
        if pattern is not None and (found := pattern.search(text)):
            leaks.append(f"{file.name}: code {found.group(0)}")
        leaks.extend(f"{file.name}: {d}" for d in destinations if d in text)
    return leaks
