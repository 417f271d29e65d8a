"""The handler's events and replies, checked against the contract's own models (no I/O)."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from datetime import UTC, datetime, timedelta

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
    Send,
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
        self.sends: list[Send] = []
        self.streaks: dict[str, FailureStreak] = {}
        self.locked: list[str] = []

    async def lock(self, keys: Collection[str]) -> None:
        assert list(keys) == sorted(keys)
        self.locked = list(keys)

    async def load_replies(self, keys: Collection[ReplyKey]) -> dict[ReplyKey, StoredReply]:
        return {k: self.replies[k] for k in keys if k in self.replies}

    async def load_codes(self, scopes: Collection[Scope]) -> dict[Scope, CodeRecord]:
        return {s: self.codes[s] for s in scopes if s in self.codes}

    async def load_sends(
        self, scope_keys: Collection[str], destination_keys: Collection[str], since: datetime
    ) -> SendCounts:
        counts = SendCounts({}, {})
        for send in (s for s in self.sends if s.sent_at > since):
            if send.scope_key in scope_keys:
                counts.by_scope.setdefault(send.scope_key, []).append(send.sent_at)
            if send.destination_key in destination_keys:
                counts.by_destination.setdefault(send.destination_key, []).append(send.sent_at)
        return counts

    async def load_streaks(self, users: Collection[str]) -> dict[str, FailureStreak]:
        return {u: self.streaks[u] for u in users if u in self.streaks}

    async def load_state(self, wanted: StateKeys) -> State:
        return await load_state_one_by_one(self, wanted)

    async def write(self, writes: Writes, now: datetime) -> list[OutboxRow]:
        self.codes.update(writes.codes)
        for key, reply in writes.replies.items():
            self.replies.setdefault(key, reply)
        self.events += [e.body for e in writes.events]
        self.sends += writes.sends
        for user, streak in writes.streaks.items():
            if streak is None:
                self.streaks.pop(user, None)
            else:
                self.streaks[user] = streak
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


def handler(
    key: bytes = KEY, previous: tuple[bytes, ...] = (), policy: Policy | None = None
) -> CommandHandler:
    return CommandHandler(
        policy or Policy(reveal_clients=frozenset({"qa"})),
        Crypto(CodeHasher(key, previous), Sealer(DELIVERY_KEY)),
    )


def run(
    handler: CommandHandler, tx: MemoryTransaction, *commands: Command, at: datetime = NOW
) -> list[Handled | Rejection]:
    return asyncio.run(handler.handle_batch(tx, commands, at))[0]


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
        {"channel": "none"},
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


def wrong(code: str) -> str:
    return "000000" if code != "000000" else "111111"


def test_each_wrong_confirm_is_saved_for_the_next_batch_until_the_code_locks() -> None:
    otp, tx = handler(), MemoryTransaction()
    code = handled(run(otp, tx, issue())[0]).reply["code"]
    scope, most = Scope("alice", "qa", "login"), otp.policy.max_attempts
    for n in range(1, most + 1):
        (outcome,) = run(otp, tx, confirm(wrong(code), command_id=f"c{n}"))
        assert tx.codes[scope].attempts == n
    assert handled(outcome).status == "locked"
    later = NOW + otp.policy.resend_cooldown
    fresh = handled(run(otp, tx, issue(command_id="i2"), at=later)[0]).reply["code"]
    (ok,) = run(otp, tx, confirm(fresh, command_id="ok1"), at=later)
    assert handled(ok).status == "confirmed"
    (again,) = run(otp, tx, confirm(fresh, command_id="ok2"), at=later)
    assert handled(again).status == "not_found"  # a confirmed code is used up


def test_a_fresh_code_takes_the_requested_ttl_and_the_policy_code_length() -> None:
    policy = Policy(code_length=8, reveal_clients=frozenset({"qa"}))
    reply = handled(run(handler(policy=policy), MemoryTransaction(), issue(ttl_seconds=60))[0])
    assert IssueResult.model_validate(reply.reply).expires_at == NOW + timedelta(seconds=60)
    assert len(reply.reply["code"]) == 8


def test_force_new_replaces_the_active_code() -> None:
    otp, tx = handler(), MemoryTransaction()
    first = handled(run(otp, tx, issue())[0]).reply
    later = NOW + otp.policy.resend_cooldown
    second = handled(run(otp, tx, issue(command_id="i2", force_new=True), at=later)[0]).reply
    assert second["code_id"] != first["code_id"] and second["resent"] is False
    (old,) = run(otp, tx, confirm(first["code"]), at=later)
    assert handled(old).status == "invalid"


def test_a_second_issue_in_one_batch_waits_the_cooldown_and_its_reply_is_kept() -> None:
    otp, tx = handler(), MemoryTransaction()
    _, second = run(otp, tx, issue(), issue(command_id="i2"))
    assert handled(second).reply["status"] == "rate_limited"
    cooldown = otp.policy.resend_cooldown.total_seconds()
    assert handled(second).reply["retry_after_seconds"] == cooldown
    assert ("issue", "i2") in tx.replies


def test_the_destination_cap_counts_every_user_batch_and_spelling_of_the_address() -> None:
    otp, tx = handler(), MemoryTransaction()
    cap = otp.policy.max_sends_per_destination
    spellings = ["ann@example.org", "Ann@Example.ORG", " ANN@example.org\t"]
    sends = [
        issue(command_id=f"i{n}", user=f"u{n}", channel="email", destination="a@example.org")
        .model_copy(update={"destination": spellings[n % len(spellings)]})
        for n in range(cap + 1)
    ]  # fmt: skip
    outcomes = run(otp, tx, *sends[: cap // 2]) + run(otp, tx, *sends[cap // 2 :])
    assert [handled(o).status for o in outcomes] == ["issued"] * cap + ["rate_limited"]
    (blocked,) = run(otp, tx, issue(command_id="x", user="x", channel="email",
                                    destination="ANN@example.org"))  # fmt: skip
    assert handled(blocked).status == "rate_limited"


def test_the_destination_cap_outlives_a_rotation_of_the_secret_key() -> None:
    """Send rows name the address by its pseudonym under the key of the day; the rotated
    worker counts those under the previous keys too, until the old key is dropped."""
    tx = MemoryTransaction()
    before, rotated = handler(OLD_KEY), handler(KEY, previous=(OLD_KEY,))
    cap = before.policy.max_sends_per_destination

    def send(n: int, address: str = "a@example.org") -> IssueCode:
        return issue(command_id=f"i{n}", user=f"u{n}", channel="email", destination=address)

    assert all(handled(o).status == "issued" for o in run(before, tx, *map(send, range(cap))))
    (blocked,) = run(rotated, tx, send(cap, "A@Example.ORG"))
    assert handled(blocked).status == "rate_limited"
    old, new = (
        h.crypto.hasher.pseudonym("destination", "a@example.org") for h in (before, rotated)
    )
    assert {f"destination:{old}", f"destination:{new}"} <= set(tx.locked)
    (other,) = run(rotated, tx, send(cap + 1, "b@example.org"))
    assert handled(other).status == "issued"
    (forgotten,) = run(handler(KEY), tx, send(cap + 2))  # the old key dropped: rows unread
    assert handled(forgotten).status == "issued"


def test_a_streak_of_failed_confirms_across_batches_pauses_issuing() -> None:
    otp, tx = handler(), MemoryTransaction()
    most = otp.policy.max_consecutive_failures
    fails = [confirm("123456", command_id=f"c{n}") for n in range(most)]
    run(otp, tx, *fails[: most // 2])
    run(otp, tx, *fails[most // 2 :])
    assert tx.streaks["alice"].count == most
    reply = handled(run(otp, tx, issue())[0]).reply
    assert reply["status"] == "rate_limited"
    assert reply["retry_after_seconds"] == otp.policy.failure_pause.total_seconds()


def test_a_code_issued_before_a_key_rotation_confirms_under_its_own_key() -> None:
    tx = MemoryTransaction()
    code = handled(run(handler(OLD_KEY), tx, issue())[0]).reply["code"]
    (outcome,) = run(handler(KEY, previous=(OLD_KEY,)), tx, confirm(code))
    assert handled(outcome).status == "confirmed"


def test_a_stored_reply_keeps_the_revealed_code_only_sealed() -> None:
    otp, tx = handler(), MemoryTransaction()
    code = handled(run(otp, tx, issue())[0]).reply["code"]
    stored = tx.replies[("issue", "i1")].body
    assert code.encode() not in stored and "code" not in orjson.loads(stored)
    assert handled(run(otp, tx, issue())[0]).reply["code"] == code  # the replay unseals it


def test_a_resend_reveals_the_code_only_when_asked() -> None:
    otp, tx = handler(), MemoryTransaction()
    run(otp, tx, issue())
    later = NOW + otp.policy.resend_cooldown
    reply = handled(run(otp, tx, issue(command_id="i2", reveal=False), at=later)[0]).reply
    assert reply["resent"] is True and reply.get("code") is None
