"""Bake files (docker-bake.json/.hcl) resolved as buildx does: groups, inherits, --set; pure."""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from polyarch.client.outputs import push_override

# Target attributes in the order `--print` shows them (buildx's Target struct), grouped by
# how `inherits`, a repeated block and a second file merge them (buildx bake.go Target.Merge).
ORDER = (
    "description", "annotations", "attest", "context", "contexts", "dockerfile",
    "dockerfile-inline", "args", "labels", "tags", "cache-from", "cache-to", "target",
    "secret", "ssh", "platforms", "output", "pull", "no-cache", "network", "no-cache-filter",
    "shm-size", "ulimits", "call", "entitlements", "extra-hosts",
)  # fmt: skip
STRINGS = {"description", "context", "dockerfile", "dockerfile-inline", "target", "network",
           "shm-size", "call"}  # fmt: skip
BOOLS = {"pull", "no-cache"}
MAPS = {"args", "labels", "contexts", "extra-hosts"}  # merged key by key; null keeps the parent's
APPENDED = {"annotations", "attest", "secret", "ssh", "cache-from", "no-cache-filter", "ulimits",
            "entitlements"}  # fmt: skip
LISTS = APPENDED | {"tags", "cache-to", "platforms", "output"}  # the others replace the parent's
# --set keys that name a list attribute, and the attribute when spelled differently
_SET_LISTS = {"platform": "platforms", "secrets": "secret"} | {k: k for k in LISTS}
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_TEMPLATE = re.compile(r"\$\$\{|%%\{|%\{|\$\{([^}]*)\}")
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}


class BakeFileError(ValueError):
    """A bake file, target name or --set that cannot be resolved; the message says which."""


@dataclass(frozen=True)
class _Expr:
    """An unquoted HCL expression; only a variable name is evaluated."""

    text: str


@dataclass
class BakeConfig:
    """Every group (name -> members) and target (name -> attributes, `inherits` unresolved)."""

    groups: dict[str, list[str]] = field(default_factory=dict)
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Resolved:
    """What `--print` shows and the runner builds: groups, and targets in request order."""

    groups: dict[str, list[str]]
    targets: dict[str, dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        """buildx bake --print's layout."""
        return {
            "group": {name: {"targets": members} for name, members in self.groups.items()},
            "target": self.targets,
        }


# -- reading -----------------------------------------------------------------------------------


def _unescape(text: str) -> str:
    """An HCL quoted string's escapes; `$${` and `%%{` stay for the template step."""

    def one(match: re.Match[str]) -> str:
        code = match[1]
        return chr(int(code[1:], 16)) if len(code) > 1 else _ESCAPES.get(code, code)

    return re.sub(r"\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", one, text, flags=re.DOTALL)


def _from_hcl(value: Any) -> Any:
    """python-hcl2's output (quotes kept) as JSON-like values; bare expressions as _Expr."""
    if isinstance(value, str):
        if len(value) >= 2 and value[0] == value[-1] == '"':
            return _unescape(value[1:-1])
        return _Expr(value)
    if isinstance(value, list):
        return [_from_hcl(item) for item in value]
    if isinstance(value, dict):
        return {_label(key): _from_hcl(item) for key, item in value.items()}
    return value


def _label(key: str) -> str:
    return key[1:-1] if len(key) >= 2 and key[0] == key[-1] == '"' else key


def _blocks(raw: Any, kind: str, file: str) -> list[tuple[str, Any]]:
    """(name, body) of every `kind` block: HCL gives a list of {label: body}, JSON one dict."""
    if raw is None:
        return []
    items = raw if isinstance(raw, list) else [raw]
    blocks: list[tuple[str, Any]] = []
    for item in items:
        if not isinstance(item, dict):
            raise BakeFileError(f"{file}: {kind}: expected blocks with a name")
        for name, body in item.items():
            if not isinstance(body, dict):
                raise BakeFileError(f"{file}: {kind} {name!r}: expected a block")
            blocks.append((_label(name), body))
    return blocks


def parse_file(name: str, text: str) -> dict[str, Any]:
    """One file as {"variable"|"group"|"target": [(name, body)], "attribute": {...}}.

    `.json` is JSON, `.hcl` HCL (python-hcl2); any other name is tried as JSON, then HCL."""
    data: Any = None
    if not name.endswith(".hcl"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            if name.endswith(".json"):
                raise BakeFileError(f"{name}: not valid JSON: {exc}") from None
    if data is None:
        import hcl2
        from hcl2.utils import SerializationOptions
        from lark.exceptions import LarkError

        options = SerializationOptions(
            with_comments=False, explicit_blocks=False, preserve_heredocs=False
        )
        try:
            data = _from_hcl(hcl2.loads(text, serialization_options=options))
        except (LarkError, ValueError) as exc:
            raise BakeFileError(f"{name}: not valid HCL: {exc}") from None
        if "function" in data:
            raise BakeFileError(f"{name}: HCL function blocks are not supported")
    if not isinstance(data, dict):
        raise BakeFileError(f"{name}: expected an object with group, target and variable")
    parsed: dict[str, Any] = {"attribute": {}, "variable": [], "group": [], "target": []}
    for key, value in data.items():
        if key in ("variable", "group", "target"):
            parsed[key] = _blocks(value, key, name)
        elif name.endswith(".json") or not isinstance(value, (str, int, float, bool, _Expr)):
            raise BakeFileError(f"{name}: unknown top-level key {key!r}")
        else:  # an HCL top-level attribute: a variable the environment cannot override
            parsed["attribute"][key] = value
    return parsed


# -- evaluating --------------------------------------------------------------------------------


class _Variables:
    """Variable values: the environment overrides a `variable` block's default (as buildx:
    a boolean default takes true/false, anything else the text); an HCL top-level
    attribute is fixed."""

    def __init__(self, declared: dict[str, tuple[Any, bool]], env: Mapping[str, str]) -> None:
        self.declared, self.env = declared, env
        self.values: dict[str, Any] = {}
        self._resolving: list[str] = []

    def get(self, name: str, where: str) -> Any:
        if name not in self.values:
            if name not in self.declared:
                raise BakeFileError(f"{where}: unknown variable {name!r}")
            if name in self._resolving:
                raise BakeFileError(f"variable cycle: {' -> '.join([*self._resolving, name])}")
            self._resolving.append(name)
            default, from_env = self.declared[name]
            value = self.evaluate(default, f"variable {name}")
            self._resolving.pop()
            if from_env and name in self.env:
                text = self.env[name]
                value = _boolean(text, f"${name}") if isinstance(value, bool) else text
            self.values[name] = value
        return self.values[name]

    def evaluate(self, value: Any, where: str) -> Any:
        if isinstance(value, _Expr):
            text = value.text.strip()
            if text.startswith("${") and text.endswith("}"):
                text = text[2:-1].strip()
            if not _IDENT.match(text):
                raise BakeFileError(f"{where}: only variables can be used, not `{value.text}`")
            return self.get(text, where)
        if isinstance(value, str):
            whole = _TEMPLATE.fullmatch(value)
            if whole is not None and whole[1] is not None:  # "${X}" keeps X's type
                return self.evaluate(_Expr(whole[1]), where)
            return _TEMPLATE.sub(lambda m: self._interpolate(m, where), value)
        if isinstance(value, list):
            return [self.evaluate(item, where) for item in value]
        if isinstance(value, dict):
            return {k: self.evaluate(v, f"{where}.{k}") for k, v in value.items()}
        return value

    def _interpolate(self, match: re.Match[str], where: str) -> str:
        token = match[0]
        if token in ("$${", "%%{"):
            return token[1:]
        if token == "%{":
            raise BakeFileError(f"{where}: template directives (%{{...}}) are not supported")
        return _text(self.evaluate(_Expr(match[1]), where), where)


def _boolean(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "false", "0"):
        return value.lower() in ("true", "1")
    raise BakeFileError(f"{where}: expected true or false, got {value!r}")


def _text(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise BakeFileError(f"{where}: expected a string, got {value!r}")


def _attributes(body: dict[str, Any], where: str, variables: _Variables) -> dict[str, Any]:
    """A target block's attributes, evaluated and checked: each key's type as buildx has it."""
    attrs: dict[str, Any] = {}
    for key, raw in body.items():
        at = f"{where}: {key}"
        if key in ("matrix", "name"):
            raise BakeFileError(f"{at}: matrix targets are not supported")
        if key != "inherits" and key not in ORDER:
            raise BakeFileError(f"{at}: unknown attribute")
        value = variables.evaluate(raw, at)
        if value is None:
            continue
        if key in STRINGS:
            attrs[key] = _text(value, at)
        elif key in BOOLS:
            attrs[key] = _boolean(value, at)
        elif key in MAPS:
            if not isinstance(value, dict):
                raise BakeFileError(f"{at}: expected a map of names to values")
            attrs[key] = {k: None if v is None else _text(v, f"{at}.{k}") for k, v in value.items()}
        else:  # inherits and the lists
            if not isinstance(value, list):
                raise BakeFileError(f"{at}: expected a list, got {value!r}")
            attrs[key] = [_text(item, at) for item in value if item is not None]
    return attrs


def merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    """buildx's Target.Merge: `other`'s attributes over `into`'s."""
    for key, value in other.items():
        if key in MAPS:
            known = into.setdefault(key, {})
            known.update({k: v for k, v in value.items() if v is not None or k not in known})
        elif key in APPENDED or key == "inherits":
            into[key] = [*into.get(key, []), *value]
        else:
            into[key] = value


def load(files: Sequence[tuple[str, str]], env: Mapping[str, str]) -> BakeConfig:
    """Files (name, text) merged in order, as buildx merges several `-f`: a later target of
    the same name merges over the earlier; a later group adds its members."""
    parsed = [parse_file(name, text) for name, text in files]
    declared: dict[str, tuple[Any, bool]] = {}
    for data in parsed:
        declared.update((name, (value, False)) for name, value in data["attribute"].items())
        declared.update((name, (body.get("default", ""), True)) for name, body in data["variable"])
    variables = _Variables(declared, env)
    config = BakeConfig()
    for data in parsed:
        for name, body in data["group"]:
            _check_name(name, "group")
            members = variables.evaluate(body.get("targets", []), f"group {name}: targets")
            if not isinstance(members, list):
                raise BakeFileError(f"group {name}: targets: expected a list")
            known = config.groups.setdefault(name, [])
            known.extend(str(m) for m in members if str(m) not in known)
        for name, body in data["target"]:
            _check_name(name, "target")
            merge(
                config.targets.setdefault(name, {}), _attributes(body, f"target {name}", variables)
            )
    return config


def _check_name(name: str, kind: str) -> None:
    if not _NAME.match(name):
        raise BakeFileError(f"{kind} name {name!r}: only letters, digits, '_' and '-' are allowed")


# -- resolving ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Override:
    """One `--set PATTERN.KEY[+]=VALUE` (VALUE None: `--set t.args.X` takes $X)."""

    pattern: str
    key: str
    value: str | None
    append: bool = False


def parse_override(spec: str) -> Override:
    """buildx's `--set`: `target.key=value`, `*.platform=...`, `t.args.NAME=...`, `t.tags+=...`."""
    left, sep, value = spec.partition("=")
    append = left.endswith("+")
    pattern, dot, key = left.removesuffix("+").partition(".")
    if not dot or not pattern or not key:
        raise BakeFileError(f"--set {spec!r}: expected TARGET.KEY=VALUE")
    if not sep and not key.startswith("args."):
        raise BakeFileError(f"--set {spec!r}: expected TARGET.KEY=VALUE")
    return Override(pattern, key, value if sep else None, append)


def _matching(names: Sequence[str], pattern: str, what: str) -> list[str]:
    if pattern in names:
        return [pattern]
    found = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
    if not found:
        raise BakeFileError(f"could not find any {what} matching {pattern!r}")
    return found


def _apply(attrs: dict[str, Any], overrides: Sequence[Override], env: Mapping[str, str]) -> None:
    """buildx's AddOverrides: one target's --set values, several of one list key together."""
    lists: dict[str, list[str]] = {}
    for o in overrides:
        key, _, sub = o.key.partition(".")
        where = f"--set {o.pattern}.{o.key}"
        if key in MAPS and sub:
            value = o.value if o.value is not None else env.get(sub)
            if value is not None:
                attrs.setdefault(key, {})[sub] = value
        elif o.value is None or sub:
            raise BakeFileError(f"{where}: unknown key")
        elif key in _SET_LISTS:
            name = _SET_LISTS[key]
            if name not in lists:
                lists[name] = attrs.get(name, []) if o.append or name == "annotations" else []
            lists[name] = [*lists[name], o.value]
        elif key in BOOLS:
            attrs[key] = _boolean(o.value, where)
        elif key == "push":
            attrs["output"] = push_override(attrs.get("output", []), _boolean(o.value, where))
        elif key in STRINGS - {"description", "dockerfile-inline"}:
            attrs[key] = o.value
        else:
            raise BakeFileError(f"{where}: unknown key (or not supported by polyarch bake)")
    attrs.update(lists)


def _dedup(items: list[str]) -> list[str]:
    return [item for i, item in enumerate(items) if item and item not in items[:i]]


class _Resolver:
    def __init__(
        self, config: BakeConfig, overrides: Sequence[Override], env: Mapping[str, str]
    ) -> None:
        self.config, self.env = config, env
        self.overrides: dict[str, list[Override]] = {}
        for override in overrides:
            for name in _matching(list(config.targets), override.pattern, "target"):
                self.overrides.setdefault(name, []).append(override)

    def group(self, name: str, path: tuple[str, ...]) -> tuple[list[str], list[str]]:
        """(targets, groups) a name stands for; a name that is no group is a target."""
        if name not in self.config.groups or name in path[-1:]:
            return [name], []
        if name in path:
            raise BakeFileError(f"group cycle: {' -> '.join([*path, name])}")
        targets: list[str] = []
        groups = [name]
        for member in self.config.groups[name]:
            more_targets, more_groups = self.group(member, (*path, name))
            targets.extend(t for t in more_targets if t not in targets)
            groups.extend(g for g in more_groups if g not in groups)
        return targets, groups

    def target(self, name: str, path: tuple[str, ...], parent: str) -> dict[str, Any]:
        """buildx's Config.target: parents merged in order, then the target, then its --set."""
        if name in path:
            raise BakeFileError(f"inherits cycle: {' -> '.join([*path, name])}")
        if name not in self.config.targets:
            known = ", ".join(sorted(self.config.targets)) or "none"
            raise BakeFileError(f"unknown target {name!r}{parent} (targets: {known})")
        own = self.config.targets[name]
        attrs: dict[str, Any] = {}
        for ancestor in own.get("inherits", []):
            merge(attrs, self.target(ancestor, (*path, name), f" (inherited by {name})"))
        merge(attrs, {k: v for k, v in own.items() if k != "inherits"})
        _apply(attrs, self.overrides.get(name, []), self.env)
        return attrs


def _finished(attrs: dict[str, Any]) -> dict[str, Any]:
    """Defaults (context ".", dockerfile "Dockerfile"), duplicates and nulls out, print order."""
    attrs = dict(attrs, context=attrs.get("context") or ".")
    attrs["dockerfile"] = attrs.get("dockerfile") or "Dockerfile"
    for key in MAPS:
        drop = (None, "") if key == "contexts" else (None,)
        attrs[key] = {k: v for k, v in attrs.get(key, {}).items() if v not in drop}
    for key in LISTS:
        attrs[key] = _dedup(attrs.get(key, []))
    return {key: attrs[key] for key in ORDER if key in attrs and attrs[key] not in ([], {})}


def resolve(
    config: BakeConfig,
    names: Sequence[str],
    overrides: Sequence[Override] = (),
    env: Mapping[str, str] | None = None,
) -> Resolved:
    """The targets that `names` (groups, targets, glob patterns; none: "default") stand for,
    each with its inherits and --set applied, as buildx bake resolves them."""
    resolver = _Resolver(config, overrides, env or {})
    requested: list[str] = []
    for name in names or ["default"]:
        if not any(c in name for c in "*?[]"):
            requested.append(name)
            continue
        requested.extend(_matching([*config.groups, *config.targets], name, "target or group"))
    groups: dict[str, list[str]] = {}
    targets: dict[str, dict[str, Any]] = {}
    for name in requested:
        if name == "default" and name not in config.groups and name not in config.targets:
            raise BakeFileError('no target given and the file has no "default" group or target')
        members, in_groups = resolver.group(name, ())
        for member in members:
            if member not in targets:
                parent = f" (in group {name})" if member != name else ""
                targets[member] = _finished(resolver.target(member, (), parent))
        groups.update((g, list(config.groups[g])) for g in in_groups)
    default = groups.setdefault("default", [])  # buildx: the requested names, sorted
    default.extend(n for n in requested if n != "default" or "default" not in config.groups)
    groups["default"] = sorted(set(default))
    return Resolved(groups, targets)
