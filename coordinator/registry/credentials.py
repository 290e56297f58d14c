"""Registry credentials (docker config.json, credential helpers) and the 401 auth handshake."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polyarch.proto.references import DOCKER_HUB

if TYPE_CHECKING:  # imported when a token exchange runs: `polyarch build` starts faster
    import httpx

# The key docker login writes for Docker Hub, and the server URL its helpers expect.
DOCKER_HUB_SERVER_URL = "https://index.docker.io/v1/"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
HELPER_TIMEOUT_SECONDS = 15.0


class CredentialError(Exception):
    """A docker config or credential helper that could not be read (never carries secrets)."""


@dataclass(frozen=True)
class Credentials:
    """A username and password (or token) for one registry; the secret never appears in repr."""

    username: str
    password: str = field(repr=False)

    def __str__(self) -> str:
        return f"Credentials(username={self.username!r})"


def normalize_registry_key(key: str) -> str:
    """The registry host[:port] a config.json key names: `https://host/v1/` -> `host`."""
    text = key.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.split("/", 1)[0].lower()
    return DOCKER_HUB if text in _HUB_ALIASES else text


def _server_url(registry: str) -> str:
    return DOCKER_HUB_SERVER_URL if registry == DOCKER_HUB else registry


def _decode_auth(key: str, value: str) -> Credentials:
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise CredentialError(f"docker config: auths[{key!r}].auth is not valid base64") from None
    username, sep, password = decoded.partition(":")
    if not sep:
        raise CredentialError(f"docker config: auths[{key!r}].auth is not of the form user:pass")
    return Credentials(username, password)


def default_docker_config_path(env: Mapping[str, str] | None = None) -> Path:
    """`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`."""
    environ = os.environ if env is None else env
    if environ.get("DOCKER_CONFIG"):
        return Path(environ["DOCKER_CONFIG"]) / "config.json"
    return Path.home() / ".docker" / "config.json"


class CredentialStore:
    """Looks up credentials per registry: credHelpers, then credsStore, then static auths."""

    def __init__(
        self,
        auths: Mapping[str, Credentials] | None = None,
        cred_helpers: Mapping[str, str] | None = None,
        creds_store: str | None = None,
        source: str = "memory",
    ) -> None:
        self._auths = {normalize_registry_key(k): v for k, v in (auths or {}).items()}
        self._helpers = {normalize_registry_key(k): v for k, v in (cred_helpers or {}).items()}
        self._creds_store = creds_store or None
        self._source = source
        self._helper_cache: dict[str, Credentials | None] = {}

    @classmethod
    def in_memory(cls, entries: Mapping[str, tuple[str, str]]) -> CredentialStore:
        """A store from {registry: (username, password)}, for tests and explicit configuration."""
        return cls({key: Credentials(user, pw) for key, (user, pw) in entries.items()})

    @classmethod
    def from_docker_config(
        cls, path: str | Path | None = None, env: Mapping[str, str] | None = None
    ) -> CredentialStore:
        """Reads docker's config.json; a missing file gives an empty store."""
        config_path = Path(path) if path is not None else default_docker_config_path(env)
        try:
            raw = config_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(source=str(config_path))
        except OSError as exc:
            raise CredentialError(f"cannot read docker config {config_path}: {exc}") from None
        try:
            data: Any = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CredentialError(
                f"docker config {config_path} is not valid JSON (line {exc.lineno})"
            ) from None
        if not isinstance(data, dict):
            raise CredentialError(f"docker config {config_path} is not a JSON object")
        return cls(
            _parse_auths(data.get("auths") or {}),
            {str(k): str(v) for k, v in (data.get("credHelpers") or {}).items()},
            str(data["credsStore"]) if data.get("credsStore") else None,
            source=str(config_path),
        )

    def __repr__(self) -> str:
        return (
            f"CredentialStore(source={self._source!r}, registries={sorted(self._auths)!r}, "
            f"cred_helpers={dict(sorted(self._helpers.items()))!r}, "
            f"creds_store={self._creds_store!r})"
        )

    __str__ = __repr__

    async def get(self, registry: str) -> Credentials | None:
        """The credentials for a registry host[:port], or None when there are none."""
        key = normalize_registry_key(registry)
        helper = self._helpers.get(key) or self._creds_store
        if helper is not None:
            if key not in self._helper_cache:
                self._helper_cache[key] = await run_credential_helper(helper, _server_url(key))
            found = self._helper_cache[key]
            if found is not None:
                return found
        return self._auths.get(key)


def _parse_auths(auths: Any) -> dict[str, Credentials]:
    if not isinstance(auths, dict):
        raise CredentialError("docker config: 'auths' is not a JSON object")
    result: dict[str, Credentials] = {}
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            result[str(key)] = _decode_auth(str(key), str(entry["auth"]))
        elif entry.get("username") and entry.get("password") is not None:
            result[str(key)] = Credentials(str(entry["username"]), str(entry["password"]))
    return result


async def run_credential_helper(helper: str, server_url: str) -> Credentials | None:
    """Runs `docker-credential-<helper> get`; None when the helper has no entry for the server."""
    program = f"docker-credential-{helper}"
    try:
        proc = await asyncio.create_subprocess_exec(
            program,
            "get",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise CredentialError(f"credential helper {program} is not installed") from None
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(server_url.encode()), HELPER_TIMEOUT_SECONDS
        )
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise CredentialError(f"credential helper {program} timed out for {server_url}") from None
    if proc.returncode != 0:
        message = (out or err).decode("utf-8", "replace").strip()
        if "credentials not found" in message.lower():
            return None
        # The helper's own words on failure; stdout of a failed `get` holds no secret.
        raise CredentialError(
            f"credential helper {program} failed for {server_url}: {message[:200]}"
        )
    try:
        data = json.loads(out)
        return Credentials(str(data["Username"]), str(data["Secret"]))
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CredentialError(
            f"credential helper {program} returned unreadable output for {server_url}"
        ) from None


@dataclass(frozen=True)
class AuthChallenge:
    """One challenge of a WWW-Authenticate header: a scheme and its parameters."""

    scheme: str
    params: Mapping[str, str]

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_CHALLENGE_PART = re.compile(
    rf"\s*(?:(?P<key>{_TOKEN})\s*=\s*(?:\"(?P<quoted>(?:[^\"\\]|\\.)*)\"|(?P<bare>[^,\s]*))"
    rf"|(?P<scheme>{_TOKEN}))\s*,?"
)


def parse_www_authenticate(header: str) -> list[AuthChallenge]:
    """Parses a WWW-Authenticate header into its challenges (quoted values may hold commas)."""
    challenges: list[AuthChallenge] = []
    scheme: str | None = None
    params: dict[str, str] = {}
    pos = 0
    while pos < len(header):
        match = _CHALLENGE_PART.match(header, pos)
        if match is None or match.end() == pos:
            raise ValueError(f"malformed WWW-Authenticate header near {header[pos : pos + 20]!r}")
        pos = match.end()
        if match.group("scheme"):
            if scheme is not None:
                challenges.append(AuthChallenge(scheme, params))
            scheme, params = match.group("scheme").lower(), {}
        elif scheme is None:
            raise ValueError("malformed WWW-Authenticate header: parameter before any scheme")
        else:
            quoted = match.group("quoted")
            value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else match["bare"]
            params[match.group("key").lower()] = value
    if scheme is not None:
        challenges.append(AuthChallenge(scheme, params))
    return challenges


def basic_auth_header(username: str, password: str) -> str:
    """The value of an HTTP Basic Authorization header."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


class AuthFailure(Exception):
    """The auth handshake failed; `kind` is a bounded label, the message holds no secret."""

    def __init__(self, message: str, kind: str = "auth", status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


@dataclass
class _Token:
    value: str = field(repr=False)
    expires_at: float


class Authenticator:
    """Turns 401 challenges into Authorization headers: Basic, or Bearer tokens per scope."""

    def __init__(self, credentials: CredentialStore | None, http: httpx.AsyncClient) -> None:
        self._credentials = credentials
        self._http = http
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._basic: set[str] = set()

    def __repr__(self) -> str:
        return f"Authenticator(credentials={self._credentials!r}, tokens={len(self._tokens)})"

    async def _creds(self, registry: str) -> Credentials | None:
        return await self._credentials.get(registry) if self._credentials else None

    async def has_credentials(self, registry: str) -> bool:
        return await self._creds(registry) is not None

    async def header(self, registry: str, scope: str) -> str | None:
        """The Authorization header to send up front (cached token or known Basic registry)."""
        token = self._tokens.get((registry, scope))
        if token is not None:
            if token.expires_at > time.monotonic():
                return f"Bearer {token.value}"
            del self._tokens[(registry, scope)]
        if registry in self._basic:
            creds = await self._creds(registry)
            if creds is not None:
                return basic_auth_header(creds.username, creds.password)
        return None

    async def answer(
        self, www_authenticate: str, registry: str, scope: str, sent: str | None = None
    ) -> bool:
        """Answers a 401 to a request that carried `sent`; True when a retry makes sense."""
        try:
            challenges = parse_www_authenticate(www_authenticate)
        except ValueError:
            return False
        creds = await self._creds(registry)
        for challenge in challenges:
            if challenge.scheme == "bearer" and challenge.realm:
                params = {"scope": challenge.params.get("scope") or scope}
                if challenge.params.get("service"):
                    params["service"] = challenge.params["service"]
                token = await self._fetch_token(challenge.realm, params, creds)
                self._tokens[(registry, scope)] = token
                return True
            if challenge.scheme == "basic" and creds is not None:
                # A concurrent request may have learnt Basic already: retry unless we sent it.
                self._basic.add(registry)
                return not (sent or "").startswith("Basic ")
        return False

    async def _fetch_token(
        self, realm: str, params: Mapping[str, str], creds: Credentials | None
    ) -> _Token:
        headers = (
            {"Authorization": basic_auth_header(creds.username, creds.password)} if creds else {}
        )
        how = "with the configured credentials" if creds else "anonymously"
        try:
            resp = await self._http.get(realm, params=params, headers=headers)
        except _httpx().TransportError as exc:
            raise AuthFailure(
                f"token service unreachable ({type(exc).__name__})", "unreachable"
            ) from None
        if resp.status_code in (401, 403):
            raise AuthFailure(
                f"token service refused access {how} (HTTP {resp.status_code})",
                "auth",
                resp.status_code,
            )
        value, expires_in = "", 60.0
        if resp.is_success:
            try:
                data: Any = resp.json()
                value = str(data.get("token") or data.get("access_token") or "")
                expires_in = float(data.get("expires_in") or 60)
            except (ValueError, AttributeError, TypeError):
                value = ""
        if not value:
            kind = "http_5xx" if resp.status_code >= 500 else "http_4xx"
            raise AuthFailure(
                f"token service answered HTTP {resp.status_code} without a token",
                kind,
                resp.status_code,
            )
        # Renew a little early so a token never expires between header and request.
        return _Token(value, time.monotonic() + max(expires_in - 10, 5))


def _httpx() -> Any:
    import httpx

    return httpx
