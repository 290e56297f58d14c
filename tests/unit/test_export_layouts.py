"""Exports made from layers: whiteouts, opaque folders, prefixes, layouts and the chunk pipe."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
from pathlib import Path

import pytest

from polyarch.coordinator.core.model import (
    BuildRecord,
    BuildSpec,
    BuildState,
    InvalidRequest,
    JobRecord,
    NotReady,
)
from polyarch.coordinator.exports.exporter import (
    BuildExporter,
    ExportFormat,
    _stream_tar,
    platform_folder,
)
from polyarch.coordinator.exports.images import Blob, FetchedImage, blob_path
from polyarch.coordinator.exports.layouts import write_docker_archive, write_oci_layout
from polyarch.coordinator.exports.rootfs import member_path, write_rootfs
from polyarch.coordinator.registry.client import compute_digest
from polyarch.proto.media_types import OCI_MANIFEST
from polyarch.proto.platforms import parse_platform

Entry = tuple[str, str, bytes]  # (name, "file" | "dir" | "link:TARGET" | "hard:TARGET", data)


def layer(path: Path, entries: list[Entry], gzip: bool = True) -> Path:
    with tarfile.open(path, "w:gz" if gzip else "w") as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind.startswith("link:"):
                info.type, info.linkname = tarfile.SYMTYPE, kind[5:]
            elif kind.startswith("hard:"):
                info.type, info.linkname = tarfile.LNKTYPE, kind[5:]
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
    return path


def flattened(layers: list[Path], prefix: str = "") -> dict[str, tuple[str, bytes]]:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        write_rootfs(layers, tar, prefix)
    out.seek(0)
    result: dict[str, tuple[str, bytes]] = {}
    with tarfile.open(fileobj=out) as tar:
        for member in tar:
            data = tar.extractfile(member).read() if member.isreg() else b""  # type: ignore[union-attr]
            kind = "dir" if member.isdir() else "link" if member.issym() else "file"
            if member.islnk():
                kind = f"hard:{member.linkname}"
            result[member.name] = (kind, data)
    return result


def test_upper_layers_win_and_whiteouts_delete_what_is_below(tmp_path: Path) -> None:
    base = layer(tmp_path / "0", [
        ("bin", "dir", b""), ("bin/ls", "file", b"ls"), ("bin/cat", "file", b"cat"),
        ("etc", "dir", b""), ("etc/conf", "file", b"old"), ("etc/keep", "file", b"keep"),
        ("var", "dir", b""), ("var/cache", "dir", b""), ("var/cache/a", "file", b"a"),
        ("opt", "dir", b""), ("opt/tool", "dir", b""), ("opt/tool/x", "file", b"x"),
    ])  # fmt: skip
    upper = layer(tmp_path / "1", [
        ("bin/.wh.ls", "file", b""),  # rm /bin/ls
        ("./etc/conf", "file", b"new"),  # "./" names are the same paths
        ("var/cache", "dir", b""), ("var/cache/.wh..wh..opq", "file", b""),  # emptied folder
        ("var/cache/b", "file", b"b"),
        ("opt/tool", "file", b"now a file"),  # a file where a folder was hides its contents
    ], gzip=False)  # fmt: skip
    fs = flattened([base, upper])
    assert "bin/ls" not in fs and fs["bin/cat"] == ("file", b"cat")
    assert fs["etc/conf"] == ("file", b"new") and fs["etc/keep"] == ("file", b"keep")
    assert "var/cache/a" not in fs and fs["var/cache/b"] == ("file", b"b")
    assert fs["opt/tool"] == ("file", b"now a file") and "opt/tool/x" not in fs
    assert not any(".wh." in name for name in fs)  # whiteouts never reach the filesystem


def test_a_layer_s_whiteout_does_not_delete_what_the_same_layer_adds(tmp_path: Path) -> None:
    base = layer(tmp_path / "0", [("d", "dir", b""), ("d/old", "file", b"1")])
    upper = layer(tmp_path / "1", [("d/.wh.old", "file", b""), ("d/old", "file", b"2")])
    assert flattened([base, upper])["d/old"] == ("file", b"2")


def test_platform_prefixes_cover_paths_and_hard_links(tmp_path: Path) -> None:
    base = layer(tmp_path / "0", [
        ("bin", "dir", b""), ("bin/busybox", "file", b"elf"), ("bin/sh", "hard:bin/busybox", b""),
        ("bin/ls", "link:/bin/busybox", b""),
    ])  # fmt: skip
    fs = flattened([base], prefix="linux_arm_v7/")
    assert fs["linux_arm_v7"] == ("dir", b"")
    assert fs["linux_arm_v7/bin/sh"] == ("hard:linux_arm_v7/bin/busybox", b"")
    assert fs["linux_arm_v7/bin/ls"][0] == "link"  # a symlink's target is left as it is
    assert platform_folder(parse_platform("linux/arm/v7")) == "linux_arm_v7"
    assert platform_folder(parse_platform("linux/amd64")) == "linux_amd64"


@pytest.mark.parametrize(
    ("name", "path"),
    [("./a/b", "a/b"), ("/a//b/", "a/b"), ("./", ""), ("a/../../etc", "etc"), ("../x", "x")],
)
def test_member_paths_are_normalised_inside_the_root(name: str, path: str) -> None:
    assert member_path(name) == path  # a `..` stops at the root: nothing climbs out


def fetched(tmp_path: Path, arch: str) -> FetchedImage:
    data = f"layer of {arch}".encode()
    layer_blob = Blob(
        "application/vnd.oci.image.layer.v1.tar+gzip", compute_digest(data), len(data)
    )
    path = blob_path(tmp_path, layer_blob.digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    config = json.dumps({"architecture": arch, "os": "linux"}).encode()
    config_blob = Blob(
        "application/vnd.oci.image.config.v1+json", compute_digest(config), len(config)
    )
    manifest = json.dumps({"schemaVersion": 2, "config": config_blob.descriptor(),
                           "layers": [layer_blob.descriptor()]}).encode()  # fmt: skip
    manifest_blob = Blob(OCI_MANIFEST, compute_digest(manifest), len(manifest))
    platform = parse_platform(f"linux/{arch}")
    return FetchedImage(platform, manifest_blob, manifest, config_blob, config, (layer_blob,))


def read_tar(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}  # type: ignore[union-attr]


def test_an_oci_layout_holds_every_blob_under_its_digest_and_names_the_top(tmp_path: Path) -> None:
    images = [fetched(tmp_path, "amd64"), fetched(tmp_path, "arm64")]
    index = b'{"manifests":[]}'
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        top = Blob("application/vnd.oci.image.index.v1+json", compute_digest(index), len(index))
        write_oci_layout(tar, images, tmp_path, (top, index), ["reg.example/app:1.0"])
    files = read_tar(out.getvalue())
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name, data in files.items():  # content addressed: every blob hashes to its name
        if name.startswith("blobs/sha256/"):
            assert compute_digest(data) == "sha256:" + name.rsplit("/", 1)[1]
    assert len([n for n in files if n.startswith("blobs/")]) == 1 + 3 * 2  # index + 2 images
    (entry,) = json.loads(files["index.json"])["manifests"]
    assert entry["digest"] == top.digest
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "1.0"


def test_a_docker_archive_names_config_layers_and_tags_for_docker_load(tmp_path: Path) -> None:
    image = fetched(tmp_path, "arm64")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        write_docker_archive(tar, image, tmp_path, ["docker.io/library/app:ci"])
    files = read_tar(out.getvalue())
    (entry,) = json.loads(files["manifest.json"])
    assert entry["RepoTags"] == ["docker.io/library/app:ci"]
    assert files[entry["Config"]] == image.config_bytes
    assert [compute_digest(files[name]) for name in entry["Layers"]] == [image.layers[0].digest]
    # the top of its index.json is the image manifest itself (one platform)
    assert json.loads(files["index.json"])["manifests"][0]["digest"] == image.manifest.digest


def build_with(state: BuildState, platforms: list[str]) -> tuple[BuildRecord, list[JobRecord]]:
    spec = BuildSpec("sha256:" + "0" * 64, "Dockerfile", platforms, [])
    build = BuildRecord("b1", spec, state=state)
    jobs = [JobRecord(f"j{i}", "b1", p, digest=f"sha256:{i:064}") for i, p in enumerate(platforms)]
    return build, jobs


def test_only_a_succeeded_build_is_exported_and_a_docker_archive_takes_one_platform() -> None:
    choose = BuildExporter._choose
    running = build_with(BuildState.RUNNING, ["linux/amd64"])
    with pytest.raises(NotReady, match="build b1 is running: only a succeeded build"):
        choose(*running, ExportFormat.OCI_LAYOUT, [])
    build, jobs = build_with(BuildState.SUCCEEDED, ["linux/amd64", "linux/arm64"])
    assert choose(build, jobs, ExportFormat.ROOTFS, []) == jobs
    assert choose(build, jobs, ExportFormat.DOCKER_ARCHIVE, ["linux/arm64/v8"]) == [jobs[1]]
    with pytest.raises(InvalidRequest, match=r"a Docker archive holds one platform; .* has 2"):
        choose(build, jobs, ExportFormat.DOCKER_ARCHIVE, [])
    with pytest.raises(InvalidRequest, match=r"has no linux/riscv64 image \(built: linux/amd64"):
        choose(build, jobs, ExportFormat.OCI_LAYOUT, ["linux/riscv64"])


async def test_the_tar_stream_arrives_whole_and_a_writer_error_reaches_the_reader() -> None:
    payload = bytes(range(256)) * 12_000  # ~3 MiB: several chunks through the pipe

    def write(out: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("big")
        info.size = len(payload)
        out.addfile(info, io.BytesIO(payload))

    data = b"".join([chunk async for chunk in _stream_tar(write)])
    assert read_tar(data) == {"big": payload}

    def fail(out: tarfile.TarFile) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        async for _ in _stream_tar(fail):
            pass


async def test_an_abandoned_stream_stops_its_writer() -> None:
    wrote = asyncio.Event()
    loop = asyncio.get_running_loop()

    def endless(out: tarfile.TarFile) -> None:
        for i in range(10_000):  # far more than the pipe holds: the writer must be stopped
            info = tarfile.TarInfo(f"f{i}")
            info.size = 1 << 20
            out.addfile(info, io.BytesIO(bytes(1 << 20)))
            loop.call_soon_threadsafe(wrote.set)

    stream = _stream_tar(endless)
    await anext(stream)
    await stream.aclose()  # returns only once the writer thread has ended
    assert wrote.is_set()
