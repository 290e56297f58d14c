"""deploy/kubernetes*/ rendered as `kubectl kustomize` does, or, where kubectl is missing, by
a small builder of our own that knows only what those kustomizations use (and refuses the
rest): resources, namespace, configMapGenerator, images and JSON 6902 patches."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

Object = dict[str, Any]
# What the builder understands; anything else in a kustomization.yaml is refused, so a new
# feature there fails loudly here instead of rendering something else than kubectl would.
KNOWN_KEYS = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "images",
              "patches"}  # fmt: skip
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole",
                  "ClusterRoleBinding", "PriorityClass"}  # fmt: skip


class KustomizeError(Exception):
    """The kustomization uses something the builder does not know, or a patch did not apply."""


def kubectl_kustomize(directory: Path) -> list[Object] | None:
    """`kubectl kustomize DIR` parsed, or None without kubectl."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False,
        timeout=120,
    )  # fmt: skip
    if done.returncode != 0:
        raise KustomizeError(done.stderr.strip())
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def build(directory: Path) -> list[Object]:
    """The objects a kustomization makes; generated names keep no content hash."""
    kustomization: Object = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KNOWN_KEYS
    if unknown:
        raise KustomizeError(f"{directory}: not understood here: {sorted(unknown)}")
    objects: list[Object] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects += build(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for generator in kustomization.get("configMapGenerator", []):
        objects.append(_config_map(directory, generator))
    for patch in kustomization.get("patches", []):
        _apply_patch(directory, patch, objects)
    namespace = kustomization.get("namespace")
    for obj in objects:
        if namespace and obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = namespace
    for image in kustomization.get("images", []):
        for container in _containers(objects):
            if container["image"] == image["name"]:
                container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return objects


def _config_map(directory: Path, generator: Object) -> Object:
    if set(generator) - {"name", "files", "options"}:
        raise KustomizeError(f"configMapGenerator {generator['name']}: not understood here")
    data = {Path(f).name: (directory / f).read_text() for f in generator.get("files", [])}
    metadata: Object = {"name": generator["name"]}
    labels = generator.get("options", {}).get("labels")
    if labels:
        metadata["labels"] = dict(labels)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def _containers(objects: list[Object]) -> list[Object]:
    return [
        container
        for obj in objects
        if obj["kind"] in ("StatefulSet", "DaemonSet", "Deployment")
        for container in obj["spec"]["template"]["spec"]["containers"]
    ]


def _apply_patch(directory: Path, patch: Object, objects: list[Object]) -> None:
    target = patch.get("target", {})
    if set(target) - {"kind", "name"} or "path" not in patch:
        raise KustomizeError(f"patch {patch}: only a file and a kind/name target here")
    operations = yaml.safe_load((directory / patch["path"]).read_text())
    if not isinstance(operations, list):
        raise KustomizeError(f"{patch['path']}: only JSON 6902 patches (a list) here")
    matched = [o for o in objects if o["kind"] == target["kind"]
               and o["metadata"]["name"] == target["name"]]  # fmt: skip
    if not matched:
        raise KustomizeError(f"{patch['path']}: no {target['kind']}/{target['name']}")
    for obj in matched:
        for operation in operations:
            _operate(obj, operation, patch["path"])


def _operate(document: Object, operation: Object, where: str) -> None:
    """One RFC 6902 operation (add, replace, remove, test), in place."""
    op, path = operation["op"], operation["path"]
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
    node: Any = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    value = copy.deepcopy(operation.get("value"))
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if op == "add":
            node.insert(index, value)
            return
        if op == "test" and node[index] == value:
            return
        if op in ("replace", "remove") and index < len(node):
            node[index:index + 1] = [] if op == "remove" else [value]  # fmt: skip
            return
    else:
        if op == "add" or (op == "replace" and last in node):
            node[last] = value
            return
        if op == "remove" and last in node:
            del node[last]
            return
        if op == "test" and node.get(last) == value:
            return
    raise KustomizeError(f"{where}: {op} {path} does not apply")
