"""Cache specs (buildx's --cache-from/--cache-to) and which builder honours which kind."""

from __future__ import annotations


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


# The cache kinds each builder honours, by direction ("from": import, "to": export).
# docker agents drive `docker build` (BuildKit without buildx): it imports image caches and
# exports only inline ones; buildah imports and exports registry repositories.
HONOURED = {
    ("docker", "from"): frozenset({"registry"}),
    ("docker", "to"): frozenset({"inline"}),
    ("buildah", "from"): frozenset({"registry"}),
    ("buildah", "to"): frozenset({"registry"}),
}


def cache_refusal(builder: str, direction: str, spec: str) -> str:
    """Why a `builder` agent cannot honour the cache spec ("" when it can, or when the builder
    is not one polyarch knows: its agent says so itself)."""
    kinds = HONOURED.get((builder, direction))
    if kinds is None:
        return ""
    kind = cache_type(spec)
    if kind not in kinds:
        return f"{builder} agents {'import' if direction == 'from' else 'export'} only " + (
            " and ".join(f"type={k}" for k in sorted(kinds)) + " caches"
        )
    if kind == "registry" and not cache_reference(spec):
        return "a registry cache needs ref=<repository>"
    return ""
