"""``python -m worker.notifier``: the notification consumer. SIGTERM finishes in-flight work."""

from __future__ import annotations

import asyncio
import signal
import sys

from worker.__main__ import run, start_or_stop
from worker.log import configure, get_logger
from worker.settings import Keys, load_settings


async def _serve() -> None:
    from worker.notifier.app import Notifier

    settings = load_settings()
    configure(settings.log_format, settings.log_level)
    notifier = Notifier(settings, Keys(settings, need_secret=False))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if not await start_or_stop(notifier, settings, stop):
        return
    try:
        await stop.wait()
    finally:
        get_logger("worker.notifier").info("stopping")
        await notifier.stop()


if __name__ == "__main__":
    sys.exit(
        run(
            _serve,
            "python -m worker.notifier",
            "The notification consumer: delivers code.issued events by e-mail or SMS and "
            "publishes their outcomes. SIGTERM lets the deliveries in flight finish and "
            "exits 0.",
        )
    )
