"""The Docker Engine backend: BuildKit builds through the docker CLI, then `docker push`."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable, Sequence

from polyarch.agent.builders.base import (
    BuilderUnavailable,
    BuildFailed,
    BuildRequest,
    PushedImage,
    key_value_flags,
    last_meaningful_line,
    looks_like_infrastructure_failure,
    missing_dockerfile_failure,
    push_with_retries,
    resolve_dockerfile,
    secret_flags,
)
from polyarch.agent.builders.buildah_storage import StorageUsers
from polyarch.agent.builders.process import ProcessNotFound, ProcessResult, run_captured
from polyarch.agent.builders.process import run_streaming as _run_streaming
from polyarch.proto.agent_protocol import PUSHING_MARKER
from polyarch.proto.caches import docker_cache_args
from polyarch.proto.media_types import DOCKER_MANIFEST
from polyarch.proto.references import registry_of
from polyarch.proto.registries import is_loopback_registry

log = logging.getLogger(__name__)

# The first docker client major version whose `docker build` needs the buildx plugin.
BUILDX_REQUIRED_FROM = 23

_VERTEX = re.compile(r"^#(\d+) (.*)$")
_SUMMARY_STEP = re.compile(r"^ > (.+):$")
_PUSH_DIGEST = re.compile(r"digest: (sha256:[0-9a-f]{64}) size: (\d+)")
_MISSING_DOCKERFILE = re.compile(r"failed to read dockerfile|Cannot locate specified Dockerfile")
_DOCKERFILE_PARSE = re.compile(r"dockerfile parse error.*|unknown instruction: .*")


def parse_buildkit_failure(lines: Sequence[str], dockerfile: str = "Dockerfile") -> BuildFailed:
    """The failure a BuildKit `--progress=plain` log describes, naming the step that failed.

    `#5 [3/4] RUN exit 3` names vertex 5; `#5 ERROR: ...` then says it failed. The
    ` > [3/4] RUN exit 3:` summary block and the client's last line are the fallbacks.
    """
    infrastructure = looks_like_infrastructure_failure(lines)
    names: dict[str, str] = {}
    for line in lines:
        match = _VERTEX.match(line)
        if not match:
            continue
        vertex, rest = match.groups()
        if rest.startswith("ERROR"):
            message = rest[len("ERROR") :].lstrip(": ").strip() or last_meaningful_line(lines)
            return BuildFailed(names.get(vertex, "build"), message, infrastructure)
        names.setdefault(vertex, rest.strip())
    if any(_MISSING_DOCKERFILE.search(line) for line in lines):
        return missing_dockerfile_failure(dockerfile)
    for line in lines:
        parse_error = _DOCKERFILE_PARSE.search(line)
        if parse_error:
            return BuildFailed("parse Dockerfile", parse_error.group(0).strip(), infrastructure)
    for line in lines:
        summary = _SUMMARY_STEP.match(line)
        if summary:
            return BuildFailed(summary.group(1), last_meaningful_line(lines), infrastructure)
    return BuildFailed("build", last_meaningful_line(lines), infrastructure)


def parse_push_digest(lines: Sequence[str]) -> tuple[str, int] | None:
    """(digest, manifest size) from `docker push` output ("TAG: digest: sha256:... size: N")."""
    for line in reversed(lines):
        match = _PUSH_DIGEST.search(line)
        if match:
            return match.group(1), int(match.group(2))
    return None


def parse_client_version(text: str) -> tuple[int, str, str]:
    """(client major, client version, server version) from `version --format` output."""
    client, _, server = text.strip().partition(" ")
    major = re.match(r"(\d+)", client)
    return (int(major.group(1)) if major else 0), client, server.strip()


class DockerBuilder:
    """Builds with the BuildKit embedded in Docker Engine through a docker CLI binary."""

    name = "docker"

    def __init__(self, docker_binary: str = "docker") -> None:
        self.docker_binary = docker_binary
        self._env = {"DOCKER_BUILDKIT": "1"}
        # Per-job tags go once no build runs (StorageUsers, as for buildah): identical builds
        # in two slots make one image, and `docker rmi` of the first job's tag deleted it
        # while the second was still exporting it ("failed to get digest ...").
        self._users = StorageUsers(self._remove_tags, batch=1)

    def may_link_context(self, dockerfile: bytes | None) -> bool:
        # the docker CLI sends the folder to BuildKit, which builds from its own copy
        return True

    async def idle(self) -> None:
        """Returns once no removal of finished jobs' tags runs (for shutdown and tests)."""
        await self._users.idle()

    def _where(self) -> str:
        return shutil.which(self.docker_binary) or self.docker_binary

    async def check(self) -> None:
        fmt = "{{.Client.Version}} {{.Server.Version}}"
        try:
            result = await run_captured([self.docker_binary, "version", "--format", fmt])
        except ProcessNotFound as exc:
            raise BuilderUnavailable(
                f"docker client {self.docker_binary!r} cannot run ({exc.reason}); install "
                "docker.io or point --docker-binary at a docker client"
            ) from exc
        except TimeoutError as exc:
            raise BuilderUnavailable(
                f"`{self.docker_binary} version` did not answer in time; is dockerd healthy?"
            ) from exc
        major, client, server = parse_client_version(result.lines[0] if result.lines else "")
        if not result.ok or not server:
            raise BuilderUnavailable(
                f"the Docker daemon is unreachable through {self._where()}: "
                f"{result.tail(3) or 'no output'}; start dockerd or set DOCKER_HOST"
            )
        if major >= BUILDX_REQUIRED_FROM:
            buildx = await run_captured([self.docker_binary, "buildx", "version"])
            if not buildx.ok:
                raise BuilderUnavailable(
                    f"docker client {client} at {self._where()} needs the buildx plugin for "
                    "BuildKit builds; install docker-buildx or point --docker-binary at a "
                    "client that drives BuildKit (e.g. /usr/bin/docker 20.10)"
                )

    def build_command(
        self, request: BuildRequest, dockerfile_path: str
    ) -> tuple[list[str], list[str]]:
        """The `docker build` argv and notes about options this client cannot honour."""
        argv = [self.docker_binary, "build", "--progress=plain"]
        argv += ["--platform", str(request.platform), "-f", dockerfile_path, "-t", request.image]
        argv += ["--no-cache"] if request.no_cache else []
        argv += ["--pull"] if request.pull else []
        cache_argv, cache_build_args, notes = docker_cache_args(
            request.cache_from, request.cache_to
        )
        argv += key_value_flags("--build-arg", {**request.build_args, **cache_build_args})
        if request.target:
            argv += ["--target", request.target]
        argv += key_value_flags("--label", request.labels)
        argv += secret_flags(request.secrets)
        argv += cache_argv
        if request.insecure_registry and not is_loopback_registry(registry_of(request.image)):
            notes.append(
                "plain-HTTP registries other than 127.0.0.0/8 must be listed in dockerd's "
                "insecure-registries (daemon.json); the docker CLI has no per-push switch"
            )
        argv.append(str(request.context_dir))
        return argv, notes

    async def build_and_push(
        self, request: BuildRequest, on_line: Callable[[str], None]
    ) -> PushedImage:
        dockerfile = resolve_dockerfile(request)
        argv, notes = self.build_command(request, str(dockerfile))
        for note in notes:
            on_line(f"polyarch: {note}")
        env = dict(self._env)
        if request.docker_config_dir is not None:
            env["DOCKER_CONFIG"] = str(request.docker_config_dir)  # this job's credentials
        async with self._users.building():
            built = await self._run(argv, on_line, "build", env)
            if not built.ok:
                raise parse_buildkit_failure(built.lines, request.dockerfile)
            self._users.remove_later(request.image)
            push = [self.docker_binary, "push", request.image]
            on_line(f"{PUSHING_MARKER} {request.image}")
            pushed = await push_with_retries(lambda: self._run(push, on_line, "push", env), on_line)
            if not pushed.ok:
                raise BuildFailed("push", last_meaningful_line(pushed.lines), True)
            found = parse_push_digest(pushed.lines)
            if found is None:
                raise BuildFailed("push", "docker push printed no manifest digest", True)
        digest, size = found
        return PushedImage(digest=digest, size=size, media_type=DOCKER_MANIFEST)

    async def _run(
        self,
        argv: list[str],
        on_line: Callable[[str], None],
        step: str,
        env: dict[str, str] | None = None,
    ) -> ProcessResult:
        try:
            return await _run_streaming(argv, on_line, env=env or self._env)
        except ProcessNotFound as exc:
            raise BuildFailed(step, f"cannot run {exc.program}: {exc.reason}", True) from exc

    async def _remove_tags(self, images: list[str]) -> None:
        """Drops finished jobs' tags; --no-prune keeps the layers for the next build's cache."""
        try:
            removed = await run_captured([self.docker_binary, "rmi", "--no-prune", *images])
        except (ProcessNotFound, TimeoutError) as exc:
            log.warning("could not remove %d local tags: %s", len(images), exc)
            return
        if not removed.ok:
            log.warning("could not remove local tags %s: %s", images, removed.tail(1))
