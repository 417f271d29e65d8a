"""The ways a message leaves: SMTP, an HTTP SMS gateway, and the dev console.

Each transport sorts its failures into transient (worth a retry later: 4xx on SMTP, refused
or timed-out connections, HTTP 5xx and 429) and permanent (5xx on SMTP, other HTTP 4xx, no
gateway configured). The reason strings end up in ``code.delivery_failed`` and in log lines,
so they name status codes and exception types, never message content.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Protocol, TextIO

import aiosmtplib
import httpx

from worker.notifier.render import Email, Sms

QUIT_TIMEOUT_SECONDS = 2.0
MAX_GATEWAY_BODY = 64 * 1024
"""Bytes of a gateway's answer read before the connection is dropped instead."""


class DeliveryError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TransientDeliveryError(DeliveryError):
    """Worth another try after a pause."""


class PermanentDeliveryError(DeliveryError):
    """Trying again would fail the same way."""


class EmailTransport(Protocol):
    async def send_email(self, to: str, message: Email, code_id: str) -> None: ...


class SmsTransport(Protocol):
    async def send_sms(self, to: str, message: Sms, code_id: str) -> None: ...


@dataclass(frozen=True)
class SmtpConfig:
    host: str
    port: int
    sender: str
    username: str | None
    password: str | None
    starttls: bool
    timeout: float
    pool_size: int = 4
    """Connections kept open between messages (0: one per message); more may be open while
    sends overlap."""
    idle_seconds: float = 60.0
    """A connection idle this long is closed (with QUIT), not kept for the next mail."""


def _smtp_failure(code: int, what: str) -> DeliveryError:
    reason = f"smtp_{code}_{what}"
    if 400 <= code < 500:
        return TransientDeliveryError(reason)
    return PermanentDeliveryError(reason)


class SmtpTransport:
    """Reuses SMTP connections: connecting, STARTTLS and login cost several round trips and a
    TLS handshake per message otherwise, and relays throttle clients that reconnect for every
    mail.

    Up to ``pool_size`` connections wait idle between messages; sends that overlap beyond
    that open their own and close them afterwards, so no delivery ever waits for a slot
    (a wait could outlast its claim lease). An idle connection is checked with NOOP before it
    is reused, since servers drop idle clients: one that fails the check is replaced before
    the message goes out, so a stale connection never costs a retry or sends a mail twice.
    Any failure during a send closes that connection; the next send starts clean. One idle
    for ``idle_seconds`` is closed with QUIT, also when no mail comes: a quiet notifier
    holds no connections the relay would drop on its side anyway.
    """

    def __init__(self, config: SmtpConfig) -> None:
        self._config = config
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        """Connections between messages, oldest first, each with the time it was returned."""
        self._expiry: asyncio.TimerHandle | None = None
        self._quitting: set[asyncio.Task[None]] = set()

    async def send_email(self, to: str, message: Email, code_id: str) -> None:
        c = self._config
        mail = EmailMessage()
        mail["From"] = c.sender
        mail["To"] = to
        mail["Subject"] = message.subject
        mail["X-OTP-Code-Id"] = code_id
        mail.set_content(message.text)
        mail.add_alternative(message.html, subtype="html")
        try:
            smtp = await self._checkout()
            try:
                await smtp.send_message(mail)
            except BaseException:
                smtp.close()
                raise
            self._checkin(smtp)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients] or [550]
            raise _smtp_failure(min(codes), "recipient_refused") from None
        except aiosmtplib.SMTPNotSupported:
            # A non-ASCII address and a server without SMTPUTF8: so it stays.
            raise PermanentDeliveryError("smtp_smtputf8_not_supported") from None
        except aiosmtplib.SMTPConnectError as exc:
            raise TransientDeliveryError(f"smtp_connect_failed: {type(exc).__name__}") from None
        except aiosmtplib.SMTPResponseException as exc:
            raise _smtp_failure(exc.code, type(exc).__name__) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise TransientDeliveryError(f"smtp_unavailable: {type(exc).__name__}") from None

    async def _checkout(self) -> aiosmtplib.SMTP:
        now = time.monotonic()
        while self._idle:
            smtp, since = self._idle.pop()
            if now - since > self._config.idle_seconds or not smtp.is_connected:
                smtp.close()
                continue
            try:
                await smtp.noop()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                smtp.close()
                continue
            except BaseException:  # cancelled (the claim's lease ran out): not kept, not lost
                smtp.close()
                raise
            return smtp
        c = self._config
        smtp = aiosmtplib.SMTP(
            hostname=c.host,
            port=c.port,
            username=c.username,
            password=c.password,
            start_tls=c.starttls,
            use_tls=False,
            timeout=c.timeout,
        )
        try:
            await smtp.connect()  # EHLO, STARTTLS and login, as configured
        except BaseException:
            smtp.close()  # a refused STARTTLS or login leaves the socket open otherwise
            raise
        return smtp

    def _checkin(self, smtp: aiosmtplib.SMTP) -> None:
        if len(self._idle) < self._config.pool_size and smtp.is_connected:
            self._idle.append((smtp, time.monotonic()))
            if self._expiry is None:
                self._expire_at(time.monotonic() + self._config.idle_seconds)
        else:
            smtp.close()

    def _expire_at(self, when: float) -> None:
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_at(loop.time() + max(0.0, when - time.monotonic()), self._expire)

    def _expire(self) -> None:
        """Says QUIT on the connections idle for ``idle_seconds``; waits for the next one."""
        self._expiry = None
        now = time.monotonic()
        while self._idle and now - self._idle[0][1] >= self._config.idle_seconds:
            smtp, _ = self._idle.pop(0)
            task = asyncio.create_task(self._quit(smtp))
            self._quitting.add(task)
            task.add_done_callback(self._quitting.discard)
        if self._idle:
            self._expire_at(self._idle[0][1] + self._config.idle_seconds)

    async def _quit(self, smtp: aiosmtplib.SMTP) -> None:
        """QUIT, briefly: one that fails or goes unanswered changes nothing for the mails."""
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            await smtp.quit(timeout=min(self._config.timeout, QUIT_TIMEOUT_SECONDS))
        smtp.close()

    async def close(self) -> None:
        """Says QUIT on every idle connection, all at once: this runs at shutdown."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        idle, self._idle = self._idle, []
        await asyncio.gather(*self._quitting, *(self._quit(smtp) for smtp, _ in idle))


class HttpSmsTransport:
    """POSTs ``{"to", "text", "code_id"}`` as JSON; the gateway answers with an HTTP status."""

    def __init__(self, url: str | None, timeout: float) -> None:
        self._url = url
        self._client = httpx.AsyncClient(timeout=timeout, follow_redirects=False)

    async def send_sms(self, to: str, message: Sms, code_id: str) -> None:
        if not self._url:
            raise PermanentDeliveryError("no_sms_gateway_configured")
        try:
            async with self._client.stream(
                "POST", self._url, json={"to": to, "text": message.text, "code_id": code_id}
            ) as response:
                status = response.status_code
                # Only the status counts, and the gateway has the message once it answered
                # one: a body that then breaks off or fails to decode must not turn into a
                # retry that sends the SMS again. Read raw, up to a bound, so the connection
                # can be reused.
                with contextlib.suppress(httpx.HTTPError):
                    read = 0
                    async for chunk in response.aiter_raw():
                        read += len(chunk)
                        if read > MAX_GATEWAY_BODY:
                            break
        except httpx.TransportError as exc:
            raise TransientDeliveryError(f"sms_gateway_unavailable: {type(exc).__name__}") from None
        if status >= 500 or status == 429:
            raise TransientDeliveryError(f"sms_gateway_{status}")
        if status >= 300:
            raise PermanentDeliveryError(f"sms_gateway_{status}")

    async def close(self) -> None:
        await self._client.aclose()


class ConsoleTransport:
    """Dev mode: prints the message, so a newcomer sees the code without a mail server.

    This is the only place a plaintext code may be printed, and it goes to stdout, not the log.
    """

    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out

    def _print(self, text: str) -> None:
        out = self._out or sys.stdout
        out.write(text + "\n")
        out.flush()

    async def send_email(self, to: str, message: Email, code_id: str) -> None:
        rule = "-" * 72
        self._print(f"{rule}\nTo: {to}\nSubject: {message.subject}\n\n{message.text}\n{rule}")

    async def send_sms(self, to: str, message: Sms, code_id: str) -> None:
        self._print(f"SMS to {to}: {message.text}")
