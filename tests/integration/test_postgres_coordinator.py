"""A coordinator with --database postgresql://... runs a build through and keeps it there."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg

from polyarch.agent.builders.base import BuildRequest, PushedImage
from tests.support.farm import running_farm
from tests.support.services import Registry
from tests.support.stand_in_builders import IdleBuilder

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _one_file_layer(platform: str) -> tuple[bytes, bytes]:
    """(the gzipped layer, its uncompressed tar): one file naming the platform."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
        data = platform.encode()
        info = tarfile.TarInfo("platform")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(tar_bytes.getvalue(), mtime=0), tar_bytes.getvalue()


class PushingBuilder(IdleBuilder):
    """Builds nothing: pushes a one-file image for the platform, as a real builder would."""

    name = "pushing"

    async def build_and_push(
        self, request: BuildRequest, on_line: Callable[[str], None]
    ) -> PushedImage:
        registry, _, rest = request.image.partition("/")
        repository, _, tag = rest.rpartition(":")
        layer, diff = _one_file_layer(str(request.platform))
        config = json.dumps({
            "architecture": request.platform.architecture, "os": request.platform.os,
            "rootfs": {"type": "layers", "diff_ids": [_digest(diff)]}, "config": {},
        }).encode()  # fmt: skip
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": _digest(config), "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": _digest(layer), "size": len(layer)}],
        }).encode()  # fmt: skip
        base = f"http://{registry}/v2/{repository}"
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            for blob in (config, layer):
                started = await client.post(f"{base}/blobs/uploads/")
                location = httpx.URL(started.headers["location"])
                done = await client.put(
                    location.copy_merge_params({"digest": _digest(blob)}), content=blob
                )
                done.raise_for_status()
            pushed = await client.put(
                f"{base}/manifests/{tag}", content=manifest,
                headers={"Content-Type": OCI_MANIFEST},
            )  # fmt: skip
            pushed.raise_for_status()
        on_line(f"pushed {request.image}")
        return PushedImage(_digest(manifest), len(manifest), OCI_MANIFEST)


async def test_a_build_runs_through_with_its_state_in_postgresql(
    tmp_path: Path, postgres_dsn: str, registry: Registry, unique_repo: str
) -> None:
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM scratch\nCOPY platform /\n")
    (context / "platform").write_text("replaced by the builder\n")
    reference = f"{registry.address}/{unique_repo}:pg"
    async with running_farm(tmp_path / "farm", database=postgres_dsn) as farm:
        await farm.add_agent("pg-agent", PushingBuilder(), ["linux/amd64", "linux/arm64"])
        built = await farm.cli(
            "build", "--platform", "linux/amd64,linux/arm64", "-t", reference, str(context),
            timeout=120,
        )  # fmt: skip
        assert built.returncode == 0, built.stderr
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as db:
        builds = await (await db.execute("SELECT id, state, index_digest FROM builds")).fetchall()
        assert len(builds) == 1 and builds[0][1] == "succeeded"
        assert builds[0][2].startswith("sha256:")
        transitions = await db.execute(
            "SELECT j.platform, t.state FROM job_transitions t JOIN jobs j ON j.id = t.job_id "
            "ORDER BY t.seq"
        )
        by_platform: dict[str, list[str]] = {}
        for platform, state in await transitions.fetchall():
            by_platform.setdefault(platform, []).append(state)
    assert set(by_platform) == {"linux/amd64", "linux/arm64"}
    for states in by_platform.values():
        assert states[0] == "queued" and states[-1] == "pushed"
    # the index the build reported is what the registry holds under the tag
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        head = await client.head(
            f"http://{registry.address}/v2/{unique_repo}/manifests/pg",
            headers={"Accept": "application/vnd.oci.image.index.v1+json"},
        )
    assert head.headers["docker-content-digest"] == builds[0][2]
