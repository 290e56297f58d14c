"""The buildah backend: daemonless `buildah build`, then `buildah push --digestfile`."""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

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
from polyarch.agent.builders.buildah_storage import (
    REMOVAL_BATCH,
    StorageUsers,
    default_run_root,
)
from polyarch.agent.builders.process import (
    ProcessNotFound,
    ProcessResult,
    run_captured,
    run_streaming,
)
from polyarch.proto.agent_protocol import PUSHING_MARKER
from polyarch.proto.caches import buildah_cache_args
from polyarch.proto.media_types import OCI_MANIFEST
from polyarch.proto.platforms import Platform

log = logging.getLogger(__name__)
# A RUN --mount flag and its options (type=bind, the default type, mounts a context folder)
_MOUNT_FLAG = re.compile(rb"--mount(=?)(\S*)")


def may_write_context(dockerfile: bytes) -> bool:
    """Whether a RUN of this Dockerfile could write into the context folder: buildah 1.28
    bind-mounts the folder itself, so `RUN --mount=type=bind,rw,...` writes land there.

    Conservative: any --mount with rw/readwrite, a variable, or a spelling this does not
    parse counts. A false "yes" costs a private copy of the context; a false "no" would let
    the build change the agent's cached files under other builds.
    """
    for match in _MOUNT_FLAG.finditer(dockerfile):
        options = match[2].lower()
        if not match[1] or b"$" in options:
            return True
        for option in options.split(b","):
            key = option.split(b"=", 1)[0].strip(b"\"' ")
            if key in (b"rw", b"readwrite"):
                return True
    return False


_STEP = re.compile(r"^(?:\[(\d+)/(\d+)\] )?STEP (\d+)/(\d+): (.*)$")
_AT_STEP = re.compile(r'building at STEP "(.*?)": (.*)$')
_ERROR = re.compile(r"^Error: (.*)$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_MISSING_FILE = re.compile(r"no such file or directory|context must be a directory", re.I)


def _step_label(match: re.Match[str]) -> tuple[str, str]:
    stage, stages, step, steps, instruction = match.groups()
    instruction = instruction.strip()
    if stage and stages and stages != "1":
        return f"[stage {stage}/{stages} {step}/{steps}] {instruction}", instruction
    return f"[{step}/{steps}] {instruction}", instruction


def _clean(message: str) -> str:
    # buildah appends a Go struct dump to some parse errors; it helps nobody.
    return message.split(" &imagebuilder.", 1)[0].strip()


def parse_buildah_failure(lines: Sequence[str], dockerfile: str = "Dockerfile") -> BuildFailed:
    """The failure a `buildah build` log describes, naming the step that failed.

    `STEP 2/3: RUN exit 1` announces each step; `Error: building at STEP "RUN exit 1": ...`
    says which one failed. Other `Error:` lines belong to the last announced step.
    """
    infrastructure = looks_like_infrastructure_failure(lines)
    label = instruction = ""
    for line in lines:
        step = _STEP.match(line)
        if step:
            label, instruction = _step_label(step)
            continue
        error = _ERROR.match(line)
        if not error:
            continue
        text = error.group(1)
        marker = f'building at STEP "{instruction}": '
        if instruction and marker in text:
            return BuildFailed(label, _clean(text.split(marker, 1)[1]), infrastructure)
        at_step = _AT_STEP.search(text)
        if at_step:
            return BuildFailed(label or at_step.group(1).strip(), _clean(at_step.group(2)),
                               infrastructure)  # fmt: skip
        if not label and _MISSING_FILE.search(text):
            return missing_dockerfile_failure(dockerfile)
        return BuildFailed(label or "build", _clean(text), infrastructure)
    return BuildFailed(label or "build", last_meaningful_line(lines), infrastructure)


def read_digest_file(path: Path) -> str | None:
    """The manifest digest `buildah push --digestfile` wrote, or None if absent or malformed."""
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return text if _DIGEST.match(text) else None


class BuildahBuilder:
    """Builds with buildah (no daemon) and pushes OCI image manifests.

    With a storage_root, each platform builds in its own containers-storage under it. One
    storage shared by concurrent builds of different platforms is unsafe: pulling a
    multi-arch `FROM` tag re-points the local name to that platform's image, so a build of
    another platform finds the name gone ("image not known") or on the wrong image. One
    storage per platform keeps each platform's warm layer cache and lets every slot run.
    Without a storage_root, buildah's default storage is shared (and the race is possible).
    Within one storage, finished jobs' images are removed only when no build runs there
    (see StorageUsers).
    """

    name = "buildah"

    def __init__(
        self,
        buildah_binary: str = "buildah",
        storage_driver: str | None = None,
        storage_root: Path | None = None,
        run_root: Path | None = None,
        removal_batch: int = REMOVAL_BATCH,
    ) -> None:
        self.buildah_binary = buildah_binary
        self.removal_batch = removal_batch
        self.storage_driver = storage_driver
        self.storage_root = storage_root
        self.run_root = run_root or (default_run_root(storage_root) if storage_root else None)
        self._users: dict[str, StorageUsers] = {}

    def _storage_users(self, platform: Platform) -> StorageUsers:
        key = platform.slug if self.storage_root is not None else ""
        if key not in self._users:

            async def remove(images: list[str]) -> None:
                await self._remove_images(platform, images)

            self._users[key] = StorageUsers(remove, batch=self.removal_batch)
        return self._users[key]

    def may_link_context(self, dockerfile: bytes | None) -> bool:
        return dockerfile is not None and not may_write_context(dockerfile)

    async def idle(self) -> None:
        """Returns once no removal of finished jobs' images runs in any storage."""
        for users in list(self._users.values()):
            await users.idle()

    def _base(self, platform: Platform | None = None) -> list[str]:
        argv = [self.buildah_binary]
        if self.storage_root is not None and self.run_root is not None and platform is not None:
            argv += ["--root", str(self.storage_root / platform.slug)]
            argv += ["--runroot", str(self.run_root / platform.slug)]
        if self.storage_driver:
            argv += ["--storage-driver", self.storage_driver]
        return argv

    async def check(self) -> None:
        try:
            result = await run_captured([*self._base(), "version"])
        except ProcessNotFound as exc:
            raise BuilderUnavailable(
                f"buildah {self.buildah_binary!r} cannot run ({exc.reason}); "
                "install it with `apt-get install -y buildah`"
            ) from exc
        except TimeoutError as exc:
            raise BuilderUnavailable(f"`{self.buildah_binary} version` did not answer") from exc
        if not result.ok:
            raise BuilderUnavailable(
                f"`{self.buildah_binary} version` failed: {result.tail(3) or 'no output'}"
            )

    def build_command(
        self, request: BuildRequest, dockerfile_path: str
    ) -> tuple[list[str], list[str]]:
        """The `buildah build` argv and notes about options it cannot honour."""
        argv = [*self._base(request.platform), "build", "--platform", str(request.platform)]
        argv += ["-f", dockerfile_path, "-t", request.image]
        argv += ["--layers", "--force-rm", "--format", "oci"]
        argv += ["--no-cache"] if request.no_cache else []
        # buildah's plain --pull means "if newer or missing"; buildx's means always
        argv += ["--pull=always"] if request.pull else []
        if request.insecure_registry:
            argv.append("--tls-verify=false")
        argv += key_value_flags("--build-arg", request.build_args)
        if request.target:
            argv += ["--target", request.target]
        argv += key_value_flags("--label", request.labels)
        argv += secret_flags(request.secrets)
        if request.auth_file is not None:
            argv += ["--authfile", str(request.auth_file)]
        cache_argv, notes = buildah_cache_args(request.cache_from, request.cache_to)
        argv += cache_argv
        argv.append(str(request.context_dir))
        return argv, notes

    def push_command(self, request: BuildRequest, digest_file: Path) -> list[str]:
        argv = [*self._base(request.platform), "push", "--digestfile", str(digest_file)]
        argv += ["--format", "oci"]
        if request.auth_file is not None:
            argv += ["--authfile", str(request.auth_file)]
        if request.insecure_registry:
            argv.append("--tls-verify=false")
        return [*argv, request.image, f"docker://{request.image}"]

    async def build_and_push(
        self, request: BuildRequest, on_line: Callable[[str], None]
    ) -> PushedImage:
        dockerfile = resolve_dockerfile(request)
        argv, notes = self.build_command(request, str(dockerfile))
        for note in notes:
            on_line(f"polyarch: {note}")
        users = self._storage_users(request.platform)
        async with users.building():
            built = await self._run(argv, on_line, "build")
            if not built.ok:
                raise parse_buildah_failure(built.lines, request.dockerfile)
            # the per-job image goes once no build shares the storage: see StorageUsers
            users.remove_later(request.image)
            with tempfile.TemporaryDirectory(prefix="polyarch-push-") as scratch:
                digest_file = Path(scratch) / "digest"
                push = self.push_command(request, digest_file)
                on_line(f"{PUSHING_MARKER} {request.image}")
                pushed = await push_with_retries(lambda: self._run(push, on_line, "push"), on_line)
                if not pushed.ok:
                    raise BuildFailed("push", last_meaningful_line(pushed.lines), True)
                digest = read_digest_file(digest_file)
            if digest is None:
                raise BuildFailed("push", "buildah push wrote no manifest digest", True)
        return PushedImage(digest=digest, size=0, media_type=OCI_MANIFEST)

    async def _run(
        self, argv: list[str], on_line: Callable[[str], None], step: str
    ) -> ProcessResult:
        try:
            return await run_streaming(argv, on_line)
        except ProcessNotFound as exc:
            raise BuildFailed(step, f"cannot run {exc.program}: {exc.reason}", True) from exc

    async def _remove_images(self, platform: Platform, images: list[str]) -> None:
        """Untags finished jobs' images; cached intermediate layers stay for later builds."""
        try:
            removed = await run_captured([*self._base(platform), "rmi", *images], timeout=120)
        except (ProcessNotFound, TimeoutError) as exc:
            log.warning("could not remove %d local image(s) of %s: %s", len(images), platform, exc)
            return
        if not removed.ok:
            log.warning("could not remove local images of %s: %s", platform, removed.tail(2))
