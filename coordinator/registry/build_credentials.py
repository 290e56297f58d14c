"""Per-build registry credentials and build secrets: in memory only, for assigned agents."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec

from polyarch.coordinator.core.model import InvalidRequest
from polyarch.coordinator.registry.client import RegistryClient
from polyarch.coordinator.registry.credentials import (
    Credentials,
    CredentialStore,
    normalize_registry_key,
)
from polyarch.proto.cosign import SigningKeyError, load_signing_key

SECRET_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# BuildKit refuses secrets over 500 KiB; so do we, for every builder.
MAX_SECRET_BYTES = 500 * 1024
MAX_SECRETS = 32
MAX_REGISTRY_AUTHS = 16


@dataclass(frozen=True)
class BuildCredentials:
    """What one build brought for its own use. Never stored, logged or listed: repr shows
    only registry names and secret ids."""

    registry_auths: Mapping[str, Credentials] = field(default_factory=dict)
    secrets: Mapping[str, bytes] = field(default_factory=dict)
    # the build's own signing key (--sign-key), loaded: the PEM bytes are not kept
    sign_key: ec.EllipticCurvePrivateKey | None = None

    def __repr__(self) -> str:
        return (
            f"BuildCredentials(registries={sorted(self.registry_auths)}, "
            f"secrets={sorted(self.secrets)}, sign_key={self.sign_key is not None})"
        )

    __str__ = __repr__

    @property
    def empty(self) -> bool:
        return not self.registry_auths and not self.secrets and self.sign_key is None


def check_build_credentials(
    auths: list[tuple[str, str, str]], secrets: list[tuple[str, bytes]], sign_key: bytes = b""
) -> BuildCredentials:
    """Validates (registry, username, password) and (id, value) lists and the PEM signing
    key; errors name the registry or secret id, never a value."""
    if len(auths) > MAX_REGISTRY_AUTHS:
        raise InvalidRequest(f"{len(auths)} registry credentials; at most {MAX_REGISTRY_AUTHS}")
    if len(secrets) > MAX_SECRETS:
        raise InvalidRequest(f"{len(secrets)} secrets; at most {MAX_SECRETS}")
    registry_auths: dict[str, Credentials] = {}
    for registry, username, password in auths:
        key = normalize_registry_key(registry)
        if not key or "/" in key or not key.isprintable():
            raise InvalidRequest(f"registry credentials for a malformed registry {registry!r}")
        if not password:
            raise InvalidRequest(f"registry credentials for {key} have no password or token")
        registry_auths[key] = Credentials(username, password)
    found: dict[str, bytes] = {}
    for secret_id, value in secrets:
        if not SECRET_ID.match(secret_id):
            raise InvalidRequest(
                f"invalid secret id {secret_id[:80]!r}: letters, digits, '.', '_', '-'"
            )
        if secret_id in found:
            raise InvalidRequest(f"secret {secret_id} given twice")
        if len(value) > MAX_SECRET_BYTES:
            raise InvalidRequest(
                f"secret {secret_id} is {len(value)} bytes; at most {MAX_SECRET_BYTES}"
            )
        found[secret_id] = value
    signing = None
    if sign_key:
        try:
            signing = load_signing_key(sign_key)
        except SigningKeyError as exc:
            raise InvalidRequest(f"--sign-key: {exc}") from None
    return BuildCredentials(registry_auths, found, signing)


class CredentialVault:
    """BuildCredentials by build id, in this process's memory; dropped when a build ends."""

    def __init__(self) -> None:
        self._by_build: dict[str, BuildCredentials] = {}

    def __repr__(self) -> str:
        return f"CredentialVault(builds={len(self._by_build)})"

    def put(self, build_id: str, credentials: BuildCredentials) -> None:
        if not credentials.empty:
            self._by_build[build_id] = credentials

    def get(self, build_id: str) -> BuildCredentials | None:
        return self._by_build.get(build_id)

    def drop(self, build_id: str) -> None:
        self._by_build.pop(build_id, None)


class LayeredCredentialStore(CredentialStore):
    """A build's own registry credentials first, then the farm's."""

    def __init__(self, own: Mapping[str, Credentials], farm: CredentialStore | None) -> None:
        super().__init__(auths=own, source="build")
        self._own = {normalize_registry_key(k): v for k, v in own.items()}
        self._farm = farm

    def __repr__(self) -> str:
        return f"LayeredCredentialStore(own={sorted(self._own)}, farm={self._farm!r})"

    async def get(self, registry: str) -> Credentials | None:
        own = self._own.get(normalize_registry_key(registry))
        if own is not None:
            return own
        return await self._farm.get(registry) if self._farm is not None else None


def client_for(client: RegistryClient, own: BuildCredentials | None) -> RegistryClient:
    """`client`, or a copy that tries a build's own registry credentials before the farm's."""
    if own is None or not own.registry_auths:
        return client
    return client.with_credentials(LayeredCredentialStore(own.registry_auths, client.credentials))
