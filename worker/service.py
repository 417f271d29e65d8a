"""Command handlers: a batch of valid commands in, replies and staged events out.

One store transaction serves the whole batch. Commands in a batch are applied in order to the
state loaded at its start, so two commands on one scope behave exactly as if they had arrived
in two transactions.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from contracts.commands import ConfirmCode, IssueCode
from contracts.events import CodeAttemptFailed, CodeConfirmed, CodeIssued, CodeLocked
from contracts.replies import ConfirmResult, IssueResult
from worker import idempotency
from worker.domain.codes import CodeHasher, generate_code
from worker.domain.model import CodeRecord, CodeState, FailureStreak, Policy, Scope
from worker.domain.policy import (
    IssueAction,
    SendHistory,
    decide_confirm,
    decide_issue,
    next_streak,
    resolve_ttl,
    retry_after,
)
from worker.domain.sealing import Sealer
from worker.parsing import Command, Rejection, kind_of
from worker.store.base import (
    OutboxEvent,
    OutboxRow,
    ReplyKey,
    Send,
    StateKeys,
    StoredReply,
    Transaction,
    Writes,
)
from worker.store.keys import scope_key

REPLY_TYPE = {"issue": "IssueResult", "confirm": "ConfirmResult"}
_SEALED = "_sealed"


@dataclass(frozen=True, slots=True)
class Handled:
    """One command's outcome: the reply to send and what to log."""

    reply: dict[str, Any]
    reply_type: str
    status: str
    code_id: str | None
    replayed: bool = False


@dataclass(frozen=True)
class Crypto:
    hasher: CodeHasher
    sealer: Sealer


def scope_of(command: Command) -> Scope:
    return Scope(command.user, command.client, command.purpose)


def destination_of(command: IssueCode) -> str | None:
    """The address the send limits count: one spelling for every way of writing it."""
    if command.channel == "none" or command.destination is None:
        return None
    return command.destination.strip().lower()


def destination_key(crypto: Crypto, command: IssueCode) -> str | None:
    destination = destination_of(command)
    return None if destination is None else crypto.hasher.pseudonym("destination", destination)


def earlier_destination_keys(
    crypto: Crypto, issues: Sequence[IssueCode], destinations: dict[int, str | None]
) -> dict[str, str]:
    """Each destination's pseudonyms under the previous secret keys, mapped to its current
    one (in ``destinations``): sends recorded before a key rotation still count against the
    destination's cap. Empty at once when there are no previous keys: the hot path pays
    nothing for rotation outside one."""
    earlier: dict[str, str] = {}
    if not crypto.hasher.has_previous_keys:
        return earlier
    for command in issues:
        current, destination = destinations[id(command)], destination_of(command)
        if current is not None and destination is not None:
            for old in crypto.hasher.earlier_pseudonyms("destination", destination):
                earlier[old] = current
    return earlier


def lock_keys(
    commands: Sequence[Command], destinations: dict[int, str | None], earlier: Collection[str]
) -> list[str]:
    """Every key the batch touches. A destination's earlier pseudonyms are locked too, so a
    worker still on the previous key (a rolling rotation) and one on the new key take turns
    on the same address."""
    keys: set[str] = {f"destination:{old}" for old in earlier}
    for command in commands:
        keys.add(f"command:{kind_of(command)}:{command.command_id}")
        keys.add(f"scope:{scope_key(scope_of(command))}")
        keys.add(f"user:{command.user}")
        if dest := destinations.get(id(command)):
            keys.add(f"destination:{dest}")
    return sorted(keys)


def merge_earlier_sends(by_destination: dict[str, list[datetime]], earlier: dict[str, str]) -> None:
    """Files sends recorded under an earlier pseudonym under the current one."""
    for old, current in earlier.items():
        if old in by_destination:
            by_destination.setdefault(current, []).extend(by_destination.pop(old))


@dataclass
class _BatchState:
    codes: dict[Scope, CodeRecord]
    scope_sends: dict[str, list[datetime]]
    destination_sends: dict[str, list[datetime]]
    streaks: dict[str, FailureStreak]
    destinations: dict[int, str | None]
    """Destination pseudonyms by id() of the command: an HMAC each, computed once."""
    writes: Writes = field(default_factory=Writes)


class CommandHandler:
    """Builds events and replies with ``model_construct``: every value comes from a validated
    command or from the domain, so validating again would only cost time on the hot path
    (tests/unit/test_handler.py parses what it produces with the contract's models)."""

    def __init__(self, policy: Policy, crypto: Crypto) -> None:
        self.policy = policy
        self.crypto = crypto

    async def handle_batch(
        self, tx: Transaction, commands: Sequence[Command], now: datetime
    ) -> tuple[list[Handled | Rejection], list[OutboxRow]]:
        """A command whose id has a reply gets that reply if it is the same command, and is
        rejected (``command_id_reused``, no effect) if it is another one."""
        issues = [c for c in commands if isinstance(c, IssueCode)]
        destinations = {id(c): destination_key(self.crypto, c) for c in issues}
        old_keys = earlier_destination_keys(self.crypto, issues, destinations)
        await tx.lock(lock_keys(commands, destinations, old_keys))
        keys: list[ReplyKey] = [(kind_of(c), c.command_id) for c in commands]
        # One load for the whole batch: the state of a command that turns out to be a
        # replay is loaded for nothing, which costs less than a second trip to the store.
        loaded = await tx.load_state(
            StateKeys(
                replies=keys,
                scopes={scope_of(c) for c in commands},
                users={c.user for c in commands},
                send_scope_keys={scope_key(scope_of(c)) for c in issues},
                destination_keys={d for c in issues if (d := destinations[id(c)])} | set(old_keys),
                since=now - self.policy.send_window,
            )
        )
        stored = loaded.replies
        merge_earlier_sends(loaded.sends.by_destination, old_keys)
        state = _BatchState(
            codes=loaded.codes,
            scope_sends=loaded.sends.by_scope,
            destination_sends=loaded.sends.by_destination,
            streaks=loaded.streaks,
            destinations=destinations,
        )
        handled: list[Handled | Rejection] = []
        hasher = self.crypto.hasher
        for command, key in zip(commands, keys, strict=True):
            earlier = stored.get(key) or state.writes.replies.get(key)
            if earlier is None:
                answered = idempotency.fingerprint(hasher, command)
                if isinstance(command, IssueCode):
                    handled.append(self._issue(state, command, answered, now))
                else:
                    handled.append(self._confirm(state, command, answered, now))
            elif idempotency.is_repeat(hasher, command, earlier):
                handled.append(self._replay(key[0], earlier.body))
            else:
                handled.append(idempotency.reused(command))
        rows = await tx.write(state.writes, now)
        return handled, rows

    def _replay(self, kind: str, stored: bytes) -> Handled:
        reply = orjson.loads(stored)
        sealed = reply.pop(_SEALED, None)
        if sealed is not None:
            reply["code"] = self.crypto.sealer.unseal(sealed)
        return Handled(
            reply, REPLY_TYPE[kind], reply["status"], reply.get("code_id"), replayed=True
        )

    @staticmethod
    def _remember(
        state: _BatchState,
        key: ReplyKey,
        fingerprint: bytes,
        reply: dict[str, Any],
        sealed: str | None,
    ) -> None:
        kept = {k: v for k, v in reply.items() if k != "code"}
        if sealed is not None:
            kept[_SEALED] = sealed
        state.writes.replies[key] = StoredReply(orjson.dumps(kept), fingerprint)

    def _issue(
        self, state: _BatchState, command: IssueCode, fingerprint: bytes, now: datetime
    ) -> Handled:
        policy, crypto = self.policy, self.crypto
        scope = scope_of(command)
        skey = scope_key(scope)
        dkey = state.destinations[id(command)]
        history = SendHistory(
            scope_sends=state.scope_sends.get(skey, ()),
            destination_sends=state.destination_sends.get(dkey, ()) if dkey else (),
            streak=state.streaks.get(command.user),
        )
        key: ReplyKey = ("issue", command.command_id)
        wait = retry_after(policy, now, history)
        if wait is not None:
            reply = IssueResult.model_construct(
                command_id=command.command_id, status="rate_limited", retry_after_seconds=wait
            ).to_wire()
            self._remember(state, key, fingerprint, reply, None)
            return Handled(reply, "IssueResult", "rate_limited", None)
        current = state.codes.get(scope)
        if (
            current is not None
            and decide_issue(current, now, command.force_new) is IssueAction.RESEND
        ):
            record = current
            sealed = crypto.sealer.reseal(current.sealed)
            code = crypto.sealer.unseal(sealed) if command.reveal else None
            resent = True
        else:
            code_id = str(uuid.uuid4())
            code = generate_code(policy.code_length)
            sealed = crypto.sealer.seal(code)
            record = CodeRecord(
                code_id=code_id,
                scope=scope,
                key_id=crypto.hasher.current_key_id,
                digest=crypto.hasher.digest(code_id, code),
                sealed=sealed,
                issued_at=now,
                expires_at=now + resolve_ttl(policy, command.ttl_seconds),
                attempts=0,
                state=CodeState.ACTIVE,
            )
            state.codes[scope] = record
            state.writes.codes[scope] = record
            resent = False
            if not command.reveal:
                code = None
        state.scope_sends.setdefault(skey, []).append(now)
        if dkey:
            state.destination_sends.setdefault(dkey, []).append(now)
        state.writes.sends.append(Send(skey, dkey, now))
        self._stage(
            state,
            CodeIssued.model_construct(
                event_id=str(uuid.uuid4()),
                occurred_at=now,
                code_id=record.code_id,
                user=scope.user,
                client=scope.client,
                purpose=scope.purpose,
                channel=command.channel,
                destination=command.destination,
                locale=command.locale,
                context=command.context,
                expires_at=record.expires_at,
                resent=resent,
                sealed_code=sealed,
            ),
        )
        reply = IssueResult.model_construct(
            command_id=command.command_id,
            status="issued",
            code_id=record.code_id,
            expires_at=record.expires_at,
            resent=resent,
            code=code,
        ).to_wire()
        self._remember(state, key, fingerprint, reply, sealed if command.reveal else None)
        return Handled(reply, "IssueResult", "issued", record.code_id)

    def _confirm(
        self, state: _BatchState, command: ConfirmCode, fingerprint: bytes, now: datetime
    ) -> Handled:
        scope = scope_of(command)
        record = state.codes.get(scope)
        hasher = self.crypto.hasher
        outcome = decide_confirm(
            self.policy,
            record,
            now,
            lambda r: hasher.verify(r.code_id, command.code, r.key_id, r.digest),
        )
        if outcome.record is not None and outcome.record is not record:
            state.codes[scope] = outcome.record
            state.writes.codes[scope] = outcome.record
        before = state.streaks.get(command.user)
        after = next_streak(self.policy, before, outcome.failed, now)
        if after != before:
            state.writes.streaks[command.user] = after
            if after is None:
                state.streaks.pop(command.user, None)
            else:
                state.streaks[command.user] = after
        target = outcome.record
        if target is not None and outcome.event is not None:
            common: dict[str, Any] = {
                "event_id": str(uuid.uuid4()),
                "occurred_at": now,
                "code_id": target.code_id,
                "user": scope.user,
                "client": scope.client,
                "purpose": scope.purpose,
            }
            if outcome.event == "code.confirmed":
                self._stage(
                    state, CodeConfirmed.model_construct(**common, attempts_used=target.attempts)
                )
            elif outcome.event == "code.locked":
                self._stage(
                    state, CodeLocked.model_construct(**common, attempts_used=target.attempts)
                )
            else:
                self._stage(
                    state,
                    CodeAttemptFailed.model_construct(
                        **common,
                        reason="expired" if outcome.status == "expired" else "invalid",
                        attempts_left=outcome.attempts_left or 0,
                    ),
                )
        code_id = record.code_id if record is not None else None
        reply = ConfirmResult.model_construct(
            command_id=command.command_id,
            status=outcome.status,
            code_id=code_id,
            attempts_left=outcome.attempts_left,
        ).to_wire()
        self._remember(state, ("confirm", command.command_id), fingerprint, reply, None)
        return Handled(reply, "ConfirmResult", outcome.status, code_id)

    @staticmethod
    def _stage(
        state: _BatchState, event: CodeIssued | CodeConfirmed | CodeLocked | CodeAttemptFailed
    ) -> None:
        state.writes.events.append(
            OutboxEvent(
                event_id=event.event_id,
                routing_key=event.event,
                body=event.model_dump_json().encode(),
                type=event.event,
            )
        )
