"""Cache specs (buildx's --cache-from/--cache-to): which builder honours which, as what flags.

The mapping, buildx spec -> what each backend runs (README.md, "Caches", says the same):

- `--cache-from type=registry,ref=R` (or a bare `R`): docker `--cache-from R`;
  buildah `--cache-from REPO(R)`.
- `--cache-to type=inline[,mode=min]`: docker `--build-arg BUILDKIT_INLINE_CACHE=1`;
  buildah refuses it.
- `--cache-to type=inline,mode=max`: refused by both.
- `--cache-to type=registry,ref=R[,mode=min|max]`: docker refuses it;
  buildah `--cache-to REPO(R)`.

REPO(R) is R's repository, normalised the Docker way, without its tag: buildah refuses a
tagged cache ref and tags each cache image itself by the step's content key, so caches of
any tag, and of every platform, share the repository without overwriting each other.
buildah pushes every step's layer of every stage, which is what mode=max asks; it has no
smaller export, so mode=min (buildx's default) gets that too. A docker agent's inline cache
holds the final image's layers only (mode=min). One spec per direction on buildah agents:
buildah 1.28 keeps only the last --cache-from/--cache-to it is given.
"""

from __future__ import annotations

from collections.abc import Sequence

from polyarch.proto.references import ReferenceError, parse_reference

CACHE_MODES = ("min", "max")


def cache_fields(spec: str) -> dict[str, str]:
    """The key=value fields of a spec; a bare reference is `type=registry,ref=<it>`."""
    if "=" not in spec:
        return {"type": "registry", "ref": spec}
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    fields.setdefault("type", "registry")
    return fields


def cache_reference(spec: str) -> str:
    """The image reference of a cache spec: `ref=` of `type=registry,ref=R`, or a bare ref."""
    return cache_fields(spec).get("ref", "")


def cache_type(spec: str) -> str:
    """The `type=` of a cache spec ("registry" for a bare reference)."""
    return cache_fields(spec)["type"]


def cache_mode(spec: str) -> str:
    """The `mode=` of a cache export ("min", buildx's default, when absent)."""
    return cache_fields(spec).get("mode", "min")


def cache_repository(spec: str) -> str:
    """REPO(R): the registry/repository of the spec's ref, normalised the Docker way, without
    its tag (what buildah takes). ReferenceError for a malformed ref or one with a digest."""
    ref = parse_reference(cache_reference(spec), default_tag=None)
    if ref.digest:
        raise ReferenceError(f"{cache_reference(spec)} names a digest: give a repository")
    return ref.repository_ref


# The cache kinds each builder honours, by direction ("from": import, "to": export).
# docker agents drive `docker build` (BuildKit without buildx): it imports image caches and
# exports only inline ones; buildah imports and exports registry repositories.
HONOURED = {
    ("docker", "from"): frozenset({"registry"}),
    ("docker", "to"): frozenset({"inline"}),
    ("buildah", "from"): frozenset({"registry"}),
    ("buildah", "to"): frozenset({"registry"}),
}

# The export modes each builder honours, by cache kind.
MODES = {
    ("docker", "inline"): frozenset({"min"}),
    ("buildah", "registry"): frozenset(CACHE_MODES),  # both run as max: see the module doc
}

_WHY_NOT_MODE = {
    ("docker", "inline", "max"): (
        "docker agents export only inline caches, which hold the final image's layers "
        "(mode=min); mode=max needs a registry cache exporter, which `docker build` "
        "without buildx lacks"
    ),
}


def cache_refusal(builder: str, direction: str, spec: str) -> str:
    """Why a `builder` agent cannot honour the cache spec ("" when it can, or when the builder
    is not one polyarch knows: its agent says so itself)."""
    kind = cache_type(spec)
    mode = cache_mode(spec)
    if direction == "to" and mode not in CACHE_MODES:
        return f"mode={mode} is not a cache mode: use mode=min or mode=max"
    kinds = HONOURED.get((builder, direction))
    if kinds is None:
        return ""
    if kind not in kinds:
        return f"{builder} agents {'import' if direction == 'from' else 'export'} only " + (
            " and ".join(f"type={k}" for k in sorted(kinds)) + " caches"
        )
    if direction == "to" and mode not in MODES.get((builder, kind), frozenset(CACHE_MODES)):
        why = _WHY_NOT_MODE.get((builder, kind, mode))
        return why or f"{builder} agents cannot export type={kind},mode={mode}"
    if kind == "registry" and not cache_reference(spec):
        return "a registry cache needs ref=<repository>"
    if builder == "buildah" and kind == "registry":
        try:
            cache_repository(spec)
        except ReferenceError as exc:
            return f"buildah agents need a cache repository: {exc}"
    return ""


def cache_count_refusal(builder: str, direction: str, specs: Sequence[str]) -> str:
    """Why a `builder` agent cannot take this many specs in one direction ("" when it can)."""
    if builder == "buildah" and len(specs) > 1:
        flag = "--cache-from" if direction == "from" else "--cache-to"
        return f"buildah agents take one {flag} (buildah keeps only the last it is given)"
    return ""


def docker_cache_args(
    cache_from: Sequence[str], cache_to: Sequence[str]
) -> tuple[list[str], dict[str, str], list[str]]:
    """A docker agent's `--cache-from` flags, the build args that export the cache, and notes
    on specs it skips (the coordinator refuses those at submit; an old one may not)."""
    argv: list[str] = []
    build_args: dict[str, str] = {}
    notes: list[str] = []
    for spec in cache_to:
        if cache_refusal("docker", "to", spec):
            notes.append(f"docker build without buildx cannot export cache {spec!r}; skipped")
        else:
            build_args["BUILDKIT_INLINE_CACHE"] = "1"
    for spec in cache_from:
        ref = cache_reference(spec)
        if ref and not cache_refusal("docker", "from", spec):
            argv += ["--cache-from", ref]
        else:
            notes.append(f"cache source {spec!r} names no image reference; skipped")
    return argv, build_args, notes


def buildah_cache_args(
    cache_from: Sequence[str], cache_to: Sequence[str]
) -> tuple[list[str], list[str]]:
    """A buildah agent's `--cache-from`/`--cache-to` flags and notes on what they do."""
    argv: list[str] = []
    notes: list[str] = []
    for flag, direction, specs in (("--cache-from", "from", cache_from),
                                   ("--cache-to", "to", cache_to)):  # fmt: skip
        for spec in specs:
            if cache_refusal("buildah", direction, spec):
                notes.append(f"buildah supports only registry caches; {spec!r} skipped")
                continue
            repository = cache_repository(spec)
            argv += [flag, repository]
            if direction == "to":
                notes.append(
                    f"cache {spec!r}: buildah pushes every step's layer to {repository} "
                    "(as mode=max), tagged by its cache key"
                )
    return argv, notes
