"""Manifest contexts on the agent over real gRPC: only missing blobs are fetched, each verified;
a broken fetch resumes; concurrent jobs share downloads; trimming keeps what is still used."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import pytest

from polyarch.agent import blob_fetch
from polyarch.agent.builders.base import BuildFailed
from polyarch.agent.builders.buildah import BuildahBuilder, may_write_context
from polyarch.agent.workspace import Workspace
from polyarch.proto.context_manifest import ContextManifest, ManifestEntry
from polyarch.proto.v1 import common_pb2
from tests.support.context_trees import ContextSource, digest_of, serving, snapshot

T = 1_700_000_000
BIG = bytes(range(256)) * 1200  # 300 KiB: several 64 KiB chunks


def manifest_of(files: dict[str, bytes]) -> tuple[ContextManifest, dict[str, bytes]]:
    """Files at the top level (0644, mtime T) and one folder, "src", holding the rest."""
    entries = [ManifestEntry("src", "dir", 0o755, T)]
    for name, data in files.items():
        entries.append(ManifestEntry(name, "file", 0o644, T, len(data), digest_of(data)))
    return ContextManifest.from_entries(entries), {digest_of(d): d for d in files.values()}


def expected_tree(files: dict[str, bytes]) -> dict[str, tuple[str, int, int, bytes]]:
    tree = {name: ("file", 0o644, T * 10**9, data) for name, data in files.items()}
    return {"src": ("dir", 0o755, T * 10**9, b""), **tree}


class Counted:
    def __init__(self) -> None:
        self.total = 0

    def __call__(self, count: int) -> None:
        self.total += count


async def test_a_changed_context_fetches_only_its_changed_blob_and_a_repeat_nothing(
    tmp_path: Path,
) -> None:
    old = {"Dockerfile": b"FROM scratch\n", "src/big": BIG, "src/empty": b"", "src/small": b"v1\n"}
    new = {**old, "src/small": b"v2, changed\n"}
    source = ContextSource()
    first, first_blobs = manifest_of(old)
    second, second_blobs = manifest_of(new)
    source.add_manifest(first, first_blobs)
    source.add_manifest(second, second_blobs)
    fetched = Counted()
    workspace = Workspace(tmp_path / "agent", fetched)
    async with serving(source) as stub:
        one = await workspace.fetch_context(stub, first.digest, workspace.job_dir("j", 1))
        assert fetched.total == len(first.encode()) + first.blob_bytes
        before = fetched.total
        two = await workspace.fetch_context(stub, second.digest, workspace.job_dir("k", 1))
        assert source.blob_requests[-1] == [(digest_of(b"v2, changed\n"), 12, 0)]
        assert fetched.total - before == len(second.encode()) + 12
        calls = source.context_calls
        three = await workspace.fetch_context(stub, second.digest, workspace.job_dir("l", 1))
        # a restarted agent finds the manifest on disk: no RPC either
        restarted = Workspace(tmp_path / "agent")
        four = await restarted.fetch_context(stub, second.digest, restarted.job_dir("m", 1))
    assert (source.context_calls, len(source.blob_requests)) == (calls, 2)
    assert snapshot(one) == expected_tree(old)
    assert snapshot(two) == snapshot(three) == snapshot(four) == expected_tree(new)


async def test_a_tampered_blob_is_refused_and_not_cached(tmp_path: Path) -> None:
    files = {"Dockerfile": b"FROM scratch\n", "src/big": BIG}
    manifest, contents = manifest_of(files)
    source = ContextSource()
    source.add_manifest(manifest, contents)
    source.tampered[digest_of(BIG)] = BIG[:-1] + b"!"
    workspace = Workspace(tmp_path / "agent")
    async with serving(source) as stub:
        job = workspace.job_dir("j", 1)
        with pytest.raises(BuildFailed) as raised:
            await workspace.fetch_context(stub, manifest.digest, job)
        assert (raised.value.step, raised.value.infrastructure) == ("fetch context", True)
        assert raised.value.message.startswith(
            f"blob {digest_of(BIG)}: content digest mismatch, got {digest_of(BIG[:-1] + b'!')}"
        )
        blobs = workspace.blobs.blobs_dir
        assert sorted(p.name for p in blobs.iterdir()) == [digest_of(files["Dockerfile"])[7:]]
        assert list((job / "context").iterdir()) == []

        del source.tampered[digest_of(BIG)]
        fixed = await workspace.fetch_context(stub, manifest.digest, workspace.job_dir("j", 2))
    assert snapshot(fixed) == expected_tree(files)
    assert source.blob_requests[-1] == [(digest_of(BIG), len(BIG), 0)]


async def test_a_broken_blob_fetch_resumes_from_the_bytes_it_kept(tmp_path: Path) -> None:
    files = {"Dockerfile": b"FROM scratch\n", "src/big": BIG}
    manifest, contents = manifest_of(files)
    source = ContextSource()
    source.add_manifest(manifest, contents)
    source.break_after = len(files["Dockerfile"]) + 100_000  # the Dockerfile goes first
    workspace = Workspace(tmp_path / "agent")
    async with serving(source) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await workspace.fetch_context(stub, manifest.digest, workspace.job_dir("j", 1))
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        partial = workspace.blobs.blobs_dir / f"{digest_of(BIG)[7:]}.partial"
        assert partial.read_bytes() == BIG[:100_000]

        source.break_after = None
        resumed = await workspace.fetch_context(stub, manifest.digest, workspace.job_dir("j", 2))
    assert source.blob_requests[-1] == [(digest_of(BIG), len(BIG), 100_000)]
    assert source.blob_bytes_sent == len(files["Dockerfile"]) + len(BIG)  # nothing sent twice
    assert snapshot(resumed) == expected_tree(files)
    assert not partial.exists()


async def test_a_damaged_partial_fails_the_digest_once_then_starts_again(tmp_path: Path) -> None:
    files = {"Dockerfile": b"FROM scratch\n", "src/big": BIG}
    manifest, contents = manifest_of(files)
    source = ContextSource()
    source.add_manifest(manifest, contents)
    workspace = Workspace(tmp_path / "agent")
    partial = workspace.blobs.blobs_dir / f"{digest_of(BIG)[7:]}.partial"
    partial.write_bytes(b"?" * 1000)  # not BIG's first kilobyte
    async with serving(source) as stub:
        with pytest.raises(BuildFailed, match="content digest mismatch"):
            await workspace.fetch_context(stub, manifest.digest, workspace.job_dir("j", 1))
        assert not partial.exists()
        again = await workspace.fetch_context(stub, manifest.digest, workspace.job_dir("j", 2))
    assert source.blob_requests == [
        [(digest_of(b"FROM scratch\n"), 13, 0), (digest_of(BIG), len(BIG), 1000)],
        [(digest_of(BIG), len(BIG), 0)],
    ]
    assert snapshot(again) == expected_tree(files)


async def test_a_manifest_whose_digest_does_not_match_is_refused(tmp_path: Path) -> None:
    manifest, contents = manifest_of({"Dockerfile": b"FROM scratch\n"})
    other, _ = manifest_of({"Dockerfile": b"FROM busybox\n"})
    source = ContextSource()
    source.add_manifest(manifest, contents)
    source.contexts[manifest.digest] = (common_pb2.CONTEXT_KIND_MANIFEST, other.encode())
    workspace = Workspace(tmp_path / "agent")
    async with serving(source) as stub:
        with pytest.raises(BuildFailed) as raised:
            await workspace.fetch_context(stub, manifest.digest, workspace.job_dir("j", 1))
    assert raised.value.message == (
        f"context digest mismatch: expected {manifest.digest}, got {other.digest}"
    )
    assert (raised.value.step, raised.value.infrastructure) == ("fetch context", True)
    assert list((tmp_path / "agent" / "contexts").iterdir()) == []
    assert source.blob_requests == []


async def test_a_malformed_manifest_is_refused_as_the_clients_fault(tmp_path: Path) -> None:
    source = ContextSource()
    bad = b'{"format":"polyarch.context.manifest.v1"}\n{"mode":493,"path":"x"}\n'
    source.contexts[digest_of(bad)] = (common_pb2.CONTEXT_KIND_MANIFEST, bad)
    workspace = Workspace(tmp_path / "agent")
    async with serving(source) as stub:
        with pytest.raises(BuildFailed) as raised:
            await workspace.fetch_context(stub, digest_of(bad), workspace.job_dir("j", 1))
    assert (raised.value.step, raised.value.infrastructure) == ("unpack context", False)
    assert raised.value.message == (
        f"context manifest {digest_of(bad)} line 2: type must be dir, file or symlink, not None"
    )
    assert list((tmp_path / "agent" / "contexts").iterdir()) == []


def ALWAYS(_dockerfile: bytes | None) -> bool:
    return True  # a builder that never writes into its context (docker)


async def test_concurrent_jobs_download_a_shared_blob_once(tmp_path: Path) -> None:
    one, one_blobs = manifest_of({"Dockerfile": b"FROM a\n", "src/big": BIG})
    two, two_blobs = manifest_of({"Dockerfile": b"FROM b\n", "src/big": BIG})
    source = ContextSource(chunk=4096)
    source.add_manifest(one, one_blobs)
    source.add_manifest(two, two_blobs)
    workspace = Workspace(tmp_path / "agent")
    async with serving(source) as stub:
        jobs = [(one, "a"), (two, "b"), (one, "c"), (two, "d")]
        dirs = await asyncio.gather(*(
            workspace.fetch_context(stub, m.digest, workspace.job_dir(j, 1), may_link=ALWAYS)
            for m, j in jobs
        ))  # fmt: skip
    asked = [digest for request in source.blob_requests for digest, _, _ in request]
    assert sorted(asked) == sorted([digest_of(BIG), digest_of(b"FROM a\n"), digest_of(b"FROM b\n")])
    assert source.context_calls == 2
    assert [(d / "src" / "big").read_bytes() == BIG for d in dirs] == [True] * 4
    inodes = {(d / "src" / "big").stat().st_ino for d in dirs}
    assert len(inodes) == 1  # one variant, hard-linked into every job


async def test_a_build_that_may_write_its_context_gets_private_copies(tmp_path: Path) -> None:
    """buildah bind-mounts the context folder for RUN --mount: with `rw` a build writes
    there, so such a Dockerfile's files must not be hard links into the cache."""
    safe = b"FROM a\nCOPY src /src\n"
    writes = b"FROM a\nRUN --mount=type=bind,target=/ctx,rw echo x > /ctx/src/big\n"
    one, one_blobs = manifest_of({"Dockerfile": writes, "src/big": BIG})
    two, two_blobs = manifest_of({"Dockerfile": safe, "src/big": BIG})
    source = ContextSource(chunk=4096)
    source.add_manifest(one, one_blobs)
    source.add_manifest(two, two_blobs)
    workspace = Workspace(tmp_path / "agent")
    buildah = BuildahBuilder(removal_batch=1)
    async with serving(source) as stub:
        linked = await workspace.fetch_context(
            stub, two.digest, workspace.job_dir("safe", 1), may_link=buildah.may_link_context
        )
        private = await workspace.fetch_context(
            stub, one.digest, workspace.job_dir("rw", 1), may_link=buildah.may_link_context
        )
        assert (linked / "src" / "big").stat().st_nlink > 1  # shared with the cache
        assert (private / "src" / "big").stat().st_nlink == 1
        (private / "src" / "big").write_bytes(b"pwned\n")  # what the RUN step would do
        again = await workspace.fetch_context(
            stub, two.digest, workspace.job_dir("again", 1), may_link=buildah.may_link_context
        )
    assert (again / "src" / "big").read_bytes() == BIG
    assert (linked / "src" / "big").read_bytes() == BIG


async def test_trim_sweeps_blobs_only_no_cached_or_running_context_uses(tmp_path: Path) -> None:
    old, old_blobs = manifest_of({"Dockerfile": b"FROM old\n", "src/shared": BIG})
    new, new_blobs = manifest_of({"Dockerfile": b"FROM new\n", "src/shared": BIG})
    source = ContextSource()
    source.add_manifest(old, old_blobs)
    source.add_manifest(new, new_blobs)
    workspace = Workspace(tmp_path / "agent", cache_max_age=100.0, sweep_interval=60.0)
    async with serving(source) as stub:
        for manifest, job in ((old, "a"), (new, "b")):
            await workspace.fetch_context(stub, manifest.digest, workspace.job_dir(job, 1))
    now = 10_000.0
    contexts = tmp_path / "agent" / "contexts"
    os.utime(contexts / f"{old.digest[7:]}.manifest", (now - 500, now - 500))
    os.utime(contexts / f"{new.digest[7:]}.manifest", (now - 10, now - 10))
    # a running job's blob that no cached manifest lists (its manifest not written yet)
    running = b"a running job's file\n"
    stray = workspace.blobs.blobs_dir / digest_of(running)[7:]
    stray.write_bytes(running)
    workspace.blobs.pin([digest_of(running)])
    (workspace.blobs.blobs_dir / f"{'e' * 64}.partial").write_bytes(b"left by a crash")

    assert await workspace.trim_cache(now=now) == [old.digest]

    kept = sorted(p.name for p in workspace.blobs.blobs_dir.iterdir())
    assert kept == sorted(d[7:] for d in [*new.blobs, digest_of(running)])
    variants = sorted(p.name.split("-")[0] for p in workspace.blobs.variants_dir.iterdir())
    assert variants == sorted(d[7:] for d in new.blobs)
    # within the sweep interval a trim deletes contexts but leaves their blobs a while
    workspace.blobs.unpin([digest_of(running)])
    os.utime(contexts / f"{new.digest[7:]}.manifest", (now - 500, now - 500))
    assert await workspace.trim_cache(now=now + 30) == [new.digest]
    assert stray.exists() and (workspace.blobs.blobs_dir / digest_of(BIG)[7:]).exists()
    assert await workspace.trim_cache(now=now + 70) == []
    assert list(workspace.blobs.blobs_dir.iterdir()) == []
    assert list(workspace.blobs.variants_dir.iterdir()) == []


async def test_trim_over_the_size_budget_goes_oldest_first_by_manifest_weight(
    tmp_path: Path,
) -> None:
    manifests = [manifest_of({"Dockerfile": f"FROM {n}\n".encode(), "src/big": BIG}) for n in "abc"]
    source = ContextSource()
    for manifest, blobs in manifests:
        source.add_manifest(manifest, blobs)
    weight = len(manifests[0][0].encode()) + len(BIG) + len(b"FROM a\n")
    workspace = Workspace(tmp_path / "agent", cache_max_bytes=2 * weight, sweep_interval=0.0)
    async with serving(source) as stub:
        for (manifest, _), job in zip(manifests, "abc", strict=True):
            await workspace.fetch_context(stub, manifest.digest, workspace.job_dir(job, 1))
    contexts = tmp_path / "agent" / "contexts"
    now = 10_000.0
    for age, (manifest, _) in zip((30, 20, 10), manifests, strict=True):
        os.utime(contexts / f"{manifest.digest[7:]}.manifest", (now - age, now - age))
    workspace._in_use[manifests[0][0].digest] = 1  # the oldest is being laid out

    assert await workspace.trim_cache(now=now) == [manifests[1][0].digest]
    assert not (workspace.blobs.blobs_dir / digest_of(b"FROM b\n")[7:]).exists()
    assert (workspace.blobs.blobs_dir / digest_of(BIG)[7:]).exists()


async def test_blobs_are_asked_for_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blob_fetch, "MAX_RANGES_PER_REQUEST", 2)
    files = {f"src/{n}": f"file {n}\n".encode() for n in range(4)}
    manifest, contents = manifest_of({"Dockerfile": b"FROM scratch\n", **files})
    source = ContextSource()
    source.add_manifest(manifest, contents)
    workspace = Workspace(tmp_path / "agent")
    async with serving(source) as stub:
        laid = await workspace.fetch_context(stub, manifest.digest, workspace.job_dir("j", 1))
    assert [len(request) for request in source.blob_requests] == [2, 2, 1]
    asked = [digest for request in source.blob_requests for digest, _, _ in request]
    assert asked == list(manifest.blobs)
    assert snapshot(laid) == expected_tree({"Dockerfile": b"FROM scratch\n", **files})


@pytest.mark.parametrize(
    ("dockerfile", "writes"),
    [
        (b"FROM a\nCOPY . /src\nRUN make\n", False),
        (b"FROM a\nRUN --mount=type=bind,target=/src make\n", False),
        (b"FROM a\nRUN --mount=type=cache,target=/root/.cache make\n", False),
        (b"FROM a\nRUN --mount=type=bind,target=/src,rw make\n", True),
        (b"FROM a\nRUN --mount=type=bind,target=/src,readwrite=true make\n", True),
        (b"FROM a\nRUN --mount=target=/src,RW make\n", True),
        (b'FROM a\nRUN --mount="type=bind,rw" make\n', True),
        (b"FROM a\nARG M=rw\nRUN --mount=type=bind,${M} make\n", True),
        (b"FROM a\nRUN --mount type=bind,rw make\n", True),  # a spelling not parsed: assume so
    ],
)
def test_which_dockerfiles_may_write_their_context(dockerfile: bytes, writes: bool) -> None:
    assert may_write_context(dockerfile) is writes
    assert BuildahBuilder(removal_batch=1).may_link_context(dockerfile) is not writes
