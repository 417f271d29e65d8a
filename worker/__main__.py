"""``python -m worker``: the command worker. SIGTERM finishes in-flight work and exits 0."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Protocol
from urllib.parse import urlsplit

from aiormq.exceptions import AMQPConnectionError, ChannelAccessRefused, ChannelPreconditionFailed

from worker.log import configure, get_logger
from worker.log import flush as flush_logs
from worker.loop import run as run_loop
from worker.settings import ConfigError, Keys, Settings, load_settings
from worker.store.base import StoreRefused, TransientStoreError


class StartupError(Exception):
    """The process cannot start (e.g. no broker); the message is one line."""


def broker_address(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5672}{parts.path}"


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def start_or_stop(service: Service, settings: Settings, stop: asyncio.Event) -> bool:
    """Starts ``service``; if that fails, stops what it had opened before raising.

    Without the stop, a failed start hangs instead of exiting: an open SQLite store keeps
    aiosqlite's (non-daemon) thread, and with it the process, alive after the loop ends.
    Failures an operator causes become a ``StartupError``: one line, exit 1.

    ``stop`` (set by SIGTERM) cancels a start still under way, which may be waiting on a
    broker that does not answer: then what it had opened is closed, and the result is
    False, for the entry point to exit 0 without serving.
    """
    starting = asyncio.ensure_future(service.start())
    stopping = asyncio.ensure_future(stop.wait())
    interrupted = False
    try:
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not starting.done():
                interrupted = True  # whatever the start ends with now, the cancel caused it
                starting.cancel()
                await asyncio.wait({starting})
        if interrupted and stop.is_set():
            await service.stop()
            get_logger(__name__).info("stopped before it had started")
            flush_logs()
            return False
        starting.result()
    except BaseException as exc:
        await service.stop()
        flush_logs()
        reason = startup_failure(exc, settings)
        if reason is None:
            raise
        raise StartupError(reason) from None
    return True


def startup_failure(exc: BaseException, settings: Settings) -> str | None:
    """The one line for a start that failed for a reason outside the code, else None."""
    if isinstance(exc, AMQPConnectionError):
        return f"cannot reach the broker at {broker_address(settings.amqp_url)}: {exc}"
    if isinstance(exc, ChannelPreconditionFailed):
        return (
            f"the broker refused the topology: {exc} (a queue or exchange exists with other "
            "arguments; see 'Changing queue arguments' in the README)"
        )
    if isinstance(exc, ChannelAccessRefused):
        return f"the broker refused access: {exc}"
    if isinstance(exc, TransientStoreError | StoreRefused):
        return f"cannot open the store: {exc}"
    if isinstance(exc, OSError):
        return f"cannot start: {exc}"
    return None


async def _serve() -> None:
    from worker.app import Worker

    settings = load_settings()
    configure(settings.log_format, settings.log_level, buffered=True)
    worker = Worker(settings, Keys(settings))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if not await start_or_stop(worker, settings, stop):
        return
    try:
        while not stop.is_set():  # lines logged between batches go out within a moment
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
            flush_logs()
    finally:
        get_logger("worker").info("stopping")
        await worker.stop()
        flush_logs()


def run(main: Callable[[], Coroutine[Any, Any, None]], prog: str, summary: str) -> int:
    """Runs an entry point's coroutine with uvloop; a config error is one line and exit 2.

    The processes take no arguments, but ``--help`` answers instead of starting a service
    (which would open the store and consume from the configured broker), and any other
    argument is refused (exit 2)."""
    argparse.ArgumentParser(
        prog=prog,
        description=summary,
        epilog="Configured by OTP_* environment variables (and a .env file): see the "
        "README's Configuration section. `otp check` checks a running service.",
    ).parse_args()
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
    sys.exit(
        run(
            _serve,
            "python -m worker",
            "The one-time-code command worker: consumes code.issue and code.confirm, keeps the "
            "codes' state, replies, and publishes events. SIGTERM finishes the work in "
            "flight and exits 0.",
        )
    )
