"""Independent checks of what the farm pushed: skopeo and docker, never our own client."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from polyarch.proto.platforms import parse_platform

from .services import skopeo_raw

__all__ = [
    "attestation_entries", "docker_run", "docker_run_uname", "image_entries", "index_platforms",
    "skopeo_missing", "skopeo_raw", "skopeo_tags",
]  # fmt: skip


def skopeo_missing(reference: str) -> bool:
    """True when the registry holds nothing at the reference."""
    out = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{reference}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return out.returncode != 0 and "manifest unknown" in out.stderr.lower()


def index_platforms(index: dict[str, Any]) -> dict[str, str]:
    """platform string -> child digest, as listed in an image index (attestation manifests,
    platform unknown/unknown, are not images: docker and skopeo skip them too)."""
    listed: dict[str, str] = {}
    for entry in image_entries(index):
        p = entry["platform"]
        raw = f"{p['os']}/{p['architecture']}" + (f"/{p['variant']}" if p.get("variant") else "")
        name = str(parse_platform(raw))
        assert name not in listed, f"{name} listed twice in the index"
        listed[name] = entry["digest"]
    return listed


def image_entries(index: dict[str, Any]) -> list[dict[str, Any]]:
    """The index's image entries, without BuildKit-style attestation manifests."""
    return [e for e in index["manifests"] if e.get("platform", {}).get("os") != "unknown"]


def attestation_entries(index: dict[str, Any]) -> list[dict[str, Any]]:
    """The index's attestation-manifest entries (platform unknown/unknown)."""
    return [e for e in index["manifests"] if e.get("platform", {}).get("os") == "unknown"]


def docker_run(
    docker: str, reference: str, platform: str, *args: str, entrypoint: str | None = None
) -> str:
    """`docker run --platform P [--entrypoint E] REF ARGS...`'s stdout, pulling fresh so the
    platform is honoured."""
    flags = ["--entrypoint", entrypoint] if entrypoint else []
    command = [docker, "run", "--rm", "--pull", "always", "--platform", platform, *flags,
               reference, *args]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, f"docker run --platform {platform} {reference}: {out.stderr}"
    return out.stdout.strip()


def docker_run_uname(docker: str, reference: str, platform: str) -> str:
    """`docker run --platform P REF uname -m`, pulling fresh so the platform is honoured."""
    return docker_run(docker, reference, platform, "uname", "-m")


def skopeo_tags(repository: str) -> list[str]:
    """The repository's tags as skopeo lists them (an independent client)."""
    done = subprocess.run(
        ["skopeo", "list-tags", "--tls-verify=false", f"docker://{repository}"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return sorted(json.loads(done.stdout)["Tags"] or [])
