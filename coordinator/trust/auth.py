"""Who may call what: the per-RPC access table, tokens, agent identities and the interceptor."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import hmac
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from polyarch.coordinator.core.model import (
    NotFound,
    PermissionDenied,
    PolyarchError,
    Unauthenticated,
)
from polyarch.coordinator.trust.store import TokenRecord, TrustStore
from polyarch.coordinator.wire.errors import status_code
from polyarch.proto.trust import (
    AUTHORIZATION_KEY,
    NAME_PATTERN,
    Role,
    TokenFormatError,
    TokenText,
    parse_token,
    secret_digest,
    write_private,
)


class Access(enum.Enum):
    """Requirements that are not a token role."""

    PUBLIC = "public"  # no credentials at all (health checks)
    AGENT_CERT = "agent certificate"  # an enrolled agent's client certificate (mTLS port)


Requirement = Role | Access

_B, _F, _T, _A = (f"/polyarch.v1.{s}/" for s in ("BuildService", "FleetService", "TrustService",
                                                 "AgentService"))  # fmt: skip
# Every RPC the coordinator serves, and what it needs. Not listed: refused (deny by default).
METHOD_ACCESS: dict[str, Requirement] = {
    _B + "StatContext": Role.CI,
    _B + "UploadContext": Role.CI,
    _B + "MissingBlobs": Role.CI,
    _B + "UploadBlobs": Role.CI,
    _B + "SubmitBuild": Role.CI,
    _B + "WatchBuild": Role.CI,
    _B + "CancelBuild": Role.CI,  # its own builds; admin: any
    _B + "ExportBuild": Role.CI,  # its own builds; admin: any
    _B + "GetBuild": Role.READ,
    _B + "ListBuilds": Role.READ,
    _F + "ListAgents": Role.READ,
    _F + "DrainAgent": Role.ADMIN,
    _F + "UndrainAgent": Role.ADMIN,
    _T + "CreateToken": Role.ADMIN,
    _T + "ListTokens": Role.ADMIN,
    _T + "RevokeToken": Role.ADMIN,
    _T + "Enroll": Role.AGENT,
    _T + "RevokeEnrolment": Role.ADMIN,
    _A + "Connect": Access.AGENT_CERT,
    _A + "FetchContext": Access.AGENT_CERT,  # and only a context of a job assigned to it
    _A + "FetchBlobs": Access.AGENT_CERT,  # and only blobs such a context lists
    "/grpc.health.v1.Health/Check": Access.PUBLIC,
    "/grpc.health.v1.Health/Watch": Access.PUBLIC,
    "/grpc.health.v1.Health/List": Access.PUBLIC,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Role.READ,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": Role.READ,
}


@dataclass(frozen=True)
class Principal:
    """The caller of the current RPC."""

    role: Role
    token_id: str = ""  # the token it presented ("" for agents and --insecure)
    agent_name: str = ""  # the enrolled name in its client certificate
    expires_at: float | None = None

    @property
    def label(self) -> str:
        return f"agent {self.agent_name}" if self.agent_name else f"token {self.token_id or '-'}"


# --insecure: no credentials exist, so every caller may do everything.
ANONYMOUS = Principal(role=Role.ADMIN)
_current: ContextVar[Principal] = ContextVar("polyarch_principal", default=ANONYMOUS)


def current_principal() -> Principal:
    """The caller of the RPC being served (ANONYMOUS when auth is off)."""
    return _current.get()


class TokenBook:
    """Creates, checks and revokes tokens; only secrets' hashes are kept."""

    def __init__(
        self, store: TrustStore, ca_sha256: str | None, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.ca_sha256 = ca_sha256
        self.clock = clock
        self._revoked: dict[str, asyncio.Event] = {}
        # a revocation made on another coordinator ends this one's streams too
        store.on_revoked(self._revoked_elsewhere)

    def create(self, role: Role, ttl: float = 0, description: str = "") -> TokenText:
        if len(description) > 256 or not description.isprintable():
            raise PermissionDenied("a token description is at most 256 printable characters")
        now = self.clock()
        text = TokenText(secrets.token_hex(6), secrets.token_hex(32), self.ca_sha256)
        self.store.add_token(
            TokenRecord(text.token_id, role, secret_digest(text.secret), description, now,
                        now + ttl if ttl > 0 else None)
        )  # fmt: skip
        return text

    def ensure_admin_token(self, path: Path) -> bool:
        """Writes a new admin token to `path` (0600) when the store holds no token at all (a
        coordinator joining a shared database mints none); True if it did."""
        if self.store.list_tokens():
            return False
        text = self.create(Role.ADMIN, description=f"first admin token ({path.name})")
        write_private(path, f"{text}\n".encode())
        return True

    def revoke(self, token_id: str) -> TokenRecord:
        record = self.store.revoke_token(token_id, self.clock())
        if record is None:
            raise NotFound(f"no token {token_id!r}")
        self._revoked.setdefault(token_id, asyncio.Event()).set()
        return record

    def _revoked_elsewhere(self, token_id: str) -> None:
        self._revoked.setdefault(token_id, asyncio.Event()).set()

    def authenticate(self, presented: str) -> Principal:
        try:
            text = parse_token(presented)
        except TokenFormatError as exc:
            raise Unauthenticated(str(exc)) from None
        record = self.store.get_token(text.token_id)
        # compare in constant time, and say the same for unknown ids and wrong secrets
        expected = record.secret_sha256 if record else "0" * 64
        if not hmac.compare_digest(expected, secret_digest(text.secret)) or record is None:
            raise Unauthenticated(f"unknown token {text.token_id}")
        if record.revoked_at is not None:
            raise Unauthenticated(f"token {record.id} was revoked")
        if not record.usable(self.clock()):
            raise Unauthenticated(f"token {record.id} expired")
        return Principal(role=record.role, token_id=record.id, expires_at=record.expires_at)

    def invalid_now(self, principal: Principal) -> str:
        """Why the principal's token stopped being valid since it was checked ("" if it is
        still valid): from memory, so it is cheap per streamed message."""
        if not principal.token_id:
            return ""
        revoked = self._revoked.get(principal.token_id)
        if revoked is not None and revoked.is_set():
            return f"token {principal.token_id} was revoked"
        if principal.expires_at is not None and self.clock() >= principal.expires_at:
            return f"token {principal.token_id} expired"
        return ""

    async def until_invalid(self, principal: Principal) -> str:
        """Returns (why) once the principal's token is revoked or expires; agents: never."""
        if not principal.token_id:
            await asyncio.Event().wait()
        event = self._revoked.setdefault(principal.token_id, asyncio.Event())
        timeout = None if principal.expires_at is None else principal.expires_at - self.clock()
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return f"token {principal.token_id} expired"
        return f"token {principal.token_id} was revoked"


def certificate_identity(pem: bytes) -> tuple[str, str]:
    """(common name, sha256 of DER) of a verified client certificate."""
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    name = str(names[0].value) if names else ""
    return name, hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


class Authenticator:
    """Turns an RPC's metadata and TLS peer into a Principal, or raises.

    With the coordinator's own CA an agent's certificate must be its current enrolment; with
    an operator's PKI (require_enrolment=False) the TLS layer's verification against the
    operator's client CA is the whole proof, and the certificate's name is the agent's."""

    def __init__(self, tokens: TokenBook, require_enrolment: bool = True) -> None:
        self.tokens = tokens
        self.require_enrolment = require_enrolment
        self.on_refused: Callable[[str], None] = lambda _reason: None

    def principal(self, requirement: Requirement, context: Any) -> Principal:
        if requirement is Access.AGENT_CERT:
            return self._agent(context)
        assert isinstance(requirement, Role)
        token = _bearer(context.invocation_metadata() or ())
        if token is None:
            raise Unauthenticated(
                "this coordinator needs a token: pass --token, --token-file or $POLYARCH_TOKEN"
            )
        principal = self.tokens.authenticate(token)
        if not principal.role.allows(requirement):
            raise PermissionDenied(
                f"token {principal.token_id} has role {principal.role.value}; "
                f"this needs {requirement.value}"
            )
        return principal

    def _agent(self, context: Any) -> Principal:
        pems = context.auth_context().get("x509_pem_cert") or []
        if not pems:
            raise Unauthenticated(
                "the agent channel needs an enrolled agent's client certificate "
                "(agents enrol with a token, then connect to the agent port)"
            )
        name, fingerprint = certificate_identity(pems[0])
        if not NAME_PATTERN.match(name):
            raise Unauthenticated("the client certificate names no valid agent")
        if not self.require_enrolment:
            return Principal(role=Role.AGENT, agent_name=name)
        enrolment = self.tokens.store.get_enrolment(name)
        if enrolment is None or not hmac.compare_digest(enrolment.cert_sha256, fingerprint):
            raise Unauthenticated(
                f"the certificate of agent {name} is no longer enrolled (the name was "
                "re-enrolled with --replace, or its enrolment revoked); enrol this agent again"
            )
        return Principal(role=Role.AGENT, agent_name=name)


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata:
        if key == AUTHORIZATION_KEY and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
    return None


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # generic only in the stubs
    _Interceptor = grpc.aio.ServerInterceptor


class AuthInterceptor(_Interceptor):
    """Checks every RPC against METHOD_ACCESS before its servicer runs; streams end when their
    token is revoked or expires. `on_refused(reason)` counts refusals (a metric)."""

    def __init__(
        self, authenticator: Authenticator, on_refused: Callable[[str], None] = lambda _r: None
    ) -> None:
        self.auth = authenticator
        self.auth.on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        requirement = METHOD_ACCESS.get(handler_call_details.method)
        if requirement is Access.PUBLIC:
            return handler
        wrapped: grpc.RpcMethodHandler[Any, Any] = _wrap(handler, requirement, self.auth)
        return wrapped


async def _authorize(auth: Authenticator, requirement: Requirement | None, context: Any) -> None:
    try:
        if requirement is None:
            raise PermissionDenied("this method is not open to any caller")
        _current.set(auth.principal(requirement, context))
    except PolyarchError as exc:
        # bounded label: the kind of refusal, never the caller or the token
        auth.on_refused("unauthenticated" if isinstance(exc, Unauthenticated) else "forbidden")
        await context.abort(status_code(exc), str(exc))


def _wrap(handler: Any, requirement: Requirement | None, auth: Authenticator) -> Any:
    # `handler` is a grpc.RpcMethodHandler: the stubs type its behaviours as sync iterators,
    # grpc.aio's are async, hence Any
    def guarded_requests(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async def checked() -> AsyncIterator[Any]:
            principal = current_principal()
            async for item in requests:
                why = auth.tokens.invalid_now(principal)
                if why:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
                yield item

        return checked()

    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            await _authorize(auth, requirement, context)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: Any) -> Any:
            await _authorize(auth, requirement, context)
            return await inner_su(guarded_requests(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            await _authorize(auth, requirement, context)
            async for item in _until_invalid(auth, inner_us(request, context), context):
                yield item

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    inner_ss = handler.stream_stream

    async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
        await _authorize(auth, requirement, context)
        async for item in _until_invalid(auth, inner_ss(requests, context), context):
            yield item

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, handler.request_deserializer, handler.response_serializer
    )


async def _until_invalid(
    auth: Authenticator, responses: AsyncIterator[Any], context: Any
) -> AsyncIterator[Any]:
    """Relays a response stream, aborting it the moment the caller's token stops being valid."""
    invalid = asyncio.ensure_future(auth.tokens.until_invalid(current_principal()))
    step: asyncio.Future[Any] | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(responses))
            done, _ = await asyncio.wait({step, invalid}, return_when=asyncio.FIRST_COMPLETED)
            if step not in done:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, invalid.result())
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        invalid.cancel()
        if step is not None and not step.done():
            step.cancel()
        if step is not None:
            # retrieve its outcome, so nothing is logged as "never retrieved"
            step.add_done_callback(lambda f: f.cancelled() or f.exception())
        aclose = getattr(responses, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(RuntimeError):  # still running in the cancelled step
                await aclose()
