"""One delivery attempt for one ``code.issued`` event, decided without touching the broker.

The outcome tells the consumer what to publish; keeping the broker out of here keeps the
ordering rules (remember, then publish, then ack) in one place, the consumer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from contracts.events import CodeIssued
from worker.domain.sealing import InvalidToken, Sealer
from worker.log import get_logger
from worker.notifier.render import Renderer, TemplateProblem
from worker.notifier.store import DeliveryStore
from worker.notifier.transports import (
    EmailTransport,
    PermanentDeliveryError,
    SmsTransport,
    TransientDeliveryError,
)

log = get_logger(__name__)


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


Outcome = Skip | Delivered | Failed | Retry


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
    ) -> None:
        self._store = store
        self._sealer = sealer
        self._renderer = renderer
        self._email = email
        self._sms = sms
        self._max_attempts = max_attempts

    async def attempt(self, event: CodeIssued, attempt: int, now: datetime) -> Outcome:
        """Attempt number ``attempt`` (1-based) at delivering ``event``."""
        if event.channel == "none":
            return Skip()
        earlier = await self._store.delivered(event.event_id)
        if earlier is not None:
            return Delivered(earlier, earlier=True)
        tried = attempt - 1
        if event.expires_at <= now:
            return Failed("expired", tried)
        if not event.destination:
            return Failed("no_destination", tried)
        try:
            code = self._sealer.unseal(event.sealed_code)
        except InvalidToken:
            return Failed("unsealable", tried)
        try:
            await self._send(event, event.destination, code, now)
        except TransientDeliveryError as exc:
            if attempt >= self._max_attempts:
                return Failed(f"retries_exhausted: {exc.reason}", attempt)
            return Retry(exc.reason)
        except PermanentDeliveryError as exc:
            return Failed(exc.reason, attempt)
        except TemplateProblem as exc:
            log.error("template problem", error=str(exc))
            return Failed("template_error", tried)
        await self._store.remember(event.event_id, attempt, now)
        return Delivered(attempt)

    async def _send(self, event: CodeIssued, to: str, code: str, now: datetime) -> None:
        if event.channel == "email":
            await self._email.send_email(to, self._renderer.email(event, code, now), event.code_id)
        else:
            await self._sms.send_sms(to, self._renderer.sms(event, code, now), event.code_id)
