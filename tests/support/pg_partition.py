"""A partition between one PostgreSQL client and the server: a TCP proxy that can go silent.

The election's tests use it on the event loop; the real-process tests run it in a thread
of its own (ThreadedProxy) and point one coordinator's --database at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


class FreezableProxy:
    """TCP between the election's session and the server that can go silent (a partition:
    nothing passes either way, the sockets stay open) and later drop the server's side (the
    server noticing the silent peer, which its keepalives do after SERVER_SILENCE)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.frozen = asyncio.Event()
        self.closed = asyncio.Event()
        self.upstreams: list[asyncio.StreamWriter] = []
        self.clients: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def cut_server_side(self) -> None:
        for writer in self.upstreams:
            writer.transport.abort()

    async def close(self) -> None:
        self.closed.set()
        for writer in [*self.upstreams, *self.clients]:
            writer.transport.abort()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients.append(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.upstreams.append(up_writer)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(1 << 16):
                if self.frozen.is_set():
                    await self.closed.wait()  # silence: hold the bytes, send nothing
                    return
                dst.write(data)
                await dst.drain()

        with contextlib.suppress(ConnectionError):
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


def via_port(dsn: str, port: int, work: Path) -> str:
    """`dsn` through another port; its password file gets a line for that port too."""
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    host, _port, rest = Path(query["passfile"]).read_text().splitlines()[0].split(":", 2)
    passfile = work / "proxied.pgpass"
    passfile.write_text(f"{host}:{port}:{rest}\n")
    passfile.chmod(0o600)
    query["passfile"] = str(passfile)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{port}"
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))


class ThreadedProxy:
    """A FreezableProxy on an event loop in its own thread, for tests that are not async."""

    def __init__(self, upstream_port: int) -> None:
        self.proxy = FreezableProxy(upstream_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def _call(self, coroutine: object) -> object:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)  # type: ignore[arg-type]
        return future.result(timeout=30)

    def start(self) -> int:
        self._thread.start()
        return int(self._call(self.proxy.start()))  # type: ignore[call-overload]

    def freeze(self) -> None:
        """Nothing passes either way from now on; the sockets stay open."""
        self._loop.call_soon_threadsafe(self.proxy.frozen.set)

    def cut_server_side(self) -> None:
        """The server drops the silent peer, as its keepalives do after a while."""
        self._loop.call_soon_threadsafe(self.proxy.cut_server_side)

    def close(self) -> None:
        self._call(self.proxy.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@contextlib.contextmanager
def partitionable(dsn: str, work: Path) -> Iterator[tuple[ThreadedProxy, str]]:
    """(proxy, the DSN through it) in front of `dsn`'s server; closed after."""
    proxy = ThreadedProxy(urlsplit(dsn).port or 5432)
    port = proxy.start()
    try:
        yield proxy, via_port(dsn, port, work)
    finally:
        proxy.close()
