"""deploy/prometheus/ checked by promtool, and a real Prometheus scraping a real build.

promtool and prometheus come from Debian's `prometheus` package, which
deploy/dev/bootstrap.sh installs; nothing here is skipped when they are missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.farm import Farm, running_farm
from tests.support.poll import poll_until
from tests.support.services import free_port

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "polyarch.rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "polyarch.rules.test.yml"
EXAMPLE = ROOT / "examples" / "hello"
SEVERITIES = {"critical", "warning", "info"}


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else "")
    if not path:
        pytest.fail(
            f"{name} not found: deploy/dev/bootstrap.sh installs it (Debian package "
            "`prometheus`); run it as root",
            pytrace=False,
        )
    return path


def promtool(*args: str) -> str:
    result = subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=120, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def test_example_prometheus_config_is_valid() -> None:
    # also checks the rule file it names
    output = promtool("check", "config", str(CONFIG))
    assert "polyarch.rules.yml" in output


def test_rules_are_valid() -> None:
    promtool("check", "rules", str(RULES))


def test_rule_unit_tests_pass() -> None:
    output = promtool("test", "rules", str(RULE_TESTS))
    assert "SUCCESS" in output


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    alerts = set(re.findall(r"^\s*- alert:\s*(\w+)\s*$", RULES.read_text(), re.MULTILINE))
    # a block `exp_alerts:` (not `exp_alerts: []`) expects the alert to fire
    fired = set(re.findall(r"alertname:\s*(\w+)\s*\n\s*exp_alerts:\s*\n", RULE_TESTS.read_text()))
    assert len(alerts) >= 10
    assert alerts - fired == set(), "alerts without a unit test that fires them"
    # ...and the healthy farm at the top of the file checks that none of them fires
    quiet = set(re.findall(r"alertname:\s*(\w+),\s*exp_alerts:\s*\[\]", RULE_TESTS.read_text()))
    assert alerts - quiet == set(), "alerts not checked against the healthy farm"


# ---- a real Prometheus ---------------------------------------------------------------------


@dataclass
class Prometheus:
    url: str
    process: asyncio.subprocess.Process
    log: Path
    client: httpx.AsyncClient

    def log_tail(self) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-30:])

    async def api(self, path: str, **params: str) -> object:
        if self.process.returncode is not None:
            raise AssertionError(f"prometheus exited ({self.process.returncode}):\n"
                                 f"{self.log_tail()}")  # fmt: skip
        resp = await self.client.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        resp.raise_for_status()
        body = resp.json()
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        data = await self.api("query", query=expr)
        return [(s["metric"], float(s["value"][1])) for s in data["result"]]  # type: ignore[index]

    async def ready(self) -> bool:
        if self.process.returncode is not None:
            raise AssertionError(f"prometheus exited ({self.process.returncode}):\n"
                                 f"{self.log_tail()}")  # fmt: skip
        return (await self.client.get(f"{self.url}/-/ready", timeout=5)).status_code == 200


def write_config(work_dir: Path, targets: dict[str, str]) -> Path:
    work_dir.mkdir(parents=True)
    config = work_dir / "prometheus.yml"
    # JSON is YAML: no YAML library needed
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [address]}]}
            for job, address in targets.items()
        ],
    }, indent=2))  # fmt: skip
    return config


@contextlib.asynccontextmanager
async def running_prometheus(work_dir: Path, targets: dict[str, str]) -> AsyncIterator[Prometheus]:
    """A ready prometheus on 127.0.0.1 scraping {job: address} every second, with our rules.

    Stopped with SIGTERM (by PID) on exit; its log and TSDB stay in work_dir.
    """
    config = write_config(work_dir, targets)
    url = f"http://127.0.0.1:{free_port()}"
    log = work_dir / "prometheus.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            tool("prometheus"), f"--config.file={config}",
            f"--storage.tsdb.path={work_dir / 'data'}",
            f"--web.listen-address={url.removeprefix('http://')}",
            "--log.level=info",
            stdout=out, stderr=out,
        )  # fmt: skip
    try:
        async with httpx.AsyncClient() as client:
            prometheus = Prometheus(url, process, log, client)
            await poll_until(prometheus.ready, timeout=60, interval=0.2,
                             ignore=(httpx.TransportError,),
                             message="prometheus never became ready")  # fmt: skip
            yield prometheus
    finally:
        if process.returncode is None:
            process.terminate()  # our own child, by its PID
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()


async def single_value(prometheus: Prometheus, expr: str) -> float | None:
    samples = await prometheus.query(expr)
    return samples[0][1] if len(samples) == 1 else None


async def test_real_prometheus_scrapes_a_build_and_evaluates_the_rules(
    tmp_path: Path, docker_binary: str, registry, base_image: str, unique_repo: str
) -> None:
    async with running_farm(tmp_path / "farm") as farm:
        agent_port = free_port()
        await farm.spawn_agent_process("metered", docker_binary, "--metrics-listen",
                                       f"127.0.0.1:{agent_port}")  # fmt: skip
        await wait_for_agent(farm, "metered")
        targets = {
            "polyarch-coordinator": f"127.0.0.1:{farm.coordinator.metrics_port}",
            "polyarch-agent": f"127.0.0.1:{agent_port}",
        }
        async with running_prometheus(tmp_path / "prometheus", targets) as prometheus:
            await poll_until(
                lambda: targets_up(prometheus),
                timeout=30,
                interval=0.2,
                message="prometheus never scraped both the coordinator and the agent",
            )

            result = await farm.cli(
                "build", "--platform", "linux/amd64", "-t",
                f"{registry.address}/{unique_repo}:observed", "--build-arg", f"BASE={base_image}",
                str(EXAMPLE),
            )  # fmt: skip
            assert result.returncode == 0, result.stderr

            for expr, want in (
                ('polyarch_builds_finished_total{result="succeeded"}', 1),
                ('polyarch_jobs_finished_total{platform="linux/amd64", mode="native", '
                 'result="pushed"}', 1),
                ('polyarch_agent_jobs_total{job="polyarch-agent", platform="linux/amd64", '
                 'result="pushed"}', 1),
                ("polyarch_index_assembly_seconds_count", 1),
                # recording rules evaluated on live data
                ('polyarch:agents:sum_by_arch{arch="amd64"}', 1),
                ("polyarch:agent_slots_in_use:ratio", 0),
            ):  # fmt: skip
                await poll_until(
                    lambda e=expr, w=want: has_value(prometheus, e, w), timeout=30, interval=0.25,
                    message=f"prometheus never saw {expr} == {want}",
                )  # fmt: skip

            groups = await poll_until(
                lambda: rules_all_ok(prometheus),
                timeout=30,
                interval=0.25,
                message="the rule groups never all evaluated with health ok",
            )
            check_alerting_rules(groups)
            alerts = await prometheus.api("alerts")
            firing = [a for a in alerts["alerts"] if a["state"] == "firing"]  # type: ignore[index]
            assert firing == [], f"alerts firing on a healthy farm: {firing}"


async def wait_for_agent(farm: Farm, name: str) -> None:
    manager = farm.coordinator.manager
    assert manager is not None
    await poll_until(lambda: name in manager.sessions, timeout=30,
                     message=f"agent {name} never connected")  # fmt: skip


async def targets_up(prometheus: Prometheus) -> bool:
    samples = await prometheus.query("up")
    return {s["job"]: v for s, v in samples} == {"polyarch-coordinator": 1, "polyarch-agent": 1}


async def has_value(prometheus: Prometheus, expr: str, want: float) -> bool:
    return await single_value(prometheus, expr) == want


async def rules_all_ok(prometheus: Prometheus) -> list[dict[str, object]] | None:
    data = await prometheus.api("rules")
    groups: list[dict[str, object]] = data["groups"]  # type: ignore[index]
    if {g["name"] for g in groups} != {"polyarch.recording", "polyarch.alerts"}:
        return None
    rules = [r for g in groups for r in g["rules"]]  # type: ignore[attr-defined]
    if not rules or any(r["health"] != "ok" for r in rules):
        return None
    return groups


def check_alerting_rules(groups: list[dict[str, object]]) -> None:
    alerting = [r for g in groups for r in g["rules"] if r["type"] == "alerting"]  # type: ignore[attr-defined]
    assert len(alerting) >= 10
    for rule in alerting:
        assert rule["labels"].get("severity") in SEVERITIES, rule["name"]
        assert rule["duration"] > 0, f"{rule['name']} has no `for:`"
        assert rule["annotations"].get("summary"), rule["name"]
        assert rule["annotations"].get("description"), rule["name"]
        assert rule["name"].startswith("Polyarch"), rule["name"]
