"""A small TCP proxy the tests put between a process and the broker, and cut at will."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._to_client = asyncio.Event()
        self._to_client.set()
        self.connections = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def hold_from_broker(self) -> None:
        """Holds back everything the broker sends (confirms, deliveries) until ``release``,
        like a link that is slow in one direction; what the client sends still gets through."""
        self._to_client.clear()

    def release(self) -> None:
        self._to_client.set()

    async def cut(self) -> None:
        """Stops accepting and drops every open link, like a network failure."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()
        self.release()  # what was held goes nowhere: its links are closed

    async def restore(self) -> None:
        await self.start()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._links.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer),
            self._pipe(up_reader, writer, self._to_client),
            return_exceptions=True,
        )

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        flowing: asyncio.Event | None = None,
    ) -> None:
        try:
            while data := await reader.read(65536):
                if flowing is not None:
                    await flowing.wait()
                if writer.transport.is_closing():
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._links.discard(writer)
            with contextlib.suppress(Exception):
                writer.transport.abort()


@contextlib.asynccontextmanager
async def proxied(url: str, reconnect_interval: float = 0.2) -> AsyncIterator[tuple[TcpProxy, str]]:
    """A proxy to the broker of ``url``, and that URL through it (a robust connection retries
    every ``reconnect_interval`` seconds); the proxy is cut on the way out."""
    parts = urlsplit(url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    await proxy.start()
    through = (
        f"amqp://guest:guest@127.0.0.1:{proxy.port}{parts.path}"
        f"?reconnect_interval={reconnect_interval:g}"
    )
    try:
        yield proxy, through
    finally:
        await proxy.cut()
