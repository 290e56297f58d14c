"""What `polyarch build` sends for its own use: --secret values and registry credentials."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from pathlib import Path

from polyarch.coordinator.registry.credentials import CredentialError, CredentialStore
from polyarch.proto.references import ReferenceError, parse_reference

MAX_SECRET_BYTES = 500 * 1024  # as BuildKit


class SecretSpecError(ValueError):
    """A --secret that names no id or no readable source; never carries a value."""


def parse_secret(spec: str) -> tuple[str, bytes]:
    """`id=npm,src=FILE`, `id=npm,env=VAR` (buildx's spellings; `source`, `type` accepted);
    a bare `id=VAR` reads $VAR when set, else the file VAR."""
    fields: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise SecretSpecError(f"--secret {spec!r}: expected id=ID,src=FILE or id=ID,env=VAR")
        fields[key.strip().lower()] = value
    secret_id = fields.get("id", "")
    if not secret_id:
        raise SecretSpecError(f"--secret {spec!r} has no id=")
    source = fields.get("src") or fields.get("source")
    env = fields.get("env")
    if source is None and env is None:
        env, source = (secret_id, None) if secret_id in os.environ else (None, secret_id)
    if env is not None:
        if env not in os.environ:
            raise SecretSpecError(f"--secret id={secret_id}: ${env} is not set")
        data = os.environ[env].encode()
    else:
        assert source is not None
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise SecretSpecError(
                f"--secret id={secret_id}: cannot read {source}: {exc.strerror}"
            ) from None
    if len(data) > MAX_SECRET_BYTES:
        raise SecretSpecError(f"--secret id={secret_id} is over {MAX_SECRET_BYTES} bytes")
    return secret_id, data


def registries_of(tags: Iterable[str], cache_specs: Iterable[str]) -> list[str]:
    """The registries a build pushes to or reads caches from."""
    found: list[str] = []
    refs = list(tags)
    for spec in cache_specs:
        fields = dict(p.split("=", 1) for p in spec.split(",") if "=" in p)
        refs.append(fields.get("ref", spec if "=" not in spec else ""))
    for ref in refs:
        try:
            registry = parse_reference(ref).registry if ref else ""
        except ReferenceError:
            continue
        if registry and registry not in found:
            found.append(registry)
    return found


def registry_auths_for(registries: list[str]) -> list[tuple[str, str, str]]:
    """The user's docker config.json entries (credential helpers included) for exactly these
    registries, to send with the submit; other registries' entries stay on this machine."""
    try:
        store = CredentialStore.from_docker_config()
    except CredentialError as exc:
        raise SecretSpecError(str(exc)) from None

    async def lookup() -> list[tuple[str, str, str]]:
        auths = []
        for registry in registries:
            try:
                found = await store.get(registry)
            except CredentialError:
                found = None  # a broken helper for one registry: the farm's own may do
            if found is not None:
                auths.append((registry, found.username, found.password))
        return auths

    return asyncio.run(lookup())
