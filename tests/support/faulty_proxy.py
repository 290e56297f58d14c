"""An HTTP proxy in front of a real registry that injects the faults registries really have."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

# decide(method, path, headers) -> None to forward, an HTTP status to answer with, or "reset"
FaultRule = Callable[[str, str, dict[str, str]], int | str | None]


@dataclass
class FaultyProxy:
    """Forwards plain-HTTP requests to `upstream`, unless `rule` injects a fault first."""

    upstream: str
    rule: FaultRule
    requests: list[tuple[str, str, int | str]] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _client: httpx.AsyncClient | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> FaultyProxy:
        self._client = httpx.AsyncClient(base_url=f"http://{self.upstream}", timeout=30)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None and self._client is not None
        self._server.close()
        await self._server.wait_closed()
        await self._client.aclose()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        line = await reader.readline()
        if not line:
            return False
        method, target, _ = line.decode().split(" ", 2)
        headers: dict[str, str] = {}
        while (raw := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = raw.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        fault = self.rule(method, target, headers)
        self.requests.append((method, target, fault or "forwarded"))
        if fault == "reset":
            writer.transport.abort()  # an RST, as a dying load balancer sends
            return False
        if isinstance(fault, int):
            # a body in the distribution spec's error format, as real registries send
            error = b'{"errors":[{"code":"INJECTED","message":"injected by the test proxy"}]}'
            writer.write(
                f"HTTP/1.1 {fault} Injected\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(error)}\r\n\r\n".encode()
                + error
            )
            await writer.drain()
            return True
        assert self._client is not None
        forwarded = {k: v for k, v in headers.items() if k not in ("host", "content-length")}
        response = await self._client.request(method, target, headers=forwarded, content=body)
        head = [f"HTTP/1.1 {response.status_code} {response.reason_phrase}"]
        for name, value in response.headers.items():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                head.append(f"{name}: {value}")
        head.append(f"Content-Length: {len(response.content)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + response.content)
        await writer.drain()
        return True
