"""Shutdown paths never wait unbounded on a publish that ignores its cancel.

No broker: a stub channel stands in for aiormq's, whose publishes can be stuck on a
connection that is neither alive nor closed. What is checked is our waiting, not AMQP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from worker.amqp import Outgoing, Publisher, json_properties
from worker.relay import OutboxRelay
from worker.store.base import OutboxEvent, OutboxRow


class Stubborn:
    """Awaitables that take one cancel without ending: they end when released, or on a
    second cancel (so a regression fails the test instead of hanging the run)."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.cancels = 0

    async def hang(self) -> None:
        self.entered.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancels += 1
            await self.release.wait()


class StubbornChannel(Stubborn):
    async def get_underlay_channel(self) -> StubbornChannel:
        return self

    def basic_publish(self, body: bytes, **_: Any) -> Any:
        return self.hang()


def message() -> Outgoing:
    return "otp.events", "code.issued", b"{}", json_properties(type="code.issued")


async def test_publish_confirmed_reports_a_stuck_publish_instead_of_waiting_for_it() -> None:
    channel = StubbornChannel()
    publisher = Publisher(channel)  # type: ignore[arg-type]
    async with asyncio.timeout(5):
        outcomes = await publisher.publish_confirmed([message(), message()], timeout=0.05)
    assert [type(o) for o in outcomes] == [TimeoutError, TimeoutError]
    assert channel.cancels == 2
    channel.release.set()


class StubbornPublisher(Stubborn):
    async def publish_confirmed(
        self, messages: Sequence[Outgoing], *, timeout: float
    ) -> list[BaseException | None]:
        await self.hang()
        raise asyncio.CancelledError  # released: end as the cancelled relay would


async def test_relay_stop_gives_up_on_a_relay_that_does_not_end() -> None:
    publisher = StubbornPublisher()
    relay = OutboxRelay(
        store=None,  # type: ignore[arg-type]  # never reached: the publish does not end
        publisher=publisher,  # type: ignore[arg-type]
        publish_timeout=1.0,
        lease_seconds=60.0,
    )
    relay.start()
    relay.submit([OutboxRow(1, OutboxEvent("e-1", "code.issued", b"{}", "code.issued"))])
    await publisher.entered.wait()
    async with asyncio.timeout(5):
        await relay.stop(timeout=0.05)
    assert publisher.cancels == 1
    assert relay._task is not None and not relay._task.done()
    publisher.release.set()
    await asyncio.wait([relay._task])
    assert relay._task.cancelled()
