"""Every status of both commands, through the real broker and a real SQLite file."""

from __future__ import annotations

import pytest

from tests.conftest import WorkerFactory
from tests.support import event_log, producer


async def test_issue_then_confirm(amqp_url: str, start_worker: WorkerFactory) -> None:
    await start_worker(reveal_clients="test-app")
    async with producer(amqp_url) as otp, event_log(amqp_url) as events:
        issued = await otp.issue(user="alice", reveal=True)
        assert issued["status"] == "issued"
        assert issued["resent"] is False
        assert len(issued["code"]) == 6
        confirmed = await otp.confirm(user="alice", code=issued["code"])
        assert confirmed == {
            "command_id": confirmed["command_id"],
            "status": "confirmed",
            "code_id": issued["code_id"],
        }
        await events.wait_for(lambda e: e.named("code.confirmed"))
        assert [b["event"] for b in events.bodies] == ["code.issued", "code.confirmed"]


@pytest.mark.parametrize("body", [b"{", b"[]", b'{"command_id": "x"}'])
async def test_malformed_is_rejected(
    amqp_url: str, start_worker: WorkerFactory, body: bytes
) -> None:
    await start_worker()
    async with producer(amqp_url) as otp:
        reply = await otp.call("code.issue", body)
        assert reply["status"] == "rejected"
        assert reply["error"]["type"] in {"invalid_json", "validation_error"}
