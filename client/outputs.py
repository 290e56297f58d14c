"""buildx's --output and --load for `polyarch build`: what the farm does with the result."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Exporters that write files on the client: type -> what `dest` is.
FILE_EXPORTS = {
    "oci": "FILE (an OCI layout tarball; - for stdout)",
    "tar": "FILE (the root filesystem as a tarball; - for stdout)",
    "local": "DIR (the root filesystem, unpacked)",
    "docker": "FILE (a `docker load` tarball; without dest, loaded into Docker)",
}


class OutputError(ValueError):
    """An --output the farm cannot produce, named with the reason."""


@dataclass(frozen=True)
class Export:
    """One file export: `kind` is a FILE_EXPORTS key; `dest` a path, "-" for stdout, or ""
    for type=docker into the local Docker Engine (--load)."""

    kind: str
    dest: str

    @property
    def loads(self) -> bool:
        return self.kind == "docker" and not self.dest


@dataclass(frozen=True)
class OutputPlan:
    """Whether the build publishes its tags, and what it writes on the client afterwards."""

    publish: bool
    exports: tuple[Export, ...] = ()

    @property
    def to_stdout(self) -> bool:
        return any(export.dest == "-" for export in self.exports)


def output_fields(spec: str) -> dict[str, str]:
    """`type=image,push=false` as fields; buildx's shorthands: a bare path is type=local,
    `-` is type=tar to stdout."""
    if spec == "-":
        return {"type": "tar", "dest": "-"}
    if "=" not in spec:
        return {"type": "local", "dest": spec}
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    return {key.strip(): value.strip() for key, value in fields.items()}


def plan_outputs(outputs: Sequence[str], push: bool, load: bool) -> OutputPlan:
    """What the flags ask for, as buildx reads them: without --output and --load the result
    is pushed (polyarch's default); an explicit --output or --load replaces that, and --push
    with them pushes as well. type=registry pushes; type=image only with push=true;
    type=none builds, verifies and publishes nothing; oci, tar, local and docker write files
    (or load into Docker) once the build has succeeded."""
    exports: list[Export] = [Export("docker", "")] if load else []
    if not outputs and not load:
        return OutputPlan(publish=True)
    publish = push
    for spec in outputs:
        fields = output_fields(spec)
        kind = fields.get("type", "")
        dest = fields.get("dest", "")
        if kind == "registry":
            publish = True
        elif kind == "image":
            publish = publish or fields.get("push", "false").lower() == "true"
        elif kind in FILE_EXPORTS:
            if not dest and kind != "docker":
                raise OutputError(f"--output {spec!r}: type={kind} needs dest={FILE_EXPORTS[kind]}")
            if kind == "local" and dest == "-":
                raise OutputError(f"--output {spec!r}: type=local needs a folder; use type=tar")
            exports.append(Export(kind, dest))
        elif not kind:
            raise OutputError(f"--output {spec!r}: type is required (as in buildx)")
        elif kind == "cacheonly":
            raise OutputError(f"--output {spec!r}: type=cacheonly is not supported")
        elif kind != "none":
            raise OutputError(
                f"--output {spec!r}: unknown type {kind!r} "
                "(registry, image, none, oci, docker, tar or local)"
            )
    if sum(export.dest == "-" for export in exports) > 1:
        raise OutputError("only one --output can write to stdout (dest=-)")
    if sum(export.loads for export in exports) > 1:
        raise OutputError("--load and --output type=docker without dest both load into Docker")
    return OutputPlan(publish, tuple(exports))


def docker_platform(built: Sequence[str], local: str) -> str:
    """The one platform a Docker archive or --load takes: the only one built, else the local
    machine's (or Docker Engine's) when it was built."""
    if len(built) == 1:
        return built[0]
    if local in built:
        return local
    raise OutputError(
        f"type=docker and --load take one platform: this build has {', '.join(built)}, and "
        f"none is the local one ({local}); build one platform, or use type=oci"
    )


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
