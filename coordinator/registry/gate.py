"""The supply-chain gate: what must hold before a build's tags move (scan, immutable tags)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from polyarch.coordinator.core.model import BuildSpec, InvalidRequest, JobRecord
from polyarch.coordinator.registry.client import RegistryClient, RegistryError
from polyarch.coordinator.registry.immutable import ImmutableTags
from polyarch.coordinator.registry.scan import (
    ScanCommandError,
    ScanFailed,
    Scanner,
    ScanResult,
    parse_scan_command,
)
from polyarch.coordinator.registry.signatures import SIGN_FARM
from polyarch.proto.cosign import load_key_file


@dataclass
class GatePolicy:
    """The coordinator's supply-chain settings (CoordinatorConfig fills them)."""

    # "CMD ... {ref} ..." run on every platform image; "" = no farm-wide scan
    scan_command: str = ""
    # whether a build may bring its own scan command (in addition to none: it replaces the
    # farm's only when the farm has none, so a build cannot switch the farm's scan off)
    allow_build_scan_command: bool = False
    scan_timeout: float = 600.0
    scan_concurrency: int = 4
    immutable_tags: list[str] = field(default_factory=list)
    # the farm's signing key file (PEM EC P-256) for builds that ask `--sign-with farm`
    sign_key: Path | None = None


class SupplyChainGate:
    """Checks a submission against the policy, and runs the checks between "every image is
    pushed and verified" and "the first tag moves" (IndexPublisher calls `before_tags`)."""

    def __init__(
        self, policy: GatePolicy | None = None,
        count_scan: Callable[[str], None] = lambda _outcome: None,
    ) -> None:  # fmt: skip
        self.policy = policy or GatePolicy()
        self.immutable = ImmutableTags(self.policy.immutable_tags)
        self.scanner = Scanner(self.policy.scan_timeout, self.policy.scan_concurrency, count_scan)
        if self.policy.scan_command:
            parse_scan_command(self.policy.scan_command)  # refused at start, not per build
        # loaded once at start (a bad file stops the coordinator); only the key object stays
        self.farm_key = load_key_file(self.policy.sign_key) if self.policy.sign_key else None

    def scan_command_of(self, spec: BuildSpec) -> str:
        """The command that gates this build: the farm's, else the build's own, else none."""
        return self.policy.scan_command or spec.scan_command

    def check_submit_policy(self, spec: BuildSpec) -> None:
        """InvalidRequest when the build brings a scan command the policy does not allow, or
        asks for a signature that cannot be made."""
        if spec.sign == SIGN_FARM and self.farm_key is None:
            raise InvalidRequest(
                "--sign-with farm refused: this coordinator has no signing key (its operator "
                "can give one with --sign-key FILE)"
            )
        if spec.sign and spec.no_publish:
            raise InvalidRequest("a signature needs a pushed index; this build publishes none")
        if not spec.scan_command:
            return
        if not self.policy.allow_build_scan_command:
            raise InvalidRequest(
                "--scan-command refused: this coordinator does not let builds bring their "
                "own scanner (its operator can allow it with --allow-build-scan-command)"
            )
        if self.policy.scan_command:
            raise InvalidRequest(
                "--scan-command refused: this coordinator already scans every build with "
                "its own --scan-command"
            )
        try:
            parse_scan_command(spec.scan_command)
        except ScanCommandError as exc:
            raise InvalidRequest(str(exc)) from None

    async def check_submit_tags(
        self,
        client: RegistryClient,
        spec: BuildSpec,
        own: Callable[[], Awaitable[frozenset[str]]] | None = None,
    ) -> None:
        """InvalidRequest naming each protected tag the registry already holds, unless it
        holds one of `own()`: indexes an earlier build of the same request published (its
        rebuild may give the same digest again; the check before the index PUT decides).
        `own` is asked only when a protected tag is held: most submits need no lookup."""
        if not self.immutable or spec.no_publish:
            return
        try:
            held = await self.immutable.held(client, spec.tags)
        except RegistryError as exc:
            raise InvalidRequest(f"immutable tags cannot be checked: {exc}") from None
        if not held:
            return
        published = await own() if own is not None else frozenset()
        moved = [h for h in held if h.digest not in published]
        if moved:
            raise InvalidRequest("; ".join(h.refusal() for h in moved))

    async def before_tags(
        self, client: RegistryClient, spec: BuildSpec, jobs: Sequence[JobRecord]
    ) -> RegistryClient:
        """Scans every platform image (ScanFailed on a refusal, kept on the jobs), then
        returns the client to push tags with: one that refuses to move an immutable tag."""
        command = self.scan_command_of(spec)
        if command:
            images = {j.platform: f"{spec.registry}/{spec.repository}@{j.digest}" for j in jobs}
            results = await self.scanner.scan(command, images)
            keep_results(jobs, results)
            refused = [r for r in results if not r.passed]
            if refused:
                raise ScanFailed("scan gate: " + "; ".join(r.summary() for r in refused))
        if spec.no_publish:
            return client
        return self.immutable.guard(client, spec.tags)


def keep_results(jobs: Sequence[JobRecord], results: Sequence[ScanResult]) -> None:
    """Stores each scan's status and tail on its job (failed_step "scan")."""
    by_platform = {r.platform: r for r in results}
    for job in jobs:
        result = by_platform.get(job.platform)
        if result is not None and not result.passed:
            job.failed_step = "scan"
            job.error = f"{result.summary()}\n" + "\n".join(result.tail)
