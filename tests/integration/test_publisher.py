"""The publisher's batched paths, on the real broker: a batch leaves as one write, its frames
intact, and a confirmed batch's acks and nacks land on the right messages."""

from __future__ import annotations

import asyncio

import aio_pika
import pytest
from aiormq.exceptions import ChannelInvalidStateError, DeliveryError

from worker.amqp import Outgoing, Publisher, json_properties


def reply(queue: str, n: int, body: bytes) -> Outgoing:
    properties = json_properties(type="IssueResult", correlation_id=f"c{n}", persistent=False)
    return "", queue, body, properties


async def test_a_batch_without_confirms_arrives_whole_and_in_order(amqp_url: str) -> None:
    # One body over the broker's frame size (128 KiB), so it leaves in several body frames.
    bodies = [b'{"n": %d}' % n for n in range(300)]
    bodies[150] = b'{"big": "' + b"x" * 300_000 + b'"}'
    async with await aio_pika.connect(amqp_url) as connection:
        queue = await (await connection.channel()).declare_queue(exclusive=True)
        publishing = await connection.channel(publisher_confirms=False)
        await Publisher(publishing).publish_many(
            [reply(queue.name, n, body) for n, body in enumerate(bodies)], timeout=10
        )
        got: list[aio_pika.abc.AbstractIncomingMessage] = []
        async with asyncio.timeout(10), queue.iterator() as messages:
            async for message in messages:
                got.append(message)
                await message.ack()
                if len(got) == len(bodies):
                    break
    assert [m.body for m in got] == bodies
    assert [m.correlation_id for m in got] == [f"c{n}" for n in range(300)]
    assert {(m.type, m.content_type, m.delivery_mode) for m in got} == {
        ("IssueResult", "application/json", aio_pika.DeliveryMode.NOT_PERSISTENT)
    }
    assert len({m.message_id for m in got}) == 300


async def test_a_batch_on_a_closed_channel_is_refused(amqp_url: str) -> None:
    """Refused, not written: the consumer requeues the batch, and a frame on a closed channel
    would make the broker close the whole connection."""
    async with await aio_pika.connect(amqp_url) as connection:
        publishing = await connection.channel(publisher_confirms=False)
        underlay = await publishing.get_underlay_channel()
        await underlay.close()
        with pytest.raises(ChannelInvalidStateError):
            await Publisher(publishing).publish_many([reply("nowhere", 0, b"{}")], timeout=5)


async def test_a_confirmed_batch_gets_each_message_s_own_answer(amqp_url: str) -> None:
    """The broker acks what its queue takes and nacks what it refuses: each outcome lands on
    its own message, so the delivery tags were counted as the broker counts them."""
    async with await aio_pika.connect(amqp_url) as connection:
        declaring = await connection.channel()
        full = {"x-max-length": 2, "x-overflow": "reject-publish"}
        queue = await declaring.declare_queue(exclusive=True, arguments=full)
        publisher = Publisher(await connection.channel(publisher_confirms=True))
        first = await publisher.publish_confirmed(
            [reply(queue.name, n, b"{}") for n in range(5)], timeout=10
        )
        assert first[:2] == [None, None]
        assert all(isinstance(outcome, DeliveryError) for outcome in first[2:])
        await queue.purge()
        again = await publisher.publish_confirmed(
            [reply(queue.name, n, b"{}") for n in range(3)], timeout=10
        )
        assert again[:2] == [None, None] and isinstance(again[2], DeliveryError)
        assert (await queue.get()).correlation_id == "c0"
