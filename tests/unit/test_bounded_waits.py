"""Nothing waits unbounded on a channel that died: not a shutdown on a publish that ignores
its cancel, not a batch on an ack sent while its connection was dying.

No broker: stub channels stand in for aiormq's, whose frames can be stuck on a connection
that is neither alive nor closed. What is checked is our waiting, not AMQP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pamqp.frame
import pytest
from aio_pika import IncomingMessage
from aiormq import spec
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import ChannelInvalidStateError, DeliveryError
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from worker.amqp import Outgoing, Publisher, json_properties
from worker.relay import OutboxRelay
from worker.settlement import Settlement, reject, requeue_all
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


class BufferedChannel:
    """An aiormq channel, as far as the publisher's batched paths look at one: a bounded
    write queue (the connection's holds 10 items) and, for confirms, the lock, the delivery
    tags and the confirmations that aiormq's reader resolves."""

    is_closed = False
    number = 3
    max_content_size = 10

    def __init__(self, *, confirms: bool = False) -> None:
        self.publisher_confirms = confirms
        self.write_queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
        self.lock = asyncio.Lock()
        self.delivery_tag = 0
        self.confirmations: dict[int, asyncio.Future[Any]] = {}

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def get_underlay_channel(self) -> BufferedChannel:
        return self


def message() -> Outgoing:
    return "otp.events", "code.issued", b"{}", json_properties(type="code.issued")


async def test_publish_confirmed_reports_missing_confirms_when_its_time_is_up() -> None:
    channel = BufferedChannel(confirms=True)
    publisher = Publisher(channel)  # type: ignore[arg-type]
    async with asyncio.timeout(5):
        outcomes = await publisher.publish_confirmed([message(), message()], timeout=0.05)
    assert [type(o) for o in outcomes] == [TimeoutError, TimeoutError]
    assert channel.write_queue.qsize() == 1  # both in one item
    assert sorted(channel.confirmations) == [1, 2] and channel.delivery_tag == 2


async def test_publish_confirmed_reports_each_message_s_confirm_or_nack() -> None:
    channel = BufferedChannel(confirms=True)
    publisher = Publisher(channel)  # type: ignore[arg-type]
    publishing = asyncio.create_task(publisher.publish_confirmed([message(), message()], timeout=5))
    async with asyncio.timeout(5):
        await channel.write_queue.get()  # what the connection's writer would send
    channel.confirmations[1].set_result(spec.Basic.Ack(delivery_tag=1))
    nack = DeliveryError(None, spec.Basic.Nack(delivery_tag=2))
    channel.confirmations[2].set_exception(nack)
    assert await publishing == [None, nack]


async def test_publish_confirmed_with_no_room_in_time_takes_no_delivery_tag() -> None:
    """The writer is stuck (a dying connection): nothing was queued, so no confirm is
    registered, and the next publish's tags are the ones the broker will use."""
    channel = BufferedChannel(confirms=True)
    channel.write_queue.put_nowait("stuck")
    publisher = Publisher(channel)  # type: ignore[arg-type]
    async with asyncio.timeout(5):
        outcomes = await publisher.publish_confirmed([message(), message()], timeout=0.05)
    assert [type(o) for o in outcomes] == [TimeoutError, TimeoutError]
    assert channel.delivery_tag == 0 and channel.confirmations == {}
    assert channel.write_queue.qsize() == 1


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


class DyingChannel(Stubborn):
    """aiormq's channel in the moment its connection dies: it still says open, so an ack
    passes the check and then waits for room in a write queue nobody drains any more (it
    is full: with room, the ack would be queued without waiting)."""

    class Connection:
        basic_nack = True

    def __init__(self) -> None:
        super().__init__()
        self.connection = self.Connection()
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.acks: list[tuple[int, bool]] = []
        self.write_queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
        self.write_queue.put_nowait("stuck")

    @property
    def is_closed(self) -> bool:
        return self._closed.done()

    @property
    def closing(self) -> asyncio.Future[None]:
        observer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closed.add_done_callback(lambda _: observer.done() or observer.set_result(None))
        return observer

    def close(self) -> None:
        self._closed.set_result(None)

    async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.acks.append((delivery_tag, multiple))
        await self.hang()

    async def basic_reject(self, delivery_tag: int, *, requeue: bool = True) -> None:
        await self.hang()

    async def basic_nack(
        self, delivery_tag: int, multiple: bool = False, requeue: bool = True
    ) -> None:
        await self.hang()


async def ends_in_time(task: asyncio.Future[None], channel: DyingChannel) -> None:
    """Fails, rather than hangs, when ``task`` keeps waiting for the stuck frame."""
    done, _ = await asyncio.wait({task}, timeout=5)
    channel.release.set()
    assert task in done, "still waiting on a closed channel"
    task.result()


def delivery(channel: Any, tag: int) -> IncomingMessage:
    deliver = spec.Basic.Deliver(consumer_tag="c", delivery_tag=tag, routing_key="code.issue")
    header = ContentHeader(properties=spec.Basic.Properties())
    return IncomingMessage(DeliveredMessage(deliver, header, b"{}", channel))


async def test_an_ack_stuck_on_a_dying_channel_ends_when_the_channel_closes() -> None:
    channel = DyingChannel()
    settlement = Settlement()
    for tag in (1, 2, 3):
        settlement.ack(delivery(channel, tag))
    flushing = asyncio.ensure_future(settlement.flush())
    await channel.entered.wait()
    assert channel.acks == [(3, True)]
    channel.close()
    await ends_in_time(flushing, channel)
    assert channel.cancels == 1


class OpenChannel:
    """An open channel whose write queue has room: what a batch's ack meets nearly always."""

    is_closed = False

    def __init__(self) -> None:
        self.write_queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=10)
        self.acks: list[tuple[int, bool, bool]] = []

    async def basic_ack(self, delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        self.acks.append((delivery_tag, multiple, wait))


async def test_an_ack_with_room_in_the_write_queue_is_queued_without_waiting() -> None:
    channel = OpenChannel()
    settlement = Settlement()
    for tag in (1, 2, 3):
        settlement.ack(delivery(channel, tag))
    async with asyncio.timeout(5):
        await settlement.flush()
    assert channel.acks == [(3, True, False)]  # one multiple ack, not waiting for the drain


async def test_a_requeue_stuck_on_a_dying_channel_ends_when_the_channel_closes() -> None:
    channel = DyingChannel()
    requeueing = asyncio.ensure_future(requeue_all([delivery(channel, 1), delivery(channel, 2)]))
    await channel.entered.wait()
    channel.close()
    await ends_in_time(requeueing, channel)
    assert channel.cancels == 1  # the second delivery's channel was closed: nothing sent


async def test_deliveries_on_a_closed_channel_are_left_to_the_broker() -> None:
    closed, live = DyingChannel(), DyingChannel()
    closed.close()
    live.release.set()
    settlement = Settlement()
    settlement.ack(delivery(closed, 7))
    settlement.ack(delivery(live, 2))
    await ends_in_time(asyncio.ensure_future(settlement.flush()), closed)
    assert closed.acks == []
    assert live.acks == [(2, True)]


async def test_a_single_reject_reports_the_channel_that_closed_under_it() -> None:
    channel = DyingChannel()
    rejecting = asyncio.ensure_future(reject(delivery(channel, 4), requeue=False))
    await channel.entered.wait()
    channel.close()
    with pytest.raises(ChannelInvalidStateError):
        await ends_in_time(rejecting, channel)
    assert channel.cancels == 1


async def test_a_batch_without_confirms_is_one_item_of_the_bounded_write_queue() -> None:
    """One item however many replies: a batch of 256 does not wait on the writer 256 times
    (the queue holds 10 items), and each body is split at the channel's content size."""
    channel = BufferedChannel()
    properties = json_properties(type="IssueResult", correlation_id="c", persistent=False)
    batch: list[Outgoing] = [("", "r1", b"a" * 25, properties), ("", "r2", b"", properties)]
    async with asyncio.timeout(5):
        await Publisher(channel).publish_many(batch, timeout=1)  # type: ignore[arg-type]
    sent = channel.write_queue.get_nowait()
    frames = [
        spec.Basic.Publish(exchange="", routing_key="r1"),
        ContentHeader(properties=properties, body_size=25),
        *(ContentBody(chunk) for chunk in (b"a" * 10, b"a" * 10, b"a" * 5)),
        spec.Basic.Publish(exchange="", routing_key="r2"),
        ContentHeader(properties=properties, body_size=0),
    ]
    assert sent.payload == b"".join(pamqp.frame.marshal(frame, 3) for frame in frames)
    assert sent.drain_future is None
