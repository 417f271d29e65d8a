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
from worker.parsing import Command, Rejection
from worker.service import CommandHandler, Crypto, Handled
from worker.store.base import (
    OutboxRow,
    ReplyKey,
    SendCounts,
    State,
    StateKeys,
    StoredReply,
    Writes,
    load_state_one_by_one,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class MemoryTransaction:
    """Just enough state for the handler: what one transaction would load and write."""

    def __init__(self) -> None:
        self.codes: dict[Scope, CodeRecord] = {}
        self.replies: dict[ReplyKey, StoredReply] = {}
        self.events: list[bytes] = []

    async def lock(self, keys: Collection[str]) -> None:
        assert list(keys) == sorted(keys)

    async def load_replies(self, keys: Collection[ReplyKey]) -> dict[ReplyKey, StoredReply]:
        return {k: self.replies[k] for k in keys if k in self.replies}

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
        for key, reply in writes.replies.items():
            self.replies.setdefault(key, reply)
        self.events += [e.body for e in writes.events]
        return []


def test_events_and_replies_match_the_contract_models() -> None:
    delivery_key = Fernet.generate_key()
    handler = CommandHandler(
        Policy(reveal_clients=frozenset({"qa"})),
        Crypto(CodeHasher(b"k" * 32), Sealer(delivery_key)),
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
    # The event carries the code sealed (no "code" member, above), and the notifier's key
    # opens it.
    assert reply.code is not None
    assert Sealer(delivery_key).unseal(events[0].sealed_code) == reply.code


KEY, OLD_KEY = b"k" * 32, b"o" * 32
DELIVERY_KEY = Fernet.generate_key()


def handler(key: bytes = KEY, previous: tuple[bytes, ...] = ()) -> CommandHandler:
    return CommandHandler(
        Policy(reveal_clients=frozenset({"qa"})),
        Crypto(CodeHasher(key, previous), Sealer(DELIVERY_KEY)),
    )


def run(
    handler: CommandHandler, tx: MemoryTransaction, *commands: Command
) -> list[Handled | Rejection]:
    return asyncio.run(handler.handle_batch(tx, commands, NOW))[0]


def handled(outcome: Handled | Rejection) -> Handled:
    assert isinstance(outcome, Handled), outcome
    return outcome


def refused(outcome: Handled | Rejection, command_id: str) -> Rejection:
    assert isinstance(outcome, Rejection), outcome
    assert (outcome.command_id, outcome.error.type) == (command_id, "command_id_reused")
    return outcome


def issue(**fields: object) -> IssueCode:
    return IssueCode.model_validate({"command_id": "i1", "user": "alice", "client": "qa",
                                     "channel": "none", "reveal": True} | fields)  # fmt: skip


def confirm(code: str, **fields: object) -> ConfirmCode:
    return ConfirmCode.model_validate(
        {"command_id": "c1", "user": "alice", "client": "qa", "code": code} | fields
    )


def test_a_confirm_id_reused_by_another_user_and_code_is_refused_and_changes_nothing() -> None:
    otp, tx = handler(), MemoryTransaction()
    code = handled(run(otp, tx, issue())[0]).reply["code"]
    (first,) = run(otp, tx, confirm(code, command_id="c8"))
    assert handled(first).status == "confirmed"
    run(otp, tx, issue(command_id="i2", user="mallory", client="other", reveal=False))
    mallory = next(s for s in tx.codes if s.user == "mallory")
    before, events = tx.codes[mallory], len(tx.events)
    (outcome,) = run(otp, tx, confirm("999999", command_id="c8", user="mallory", client="other"))
    rejection = refused(outcome, "c8")
    assert rejection.kind == "confirm" and "999999" not in rejection.reason
    assert "alice" not in rejection.reason and "confirmed" not in rejection.reason
    assert tx.codes[mallory] == before and len(tx.events) == events  # no attempt counted
    (again,) = run(otp, tx, confirm(code, command_id="c8"))
    assert handled(again).reply == handled(first).reply and handled(again).replayed


def test_an_issue_id_reused_by_a_client_not_allowed_to_reveal_gets_no_code() -> None:
    otp, tx = handler(), MemoryTransaction()
    first = handled(run(otp, tx, issue(command_id="i7"))[0])
    assert first.reply["code"]
    (outcome,) = run(otp, tx, issue(command_id="i7", client="other", reveal=False))
    refused(outcome, "i7")
    assert first.reply["code"] not in repr(outcome)
    assert len(tx.events) == 1 and len(tx.codes) == 1


def test_every_field_counts_and_an_identical_repeat_replays() -> None:
    otp, tx = handler(), MemoryTransaction()
    base = issue(command_id="i3", channel="email", destination="a@example.org",
                 context={"a": "1", "b": "2"}, reveal=False)  # fmt: skip
    first = handled(run(otp, tx, base)[0])
    # The same command, its defaults spelled out and its context in another order.
    same = issue(command_id="i3", channel="email", destination="a@example.org",
                 context={"b": "2", "a": "1"}, reveal=False, purpose="login", locale="en",
                 force_new=False)  # fmt: skip
    assert handled(run(otp, tx, same)[0]).reply == first.reply
    for change in (
        {"destination": "b@example.org"}, {"user": "bob"}, {"client": "x"},
        {"purpose": "pay"}, {"ttl_seconds": 60}, {"locale": "de"}, {"context": {"a": "1"}},
        {"force_new": True}, {"reveal": True}, {"channel": "sms", "destination": "+4915112345678"},
    ):  # fmt: skip
        refused(run(otp, tx, base.model_copy(update=change))[0], "i3")
    assert len(tx.events) == 1


def test_a_reused_id_inside_one_batch_is_refused_and_a_repeat_replays() -> None:
    otp, tx = handler(), MemoryTransaction()
    outcomes = run(
        otp, tx,
        issue(command_id="b1"), issue(command_id="b1", user="mallory", client="other",
                                      reveal=False),
        issue(command_id="b1"),
    )  # fmt: skip
    first = handled(outcomes[0])
    refused(outcomes[1], "b1")
    assert handled(outcomes[2]).reply == first.reply
    assert len(tx.events) == 1 and list(tx.codes) == [Scope("alice", "qa", "login")]


def test_a_repeat_after_a_key_rotation_still_replays() -> None:
    tx = MemoryTransaction()
    first = handled(run(handler(OLD_KEY), tx, confirm("123456"))[0])
    rotated = handler(KEY, previous=(OLD_KEY,))
    assert handled(run(rotated, tx, confirm("123456"))[0]).reply == first.reply
    refused(run(rotated, tx, confirm("654321"))[0], "c1")
    refused(run(handler(KEY), tx, confirm("123456"))[0], "c1")  # the old key forgotten


def test_replies_stored_before_fingerprints_are_replayed_as_before() -> None:
    tx = MemoryTransaction()
    tx.replies[("confirm", "c1")] = StoredReply(b'{"command_id":"c1","status":"invalid"}', None)
    (outcome,) = run(handler(), tx, confirm("999999", user="anyone"))
    assert handled(outcome).reply == {"command_id": "c1", "status": "invalid"}
