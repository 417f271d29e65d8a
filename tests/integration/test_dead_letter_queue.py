"""``otp.dead-letter`` as CONTRACT.md names it: a durable queue that others may declare too."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import orjson
import pytest
from structlog.testing import capture_logs

from contracts.topology import DEAD_LETTER_QUEUE, ERROR_TYPE_HEADER, REDACTED_HEADER
from tests.conftest import WorkerFactory
from tests.support import producer, queued_commands
from worker.deadletters import list_dead_letters, replay_dead_letters

QUORUM = {"x-queue-type": "quorum"}


async def test_a_foreign_client_declares_it_as_the_contract_names_it(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    """A plain durable declare, as an acceptance suite written from the contract would do,
    matches the worker's queue, and finds in it what the worker dead-letters."""
    await start_worker()
    body = {"command_id": "dl-foreign", "user": "u", "client": "c", "code": "424242", "x": 1}
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        # Passive first: the worker declared it, not the plain declare below.
        await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
        queue = await channel.declare_queue(DEAD_LETTER_QUEUE, durable=True)
        async with producer(amqp_url) as otp:
            assert (await otp.call("code.confirm", body))["status"] == "rejected"
        dead = await queue.get(no_ack=True, timeout=5)
    finally:
        await connection.close()
    assert orjson.loads(dead.body) == {**body, "code": "[redacted]"}
    assert dead.headers[REDACTED_HEADER] == "code"
    assert dead.headers[ERROR_TYPE_HEADER] == "validation_error"


@pytest.mark.parametrize("arguments", [QUORUM, {}], ids=["quorum", "plain"])
async def test_a_dead_letter_queue_declared_before_is_used_as_it_is(
    amqp_url: str, start_worker: WorkerFactory, arguments: dict[str, Any]
) -> None:
    """Earlier versions declared it as a quorum queue; someone else may have declared it
    plain. Either way the worker starts and dead-letters into it, and leaves it as it was."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(DEAD_LETTER_QUEUE, durable=True, arguments=arguments)
        with capture_logs() as logs:
            await start_worker()
        adopted = [
            e for e in logs if e["log_level"] == "warning" and e.get("queue") == DEAD_LETTER_QUEUE
        ]
        assert len(adopted) == (1 if arguments else 0), adopted
        async with producer(amqp_url) as otp:
            assert (await otp.call("code.issue", b"{"))["status"] == "rejected"
        # A passive declare is not enough: only the same arguments prove the queue unchanged.
        queue = await channel.declare_queue(DEAD_LETTER_QUEUE, durable=True, arguments=arguments)
        dead = await queue.get(no_ack=True, timeout=5)
    finally:
        await connection.close()
    assert dead.body == b"{"
    assert dead.headers[ERROR_TYPE_HEADER] == "invalid_json"


async def park_rejected(amqp_url: str, count: int) -> list[str]:
    """``count`` issues with a field the contract does not know: each is rejected and parked.
    Their command_ids."""
    async with producer(amqp_url) as otp:
        replies = [await otp.issue(user=f"parked-{n}", extra="x") for n in range(count)]
    assert {r["status"] for r in replies} == {"rejected"}
    return [r["command_id"] for r in replies]


async def test_a_replayed_dead_letter_leaves_the_queue(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    # The walk ends at once on the one it was asked for; its ack used to be queued without
    # waiting, and the close that followed dropped it: the copy went out, the dead letter
    # stayed, and every replay of it queued one more copy.
    worker = await start_worker()
    [command_id] = await park_rejected(amqp_url, 1)
    await worker.stop()
    first = await replay_dead_letters(amqp_url, wanted=command_id, limit=100, timeout=10)
    assert [letter.command_id for letter in first.replayed] == [command_id]
    again = await replay_dead_letters(amqp_url, wanted=command_id, limit=100, timeout=10)
    assert not again.found, "the dead letter was still there after its replay"
    assert await list_dead_letters(amqp_url, limit=100, timeout=10) == []
    assert await queued_commands(amqp_url) == 1


async def test_replaying_all_replays_each_dead_letter_once(
    amqp_url: str, start_worker: WorkerFactory
) -> None:
    # The worker rejects the copies again, and they land at the queue's tail: a walk that
    # went on fetching replayed them again and again, up to its limit.
    await start_worker()
    command_ids = await park_rejected(amqp_url, 3)
    report = await replay_dead_letters(amqp_url, wanted=None, limit=50, timeout=10)
    assert sorted(letter.command_id or "" for letter in report.replayed) == sorted(command_ids)
    async with asyncio.timeout(20):  # the copies come back, rejected once more
        while len(letters := await list_dead_letters(amqp_url, limit=50, timeout=10)) < 3:
            await asyncio.sleep(0.05)
    assert sorted(letter.replays for letter in letters) == [1, 1, 1]
