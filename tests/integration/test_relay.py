"""The outbox relay against a broker that refuses events: nothing is dropped, nothing stuck."""

from __future__ import annotations

import asyncio

import aio_pika

from contracts.topology import EVENTS_EXCHANGE
from tests.conftest import WorkerFactory
from tests.support import event_log, producer


async def test_an_event_the_broker_refuses_stays_in_the_outbox_until_it_is_taken(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    """A full queue with ``reject-publish`` makes the broker nack every event: the relay keeps
    the row and, once the queue is gone, publishes it on its next scan for leftovers."""
    worker = await start_worker(outbox_lease_seconds=1)
    assert worker.store is not None
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        refuser = await channel.declare_queue(
            "refuses-events", arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        await refuser.bind(EVENTS_EXCHANGE, "#")
        async with event_log(amqp_url) as events, producer(amqp_url) as otp:
            issued = await otp.issue(user="refused")
            # Copies reach the other queue each time the broker nacks: at-least-once.
            await events.wait_for(lambda e: len(e.named("code.issued")) >= 2)
            assert await worker.store.outbox_backlog() == 1
            await refuser.delete(if_unused=False, if_empty=False)
            async with asyncio.timeout(15):
                while await worker.store.outbox_backlog():
                    await asyncio.sleep(0.05)
            copies = [b for b in events.named("code.issued") if b["user"] == "refused"]
            assert {b["code_id"] for b in copies} == {issued["code_id"]}
            assert len({m.message_id for m in events.messages}) == 1  # one event, repeated
    finally:
        await connection.close()
