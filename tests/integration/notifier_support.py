"""Real servers for the notifier's tests: a scriptable SMTP server and a tiny HTTP gateway."""

from __future__ import annotations

import asyncio
import email
import email.policy
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import aio_pika
import orjson
from aiosmtpd.controller import Controller

from bench.harness import free_port
from contracts.topology import EVENTS_EXCHANGE
from tests.support import AUDIT, TEST_DELIVERY_KEY
from worker.amqp import Publisher, json_properties
from worker.domain.sealing import Sealer
from worker.notifier.transports import SmtpConfig

READY_TIMEOUT = 30.0
"""How long aiosmtpd's thread may take to start serving (its default, 1 s, is short on a
slow host)."""


async def wait_until(predicate: Callable[[], bool], changed: asyncio.Event, timeout: float) -> None:
    async def _wait() -> None:
        while not predicate():
            changed.clear()
            await changed.wait()

    await asyncio.wait_for(_wait(), timeout)


@dataclass
class Mail:
    to: list[str]
    message: EmailMessage
    tls: bool = False
    """Whether the session had switched to TLS (STARTTLS) before DATA."""
    login: str | None = None
    """Who the session authenticated as, if it did."""

    @property
    def text(self) -> str:
        part = self.message.get_body(preferencelist=("plain",))
        assert part is not None
        return str(part.get_content())  # type: ignore[attr-defined]

    @property
    def html(self) -> str:
        part = self.message.get_body(preferencelist=("html",))
        assert part is not None
        return str(part.get_content())  # type: ignore[attr-defined]


class SmtpServer:
    """aiosmtpd in its own thread. ``answers`` are replies to DATA to give first (e.g. 451);
    ``hold_after`` makes every DATA beyond that many mails wait until ``release()``;
    ``slow_sessions`` makes that many next connections answer EHLO, MAIL, RCPT and DATA each
    after ``step_delay`` seconds, as a slow relay does.
    ``options`` go to aiosmtpd's ``SMTP`` (e.g. ``tls_context``, ``require_starttls``)."""

    def __init__(self, **options: Any) -> None:
        self.mails: list[Mail] = []
        self.answers: list[str] = []
        self.hold_after: int | None = None
        self.slow_sessions = 0
        self.step_delay = 0.0
        self.held = 0
        self.sessions = 0
        """EHLOs: one per connection, unless the server offers STARTTLS (then one more after it)."""
        self.quits = 0
        self.noops_held = 0
        """NOOPs waiting for ``release()`` while ``hold_noops`` is set."""
        self.hold_noops = False
        self._accept_held = False
        self.changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._gate = asyncio.Event()
        self._lock = threading.Lock()
        self.port = free_port()
        self._options = options
        self._controller = Controller(
            self, hostname="127.0.0.1", port=self.port, ready_timeout=READY_TIMEOUT, **options
        )

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self.release()
        self._controller.stop()

    def restart(self) -> None:
        """Stops (dropping every open connection, as a server restart does) and starts again
        on the same port."""
        self._controller.stop()
        self._controller = Controller(
            self, hostname="127.0.0.1", port=self.port, ready_timeout=READY_TIMEOUT, **self._options
        )
        self._controller.start()

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        with self._lock:
            self.quits += 1
        self._loop.call_soon_threadsafe(self.changed.set)
        return "221 Bye"

    async def handle_NOOP(self, server: Any, session: Any, envelope: Any, arg: str) -> str:
        if self.hold_noops:
            with self._lock:
                self.noops_held += 1
            self._loop.call_soon_threadsafe(self.changed.set)
            await self._gate.wait()
        return "250 OK"

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        with self._lock:
            self.sessions += 1
            if not hasattr(session, "slow"):
                session.slow = self.slow_sessions > 0
                if session.slow:
                    self.slow_sessions -= 1
        await self._step(session)
        return responses

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        await self._step(session)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        await self._step(session)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def _step(self, session: Any) -> None:
        if getattr(session, "slow", False):
            await asyncio.sleep(self.step_delay)

    def hold(self, after: int | None = None, *, noops: bool = False) -> None:
        """Makes every DATA beyond ``after`` mails (and with ``noops`` every NOOP) wait for
        ``release()``, also after one."""
        self._controller.loop.call_soon_threadsafe(self._gate.clear)
        self.hold_after = after
        self.hold_noops = noops

    def release(self, *, accept: bool = False) -> None:
        """Held DATA commands answer 451 (their client is gone, or will retry), or accept;
        held NOOPs answer."""
        self.hold_after = None
        self.hold_noops = False
        self._accept_held = accept
        self._controller.loop.call_soon_threadsafe(self._gate.set)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await self._step(session)
        with self._lock:
            if self.answers:
                return self.answers.pop(0)
            held = self.hold_after is not None and len(self.mails) >= self.hold_after
        if held:
            self.held += 1
            self._loop.call_soon_threadsafe(self.changed.set)
            await self._gate.wait()
            if not self._accept_held:
                return "451 4.3.0 try again later"
        message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        mail = Mail(
            list(envelope.rcpt_tos),
            message,
            tls=session.ssl is not None,
            login=session.auth_data if session.authenticated else None,
        )
        with self._lock:
            self.mails.append(mail)
        self._loop.call_soon_threadsafe(self.changed.set)
        return "250 OK"

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 20) -> None:
        await wait_until(predicate, self.changed, timeout)


@dataclass
class Gateway:
    """An HTTP endpoint that records JSON POSTs; ``statuses`` are answers to give first.

    ``stalls`` requests (before any of ``statuses``) get no answer at all: the connection is
    held until the client hangs up, as a gateway that hangs does."""

    statuses: list[int] = field(default_factory=list)
    stalls: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    hits: int = 0
    """Every request received, whatever it was answered."""
    hung_up: int = 0
    """Stalled requests whose client gave up and closed the connection."""
    garbled: int = 0
    """Requests (taken like any 200) answered with a body that claims gzip and is not."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None
    port: int = 0
    _stalled: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/sms"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        for writer in self._stalled:
            writer.close()
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        body = await reader.readexactly(length)
        self.hits += 1
        self.changed.set()
        if self.stalls:
            self.stalls -= 1
            self._stalled.add(writer)
            await reader.read()  # b"" once the client hangs up
            self._stalled.discard(writer)
            self.hung_up += 1
            self.changed.set()
            writer.close()
            return
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.requests.append(orjson.loads(body))
            self.changed.set()
        extra, answer = "", b""
        if self.garbled and status == 200:
            self.garbled -= 1
            extra, answer = "Content-Encoding: gzip\r\n", b"this is not gzip"
        writer.write(
            f"HTTP/1.1 {status} X\r\n{extra}Content-Length: {len(answer)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + answer
        )
        await writer.drain()
        writer.close()


def relay_config(smtp: SmtpServer, *, timeout: float = 10.0, **options: Any) -> SmtpConfig:
    """SMTP settings for the test's plain relay (no STARTTLS, no login); ``options`` are the
    pool settings a test cares about."""
    return SmtpConfig(
        host="127.0.0.1",
        port=smtp.port,
        sender="no-reply@localhost",
        username=None,
        password=None,
        starttls=False,
        timeout=timeout,
        **options,
    )


def crafted_event(code: str, **overrides: Any) -> dict[str, Any]:
    """A ``code.issued`` body as the worker would publish it, sealed under the test key; its
    code joins the session's log audit, like every code a worker issues."""
    AUDIT.codes.add(code)
    now = datetime.now(UTC)
    body: dict[str, Any] = {
        "event": "code.issued",
        "event_id": str(uuid.uuid4()),
        "occurred_at": now.isoformat(),
        "code_id": str(uuid.uuid4()),
        "user": "carol",
        "client": "test-app",
        "purpose": "login",
        "channel": "email",
        "destination": "carol@example.org",
        "locale": "en",
        "context": {},
        "expires_at": (now + timedelta(minutes=5)).isoformat(),
        "resent": False,
        "sealed_code": Sealer(TEST_DELIVERY_KEY.encode()).seal(code),
    }
    body.update(overrides)
    return body


async def publish_event(url: str, *bodies: dict[str, Any]) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.get_exchange(EVENTS_EXCHANGE)  # it exists: the worker declared it
        publisher = Publisher(channel)
        for body in bodies:
            await publisher.publish(
                EVENTS_EXCHANGE,
                body["event"],
                orjson.dumps(body),
                json_properties(type=body["event"], message_id=body["event_id"]),
                timeout=10,
            )
    finally:
        await connection.close()


def failing_first(
    times: int, error: Exception, method: Callable[..., Awaitable[Any]]
) -> Callable[..., Awaitable[Any]]:
    """``method``, except that its first ``times`` calls raise ``error``: a store that is
    down for a while, to be patched over the real one's method."""
    left = [times]

    async def call(*args: Any) -> Any:
        if left[0] > 0:
            left[0] -= 1
            raise error
        return await method(*args)

    return call
