"""`polyarch build`: buildx's flags, the submission, live progress, outputs and result files."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from polyarch.client import render
from polyarch.client.build_secrets import parse_secret, registries_of, registry_auths_for
from polyarch.client.buildx_flags import add_buildx_only_flags
from polyarch.client.cli_common import (
    EMULATION,
    EXIT_FAILED,
    Session,
    UsageError,
    client_of,
    err,
    pairs,
    platforms_of,
    validate_tags,
)
from polyarch.client.context_manifest import build_manifest
from polyarch.client.context_upload import send_context
from polyarch.client.exports import check_local_dest, engine_platform, write_export
from polyarch.client.outputs import Export, OutputError, docker_platform, plan_outputs
from polyarch.client.tty_render import TtyRenderer, progress_mode
from polyarch.client.upload_progress import Mode as UploadMode
from polyarch.client.upload_progress import UploadProgress
from polyarch.proto.attestations import DEFAULT_MODE, parse_provenance
from polyarch.proto.cosign import SigningKeyError, load_signing_key
from polyarch.proto.platforms import platform_from_uname
from polyarch.proto.v1 import build_pb2, common_pb2

BUILD_HELP = """\
Progress (context upload, per-platform state, build logs) goes to stderr; on
success the image index digest is the only line on stdout, so
`digest=$(polyarch build ...)` captures it. Exit 0 only when the build
succeeded; 1 when it failed (a summary names each platform's step and agent);
2 for input errors; 3 when the coordinator is unreachable. Reuse
--idempotency-key on CI retries to re-attach to the same build."""


def add_build_command(commands: Any, client: argparse.ArgumentParser) -> None:
    """Adds `polyarch build` (`client` carries the coordinator and credential flags)."""
    p = commands.add_parser(
        "build", parents=[client], help="build and push a multi-platform image",
        description="Build CONTEXT_DIR for every --platform on the farm and push one image index.",
        epilog=BUILD_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--platform", action="append", required=True, metavar="PLATFORMS",
                   help="comma-separated, repeatable: linux/amd64,linux/arm64")  # fmt: skip
    p.add_argument("-t", "--tag", action="append", metavar="[REG/]REPO[:TAG]",
                   help="repeatable, in any repositories; needed to push")  # fmt: skip
    p.add_argument("-f", "--file", metavar="DOCKERFILE", help="default: CONTEXT_DIR/Dockerfile")
    p.add_argument("--build-arg", action="append", metavar="KEY=VALUE")
    p.add_argument("--target")
    p.add_argument("--label", action="append", metavar="KEY=VALUE")
    p.add_argument("--emulation", choices=list(EMULATION), default="fallback")
    p.add_argument("--cache-from", action="append", metavar="SPEC")
    p.add_argument("--cache-to", action="append", metavar="SPEC")
    p.add_argument("--secret", action="append", metavar="id=ID,src=FILE|env=VAR",
                   help="a build secret for RUN --mount=type=secret (repeatable)")  # fmt: skip
    p.add_argument("--metadata-file", metavar="FILE", help="buildx-style JSON, on success")
    p.add_argument("--iidfile", metavar="FILE", help="write the image index digest, on success")
    p.add_argument("--push", action="store_true",
                   help="push the result (the default without --output)")  # fmt: skip
    p.add_argument("-o", "--output", action="append", metavar="type=TYPE[,KEY=VALUE]",
                   help="registry (push); image (push=false: build and verify, publish "
                   "nothing); none; oci,dest=FILE; docker[,dest=FILE]; tar,dest=FILE; "
                   "local,dest=DIR. Replaces the default push; repeatable")  # fmt: skip
    p.add_argument("--load", action="store_true",
                   help="load the image into Docker (DOCKER_HOST): its platform's")  # fmt: skip
    p.add_argument("--idempotency-key", metavar="KEY", help="default: a new UUID per run")
    p.add_argument("--progress", choices=["auto", "plain", "tty", "quiet", "rawjson"],
                   default="auto", help="plain: a line per change and log line, [platform] "
                   "first; tty: a live line per platform; auto: tty on a terminal, else plain; "
                   "rawjson: one JSON BuildEvent per line; quiet: nothing")  # fmt: skip
    p.add_argument("--no-cache", action="store_true", help="use no cached layer")
    p.add_argument("--annotation", action="append", metavar="TYPE[PLATFORMS]:KEY=VALUE",
                   help="on the index (index:) or its entries (manifest-descriptor:, "
                   "optionally [linux/arm64,...]); repeatable")  # fmt: skip
    p.add_argument("--pull", action="store_true", help="pull base images again")
    p.add_argument("--scan-command", metavar="'CMD {ref}'",
                   help="scan each platform image before the tags move, e.g. 'trivy image "
                   "--exit-code 1 --severity CRITICAL {ref}' (where the coordinator allows "
                   "it: --allow-build-scan-command)")  # fmt: skip
    p.add_argument("--provenance", default=DEFAULT_MODE, metavar="false|true|mode=min|mode=max",
                   help="SLSA provenance per platform, stored as BuildKit does (default: "
                   "mode=min, as buildx when pushing; max adds build args, secret-looking "
                   "ones redacted, and each platform's agent, mode and attempt)")  # fmt: skip
    p.add_argument("--sign-key", metavar="PEM",
                   help="sign the index digest, cosign's key-based format, before the tags "
                   "move: an unencrypted EC P-256 private key (PKCS#8 or SEC1), sent with "
                   "the submit and held in the coordinator's memory only")  # fmt: skip
    p.add_argument("--sign-with", choices=["farm"],
                   help="sign with the coordinator's own key (its --sign-key)")  # fmt: skip
    p.add_argument("-q", "--quiet", dest="progress", action="store_const", const="quiet",
                   help="as --progress quiet: only the index digest, on stdout")  # fmt: skip
    add_buildx_only_flags(p)
    p.add_argument("--cancel-on-interrupt", action="store_true",
                   help="on Ctrl-C cancel the build without asking")  # fmt: skip
    p.add_argument("context", metavar="CONTEXT_DIR")
    p.set_defaults(handler=cmd_build)


def read_sign_key(path: str | None, sign_with: str | None) -> bytes:
    """The PEM bytes of --sign-key, checked here first so a bad key fails before any upload
    (UsageError naming the file; the key's content never appears)."""
    if path and sign_with:
        raise UsageError("--sign-key and --sign-with farm: choose one key")
    if not path:
        return b""
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"--sign-key {path}: {exc.strerror}") from None
    try:
        load_signing_key(pem)
    except SigningKeyError as exc:
        raise UsageError(f"--sign-key {path}: {exc}") from None
    return pem


def cmd_build(args: argparse.Namespace, session: Session) -> int:
    platforms = [str(p) for p in platforms_of(args.platform, "--platform")]
    tags = validate_tags(args.tag or [])
    build_args = pairs(args.build_arg, "--build-arg", from_env=True)
    labels = pairs(args.label, "--label", from_env=False)
    quiet = args.progress in ("quiet", "rawjson")  # rawjson: nothing but the JSON lines
    secrets = dict(parse_secret(spec) for spec in args.secret or [])
    try:
        provenance = parse_provenance(args.provenance)
    except ValueError as exc:
        raise UsageError(f"--provenance: {exc}") from None
    sign_key = read_sign_key(args.sign_key, args.sign_with)
    registries = registries_of(tags, [*(args.cache_from or []), *(args.cache_to or [])])
    registry_auths = registry_auths_for(registries)
    try:
        plan = plan_outputs(args.output or [], args.push, args.load)
        exports = [(export, _export_platforms(export, platforms)) for export in plan.exports]
    except OutputError as exc:
        raise UsageError(str(exc)) from None
    publish = plan.publish
    if publish and not tags:
        raise UsageError(
            "no tag given: pushing needs -t registry/repository:tag (to build without "
            "pushing: --output type=image,push=false, type=oci, type=tar, type=local or --load)"
        )
    context = build_manifest(args.context, args.file)
    on_terminal = progress_mode(args.progress, sys.stderr) == "tty"
    upload_mode: UploadMode = "quiet" if quiet else "tty" if on_terminal else "plain"
    upload_progress = UploadProgress(sys.stderr, upload_mode)

    # one key for every attempt: a submit repeated after losing the coordinator (a restart,
    # a takeover) finds the build the first attempt made, if it was recorded
    idempotency_key = args.idempotency_key or str(uuid.uuid4())

    async def run() -> build_pb2.Build:
        async with client_of(args) as client:

            async def submit() -> build_pb2.SubmitBuildResponse:
                sent = await send_context(client, context, upload_progress)
                return await client.submit(
                    context_digest=sent.digest,
                    dockerfile=sent.dockerfile,
                    platforms=platforms,
                    tags=tags,
                    build_args=build_args,
                    target=args.target or "",
                    labels=labels,
                    emulation=EMULATION[args.emulation],
                    idempotency_key=idempotency_key,
                    cache_from=args.cache_from or [],
                    cache_to=args.cache_to or [],
                    registry_auths=registry_auths,
                    secrets=secrets,
                    no_cache=args.no_cache,
                    pull=args.pull,
                    annotations=args.annotation or [],
                    no_publish=not publish,
                    scan_command=args.scan_command or "",
                    provenance=provenance,
                    sign_key=sign_key,
                    sign_with=args.sign_with or "",
                )

            response = await client.retrying(submit, on_lost=err)
            session.build_id = response.build.id
            if not quiet:
                how = "attached to existing build" if response.existing else "submitted build"
                where = ", ".join(tags) or "no tag"
                err(f"{how} {response.build.id}: {', '.join(platforms)} -> {where}")
            if progress_mode(args.progress, sys.stderr) == "tty":  # auto: tty on a terminal
                tty = TtyRenderer(sys.stderr)
                async with tty.live():
                    build = await client.follow(response.build.id, tty.handle, on_lost=tty.note)
            else:
                progress = (
                    render.RawJsonRenderer(sys.stderr)
                    if args.progress == "rawjson"
                    else render.ProgressRenderer(sys.stderr, quiet=quiet)
                )
                build = await client.follow(response.build.id, progress.handle, on_lost=err)
            if build.state == common_pb2.BUILD_STATE_SUCCEEDED:
                for export, chosen in exports:
                    await write_export(
                        client, build.id, export, chosen, registry_auths,
                        (lambda line: None) if quiet else err,
                    )  # fmt: skip
            return build

    try:
        build = asyncio.run(run())
    except OutputError as exc:
        err(f"polyarch: error: {exc}")
        return EXIT_FAILED
    if build.state != common_pb2.BUILD_STATE_SUCCEEDED:
        err(*render.failure_summary(build))
        return EXIT_FAILED
    if not publish and not quiet:
        err(f"built and verified; no tag published (--output): the index would be "
             f"{build.index_digest}; the platforms' digests are in the metadata")  # fmt: skip
    code = 0
    outputs = [
        (
            args.metadata_file,
            json.dumps(render.build_metadata(build, args.coordinator), indent=2) + "\n",
        ),
        (args.iidfile, _image_id(build, exports, publish)),  # buildx: no newline
    ]
    for path, text in outputs:
        if not path:
            continue
        try:
            Path(path).write_text(text, encoding="utf-8")
        except OSError as exc:
            err(f"polyarch: error: cannot write {path}: {exc.strerror}")
            code = EXIT_FAILED
    if not plan.to_stdout:  # stdout carries an export's tar stream otherwise
        print(build.index_digest, flush=True)  # the last (and only) line on stdout
    return code


def _image_id(
    build: build_pb2.Build, exports: list[tuple[Export, list[str]]], publish: bool
) -> str:
    """What --iidfile holds, as buildx: the index digest, or for an unpushed Docker image
    (--load, type=docker) the image ID Docker shows, its config digest."""
    docker = [chosen[0] for export, chosen in exports if export.kind == "docker"]
    if publish or not docker:
        return build.index_digest
    return next((j.config_digest for j in build.jobs if j.platform == docker[0]), "")


def _export_platforms(export: Export, platforms: list[str]) -> list[str]:
    """Every platform, except for a Docker archive or --load: the one Docker can run.
    Checked before the build, so a flag that cannot work costs no build."""
    if export.kind == "local":
        check_local_dest(Path(export.dest))
    if export.kind != "docker":
        return []
    local = engine_platform() if export.loads else str(platform_from_uname(os.uname().machine))
    return [docker_platform(platforms, local)]
