"""buildx's --output and --load for `polyarch build`: what the farm does with the result."""

from __future__ import annotations

from collections.abc import Sequence

# What is not there yet, and what to use meanwhile (said when refused).
_NOT_YET = {
    "docker": "no --load / type=docker yet: the image reaches no local Docker Engine",
    "oci": "no OCI layout tarball yet (type=oci)",
    "tar": "no filesystem tarball yet (type=tar)",
    "local": "no local filesystem export yet (type=local)",
    "cacheonly": "type=cacheonly is not supported",
}


class OutputError(ValueError):
    """An --output the farm cannot produce, named with the reason."""


def output_fields(spec: str) -> dict[str, str]:
    """`type=image,push=false` as fields; a bare `-` or path (buildx's local shorthand) is
    refused like type=local."""
    if "=" not in spec:
        return {"type": "local", "dest": spec}
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    return {key.strip(): value.strip() for key, value in fields.items()}


def publishes(outputs: Sequence[str], push: bool, load: bool) -> bool:
    """Whether the build publishes its tags; raises OutputError for outputs not there yet.

    As buildx: without --output and --load the result is pushed (polyarch's default);
    an explicit --output replaces that, and --push with it pushes as well.
    type=registry pushes; type=image pushes only with push=true; type=none builds,
    verifies and publishes nothing."""
    if load:
        raise OutputError(f"--load: {_NOT_YET['docker']}")
    if not outputs:
        return True
    publish = push
    for spec in outputs:
        fields = output_fields(spec)
        kind = fields.get("type", "")
        if kind in _NOT_YET:
            raise OutputError(f"--output {spec!r}: {_NOT_YET[kind]}")
        if kind == "registry":
            publish = True
        elif kind == "image":
            publish = publish or fields.get("push", "false").lower() == "true"
        elif kind != "none":
            raise OutputError(f"--output {spec!r}: unknown type {kind!r} (registry, image or none)")
    return publish


def push_override(outputs: Sequence[str], push: bool) -> list[str]:
    """buildx bake's `push` (`--push`, `--set T.push=B`) applied to a target's outputs: true
    makes image outputs push and adds one when none pushes; false drops registry outputs and
    stops image ones pushing, leaving `type=image,push=false` when nothing is left (polyarch
    pushes when no output is given)."""
    kept: list[str] = []
    for spec in outputs:
        fields = output_fields(spec)
        if fields.get("type") == "registry" and not push:
            continue
        if fields.get("type") == "image":
            fields["push"] = "true" if push else "false"
            spec = ",".join(f"{key}={value}" for key, value in fields.items())
        kept.append(spec)
    if push and all(output_fields(spec).get("type") == "docker" for spec in kept):
        kept.append("type=image,push=true")
    return kept or ["type=image,push=false"]
