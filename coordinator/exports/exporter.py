"""A succeeded build's images streamed back as one tar: OCI layout, Docker archive or rootfs."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import queue
import shutil
import tarfile
import threading
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path

from polyarch.coordinator.core.model import (
    BuildRecord,
    BuildState,
    InvalidRequest,
    JobRecord,
    NotReady,
)
from polyarch.coordinator.exports.images import (
    Blob,
    ExportError,
    FetchedImage,
    blob_path,
    fetch_attestations,
    fetch_images,
)
from polyarch.coordinator.exports.layouts import write_docker_archive, write_oci_layout
from polyarch.coordinator.exports.rootfs import write_rootfs
from polyarch.coordinator.metrics import CoordinatorMetrics
from polyarch.coordinator.registry.annotations import parse_annotations
from polyarch.coordinator.registry.client import RegistryClient, compute_digest
from polyarch.coordinator.registry.index import (
    Attestation,
    ChildManifest,
    index_media_type,
    render_index,
)
from polyarch.proto.platforms import Platform, PlatformError, parse_platform

CHUNK_BYTES = 1024 * 1024
# chunks a writer may run ahead of a slow client: bounds the memory of one export
QUEUED_CHUNKS = 4


class ExportFormat(enum.StrEnum):
    OCI_LAYOUT = "oci"
    DOCKER_ARCHIVE = "docker"
    ROOTFS = "rootfs"


def platform_folder(platform: Platform) -> str:
    """buildx's folder for one platform of a multi-platform local or tar export."""
    return "_".join(part for part in (platform.os, platform.architecture, platform.variant) if part)


class _ChunkPipe:
    """A file a tar writer thread writes to and an event loop reads chunks from; closing it
    from the reading side makes the next write raise, so an abandoned export stops."""

    def __init__(self) -> None:
        self._chunks: queue.Queue[bytes | None] = queue.Queue(QUEUED_CHUNKS)
        self._buffer = bytearray()
        self._closed = threading.Event()

    def write(self, data: bytes) -> int:
        self._buffer += data
        while len(self._buffer) >= CHUNK_BYTES:
            self._put(bytes(self._buffer[:CHUNK_BYTES]))
            del self._buffer[:CHUNK_BYTES]
        return len(data)

    def finish(self) -> None:
        if self._buffer:
            self._put(bytes(self._buffer))
            self._buffer.clear()
        self._put(None)

    def _put(self, chunk: bytes | None) -> None:
        while not self._closed.is_set():
            with contextlib.suppress(queue.Full):
                self._chunks.put(chunk, timeout=0.2)
                return
        raise ExportError("the client went away")

    def get(self) -> bytes | None:
        """The next chunk; None at the end, or once closed (no reader thread waits forever)."""
        while not self._closed.is_set():
            with contextlib.suppress(queue.Empty):
                return self._chunks.get(timeout=0.2)
        return None

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._chunks.get_nowait()


class BuildExporter:
    """Makes export streams from the verified images in the registry, a few at a time, in
    a scratch folder per export that is removed when the stream ends."""

    def __init__(
        self,
        client: RegistryClient,
        work_dir: Path,
        metrics: CoordinatorMetrics,
        concurrency: int = 2,
    ) -> None:
        self.client = client
        self.work_dir = work_dir
        self.metrics = metrics
        self._slots = asyncio.Semaphore(concurrency)

    async def export(
        self,
        build: BuildRecord,
        jobs: list[JobRecord],
        export_format: ExportFormat,
        platforms: list[str],
        client: RegistryClient | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """The export's tar stream in chunks, counted by outcome. Checks come first, so a
        refused export raises before the first chunk."""
        outcome = "failed"
        try:
            async for chunk in self._export(build, jobs, export_format, platforms, client):
                self.metrics.export_bytes.inc(len(chunk))
                yield chunk
            outcome = "ok"
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "abandoned"
            raise
        finally:
            self.metrics.exports.labels(format=export_format.value, outcome=outcome).inc()

    async def _export(
        self,
        build: BuildRecord,
        jobs: list[JobRecord],
        export_format: ExportFormat,
        platforms: list[str],
        client: RegistryClient | None,
    ) -> AsyncGenerator[bytes, None]:
        chosen = self._choose(build, jobs, export_format, platforms)
        folder = self.work_dir / f"{build.id}-{uuid.uuid4().hex[:8]}"
        async with self._slots:
            try:
                manifests = {parse_platform(job.platform): job.digest for job in chosen}
                images = await fetch_images(
                    client or self.client, (build.spec.registry, build.spec.repository),
                    manifests, folder, need_readable_layers=export_format is ExportFormat.ROOTFS,
                )  # fmt: skip
                index = self._index(build, jobs, chosen, export_format)
                names = list(build.spec.tags)
                attestations = (
                    await fetch_attestations(
                        client or self.client,
                        (build.spec.registry, build.spec.repository),
                        [job.attestation_digest for job in chosen if job.attestation_digest],
                    )
                    if index is not None
                    else {}
                )

                def write(out: tarfile.TarFile) -> None:
                    if export_format is ExportFormat.OCI_LAYOUT:
                        write_oci_layout(out, images, folder, index, names, attestations)
                    elif export_format is ExportFormat.DOCKER_ARCHIVE:
                        write_docker_archive(out, images[0], folder, names)
                    else:
                        _write_rootfs_of(out, images, folder)

                async for chunk in _stream_tar(write):
                    yield chunk
            finally:
                await asyncio.to_thread(shutil.rmtree, folder, True)

    @staticmethod
    def _choose(
        build: BuildRecord, jobs: list[JobRecord], export_format: ExportFormat, names: list[str]
    ) -> list[JobRecord]:
        if build.state is not BuildState.SUCCEEDED:
            raise NotReady(
                f"build {build.id} is {build.state.value}: only a succeeded build is exported"
            )
        by_platform = {parse_platform(job.platform): job for job in jobs}
        chosen: list[JobRecord] = []
        for name in names:
            try:
                platform = parse_platform(name)
            except PlatformError as exc:
                raise InvalidRequest(str(exc)) from None
            if platform not in by_platform:
                built = ", ".join(str(p) for p in by_platform)
                raise InvalidRequest(f"build {build.id} has no {platform} image (built: {built})")
            chosen.append(by_platform[platform])
        chosen = chosen or list(by_platform.values())
        if export_format is ExportFormat.DOCKER_ARCHIVE and len(chosen) != 1:
            raise InvalidRequest(
                f"a Docker archive holds one platform; build {build.id} has {len(chosen)}: "
                "name one, or export an OCI layout"
            )
        return chosen

    @staticmethod
    def _index(
        build: BuildRecord, jobs: list[JobRecord], chosen: list[JobRecord], fmt: ExportFormat
    ) -> tuple[Blob, bytes] | None:
        """The image index for an OCI layout of several platforms (or an annotated one): the
        build's own when every platform is exported, byte for byte, checked by digest."""
        if fmt is not ExportFormat.OCI_LAYOUT:
            return None
        platforms = [parse_platform(job.platform) for job in chosen]
        annotations = parse_annotations(build.spec.annotations, platforms)
        if len(chosen) == 1 and not annotations and not chosen[0].attestation_digest:
            return None
        children = [
            ChildManifest(
                parse_platform(job.platform), job.digest, job.media_type, job.size,
                attestation=Attestation(job.attestation_digest, job.attestation_size)
                if job.attestation_digest else None,
            )
            for job in chosen
        ]  # fmt: skip
        body = render_index(children, annotations)
        digest = compute_digest(body)
        if len(chosen) == len(jobs) and build.index_digest and digest != build.index_digest:
            raise ExportError(
                f"build {build.id}: the index renders as {digest}, not {build.index_digest}"
            )
        return Blob(index_media_type(children, annotations), digest, len(body)), body


def _write_rootfs_of(out: tarfile.TarFile, images: list[FetchedImage], folder: Path) -> None:
    """One root filesystem, or one folder per platform when there are several (buildx)."""
    for image in images:
        prefix = f"{platform_folder(image.platform)}/" if len(images) > 1 else ""
        layers = [blob_path(folder, layer.digest) for layer in image.layers]
        write_rootfs(layers, out, prefix)


async def _stream_tar(write: Callable[[tarfile.TarFile], None]) -> AsyncIterator[bytes]:
    """Runs `write` on a tar stream in a thread and yields what it writes as it comes."""
    pipe = _ChunkPipe()

    def run() -> None:
        try:
            with tarfile.open(fileobj=pipe, mode="w|", format=tarfile.PAX_FORMAT) as out:  # type: ignore[call-overload]
                write(out)
        finally:
            with contextlib.suppress(ExportError):
                pipe.finish()

    writer = asyncio.ensure_future(asyncio.to_thread(run))
    try:
        while (chunk := await asyncio.to_thread(pipe.get)) is not None:
            yield chunk
        await writer  # the writer's error, if it failed
    finally:
        pipe.close()
        # the writer's error was raised above; here it only has to end (an abandoned
        # export's writer stops at its next write)
        with contextlib.suppress(Exception):
            await writer
