"""TrustService: tokens for admins, and enrolment that gives agents their certificates."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

import grpc
from cryptography.hazmat.primitives.serialization import Encoding

from polyarch.coordinator.core.model import AlreadyExists, InvalidRequest, PermissionDenied
from polyarch.coordinator.trust.auth import TokenBook, current_principal
from polyarch.coordinator.trust.pki import CertificateAuthority, CertificateRequestError
from polyarch.coordinator.trust.store import EnrolmentRecord, TokenRecord
from polyarch.coordinator.wire.convert import timestamp
from polyarch.coordinator.wire.errors import domain_errors
from polyarch.proto.trust import NAME_PATTERN, Role
from polyarch.proto.v1 import trust_pb2, trust_pb2_grpc

log = logging.getLogger(__name__)

ROLES = {
    trust_pb2.TOKEN_ROLE_READ: Role.READ,
    trust_pb2.TOKEN_ROLE_CI: Role.CI,
    trust_pb2.TOKEN_ROLE_ADMIN: Role.ADMIN,
    trust_pb2.TOKEN_ROLE_AGENT: Role.AGENT,
}
ROLE_CODES = {role: code for code, role in ROLES.items()}
MAX_TTL_SECONDS = 10 * 365 * 86400


def token_message(record: TokenRecord) -> trust_pb2.Token:
    return trust_pb2.Token(
        id=record.id, role=ROLE_CODES[record.role], description=record.description,
        created_at=timestamp(record.created_at), expires_at=timestamp(record.expires_at),
        revoked_at=timestamp(record.revoked_at),
    )  # fmt: skip


class TrustServicer(trust_pb2_grpc.TrustServiceServicer):
    def __init__(
        self,
        tokens: TokenBook,
        authority: CertificateAuthority | None,
        agent_port: Callable[[], int],
        disconnect: Callable[[str, str], None],
    ) -> None:
        self.tokens = tokens
        self.authority = authority
        self.agent_port = agent_port
        # ends an agent's live stream: (name, why)
        self.disconnect = disconnect

    @domain_errors
    async def CreateToken(
        self, request: trust_pb2.CreateTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trust_pb2.CreateTokenResponse:
        role = ROLES.get(request.role)
        if role is None:
            raise InvalidRequest("a token needs a role: read, ci, admin or agent")
        if not 0 <= request.ttl_seconds <= MAX_TTL_SECONDS:
            raise InvalidRequest(f"ttl must be between 0 (never expires) and {MAX_TTL_SECONDS} s")
        text = self.tokens.create(role, request.ttl_seconds, request.description)
        record = self.tokens.store.get_token(text.token_id)
        assert record is not None
        log.info("token %s (%s) created by %s", record.id, role.value, current_principal().label)
        return trust_pb2.CreateTokenResponse(token=token_message(record), token_text=str(text))

    @domain_errors
    async def ListTokens(
        self, request: trust_pb2.ListTokensRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trust_pb2.ListTokensResponse:
        return trust_pb2.ListTokensResponse(
            tokens=[token_message(t) for t in self.tokens.store.list_tokens()]
        )

    @domain_errors
    async def RevokeToken(
        self, request: trust_pb2.RevokeTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trust_pb2.Token:
        record = self.tokens.revoke(request.id)
        log.info("token %s revoked by %s", record.id, current_principal().label)
        return token_message(record)

    @domain_errors
    async def Enroll(
        self, request: trust_pb2.EnrollRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trust_pb2.EnrollResponse:
        if self.authority is None:
            raise PermissionDenied(
                "this coordinator uses an operator's PKI (--tls-cert): give the agent a client "
                "certificate from that CA (--tls-cert/--tls-key on the agent) instead"
            )
        if not NAME_PATTERN.match(request.name):
            raise InvalidRequest(
                f"invalid agent name {request.name!r}: use letters, digits, '.', '_' and '-' "
                "(at most 63, starting with a letter or digit)"
            )
        store = self.tokens.store
        existing = store.get_enrolment(request.name)
        if existing is not None and not request.replace:
            raise AlreadyExists(
                f"agent {request.name} is already enrolled (by token {existing.token_id}); "
                "the running agent keeps its name; re-enrol this one with --replace"
            )
        try:
            cert = self.authority.sign_agent(request.name, request.csr_pem)
        except CertificateRequestError as exc:
            raise InvalidRequest(str(exc)) from None
        principal = current_principal()
        fingerprint = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
        store.save_enrolment(
            EnrolmentRecord(request.name, fingerprint, self.tokens.clock(), principal.token_id)
        )
        if existing is not None:
            log.warning("agent %s re-enrolled (--replace) by %s", request.name, principal.label)
            self.disconnect(request.name, "re-enrolled elsewhere (--replace)")
        else:
            log.info("agent %s enrolled by %s", request.name, principal.label)
        return trust_pb2.EnrollResponse(
            certificate_pem=cert.public_bytes(Encoding.PEM),
            ca_pem=self.authority.ca_pem(),
            agent_port=self.agent_port(),
        )

    @domain_errors
    async def RevokeEnrolment(
        self,
        request: trust_pb2.RevokeEnrolmentRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> trust_pb2.RevokeEnrolmentResponse:
        revoked = self.tokens.store.delete_enrolment(request.name)
        if revoked:
            log.info("agent %s: enrolment revoked by %s", request.name, current_principal().label)
            self.disconnect(request.name, "its enrolment was revoked")
        return trust_pb2.RevokeEnrolmentResponse(revoked=revoked)
