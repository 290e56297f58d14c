"""An async client for the coordinator's build and fleet APIs, with errors a CLI can print."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import grpc

from polyarch.client.context import PackedContext
from polyarch.client.credentials import Credentials
from polyarch.proto.active_coordinator import MAX_REDIRECTS, active_named
from polyarch.proto.registries import backoff_delay
from polyarch.proto.trust import ClientTrust, PinMismatch, TokenFormatError, aio_channel
from polyarch.proto.v1 import (
    build_pb2,
    build_pb2_grpc,
    common_pb2,
    fleet_pb2,
    fleet_pb2_grpc,
    trust_pb2,
    trust_pb2_grpc,
)

DEFAULT_COORDINATOR = "127.0.0.1:7600"
COORDINATOR_ENV = "POLYARCH_COORDINATOR"
CHUNK_SIZE = 1 << 20
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_RPC_TIMEOUT = 60.0
# How long `follow` keeps trying to get back to a coordinator that went away, and the
# longest wait between tries (they back off up to it).
RECONNECT_WINDOW = 60.0
RECONNECT_DELAY = 2.0
_TERMINAL = frozenset(
    {
        common_pb2.BUILD_STATE_SUCCEEDED,
        common_pb2.BUILD_STATE_FAILED,
        common_pb2.BUILD_STATE_CANCELLED,
    }
)

_T = TypeVar("_T")


# A long, quiet watch must notice a coordinator that vanished without closing the
# connection; the coordinator permits pings every 5 s, so 30 s is well inside its policy.
_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class PolyarchError(Exception):
    """An error the coordinator reported (or the client detected), with the gRPC code if any."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class CoordinatorUnreachable(PolyarchError):
    """No polyarch coordinator answers at the configured address; `active` is the address a
    standby named as the active one's (its `polyarch-active` trailing metadata), if any."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, active: str = "") -> None:
        super().__init__(message, code)
        self.active = active


def coordinator_addresses(address: str) -> list[str]:
    """`a:7600,b:7600` -> the addresses to try, in order (one: just it)."""
    return [part.strip() for part in address.split(",") if part.strip()] or [address]


def _reason(details: str) -> str:
    """The useful tail of a gRPC connection error: 'connection refused', 'domain name not found'."""
    if "CERTIFICATE_VERIFY_FAILED" in details or "handshake failed" in details.lower():
        why = details.rsplit("OPENSSL_internal:", 1)[-1].removesuffix(": OK")
        return (
            f"TLS handshake failed ({why.strip()}): the coordinator's certificate is not "
            "trusted; use a token that pins its CA, or --ca-file"
        )
    tail = details.rsplit(": ", 1)[-1].strip(" []")
    if tail.lower() == "socket closed":
        return "the connection was closed at once (plaintext to a TLS port? drop --insecure)"
    return tail.lower() if tail else details


class BuildClient:
    """Talks to one coordinator; use as `async with BuildClient(addr) as client:`.

    Entering the context waits at most `connect_timeout` seconds for the
    connection, so a wrong address fails fast with CoordinatorUnreachable.
    Unary calls are bounded by `rpc_timeout`; uploads and watches are not.
    """

    def __init__(
        self,
        address: str,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        rpc_timeout: float = DEFAULT_RPC_TIMEOUT,
        credentials: Credentials | None = None,
    ) -> None:
        # several coordinators (one active, standbys): connect() tries them in order, and a
        # standby's refusal sends this client to the active one it names
        self.addresses = coordinator_addresses(address)
        self.address = self.addresses[0]
        self.connect_timeout = connect_timeout
        self.rpc_timeout = rpc_timeout
        self.credentials = credentials or Credentials()
        self._channel: grpc.aio.Channel | None = None
        self._build: Any = None
        self._fleet: Any = None
        self._trust: Any = None
        self._refused = ""

    async def __aenter__(self) -> BuildClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _unreachable(self, reason: str) -> CoordinatorUnreachable:
        return CoordinatorUnreachable(
            f"cannot reach the polyarch coordinator at {self.address}: {reason}; "
            "is `polyarch coordinator` running? "
            f"set --coordinator or {COORDINATOR_ENV}",
            grpc.StatusCode.UNAVAILABLE,
        )

    async def connect(self) -> None:
        """Opens the channel and waits (bounded) until a coordinator answers: the current
        address first, then the others given, in order."""
        if self._channel is not None:
            return
        start = self.addresses.index(self.address) if self.address in self.addresses else 0
        order = [self.address] + [
            a for a in self.addresses[start + 1 :] + self.addresses[:start] if a != self.address
        ]
        for n, address in enumerate(order):
            self.address = address
            try:
                await self._connect_current()
                return
            except CoordinatorUnreachable:
                if n == len(order) - 1:
                    raise

    def follow_active(self, error: PolyarchError) -> bool:
        """Points this client at the active coordinator a standby named; True if it moved
        (the caller reconnects). Also moves on to the next address given, if several."""
        active = error.active if isinstance(error, CoordinatorUnreachable) else ""
        if active and active != self.address:
            if active not in self.addresses:
                self.addresses.append(active)
            self.address = active
            return True
        if len(self.addresses) > 1 and self.address in self.addresses:
            at = self.addresses.index(self.address)
            self.address = self.addresses[(at + 1) % len(self.addresses)]
        return False

    async def _connect_current(self) -> None:
        try:
            trust = await asyncio.wait_for(self._resolve_trust(), self.connect_timeout)
        except TimeoutError:
            raise self._unreachable(self._refused or "no answer") from None
        except OSError as exc:
            raise self._unreachable(_reason(str(exc)) or "no answer") from None
        except PinMismatch as exc:
            raise PolyarchError(str(exc), grpc.StatusCode.UNAUTHENTICATED) from None
        except TokenFormatError as exc:
            raise PolyarchError(str(exc), grpc.StatusCode.INVALID_ARGUMENT) from None
        channel = aio_channel(self.address, trust, _KEEPALIVE)
        self._channel = channel
        self._build = build_pb2_grpc.BuildServiceStub(channel)
        self._fleet = fleet_pb2_grpc.FleetServiceStub(channel)
        self._trust = trust_pb2_grpc.TrustServiceStub(channel)
        try:
            await asyncio.wait_for(channel.channel_ready(), self.connect_timeout)
        except TimeoutError:
            reason = await self._probe()
            await self.close()
            raise self._unreachable(reason) from None
        except BaseException:
            await self.close()
            raise

    async def _resolve_trust(self) -> ClientTrust:
        """Credentials.resolve, retried while the coordinator refuses connections (as gRPC's
        own connect does until the timeout): pinning the CA dials the coordinator."""
        attempt = 0
        while True:
            try:
                return await asyncio.to_thread(self.credentials.resolve, self.address)
            except ConnectionRefusedError:
                self._refused = "connection refused"
                await asyncio.sleep(backoff_delay(attempt, 0.2, cap=1.0))
                attempt += 1

    async def _probe(self) -> str:
        """Why the channel is not ready: one fail-fast call reveals gRPC's last error."""
        try:
            await self._build.StatContext(build_pb2.StatContextRequest(), timeout=1.0)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                return _reason(exc.details() or "")
        return f"no answer within {self.connect_timeout:g} s"

    async def close(self) -> None:
        """Closes the channel (idempotent); the stubs go with it, so a later call says the
        client is not connected rather than "Channel is closed"."""
        channel, self._channel = self._channel, None
        self._build = self._fleet = self._trust = None
        if channel is not None:
            await channel.close(None)

    def _error(self, exc: grpc.aio.AioRpcError) -> PolyarchError:
        code = exc.code()
        details = exc.details() or code.name
        if code == grpc.StatusCode.UNAVAILABLE:
            active = active_named(exc.trailing_metadata())
            if active:
                return CoordinatorUnreachable(
                    f"the coordinator at {self.address} is a standby; the active one is "
                    f"{active}", code, active=str(active),
                )  # fmt: skip
            return self._unreachable(_reason(details))
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return CoordinatorUnreachable(
                f"the service at {self.address} does not speak the polyarch API ({details}); "
                f"is --coordinator (or {COORDINATOR_ENV}) right?",
                code,
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return PolyarchError(f"the coordinator at {self.address} did not answer in time", code)
        return PolyarchError(details, code)

    async def _call(self, call: Callable[..., Awaitable[_T]], request: Any) -> _T:
        """A unary call; a standby's refusal is followed to the active one (a few times)."""
        for _ in range(MAX_REDIRECTS):
            try:
                return await call(request, timeout=self.rpc_timeout)
            except grpc.aio.AioRpcError as exc:
                error = self._error(exc)
                if not (isinstance(error, CoordinatorUnreachable) and error.active):
                    raise error from None
                where = self._find(call)
                if where is None or not self.follow_active(error):
                    raise error from None
                await self.close()
                await self.connect()
                call = getattr(self._stubs()[where[0]], where[1])
        raise error

    def _stubs(self) -> tuple[Any, Any, Any]:
        return self._build, self._fleet, self._trust

    def _find(self, call: object) -> tuple[int, str] | None:
        """Which stub's which method `call` is, to call it again on a new channel."""
        for n, stub in enumerate(self._stubs()):
            for name, method in vars(stub or object()).items():
                if method is call:
                    return n, name
        return None

    # -- build API -------------------------------------------------------------------------

    async def upload_context(self, packed: PackedContext) -> bool:
        """Uploads a packed context unless the coordinator has it; True when bytes were sent."""
        stat = await self._call(
            self._stub().StatContext, build_pb2.StatContextRequest(digest=packed.digest)
        )
        if stat.present:
            return False
        if 0 < stat.max_bytes < packed.size:
            raise PolyarchError(
                f"the build context is {packed.size} bytes; this coordinator accepts at most "
                f"{stat.max_bytes} (its --limit max_context_bytes): trim it with .dockerignore",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )

        async def chunks() -> AsyncIterator[common_pb2.ContextChunk]:
            with packed.path.open("rb") as source:
                data = await asyncio.to_thread(source.read, CHUNK_SIZE)
                yield common_pb2.ContextChunk(digest=packed.digest, size=packed.size, data=data)
                while data := await asyncio.to_thread(source.read, CHUNK_SIZE):
                    yield common_pb2.ContextChunk(data=data)

        try:
            response = await self._stub().UploadContext(chunks())
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INTERNAL and "from Core" in (exc.details() or ""):
                # grpc/grpc#36066: a server that ends an upload early (a limit) while the
                # client still writes can surface as this instead of the server's status
                raise PolyarchError(
                    "the coordinator ended the upload early: a limit on concurrent uploads "
                    "or on time between chunks was reached; try again",
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                ) from None
            raise self._error(exc) from None
        return not response.already_present

    # -- incremental contexts (client/context_upload.py drives them) -------------------

    async def stat_context(self, digest: str) -> build_pb2.StatContextResponse:
        return await self._call(
            self._stub().StatContext, build_pb2.StatContextRequest(digest=digest)
        )

    async def upload_manifest(self, digest: str, data: bytes) -> build_pb2.UploadContextResponse:
        """Uploads a context manifest (kind MANIFEST); the answer counts the blobs it lacks."""

        async def chunks() -> AsyncIterator[common_pb2.ContextChunk]:
            yield common_pb2.ContextChunk(
                digest=digest, size=len(data), data=data[:CHUNK_SIZE],
                kind=common_pb2.CONTEXT_KIND_MANIFEST,
            )  # fmt: skip
            for start in range(CHUNK_SIZE, len(data), CHUNK_SIZE):
                yield common_pb2.ContextChunk(data=data[start : start + CHUNK_SIZE])

        try:
            response: build_pb2.UploadContextResponse = await self._stub().UploadContext(chunks())
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        return response

    async def missing_blobs(self, digest: str) -> list[common_pb2.BlobRange]:
        """The blobs an uploaded manifest still lacks, each from the offset to resume at."""
        call = self._stub().MissingBlobs(
            build_pb2.MissingBlobsRequest(context_digest=digest), timeout=self.rpc_timeout
        )
        try:
            return [blob async for blob in call]
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None

    async def upload_blobs(
        self, messages: AsyncIterator[build_pb2.UploadBlobsChunk]
    ) -> build_pb2.UploadBlobsResponse:
        """One UploadBlobs stream (the first message names the manifest); not bounded in time."""
        try:
            response: build_pb2.UploadBlobsResponse = await self._stub().UploadBlobs(messages)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        return response

    async def submit(
        self,
        *,
        context_digest: str,
        platforms: Iterable[str],
        tags: Iterable[str],
        dockerfile: str = "Dockerfile",
        build_args: Mapping[str, str] | None = None,
        target: str = "",
        labels: Mapping[str, str] | None = None,
        emulation: common_pb2.EmulationPolicy = common_pb2.EMULATION_POLICY_FALLBACK,
        idempotency_key: str = "",
        cache_from: Iterable[str] = (),
        cache_to: Iterable[str] = (),
        registry_auths: Iterable[tuple[str, str, str]] = (),
        secrets: Mapping[str, bytes] | None = None,
        no_cache: bool = False,
        pull: bool = False,
        annotations: Iterable[str] = (),
        no_publish: bool = False,
        scan_command: str = "",
        provenance: str = "",
        sign_key: bytes = b"",
        sign_with: str = "",
    ) -> build_pb2.SubmitBuildResponse:
        """Submits a build; the response's `existing` says the idempotency key matched one.

        registry_auths (registry, username, password), secrets and the PEM sign_key travel
        with this build only and are held in the coordinator's memory, never stored."""
        request = build_pb2.SubmitBuildRequest(
            context_digest=context_digest,
            dockerfile=dockerfile,
            platforms=list(platforms),
            tags=list(tags),
            build_args=dict(build_args or {}),
            target=target,
            labels=dict(labels or {}),
            emulation=emulation,
            idempotency_key=idempotency_key,
            cache_from=list(cache_from),
            cache_to=list(cache_to),
            registry_auths=[
                common_pb2.RegistryAuth(registry=r, username=u, password=p)
                for r, u, p in registry_auths
            ],
            secrets=[common_pb2.BuildSecret(id=k, value=v) for k, v in (secrets or {}).items()],
            no_cache=no_cache,
            pull=pull,
            annotations=list(annotations),
            no_publish=no_publish,
            scan_command=scan_command,
            provenance=provenance,
            sign_key=sign_key,
            sign_with=sign_with,
        )
        return await self._call(self._stub().SubmitBuild, request)

    async def watch(self, build_id: str, log_tail: int = 0) -> AsyncIterator[build_pb2.BuildEvent]:
        """The build's snapshot, then every change and log line until the server ends the stream."""
        call = self._stub().WatchBuild(
            build_pb2.WatchBuildRequest(build_id=build_id, log_tail=log_tail)
        )
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        finally:
            call.cancel()

    async def follow(
        self,
        build_id: str,
        on_event: Callable[[build_pb2.BuildEvent], None],
        on_lost: Callable[[str], None] | None = None,
        reconnect_window: float | None = None,
    ) -> build_pb2.Build:
        """Watches until the build ends and returns it, re-attaching if the coordinator drops.

        A coordinator gone for longer than `reconnect_window` seconds raises
        CoordinatorUnreachable (default RECONNECT_WINDOW); the build lives on in the coordinator.
        """
        outage = _Outage(self, reconnect_window, on_lost, f"re-attaching to build {build_id}")
        while True:
            try:
                if self._channel is None:
                    await self.connect()  # CoordinatorUnreachable while it is still down
                async for event in self.watch(build_id):
                    outage.over()
                    on_event(event)
                    if event.WhichOneof("event") == "build" and event.build.state in _TERMINAL:
                        return event.build
                build = await self.get_build(build_id)
                if build.state in _TERMINAL:
                    on_event(build_pb2.BuildEvent(build=build))
                    return build
            except CoordinatorUnreachable as exc:
                await outage.wait(exc)
            except PolyarchError as exc:
                # the coordinator cut off a watch that fell too far behind: watch again
                if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                if on_lost is not None:
                    on_lost(f"{exc}; watching build {build_id} again")

    async def retrying(
        self,
        operation: Callable[[], Awaitable[_T]],
        on_lost: Callable[[str], None] | None = None,
        reconnect_window: float | None = None,
    ) -> _T:
        """Runs `operation`, and again after reconnecting while the coordinator is unreachable
        (a restart, a takeover), for up to `reconnect_window` seconds (default
        RECONNECT_WINDOW). Only for operations that are safe to repeat: a submit with the same
        idempotency key, a context upload (content-addressed)."""
        outage = _Outage(self, reconnect_window, on_lost, "trying again")
        while True:
            try:
                if self._channel is None:
                    await self.connect()
                return await operation()
            except PolyarchError as exc:
                if exc.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                await outage.wait(exc)

    async def export(
        self,
        build_id: str,
        export_format: build_pb2.ExportFormat,
        platforms: Iterable[str] = (),
        registry_auths: Iterable[tuple[str, str, str]] = (),
    ) -> AsyncIterator[bytes]:
        """A succeeded build's export (build_pb2.ExportFormat) as a tar stream, in chunks."""
        call = self._stub().ExportBuild(
            build_pb2.ExportBuildRequest(
                build_id=build_id, format=export_format, platforms=list(platforms),
                registry_auths=[
                    common_pb2.RegistryAuth(registry=r, username=u, password=p)
                    for r, u, p in registry_auths
                ],
            )
        )  # fmt: skip
        try:
            async for chunk in call:
                yield chunk.data
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        finally:
            call.cancel()

    async def get_build(self, build_id: str) -> build_pb2.Build:
        return await self._call(self._stub().GetBuild, build_pb2.GetBuildRequest(build_id=build_id))

    async def cancel_build(self, build_id: str, reason: str = "") -> build_pb2.Build:
        return await self._call(
            self._stub().CancelBuild,
            build_pb2.CancelBuildRequest(build_id=build_id, reason=reason),
        )

    async def list_builds(self, limit: int = 0) -> list[build_pb2.Build]:
        """Up to `limit` builds, newest first, following pages (0: one page of the default)."""
        builds: list[build_pb2.Build] = []
        token = ""
        while True:
            wanted = limit - len(builds) if limit > 0 else 0
            # limit too: a coordinator from before pagination reads only that
            request = build_pb2.ListBuildsRequest(limit=wanted, page_size=wanted, page_token=token)
            response = await self._call(self._stub().ListBuilds, request)
            builds.extend(response.builds)
            token = response.next_page_token
            if not token or limit <= 0 or len(builds) >= limit or not response.builds:
                return builds[:limit] if limit > 0 else builds

    # -- fleet API -------------------------------------------------------------------------

    async def list_agents(self) -> list[fleet_pb2.Agent]:
        response = await self._call(self._fleet_stub().ListAgents, fleet_pb2.ListAgentsRequest())
        return list(response.agents)

    async def drain_agent(self, name: str) -> fleet_pb2.Agent:
        return await self._call(
            self._fleet_stub().DrainAgent, fleet_pb2.DrainAgentRequest(name=name)
        )

    async def undrain_agent(self, name: str) -> fleet_pb2.Agent:
        return await self._call(
            self._fleet_stub().UndrainAgent, fleet_pb2.DrainAgentRequest(name=name)
        )

    # -- trust API -------------------------------------------------------------------------

    async def create_token(
        self, role: trust_pb2.TokenRole, ttl_seconds: int = 0, description: str = ""
    ) -> trust_pb2.CreateTokenResponse:
        request = trust_pb2.CreateTokenRequest(
            role=role, ttl_seconds=ttl_seconds, description=description
        )
        return await self._call(self._trust_stub().CreateToken, request)

    async def list_tokens(self) -> list[trust_pb2.Token]:
        response = await self._call(self._trust_stub().ListTokens, trust_pb2.ListTokensRequest())
        return list(response.tokens)

    async def revoke_token(self, token_id: str) -> trust_pb2.Token:
        return await self._call(
            self._trust_stub().RevokeToken, trust_pb2.RevokeTokenRequest(id=token_id)
        )

    async def revoke_enrolment(self, name: str) -> bool:
        """Forgets agent `name`'s enrolment (admin); False when it was not enrolled."""
        response = await self._call(
            self._trust_stub().RevokeEnrolment, trust_pb2.RevokeEnrolmentRequest(name=name)
        )
        return bool(response.revoked)

    def _trust_stub(self) -> Any:
        if self._trust is None:
            raise PolyarchError("BuildClient used outside `async with` (call connect() first)")
        return self._trust

    def _stub(self) -> Any:
        if self._build is None:
            raise PolyarchError("BuildClient used outside `async with` (call connect() first)")
        return self._build

    def _fleet_stub(self) -> Any:
        if self._fleet is None:
            raise PolyarchError("BuildClient used outside `async with` (call connect() first)")
        return self._fleet


class _Outage:
    """One operation's budget for a coordinator that went away: how long it has been gone,
    and a growing pause between attempts; the first loss is reported, the rest are quiet."""

    def __init__(
        self,
        client: BuildClient,
        window: float | None,
        on_lost: Callable[[str], None] | None,
        doing: str,
    ) -> None:
        self.client = client
        self.window = RECONNECT_WINDOW if window is None else window
        self.on_lost = on_lost
        self.doing = doing
        self.since: float | None = None
        self.failures = 0
        self.redirects = 0

    def over(self) -> None:
        self.since, self.failures, self.redirects = None, 0, 0

    async def wait(self, error: PolyarchError) -> None:
        """Re-raises `error` once the coordinator has been gone longer than the window. A
        standby's refusal naming the active one is followed at once (a few times in a row);
        otherwise the next address given is tried after a pause."""
        now = asyncio.get_running_loop().time()
        self.since = now if self.since is None else self.since
        if now - self.since > self.window:
            raise error
        moved = self.client.follow_active(error)
        await self.client.close()
        if moved and self.redirects < MAX_REDIRECTS:
            self.redirects += 1
            return
        self.redirects = 0
        if self.on_lost is not None and self.failures == 0:
            self.on_lost(f"lost the coordinator ({error}); {self.doing}")
        await asyncio.sleep(backoff_delay(self.failures, RECONNECT_DELAY / 8, RECONNECT_DELAY))
        self.failures += 1
