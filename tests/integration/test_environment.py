"""The machine really provides what integration tests rely on: registries, base image, QEMU."""

from __future__ import annotations

import re
import subprocess

import httpx
import pytest

from tests.support.services import Registry, skopeo_raw

MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def _platform(entry: dict[str, dict[str, str]]) -> str:
    p = entry["platform"]
    return "/".join(part for part in (p["os"], p["architecture"], p.get("variant")) if part)


def test_base_image_is_a_three_platform_index(base_image: str) -> None:
    index = skopeo_raw(base_image)
    assert index["mediaType"] in (MANIFEST_LIST, OCI_INDEX)
    platforms = sorted(_platform(m) for m in index["manifests"])
    assert platforms == ["linux/amd64", "linux/arm/v7", "linux/arm64"]


@pytest.mark.parametrize(
    ("platform", "machine"),
    [
        pytest.param("linux/amd64", "x86_64", id="amd64"),
        pytest.param("linux/arm64", "aarch64", id="arm64", marks=pytest.mark.emulated),
        pytest.param("linux/arm/v7", "armv7l", id="arm-v7", marks=pytest.mark.emulated),
    ],
)
def test_docker_runs_each_platform_of_the_base_image(
    docker_available: str, base_image: str, platform: str, machine: str
) -> None:
    # --pull always: the daemon must resolve the index itself for this platform,
    # not reuse whichever platform an earlier test left under the same tag.
    run = [docker_available, "run", "--rm", "--pull", "always", "--platform", platform]
    try:
        done = subprocess.run(
            [*run, base_image, "uname", "-m"], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == machine
    finally:
        subprocess.run(
            [docker_available, "image", "rm", base_image], capture_output=True, timeout=60
        )


def test_registry_answers_anonymously(registry: Registry) -> None:
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        assert client.get(f"{registry.url}/v2/").status_code == 200


def test_auth_registry_rejects_anonymous_and_accepts_its_credentials(
    auth_registry: Registry,
) -> None:
    assert auth_registry.username is not None and auth_registry.password is not None
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        anonymous = client.get(f"{auth_registry.url}/v2/")
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"].lower().startswith("basic ")
        wrong = client.get(f"{auth_registry.url}/v2/", auth=(auth_registry.username, "wrong"))
        assert wrong.status_code == 401
        right = client.get(
            f"{auth_registry.url}/v2/", auth=(auth_registry.username, auth_registry.password)
        )
        assert right.status_code == 200


# The distribution spec's repository name grammar.
REPOSITORY_NAME = re.compile(
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
)


def test_unique_repo_is_a_valid_repository_name(unique_repo: str) -> None:
    assert REPOSITORY_NAME.fullmatch(unique_repo), unique_repo
    assert unique_repo.startswith("polyarch-test/test-unique-repo-is-a-valid-repository-name"[:54])
