"""A small async client for producers: commands as RPC over direct reply-to, and events.

It needs only aio-pika and pydantic (the bare ``pip install .``), so a service that issues
codes does not pull in the worker's database drivers or crypto.

Every call builds its command locally (so a malformed one fails here, with pydantic's
``ValidationError``, before it reaches the broker), publishes it with publisher confirms,
and waits for the one reply the contract promises per distinct ``command_id``. A retry
re-publishes the same ``command_id``: the worker's idempotency table makes that safe, and
whichever attempt's reply arrives first answers the call.

The connection is robust: when the broker goes away, aio-pika reconnects and reopens the
channel, and the client consumes direct reply-to again before it lets the next command out.
A call whose connection dropped under it counts that as a failed attempt and, with retries
left, re-publishes once the client is back (direct reply-to belongs to the old channel, so
the reply to the earlier attempt is lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.connection import make_url
from aio_pika.exceptions import (
    AMQPConnectionError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    DeliveryError,
    InvalidFrameError,
    PublishError,
)
from pydantic import ValidationError

from contracts.commands import Channel, ConfirmCode, IssueCode
from contracts.events import parse_event
from contracts.replies import ConfirmResult, IssueResult
from contracts.topology import (
    COMMANDS_EXCHANGE,
    CONFIRM_ROUTING_KEY,
    EVENTS_EXCHANGE,
    ISSUE_ROUTING_KEY,
    SUBSCRIBER_QUEUE_PREFIX,
)

if TYPE_CHECKING:
    from yarl import URL  # aio-pika's URLs

log = logging.getLogger(__name__)

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
DEFAULT_TIMEOUT = 10.0
DEFAULT_DEDUPE_WINDOW = 4096

ReplyT = TypeVar("ReplyT", IssueResult, ConfirmResult)


class OtpError(Exception):
    """Base of everything the client raises on purpose; the message is one readable line."""


class OtpNoReply(OtpError):
    """Every attempt ended without a reply; retrying with the same ``command_id`` is safe."""


class OtpTimeout(OtpNoReply):
    """No reply arrived in time on any attempt (is a worker consuming ``otp.commands``?),
    the last one having timed out waiting for its reply or for the broker's confirm."""

    def __init__(self, command_id: str, attempts: int, timeout: float) -> None:
        super().__init__(
            f"no reply to command {command_id} after {attempts} attempt(s) of {timeout:g}s each"
        )
        self.command_id = command_id
        self.attempts = attempts


class OtpConnectionLost(OtpNoReply):
    """The last attempt lost its connection to the broker (or found none) before a reply."""

    def __init__(self, command_id: str, attempts: int) -> None:
        super().__init__(
            f"connection to the broker lost; no reply to command {command_id} after "
            f"{attempts} attempt(s)"
        )
        self.command_id = command_id
        self.attempts = attempts


class _Lost(Exception):
    """One attempt found no connection, or lost it while publishing."""


class OtpRefused(OtpNoReply):
    """The broker refused the command (a nack: its queue is full with ``reject-publish``, or
    has no leader); nothing was queued, so sending the same ``command_id`` later is safe."""

    def __init__(self, command_id: str, routing_key: str) -> None:
        super().__init__(
            f"the broker refused {routing_key!r} (command_id {command_id}): nothing was "
            "queued; sending the same command_id again later is safe"
        )
        self.command_id = command_id


class OtpBrokerUserRefused(OtpError):
    """The broker refused a reveal's ``user_id``: it is not the user this connection logged
    in as (RabbitMQ checks). Nothing was queued; the same command fails the same way until
    ``broker_user`` names the connection's own user."""


class OtpUnroutable(OtpError):
    """The broker had no queue for the command: no worker has ever declared its queue."""


class OtpBadReply(OtpError):
    """A reply arrived that is not the contract's reply type."""


async def connect_robust(url: str, *, name: str, timeout: float) -> AbstractRobustConnection:
    """``aio_pika.connect_robust``, except that a connect that fails or is cancelled closes
    the connection it began.

    aio-pika starts the robust connection's reconnect task with the first attempt, and that
    task takes a cancel for a failed attempt, even the one ``asyncio.run`` sends as it ends:
    a cancelled connect (the caller's own timeout, a SIGTERM during start) would leave it
    trying again every few seconds, for ever, and the program unable to exit."""
    connection = aio_pika.RobustConnection(
        make_url(url), client_properties={"connection_name": name}
    )
    try:
        await connection.connect(timeout=timeout)
    except BaseException as exc:
        with contextlib.suppress(Exception):  # the failure to report is the connect's
            await connection.close()
        refused = vhost_refusal(exc, url)
        if refused is not None:
            raise refused from None
        raise
    return connection


async def connect_once(url: str, timeout: float) -> AbstractConnection:
    """``aio_pika.connect`` (no reconnects: for a command-line tool's one look), with a
    refused vhost named as such."""
    try:
        return await aio_pika.connect(url, timeout=timeout)
    except Exception as exc:
        refused = vhost_refusal(exc, url)
        if refused is None:
            raise
        raise refused from None


class VhostRefused(AMQPConnectionError):
    """The broker would not open the URL's vhost for its user."""


def vhost_refusal(exc: BaseException, url: str) -> VhostRefused | None:
    """What a connect's failure means, when the broker closed the connection in answer to
    opening the vhost (it does not exist, or the user has no permissions on it): aiormq
    reports that as an unexpected frame, naming neither the vhost nor the reason."""
    if not (isinstance(exc, InvalidFrameError) and "Connection.Close" in str(exc)):
        return None
    vhost = make_url(url).path[1:] or "/"
    return VhostRefused(
        f"the broker would not open vhost {vhost!r}: it does not exist, or the user has "
        "no permissions on it"
    )


def broker_user_of(url: URL) -> str | None:
    """The user a connection to ``url`` logs in as, or None when the broker names it
    (``auth=external``: the certificate's name, which the client does not know)."""
    if url.query.get("auth", "plain").lower() != "plain":
        return None
    return url.user or "guest"  # aiormq's PLAIN login, "guest" when the URL names none


class OtpClient:
    """One connection, one channel for commands and their replies.

    Direct reply-to requires the consumer on ``amq.rabbitmq.reply-to`` and the publish to
    share a channel, and the consumer must exist before the first publish.
    """

    def __init__(
        self,
        connection: AbstractConnection,
        channel: AbstractChannel,
        commands: AbstractExchange,
        replies: AbstractQueue,
        *,
        timeout: float,
        broker_user: str | None = None,
    ) -> None:
        self._connection = connection
        self._channel = channel
        self._commands = commands
        self._replies = replies
        self._timeout = timeout
        self._pending: dict[str, asyncio.Future[AbstractIncomingMessage | None]] = {}
        """Calls waiting for a reply, by correlation id."""
        self._in_flight: set[asyncio.Future[AbstractIncomingMessage | None]] = set()
        """The ones published on the current connection: ``None`` answers them if it drops."""
        self._ready = asyncio.Event()
        """Set while the connection is up and direct reply-to is consumed on it."""
        self._closed = False
        """Set as ``connect``'s block ends: calls still waiting end at once, not after
        each of their attempts waited ``timeout`` for a connection that will not return."""
        self._broker_user = broker_user
        """Sent as ``user_id`` with a reveal, which a worker may require (and the broker
        checks against the connection's login)."""

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, url: str, *, timeout: float = DEFAULT_TIMEOUT, broker_user: str | None = None
    ) -> AsyncIterator[OtpClient]:
        """``async with OtpClient.connect(url) as otp:`` — closes the connection on exit.

        ``broker_user`` is the user the broker logs this connection in as, sent as
        ``user_id`` with a reveal; by default the URL's login. With ``auth=external`` the
        broker takes it from the client's certificate and the URL does not say it: pass it
        here, or a reveal carries no ``user_id``."""
        connection = await connect_robust(url, name="otp-client", timeout=timeout)
        client: OtpClient | None = None
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            commands = await _existing_exchange(channel, COMMANDS_EXCHANGE)
            replies = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
            client = cls(
                connection,
                channel,
                commands,
                replies,
                timeout=timeout,
                broker_user=broker_user or broker_user_of(make_url(url)),
            )
            await client._consume_replies()
            # The robust channel reopens after a lost connection and after a channel error
            # alike, and calls these each time.
            channel.close_callbacks.add(client._on_lost)
            channel.reopen_callbacks.add(client._on_reconnected)
            yield client
        finally:
            if client is not None:
                client._closed = True
            await connection.close()

    async def issue(
        self,
        *,
        user: str,
        client: str,
        channel: Channel,
        destination: str | None = None,
        purpose: str = "login",
        ttl_seconds: int | None = None,
        locale: str = "en",
        context: Mapping[str, str] | None = None,
        force_new: bool = False,
        reveal: bool = False,
        command_id: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
    ) -> IssueResult:
        command = IssueCode(
            command_id=command_id or str(uuid.uuid4()),
            user=user,
            client=client,
            purpose=purpose,
            ttl_seconds=ttl_seconds,
            channel=channel,
            destination=destination,
            locale=locale,
            context=dict(context or {}),
            force_new=force_new,
            reveal=reveal,
        )
        return await self.call(ISSUE_ROUTING_KEY, command, IssueResult, timeout, retries)

    async def confirm(
        self,
        *,
        user: str,
        client: str,
        code: str,
        purpose: str = "login",
        command_id: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
    ) -> ConfirmResult:
        command = ConfirmCode(
            command_id=command_id or str(uuid.uuid4()),
            user=user,
            client=client,
            purpose=purpose,
            code=code,
        )
        return await self.call(CONFIRM_ROUTING_KEY, command, ConfirmResult, timeout, retries)

    async def call(
        self,
        routing_key: str,
        command: IssueCode | ConfirmCode,
        reply_type: type[ReplyT],
        timeout: float | None = None,
        retries: int = 0,
    ) -> ReplyT:
        """Publishes ``command`` up to ``1 + retries`` times, all with one correlation id.

        An attempt ends with a reply, after ``timeout``, or when the connection drops; the
        next one waits (up to ``timeout``) for the client to be connected again. A publish
        the broker has not confirmed within ``timeout`` (a ``TimeoutError`` out of
        ``_publish``) is an attempt timed out like one without a reply: the broker may have
        the command, and publishing it again is what the shared ``command_id`` makes safe.
        """
        timeout = self._timeout if timeout is None else timeout
        correlation_id = str(uuid.uuid4())
        body = command.model_dump_json(exclude_none=True).encode()
        lost = False
        try:
            for _ in range(retries + 1):
                future = self._pending.get(correlation_id)
                if future is None or future.done():
                    future = asyncio.get_running_loop().create_future()
                    self._pending[correlation_id] = future
                try:
                    await self._publish(routing_key, body, command, correlation_id, timeout)
                    self._in_flight.add(future)
                    message = await asyncio.wait_for(asyncio.shield(future), timeout)
                except TimeoutError:
                    lost = False
                    continue
                except _Lost:
                    message = None
                finally:
                    self._in_flight.discard(future)
                if message is None:
                    lost = True
                    if self._closed:
                        break
                    continue
                return _parse_reply(message, reply_type)
            if lost:
                raise OtpConnectionLost(command.command_id, retries + 1)
            raise OtpTimeout(command.command_id, retries + 1, timeout)
        finally:
            future = self._pending.pop(correlation_id, None)
            if future is not None:
                future.cancel()

    async def _publish(
        self,
        routing_key: str,
        body: bytes,
        command: IssueCode | ConfirmCode,
        correlation_id: str,
        timeout: float,
    ) -> None:
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=command.command_id,
            correlation_id=correlation_id,
            reply_to=DIRECT_REPLY_TO,
            type=type(command).__name__,
            user_id=self._broker_user if getattr(command, "reveal", False) else None,
        )
        if self._closed:
            raise _Lost
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise _Lost from None
        try:
            await self._commands.publish(
                message, routing_key=routing_key, mandatory=True, timeout=timeout
            )
        except (AMQPConnectionError, ChannelInvalidStateError, ConnectionError):
            raise _Lost from None
        except ChannelPreconditionFailed as exc:
            if message.user_id is None or "user_id" not in str(exc):
                raise
            # The broker closed the channel; the robust channel reopens it and consumes
            # direct reply-to again (``_on_reconnected``). Until then the next call waits.
            if self._channel.is_closed:
                self._ready.clear()
            raise OtpBrokerUserRefused(
                f"the broker refused {routing_key!r} (command_id {command.command_id}) "
                f"with user_id {message.user_id!r}: {exc.args[0] if exc.args else exc}; "
                "pass broker_user= the user this connection logs in as"
            ) from None
        except PublishError as exc:
            raise OtpUnroutable(
                f"no queue takes {routing_key!r} on {COMMANDS_EXCHANGE}: has a worker ever run "
                "against this broker?"
            ) from exc
        except DeliveryError as exc:  # a nack; PublishError (a return) is one too, caught above
            raise OtpRefused(command.command_id, routing_key) from exc

    async def _consume_replies(self) -> None:
        # Direct reply-to must be consumed before the first publish on a channel, and the
        # robust channel does not restore it: this runs at connect and after each reconnect.
        await self._replies.consume(self._on_reply, no_ack=True)
        self._ready.set()

    def _on_lost(self, _channel: object, _exc: BaseException | None = None) -> None:
        self._ready.clear()
        for future in self._in_flight:
            if not future.done():
                future.set_result(None)
        self._in_flight.clear()

    async def _on_reconnected(self, _channel: object) -> None:
        try:
            await self._consume_replies()
        except Exception:
            # The connection went away again; the next reopen tries once more.
            log.warning("could not consume direct reply-to after reconnecting", exc_info=True)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.get(message.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(message)

    @asynccontextmanager
    async def subscribe(
        self, pattern: str = "#", *, dedupe_window: int = DEFAULT_DEDUPE_WINDOW
    ) -> AsyncIterator[EventStream]:
        """Binds an exclusive queue, ``otp.subscriber.<random>``, to ``otp.events`` before
        yielding (the prefix is the only one the deploy files' subscriber user may use).

        Events published after this returns are seen. The queue goes with the connection;
        after a reconnect the robust channel declares and binds it anew, so the events
        published in between are not seen.
        """
        channel = await self._connection.channel()
        try:
            await channel.set_qos(prefetch_count=256)
            exchange = await _existing_exchange(channel, EVENTS_EXCHANGE)
            name = f"{SUBSCRIBER_QUEUE_PREFIX}client-{uuid.uuid4().hex}"
            queue = await channel.declare_queue(name, exclusive=True, auto_delete=True)
            await queue.bind(exchange, pattern)
            yield EventStream(queue, dedupe_window)
        finally:
            if not channel.is_closed:
                await channel.close()

    async def events(
        self, pattern: str = "#", *, dedupe_window: int = DEFAULT_DEDUPE_WINDOW
    ) -> AsyncIterator[Any]:
        """``async for event in otp.events("code.*")``: parsed, deduplicated events.

        The queue is bound when iteration starts, not when this is called, and nothing says
        when that happened: to be sure to see what a call made next publishes, enter
        ``subscribe()`` first and iterate its stream.
        """
        async with self.subscribe(pattern, dedupe_window=dedupe_window) as stream:
            async for event in stream:
                yield event


class EventStream:
    """Parsed events from one subscription, each ``event_id`` at most once.

    Events are published at least once (the outbox may repeat one after a crash), so the
    stream remembers the last ``dedupe_window`` ids; unknown event names are skipped.
    """

    def __init__(self, queue: AbstractQueue, dedupe_window: int) -> None:
        self._queue = queue
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._window = max(1, dedupe_window)

    async def __aiter__(self) -> AsyncIterator[Any]:
        async with self._queue.iterator() as messages:
            async for message in messages:
                # One that came before a reconnect cannot be acked: its channel and its
                # exclusive queue went with the old connection, so nothing is left to ack.
                with contextlib.suppress(AMQPConnectionError, ChannelInvalidStateError):
                    await message.ack()
                try:
                    event = parse_event(message.body)
                except ValidationError:
                    continue
                if self._remember(event.event_id):
                    yield event

    def _remember(self, event_id: str) -> bool:
        if event_id in self._seen:
            self._seen.move_to_end(event_id)
            return False
        self._seen[event_id] = None
        if len(self._seen) > self._window:
            self._seen.popitem(last=False)
        return True


async def _existing_exchange(channel: AbstractChannel, name: str) -> AbstractExchange:
    """The service declares the topology; a producer only checks it is there."""
    try:
        return await channel.get_exchange(name, ensure=True)
    except ChannelNotFoundEntity:
        raise OtpError(
            f"exchange {name!r} does not exist: start the worker once to declare the topology"
        ) from None


def _parse_reply(message: AbstractIncomingMessage, reply_type: type[ReplyT]) -> ReplyT:
    try:
        return reply_type.model_validate_json(message.body)
    except ValidationError as exc:
        raise OtpBadReply(f"reply is not a valid {reply_type.__name__}: {exc}") from None


__all__ = [
    "EventStream",
    "OtpBadReply",
    "OtpBrokerUserRefused",
    "OtpClient",
    "OtpConnectionLost",
    "OtpError",
    "OtpNoReply",
    "OtpRefused",
    "OtpTimeout",
    "OtpUnroutable",
]
