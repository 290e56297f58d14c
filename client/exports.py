"""A finished build's exports written on the client: files, folders, stdout, `docker load`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

from polyarch.agent.context_unpack import ContextRefused, unpack_context
from polyarch.client.api import BuildClient
from polyarch.client.outputs import Export, OutputError
from polyarch.proto.platforms import PlatformError, parse_platform
from polyarch.proto.v1 import build_pb2

FORMATS = {
    "oci": build_pb2.EXPORT_FORMAT_OCI_LAYOUT,
    "docker": build_pb2.EXPORT_FORMAT_DOCKER_ARCHIVE,
    "tar": build_pb2.EXPORT_FORMAT_ROOTFS,
    "local": build_pb2.EXPORT_FORMAT_ROOTFS,
}


def docker_cli() -> str:
    """The docker CLI that --load runs; it honours DOCKER_HOST, DOCKER_CONTEXT and TLS."""
    found = shutil.which(os.environ.get("POLYARCH_DOCKER", "docker"))
    if not found:
        raise OutputError("--load and type=docker without dest need the docker CLI on PATH")
    return found


def engine_platform() -> str:
    """The platform of the Docker Engine --load goes to (which DOCKER_HOST may make remote)."""
    command = [docker_cli(), "version", "--format", "{{.Server.Os}}/{{.Server.Arch}}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        raise OutputError("--load: the Docker Engine did not answer `docker version`") from None
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise OutputError(f"--load: no Docker Engine to load into ({why[0]})")
    try:
        return str(parse_platform(done.stdout.strip()))
    except PlatformError as exc:
        raise OutputError(f"--load: the Docker Engine reports {exc}") from None


async def write_export(
    client: BuildClient,
    build_id: str,
    export: Export,
    platforms: list[str],
    registry_auths: Iterable[tuple[str, str, str]],
    report: Callable[[str], None],
) -> None:
    """Streams one export from the coordinator to where `export` says. A file appears only
    complete (written under a temporary name, then renamed)."""
    chunks = client.export(build_id, FORMATS[export.kind], platforms, registry_auths)
    if export.loads:
        report(await _docker_load(chunks))
    elif export.dest == "-":
        async for chunk in chunks:
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
    elif export.kind == "local":
        skipped = await _unpack(chunks, Path(export.dest))
        extra = f"; {skipped} device or FIFO entries skipped" if skipped else ""
        report(f"type=local: the root filesystem unpacked in {export.dest}{extra}")
    else:
        size = await _to_file(chunks, Path(export.dest))
        report(
            f"type={export.kind}: {', '.join(platforms)} written to {export.dest} ({size} bytes)"
        )


def check_local_dest(dest: Path) -> None:
    """type=local unpacks into a new or empty folder: nothing there is overwritten."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise OutputError(f"type=local: dest {dest} must be an empty or new folder")


async def _to_file(chunks: AsyncIterator[bytes], dest: Path) -> int:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in chunks:
                out.write(chunk)
                size += len(chunk)
        os.chmod(partial, 0o644)
        os.replace(partial, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    return size


async def _unpack(chunks: AsyncIterator[bytes], dest: Path) -> int:
    """The root filesystem tar, unpacked into `dest` (absent or empty) by the agent's
    hardened unpacker: no member is written through a symlink or outside `dest`."""
    check_local_dest(dest)  # again: it was checked before the build, which took a while
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".polyarch-export-", dir=dest.parent) as scratch:
        archive = Path(scratch) / "rootfs.tar"
        await _to_file(chunks, archive)
        try:
            return await asyncio.to_thread(unpack_context, archive, dest, rootfs=True)
        except ContextRefused as exc:
            raise OutputError(f"type=local: refused to unpack: {exc}") from None


async def _docker_load(chunks: AsyncIterator[bytes]) -> str:
    """Pipes the Docker archive into `docker load`; returns what it said it loaded."""
    process = await asyncio.create_subprocess_exec(
        docker_cli(), "load", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdin is not None
    try:
        async for chunk in chunks:
            process.stdin.write(chunk)
            await process.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # docker load stopped reading: its exit status and stderr say why
    except BaseException:
        process.stdin.close()  # a cut-short archive: docker load refuses it and exits
        await process.communicate()
        raise
    process.stdin.close()
    out, err = await process.communicate()
    if process.returncode != 0:
        why = err.decode(errors="replace").strip() or out.decode(errors="replace").strip()
        raise OutputError(f"--load: docker load failed: {why}")
    return "--load: " + " ".join(out.decode(errors="replace").split())
