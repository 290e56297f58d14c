"""deploy/kubernetes-ha/: the base with two coordinator pods, rendered by `kubectl kustomize`
(or tests/support/kustomize.py without kubectl), valid for the API, and wired for one active
coordinator: own names, shared contexts, the DSN from a Secret, readiness on the active one."""

from __future__ import annotations

import argparse
import base64
import functools
import json
import re
import secrets
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from polyarch.agent.config import add_agent_flags, agent_config_from
from polyarch.coordinator.config import CoordinatorConfig, add_coordinator_flags, config_from
from polyarch.proto.v1 import build_pb2
from tests.support.kustomize import build, kubectl_kustomize
from tests.unit.test_deploy_kubernetes import VERSIONS, container

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
BASE, HA = DEPLOY / "kubernetes", DEPLOY / "kubernetes-ha"
BUILD_SERVICE = build_pb2.DESCRIPTOR.services_by_name["BuildService"].full_name
Object = dict[str, Any]
Key = tuple[str, str]


def render(directory: Path) -> list[Object]:
    return kubectl_kustomize(directory) or build(directory)


@functools.cache
def rendered_json(directory: Path) -> str:
    return json.dumps(render(directory))


def objects(directory: Path = HA) -> dict[Key, Object]:
    """kind/name -> object (a fresh copy: tests may change theirs)."""
    return {(o["kind"], o["metadata"]["name"]): o for o in json.loads(rendered_json(directory))}


def one(kind: str, name: str) -> Object:
    return objects()[(kind, name)]


def statefulset() -> Object:
    return one("StatefulSet", "polyarch-coordinator")


def pods() -> list[str]:
    return [f"polyarch-coordinator-{n}" for n in range(statefulset()["spec"]["replicas"])]


def mounts() -> dict[str, Path]:
    return {m["name"]: Path(m["mountPath"]) for m in container(statefulset())["volumeMounts"]}


def volume_list() -> list[Object]:
    result: list[Object] = statefulset()["spec"]["template"]["spec"]["volumes"]
    return result


def volume(name: str) -> Object:
    (found,) = [v for v in volume_list() if v["name"] == name]
    result: Object = found
    return result


def flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} in {argv}"
    return argv[argv.index(name) + 1]


def coordinator_config(pod: str, tmp_path: Path) -> CoordinatorConfig:
    """Pod `pod`'s settings through the real loader: the ConfigMap's TOML, then its args with
    $(POD_NAME) as the kubelet expands it; the DSN Secret stands in as a file of our own."""
    spec = container(statefulset())
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in spec["env"]}
    assert env["POD_NAME"] == "metadata.name"
    argv = [a.replace("$(POD_NAME)", pod) for a in spec["args"]]
    assert argv[0] == "coordinator"
    parser = argparse.ArgumentParser()
    add_coordinator_flags(parser)
    args, _ = parser.parse_known_args(argv[1:])  # --context-dir: maybe not a flag yet
    args.limit = []
    assert args.config.parent == mounts()["config"]
    toml = tmp_path / f"{pod}.toml"
    toml.write_text(one("ConfigMap", "polyarch-coordinator")["data"][args.config.name])
    args.config = toml
    assert args.database_file.parent == mounts()["database"]
    dsn = tmp_path / f"{pod}.dsn"
    dsn.write_text("postgresql://polyarch:x@postgres.example/polyarch")
    args.database_file = dsn
    return config_from(args)


def test_kubectl_and_the_fallback_builder_render_alike() -> None:
    for directory in (BASE, HA):
        by_kubectl = kubectl_kustomize(directory)
        if by_kubectl is None:
            pytest.skip("no kubectl: the other tests check the fallback builder's rendering")
        ours = build(directory)
        text = json.dumps(by_kubectl)
        for generated in {o["metadata"]["name"] for o in ours if o["kind"] == "ConfigMap"}:
            text = re.sub(rf'"{generated}-[a-z0-9]{{10}}"', f'"{generated}"', text)
        keyed = {(o["kind"], o["metadata"]["name"]): o for o in json.loads(text)}
        assert keyed == {(o["kind"], o["metadata"]["name"]): o for o in ours}


@pytest.mark.parametrize("version", VERSIONS)
def test_the_rendered_overlay_passes_kubernetes_validate_strict(
    version: str, tmp_path: Path
) -> None:
    manifest = tmp_path / "ha.yaml"
    manifest.write_text(yaml.safe_dump_all(list(objects().values())))
    validator = Path(sys.prefix) / "bin" / "kubernetes-validate"
    result = subprocess.run(
        [str(validator), "--strict", "--quiet", "-k", version, str(manifest)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


def test_the_overlay_changes_only_the_coordinator_its_pods_service_and_the_agents_config() -> None:
    base, ha = objects(BASE), objects(HA)
    changed = {("StatefulSet", "polyarch-coordinator"), ("Service", "polyarch-coordinator-pods"),
               ("ConfigMap", "polyarch-agent")}  # fmt: skip
    added = {("PersistentVolumeClaim", "polyarch-contexts"),
             ("PodDisruptionBudget", "polyarch-coordinator")}  # fmt: skip
    assert set(ha) == set(base) | added
    assert all(ha[key] == base[key] for key in set(base) - changed)
    assert all(ha[key] != base[key] for key in changed)
    assert not [key for key in ha if key[0] == "Secret"]  # the DSN is the operator's


def test_two_coordinators_on_different_nodes_updated_by_hand() -> None:
    spec = statefulset()["spec"]
    assert spec["replicas"] == 2
    # a rolling update would wait forever for the standby to become Ready
    assert spec["updateStrategy"] == {"type": "OnDelete"}
    # pod 0 starts alone first (OrderedReady), so it makes the CA and the admin token
    assert spec.get("podManagementPolicy", "OrderedReady") == "OrderedReady"
    labels = spec["template"]["metadata"]["labels"]
    (term,) = spec["template"]["spec"]["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= labels.items()
    budget = one("PodDisruptionBudget", "polyarch-coordinator")["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert 0 < budget["minAvailable"] < spec["replicas"]


def test_each_pod_advertises_its_own_dns_name_which_resolves_when_not_ready(
    tmp_path: Path,
) -> None:
    governing = one("Service", statefulset()["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"
    assert governing["spec"]["publishNotReadyAddresses"] is True  # the standby's name too
    namespace = statefulset()["metadata"]["namespace"]
    names = []
    for pod in pods():
        advertised = coordinator_config(pod, tmp_path).advertise
        names.append(advertised[0])
        assert advertised[0] == f"{pod}.{governing['metadata']['name']}.{namespace}.svc"
        assert f"polyarch-coordinator.{namespace}.svc" in advertised  # the client Service
    assert len(set(names)) == 2


def test_the_database_comes_from_a_secret_and_contexts_from_a_shared_claim(
    tmp_path: Path,
) -> None:
    args = container(statefulset())["args"]
    assert "--database" not in args
    assert volume("database")["secret"]["secretName"] == "polyarch-database"
    assert volume("database")["secret"]["defaultMode"] == 0o440
    config = coordinator_config(pods()[0], tmp_path)
    claim = one("PersistentVolumeClaim", volume("contexts")["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    context_dir = Path(flag(args, "--context-dir"))
    assert context_dir.is_relative_to(mounts()["contexts"])
    # each pod's data dir on its own volume (a claim template), not on the shared one
    templates = {t["metadata"]["name"] for t in statefulset()["spec"]["volumeClaimTemplates"]}
    assert "data" in templates and "data" not in {v["name"] for v in volume_list()}
    assert config.data_dir.is_relative_to(mounts()["data"])
    assert not context_dir.is_relative_to(mounts()["data"])


def test_readiness_asks_for_the_build_service_and_liveness_for_the_process() -> None:
    spec = container(statefulset())
    readiness = spec["readinessProbe"]["exec"]["command"]
    assert flag(readiness, "--service") == BUILD_SERVICE  # SERVING on the active one only
    for kind in ("livenessProbe", "startupProbe"):  # a standby is alive: never restarted
        assert "--service" not in spec[kind]["exec"]["command"], kind
        assert spec[kind]["exec"]["command"][:2] == readiness[:2]  # the same script
    # the client Service routes to Ready pods only: the active one
    client = one("Service", "polyarch-coordinator")["spec"]
    assert not client.get("publishNotReadyAddresses")
    assert (
        client["selector"].items()
        <= statefulset()["spec"]["template"]["metadata"]["labels"].items()
    )


def agent_toml(directory: Path) -> Object:
    text = objects(directory)[("ConfigMap", "polyarch-agent")]["data"]["agent.toml"]
    result: Object = tomllib.loads(text)["agent"]
    return result


def test_agents_are_given_both_pods(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POLYARCH_COORDINATOR", raising=False)
    port = int(coordinator_config(pods()[0], tmp_path).listen.rpartition(":")[2])
    listed = agent_toml(HA)["coordinator"].split(",")
    assert listed == [f"{coordinator_config(p, tmp_path).advertise[0]}:{port}" for p in pods()]
    ha, base = agent_toml(HA), agent_toml(BASE)
    assert {k: v for k, v in ha.items() if k != "coordinator"} == {
        k: v for k, v in base.items() if k != "coordinator"
    }
    # each address, alone, loads through the real loader with the rest of the file
    config = tmp_path / "agent.toml"
    config.write_text(one("ConfigMap", "polyarch-agent")["data"]["agent.toml"])
    for address in listed:
        parser = argparse.ArgumentParser()
        add_agent_flags(parser)
        args = parser.parse_args(["--config", str(config), "--name", "node-1",
                                  "--coordinator", address])  # fmt: skip
        assert agent_config_from(args).coordinator == address


def test_no_password_reaches_the_rendered_manifests(tmp_path: Path) -> None:
    # The operator's database.dsn beside the kustomization, as the README's command has it:
    # nothing may pull it into the manifests (only `kubectl create secret` does).
    password = secrets.token_hex(16)
    dsn = f"postgresql://polyarch:{password}@postgres.example:5432/polyarch"
    for folder in (BASE, HA):
        shutil.copytree(folder, tmp_path / folder.name)
        (tmp_path / folder.name / "database.dsn").write_text(dsn + "\n")
    manifests = render(tmp_path / HA.name)
    text = json.dumps(manifests)
    assert "polyarch-database" in text
    assert password not in text + "\n".join(decoded(manifests))  # a Secret's data included
    spec = container(statefulset())
    assert not [e for e in spec["env"] if re.search("PASSWORD|DSN|DATABASE", e["name"])]


def decoded(node: Any) -> list[str]:
    """Every string in `node` that is base64 (a Secret's data, a ConfigMap's binaryData),
    decoded; kustomize wraps it in lines."""
    if isinstance(node, dict):
        return [text for value in node.values() for text in decoded(value)]
    if isinstance(node, list):
        return [text for value in node for text in decoded(value)]
    if isinstance(node, str):
        try:
            return [base64.b64decode("".join(node.split()), validate=True).decode()]
        except ValueError:  # binascii.Error and UnicodeDecodeError both are
            return []
    return []
