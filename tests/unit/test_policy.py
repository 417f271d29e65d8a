"""Every branch of the issue and confirm decisions, with time passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from worker.domain.model import CodeRecord, CodeState, FailureStreak, Policy, Scope
from worker.domain.policy import (
    IssueAction,
    RevealRefusal,
    SendHistory,
    decide_confirm,
    decide_issue,
    next_streak,
    resolve_ttl,
    retry_after,
    reveal_refusal,
)

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
POLICY = Policy()
S = timedelta(seconds=1)


def record(**changes: object) -> CodeRecord:
    values: dict[str, object] = {
        "code_id": "c1",
        "scope": Scope("u", "app", "login"),
        "key_id": "k",
        "digest": b"d",
        "sealed": "t",
        "issued_at": NOW - 10 * S,
        "expires_at": NOW + 290 * S,
        "attempts": 0,
        "state": CodeState.ACTIVE,
    }
    values.update(changes)
    return CodeRecord(**values)  # type: ignore[arg-type]


def right(_: CodeRecord) -> bool:
    return True


def wrong(_: CodeRecord) -> bool:
    return False


class TestIssue:
    def test_no_code_means_fresh(self) -> None:
        assert decide_issue(None, NOW, force_new=False) is IssueAction.FRESH

    def test_active_code_is_resent(self) -> None:
        assert decide_issue(record(), NOW, force_new=False) is IssueAction.RESEND

    def test_force_new_rotates(self) -> None:
        assert decide_issue(record(), NOW, force_new=True) is IssueAction.FRESH

    @pytest.mark.parametrize(
        "changes",
        [
            {"expires_at": NOW},
            {"state": CodeState.LOCKED},
            {"state": CodeState.CONFIRMED},
        ],
    )
    def test_spent_codes_are_replaced(self, changes: dict[str, object]) -> None:
        assert decide_issue(record(**changes), NOW, force_new=False) is IssueAction.FRESH

    def test_ttl_defaults_and_bounds(self) -> None:
        assert resolve_ttl(POLICY, None) == timedelta(seconds=300)
        assert resolve_ttl(POLICY, 1) == S
        assert resolve_ttl(POLICY, 900) == timedelta(seconds=900)
        for bad in (0, 901, -5):
            with pytest.raises(ValueError, match="between 1 and 900"):
                resolve_ttl(POLICY, bad)

    def test_reveal_only_for_listed_clients(self) -> None:
        policy = Policy(reveal_clients=frozenset({"qa"}))
        assert reveal_refusal(policy, "qa", None) is None
        assert reveal_refusal(policy, "qa", "anyone") is None
        assert reveal_refusal(policy, "app", None) is RevealRefusal.CLIENT
        assert reveal_refusal(POLICY, "qa", None) is RevealRefusal.CLIENT

    def test_reveal_from_listed_broker_users_only_once_they_are_named(self) -> None:
        policy = Policy(reveal_clients=frozenset({"qa"}), reveal_broker_users=frozenset({"svc-qa"}))
        assert reveal_refusal(policy, "qa", "svc-qa") is None
        assert reveal_refusal(policy, "qa", "svc-app") is RevealRefusal.BROKER_USER
        assert reveal_refusal(policy, "qa", None) is RevealRefusal.BROKER_USER
        assert reveal_refusal(policy, "qa", "") is RevealRefusal.BROKER_USER
        # The client is checked first: a listed broker user does not make any client one.
        assert reveal_refusal(policy, "app", "svc-qa") is RevealRefusal.CLIENT


class TestConfirm:
    def test_right_code_confirms_and_counts_the_attempt(self) -> None:
        outcome = decide_confirm(POLICY, record(attempts=2), NOW, right)
        assert outcome.status == "confirmed"
        assert outcome.record is not None
        assert outcome.record.state is CodeState.CONFIRMED
        assert outcome.record.attempts == 3
        assert outcome.event == "code.confirmed"
        assert not outcome.failed

    def test_wrong_code_counts_down(self) -> None:
        current = record()
        lefts = []
        for _ in range(4):
            outcome = decide_confirm(POLICY, current, NOW, wrong)
            assert outcome.status == "invalid"
            assert outcome.event == "code.attempt_failed"
            assert outcome.record is not None
            current = outcome.record
            lefts.append(outcome.attempts_left)
        assert lefts == [4, 3, 2, 1]
        locked = decide_confirm(POLICY, current, NOW, wrong)
        assert (locked.status, locked.attempts_left, locked.event) == ("locked", 0, "code.locked")
        assert locked.record is not None and locked.record.state is CodeState.LOCKED
        after = decide_confirm(POLICY, locked.record, NOW, right)
        assert (after.status, after.event) == ("locked", None)

    def test_right_code_on_the_last_attempt_still_confirms(self) -> None:
        outcome = decide_confirm(POLICY, record(attempts=4), NOW, right)
        assert outcome.status == "confirmed"

    def test_expired_code(self) -> None:
        outcome = decide_confirm(POLICY, record(expires_at=NOW, attempts=1), NOW, right)
        assert (outcome.status, outcome.attempts_left) == ("expired", 4)
        assert outcome.event == "code.attempt_failed"
        assert outcome.failed

    def test_a_confirm_on_a_locked_code_counts_as_a_failure(self) -> None:
        outcome = decide_confirm(POLICY, record(state=CodeState.LOCKED), NOW, right)
        assert outcome.status == "locked"
        assert outcome.failed

    def test_a_locked_code_stays_locked_after_it_expires(self) -> None:
        current = record(state=CodeState.LOCKED, expires_at=NOW - S, attempts=5)
        outcome = decide_confirm(POLICY, current, NOW, right)
        assert (outcome.status, outcome.attempts_left, outcome.event) == ("locked", 0, None)
        assert outcome.failed

    @pytest.mark.parametrize("current", [None, record(state=CodeState.CONFIRMED)])
    def test_nothing_to_confirm(self, current: CodeRecord | None) -> None:
        outcome = decide_confirm(POLICY, current, NOW, right)
        assert outcome.status == "not_found"
        assert outcome.event is None
        assert outcome.failed

    def test_comparison_happens_after_counting(self) -> None:
        seen: list[int] = []

        def spy(r: CodeRecord) -> bool:
            seen.append(r.attempts)
            return False

        decide_confirm(POLICY, record(attempts=3), NOW, spy)
        assert seen == [3]  # compared against the stored record; the result counts attempt 4


class TestStreak:
    def test_failures_accumulate_and_success_clears(self) -> None:
        streak = next_streak(POLICY, None, True, NOW)
        assert streak == FailureStreak(1, NOW)
        streak = next_streak(POLICY, streak, True, NOW + S)
        assert streak == FailureStreak(2, NOW + S)
        assert next_streak(POLICY, streak, False, NOW + 2 * S) is None

    def test_an_hour_without_failure_starts_over(self) -> None:
        streak = FailureStreak(19, NOW)
        assert next_streak(POLICY, streak, True, NOW + timedelta(hours=1)) == FailureStreak(
            1, NOW + timedelta(hours=1)
        )


class TestRateLimits:
    def test_nothing_sent_nothing_blocks(self) -> None:
        assert retry_after(POLICY, NOW, SendHistory()) is None

    def test_cooldown(self) -> None:
        history = SendHistory(scope_sends=[NOW - 10 * S])
        assert retry_after(POLICY, NOW, history) == 20
        assert retry_after(POLICY, NOW + 20 * S, history) is None

    def test_cooldown_counts_from_the_latest_send(self) -> None:
        history = SendHistory(scope_sends=[NOW - 50 * S, NOW - 10 * S])
        assert retry_after(POLICY, NOW, history) == 20

    def test_cap_wait_counts_from_the_send_that_keeps_the_window_over_the_cap(self) -> None:
        policy = Policy(resend_cooldown=timedelta(0), max_sends_per_scope=2)
        sends = [NOW - timedelta(minutes=m) for m in (50, 40, 30)]
        # Only when the 40-minute-old send leaves the hour are fewer than 2 sends left in it.
        assert retry_after(policy, NOW, SendHistory(scope_sends=sends)) == 20 * 60
        assert retry_after(policy, NOW + 20 * 60 * S, SendHistory(scope_sends=sends)) is None

    def test_scope_cap_at_its_boundary(self) -> None:
        policy = Policy(resend_cooldown=timedelta(0), max_sends_per_scope=5)
        sends = [NOW - timedelta(minutes=m) for m in (50, 40, 30, 20)]
        assert retry_after(policy, NOW, SendHistory(scope_sends=sends)) is None  # 5th allowed
        sends.append(NOW)
        wait = retry_after(policy, NOW, SendHistory(scope_sends=sends))  # 6th refused
        assert wait == 10 * 60  # until the oldest (50 min ago) leaves the hour
        assert retry_after(policy, NOW + 600 * S, SendHistory(scope_sends=sends)) is None
        assert retry_after(policy, NOW + 599 * S, SendHistory(scope_sends=sends)) == 1

    def test_destination_cap(self) -> None:
        policy = Policy(resend_cooldown=timedelta(0), max_sends_per_destination=3)
        sends = [NOW - 30 * S, NOW - 20 * S, NOW - 10 * S]
        assert retry_after(policy, NOW, SendHistory(destination_sends=sends)) == 3600 - 30
        assert retry_after(policy, NOW, SendHistory(destination_sends=sends[:2])) is None

    def test_failure_pause(self) -> None:
        streak = FailureStreak(20, NOW - timedelta(minutes=15))
        assert retry_after(POLICY, NOW, SendHistory(streak=streak)) == 45 * 60
        assert retry_after(POLICY, NOW, SendHistory(streak=FailureStreak(19, NOW))) is None
        assert retry_after(POLICY, NOW + timedelta(minutes=45), SendHistory(streak=streak)) is None

    def test_the_longest_block_wins(self) -> None:
        policy = Policy(max_sends_per_scope=1)
        history = SendHistory(scope_sends=[NOW - 10 * S], streak=FailureStreak(20, NOW))
        assert retry_after(policy, NOW, history) == 3600

    def test_old_sends_do_not_count(self) -> None:
        policy = Policy(max_sends_per_scope=1)
        history = SendHistory(scope_sends=[NOW - timedelta(hours=1)])
        assert retry_after(policy, NOW, history) is None

    def test_wait_is_at_least_one_second(self) -> None:
        history = SendHistory(scope_sends=[NOW - timedelta(seconds=29, milliseconds=999)])
        assert retry_after(POLICY, NOW, history) == 1
