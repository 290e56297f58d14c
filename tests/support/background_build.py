"""`polyarch build` in the background of a fault test, and the slow build it usually runs."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .agent_containers import Fleet, wait_for

TWO = ["linux/amd64", "linux/arm64"]
# Long enough that a fault lands mid-build; NONCE keeps it from being a cache hit.
SLOW_DOCKERFILE = 'ARG BASE\nFROM ${BASE}\nARG NONCE\nRUN echo "$NONCE" > /nonce && sleep 8\n'
BUILD_TIMEOUT = 180.0


class BackgroundBuild:
    """`polyarch build` running in the background while the test injects a fault."""

    def __init__(
        self, fleet: Fleet, context: Path, tag: str, base_image: str, platforms: list[str] = TWO
    ) -> None:
        self.fleet, self.tag = fleet, tag
        self.proc = fleet.popen_cli(
            "build", "--platform", ",".join(platforms), "-t", tag,
            "--build-arg", f"BASE={base_image}",
            "--build-arg", f"NONCE={secrets.token_hex(8)}", str(context),
        )  # fmt: skip

    def build_id(self) -> str:
        def listed() -> str | None:
            if self.proc.poll() is not None:
                _, err = self.proc.communicate()
                pytest.fail(f"polyarch build exited {self.proc.returncode} early:\n{err}")
            for build in self.fleet.builds_json():
                if self.tag in build["tags"]:
                    return str(build["id"])
            return None

        found: str = wait_for(listed, timeout=30, message=f"a build for {self.tag} listed")
        return found

    def victim(self, build_id: str) -> tuple[str, set[str]]:
        """The agent running the amd64 job, and every platform of the build on it now."""
        agent = str(self.wait_running_on_some_agent(build_id, "linux/amd64")["agent"])
        on_it = {
            job["platform"]
            for job in self.fleet.build_json(build_id)["jobs"]
            if job["agent"] == agent and job["state"] in ("assigned", "running")
        }
        return agent, on_it

    def wait_running_on_some_agent(self, build_id: str, platform: str) -> dict[str, Any]:
        job: dict[str, Any] = wait_for(
            lambda: self.fleet.running_job(build_id, platform), timeout=60,
            message=f"{platform} job of {build_id} running on an agent",
        )  # fmt: skip
        return job

    def result(self, timeout: float = BUILD_TIMEOUT) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"polyarch build did not finish in {timeout:g}s:\n{err[-4000:]}")
        return self.proc.returncode, out, err

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def jobs_by_platform(build: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["platform"]: job for job in build["jobs"]}
