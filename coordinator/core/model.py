"""Domain records of builds and jobs, their states, and the errors the coordinator raises."""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field


class BuildState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    ASSEMBLING = "assembling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (BuildState.SUCCEEDED, BuildState.FAILED, BuildState.CANCELLED)


class JobState(enum.StrEnum):
    QUEUED = "queued"
    ASSIGNED = "assigned"
    RUNNING = "running"
    PUSHED = "pushed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.PUSHED, JobState.FAILED, JobState.CANCELLED)


class Mode(enum.StrEnum):
    NATIVE = "native"
    EMULATED = "emulated"


class EmulationPolicy(enum.StrEnum):
    FALLBACK = "fallback"
    NEVER = "never"
    ALLOW = "allow"


class PolyarchError(Exception):
    """Base of the coordinator's domain errors; servicers map them to status codes."""


class InvalidRequest(PolyarchError):
    """The request itself is wrong (malformed platform, tag, missing field)."""


class NotFound(PolyarchError):
    """A build, agent or context that does not exist."""


class Unschedulable(PolyarchError):
    """No connected agent can build a requested platform under the emulation policy."""


class Unauthenticated(PolyarchError):
    """No credentials, or credentials that are unknown, expired or revoked."""


class PermissionDenied(PolyarchError):
    """Known credentials whose role (or agent identity) does not allow the request."""


class AlreadyExists(PolyarchError):
    """A name, enrolment, connection or idempotency key another caller already holds."""


class LimitExceeded(PolyarchError):
    """A request over one of the coordinator's limits (size, count, rate)."""


class NotReady(PolyarchError):
    """A request about a build that is not in the state it needs (an export of a running
    build, say)."""


@dataclass
class BuildSpec:
    """What the client asked for; stored with the build so jobs can be re-dispatched."""

    context_digest: str
    dockerfile: str
    platforms: list[str]
    tags: list[str]
    build_args: dict[str, str] = field(default_factory=dict)
    target: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    emulation: EmulationPolicy = EmulationPolicy.FALLBACK
    cache_from: list[str] = field(default_factory=list)
    cache_to: list[str] = field(default_factory=list)
    # registry host and repository the tags share, e.g. ("127.0.0.1:5000", "team/app")
    registry: str = ""
    repository: str = ""
    # what the build brought in memory (the values never reach the store): secret ids and
    # the registries it has its own credentials for
    secret_ids: list[str] = field(default_factory=list)
    credential_registries: list[str] = field(default_factory=list)
    no_cache: bool = False
    pull: bool = False
    # buildx --annotation specs for the index and its entries (registry/annotations.py)
    annotations: list[str] = field(default_factory=list)
    # build and verify, publish no tag (buildx --output type=image,push=false / type=none)
    no_publish: bool = False
    # the build's own scan command (registry/gate.py), where the coordinator allows one
    scan_command: str = ""
    # SLSA provenance attached per platform: "" (none), "min" or "max" (registry/provenance.py)
    provenance: str = ""
    # cosign signature of the index: "" (none), "key" (the build's own key, held in memory
    # only) or "farm" (the coordinator's key); registry/signatures.py
    sign: str = ""


@dataclass
class JobRecord:
    """One platform of a build, with the outcome of its latest attempt."""

    id: str
    build_id: str
    platform: str
    state: JobState = JobState.QUEUED
    agent: str = ""
    mode: Mode | None = None
    attempt: int = 0
    digest: str = ""
    size: int = 0
    media_type: str = ""
    error: str = ""
    failed_step: str = ""
    queued_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    requeue_reasons: list[str] = field(default_factory=list)
    # the image config's digest, once the coordinator has verified the pushed image
    config_digest: str = ""
    # the attestation manifest the index holds for this platform's image ("" when none)
    attestation_digest: str = ""
    attestation_size: int = 0


@dataclass
class BuildRecord:
    """A build: its request, its state and, once published, its index."""

    id: str
    spec: BuildSpec
    state: BuildState = BuildState.QUEUED
    created_at: float = 0.0
    finished_at: float | None = None
    idempotency_key: str = ""
    index_digest: str = ""
    index_media_type: str = ""
    index_size: int = 0
    error: str = ""
    # the token that submitted it ("" without auth): may cancel it; scopes its idempotency key
    owner: str = ""
    # sha256 of the request: the same idempotency key with another request is refused
    request_hash: str = ""


# Fields added after the first release, with their defaults: left out of the JSON while they
# hold them, so the request hash of a build stored before stays the same.
_ADDED_LATER: dict[str, object] = {
    "no_cache": False, "pull": False, "annotations": [], "no_publish": False,
    "scan_command": "",
    "provenance": "",
    "sign": "",
}  # fmt: skip


def spec_json(spec: BuildSpec) -> str:
    """The spec as canonical JSON. Its fields are flat (strings, lists and maps of strings, a
    str enum, booleans), so vars() gives what dataclasses.asdict would, without deep copies."""
    fields = {k: v for k, v in vars(spec).items() if k not in _ADDED_LATER or v != _ADDED_LATER[k]}
    return json.dumps(fields, sort_keys=True)


def request_hash(spec: BuildSpec) -> str:
    """A stable hash of what was asked for."""
    return hashlib.sha256(spec_json(spec).encode()).hexdigest()


def push_tag(build_id: str, platform: str, attempt: int) -> str:
    """The per-job tag an agent pushes under: build, platform and attempt, so a late push of an
    old attempt can never be mistaken for the current one."""
    slug = str(platform).replace("/", "-")
    return f"polyarch-{build_id}-{slug}-{attempt}"
