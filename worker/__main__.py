"""``python -m worker``: the command worker. SIGTERM finishes in-flight work and exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

from aiormq.exceptions import AMQPConnectionError

from worker.log import configure, get_logger
from worker.log import flush as flush_logs
from worker.loop import run as run_loop
from worker.settings import ConfigError, Keys, load_settings


class StartupError(Exception):
    """The process cannot start (e.g. no broker); the message is one line."""


def broker_address(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5672}{parts.path}"


async def _serve() -> None:
    from worker.app import Worker

    settings = load_settings()
    configure(settings.log_format, settings.log_level, buffered=True)
    worker = Worker(settings, Keys(settings))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await worker.start()
    except (OSError, AMQPConnectionError) as exc:
        await worker.stop()
        flush_logs()
        raise StartupError(
            f"cannot reach the broker at {broker_address(settings.amqp_url)}: {exc}"
        ) from None
    try:
        while not stop.is_set():  # lines logged between batches go out within a moment
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
            flush_logs()
    finally:
        get_logger("worker").info("stopping")
        await worker.stop()
        flush_logs()


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Runs an entry point's coroutine with uvloop; a config error is one line and exit 2."""
    try:
        run_loop(main())
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run(_serve))
