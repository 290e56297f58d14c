"""The builder backend interface: build requests, pushed images, failures and shared checks."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from polyarch.agent.builders.process import ProcessResult
from polyarch.proto.platforms import Platform
from polyarch.proto.registries import backoff_delay

# Output that means the machine, not the Dockerfile, is at fault: a retry elsewhere may pass.
_INFRASTRUCTURE_PATTERNS = (
    re.compile(r"qemu: uncaught target signal"),
    re.compile(r"qemu: unhandled CPU exception"),
    re.compile(r"qemu-\w+(-static)?: .*(Could not open|Unable to reserve|unable to)", re.I),
    re.compile(r"exec format error"),
    re.compile(r"no space left on device"),
    re.compile(r"Cannot connect to the Docker daemon"),
    re.compile(r"error during connect"),
    re.compile(r"cannot allocate memory", re.I),
    re.compile(r"OCI runtime (create|start) failed"),
    # containers-storage lost an image or layer under a build: another user of the storage
    # re-pointed a name or removed it (buildah slots share storage per platform)
    re.compile(r"\b(image|layer) not known\b"),
)

# A push that failed this way is worth repeating at once: registries answer 5xx while a
# concurrent push of the same blob commits (distribution 2.8: "invalid checksum digest
# format" on HEAD), and connections drop. Pushes are idempotent: blobs and manifests are
# content-addressed.
_TRANSIENT_PUSH_PATTERNS = (
    re.compile(r"\b(500|502|503|504) "),
    re.compile(r"(Internal Server Error|Bad Gateway|Service Unavailable|Gateway Timeout)"),
    re.compile(r"connection reset by peer|broken pipe|unexpected EOF|i/o timeout", re.I),
    re.compile(r"TLS handshake timeout|too many requests|\b429\b", re.I),
    # a concurrent push of the same layers had not committed the blob yet when this
    # manifest went up (distribution 2.8, two slots pushing identical images)
    re.compile(r"manifest blob unknown|blob unknown to registry", re.I),
)
PUSH_ATTEMPTS = 3
PUSH_RETRY_BASE_SECONDS = 0.5


@dataclass(frozen=True)
class BuildRequest:
    """One platform of one build: what to build and where to push it."""

    context_dir: Path
    dockerfile: str  # relative to context_dir
    platform: Platform
    image: str  # full push reference "registry/repository:per-job-tag"
    build_args: Mapping[str, str] = field(default_factory=dict)
    target: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    insecure_registry: bool = False  # plain HTTP / no TLS verification for the push registry
    cache_from: Sequence[str] = ()
    cache_to: Sequence[str] = ()
    # this job's own credentials (agent/job_credentials.py): files under its job folder
    secrets: Mapping[str, Path] = field(default_factory=dict)  # secret id -> file
    docker_config_dir: Path | None = None
    auth_file: Path | None = None
    no_cache: bool = False  # no cached layer is used
    pull: bool = False  # base images are pulled again


@dataclass(frozen=True)
class PushedImage:
    """What the registry now holds; size is 0 when the tool does not say (buildah)."""

    digest: str
    size: int
    media_type: str


class BuildFailed(Exception):
    """A build or push that failed in a named step.

    infrastructure is True when the builder, agent or emulator is at fault (worth a retry on
    another agent) and False when the Dockerfile or its inputs are (a retry would fail too).
    """

    def __init__(self, step: str, message: str, infrastructure: bool = False) -> None:
        super().__init__(f"{step}: {message}" if step else message)
        self.step = step
        self.message = message
        self.infrastructure = infrastructure

    def __repr__(self) -> str:
        return (
            f"BuildFailed(step={self.step!r}, message={self.message!r}, "
            f"infrastructure={self.infrastructure!r})"
        )


class BuilderUnavailable(Exception):
    """The builder tool is missing or unusable; the message says what is missing and the fix."""


class Builder(Protocol):
    """A backend that builds one platform of a Dockerfile and pushes the result by digest."""

    name: str

    async def check(self) -> None:
        """Raises BuilderUnavailable unless builds can run."""
        ...

    async def build_and_push(
        self, request: BuildRequest, on_line: Callable[[str], None]
    ) -> PushedImage:
        """Builds and pushes, streaming every output line to on_line; raises BuildFailed."""
        ...

    async def idle(self) -> None:
        """Returns once no background clean-up of finished jobs runs (shutdown, tests)."""
        ...

    def may_link_context(self, dockerfile: bytes | None) -> bool:
        """Whether nothing a build of `dockerfile` runs can write into the context folder,
        so its files may be hard links into the agent's cache (None: the Dockerfile is not
        a plain file of the context). A wrong "yes" lets one build change another's files."""
        ...


def looks_like_infrastructure_failure(lines: Iterable[str]) -> bool:
    """True when the output shows an emulator crash or a machine-level fault."""
    return any(pattern.search(line) for line in lines for pattern in _INFRASTRUCTURE_PATTERNS)


def resolve_dockerfile(request: BuildRequest) -> Path:
    """The Dockerfile's absolute path, or BuildFailed("prepare") saying what is wrong."""
    context = request.context_dir
    if not context.is_dir():
        raise BuildFailed("prepare", f"build context {context} is not a directory", True)
    relative = Path(request.dockerfile or "Dockerfile")
    if relative.is_absolute() or ".." in relative.parts:
        raise BuildFailed(
            "prepare",
            f"Dockerfile path {request.dockerfile!r} must be relative and inside the context",
        )
    path = context / relative
    if not path.is_file():
        raise BuildFailed("prepare", f"Dockerfile {str(relative)!r} not found in the build context")
    return path


def missing_dockerfile_failure(dockerfile: str) -> BuildFailed:
    """The failure for a tool that reported it could not read the Dockerfile."""
    return BuildFailed("prepare", f"Dockerfile {dockerfile!r} not found in the build context")


def key_value_flags(flag: str, values: Mapping[str, str]) -> list[str]:
    """`--flag K=V` pairs in a stable (sorted) order."""
    argv: list[str] = []
    for key in sorted(values):
        argv += [flag, f"{key}={values[key]}"]
    return argv


def last_meaningful_line(lines: Sequence[str]) -> str:
    """The last non-blank line of output, for a failure whose cause nothing else names."""
    for line in reversed(lines):
        if line.strip() and line.strip() != "------":
            return line.strip()
    return "the builder exited with an error and printed nothing"


def push_failure_is_transient(lines: Iterable[str]) -> bool:
    """True when a failed push's output shows a registry hiccup that a retry may get past."""
    return any(p.search(line) for line in lines for p in _TRANSIENT_PUSH_PATTERNS)


async def push_with_retries(
    push: Callable[[], Awaitable[ProcessResult]], on_line: Callable[[str], None]
) -> ProcessResult:
    """Runs push() up to PUSH_ATTEMPTS times while it fails transiently (jittered backoff)."""
    for attempt in range(1, PUSH_ATTEMPTS + 1):
        result = await push()
        if result.ok or attempt == PUSH_ATTEMPTS or not push_failure_is_transient(result.lines):
            return result
        delay = backoff_delay(attempt - 1, PUSH_RETRY_BASE_SECONDS, cap=10.0)
        on_line(
            f"polyarch: push attempt {attempt} failed ({last_meaningful_line(result.lines)}); "
            f"retrying in {delay:.1f} s"
        )
        await asyncio.sleep(delay)
    raise AssertionError("unreachable: the last attempt always returns")


def secret_flags(secrets: Mapping[str, Path]) -> list[str]:
    """`--secret id=ID,src=FILE` for each secret, as docker (BuildKit) and buildah take them."""
    argv: list[str] = []
    for secret_id in sorted(secrets):
        argv += ["--secret", f"id={secret_id},src={secrets[secret_id]}"]
    return argv
