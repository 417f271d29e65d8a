"""The handler's events and replies, checked against the contract's own models (no I/O)."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from datetime import UTC, datetime

import orjson
from cryptography.fernet import Fernet

from contracts import ConfirmResult, IssueResult, parse_event
from contracts.commands import ConfirmCode, IssueCode
from worker.domain.codes import CodeHasher
from worker.domain.model import CodeRecord, FailureStreak, Policy, Scope
from worker.domain.sealing import Sealer
from worker.service import CommandHandler, Crypto
from worker.store.base import (
    OutboxRow,
    ReplyKey,
    SendCounts,
    State,
    StateKeys,
    Writes,
    load_state_one_by_one,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class MemoryTransaction:
    """Just enough state for the handler: what one transaction would load and write."""

    def __init__(self) -> None:
        self.codes: dict[Scope, CodeRecord] = {}
        self.events: list[bytes] = []

    async def lock(self, keys: Collection[str]) -> None:
        assert list(keys) == sorted(keys)

    async def load_replies(self, keys: Collection[ReplyKey]) -> dict[ReplyKey, bytes]:
        return {}

    async def load_codes(self, scopes: Collection[Scope]) -> dict[Scope, CodeRecord]:
        return {s: self.codes[s] for s in scopes if s in self.codes}

    async def load_sends(
        self, scope_keys: Collection[str], destination_keys: Collection[str], since: datetime
    ) -> SendCounts:
        return SendCounts({}, {})

    async def load_streaks(self, users: Collection[str]) -> dict[str, FailureStreak]:
        return {}

    async def load_state(self, wanted: StateKeys) -> State:
        return await load_state_one_by_one(self, wanted)

    async def write(self, writes: Writes, now: datetime) -> list[OutboxRow]:
        self.codes.update(writes.codes)
        self.events += [e.body for e in writes.events]
        return []


def test_events_and_replies_match_the_contract_models() -> None:
    handler = CommandHandler(
        Policy(reveal_clients=frozenset({"qa"})),
        Crypto(CodeHasher(b"k" * 32), Sealer(Fernet.generate_key())),
    )
    tx = MemoryTransaction()
    issue = IssueCode(
        command_id="i1", user="u", client="qa", channel="email", destination="u@example.org",
        context={"app_name": "Demo"}, reveal=True,
    )  # fmt: skip
    (issued,), _ = asyncio.run(handler.handle_batch(tx, [issue], NOW))
    reply = IssueResult.model_validate(issued.reply)
    assert reply.status == "issued" and reply.code is not None
    wrong = "000000" if reply.code != "000000" else "111111"
    confirms = [
        ConfirmCode(command_id=f"c{i}", user="u", client="qa", code=wrong) for i in range(5)
    ] + [ConfirmCode(command_id="c9", user="u", client="qa", code=reply.code)]
    handled, _ = asyncio.run(handler.handle_batch(tx, confirms, NOW))
    statuses = [ConfirmResult.model_validate(h.reply).status for h in handled]
    assert statuses == ["invalid"] * 4 + ["locked", "locked"]
    events = [parse_event(body) for body in tx.events]
    assert [e.event for e in events] == ["code.issued"] + ["code.attempt_failed"] * 4 + [
        "code.locked"
    ]
    first = orjson.loads(tx.events[0])
    assert first["expires_at"].endswith("Z") and first["occurred_at"].endswith("Z")
    assert first["context"] == {"app_name": "Demo"} and "code" not in first
    assert Sealer.__name__ and events[0].sealed_code != reply.code
