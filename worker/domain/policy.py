"""Decisions of issue and confirm, as functions of (policy, state, now)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal

from worker.domain.model import CodeRecord, CodeState, FailureStreak, Policy


class IssueAction(StrEnum):
    FRESH = "fresh"
    RESEND = "resend"


def resolve_ttl(policy: Policy, requested_seconds: int | None) -> timedelta:
    """The lifetime of a fresh code; raises ValueError outside 1 … max."""
    if requested_seconds is None:
        return policy.default_ttl
    longest = int(policy.max_ttl.total_seconds())
    if not 1 <= requested_seconds <= longest:
        raise ValueError(f"ttl_seconds must be between 1 and {longest}")
    return timedelta(seconds=requested_seconds)


class RevealRefusal(StrEnum):
    CLIENT = "client"
    BROKER_USER = "broker_user"


def reveal_refusal(policy: Policy, client: str, broker_user: str | None) -> RevealRefusal | None:
    """Why a reveal is refused, or None if it is permitted.

    ``client`` is a field of the command, which any producer can set; ``broker_user`` is the
    message's ``user_id`` property, which the broker has checked against the publishing
    connection's login, so it is what can be required of a reveal when producers are not all
    trusted alike."""
    if client not in policy.reveal_clients:
        return RevealRefusal.CLIENT
    if policy.reveal_broker_users and broker_user not in policy.reveal_broker_users:
        return RevealRefusal.BROKER_USER
    return None


@dataclass(frozen=True, slots=True)
class SendHistory:
    """What the rate limits look at: recent sends and the user's failure streak."""

    scope_sends: Sequence[datetime] = ()
    destination_sends: Sequence[datetime] = ()
    streak: FailureStreak | None = None


def retry_after(policy: Policy, now: datetime, history: SendHistory) -> int | None:
    """Seconds until every limit that blocks a send now has cleared; None when none blocks.

    Windows slide: a send counts while ``now - window < sent_at``. Each limit clears at a
    fixed instant that later sends cannot move, so waiting the largest of them is enough.
    """
    waits: list[timedelta] = []
    streak = history.streak
    if streak is not None and streak.count >= policy.max_consecutive_failures:
        waits.append(streak.last_failure_at + policy.failure_pause - now)
    window_start = now - policy.send_window
    scope = sorted(t for t in history.scope_sends if t > window_start)
    if scope:
        waits.append(scope[-1] + policy.resend_cooldown - now)
        waits.append(_cap_wait(scope, policy.max_sends_per_scope, policy.send_window, now))
    destination = sorted(t for t in history.destination_sends if t > window_start)
    if destination:
        waits.append(
            _cap_wait(destination, policy.max_sends_per_destination, policy.send_window, now)
        )
    longest = max(waits, default=timedelta(0))
    if longest <= timedelta(0):
        return None
    return max(1, math.ceil(longest.total_seconds()))


def _cap_wait(sends: list[datetime], cap: int, window: timedelta, now: datetime) -> timedelta:
    if len(sends) < cap:
        return timedelta(0)
    return sends[len(sends) - cap] + window - now


def decide_issue(current: CodeRecord | None, now: datetime, force_new: bool) -> IssueAction:
    """Resend the active code when there is one, so a late first message stays valid."""
    if current is None or force_new:
        return IssueAction.FRESH
    if current.state is CodeState.ACTIVE and not current.is_expired(now):
        return IssueAction.RESEND
    return IssueAction.FRESH


ConfirmStatus = Literal["confirmed", "invalid", "locked", "expired", "not_found"]
ConfirmEvent = Literal["code.confirmed", "code.attempt_failed", "code.locked"]


@dataclass(frozen=True, slots=True)
class ConfirmOutcome:
    status: ConfirmStatus
    record: CodeRecord | None
    """The record after the attempt; differs from the input when it must be saved."""
    attempts_left: int | None = None
    event: ConfirmEvent | None = None

    @property
    def failed(self) -> bool:
        """Every outcome but a confirmation extends the user's failure streak."""
        return self.status != "confirmed"


def decide_confirm(
    policy: Policy,
    record: CodeRecord | None,
    now: datetime,
    matches: Callable[[CodeRecord], bool],
) -> ConfirmOutcome:
    """The attempt is counted before the candidate is compared (constant-time, by ``matches``)."""
    if record is None or record.state is CodeState.CONFIRMED:
        return ConfirmOutcome("not_found", record)
    if record.state is CodeState.LOCKED:
        return ConfirmOutcome("locked", record, attempts_left=0)
    if record.is_expired(now):
        left = max(policy.max_attempts - record.attempts, 0)
        return ConfirmOutcome("expired", record, attempts_left=left, event="code.attempt_failed")
    attempts = record.attempts + 1
    if matches(record):
        confirmed = replace(record, attempts=attempts, state=CodeState.CONFIRMED)
        return ConfirmOutcome("confirmed", confirmed, event="code.confirmed")
    if attempts >= policy.max_attempts:
        locked = replace(record, attempts=attempts, state=CodeState.LOCKED)
        return ConfirmOutcome("locked", locked, attempts_left=0, event="code.locked")
    counted = replace(record, attempts=attempts)
    return ConfirmOutcome(
        "invalid",
        counted,
        attempts_left=policy.max_attempts - attempts,
        event="code.attempt_failed",
    )


def next_streak(
    policy: Policy, streak: FailureStreak | None, failed: bool, now: datetime
) -> FailureStreak | None:
    """A success clears the streak; so does an hour without failures."""
    if not failed:
        return None
    if streak is None or now >= streak.last_failure_at + policy.failure_pause:
        return FailureStreak(count=1, last_failure_at=now)
    return FailureStreak(count=streak.count + 1, last_failure_at=now)
