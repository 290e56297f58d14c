"""SLSA provenance on real builders and a real registry: read back with skopeo and docker."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from polyarch.agent.builders.docker import DockerBuilder
from tests.support.farm import Farm
from tests.support.verify import (
    attestation_entries,
    docker_run_uname,
    image_entries,
    index_platforms,
    skopeo_raw,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello"
THREE = ["linux/amd64", "linux/arm64", "linux/arm/v7"]
MODE = {"linux/amd64": "native", "linux/arm64": "emulated", "linux/arm/v7": "emulated"}
TOKEN = "tok-4f1c9a-never-in-the-statement"


def run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{args}: {done.stderr}"
    return done.stdout


def fetch_statement(repo: str, attestation: str, where: Path) -> tuple[dict[str, Any], Any]:
    """The attestation manifest (skopeo inspect --raw) and its in-toto layer, copied by skopeo
    to a dir: layout and read from the blob file."""
    manifest = skopeo_raw(f"{repo}@{attestation}")
    run("skopeo", "copy", "--src-tls-verify=false", "--src-no-creds",
        f"docker://{repo}@{attestation}", f"dir:{where}")  # fmt: skip
    [layer] = manifest["layers"]
    return manifest, json.loads((where / layer["digest"].split(":")[1]).read_text())


@pytest.mark.emulated
async def test_three_platforms_with_max_provenance_stay_a_normal_multi_platform_image(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str, tmp_path: Path
) -> None:
    await farm.add_agent(
        "prov-agent", DockerBuilder(docker_binary),
        native=["linux/amd64"], emulated=["linux/arm64", "linux/arm/v7"], slots=3,
    )  # fmt: skip
    repo = f"{registry.address}/{unique_repo}"
    metadata, oci = tmp_path / "metadata.json", tmp_path / "image.oci.tar"
    result = await farm.cli(
        "build", "--platform", ",".join(THREE), "-t", f"{repo}:v1", "--provenance=mode=max",
        "--build-arg", f"BASE={base_image}", "--build-arg", f"API_TOKEN={TOKEN}",
        "-o", "type=registry", "-o", f"type=oci,dest={oci}",
        "--metadata-file", str(metadata), str(EXAMPLE),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    digest = result.stdout.split()[-1]
    meta = json.loads(metadata.read_text())
    assert meta["containerimage.digest"] == digest

    index = skopeo_raw(f"{repo}:v1")
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    images, attestations = image_entries(index), attestation_entries(index)
    assert len(images) == 3 and len(attestations) == 3
    built = index_platforms(index)
    assert built == {p: r["digest"] for p, r in meta["polyarch.platforms"].items()}
    by_subject = {a["annotations"]["vnd.docker.reference.digest"]: a for a in attestations}
    assert set(by_subject) == set(built.values())
    for n, (platform, image) in enumerate(sorted(built.items())):
        entry = by_subject[image]
        assert entry["platform"] == {"architecture": "unknown", "os": "unknown"}
        assert entry["annotations"]["vnd.docker.reference.type"] == "attestation-manifest"
        assert meta["polyarch.platforms"][platform]["attestation"] == entry["digest"]
        manifest, statement = fetch_statement(repo, entry["digest"], tmp_path / f"att{n}")
        layer = manifest["layers"][0]
        assert layer["mediaType"] == "application/vnd.in-toto+json"
        assert layer["annotations"] == {
            "in-toto.io/predicate-type": "https://slsa.dev/provenance/v1"
        }
        assert statement["_type"] == "https://in-toto.io/Statement/v1"
        assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
        assert statement["subject"][0]["digest"] == {"sha256": image.split(":")[1]}
        definition = statement["predicate"]["buildDefinition"]
        assert definition["externalParameters"]["platform"] == platform
        assert definition["externalParameters"]["args"]["API_TOKEN"] == "[redacted]"
        assert definition["externalParameters"]["args"]["BASE"] == base_image
        assert definition["internalParameters"]["polyarch"] == {
            "agent": "prov-agent", "mode": MODE[platform], "attempt": 1,
        }  # fmt: skip
        run_details = statement["predicate"]["runDetails"]
        assert run_details["builder"]["id"].startswith("polyarch://coordinator/")
        assert run_details["metadata"]["finishedOn"].endswith("Z")
        assert TOKEN not in json.dumps(statement)

    # docker and skopeo still pick the image, not an attestation
    assert docker_run_uname(docker_binary, f"{repo}:v1", "linux/arm64") == "aarch64"
    arm = json.loads(run("skopeo", "inspect", "--tls-verify=false", "--no-creds",
                         "--override-arch", "arm64", f"docker://{repo}:v1"))  # fmt: skip
    # skopeo names the index's digest; the config it read is the arm64 image's, not unknown
    assert arm["Architecture"] == "arm64" and arm["Os"] == "linux" and arm["Digest"] == digest
    arm_layers = skopeo_raw(f"{repo}@{built['linux/arm64']}")["layers"]
    assert arm["Layers"] == [layer["digest"] for layer in arm_layers]

    # the OCI layout holds the same index, its attestations included, readable by skopeo
    layout = json.loads(run("skopeo", "inspect", "--raw", f"oci-archive:{oci}"))
    assert layout == index
    names = set(run("tar", "-tf", str(oci)).split())
    assert {f"blobs/sha256/{a['digest'].split(':')[1]}" for a in attestations} <= names
    arm = json.loads(run("skopeo", "inspect", "--override-arch", "arm64", f"oci-archive:{oci}"))
    assert arm["Architecture"] == "arm64"
    assert TOKEN not in result.stderr


async def test_provenance_false_gives_a_plain_index_and_min_keeps_args_out(
    farm: Farm, docker_binary: str, registry, base_image: str, unique_repo: str, tmp_path: Path
) -> None:
    await farm.add_agent("prov-agent", DockerBuilder(docker_binary),
                         native=["linux/amd64"], slots=2)  # fmt: skip
    repo = f"{registry.address}/{unique_repo}"
    base = ["build", "--platform", "linux/amd64", "--build-arg", f"BASE={base_image}",
            "--build-arg", f"API_TOKEN={TOKEN}"]  # fmt: skip
    off = await farm.cli(*base, "-t", f"{repo}:off", "--provenance=false", str(EXAMPLE))
    assert off.returncode == 0, off.stderr
    index = skopeo_raw(f"{repo}:off")
    assert not attestation_entries(index) and len(image_entries(index)) == 1
    assert all("annotations" not in m for m in index["manifests"])
    default = await farm.cli(*base, "-t", f"{repo}:min", str(EXAMPLE))  # default: mode=min
    assert default.returncode == 0, default.stderr
    [attestation] = attestation_entries(skopeo_raw(f"{repo}:min"))
    _, statement = fetch_statement(repo, attestation["digest"], tmp_path / "min")
    definition = statement["predicate"]["buildDefinition"]
    assert "args" not in definition["externalParameters"]
    assert "internalParameters" not in definition
    assert TOKEN not in json.dumps(statement)
