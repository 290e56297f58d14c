"""deploy/compose/: the farm's wiring, checked by parsing (the project's machines have no
`docker compose` and can pull no image, so the file is not run here)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from polyarch.agent.config import add_agent_flags, agent_config_from
from polyarch.coordinator.config import add_coordinator_flags, config_from

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "compose"
AGENTS = ("agent-1", "agent-2")
Service = dict[str, Any]


def compose() -> dict[str, Any]:
    # PyYAML's safe loader expands the `<<: *agent` merge keys as compose does.
    document: dict[str, Any] = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    return document


def services() -> dict[str, Service]:
    result: dict[str, Service] = compose()["services"]
    return result


def config_target(service: Service, source: str) -> Path:
    """Where a service sees one of the top-level configs, and the file it comes from."""
    (entry,) = [c for c in service["configs"] if c["source"] == source]
    return Path(entry["target"])


def parsed(add_flags: Any, argv: list[str]) -> argparse.Namespace:
    """A command line as the program parses it, --config pointing at the file compose mounts."""
    parser = argparse.ArgumentParser()
    add_flags(parser)
    namespace, _ = parser.parse_known_args(argv[1:])
    return namespace


def volume_mounts(service: Service) -> dict[str, Path]:
    return {v.split(":")[0]: Path(v.split(":")[1]) for v in service.get("volumes", [])}


def test_the_farm_has_its_five_services() -> None:
    assert set(services()) == {"registry", "coordinator", *AGENTS, "prometheus"}


def test_every_dependency_volume_config_and_secret_is_declared() -> None:
    document = compose()
    for name, service in services().items():
        depends = service.get("depends_on", [])
        assert set(depends) <= set(services()) - {name}, name
        for volume in volume_mounts(service):
            assert volume in document["volumes"], f"{name}: volume {volume} not declared"
        for config in service.get("configs", []):
            assert config["source"] in document["configs"], name
        for secret in service.get("secrets", []):
            assert secret in document["secrets"], name
    for config in document["configs"].values():
        assert (COMPOSE / config["file"]).is_file(), config["file"]
    # The token file is made at first start (compose.yaml's header) and never committed.
    assert document["secrets"]["agent_token"]["file"] == "./agent.token"
    assert "agent.token" in (COMPOSE / ".gitignore").read_text().splitlines()


def test_ports_are_published_on_loopback_only() -> None:
    published = [p for s in services().values() for p in s.get("ports", [])]
    assert published, "the farm publishes nothing"
    assert all(isinstance(p, str) and p.startswith("127.0.0.1:") for p in published), published


@pytest.mark.parametrize("name", AGENTS)
def test_agents_dial_the_coordinator_service(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POLYARCH_COORDINATOR", raising=False)
    agent = services()[name]
    args = parsed(add_agent_flags, agent["command"])
    assert config_target(agent, "agent-config") == args.config
    args.config = COMPOSE / compose()["configs"]["agent-config"]["file"]
    config = agent_config_from(args)
    assert config.name == name
    host, _, port = config.coordinator.rpartition(":")
    assert host == "coordinator" and host in services()
    coordinator = coordinator_config()
    assert int(port) == int(coordinator.listen.rpartition(":")[2])
    assert host in coordinator.advertise  # in the server certificate
    assert agent["depends_on"]["coordinator"]["condition"] == "service_healthy"
    # Token from the secret file, state on the agent's own volume.
    assert agent["environment"]["POLYARCH_TOKEN_FILE"] == "/run/secrets/agent_token"
    assert "POLYARCH_TOKEN" not in agent["environment"]
    assert config.workspace_dir().is_relative_to(volume_mounts(agent)[f"{name}-work"])
    assert "registry:5000" in config.insecure_registries


def coordinator_config() -> Any:
    service = services()["coordinator"]
    args = parsed(add_coordinator_flags, ["polyarch", *service["command"][1:]])
    args.limit = []
    assert config_target(service, "coordinator-config") == args.config
    args.config = COMPOSE / compose()["configs"]["coordinator-config"]["file"]
    return config_from(args)


def test_coordinator_keeps_its_data_on_its_volume_and_checks_health() -> None:
    service = services()["coordinator"]
    config = coordinator_config()
    assert config.data_dir.is_relative_to(volume_mounts(service)["coordinator-data"])
    assert "registry:5000" in config.insecure_registries
    _, python, script, address, ca = service["healthcheck"]["test"]
    assert python == "/opt/polyarch/bin/python"
    assert Path(script) == config_target(service, "coordinator-health")
    # The same script as the Kubernetes probe (tests/integration/test_packaging.py runs it).
    health_file = compose()["configs"]["coordinator-health"]["file"]
    assert (COMPOSE / health_file).resolve() == DEPLOY / "kubernetes/probes/coordinator_health.py"
    assert address == config.listen.replace("0.0.0.0", "127.0.0.1")
    assert Path(ca) == config.data_dir / "tls" / "ca.pem"


def test_the_polyarch_images_are_the_farms_own_builds() -> None:
    for name, image in [
        ("coordinator", "polyarch-coordinator"),
        *((a, "polyarch-agent") for a in AGENTS),
    ]:
        assert services()[name]["image"].endswith(f"{image}:${{POLYARCH_TAG:-latest}}")


def test_prometheus_scrapes_every_polyarch_service_with_the_rules_jobs(tmp_path: Path) -> None:
    ours = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    reference = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in ours["scrape_configs"]}
    assert set(jobs) == {job["job_name"] for job in reference["scrape_configs"]}
    targets = {job: {t for c in jobs[job]["static_configs"] for t in c["targets"]} for job in jobs}
    metrics = coordinator_config().metrics_listen.rpartition(":")[2]
    assert targets["polyarch-coordinator"] == {f"coordinator:{metrics}"}
    assert targets["polyarch-agent"] == {f"{agent}:9601" for agent in AGENTS}
    # Where compose mounts the rules, the config's relative rule_files finds them.
    prometheus = services()["prometheus"]
    config_dir = config_target(prometheus, "prometheus-config").parent
    rules = config_target(prometheus, "prometheus-rules")
    assert [config_dir / name for name in ours["rule_files"]] == [rules]
    # promtool (bootstrap installs it) checks the config and the rules it loads, laid out
    # as in the container.
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: deploy/dev/bootstrap.sh installs prometheus"
    shutil.copy(COMPOSE / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(DEPLOY / "prometheus" / "polyarch.rules.yml", tmp_path / rules.name)
    result = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
