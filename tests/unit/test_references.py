"""Unit tests: image references, auth challenges, credentials and client behaviour (no network)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from polyarch.coordinator.registry.client import (
    DigestMismatch,
    ManifestNotFound,
    RegistryAuthError,
    RegistryClient,
    RegistryError,
    RegistryUnreachable,
    registry_errors_text,
    registry_scheme,
)
from polyarch.coordinator.registry.credentials import (
    CredentialError,
    Credentials,
    CredentialStore,
    normalize_registry_key,
    parse_www_authenticate,
)
from polyarch.proto.references import ImageReference, ReferenceError, parse_reference

SECRET = "s3cr3t-Pa55word"
DIGEST = "sha256:" + "a" * 64

# -- references -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("busybox", ImageReference("docker.io", "library/busybox", "latest")),
        ("busybox:1.36", ImageReference("docker.io", "library/busybox", "1.36")),
        ("user/app", ImageReference("docker.io", "user/app", "latest")),
        ("docker.io/busybox", ImageReference("docker.io", "library/busybox", "latest")),
        ("index.docker.io/user/app:v1", ImageReference("docker.io", "user/app", "v1")),
        ("localhost/app", ImageReference("localhost", "app", "latest")),
        ("localhost:5000/team/app:x", ImageReference("localhost:5000", "team/app", "x")),
        ("127.0.0.1:5000/a/b/c:1.0-rc_1", ImageReference("127.0.0.1:5000", "a/b/c", "1.0-rc_1")),
        ("ghcr.io/o/app@" + DIGEST, ImageReference("ghcr.io", "o/app", None, DIGEST)),
        ("ghcr.io/o/app:t@" + DIGEST, ImageReference("ghcr.io", "o/app", "t", DIGEST)),
        ("[::1]:5000/app:t", ImageReference("[::1]:5000", "app", "t")),
        ("Registry.Example/app", ImageReference("Registry.Example", "app", "latest")),
        ("reg.example/a__b/c-d.e", ImageReference("reg.example", "a__b/c-d.e", "latest")),
    ],
)
def test_parse_reference_normalises(text: str, expected: ImageReference) -> None:
    assert parse_reference(text) == expected


def test_reference_string_forms() -> None:
    ref = parse_reference("localhost:5000/team/app:v1")
    assert ref.repository_ref == "localhost:5000/team/app"
    assert str(ref) == "localhost:5000/team/app:v1"
    assert ref.reference == "v1"
    pinned = parse_reference("app@" + DIGEST)
    assert pinned.reference == DIGEST
    assert str(pinned) == "docker.io/library/app@" + DIGEST


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        ("docker.io/Team/App", "lowercase"),
        ("MyApp", "lowercase"),
        ("app:bad/tag", "invalid registry"),
        ("app:-tag", "invalid tag"),
        ("app:t@g", "invalid digest"),
        ("app:" + "t" * 129, "invalid tag"),
        ("app@sha256:abc", "invalid digest"),
        ("app@md5:" + "a" * 32, "invalid digest"),
        ("reg.example/", "missing repository"),
        ("reg.example/app_/x", "invalid repository"),
        ("reg.example/a//b", "invalid repository"),
        ("bad_host.example:5000/app", "invalid registry"),
        ("reg.example/" + "a" * 260, "longer than 255"),
    ],
)
def test_parse_reference_rejects(text: str, problem: str) -> None:
    with pytest.raises(ReferenceError, match=problem) as info:
        parse_reference(text)
    assert isinstance(info.value, ValueError)


def test_registry_scheme_plain_http_only_for_loopback_and_insecure() -> None:
    assert registry_scheme("localhost:5000") == "http"
    assert registry_scheme("127.0.0.1:5000") == "http"
    assert registry_scheme("127.3.4.5") == "http"
    assert registry_scheme("[::1]:5000") == "http"
    assert registry_scheme("registry.internal:5000") == "https"
    assert registry_scheme("10.0.0.5:5000") == "https"
    assert registry_scheme("registry.internal:5000", ["registry.internal:5000"]) == "http"
    assert registry_scheme("registry.internal:5000", ["registry.internal"]) == "http"
    assert registry_scheme("other.internal:5000", ["registry.internal"]) == "https"


# -- WWW-Authenticate -------------------------------------------------------------------------


def test_parse_bearer_challenge_with_commas_in_scope() -> None:
    header = (
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:team/app:pull,push"'
    )
    [challenge] = parse_www_authenticate(header)
    assert challenge.scheme == "bearer"
    assert challenge.realm == "https://auth.example/token"
    assert challenge.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:team/app:pull,push",
    }


def test_parse_basic_and_multiple_challenges() -> None:
    [basic] = parse_www_authenticate('Basic realm="Registry Realm"')
    assert (basic.scheme, basic.realm) == ("basic", "Registry Realm")
    both = parse_www_authenticate('Basic realm="a", Bearer realm="b",service=s, error="x\\"y"')
    assert [c.scheme for c in both] == ["basic", "bearer"]
    assert both[1].params == {"realm": "b", "service": "s", "error": 'x"y'}


def test_parse_malformed_challenge() -> None:
    with pytest.raises(ValueError, match="before any scheme"):
        parse_www_authenticate('realm="x"')
    assert parse_www_authenticate("") == []


# -- credentials ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("https://index.docker.io/v1/", "docker.io"),
        ("index.docker.io", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("http://localhost:5000/v2/", "localhost:5000"),
        ("Reg.Example:443", "reg.example:443"),
    ],
)
def test_normalize_registry_key(key: str, expected: str) -> None:
    assert normalize_registry_key(key) == expected


async def test_in_memory_store_and_no_secret_in_repr() -> None:
    store = CredentialStore.in_memory({"localhost:5000": ("ci", SECRET)})
    creds = await store.get("localhost:5000")
    assert creds == Credentials("ci", SECRET)
    assert await store.get("other:5000") is None
    for text in (repr(store), str(store), repr(creds), str(creds)):
        assert SECRET not in text
    assert "localhost:5000" in repr(store)


def _write_config(directory: Path, data: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(data))
    return path


async def test_docker_config_auths(tmp_path: Path) -> None:
    encoded = base64.b64encode(f"alice:{SECRET}".encode()).decode()
    path = _write_config(
        tmp_path,
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": encoded},
                "http://reg.example:5000/v2/": {"username": "bob", "password": "pw2"},
                "empty.example": {},
            }
        },
    )
    store = CredentialStore.from_docker_config(path)
    assert await store.get("docker.io") == Credentials("alice", SECRET)
    assert await store.get("reg.example:5000") == Credentials("bob", "pw2")
    assert await store.get("empty.example") is None
    assert SECRET not in repr(store)
    assert "pw2" not in str(store)


async def test_docker_config_from_env_and_missing_file(tmp_path: Path) -> None:
    encoded = base64.b64encode(b"u:p").decode()
    _write_config(tmp_path / "cfg", {"auths": {"localhost:5000": {"auth": encoded}}})
    store = CredentialStore.from_docker_config(env={"DOCKER_CONFIG": str(tmp_path / "cfg")})
    assert await store.get("localhost:5000") == Credentials("u", "p")
    empty = CredentialStore.from_docker_config(tmp_path / "nope.json")
    assert await empty.get("localhost:5000") is None


def test_docker_config_errors_do_not_leak(tmp_path: Path) -> None:
    path = _write_config(tmp_path, {"auths": {"r.example": {"auth": "!!" + SECRET}}})
    with pytest.raises(CredentialError, match="not valid base64") as info:
        CredentialStore.from_docker_config(path)
    assert SECRET not in str(info.value)
    path.write_text("{not json")
    with pytest.raises(CredentialError, match="not valid JSON"):
        CredentialStore.from_docker_config(path)


@pytest.fixture
def fake_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `docker-credential-fake` on PATH that knows one server and logs what it was asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "docker-credential-fake"
    script.write_text(
        "#!/bin/sh\n"
        'read server\necho "$1 $server" >> "$(dirname "$0")/calls"\n'
        'case "$server" in helped.example|https://index.docker.io/v1/)\n'
        f'  echo \'{{"ServerURL":"x","Username":"helper-user","Secret":"{SECRET}"}}\'\n'
        "  ;;\n*) echo 'credentials not found in native keychain'; exit 1 ;;\nesac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


async def test_cred_helpers_and_creds_store(tmp_path: Path, fake_helper: Path) -> None:
    encoded = base64.b64encode(b"file-user:file-pw").decode()
    path = _write_config(
        tmp_path / "cfg",
        {
            "credHelpers": {"helped.example": "fake"},
            "credsStore": "fake",
            "auths": {"plain.example": {"auth": encoded}},
        },
    )
    store = CredentialStore.from_docker_config(path)
    assert await store.get("helped.example") == Credentials("helper-user", SECRET)
    assert await store.get("helped.example") == Credentials("helper-user", SECRET)
    assert await store.get("docker.io") == Credentials("helper-user", SECRET)
    # The store has nothing for it: fall back to the file's own entry.
    assert await store.get("plain.example") == Credentials("file-user", "file-pw")
    calls = (fake_helper / "calls").read_text().splitlines()
    assert calls == ["get helped.example", "get https://index.docker.io/v1/", "get plain.example"]
    assert SECRET not in repr(store)


async def test_missing_helper_is_a_clear_error() -> None:
    store = CredentialStore(cred_helpers={"r.example": "does-not-exist-polyarch"})
    with pytest.raises(CredentialError, match="docker-credential-does-not-exist-polyarch"):
        await store.get("r.example")


# -- client behaviour against a mock transport -----------------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]


def _client(handler: Handler, **kwargs: object) -> tuple[RegistryClient, list[str], list[float]]:
    errors: list[str] = []
    sleeps: list[float] = []

    async def fake_sleep(delay: float) -> None:
        sleeps.append(delay)

    client = RegistryClient(
        on_request_error=errors.append,
        sleep=fake_sleep,
        transport=httpx.MockTransport(handler),
        **kwargs,  # type: ignore[arg-type]
    )
    return client, errors, sleeps


def _manifest_response(body: bytes, request: httpx.Request) -> httpx.Response:
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    headers = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
    headers["Docker-Content-Digest"] = digest
    return httpx.Response(200, content=body, headers=headers, request=request)


async def test_bearer_token_flow_is_cached_per_scope() -> None:
    token_calls: list[httpx.Request] = []
    body = b'{"schemaVersion":2}'

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            token_calls.append(request)
            return httpx.Response(200, json={"token": "tok-" + SECRET, "expires_in": 300})
        if request.headers.get("authorization") != "Bearer tok-" + SECRET:
            return httpx.Response(
                401,
                headers={
                    "WWW-Authenticate": 'Bearer realm="https://auth.example/token",'
                    'service="reg.example",scope="repository:team/app:pull"'
                },
            )
        return _manifest_response(body, request)

    store = CredentialStore.in_memory({"reg.example": ("ci", SECRET)})
    client, errors, _ = _client(handler, credentials=store)
    async with client:
        got, desc = await client.get_manifest("reg.example", "team/app", "v1")
        await client.get_manifest("reg.example", "team/app", "v2")
    assert got == body and desc.size == len(body)
    assert len(token_calls) == 1
    assert token_calls[0].url.params["scope"] == "repository:team/app:pull"
    assert token_calls[0].url.params["service"] == "reg.example"
    assert token_calls[0].headers["authorization"].startswith("Basic ")
    assert errors == []


async def test_token_refused_names_registry_not_secret() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            return httpx.Response(401, json={"details": "bad password " + SECRET})
        return httpx.Response(
            401, headers={"WWW-Authenticate": 'Bearer realm="https://auth.example/t"'}
        )

    store = CredentialStore.in_memory({"reg.example": ("ci", SECRET)})
    client, errors, _ = _client(handler, credentials=store)
    async with client:
        with pytest.raises(RegistryAuthError) as info:
            await client.head_manifest("reg.example", "team/app", "v1")
    assert "reg.example/team/app" in str(info.value)
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    assert info.value.registry == "reg.example"
    assert errors == ["auth"]


async def test_basic_auth_retry_and_rejection() -> None:
    good = "Basic " + base64.b64encode(f"ci:{SECRET}".encode()).decode()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") == good:
            return _manifest_response(b"{}", request)
        return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})

    ok = CredentialStore.in_memory({"reg.example": ("ci", SECRET)})
    client, _, _ = _client(handler, credentials=ok)
    async with client:
        body, _ = await client.get_manifest("reg.example", "app", "v1")
    assert body == b"{}"
    wrong = CredentialStore.in_memory({"reg.example": ("ci", "wrong-" + SECRET)})
    client, errors, _ = _client(handler, credentials=wrong)
    async with client:
        with pytest.raises(RegistryAuthError, match="configured credentials") as info:
            await client.get_manifest("reg.example", "app", "v1")
    assert "wrong-" + SECRET not in str(info.value)
    assert errors == ["auth"]
    client, _, _ = _client(handler)
    async with client:
        with pytest.raises(RegistryAuthError, match="anonymously"):
            await client.get_manifest("reg.example", "app", "v1")


async def test_retries_503_with_backoff_then_succeeds() -> None:
    answers = [503, 502, 200]

    def handler(request: httpx.Request) -> httpx.Response:
        status = answers.pop(0)
        if status != 200:
            return httpx.Response(status)
        return _manifest_response(b"{}", request)

    client, errors, sleeps = _client(handler, retries=4)
    async with client:
        await client.get_manifest("127.0.0.1:5000", "app", "v1")
    assert errors == ["http_5xx", "http_5xx"]
    assert len(sleeps) == 2 and all(0 < s <= 5 for s in sleeps)


async def test_connection_errors_are_bounded() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client, errors, sleeps = _client(handler, retries=2)
    async with client:
        with pytest.raises(RegistryUnreachable, match=r"registry 127\.0\.0\.1:1 unreachable"):
            await client.head_manifest("127.0.0.1:1", "app", "v1")
    assert errors == ["unreachable"] * 3
    assert len(sleeps) == 2


async def test_terminal_errors_carry_registry_error_codes() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if "manifests" in request.url.path:
            errors = [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]
            return httpx.Response(404, json={"errors": errors})
        return httpx.Response(400, json={"errors": [{"code": "DIGEST_INVALID", "message": "x"}]})

    client, errors, sleeps = _client(handler)
    async with client:
        with pytest.raises(ManifestNotFound, match="MANIFEST_UNKNOWN") as info:
            await client.get_manifest("127.0.0.1:5000", "app", DIGEST)
        assert DIGEST in str(info.value) and info.value.status == 404
        with pytest.raises(RegistryError, match=r"HTTP 400 \(DIGEST_INVALID: x\)") as err:
            await client.get_blob("127.0.0.1:5000", "app", DIGEST)
    assert err.value.status == 400
    assert errors == ["not_found", "http_4xx"] and sleeps == []


async def test_digests_are_verified_not_trusted() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            return httpx.Response(201, headers={"Docker-Content-Digest": DIGEST})
        return httpx.Response(200, content=b"tampered", headers={"Docker-Content-Digest": DIGEST})

    client, _, _ = _client(handler)
    async with client:
        with pytest.raises(DigestMismatch, match="expected " + DIGEST):
            await client.get_blob("127.0.0.1:5000", "app", DIGEST)
        with pytest.raises(DigestMismatch):
            await client.get_manifest("127.0.0.1:5000", "app", DIGEST)
        with pytest.raises(DigestMismatch):
            await client.get_manifest("127.0.0.1:5000", "app", "tag")
        with pytest.raises(DigestMismatch, match="registry reports"):
            await client.put_manifest("127.0.0.1:5000", "app", "tag", b"{}", "x/y")


def test_registry_errors_text() -> None:
    body = json.dumps({"errors": [{"code": "A", "message": "m"}, {"code": "B"}]}).encode()
    assert registry_errors_text(body) == "A: m; B"
    assert registry_errors_text(b"<html>") == ""
