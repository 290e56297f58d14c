"""The deploy inventory and what deploy writes on a host: checked without any host."""

from __future__ import annotations

from pathlib import Path

import pytest

from polyarch.agent.config import SETTINGS
from polyarch.ops.deploy import HostResult
from polyarch.ops.deploy_cli import render_table
from polyarch.ops.inventory import InventoryError, load_inventory
from polyarch.ops.layout import AgentPaths, agent_config, agent_env, agent_unit
from polyarch.proto.config_files import read_toml_table

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = """
[coordinator]
address = "10.0.0.5:7600"
token_file = "secrets/agent.token"

[defaults]
user = "root"
key = "~/.ssh/id_ed25519"
known_hosts = "hosts/known"
builder = "buildah"
slots = 2

[[hosts]]
name = "arm-1"
address = "10.0.0.21"
port = 2222
native = ["linux/arm64"]

[[hosts]]
name = "x86-1"
address = "10.0.0.31"
builder = "docker"
emulated = ["linux/arm/v7"]
"""


def write(tmp_path: Path, text: str, token: str = "pa_agent_secret\n") -> Path:
    (tmp_path / "secrets").mkdir(exist_ok=True)
    (tmp_path / "secrets" / "agent.token").write_text(token)
    path = tmp_path / "inventory.toml"
    path.write_text(text)
    return path


def test_paths_are_relative_to_the_inventory_and_tilde_is_home(tmp_path: Path) -> None:
    inventory = load_inventory(write(tmp_path, EXAMPLE))
    arm, x86 = inventory.hosts
    assert inventory.coordinator == "10.0.0.5:7600" and inventory.token == "pa_agent_secret"
    assert arm.key == Path.home() / ".ssh" / "id_ed25519"
    assert arm.known_hosts == tmp_path.resolve() / "hosts" / "known"
    assert (arm.port, arm.builder, arm.native, arm.emulated) == (
        2222,
        "buildah",
        ("linux/arm64",),
        (),
    )
    assert (x86.port, x86.builder, x86.native, x86.emulated) == (
        22,
        "docker",
        (),
        ("linux/arm/v7",),
    )
    assert "pa_agent_secret" not in repr(inventory)  # the token never shows
    assert [h.name for h in inventory.select("arm-*")] == ["arm-1"]
    with pytest.raises(InventoryError, match="no host name matches 'ppc-\\*'"):
        inventory.select("ppc-*")


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (('builder = "buildah"', 'builder = "kaniko"'), "builder must be one of buildah, docker"),
        (('name = "x86-1"', 'name = "arm-1"'), "host names used twice: arm-1"),
        (('name = "x86-1"', 'name = "x 86"'), "name 'x 86' is not a valid agent name"),
        (("port = 2222", 'port = "22"'), "hosts[0]: port must be an integer"),
        (('native = ["linux/arm64"]', 'native = ["linux/sparc"]'), "hosts[0]: native:"),
        (("slots = 2", "slot = 2"), "[defaults]: unknown keys slot"),
        (('address = "10.0.0.5:7600"', 'address = "10.0.0.5"'), "address must be HOST:PORT"),
    ],
)
def test_bad_inventories_are_refused_naming_file_and_key(
    tmp_path: Path, change: tuple[str, str], says: str
) -> None:
    path = write(tmp_path, EXAMPLE.replace(*change, 1))
    with pytest.raises(InventoryError) as refused:
        load_inventory(path)
    assert str(path) in str(refused.value) and says in str(refused.value)


def test_a_missing_token_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE.replace("secrets/agent.token", "gone.token"))
    with pytest.raises(InventoryError, match=r"gone\.token: cannot read the token"):
        load_inventory(path)


def test_the_agent_config_written_on_a_host_loads_as_polyarch_agent_reads_it(
    tmp_path: Path,
) -> None:
    _, x86 = load_inventory(write(tmp_path, EXAMPLE)).hosts
    config = tmp_path / "agent-x86-1.toml"
    config.write_text(agent_config(x86, "10.0.0.5:7600"))
    table = read_toml_table(config, "agent", SETTINGS)
    assert table["name"] == "x86-1" and table["builder"] == "docker"
    assert table["coordinator"] == "10.0.0.5:7600" and table["emulated"] == ["linux/arm/v7"]
    assert table["work_dir"].startswith(AgentPaths("x86-1").state)
    assert "native" not in table  # detected on the host
    assert agent_env("pa_x") == "POLYARCH_TOKEN=pa_x\n"


def test_the_installed_unit_is_the_one_deploy_systemd_ships() -> None:
    assert agent_unit() == (REPO / "deploy" / "systemd" / "polyarch-agent@.service").read_text()


def test_the_result_table_has_a_row_per_host_with_its_error() -> None:
    table = render_table([
        HostResult("arm-1", "upgrade", "0.1.0", "0.1.1", 5.44, service="supervised",
                   connected=True),
        HostResult("x86-1", "upgrade", "0.1.0", "0.1.0", 20.0, error="rolled back to 0.1.0"),
    ])  # fmt: skip
    header, arm, x86 = table.splitlines()
    assert header.split() == [
        "HOST",
        "ACTION",
        "BEFORE",
        "AFTER",
        "SERVICE",
        "CONNECTED",
        "TIME",
        "ERROR",
    ]
    assert arm.split() == ["arm-1", "upgrade", "0.1.0", "0.1.1", "supervised", "yes", "5.4s"]
    assert x86.split()[-4:] == ["rolled", "back", "to", "0.1.0"]


def test_deploy_talks_to_the_inventory_s_coordinator_unless_told_otherwise() -> None:
    from polyarch.client.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["deploy", "status", "inv.toml"]).coordinator is None
    given = parser.parse_args(["deploy", "upgrade", "inv.toml", "--coordinator", "10.1.1.1:7600"])
    assert given.coordinator == "10.1.1.1:7600" and given.max_unavailable == 1
    # the other commands keep their default (the parent flags are shared objects)
    build = parser.parse_args(["build", "--platform", "linux/amd64", "."])
    assert build.coordinator is not None
