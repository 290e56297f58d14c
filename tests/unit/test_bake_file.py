"""Bake file resolution as buildx does it: groups, inherits, args, variables, --set, HCL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from polyarch.client.bake import REFUSED, bake_files, plan
from polyarch.client.bake_file import BakeFileError, load, parse_override, resolve
from polyarch.client.cli_common import UsageError


def bake(
    document: dict[str, Any],
    *names: str,
    sets: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The --print JSON of a JSON bake file."""
    config = load([("docker-bake.json", json.dumps(document))], env or {})
    overrides = [parse_override(spec) for spec in sets]
    return resolve(config, names, overrides, env or {}).to_json()


def targets(document: dict[str, Any], *names: str, **kwargs: Any) -> dict[str, Any]:
    result: dict[str, Any] = bake(document, *names, **kwargs)["target"]
    return result


FILE = {
    "group": {
        "default": {"targets": ["app", "tools"]},
        "tools": {"targets": ["cli", "debug"]},
        "all": {"targets": ["default", "extra"]},
    },
    "target": {
        "base": {
            "context": "src",
            "args": {"BASE": "busybox", "LEVEL": "1"},
            "platforms": ["linux/amd64", "linux/arm64"],
            "cache-from": ["type=registry,ref=r/cache"],
            "labels": {"team": "farm"},
        },
        "app": {"inherits": ["base"], "tags": ["r/app:1"], "args": {"LEVEL": "2"}},
        "cli": {"inherits": ["app"], "tags": ["r/cli:1"], "platforms": ["linux/arm64"]},
        "debug": {"inherits": ["base"], "tags": ["r/debug:1"], "dockerfile": "Dockerfile.debug"},
        "extra": {"tags": ["r/extra:1"], "platforms": ["linux/amd64"], "no-cache": True},
    },
}


def test_no_names_builds_the_default_group_and_nested_groups_expand() -> None:
    printed = bake(FILE)
    assert list(printed["target"]) == ["app", "cli", "debug"]
    assert printed["group"]["default"] == {"targets": ["app", "tools"]}
    assert printed["group"]["tools"] == {"targets": ["cli", "debug"]}
    # a group of groups, one of them the default group
    assert list(targets(FILE, "all")) == ["app", "cli", "debug", "extra"]


def test_named_targets_only_and_the_default_group_lists_them_sorted_as_buildx() -> None:
    printed = bake(FILE, "extra", "app", "app")
    assert list(printed["target"]) == ["extra", "app"]
    assert printed["group"] == {"default": {"targets": ["app", "extra"]}}
    assert list(targets(FILE, "d*")) == ["app", "cli", "debug"]  # default group by pattern


def test_inherits_chain_merges_maps_replaces_lists_and_keeps_defaults() -> None:
    resolved = targets(FILE, "cli", "debug")
    cli = resolved["cli"]
    # base -> app -> cli: args merged key by key, the nearest value wins
    assert cli["args"] == {"BASE": "busybox", "LEVEL": "2"}
    assert cli["labels"] == {"team": "farm"}
    assert cli["platforms"] == ["linux/arm64"]  # replaced, not appended
    assert cli["tags"] == ["r/cli:1"]
    assert cli["context"] == "src"
    assert cli["dockerfile"] == "Dockerfile"  # buildx's default
    assert cli["cache-from"] == ["type=registry,ref=r/cache"]
    assert "inherits" not in cli
    assert resolved["debug"]["dockerfile"] == "Dockerfile.debug"
    assert resolved["debug"]["args"] == {"BASE": "busybox", "LEVEL": "1"}
    assert targets(FILE, "extra")["extra"]["context"] == "."


def test_several_parents_merge_in_order_and_cache_from_appends() -> None:
    document = {
        "target": {
            "a": {"args": {"X": "a", "A": "1"}, "tags": ["r/a"], "cache-from": ["ca"]},
            "b": {"args": {"X": "b"}, "cache-from": ["cb"], "pull": True},
            "c": {"inherits": ["a", "b"], "args": {"C": None}, "cache-from": ["cc"]},
        }
    }
    c = targets(document, "c")["c"]
    assert c["args"] == {"X": "b", "A": "1"}  # a null arg keeps nothing, as buildx
    assert c["cache-from"] == ["ca", "cb", "cc"]
    assert c["tags"] == ["r/a"]
    assert c["pull"] is True


def test_unknown_targets_are_errors_naming_them() -> None:
    with pytest.raises(BakeFileError, match=r"unknown target 'nope' \(targets: app, base"):
        bake(FILE, "nope")
    document = {"group": {"default": {"targets": ["ghost"]}}, "target": {"a": {}}}
    with pytest.raises(BakeFileError, match=r"unknown target 'ghost' \(in group default\)"):
        bake(document)
    with pytest.raises(BakeFileError, match=r"unknown target 'gone' \(inherited by a\)"):
        bake({"target": {"a": {"inherits": ["gone"]}}}, "a")
    with pytest.raises(BakeFileError, match='no "default" group or target'):
        bake({"target": {"a": {}}})
    with pytest.raises(BakeFileError, match=r"could not find any target or group matching 'z\*'"):
        bake(FILE, "z*")


def test_cycles_are_errors_showing_the_loop() -> None:
    loop = {
        "target": {"a": {"inherits": ["b"]}, "b": {"inherits": ["c"]}, "c": {"inherits": ["a"]}}
    }
    with pytest.raises(BakeFileError, match=r"inherits cycle: a -> b -> c -> a"):
        bake(loop, "a")
    groups = {"group": {"g": {"targets": ["h"]}, "h": {"targets": ["g"]}}, "target": {}}
    with pytest.raises(BakeFileError, match=r"group cycle: g -> h -> g"):
        bake(groups, "g")
    # a group naming itself means the target of that name, as in buildx
    own = {"group": {"app": {"targets": ["app"]}}, "target": {"app": {"tags": ["r/a"]}}}
    assert list(targets(own, "app")) == ["app"]


def test_set_overrides_as_buildx() -> None:
    resolved = targets(
        FILE, "app", "cli",
        sets=("app.args.LEVEL=9", "*.platform=linux/arm/v7", "cli.tags=r/x:1", "cli.tags=r/y:1",
              "app.tags+=r/app:2", "app.no-cache=true", "base.labels.team=base", "app.args.HOME"),
        env={"HOME": "/home/ci"},
    )  # fmt: skip
    app, cli = resolved["app"], resolved["cli"]
    assert app["args"] == {"BASE": "busybox", "LEVEL": "9", "HOME": "/home/ci"}
    assert app["platforms"] == cli["platforms"] == ["linux/arm/v7"]
    assert app["tags"] == ["r/app:1", "r/app:2"]
    assert cli["tags"] == ["r/x:1", "r/y:1"]
    assert app["no-cache"] is True
    # an override of a parent reaches its children (buildx applies --set at every level)
    assert cli["labels"] == {"team": "base"}
    assert cli["args"]["LEVEL"] == "9"
    assert cli["no-cache"] is True
    # and not the other way round
    assert "HOME" in app["args"]
    assert targets(FILE, "base", sets=("app.args.LEVEL=9",))["base"]["args"]["LEVEL"] == "1"
    with pytest.raises(BakeFileError, match="unknown key"):
        bake(FILE, "app", sets=("app.bogus=1",))
    with pytest.raises(BakeFileError, match=r"expected TARGET\.KEY=VALUE"):
        parse_override("app=1")


def test_push_override_sets_the_outputs() -> None:
    document = {"target": {"a": {"output": ["type=registry"]}, "b": {}}}
    pushed = targets(document, "a", "b", sets=("*.push=false",))
    assert pushed["a"]["output"] == pushed["b"]["output"] == ["type=image,push=false"]
    assert targets(document, "b", sets=("b.push=true",))["b"]["output"] == ["type=image,push=true"]


def test_variables_interpolate_and_the_environment_overrides_them() -> None:
    document: dict[str, Any] = {
        "variable": {"TAG": {"default": "dev"}, "REPO": {"default": "r/${NAME}"},
                     "NAME": {"default": "app"}, "FRESH": {"default": False}},
        "target": {"app": {"tags": ["${REPO}:${TAG}", "$${literal}"], "no-cache": "${FRESH}"}},
    }  # fmt: skip
    app = targets(document, "app", env={"TAG": "1.4", "FRESH": "true"})["app"]
    assert app["tags"] == ["r/app:1.4", "${literal}"]
    assert app["no-cache"] is True
    assert targets(document, "app")["app"]["tags"][0] == "r/app:dev"
    document["target"]["app"]["tags"] = ["${lower(TAG)}"]
    with pytest.raises(BakeFileError, match=r"only variables can be used, not `lower\(TAG\)`"):
        bake(document, "app")


HCL = r"""
variable "TAG" {
  default = "dev"
}
group "default" {
  targets = ["app", "worker"]
}
target "_common" {
  args = {
    BASE = "busybox"
    "ITERATIONS" = 10
  }
  platforms = ["linux/amd64", "linux/arm64"]
}
// comments are fine
target "app" {
  inherits = ["_common"]
  tags = ["r/app:${TAG}", "r/app:quote\"d"]
  labels = { "org.opencontainers.image.title" = "app" }
  pull = true
}
target "worker" {
  inherits = ["_common"]
  tags = ["r/worker:${TAG}"]
  dockerfile-inline = <<EOT
FROM busybox
EOT
  contexts = { src = "../src" }
}
"""


def test_hcl_files_resolve_like_json_ones() -> None:
    config = load([("docker-bake.hcl", HCL)], {"TAG": "2.0"})
    printed = resolve(config, []).to_json()
    app, worker = printed["target"]["app"], printed["target"]["worker"]
    assert app["args"] == {"BASE": "busybox", "ITERATIONS": "10"}
    assert app["tags"] == ["r/app:2.0", 'r/app:quote"d']
    assert app["labels"] == {"org.opencontainers.image.title": "app"}
    assert app["pull"] is True
    assert app["platforms"] == ["linux/amd64", "linux/arm64"]
    assert worker["dockerfile-inline"].startswith("FROM busybox")
    assert worker["contexts"] == {"src": "../src"}
    with pytest.raises(BakeFileError, match=r"docker-bake\.hcl: not valid HCL"):
        load([("docker-bake.hcl", 'target "a" {')], {})


def test_a_later_file_merges_over_an_earlier_one() -> None:
    first = json.dumps({"target": {"a": {"tags": ["r/a:1"], "args": {"X": "1", "Y": "1"}}}})
    override = 'target "a" {\n  args = { Y = "2" }\n}\n'
    config = load([("docker-bake.json", first), ("docker-bake.override.hcl", override)], {})
    assert resolve(config, ["a"]).targets["a"]["args"] == {"X": "1", "Y": "2"}


def test_bad_attributes_are_errors_naming_the_target() -> None:
    with pytest.raises(BakeFileError, match="target a: platform: unknown attribute"):
        bake({"target": {"a": {"platform": ["linux/amd64"]}}}, "a")
    with pytest.raises(BakeFileError, match="target a: tags: expected a list"):
        bake({"target": {"a": {"tags": "r/a"}}}, "a")
    with pytest.raises(BakeFileError, match=r"target name 'a\.b'"):
        bake({"target": {"a.b": {}}}, "a")


# -- what the farm builds of a resolved target (client/bake.py) -----------------------------


def test_a_target_with_named_contexts_is_refused_naming_it() -> None:
    worker = resolve(load([("docker-bake.hcl", HCL)], {}), ["worker"]).targets["worker"]
    with pytest.raises(UsageError, match="target worker: named build contexts"):
        plan("worker", worker)
    assert "contexts" in REFUSED


def test_a_plan_normalises_tags_and_platforms_and_needs_both() -> None:
    app = resolve(load([("docker-bake.hcl", HCL)], {}), ["app"]).targets["app"]
    app["tags"] = ["r/app:dev", "127.0.0.1:5000/app"]
    planned = plan("app", app)
    assert planned.tags == ["docker.io/r/app:dev", "127.0.0.1:5000/app:latest"]
    assert planned.platforms == ["linux/amd64", "linux/arm64"]
    assert planned.publish is True
    with pytest.raises(UsageError, match="target app: no platforms"):
        plan("app", {**app, "platforms": []})
    with pytest.raises(UsageError, match="target app: no tags"):
        plan("app", {**app, "tags": []})
    with pytest.raises(UsageError, match=r"target app: .*remote contexts are not supported"):
        plan("app", {**app, "context": "https://github.com/x/y.git"})
    no_push = plan("app", {**app, "output": ["type=image,push=false"]})
    assert no_push.publish is False


def test_the_file_is_the_first_name_when_it_cannot_be_a_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert bake_files([], ["ci/docker-bake.json", "app"]) == (
        [Path("ci/docker-bake.json")],
        ["app"],
    )
    assert bake_files(["a.hcl"], ["b.hcl", "app"]) == ([Path("a.hcl")], ["b.hcl", "app"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="no bake file given"):
        bake_files([], ["app"])
    (tmp_path / "docker-bake.hcl").write_text("")
    (tmp_path / "docker-bake.override.json").write_text("{}")
    found = [Path("docker-bake.hcl"), Path("docker-bake.override.json")]
    assert bake_files([], ["app", "cli"]) == (found, ["app", "cli"])
