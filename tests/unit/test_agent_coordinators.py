"""An agent given several coordinators: the address list, the redirect policy, its identity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from polyarch.agent import enrolment
from polyarch.agent.coordinators import Rotation, agent_addresses, split_addresses
from polyarch.agent.enrolment import EnrolmentError, Identity, IdentityStore, enrol_first
from polyarch.proto.active_coordinator import MAX_REDIRECTS, active_named
from polyarch.proto.config_files import ConfigError
from polyarch.proto.trust import ClientTrust
from tests.unit.test_agent_config import REQUIRED, config_for, write


def test_a_list_keeps_its_order_and_drops_blanks_and_repeats() -> None:
    assert split_addresses(" a:7600, b.example:7600,,a:7600,[::1]:7600 ") == [
        "a:7600", "b.example:7600", "[::1]:7600",
    ]  # fmt: skip
    assert split_addresses("a:7600") == ["a:7600"]


@pytest.mark.parametrize("bad", ["a", "a:", ":7600", "a:http", "a:70000", "a:0"])
def test_a_bad_entry_is_named(bad: str) -> None:
    with pytest.raises(ValueError, match=f"coordinator must be HOST:PORT.*not '{bad}' \\(in"):
        split_addresses(f"ok:7600,{bad}")
    with pytest.raises(ValueError, match="no HOST:PORT"):
        split_addresses(" , ")


def test_the_flag_the_file_and_the_environment_take_a_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POLYARCH_COORDINATOR", raising=False)
    assert config_for(*REQUIRED, "--coordinator", "a:7600, b:7600").coordinator == "a:7600,b:7600"
    path = write(tmp_path, '[agent]\ncoordinator = ["a:7600", "b:7600"]\n')
    assert config_for(*REQUIRED, "--config", path).coordinator == "a:7600,b:7600"
    monkeypatch.setenv("POLYARCH_COORDINATOR", "c:7600,d:7600")
    assert config_for(*REQUIRED).coordinator == "c:7600,d:7600"
    with pytest.raises(ConfigError, match=r"setting coordinator must be HOST:PORT.*not 'd:x'"):
        config_for(*REQUIRED, "--coordinator", "c:7600,d:x")


def test_agent_channels_are_one_or_one_per_coordinator() -> None:
    both = ("--coordinator", "a:7600,b:7600")
    assert config_for(*REQUIRED, *both, "--agent-channel", "a:1,b:2").agent_channel == "a:1,b:2"
    assert config_for(*REQUIRED, *both, "--agent-channel", "lb:9").agent_channel == "lb:9"
    with pytest.raises(ConfigError, match="3 addresses for 2 coordinators"):
        config_for(*REQUIRED, *both, "--agent-channel", "a:1,b:2,c:3")


def test_each_coordinator_is_reached_on_its_host_at_the_agent_port() -> None:
    coordinators = ["a:7600", "[fd00::2]:7600"]
    assert agent_addresses(coordinators, agent_port=9601) == ["a:9601", "[fd00::2]:9601"]
    assert agent_addresses(coordinators) == ["a:7601", "[fd00::2]:7601"]  # the default layout
    assert agent_addresses(coordinators, ["x:1", "y:2"], 9601) == ["x:1", "y:2"]
    assert agent_addresses(coordinators, ["lb:9"]) == ["lb:9"]
    with pytest.raises(ValueError, match="3 agent channels for 2 coordinators"):
        agent_addresses(coordinators, ["x:1", "y:2", "z:3"])


def test_the_active_address_is_read_from_trailing_metadata() -> None:
    assert active_named((("other", "x"), ("polyarch-active", "a:7601"))) == "a:7601"
    assert active_named((("polyarch-active", b"b:7601"),)) == "b:7601"
    assert active_named(None) == active_named(()) == ""


def test_a_standby_is_followed_at_once_even_off_the_list() -> None:
    rotation = Rotation(["a:1", "b:1"])
    assert rotation.after_failure("b:1") == 0.0 and rotation.current == "b:1"
    assert rotation.after_failure("dns-name:1") == 0.0 and rotation.current == "dns-name:1"
    # that one failing (no standby's answer): the next one given after b, after a pause
    delay = rotation.after_failure()
    assert 0 < delay <= 0.25 and rotation.current == "a:1"


def test_redirects_in_a_row_are_bounded_then_the_ordinary_pause_applies() -> None:
    rotation = Rotation(["a:1", "b:1"])
    for n in range(MAX_REDIRECTS):
        # two standbys naming each other (a term that names a dead coordinator, say)
        assert rotation.after_failure("b:1" if n % 2 == 0 else "a:1") == 0.0
    assert rotation.after_failure("a:1" if rotation.current == "b:1" else "b:1") > 0
    assert rotation.redirects == 0  # after the pause, a standby is followed again
    assert rotation.after_failure("elsewhere:1") == 0.0


def test_failures_rotate_with_a_growing_capped_pause_until_a_stream_is_welcomed() -> None:
    rotation = Rotation(["a:1", "b:1", "c:1"], base_delay=0.25, max_delay=1.0)
    seen, delays = [], []
    for _ in range(6):
        delays.append(rotation.after_failure())
        seen.append(rotation.current)
    assert seen == ["b:1", "c:1", "a:1", "b:1", "c:1", "a:1"]
    assert all(0 < d <= 1.0 for d in delays) and rotation.failures == 6
    rotation.connected()
    assert rotation.after_failure() <= 0.25  # the count starts over
    with pytest.raises(ValueError):
        Rotation([])


def stored(tmp_path: Path, coordinator: str) -> IdentityStore:
    store = IdentityStore(tmp_path / "state")
    identity = Identity("a1", b"key", b"cert", b"ca", "a.example:9601")
    store.save(identity, coordinator)
    return store


def test_an_identity_enrolled_with_a_list_loads_for_the_same_coordinators(tmp_path: Path) -> None:
    store = stored(tmp_path, "a.example:7600,b.example:7600")
    for same in ("a.example:7600,b.example:7600", "b.example:7600, a.example:7600"):
        identity = store.load("a1", same)
        assert identity is not None and identity.agent_port == 9601
    assert store.load("a1", "a.example:7600") is None  # another farm, maybe: enrol again
    assert store.load("a2", "a.example:7600,b.example:7600") is None


def test_an_enrolment_file_of_one_coordinator_still_loads(tmp_path: Path) -> None:
    store = stored(tmp_path, "a.example:7600")
    # the format before coordinator lists, as an older agent wrote it
    (store.dir / "enrolment.json").write_text(json.dumps(
        {"name": "a1", "coordinator": "a.example:7600", "agent_address": "a.example:7601"}
    ))  # fmt: skip
    identity = store.load("a1", "a.example:7600")
    assert identity is not None and identity.agent_address == "a.example:7601"
    assert identity.cert_pem == b"cert"


class FakeFarm:
    """Coordinators as enrolment sees them: dead, standbys naming an address, or active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, **kinds: str) -> None:
        self.kinds = kinds  # address -> "dead" | "active" | "refuses" | the address it names
        self.tried: list[str] = []
        monkeypatch.setattr(enrolment, "enrol", self.enrol)

    def resolve(self, address: str) -> ClientTrust:
        if self.kinds.get(address, "dead") == "dead":
            self.tried.append(address)
            raise ConnectionRefusedError(111, "Connection refused")
        return ClientTrust(insecure=True)

    async def enrol(self, address: str, _trust: Any, name: str, _replace: bool) -> Identity:
        self.tried.append(address)
        kind = self.kinds[address]
        if kind == "active":
            return Identity(name, b"k", b"c", b"ca", f"{address.split(':')[0]}:9601")
        if kind == "refuses":
            raise EnrolmentError("the token is not valid")
        raise EnrolmentError(f"UNAVAILABLE at {address}", unanswered=True, active=kind)


async def test_enrolment_skips_a_dead_one_and_follows_a_standby(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    farm = FakeFarm(monkeypatch, **{"b:7600": "c:7600", "c:7600": "active"})
    identity = await enrol_first(["a:7600", "b:7600"], farm, "a1", False)  # type: ignore[arg-type]
    assert farm.tried == ["a:7600", "b:7600", "c:7600"] and identity.agent_address == "c:9601"


async def test_enrolment_gives_up_on_standbys_naming_each_other_and_stops_on_a_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    farm = FakeFarm(monkeypatch, **{"a:7600": "b:7600", "b:7600": "a:7600"})
    with pytest.raises(EnrolmentError, match=r"could not enrol: .*UNAVAILABLE at"):
        await enrol_first(["a:7600"], farm, "a1", False)  # type: ignore[arg-type]
    assert len(farm.tried) == MAX_REDIRECTS + 1
    farm = FakeFarm(monkeypatch, **{"a:7600": "refuses", "b:7600": "active"})
    with pytest.raises(EnrolmentError, match="the token is not valid"):
        await enrol_first(["a:7600", "b:7600"], farm, "a1", False)  # type: ignore[arg-type]
    assert farm.tried == ["a:7600"]
