"""Which coordinator an agent dials: the addresses given, and the active one a standby names."""

from __future__ import annotations

from dataclasses import dataclass

from polyarch.proto.active_coordinator import MAX_REDIRECTS
from polyarch.proto.registries import backoff_delay


def split_addresses(text: str, what: str = "coordinator") -> list[str]:
    """`a:7600,b:7600` -> ["a:7600", "b:7600"], in order, duplicates dropped. Raises
    ValueError naming the entry that is not HOST:PORT (`what` names the setting)."""
    addresses: list[str] = []
    for address in filter(None, (part.strip() for part in text.split(","))):
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            given = f" (in {text!r})" if address != text.strip() else ""
            raise ValueError(f"{what} must be HOST:PORT, or several comma-separated, not "
                             f"{address!r}{given}")  # fmt: skip
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise ValueError(f"{what}: no HOST:PORT in {text!r}")
    return addresses


def agent_addresses(
    coordinators: list[str], explicit: list[str] | None = None, agent_port: int | None = None
) -> list[str]:
    """Each coordinator's agent-channel address, in the coordinators' order: the `explicit`
    ones (one per coordinator, or one for all), else the coordinator's host with the agent
    port it reported at enrolment, else its own port + 1 (the default layout)."""
    if explicit:
        if len(explicit) == 1:
            return list(explicit)
        if len(explicit) != len(coordinators):
            raise ValueError(
                f"{len(explicit)} agent channels for {len(coordinators)} coordinators: give "
                "one, or one per coordinator in the same order"
            )
        return list(explicit)
    addresses = []
    for coordinator in coordinators:
        host, _, port = coordinator.rpartition(":")
        address = f"{host}:{agent_port if agent_port else int(port) + 1}"
        if address not in addresses:
            addresses.append(address)
    return addresses


@dataclass
class Rotation:
    """Where the agent dials next. A standby's refusal naming the active one is followed at
    once (up to MAX_REDIRECTS in a row, even to an address not given); any other failure
    moves on to the next address given, after the usual growing, jittered pause."""

    addresses: list[str]
    base_delay: float = 0.25
    max_delay: float = 5.0
    position: int = 0  # the address given that was dialled last (or redirected from)
    redirect: str = ""  # dialled instead of addresses[position]: named by a standby
    redirects: int = 0
    failures: int = 0

    def __post_init__(self) -> None:
        if not self.addresses:
            raise ValueError("no coordinator address to dial")

    @property
    def current(self) -> str:
        return self.redirect or self.addresses[self.position]

    def connected(self) -> None:
        """A stream was welcomed: the next failure starts the count (and the pause) over."""
        self.redirects = self.failures = 0

    def after_failure(self, active: str = "") -> float:
        """The stream to `current` ended; `active` is the address a standby's refusal named
        ("" for any other end). Moves `current` on and returns how long to wait first."""
        if active and active != self.current and self.redirects < MAX_REDIRECTS:
            self.redirects += 1
            self._dial(active)
            return 0.0
        self.redirects = 0
        self._dial(self.addresses[(self.position + 1) % len(self.addresses)])
        delay = backoff_delay(self.failures, self.base_delay, cap=self.max_delay)
        self.failures += 1
        return delay

    def _dial(self, address: str) -> None:
        if address in self.addresses:
            self.position, self.redirect = self.addresses.index(address), ""
        else:
            self.redirect = address
