"""deploy/compose/compose.ha.yaml: two coordinators on one PostgreSQL, checked by parsing as
compose.yaml is (rendered by `docker compose config` where the plugin exists): own data
volumes, one shared contexts volume, secrets only from files, agents given both."""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from polyarch.agent.config import add_agent_flags, agent_config_from
from polyarch.coordinator.config import CoordinatorConfig, add_coordinator_flags, config_from
from tests.unit.test_deploy_compose import (
    COMPOSE,
    DEPLOY,
    Service,
    config_target,
    parsed,
    volume_mounts,
)
from tests.unit.test_deploy_compose import services as base_services

COORDINATORS = ("coordinator-a", "coordinator-b")
AGENTS = ("agent-1", "agent-2")
# The only variables the file may interpolate: where images come from and which host ports
# it publishes, never a secret.
FILE_VARIABLES = {"POLYARCH_IMAGE_PREFIX", "POLYARCH_TAG", "POLYARCH_REGISTRY_IMAGE",
                  "POLYARCH_POSTGRES_IMAGE", "POLYARCH_PROMETHEUS_IMAGE",
                  "POLYARCH_REGISTRY_PORT", "POLYARCH_PROMETHEUS_PORT"}  # fmt: skip
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def compose_ha() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((COMPOSE / "compose.ha.yaml").read_text())
    return document


def services() -> dict[str, Service]:
    result: dict[str, Service] = compose_ha()["services"]
    return result


def flag(argv: list[str], name: str) -> str:
    """The value after `name` on a command line (which must hold it exactly once)."""
    assert argv.count(name) == 1, f"{name} in {argv}"
    return argv[argv.index(name) + 1]


def coordinator_config(name: str, tmp_path: Path) -> CoordinatorConfig:
    """coordinator `name`'s settings through the real loader: compose.yaml's file, then its
    flags; the DSN secret stands in as a file of our own (the loader reads it)."""
    command = services()[name]["command"]
    args = parsed(add_coordinator_flags, ["polyarch", *command[1:]])
    args.limit = []
    assert config_target(services()[name], "coordinator-config") == args.config
    args.config = COMPOSE / compose_ha()["configs"]["coordinator-config"]["file"]
    assert args.database_file == Path("/run/secrets/database_dsn")
    dsn = tmp_path / f"{name}.dsn"
    dsn.write_text("postgresql://polyarch:x@postgres:5432/polyarch\n")
    args.database_file = dsn
    return config_from(args)


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def test_the_ha_farm_has_postgres_two_coordinators_agents_and_prometheus() -> None:
    assert set(services()) == {"registry", "postgres", *COORDINATORS, *AGENTS, "prometheus"}
    assert "coordinator" not in services()  # no SQLite coordinator outside the election


def test_every_dependency_volume_config_and_secret_is_declared() -> None:
    document = compose_ha()
    for name, service in services().items():
        assert set(service.get("depends_on", [])) <= set(services()) - {name}, name
        for volume in volume_mounts(service):
            assert volume in document["volumes"], f"{name}: volume {volume} not declared"
        for config in service.get("configs", []):
            assert config["source"] in document["configs"], name
        for secret in service.get("secrets", []):
            assert secret in document["secrets"], name
    for config in document["configs"].values():
        assert (COMPOSE / config["file"]).is_file(), config["file"]
    ignored = (COMPOSE / ".gitignore").read_text().splitlines()
    for secret in document["secrets"].values():  # made by hand (the header), never committed
        assert secret["file"].removeprefix("./") in ignored, secret["file"]


def test_each_coordinator_has_its_own_data_volume_and_both_share_the_contexts_volume(
    tmp_path: Path,
) -> None:
    data_volumes, context_dirs = [], set()
    for name in COORDINATORS:
        service = services()[name]
        mounts = volume_mounts(service)
        config = coordinator_config(name, tmp_path)
        (data,) = [v for v, path in mounts.items() if config.data_dir.is_relative_to(path)]
        data_volumes.append(data)
        context_dir = Path(flag(service["command"], "--context-dir"))
        assert context_dir.is_relative_to(mounts["contexts"]), name
        assert not context_dir.is_relative_to(mounts[data]), name
        context_dirs.add(context_dir)
    assert data_volumes == [f"{name}-data" for name in COORDINATORS]
    assert len(context_dirs) == 1  # the same folder of the same volume
    assert compose_ha()["volumes"]["contexts"] is None  # a local named volume, not per service


def test_coordinators_advertise_their_service_names_on_ports_of_their_own(
    tmp_path: Path,
) -> None:
    configs = {name: coordinator_config(name, tmp_path) for name in COORDINATORS}
    clients = {name: port_of(c.listen) for name, c in configs.items()}
    agents = {name: port_of(c.agent_listen) for name, c in configs.items()}
    assert len({*clients.values(), *agents.values()}) == 4
    for name, config in configs.items():
        # first advertised = the address a standby's refusal names: resolvable by the other
        # containers (a service name) and, with the header's /etc/hosts line, by the host
        assert config.advertise[0] == name
        assert agents[name] == clients[name] + 1  # what agents assume for the agent port
        # published on loopback as the same port, so that the redirect works from the host
        assert services()[name]["ports"] == [f"127.0.0.1:{clients[name]}:{clients[name]}"]


def test_coordinators_read_the_database_from_a_secret_and_postgres_its_password() -> None:
    for name in COORDINATORS:
        service = services()[name]
        assert "--database" not in service["command"]  # only --database-file
        assert flag(service["command"], "--database-file") == "/run/secrets/database_dsn"
        assert service["secrets"] == ["database_dsn"]
        assert "environment" not in service
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    postgres = services()["postgres"]
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert postgres["secrets"] == ["postgres_password"]
    assert "ports" not in postgres  # reached only inside the network
    for name, service in services().items():
        for key in service.get("environment", {}):
            if re.search("PASSWORD|DSN|TOKEN", key):
                assert key.endswith("_FILE"), f"{name}: {key} holds a secret inline"
    assert postgres["image"] == "${POLYARCH_POSTGRES_IMAGE:-postgres:15-bookworm}"


def render(directory: Path, environment: dict[str, str]) -> str:
    """compose.ha.yaml as compose resolves it: `docker compose config` when the plugin is
    installed, else its variables interpolated here (the file's defaults, then `environment`)."""
    env = {**os.environ, **environment}
    if shutil.which("docker") and subprocess.run(
        ["docker", "compose", "version"], capture_output=True, check=False, timeout=30
    ).returncode == 0:  # fmt: skip
        done = subprocess.run(
            ["docker", "compose", "-f", "compose.ha.yaml", "config"], cwd=directory, env=env,
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout
    text = (directory / "compose.ha.yaml").read_text()

    def value(match: re.Match[str]) -> str:
        name, operator, default = match.groups()
        return env.get(name) or (default if operator else "") or ""

    document = yaml.safe_load(VARIABLE.sub(value, text))
    return yaml.safe_dump(document)


def test_no_secret_reaches_the_rendered_file(tmp_path: Path) -> None:
    # The file's variables: image locations and ports only, each with a default.
    text = (COMPOSE / "compose.ha.yaml").read_text()
    used = {m.group(1): m.group(2) for m in VARIABLE.finditer(text)}
    assert set(used) <= FILE_VARIABLES, set(used) - FILE_VARIABLES
    assert all(operator == ":-" for operator in used.values()), used
    # A farm laid out as the header says, its secrets holding a password that is also in
    # every variable an operator might export: rendered, it appears nowhere.
    password = secrets.token_hex(16)
    for folder in ("compose", "prometheus", "kubernetes/probes"):
        shutil.copytree(DEPLOY / folder, tmp_path / "deploy" / folder)
    directory = tmp_path / "deploy" / "compose"
    dsn = f"postgresql://polyarch:{password}@postgres/polyarch"
    (directory / "postgres.password").write_text(password)
    (directory / "database.dsn").write_text(dsn)
    (directory / "agent.token").write_text("pa_agent_token\n")
    tempting = {"POSTGRES_PASSWORD": password, "PGPASSWORD": password, "POLYARCH_DATABASE": dsn}
    (directory / ".env").write_text("".join(f"{k}={v}\n" for k, v in tempting.items()))
    rendered = render(directory, tempting)
    assert "coordinator-b" in rendered and "/run/secrets/database_dsn" in rendered
    assert password not in rendered


def test_healthchecks_ask_the_process_so_a_standby_stays_healthy(tmp_path: Path) -> None:
    for name in COORDINATORS:
        service = services()[name]
        config = coordinator_config(name, tmp_path)
        command = service["healthcheck"]["test"]
        assert "--service" not in command  # the BuildService is NOT_SERVING on a standby
        _, python, script, address, ca = command
        assert python == "/opt/polyarch/bin/python"
        assert Path(script) == config_target(service, "coordinator-health")
        assert address == f"127.0.0.1:{port_of(config.listen)}"
        assert Path(ca) == config.data_dir / "tls" / "ca.pem"
        # exit 4 (a lost term) must be restarted: it comes back as the standby
        assert service["restart"] in ("always", "unless-stopped")


def agent_args(name: str) -> argparse.Namespace:
    args = parsed(add_agent_flags, services()[name]["command"])
    assert config_target(services()[name], "agent-config") == args.config
    args.config = COMPOSE / compose_ha()["configs"]["agent-config"]["file"]
    return args


@pytest.mark.parametrize("name", AGENTS)
def test_agents_are_given_both_coordinators(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POLYARCH_COORDINATOR", raising=False)
    args = agent_args(name)
    listed = args.coordinator.split(",")
    expected, channels = [], []
    for coordinator in COORDINATORS:
        config = coordinator_config(coordinator, tmp_path)
        expected.append(f"{config.advertise[0]}:{port_of(config.listen)}")
        channels.append(f"{config.advertise[0]}:{port_of(config.agent_listen)}")
    assert listed == expected
    assert args.agent_channel.split(",") == channels  # each one's own agent port
    loaded = agent_config_from(args)  # the real loader, with the rest of the settings
    assert (loaded.coordinator, loaded.agent_channel) == (",".join(expected), ",".join(channels))
    depends = services()[name]["depends_on"]
    assert set(depends) == set(COORDINATORS)
    assert all(d["required"] is False for d in depends.values())  # either one will do


def without(service: Service, *keys: str) -> Service:
    return {k: v for k, v in service.items() if k not in keys}


def test_what_both_files_share_stays_equal() -> None:
    base = base_services()
    assert services()["registry"] == base["registry"]
    for name in AGENTS:
        ha = services()[name]
        assert without(ha, "command", "depends_on") == without(base[name], "command", "depends_on")
        assert ha["command"][: len(base[name]["command"])] == base[name]["command"]
    for name in COORDINATORS:
        ha, single = services()[name], base["coordinator"]
        differ = ("command", "volumes", "ports", "healthcheck", "depends_on", "secrets")
        assert without(ha, *differ) == without(single, *differ)
        assert without(ha["healthcheck"], "test") == without(single["healthcheck"], "test")
    configs = {k: v for k, v in compose_ha()["configs"].items() if k != "prometheus-config"}
    base_configs = yaml.safe_load((COMPOSE / "compose.yaml").read_text())["configs"]
    assert configs == {k: v for k, v in base_configs.items() if k != "prometheus-config"}


def test_prometheus_scrapes_both_coordinators(tmp_path: Path) -> None:
    ours = yaml.safe_load((COMPOSE / "prometheus.ha.yml").read_text())
    single = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in ours["scrape_configs"]}
    assert set(jobs) == {job["job_name"] for job in single["scrape_configs"]}
    targets = {job: {t for c in jobs[job]["static_configs"] for t in c["targets"]} for job in jobs}
    metrics = {port_of(coordinator_config(n, tmp_path).metrics_listen) for n in COORDINATORS}
    assert targets["polyarch-coordinator"] == {f"{n}:{p}" for n in COORDINATORS for p in metrics}
    assert targets["polyarch-agent"] == {f"{agent}:9601" for agent in AGENTS}
    assert without(ours, "scrape_configs") == without(single, "scrape_configs")
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: deploy/dev/bootstrap.sh installs prometheus"
    shutil.copy(COMPOSE / "prometheus.ha.yml", tmp_path / "prometheus.yml")
    shutil.copy(DEPLOY / "prometheus" / "polyarch.rules.yml", tmp_path / "polyarch.rules.yml")
    result = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
