"""--secret parsing, which registries' credentials a build sends, and the agent's job files."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from polyarch.agent.job_credentials import write_job_credentials
from polyarch.client.build_secrets import SecretSpecError, parse_secret, registries_of
from polyarch.proto.v1 import agent_pb2, common_pb2


def test_secret_specs_as_buildx_spells_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "npmrc").write_bytes(b"//registry:_authToken=abc\n")
    monkeypatch.setenv("GH_TOKEN", "ghp-123")
    monkeypatch.chdir(tmp_path)
    assert parse_secret(f"id=npm,src={tmp_path / 'npmrc'}") == (
        "npm",
        b"//registry:_authToken=abc\n",
    )
    assert parse_secret("id=npm,source=npmrc,type=file") == ("npm", b"//registry:_authToken=abc\n")
    assert parse_secret("id=gh,env=GH_TOKEN") == ("gh", b"ghp-123")
    assert parse_secret("id=GH_TOKEN") == ("GH_TOKEN", b"ghp-123")  # bare id: $ID first
    assert parse_secret("id=npmrc") == ("npmrc", b"//registry:_authToken=abc\n")  # then a file
    refusals = [
        ("src=x", "no id="),
        ("id=a,env=NOPE_NOT_SET", "$NOPE_NOT_SET is not set"),
        ("id=a,src=/no/such/file", "cannot read"),
        ("npm", "expected id="),
    ]
    for bad, says in refusals:
        with pytest.raises(SecretSpecError, match=says.replace("$", r"\$")):
            parse_secret(bad)
    (tmp_path / "big").write_bytes(b"x" * (500 * 1024 + 1))
    with pytest.raises(SecretSpecError, match="over"):
        parse_secret("id=big,src=big")


def test_only_the_builds_registries_are_sent() -> None:
    assert registries_of(
        ["ghcr.io/acme/app:1", "ghcr.io/acme/app:latest"],
        ["type=registry,ref=registry.example:5000/cache/app:buildcache", "type=inline"],
    ) == ["ghcr.io", "registry.example:5000"]


def test_job_credentials_are_private_files_over_the_hosts_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = tmp_path / "host-docker"
    host.mkdir()
    (host / "config.json").write_text(json.dumps({
        "auths": {"other.example": {"auth": "b3RoZXI6cHc="}, "reg:5000": {"auth": "b2xkOm9sZA=="}},
        "credHelpers": {"reg:5000": "pass", "ecr.example": "ecr-login"},
    }))  # fmt: skip
    monkeypatch.setenv("DOCKER_CONFIG", str(host))
    job_dir = tmp_path / "job"
    job_dir.mkdir(mode=0o700)
    job = agent_pb2.Assignment(
        registry_auths=[
            common_pb2.RegistryAuth(registry="reg:5000", username="ci", password="t0k")
        ],
        secrets=[common_pb2.BuildSecret(id="npm", value=b"s3cret")],
    )
    written = write_job_credentials(job_dir, job)
    assert written.secrets["npm"].read_bytes() == b"s3cret"
    assert written.secrets["npm"].stat().st_mode & 0o777 == 0o600
    assert written.secrets["npm"].parent.stat().st_mode & 0o777 == 0o700
    assert written.docker_config_dir is not None and written.auth_file is not None
    config = json.loads((written.docker_config_dir / "config.json").read_text())
    assert base64.b64decode(config["auths"]["reg:5000"]["auth"]) == b"ci:t0k"  # per-build wins
    assert config["auths"]["other.example"] == {"auth": "b3RoZXI6cHc="}  # host's kept
    assert config["credHelpers"] == {"ecr.example": "ecr-login"}  # no helper over ours
    assert (written.docker_config_dir / "config.json").stat().st_mode & 0o777 == 0o600
    buildah = json.loads(written.auth_file.read_text())
    assert base64.b64decode(buildah["auths"]["reg:5000"]["auth"]) == b"ci:t0k"
    assert all(p.is_relative_to(job_dir) for p in [written.auth_file, *written.secrets.values()])

    nothing = write_job_credentials(tmp_path / "job2", agent_pb2.Assignment())
    assert nothing.docker_config_dir is None and nothing.auth_file is None and not nothing.secrets
