"""One delivery attempt for one ``code.issued`` event, decided without touching the broker.

The outcome tells the consumer what to publish; keeping the broker out of here keeps the
ordering rules (remember, then publish, then ack) in one place, the consumer. Every attempt
that may send first claims the event in the store (see ``store.py``), so two processes holding
copies of one event never both send it. Two rules keep that true when things are slow or fail:
a send is cut off before the claim's lease runs out (another process may take the claim over
then), and once a transport accepted a message its claim is never released, even when
recording the delivery fails (the lease then keeps copies off until it runs out).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from contracts.commands import is_email_address
from contracts.events import CodeIssued
from worker.domain.sealing import InvalidToken, Sealer
from worker.log import get_logger
from worker.notifier.render import Renderer, TemplateProblem
from worker.notifier.store import AlreadyDelivered, ClaimedElsewhere, DeliveryStore
from worker.notifier.transports import (
    EmailTransport,
    PermanentDeliveryError,
    SmsTransport,
    TransientDeliveryError,
)

log = get_logger(__name__)

LEASE_MARGIN = 0.1
"""The share of the claim lease a send may not use: it leaves time to record the delivery,
and covers clocks of notifier hosts that disagree a little."""
RECORD_TRIES = 3
RECORD_BACKOFF_SECONDS = 0.1


@dataclass(frozen=True)
class Skip:
    """Nothing to deliver (channel ``none``)."""


@dataclass(frozen=True)
class Delivered:
    attempts: int
    earlier: bool = False


@dataclass(frozen=True)
class Failed:
    reason: str
    attempts: int


@dataclass(frozen=True)
class Retry:
    reason: str


@dataclass(frozen=True)
class Busy:
    """Another process holds a live claim: look again later, without spending an attempt."""


Outcome = Skip | Delivered | Failed | Retry | Busy
Observe = Callable[[str, str, float | None], None]


def _ignore(channel: str, result: str, seconds: float | None) -> None:
    pass


class Deliverer:
    def __init__(
        self,
        *,
        store: DeliveryStore,
        sealer: Sealer,
        renderer: Renderer,
        email: EmailTransport,
        sms: SmsTransport,
        max_attempts: int,
        claim_lease_seconds: float,
        observe: Observe = _ignore,
    ) -> None:
        self._store = store
        self._sealer = sealer
        self._renderer = renderer
        self._email = email
        self._sms = sms
        self._max_attempts = max_attempts
        self._lease = claim_lease_seconds
        self._observe = observe

    async def attempt(self, event: CodeIssued, attempt: int, now: datetime) -> Outcome:
        """Attempt number ``attempt`` (1-based) at delivering ``event``."""
        if event.channel == "none":
            return Skip()
        token = uuid.uuid4().hex
        outcome: Outcome
        seconds: float | None = None
        try:
            claim = await self._store.claim(event.event_id, token, now, self._lease)
        except Exception as exc:
            # Nothing was sent. A requeue would be back within milliseconds and use up the
            # queue's delivery limit during a database restart: wait in the retry tiers instead.
            log.warning("claiming the delivery failed; it will be retried", error=repr(exc))
            claim = None
        if claim is None:
            outcome = self._transient("store_unavailable", attempt)
        elif isinstance(claim, AlreadyDelivered):
            outcome = Delivered(claim.attempts, earlier=True)
        elif isinstance(claim, ClaimedElsewhere):
            outcome = Busy()
        else:
            # The claim runs out ``lease`` after ``now``: the send must be over before then.
            held = self._lease * (1 - LEASE_MARGIN) - _seconds_since(now)
            sent = False
            try:
                try:
                    outcome, seconds = await self._attempt_claimed(event, attempt, now, held)
                except Exception as exc:
                    # A failure no transport sorted: a bug, or an error its library added.
                    # Retried like a transient one, so that it ends in code.delivery_failed
                    # rather than in a requeue loop. Only the type is logged: an exception's
                    # text may quote what was being sent.
                    log.error("delivery failed unexpectedly", error=type(exc).__name__)
                    outcome = self._transient(f"unexpected_{type(exc).__name__}", attempt)
                sent = isinstance(outcome, Delivered)
                if sent:
                    await self._record(event, token, attempt, now)
            finally:
                if not sent:  # the next copy may claim it at once
                    await self._release(event, token)
        self._observe(event.channel, _result_of(outcome), seconds)
        return outcome

    def _transient(self, reason: str, attempt: int) -> Retry | Failed:
        if attempt >= self._max_attempts:
            return Failed(f"retries_exhausted: {reason}", attempt)
        return Retry(reason)

    async def _release(self, event: CodeIssued, token: str) -> None:
        """Never raises: the outcome stands, and a claim left in place only keeps copies off
        until its lease runs out."""
        try:
            await self._store.release(event.event_id, token)
        except Exception as exc:
            log.warning(
                "releasing the claim failed; copies wait for its lease",
                error=repr(exc),
                code_id=event.code_id,
                event_id=event.event_id,
            )

    async def _record(self, event: CodeIssued, token: str, attempt: int, now: datetime) -> None:
        """Marks the event delivered; never raises: the message is out, so this attempt is a
        delivery whatever the store says. A claim left unmarked keeps copies off for its lease."""
        ids = {"code_id": event.code_id, "event_id": event.event_id}
        for tries in range(1, RECORD_TRIES + 1):
            try:
                marked = await self._store.mark_delivered(event.event_id, token, attempt, now)
            except Exception as exc:
                if tries < RECORD_TRIES:
                    await asyncio.sleep(RECORD_BACKOFF_SECONDS * 2 ** (tries - 1))
                    continue
                log.warning(
                    "delivered, but recording it failed; a copy arriving after the claim's lease"
                    " may be sent again",
                    error=repr(exc),
                    **ids,
                )
                return
            if not marked:
                log.warning(
                    "delivered, but the claim had been taken over; the event may go out twice",
                    **ids,
                )
            return

    async def _attempt_claimed(
        self, event: CodeIssued, attempt: int, now: datetime, held: float
    ) -> tuple[Outcome, float | None]:
        """The outcome, and how long the transport took when it was asked at all."""
        tried = attempt - 1
        if event.expires_at <= now:
            return Failed("expired", tried), None
        if not event.destination:
            return Failed("no_destination", tried), None
        if event.channel == "email" and not is_email_address(event.destination):
            # The worker checks this at issue; an event from elsewhere (or an older worker)
            # is checked again, since a mail library reading ``(x)victim@example.org`` or
            # ``a,victim@example.org`` back from the To header finds victim@example.org.
            return Failed("invalid_destination", tried), None
        try:
            code = self._sealer.unseal(event.sealed_code)
        except InvalidToken:
            return Failed("unsealable", tried), None
        started = time.monotonic()
        try:
            bound = asyncio.timeout(held)
            try:
                async with bound:
                    await self._send(event, event.destination, code, now)
            except TimeoutError:
                if not bound.expired():
                    raise
                raise TransientDeliveryError("send_outlasted_claim_lease") from None
        except TransientDeliveryError as exc:
            return self._transient(exc.reason, attempt), _since(started)
        except PermanentDeliveryError as exc:
            return Failed(exc.reason, attempt), _since(started)
        except TemplateProblem as exc:
            log.error("template problem", error=str(exc))
            return Failed("template_error", tried), None
        return Delivered(attempt), _since(started)

    async def _send(self, event: CodeIssued, to: str, code: str, now: datetime) -> None:
        if event.channel == "email":
            await self._email.send_email(to, self._renderer.email(event, code, now), event.code_id)
        else:
            await self._sms.send_sms(to, self._renderer.sms(event, code, now), event.code_id)


def _result_of(outcome: Outcome) -> str:
    match outcome:
        case Delivered(earlier=True):
            return "duplicate"
        case Delivered():
            return "delivered"
        case Failed(reason="expired"):
            return "expired"
        case Failed():
            return "failed"
        case Retry():
            return "retried"
        case _:
            return "busy"


def _since(started: float) -> float:
    return time.monotonic() - started


def _seconds_since(moment: datetime) -> float:
    return max(0.0, (datetime.now(UTC) - moment).total_seconds())
