"""The first consume survives the broker closing the connection under it, and nothing else.

No broker: a stub queue raises what aiormq raises when RabbitMQ 3.10 answers basic.consume on
a quorum queue whose leader is still starting (541 INTERNAL_ERROR closes the connection), and
then, as the robust channel does while it waits for the connection, that it is not open.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiormq.exceptions import (
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ConnectionInternalError,
)

from worker import watchdog
from worker.watchdog import ConsumerWatchdog, consume_at_start


class FlakyQueue:
    """Raises the given errors, one per consume, then registers the consumer."""

    name = "otp.worker.commands"

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.consumers: list[Any] = []

    async def consume(self, callback: Any, timeout: float | None = None) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        self.consumers.append(callback)
        return f"ctag-{self.calls}"


def internal_error() -> ConnectionInternalError:
    return ConnectionInternalError(541, "INTERNAL_ERROR")


@pytest.fixture(autouse=True)
def short_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watchdog, "RETRY_PAUSE_SECONDS", 0.01)


async def on_message(message: Any) -> None:
    raise AssertionError("no message is delivered here")


async def test_consumes_again_once_the_connection_is_back() -> None:
    queue = FlakyQueue(internal_error(), ChannelInvalidStateError("closed"))
    tag = await consume_at_start(queue, on_message)  # type: ignore[arg-type]
    assert tag == "ctag-3"
    assert queue.consumers == [on_message]


async def test_the_watchdog_starts_through_the_same_retry() -> None:
    queue = FlakyQueue(internal_error())
    dog = ConsumerWatchdog(queue, on_message, connection=None, interval=3600)  # type: ignore[arg-type]
    await dog.start()
    try:
        assert dog.tag == "ctag-2"
        assert len(queue.consumers) == 1
    finally:
        await dog.stop()


async def test_gives_up_with_the_brokers_error_when_it_keeps_closing() -> None:
    queue = FlakyQueue(*(internal_error() for _ in range(1000)))
    with pytest.raises(ConnectionInternalError):
        # 1 s: a stall before the first error must not use up the whole time.
        await consume_at_start(queue, on_message, seconds=1.0)  # type: ignore[arg-type]
    assert 1 < queue.calls < 1000
    assert queue.consumers == []


async def test_a_missing_queue_is_reported_at_once() -> None:
    queue = FlakyQueue(ChannelNotFoundEntity(404, "NOT_FOUND - no queue"), internal_error())
    with pytest.raises(ChannelNotFoundEntity):
        await consume_at_start(queue, on_message)  # type: ignore[arg-type]
    assert queue.calls == 1
