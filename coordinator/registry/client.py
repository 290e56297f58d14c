"""Async OCI distribution client: references, auth, retries and verified manifest/blob I/O."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx

from polyarch.coordinator.registry.credentials import Authenticator, AuthFailure, CredentialStore
from polyarch.proto.media_types import MANIFEST_ACCEPT
from polyarch.proto.references import DOCKER_HUB, is_digest

# Re-exported for coordinator.core.validation until it imports polyarch.proto.references.
from polyarch.proto.registries import backoff_delay, registry_is_plain_http

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_BLOB_BYTES = 16 * 1024 * 1024
RETRY_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class Descriptor:
    """What a registry holds under a reference: media type, digest and size in bytes."""

    media_type: str
    digest: str
    size: int


class RegistryError(Exception):
    """A registry request that failed; the message never carries credentials or tokens."""

    def __init__(self, message: str, registry: str, status: int | None = None) -> None:
        super().__init__(message)
        self.registry = registry
        self.status = status


class RegistryUnreachable(RegistryError):
    """The registry could not be reached (refused, DNS, TLS, timeouts) after retries."""


class RegistryAuthError(RegistryError):
    """The registry refused our credentials, or we had none where some were needed."""


class ManifestNotFound(RegistryError):
    """The repository holds no manifest under that tag or digest."""


class BlobNotFound(RegistryError):
    """The repository holds no blob with that digest."""


class DigestMismatch(RegistryError):
    """Content whose digest differs from the one requested or announced."""


def compute_digest(body: bytes, algorithm: str = "sha256") -> str:
    """`algorithm:hex` of the bytes."""
    return f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"


def registry_errors_text(body: bytes) -> str:
    """`CODE: message; ...` from a registry's JSON error body, or '' when there is none."""
    try:
        data: Any = json.loads(body)
        errors = data.get("errors") if isinstance(data, dict) else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return ""
    if not isinstance(errors, list):
        return ""
    parts = [
        f"{e.get('code', '?')}: {e.get('message', '')}".strip().rstrip(":")
        for e in errors
        if isinstance(e, dict)
    ]
    return "; ".join(parts)[:500]


def registry_scheme(registry: str, insecure: Iterable[str] = ()) -> str:
    """`http` for loopback registries and ones listed insecure, `https` otherwise."""
    return "http" if registry_is_plain_http(registry, insecure) else "https"


def _label_for_status(status: int) -> str:
    if status in (401, 403):
        return "auth"
    if status == 404:
        return "not_found"
    return "http_5xx" if status >= 500 else "http_4xx"


class RegistryClient:
    """Talks the OCI distribution API to any number of registries, with auth and retries."""

    def __init__(
        self,
        credentials: CredentialStore | None = None,
        insecure_registries: Iterable[str] = (),
        timeout: float = 30.0,
        retries: int = 4,
        on_request_error: Callable[[str], None] | None = None,
        *,
        backoff_base: float = 0.2,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._insecure = frozenset(insecure_registries)
        self._retries = max(0, retries)
        self._on_error = on_request_error
        self._backoff_base = backoff_base
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout), follow_redirects=True, transport=transport
        )
        self._auth = Authenticator(credentials, self._http)
        self.credentials = credentials

    def with_credentials(self, credentials: CredentialStore) -> RegistryClient:
        """The same client (connections, retries, insecure list) speaking with other
        credentials, and its own token cache, so one build's tokens serve no other."""
        clone = copy.copy(self)
        clone._auth = Authenticator(credentials, self._http)
        clone.credentials = credentials
        return clone

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def base_url(self, registry: str) -> str:
        host = "registry-1.docker.io" if registry == DOCKER_HUB else registry
        return f"{registry_scheme(registry, self._insecure)}://{host}"

    # -- public API -------------------------------------------------------------------------

    async def head_manifest(self, registry: str, repository: str, reference: str) -> Descriptor:
        """The descriptor of a manifest; falls back to GET when the registry gives no digest."""
        resp = await self._request(
            "HEAD",
            registry,
            repository,
            f"manifests/{reference}",
            headers={"Accept": ", ".join(MANIFEST_ACCEPT)},
        )
        digest = resp.headers.get("docker-content-digest")
        if not digest:
            return (await self.get_manifest(registry, repository, reference))[1]
        if is_digest(reference) and digest != reference:
            raise DigestMismatch(
                f"{registry}/{repository}: HEAD {reference} answered digest {digest}", registry
            )
        media_type = resp.headers.get("content-type", "").split(";")[0].strip()
        return Descriptor(media_type, digest, int(resp.headers.get("content-length", "0")))

    async def get_manifest(
        self,
        registry: str,
        repository: str,
        reference: str,
        accept: Iterable[str] = MANIFEST_ACCEPT,
    ) -> tuple[bytes, Descriptor]:
        """The manifest bytes and descriptor; the digest is computed from the bytes we got."""
        resp = await self._request(
            "GET",
            registry,
            repository,
            f"manifests/{reference}",
            headers={"Accept": ", ".join(accept)},
        )
        body = resp.content
        if len(body) > MAX_MANIFEST_BYTES:
            raise RegistryError(
                f"{registry}/{repository}: manifest {reference} too large", registry
            )
        expected = reference if is_digest(reference) else resp.headers.get("docker-content-digest")
        digest = self._verify(registry, repository, body, expected, f"manifest {reference}")
        media_type = resp.headers.get("content-type", "").split(";")[0].strip()
        return body, Descriptor(media_type, digest, len(body))

    async def get_blob(self, registry: str, repository: str, digest: str) -> bytes:
        """A small blob (an image config), verified against its digest."""
        if not is_digest(digest):
            raise ValueError(f"not a digest: {digest!r}")
        resp = await self._request("GET", registry, repository, f"blobs/{digest}", blob=True)
        if len(resp.content) > MAX_BLOB_BYTES:
            raise RegistryError(f"{registry}/{repository}: blob {digest} too large", registry)
        self._verify(registry, repository, resp.content, digest, f"blob {digest}")
        return resp.content

    async def put_manifest(
        self, registry: str, repository: str, reference: str, body: bytes, media_type: str
    ) -> str:
        """Pushes a manifest under a tag or digest; returns its verified digest."""
        digest = compute_digest(body)
        if is_digest(reference) and reference != digest:
            raise ValueError(f"manifest body has digest {digest}, not {reference}")
        resp = await self._request(
            "PUT",
            registry,
            repository,
            f"manifests/{reference}",
            headers={"Content-Type": media_type},
            content=body,
        )
        announced = resp.headers.get("docker-content-digest")
        if announced and announced != digest:
            raise DigestMismatch(
                f"{registry}/{repository}: pushed manifest {digest} but the registry "
                f"reports {announced}",
                registry,
            )
        return digest

    async def put_blob(self, registry: str, repository: str, data: bytes) -> str:
        """Uploads a small blob unless the repository holds it (POST, then PUT with the
        digest: the monolithic upload every registry takes); returns its digest."""
        digest = compute_digest(data)
        if await self.has_blob(registry, repository, digest):
            return digest
        started = await self._request("POST", registry, repository, "blobs/uploads/")
        location = started.headers.get("location", "")
        if not location:
            raise RegistryError(f"{registry}/{repository}: upload has no Location", registry)
        sep = "&" if "?" in location else "?"
        await self._request(
            "PUT", registry, repository, f"{location}{sep}digest={digest}", content=data,
            headers={"Content-Type": "application/octet-stream"},
        )  # fmt: skip
        return digest

    async def has_blob(self, registry: str, repository: str, digest: str) -> bool:
        try:
            await self._request("HEAD", registry, repository, f"blobs/{digest}", blob=True)
        except BlobNotFound:
            return False
        return True

    async def copy_blob(self, source: tuple[str, str], target: tuple[str, str], digest: str) -> str:
        """Makes blob `digest` of (registry, repository) `source` exist in `target`: already
        there, mounted across repositories of one registry (no bytes move), or streamed
        from one registry to the other. Returns how ("present", "mounted" or "copied")."""
        (src_registry, src_repo), (dst_registry, dst_repo) = source, target
        if await self.has_blob(dst_registry, dst_repo, digest):
            return "present"
        if src_registry == dst_registry:
            mount = f"blobs/uploads/?mount={digest}&from={src_repo}"
            started = await self._request("POST", dst_registry, dst_repo, mount)
            if started.status_code == 201:
                return "mounted"
        else:
            started = await self._request("POST", dst_registry, dst_repo, "blobs/uploads/")
        # 202: an upload session; the bytes come from the source, streamed through
        location = started.headers.get("location", "")
        if not location:
            raise RegistryError(f"{dst_registry}/{dst_repo}: upload has no Location", dst_registry)
        if location.startswith("/"):
            location = f"{self.base_url(dst_registry)}{location}"
        dst_auth = await self._auth.header(dst_registry, f"repository:{dst_repo}:pull,push")
        sep = "&" if "?" in location else "?"
        async with self.stream_blob(src_registry, src_repo, digest) as body:
            headers = {"Content-Type": "application/octet-stream"}
            if dst_auth:
                headers["Authorization"] = dst_auth
            done = await self._http.put(
                f"{location}{sep}digest={digest}", content=body.aiter_raw(), headers=headers
            )
        if done.status_code != 201:
            raise RegistryError(
                f"{dst_registry}/{dst_repo}: upload of blob {digest} failed with HTTP "
                f"{done.status_code} ({registry_errors_text(done.content)})",
                dst_registry, done.status_code,
            )  # fmt: skip
        return "copied"

    @contextlib.asynccontextmanager
    async def stream_blob(
        self, registry: str, repository: str, digest: str
    ) -> AsyncIterator[httpx.Response]:
        """An open GET of a blob of any size (its bytes from `aiter_raw()`, unverified: the
        caller hashes them). A HEAD first gets the token and names a missing blob."""
        await self._request("HEAD", registry, repository, f"blobs/{digest}", blob=True)
        auth = await self._auth.header(registry, f"repository:{repository}:pull")
        url = f"{self.base_url(registry)}/v2/{repository}/blobs/{digest}"
        async with self._http.stream(
            "GET", url, headers={"Authorization": auth} if auth else {}, follow_redirects=True
        ) as body:
            if not body.is_success:
                raise RegistryError(
                    f"{registry}/{repository}: GET blob {digest} failed with HTTP "
                    f"{body.status_code}", registry, body.status_code,
                )  # fmt: skip
            yield body

    async def delete_manifest(self, registry: str, repository: str, digest: str) -> None:
        """Deletes a manifest by digest (with the tags that name it, as registries do)."""
        if not is_digest(digest):
            raise ValueError(f"not a digest: {digest!r}")
        await self._request("DELETE", registry, repository, f"manifests/{digest}")

    # -- internals --------------------------------------------------------------------------

    def _verify(
        self, registry: str, repository: str, body: bytes, expected: str | None, what: str
    ) -> str:
        algorithm = expected.split(":", 1)[0] if expected and is_digest(expected) else "sha256"
        actual = compute_digest(body, algorithm)
        if expected and actual != expected:
            raise DigestMismatch(
                f"{registry}/{repository}: {what} content has digest {actual}, expected {expected}",
                registry,
            )
        return actual if algorithm == "sha256" else compute_digest(body)

    def _record(self, kind: str) -> None:
        if self._on_error is not None:
            self._on_error(kind)

    async def _request(
        self,
        method: str,
        registry: str,
        repository: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        blob: bool = False,
    ) -> httpx.Response:
        if path.startswith(("http://", "https://")):  # an upload's Location, as given
            url = path
        elif path.startswith("/"):
            url = f"{self.base_url(registry)}{path}"
        else:
            url = f"{self.base_url(registry)}/v2/{repository}/{path}"
        actions = "pull,push" if method in ("PUT", "POST", "PATCH", "DELETE") else "pull"
        scope = f"repository:{repository}:{actions}"
        where = f"{registry}/{repository}"
        tried_auth = False
        while True:
            req_headers = dict(headers or {})
            auth = await self._auth.header(registry, scope)
            if auth:
                req_headers["Authorization"] = auth
            resp = await self._send(method, url, registry, req_headers, content)
            if resp.status_code == 401 and not tried_auth:
                tried_auth = True
                challenge = resp.headers.get("www-authenticate", "")
                try:
                    if await self._auth.answer(challenge, registry, scope, auth):
                        continue
                except AuthFailure as exc:
                    self._record(exc.kind)
                    error = RegistryUnreachable if exc.kind == "unreachable" else RegistryAuthError
                    raise error(f"{where}: {exc}", registry, exc.status) from None
            if resp.is_success:
                return resp
            self._record(_label_for_status(resp.status_code))
            detail = registry_errors_text(resp.content)
            suffix = f" ({detail})" if detail else ""
            if resp.status_code in (401, 403):
                how = "with the configured credentials"
                if not await self._auth.has_credentials(registry):
                    how = "anonymously"
                raise RegistryAuthError(
                    f"{where}: access denied {how} (HTTP {resp.status_code}){suffix}",
                    registry,
                    resp.status_code,
                )
            if resp.status_code == 404:
                kind = BlobNotFound if blob else ManifestNotFound
                noun = "blob" if blob else "manifest"
                ref = path.split("/", 1)[1]
                raise kind(f"{where}: {noun} {ref} not found{suffix}", registry, 404)
            raise RegistryError(
                f"{where}: {method} {path} failed with HTTP {resp.status_code}{suffix}",
                registry,
                resp.status_code,
            )

    async def _send(
        self,
        method: str,
        url: str,
        registry: str,
        headers: Mapping[str, str],
        content: bytes | None,
    ) -> httpx.Response:
        attempt = 0
        while True:
            try:
                resp = await self._http.request(method, url, headers=headers, content=content)
            except httpx.TimeoutException as exc:
                self._record("timeout")
                failure = f"timed out ({type(exc).__name__})"
            except httpx.TransportError as exc:
                self._record("unreachable")
                failure = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code not in RETRY_STATUSES or attempt >= self._retries:
                    return resp
                self._record(_label_for_status(resp.status_code))
                failure = ""
            if attempt >= self._retries:
                raise RegistryUnreachable(
                    f"registry {registry} unreachable after {attempt + 1} attempts: {failure}",
                    registry,
                )
            await self._sleep(backoff_delay(attempt, self._backoff_base))
            attempt += 1
