"""Checks of a build submission, with errors that name exactly what is wrong."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath

from polyarch.coordinator.contexts.store import ContextStore, check_digest
from polyarch.coordinator.core.fleet import AgentSession
from polyarch.coordinator.core.model import BuildSpec, EmulationPolicy, InvalidRequest
from polyarch.coordinator.limits import Limits
from polyarch.coordinator.registry.annotations import parse_annotations
from polyarch.coordinator.wire.caps import check_caps
from polyarch.proto.caches import cache_count_refusal, cache_refusal
from polyarch.proto.platforms import Platform, PlatformError, parse_platform
from polyarch.proto.references import ReferenceError, parse_reference

DEFAULT_LIMITS = Limits()


def validate_spec(
    spec: BuildSpec,
    contexts: ContextStore,
    limits: Limits = DEFAULT_LIMITS,
    scratch_repository: str = "",
) -> list[Platform]:
    """Validates a spec in place (normalising platforms, dockerfile, registry/repository).
    The images of a build that publishes nothing go to `scratch_repository`
    ("registry/repository") where one is set, and it may then come without a tag."""
    check_caps(spec, limits)
    contexts.require(check_digest(spec.context_digest))
    spec.dockerfile = _check_dockerfile(spec.dockerfile or "Dockerfile")
    if not spec.platforms:
        raise InvalidRequest("no platform given: name at least one, e.g. linux/amd64")
    platforms: list[Platform] = []
    for text in spec.platforms:
        try:
            platform = parse_platform(text)
        except PlatformError as exc:
            raise InvalidRequest(str(exc)) from None
        if platform not in platforms:
            platforms.append(platform)
    spec.platforms = [str(p) for p in platforms]
    if spec.tags or not spec.no_publish:
        where = _check_tags(spec.tags)
    if spec.no_publish and (scratch_repository or not spec.tags):
        # nothing is published: the images stay out of the tags' repositories, as in buildx
        where = _scratch(scratch_repository)
    spec.registry, spec.repository = where
    for key in spec.build_args:
        if not key or "=" in key:
            raise InvalidRequest(f"malformed build arg name {key!r}")
    parse_annotations(spec.annotations, platforms)  # refused now, not after the builds
    return platforms


def _check_dockerfile(path: str) -> str:
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts:
        raise InvalidRequest(f"dockerfile path {path!r} must be relative and inside the context")
    return str(pure)


def _check_tags(tags: list[str]) -> tuple[str, str]:
    """Normalises the tags in place the Docker way (docker.io, library/, latest); returns the
    first tag's registry and repository, where the agents push (the index is copied to the
    other tags' repositories once it is published)."""
    if not tags:
        raise InvalidRequest("no tag given: name at least one, e.g. -t registry/repo:tag")
    repositories: list[tuple[str, str]] = []
    for i, tag in enumerate(tags):
        try:
            ref = parse_reference(tag)
        except ReferenceError as exc:
            raise InvalidRequest(f"invalid tag {tag!r}: {exc}") from None
        if ref.digest or not ref.tag:
            raise InvalidRequest(f"tag {tag!r} must name a tag, not a digest")
        repositories.append((ref.registry, ref.repository))
        tags[i] = f"{ref.registry}/{ref.repository}:{ref.tag}"
    return repositories[0]


def _scratch(repository: str) -> tuple[str, str]:
    if not repository:
        raise InvalidRequest(
            "no tag given, and this coordinator has no --scratch-repository for the images of "
            "builds that publish nothing: give a tag (-t) to push the images under"
        )
    ref = parse_reference(repository, default_tag=None)
    return ref.registry, ref.repository


def describe_unschedulable(
    platforms: list[Platform], policy: EmulationPolicy, sessions: Mapping[str, AgentSession]
) -> str:
    """Why no agent can take these platforms, and what the fleet does offer."""
    native = sorted({str(p) for s in sessions.values() for p in s.native})
    emulated = sorted({str(p) for s in sessions.values() for p in s.emulated})
    names = ", ".join(str(p) for p in platforms)
    hint = ""
    if policy is EmulationPolicy.NEVER and any(str(p) in emulated for p in platforms):
        hint = " (an emulating agent could build it: use --emulation fallback or allow)"
    return (
        f"no connected agent can build {names} with emulation={policy.value}{hint}; "
        f"native: {', '.join(native) or 'none'}; emulated: {', '.join(emulated) or 'none'}"
    )


def refuse_unhonoured_caches(
    spec: BuildSpec,
    candidates: Mapping[Platform, Sequence[AgentSession]],
) -> None:
    """InvalidRequest naming each cache spec an agent that may take the build cannot honour
    (docker agents export only inline caches, say), or more specs than it takes in one
    direction (buildah: one): refused now rather than skipped there.
    `candidates` are, per platform, the connected agents its emulation policy allows."""
    problems = []
    for direction, flag, specs in (("from", "--cache-from", spec.cache_from),
                                   ("to", "--cache-to", spec.cache_to)):  # fmt: skip
        for platform, sessions in candidates.items():
            for session in sessions:
                why = cache_count_refusal(session.builder, direction, specs)
                if why:
                    problems.append(f"{flag}: {why} (agent {session.name} could take {platform})")
                    break
        for cache in specs:
            for platform, sessions in candidates.items():
                for session in sessions:
                    why = cache_refusal(session.builder, direction, cache)
                    if why:
                        problems.append(
                            f"{flag} {cache!r}: {why} (agent {session.name} could take {platform})"
                        )
                        break
    if problems:
        raise InvalidRequest("; ".join(dict.fromkeys(problems)))
