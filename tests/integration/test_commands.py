"""Every status of both commands, through the real broker and a real SQLite file."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import WorkerFactory
from tests.support import Producer, event_log, producer


class Clock:
    """A clock the test moves; the worker reads it for every batch."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
async def otp(amqp_url: str, start_worker: WorkerFactory) -> Producer:
    await start_worker(reveal_clients="test-app,other-app")
    async with producer(amqp_url) as client:
        yield client  # type: ignore[misc]


async def test_issue_then_confirm(amqp_url: str, otp: Producer) -> None:
    async with event_log(amqp_url) as events:
        issued = await otp.issue(user="alice", reveal=True)
        assert issued["status"] == "issued"
        assert issued["resent"] is False
        assert len(issued["code"]) == 6
        uuid.UUID(issued["code_id"])
        confirmed = await otp.confirm(user="alice", code=issued["code"])
        assert confirmed == {
            "command_id": confirmed["command_id"],
            "status": "confirmed",
            "code_id": issued["code_id"],
        }
        again = await otp.confirm(user="alice", code=issued["code"])
        assert again["status"] == "not_found"
        await events.wait_for(lambda e: e.named("code.confirmed"))
        assert [b["event"] for b in events.bodies] == ["code.issued", "code.confirmed"]
        event = events.bodies[0]
        assert event["code_id"] == issued["code_id"]
        assert event["sealed_code"] and issued["code"] not in event["sealed_code"]
        message = events.messages[0]
        assert message.content_type == "application/json"
        assert message.message_id == event["event_id"]
        assert message.type == "code.issued"
        assert message.delivery_mode == 2
        assert message.timestamp is not None


async def test_reply_properties(otp: Producer) -> None:
    await otp.issue(user="props")
    reply = otp.reply_messages[-1]
    assert reply.type == "IssueResult"
    assert reply.content_type == "application/json"
    assert reply.message_id and reply.timestamp and reply.correlation_id


async def test_wrong_codes_count_down_then_lock(otp: Producer) -> None:
    issued = await otp.issue(user="bob", reveal=True)
    wrong = "000000" if issued["code"] != "000000" else "111111"
    statuses = [await otp.confirm(user="bob", code=wrong) for _ in range(6)]
    assert [(s["status"], s.get("attempts_left")) for s in statuses] == [
        ("invalid", 4),
        ("invalid", 3),
        ("invalid", 2),
        ("invalid", 1),
        ("locked", 0),
        ("locked", 0),
    ]
    right = await otp.confirm(user="bob", code=issued["code"])
    assert right["status"] == "locked"
    fresh = await otp.issue(user="bob", reveal=True)
    assert fresh["code_id"] != issued["code_id"] and fresh["resent"] is False


async def test_not_found_without_a_code(otp: Producer) -> None:
    reply = await otp.confirm(user="nobody", code="123456")
    assert reply["status"] == "not_found"
    assert "code_id" not in reply


async def test_expired(amqp_url: str, start_worker: WorkerFactory) -> None:
    clock = Clock()
    await start_worker(clock=clock, reveal_clients="test-app")
    async with producer(amqp_url) as otp, event_log(amqp_url) as events:
        issued = await otp.issue(user="carol", ttl_seconds=60, reveal=True)
        assert datetime.fromisoformat(issued["expires_at"]) == clock.now + timedelta(seconds=60)
        clock.advance(60)
        reply = await otp.confirm(user="carol", code=issued["code"])
        assert (reply["status"], reply["code_id"]) == ("expired", issued["code_id"])
        await events.wait_for(lambda e: e.named("code.attempt_failed"))
        assert events.named("code.attempt_failed")[0]["reason"] == "expired"
        fresh = await otp.issue(user="carol", reveal=True)
        assert fresh["code_id"] != issued["code_id"]


async def test_resend_returns_the_same_code_and_expiry(amqp_url: str, otp: Producer) -> None:
    async with event_log(amqp_url) as events:
        first = await otp.issue(user="dave", reveal=True, ttl_seconds=120)
        second = await otp.issue(user="dave", reveal=True, ttl_seconds=600)
        assert second["resent"] is True
        assert (second["code"], second["code_id"], second["expires_at"]) == (
            first["code"],
            first["code_id"],
            first["expires_at"],
        )
        await events.wait_for(lambda e: len(e.distinct("code.issued")) == 2)
        assert [e["resent"] for e in events.distinct("code.issued")] == [False, True]
        assert (await otp.confirm(user="dave", code=first["code"]))["status"] == "confirmed"


async def test_force_new_rotates_and_the_old_code_stops_working(otp: Producer) -> None:
    old = await otp.issue(user="erin", reveal=True)
    new = await otp.issue(user="erin", reveal=True, force_new=True)
    assert new["code_id"] != old["code_id"] and new["resent"] is False
    if old["code"] != new["code"]:
        assert (await otp.confirm(user="erin", code=old["code"]))["status"] == "invalid"
    assert (await otp.confirm(user="erin", code=new["code"]))["status"] == "confirmed"


async def test_scopes_are_isolated(otp: Producer) -> None:
    base = await otp.issue(user="frank", reveal=True)
    others = {
        "user": ({"user": "frank2"}, await otp.issue(user="frank2", reveal=True)),
        "client": (
            {"user": "frank", "client": "other-app"},
            await otp.issue(user="frank", client="other-app", reveal=True),
        ),
        "purpose": (
            {"user": "frank", "purpose": "reset"},
            await otp.issue(user="frank", purpose="reset", reveal=True),
        ),
    }
    assert len({base["code_id"], *(reply["code_id"] for _, reply in others.values())}) == 4
    for scope, reply in others.values():
        if reply["code"] != base["code"]:
            assert (await otp.confirm(**scope, code=base["code"]))["status"] == "invalid"
        assert (await otp.confirm(**scope, code=reply["code"]))["status"] == "confirmed"
    assert (await otp.confirm(user="frank", code=base["code"]))["status"] == "confirmed"


async def test_a_repeated_command_id_gets_the_identical_reply_and_no_second_event(
    amqp_url: str, otp: Producer
) -> None:
    async with event_log(amqp_url) as events:
        command = {
            "command_id": "repeat-1",
            "user": "gina",
            "client": "test-app",
            "channel": "none",
            "reveal": True,
        }
        first = await otp.call("code.issue", command)
        second = await otp.call("code.issue", command)
        assert first == second
        confirm = {"command_id": "repeat-2", "user": "gina", "client": "test-app", "code": "x"}
        assert await otp.call("code.confirm", confirm) == await otp.call("code.confirm", confirm)
        sentinel = await otp.issue(user="gina-sentinel")
        await events.wait_for(lambda e: any(b["code_id"] == sentinel["code_id"] for b in e.bodies))
        assert len(events.distinct("code.issued")) == 2  # gina once, the sentinel once
        assert len(events.distinct("code.attempt_failed")) == 1


async def test_duplicates_inside_one_batch(otp: Producer) -> None:
    command = {"command_id": "same-batch", "user": "hank", "client": "test-app", "channel": "none"}
    futures = [await otp.send("code.issue", command) for _ in range(20)]
    replies = await asyncio.wait_for(asyncio.gather(*futures), 15)
    assert all(r == replies[0] for r in replies)


async def test_a_command_without_reply_to_is_processed(amqp_url: str, otp: Producer) -> None:
    import aio_pika
    import orjson

    async with event_log(amqp_url) as events:
        await otp.exchange.publish(
            aio_pika.Message(
                orjson.dumps(
                    {"command_id": "quiet", "user": "ivy", "client": "a", "channel": "none"}
                ),
                content_type="application/json",
            ),
            routing_key="code.issue",
        )
        await events.wait_for(lambda e: any(b["user"] == "ivy" for b in e.bodies))


@pytest.mark.parametrize("body", [b"{", b"[]", b'{"command_id": "x"}'])
async def test_malformed_is_rejected(otp: Producer, body: bytes) -> None:
    reply = await otp.call("code.issue", body)
    assert reply["status"] == "rejected"
    assert reply["error"]["type"] in {"invalid_json", "validation_error"}


async def test_reveal_not_permitted(otp: Producer) -> None:
    reply = await otp.issue(user="jack", client="not-listed", reveal=True)
    assert reply["status"] == "rejected"
    assert reply["error"]["type"] == "reveal_not_permitted"
    assert (await otp.issue(user="jack", client="not-listed"))["status"] == "issued"


async def test_ttl_above_the_maximum_is_rejected(otp: Producer) -> None:
    reply = await otp.issue(user="kim", ttl_seconds=901)
    assert reply["status"] == "rejected"
    assert reply["error"]["fields"][0]["loc"] == "ttl_seconds"
