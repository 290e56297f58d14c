"""`polyarch bake`: every target of a bake file built on the farm at once, each reported by name."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from polyarch.client import bake_file, render
from polyarch.client.api import BuildClient, PolyarchError
from polyarch.client.bake_file import BakeFileError
from polyarch.client.build_secrets import parse_secret, registries_of, registry_auths_for
from polyarch.client.cli_common import EMULATION, EXIT_FAILED, UsageError, validate_tags
from polyarch.client.context import ContextError
from polyarch.client.context_manifest import ManifestContext, build_manifest
from polyarch.client.context_upload import SentContext, send_context
from polyarch.client.credentials import credentials_from_args
from polyarch.client.file_hashes import FileHashes, default_hashes
from polyarch.client.outputs import OutputError, plan_outputs
from polyarch.client.upload_progress import UploadProgress
from polyarch.proto.platforms import PlatformError, parse_platforms
from polyarch.proto.v1 import build_pb2, common_pb2

# Looked for in the working directory when no file is given (buildx also reads compose files).
DEFAULT_FILES = (
    "docker-bake.json", "docker-bake.hcl", "docker-bake.override.json", "docker-bake.override.hcl",
)  # fmt: skip
# What a target may say that the farm cannot do yet, and why (refused before anything is sent).
REFUSED = {
    "contexts": "named build contexts (contexts) are not supported: a farm build has one context",
    "ssh": "SSH agent forwarding (ssh) is not supported",
    "attest": "attestations (attest) are not supported",
    "network": "network modes (network) are not supported",
    "no-cache-filter": "no-cache-filter is not supported (no-cache is)",
    "shm-size": "shm-size is not supported",
    "ulimits": "ulimits are not supported",
    "entitlements": "entitlements are not supported",
    "extra-hosts": "extra-hosts is not supported",
    "call": "call (build checks, outline) is not supported",
}
_REMOTE = re.compile(r"^([a-z]+://|git@)|\.git(#.*)?$")
BAKE_HELP = """\
Targets are resolved as `docker buildx bake` resolves them (`--print` shows the result),
then all are submitted at once and share the fleet. Progress goes to stderr, each line
`[TARGET] ` first; stdout gets `TARGET DIGEST` for each target that succeeded. Exit 0 when
every target succeeded; 1 when one failed (each failed target is named; the others still
finish and are reported); 2 for input errors (nothing is submitted); 3 when the coordinator
is unreachable."""


@dataclass
class Plan:
    """One target as the farm builds it."""

    name: str
    attrs: dict[str, Any]
    platforms: list[str]
    tags: list[str]
    publish: bool
    secrets: dict[str, bytes]
    registry_auths: list[tuple[str, str, str]]
    context: ManifestContext | None = None
    # an inline Dockerfile's folder: its file is uploaded from there, so it goes at the end
    scratch: str | None = None
    build: build_pb2.Build | None = None
    error: str = ""
    build_id: str = ""

    @property
    def succeeded(self) -> bool:
        return self.build is not None and self.build.state == common_pb2.BUILD_STATE_SUCCEEDED


class TargetLines(io.StringIO):
    """A stream for one target's progress: each whole line goes on with `[TARGET] ` first
    (or, for rawjson, as the JSON event with a "target" key), so targets never interleave
    within a line."""

    def __init__(self, out: TextIO, target: str, as_json: bool = False) -> None:
        super().__init__()
        self.out, self.target, self.as_json = out, target, as_json
        self._pending = ""

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            if self.as_json:
                line = json.dumps(
                    {"target": self.target, **json.loads(line)}, separators=(",", ":")
                )
            else:
                line = f"[{self.target}] {line}"
            self.out.write(line + "\n")
        self.out.flush()
        return len(text)


def bake_files(files: list[str], names: list[str]) -> tuple[list[Path], list[str]]:
    """(files, targets): `-f` as buildx; else the first name, when it has a '.' or '/' (no
    target name has), is the file (`polyarch bake FILE [TARGET...]`); else the default files."""
    if not files and names and re.search(r"[./]", names[0]):
        files, names = [names[0]], names[1:]
    if files:
        return [Path(f) for f in files], names
    found = [Path(name) for name in DEFAULT_FILES if Path(name).is_file()]
    if not found:
        raise UsageError(f"no bake file given and none of {', '.join(DEFAULT_FILES)} here")
    return found, names


def resolve(args: argparse.Namespace) -> bake_file.Resolved:
    """The bake file(s) and --set (plus --push, --no-cache, --pull) resolved, or UsageError."""
    paths, names = bake_files(args.file or [], args.targets)
    texts = []
    for path in paths:
        try:
            text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot read bake file {path}: {exc.strerror}") from None
        texts.append((str(path), text))
    flags = {"push": args.push, "no-cache": args.no_cache, "pull": args.pull}
    implied = [f"*.{key}=true" for key, given in flags.items() if given]
    try:
        config = bake_file.load(texts, os.environ)
        overrides = [bake_file.parse_override(spec) for spec in [*implied, *(args.set or [])]]
        return bake_file.resolve(config, names, overrides, os.environ)
    except BakeFileError as exc:
        raise UsageError(str(exc)) from None


def plan(name: str, attrs: dict[str, Any]) -> Plan:
    """What the farm does for one resolved target; UsageError names the target and why not."""
    try:
        for key, why in REFUSED.items():
            if attrs.get(key):
                raise UsageError(why)
        context = attrs["context"].removeprefix("cwd://")
        if _REMOTE.search(context):
            raise UsageError(f"context {context!r}: remote contexts are not supported")
        if attrs["dockerfile"] == "-" or context == "-":
            raise UsageError("a context or Dockerfile from stdin is not allowed in bake")
        if not attrs.get("platforms"):
            raise UsageError("no platforms: set platforms (the farm has no default platform)")
        if not attrs.get("tags"):
            raise UsageError("no tags: the farm pushes by tag, even when it publishes nothing")
        platforms = [str(p) for p in parse_platforms(attrs["platforms"])]
        tags = validate_tags(attrs["tags"])
        outputs = plan_outputs(attrs.get("output", []), push=False, load=False)
        if outputs.exports:
            kinds = ", ".join(f"type={e.kind}" for e in outputs.exports)
            raise UsageError(f"{kinds}: file outputs are made by `polyarch build`, not bake yet")
        publish = outputs.publish
        secrets = dict(parse_secret(spec) for spec in attrs.get("secret", []))
        caches = [*attrs.get("cache-from", []), *attrs.get("cache-to", [])]
        auths = registry_auths_for(registries_of(tags, caches))
    except (UsageError, PlatformError, OutputError, ValueError) as exc:
        raise UsageError(f"target {name}: {exc}") from None
    return Plan(name, attrs, platforms, tags, publish, secrets, auths)


def _describe(target: Plan, hashes: FileHashes) -> tuple[ManifestContext, str | None]:
    """The target's context manifest, and the scratch folder of an inline Dockerfile (the
    file goes in through it, and is uploaded from it: the caller removes it at the end)."""
    attrs = target.attrs
    context = attrs["context"].removeprefix("cwd://")
    inline = attrs.get("dockerfile-inline")
    if inline is None:
        dockerfile = attrs["dockerfile"].removeprefix("cwd://")
        return build_manifest(context, os.path.join(context, dockerfile), hashes=hashes), None
    scratch = tempfile.mkdtemp(prefix="polyarch-bake-")
    try:
        path = Path(scratch) / "Dockerfile"
        path.write_text(inline, encoding="utf-8")
        return build_manifest(context, path, hashes=hashes), scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _context_key(attrs: dict[str, Any]) -> str:
    context = os.path.abspath(attrs["context"].removeprefix("cwd://"))
    return json.dumps([context, attrs["dockerfile"], attrs.get("dockerfile-inline")])


async def _describe_all(plans: list[Plan]) -> None:
    """Describes every context (one manifest per distinct context and Dockerfile) off the
    event loop; a context that cannot be read is bad input, named with its target."""
    hashes = default_hashes()  # one cache warning at most, however many contexts
    describing: dict[str, asyncio.Task[tuple[ManifestContext, str | None]]] = {}
    for target in plans:
        key = _context_key(target.attrs)
        if key not in describing:
            describing[key] = asyncio.create_task(asyncio.to_thread(_describe, target, hashes))
    await asyncio.wait(describing.values())
    failed: list[str] = []
    owners: set[str] = set()
    for target in plans:
        key = _context_key(target.attrs)
        task = describing[key]
        if task.exception() is None:
            target.context, scratch = task.result()
            if key not in owners:  # the first target sharing it removes the scratch folder
                owners.add(key)
                target.scratch = scratch
        else:
            failed.append(f"target {target.name}: {task.exception()}")
    if failed:
        raise UsageError("; ".join(failed))


@dataclass
class _Run:
    """One bake run against one coordinator: a channel shared by every target."""

    client: BuildClient
    args: argparse.Namespace
    out: TextIO
    uploads: dict[str, asyncio.Task[SentContext]] = field(default_factory=dict)

    async def target(self, target: Plan) -> None:
        """Uploads, submits and follows one target; its failure is recorded, not raised."""
        stream = TargetLines(self.out, target.name, as_json=self.args.progress == "rawjson")
        quiet = self.args.progress in ("quiet", "rawjson")
        context = target.context
        assert context is not None
        attrs = target.attrs
        try:
            if context.digest not in self.uploads:  # targets sharing a context send it once
                shown = UploadProgress(stream, "quiet" if quiet else "plain")
                upload = asyncio.create_task(send_context(self.client, context, shown))
                self.uploads[context.digest] = upload
            sent = await self.uploads[context.digest]
            key = self.args.idempotency_key
            response = await self.client.submit(
                context_digest=sent.digest,
                dockerfile=context.dockerfile,  # targets sharing a tree differ here
                platforms=target.platforms,
                tags=target.tags,
                build_args={k: v for k, v in attrs.get("args", {}).items() if v is not None},
                target=attrs.get("target", ""),
                labels=attrs.get("labels", {}),
                emulation=EMULATION[self.args.emulation],
                idempotency_key=f"{key}/{target.name}" if key else str(uuid.uuid4()),
                cache_from=attrs.get("cache-from", []),
                cache_to=attrs.get("cache-to", []),
                registry_auths=target.registry_auths,
                secrets=target.secrets,
                no_cache=attrs.get("no-cache", False),
                pull=attrs.get("pull", False),
                annotations=attrs.get("annotations", []),
                no_publish=not target.publish,
            )
            target.build_id = response.build.id
            if not quiet:
                how = "attached to existing build" if response.existing else "submitted build"
                stream.write(f"{how} {response.build.id}: {', '.join(target.platforms)} -> "
                             f"{', '.join(target.tags)}\n")  # fmt: skip
            progress = (
                render.RawJsonRenderer(stream)
                if self.args.progress == "rawjson"
                else render.ProgressRenderer(stream, quiet=quiet)
            )
            target.build = await self.client.follow(
                target.build_id, progress.handle, on_lost=lambda line: print(line, file=stream)
            )
        except (PolyarchError, ContextError) as exc:  # this target fails, others go on
            target.error = str(exc)


async def _run(args: argparse.Namespace, plans: list[Plan]) -> None:
    await _describe_all(plans)
    client = BuildClient(
        args.coordinator,
        connect_timeout=args.connect_timeout,
        credentials=credentials_from_args(args),
    )
    async with client:
        run = _Run(client, args, sys.stderr)
        async with asyncio.TaskGroup() as group:
            for target in plans:
                group.create_task(run.target(target), name=f"bake-{target.name}")


def report(plans: list[Plan], coordinator: str) -> tuple[list[str], dict[str, Any]]:
    """(stderr lines for the targets that failed, the metadata of those that succeeded)."""
    lines: list[str] = []
    metadata: dict[str, Any] = {}
    for target in plans:
        if target.succeeded:
            assert target.build is not None
            metadata[target.name] = render.build_metadata(target.build, coordinator)
        elif target.build is not None:
            lines.extend(f"[{target.name}] {line}" for line in render.failure_summary(target.build))
        else:
            lines.append(f"[{target.name}] not built: {target.error}")
    failed = [target.name for target in plans if not target.succeeded]
    if failed:
        lines.append(f"polyarch: error: {len(failed)} of {len(plans)} targets failed: "
                     f"{', '.join(failed)}")  # fmt: skip
    return lines, metadata


def cmd_bake(args: argparse.Namespace, session: object) -> int:
    resolved = resolve(args)
    if args.print:
        print(json.dumps(resolved.to_json(), indent=2), flush=True)
        return 0
    if args.load:
        raise UsageError("--load: no --load yet: the image reaches no local Docker Engine")
    plans = [plan(name, attrs) for name, attrs in resolved.targets.items()]
    try:
        asyncio.run(_run(args, plans))
    except KeyboardInterrupt:
        for target in plans:
            if target.build_id and target.build is None:
                print(f"interrupted: target {target.name}: build {target.build_id} continues on "
                      f"the coordinator; cancel with polyarch cancel {target.build_id}",
                      file=sys.stderr)  # fmt: skip
        raise
    finally:
        for target in plans:
            if target.scratch is not None:
                shutil.rmtree(target.scratch, ignore_errors=True)
    lines, metadata = report(plans, args.coordinator)
    for line in lines:
        print(line, file=sys.stderr, flush=True)
    code = EXIT_FAILED if lines else 0
    if args.metadata_file:
        try:
            Path(args.metadata_file).write_text(json.dumps(metadata, indent=2) + "\n")
        except OSError as exc:
            print(f"polyarch: error: cannot write {args.metadata_file}: {exc.strerror}",
                  file=sys.stderr)  # fmt: skip
            code = EXIT_FAILED
    for name, data in metadata.items():
        print(f"{name} {data['containerimage.digest']}", flush=True)
    return code


def add_bake_command(commands: Any, client: argparse.ArgumentParser) -> None:
    """Registers `polyarch bake` on the CLI's subcommands, with the client flags."""
    p = commands.add_parser(
        "bake", parents=[client], help="build the targets of a bake file at once",
        description="Build a docker-bake.json/.hcl file's targets (default: group \"default\") "
        "on the farm, all at once.", epilog=BAKE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("-f", "--file", action="append", metavar="FILE",
                   help="bake file (repeatable, merged in order; - for stdin)")  # fmt: skip
    p.add_argument("--set", action="append", metavar="TARGET.KEY=VALUE",
                   help="override an attribute, as buildx: *.platform=linux/arm64")  # fmt: skip
    p.add_argument("--print", action="store_true", help="print the resolved targets as JSON")
    p.add_argument("--push", action="store_true", help="shorthand for --set=*.push=true")
    p.add_argument("--no-cache", action="store_true", help="shorthand for --set=*.no-cache=true")
    p.add_argument("--pull", action="store_true", help="shorthand for --set=*.pull=true")
    p.add_argument("--load", action="store_true", help="not supported yet (refused)")
    p.add_argument("--metadata-file", metavar="FILE",
                   help="buildx bake's JSON: each target that succeeded, by name")  # fmt: skip
    p.add_argument("--progress", choices=["auto", "plain", "quiet", "rawjson"], default="auto")
    p.add_argument("--emulation", choices=list(EMULATION), default="fallback")
    p.add_argument("--idempotency-key", metavar="KEY", help="each target's key is KEY/TARGET")
    p.add_argument("targets", nargs="*", metavar="[FILE] TARGET",
                   help="targets or groups (default: default); FILE first when no -f")  # fmt: skip
    p.set_defaults(handler=cmd_bake)
