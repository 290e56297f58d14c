"""Immutable tags: the policy's globs, the registry check, and a client that refuses moves."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from polyarch.coordinator.registry.client import (
    ManifestNotFound,
    RegistryClient,
    RegistryError,
    compute_digest,
)
from polyarch.proto.references import is_digest, parse_reference


class TagMoveRefused(RegistryError):
    """An immutable tag already points at another digest: the build may not move it."""


@dataclass(frozen=True)
class HeldTag:
    """A protected tag the registry already holds: its reference, digest and the rule."""

    reference: str
    digest: str
    pattern: str

    def refusal(self, wanted: str = "") -> str:
        to = f" to {wanted}" if wanted else ""
        return (
            f"tag {self.reference} is immutable (rule {self.pattern!r}) and already points at "
            f"{self.digest}; refusing to move it{to}"
        )


class ImmutableTags:
    """Harbor-style rules. A glob without ':' matches the tag alone (`v*`, Harbor's common
    case); a glob with ':' matches `REPOSITORY:TAG` (`team/*:v*`), the repository without
    its registry host. fnmatch syntax, case-sensitive, as tags are."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns = tuple(p.strip() for p in patterns if p.strip())

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def rule_for(self, repository: str, tag: str) -> str:
        """The first glob protecting repository:tag, or ""."""
        for pattern in self.patterns:
            subject = f"{repository}:{tag}" if ":" in pattern else tag
            if fnmatch.fnmatchcase(subject, pattern):
                return pattern
        return ""

    def protected(self, tags: Sequence[str]) -> list[tuple[str, str, str, str]]:
        """(registry, repository, tag, rule) of each normalised tag a rule protects."""
        found = []
        for text in tags:
            ref = parse_reference(text)
            tag = ref.tag or "latest"
            rule = self.rule_for(ref.repository, tag)
            if rule:
                found.append((ref.registry, ref.repository, tag, rule))
        return found

    async def held(self, client: RegistryClient, tags: Sequence[str]) -> list[HeldTag]:
        """The protected tags among `tags` that the registry already holds."""
        held = []
        for registry, repository, tag, rule in self.protected(tags):
            try:
                descriptor = await client.head_manifest(registry, repository, tag)
            except ManifestNotFound:
                continue
            held.append(HeldTag(f"{registry}/{repository}:{tag}", descriptor.digest, rule))
        return held

    async def refuse_moves(self, client: RegistryClient, tags: Sequence[str], digest: str) -> None:
        """TagMoveRefused naming every protected tag that points at something else than
        `digest` (the same digest again is no move)."""
        moved = [h for h in await self.held(client, tags) if h.digest != digest]
        if moved:
            registry = parse_reference(moved[0].reference).registry
            raise TagMoveRefused("; ".join(h.refusal(digest) for h in moved), registry)

    def guard(self, client: RegistryClient, tags: Sequence[str]) -> RegistryClient:
        """`client`, or a copy that checks every protected tag of the build right before
        each PUT of one of the build's tags (so none moves when any would)."""
        if not self or not self.protected(tags):
            return client
        return GuardedClient(client, self, tags)


class GuardedClient(RegistryClient):
    """A RegistryClient whose PUT of one of a build's tags first checks the build's protected
    tags against the manifest being pushed. Shares the wrapped client's connections and
    credentials, as RegistryClient.with_credentials does."""

    def __init__(self, inner: RegistryClient, rules: ImmutableTags, tags: Sequence[str]) -> None:
        # no super().__init__: the state is the inner client's (connections, auth, retries)
        self.__dict__.update(inner.__dict__)
        self._rules = rules
        self._tags = list(tags)
        self._requested = {
            (r.registry, r.repository, r.tag or "latest") for r in map(parse_reference, tags)
        }

    async def put_manifest(
        self, registry: str, repository: str, reference: str, body: bytes, media_type: str
    ) -> str:
        if not is_digest(reference) and (registry, repository, reference) in self._requested:
            await self._rules.refuse_moves(self, self._tags, compute_digest(body))
        return await super().put_manifest(registry, repository, reference, body, media_type)
