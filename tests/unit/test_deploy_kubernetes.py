"""deploy/kubernetes/: valid for the Kubernetes API (kubernetes-validate --strict), and wired
the way polyarch reads its settings (the TOML in the ConfigMaps, through the real loaders)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from polyarch.agent.config import add_agent_flags, agent_config_from
from polyarch.coordinator.config import config_from, read_config_file
from polyarch.coordinator.trust.auth import METHOD_ACCESS, Access

KUBERNETES = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
MANIFESTS = sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
ARCHES = ("amd64", "arm64")
# The oldest release whose API has every field used (securityContext.appArmorProfile), and
# the newest the validator knows.
VERSIONS = ("1.30.0", "1.37.0")
Object = dict[str, Any]


def documents() -> list[Object]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(kind: str, name: str) -> Object:
    found = [d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(workload: Object) -> Object:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: Object = containers[0]
    return result


def probe_files() -> set[str]:
    """The scripts kustomization.yaml makes into the ConfigMap every probe mount names."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    assert generator["name"] == "polyarch-probes"
    for workload in documents():
        if workload["kind"] in ("StatefulSet", "DaemonSet"):
            volumes = workload["spec"]["template"]["spec"]["volumes"]
            probes = next(v for v in volumes if v["name"] == "probes")
            assert probes["configMap"]["name"] == generator["name"]
    assert all((KUBERNETES / path).is_file() for path in generator["files"])
    return {Path(path).name for path in generator["files"]}


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def config_file(tmp_path: Path, configmap: str, key: str) -> Path:
    """A ConfigMap entry written out, as the pod sees it mounted."""
    path = tmp_path / key
    path.write_text(one("ConfigMap", configmap)["data"][key], encoding="utf-8")
    return path


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_passes_kubernetes_validate_strict(version: str) -> None:
    validator = Path(sys.prefix) / "bin" / "kubernetes-validate"
    assert validator.is_file(), "kubernetes-validate missing: pip install -e '.[dev]'"
    # --strict refuses any property the API does not define (a misspelt field fails).
    result = subprocess.run(
        [str(validator), "--strict", "--quiet", "-k", version, *map(str, MANIFESTS)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""  # --quiet: no warning either


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS]
    images = {image["name"] for image in kustomization["images"]}
    used = {container(d)["image"] for d in documents() if d["kind"] in ("StatefulSet", "DaemonSet")}
    assert used == images == {"polyarch-coordinator", "polyarch-agent"}


def test_coordinator_keeps_its_data_dir_on_the_persistent_volume(tmp_path: Path) -> None:
    statefulset = one("StatefulSet", "polyarch-coordinator")
    claims = {c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: Path(m["mountPath"]) for m in container(statefulset)["volumeMounts"]}
    args = container(statefulset)["args"]
    config_path = Path(args[args.index("--config") + 1])
    # The settings the coordinator will run with: the ConfigMap's TOML through the real
    # loader, the file mounted where --config says.
    assert mounts["config"] == config_path.parent
    parsed = argparse.Namespace(
        config=config_file(tmp_path, "polyarch-coordinator", config_path.name), limit=[]
    )
    config = config_from(parsed)
    assert "data" in claims
    assert config.data_dir.is_relative_to(mounts["data"])
    assert statefulset["spec"]["replicas"] == 1


def test_coordinator_service_exposes_the_configured_ports(tmp_path: Path) -> None:
    settings = read_config_file(config_file(tmp_path, "polyarch-coordinator", "coordinator.toml"))
    service = one("Service", "polyarch-coordinator")
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {
        "client": port_of(settings["listen"]),
        "agents": port_of(settings["agent_listen"]),
        "metrics": port_of(settings["metrics_listen"]),
    }
    declared = {
        p["name"]: p["containerPort"]
        for p in container(one("StatefulSet", "polyarch-coordinator"))["ports"]
    }
    assert declared == ports
    # Agents dial the Service by a name in the server certificate.
    agent = tomllib.loads(one("ConfigMap", "polyarch-agent")["data"]["agent.toml"])["agent"]
    host = agent["coordinator"].rpartition(":")[0]
    assert host.startswith("polyarch-coordinator.")
    assert host in settings["advertise"]
    assert port_of(agent["coordinator"]) == ports["client"]


def test_coordinator_probes_ask_the_public_health_service(tmp_path: Path) -> None:
    assert METHOD_ACCESS["/grpc.health.v1.Health/Check"] is Access.PUBLIC
    coordinator = container(one("StatefulSet", "polyarch-coordinator"))
    settings = read_config_file(config_file(tmp_path, "polyarch-coordinator", "coordinator.toml"))
    probes_mount = next(m for m in coordinator["volumeMounts"] if m["name"] == "probes")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        python, script, address, ca = coordinator[kind]["exec"]["command"]
        assert python == "/opt/polyarch/bin/python"
        assert Path(script).parent == Path(probes_mount["mountPath"])
        assert Path(script).name in probe_files()
        assert port_of(address) == port_of(settings["listen"])  # the client port
        assert Path(ca) == Path(settings["data_dir"]) / "tls" / "ca.pem"


def daemonset(arch: str) -> Object:
    return one("DaemonSet", f"polyarch-agent-{arch}")


@pytest.mark.parametrize("arch", ARCHES)
def test_agents_run_per_architecture_with_the_token_from_a_secret(arch: str) -> None:
    pod = daemonset(arch)["spec"]["template"]
    assert pod["spec"]["nodeSelector"]["kubernetes.io/arch"] == arch
    assert daemonset(arch)["spec"]["selector"]["matchLabels"]["polyarch.dev/arch"] == arch
    assert pod["metadata"]["labels"]["polyarch.dev/arch"] == arch
    env = {e["name"]: e for e in container(daemonset(arch))["env"]}
    assert env["POLYARCH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "polyarch-agent-token",
        "key": "token",
    }
    # No Secret ships with the manifests: its value is made by `polyarch token create`.
    assert not [d for d in documents() if d["kind"] == "Secret"]
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_the_two_daemonsets_differ_only_in_architecture() -> None:
    # Compared as objects (comments may differ), with each one's architecture blanked.
    amd64, arm64 = (json.dumps(daemonset(arch)).replace(arch, "ARCH") for arch in ARCHES)
    assert amd64 == arm64


@pytest.mark.parametrize("arch", ARCHES)
def test_agent_settings_load_and_probes_use_its_metrics_port(arch: str, tmp_path: Path) -> None:
    agent = container(daemonset(arch))
    args = [a.replace("$(NODE_NAME)", f"node-{arch}-1") for a in agent["args"]]
    assert args[0] == "agent"
    parser = argparse.ArgumentParser()
    add_agent_flags(parser)
    parser.add_argument("--replace", action="store_true")
    parsed, _ = parser.parse_known_args(args[1:])
    mounts = {m["name"]: Path(m["mountPath"]) for m in agent["volumeMounts"]}
    assert mounts["config"] == parsed.config.parent
    parsed.config = config_file(tmp_path, "polyarch-agent", parsed.config.name)
    config = agent_config_from(parsed)
    assert config.name == f"node-{arch}-1"
    assert config.builder == "buildah"
    # Identity, contexts and buildah storage on the pod's emptyDir, not its overlay root.
    assert config.workspace_dir().is_relative_to(mounts["work"])
    metrics_port = port_of(config.metrics_listen)
    assert {p["name"]: p["containerPort"] for p in agent["ports"]} == {"metrics": metrics_port}
    assert agent["livenessProbe"]["httpGet"]["port"] == "metrics"
    python, script, url = agent["readinessProbe"]["exec"]["command"]
    assert python == "/opt/polyarch/bin/python"
    assert Path(script).name in probe_files()
    assert url == f"http://127.0.0.1:{metrics_port}/metrics"


@pytest.mark.parametrize("arch", ARCHES)
def test_agent_privileges_are_the_rootless_buildah_minimum(arch: str) -> None:
    security = container(daemonset(arch))["securityContext"]
    assert security["privileged"] is False
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["SETUID", "SETGID"]}
    env = {e["name"]: e.get("value") for e in container(daemonset(arch))["env"]}
    assert env["BUILDAH_ISOLATION"] == "chroot"
    pod = daemonset(arch)["spec"]["template"]["spec"]
    assert not pod.get("hostNetwork") and not pod.get("hostPID")
    assert all("hostPath" not in v for v in pod["volumes"])


def test_every_workload_has_probes_and_resources() -> None:
    for workload in documents():
        if workload["kind"] not in ("StatefulSet", "DaemonSet"):
            continue
        spec = container(workload)
        assert "livenessProbe" in spec and "readinessProbe" in spec, workload["metadata"]
        assert spec["resources"]["requests"] and spec["resources"]["limits"]["memory"]
        assert workload["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
