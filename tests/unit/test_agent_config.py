"""The agent's configuration (defaults, TOML file, flags) and the heartbeat pace it obeys."""

from __future__ import annotations

import argparse
import asyncio
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from polyarch.agent.config import WORK_ROOT, AgentConfig, add_agent_flags, agent_config_from
from polyarch.agent.detect import detect_platforms
from polyarch.agent.runtime import Agent, heartbeat_interval_from
from polyarch.client import cli
from polyarch.proto.agent_protocol import DEFAULT_HEARTBEAT_INTERVAL
from polyarch.proto.config_files import ConfigError
from polyarch.proto.platforms import parse_platform
from polyarch.proto.v1 import agent_pb2
from tests.support.poll import poll_until
from tests.unit.test_agent_assignments import HeldBuilder, Stub

REQUIRED = ["--name", "a1", "--builder", "docker"]


@pytest.fixture(autouse=True)
def no_coordinator_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POLYARCH_COORDINATOR", raising=False)


def config_for(*argv: str) -> AgentConfig:
    parser = argparse.ArgumentParser()
    add_agent_flags(parser)
    return agent_config_from(parser.parse_args(list(argv)))


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "agent.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_defaults_come_from_the_dataclass() -> None:
    config = config_for(*REQUIRED)
    defaults = AgentConfig()
    assert (config.name, config.builder) == ("a1", "docker")
    assert config.coordinator == defaults.coordinator == "127.0.0.1:7600"
    assert (config.slots, config.job_timeout, config.shutdown_grace) == (2, 7200.0, 60.0)
    assert config.heartbeat_interval == DEFAULT_HEARTBEAT_INTERVAL
    assert (config.native, config.emulated) == (None, None)  # detected at start
    assert config.workspace_dir() == WORK_ROOT / "a1"
    assert config.metrics_listen == "" and config.insecure_registries == []


def test_the_file_fills_the_config(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [agent]
        coordinator = "farm.example:7600"
        name = "arm-1"
        builder = "buildah"
        slots = 4
        native = ["linux/arm64"]
        emulated = "none"
        work_dir = "/srv/agent"
        storage_dir = "/srv/cache/arm-1"
        insecure_registries = ["reg.lan:5000", "cache.lan"]
        job_timeout = 600
        metrics_listen = "0.0.0.0:9601"
        [agent.labels]
        rack = "b2"
    """)  # fmt: skip
    config = config_for("--config", path)
    assert (config.coordinator, config.name, config.builder) == (
        "farm.example:7600",
        "arm-1",
        "buildah",
    )
    assert config.slots == 4 and config.job_timeout == 600.0
    assert config.native == [parse_platform("linux/arm64")] and config.emulated == []
    assert config.workspace_dir() == Path("/srv/agent")
    assert config.storage_dir == Path("/srv/cache/arm-1")
    assert config.insecure_registries == ["reg.lan:5000", "cache.lan"]
    assert config.labels == {"rack": "b2"} and config.metrics_listen == "0.0.0.0:9601"


def test_flags_override_the_file_and_the_file_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLYARCH_COORDINATOR", "env.example:7600")
    assert config_for(*REQUIRED).coordinator == "env.example:7600"
    path = write(tmp_path, '[agent]\ncoordinator = "file.example:7600"\nslots = 4\n'
                 'name = "from-file"\nbuilder = "docker"\nshutdown_grace = 5\n')  # fmt: skip
    config = config_for("--config", path, "--slots", "8", "--name", "from-flag")
    assert config.coordinator == "file.example:7600"
    assert (config.slots, config.name, config.shutdown_grace) == (8, "from-flag", 5.0)
    flagged = config_for("--config", path, "--coordinator", "flag.example:7600", "--label", "k=v")
    assert flagged.coordinator == "flag.example:7600" and flagged.labels == {"k": "v"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[agent]\nslot = 4\n", r"unknown agent setting\(s\) slot"),
        ('[agent]\nslots = "two"\n', r"slots must be an integer, not 'two'"),
        ("[agent]\nslots = 65\n", r"slots must be from 1 to 64"),
        ('[agent]\njob_timeout = "long"\n', r"job_timeout must be a number of seconds"),
        ("[agent]\nlabels = 3\n", r"labels must be a table of strings"),
        ("[agent]\nnative = [5]\n", r"native must be a string or a list of strings"),
        ('[agent]\nnative = "linux/sparc"\n', r"agent setting native: .*sparc"),
        ('[agent]\nbuilder = "podman"\n', r"builder must be docker or buildah"),
        ('[agent]\ncoordinator = "nohost"\n', r"coordinator must be HOST:PORT"),
        ("agent = 1\n", r"\[agent\] must be a table"),
        ("[agent\n", r"not valid TOML"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    flags = ["--name", "a1"] if "builder" in text else REQUIRED  # a flag would win
    with pytest.raises(ConfigError, match=message):
        config_for("--config", write(tmp_path, text), *flags)


def test_name_and_builder_are_required_and_platforms_may_not_overlap() -> None:
    with pytest.raises(ConfigError, match="name is required"):
        config_for("--builder", "docker")
    with pytest.raises(ConfigError, match="linux/amd64 given as both"):
        config_for(*REQUIRED, "--native", "linux/amd64", "--emulated", "linux/amd64,linux/arm64")


def test_the_cli_hands_the_config_to_the_agent_and_reports_bad_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[Any] = []
    runtime = types.ModuleType("polyarch.agent.runtime")
    runtime.run_agent = lambda config, args: seen.append(config) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "polyarch.agent.runtime", runtime)
    path = write(tmp_path, '[agent]\nname = "a2"\nbuilder = "buildah"\nslots = 3\n')
    assert cli.main(["agent", "--config", path, "--insecure"]) == 0
    assert (seen[0].name, seen[0].builder, seen[0].slots) == ("a2", "buildah", 3)
    write(tmp_path, '[agent]\nname = "a2"\nbuilder = "buildah"\nslotz = 3\n')
    assert cli.main(["agent", "--config", path]) == 2
    assert "unknown agent setting(s) slotz" in capsys.readouterr().err


def test_the_welcome_sets_the_heartbeat_pace_with_a_fallback_for_zero() -> None:
    assert heartbeat_interval_from(agent_pb2.Welcome(heartbeat_interval_ms=1500), 3.0) == 1.5
    assert heartbeat_interval_from(agent_pb2.Welcome(heartbeat_interval_ms=10), 3.0) == 0.1
    assert heartbeat_interval_from(agent_pb2.Welcome(heartbeat_interval_ms=0), 3.0) == 3.0


async def test_the_agent_heartbeats_at_the_welcomes_pace(tmp_path: Path) -> None:
    config = AgentConfig(name="a", builder="docker", native=[parse_platform("linux/amd64")],
                         emulated=[], work_dir=tmp_path, heartbeat_interval=60.0)  # fmt: skip
    agent = Agent(config, HeldBuilder())
    heartbeat = asyncio.create_task(agent._heartbeat())
    try:
        await asyncio.sleep(0.1)
        assert agent.outbox.empty()  # nothing before the Welcome
        welcome = agent_pb2.CoordinatorMessage(welcome=agent_pb2.Welcome(heartbeat_interval_ms=100))
        agent._handle(Stub(b""), welcome)  # type: ignore[arg-type]
        # with the fallback of 60 s a heartbeat this soon would be impossible
        await poll_until(lambda: agent.outbox.qsize() >= 2, timeout=5, message="2 heartbeats")
        kinds = {agent.outbox.get_nowait().WhichOneof("message") for _ in range(2)}
        assert kinds == {"heartbeat"}
    finally:
        heartbeat.cancel()


def test_detection_fills_only_what_is_unset_and_drops_emulating_a_native_platform() -> None:
    amd64, arm64 = parse_platform("linux/amd64"), parse_platform("linux/arm64")
    config = detect_platforms(AgentConfig(name="a", native=[amd64], emulated=[amd64, arm64]))
    assert (config.native, config.emulated) == ([amd64], [arm64])


def test_a_buildah_agent_keeps_its_layer_cache_where_storage_dir_says(tmp_path: Path) -> None:
    from polyarch.agent.builders.buildah import BuildahBuilder
    from polyarch.agent.runtime import make_builder

    config = config_for(*REQUIRED, "--storage-dir", str(tmp_path / "cache"))
    builder = make_builder("buildah", tmp_path / "work", storage_dir=config.storage_dir)
    assert isinstance(builder, BuildahBuilder) and builder.storage_root == tmp_path / "cache"
    default = make_builder("buildah", tmp_path / "work")
    assert isinstance(default, BuildahBuilder)
    assert default.storage_root == tmp_path / "work" / "buildah-storage"
