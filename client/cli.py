"""The `polyarch` command: run a coordinator or an agent, build multi-arch images, inspect the farm.

Exit codes: 0 success; 1 the build failed or was cancelled, or the coordinator
refused a request; 2 usage or input errors (flags, platforms, tags, context,
Dockerfile); 3 the coordinator is unreachable; 130 interrupted (a submitted
build keeps running on the coordinator).
"""

from __future__ import annotations

import os

# gRPC core logs TLS handshake failures at info level on stderr; the CLI explains them itself.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import asyncio
import importlib
import json
import re
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from polyarch.agent.config import add_agent_flags, agent_config_from
from polyarch.client import render
from polyarch.client.api import (
    COORDINATOR_ENV,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_COORDINATOR,
    BuildClient,
    CoordinatorUnreachable,
    PolyarchError,
)
from polyarch.client.build_secrets import (
    SecretSpecError,
    parse_secret,
    registries_of,
    registry_auths_for,
)
from polyarch.client.buildx_flags import add_buildx_only_flags
from polyarch.client.context import ContextError, pack_context
from polyarch.client.credentials import (
    CredentialsError,
    add_credential_flags,
    credentials_from_args,
)
from polyarch.client.dockerignore import DockerignoreError
from polyarch.client.exports import check_local_dest, engine_platform, write_export
from polyarch.client.outputs import Export, OutputError, docker_platform, plan_outputs
from polyarch.client.tty_render import TtyRenderer, progress_mode
from polyarch.coordinator.config import add_coordinator_flags
from polyarch.ops.deploy_cli import add_deploy_command
from polyarch.ops.wheelhouse import add_wheelhouse_command
from polyarch.proto.config_files import ConfigError
from polyarch.proto.platforms import (
    Platform,
    PlatformError,
    parse_platforms,
    platform_from_uname,
)
from polyarch.proto.references import ReferenceError, parse_reference
from polyarch.proto.registries import polyarch_version
from polyarch.proto.v1 import build_pb2, common_pb2, trust_pb2

_T = TypeVar("_T")
EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 1, 2, 3, 130
EMULATION = {
    "fallback": common_pb2.EMULATION_POLICY_FALLBACK,
    "never": common_pb2.EMULATION_POLICY_NEVER,
    "allow": common_pb2.EMULATION_POLICY_ALLOW,
}
BUILD_HELP = """\
Progress (context upload, per-platform state, build logs) goes to stderr; on
success the image index digest is the only line on stdout, so
`digest=$(polyarch build ...)` captures it. Exit 0 only when the build
succeeded; 1 when it failed (a summary names each platform's step and agent);
2 for input errors; 3 when the coordinator is unreachable. Reuse
--idempotency-key on CI retries to re-attach to the same build."""


class UsageError(Exception):
    """Bad flags or input; printed as `polyarch: error: ...` with exit code 2."""


@dataclass
class _Session:
    """What an interrupted command needs to say where it left off."""

    build_id: str | None = None


def _err(*lines: str) -> None:
    for line in lines:
        print(line, file=sys.stderr, flush=True)


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _platforms(values: list[str] | None, flag: str) -> list[Platform]:
    if not values:
        return []
    try:
        return parse_platforms(values)
    except PlatformError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def validate_tags(tags: Sequence[str]) -> list[str]:
    """Normalises every tag the Docker way (`app` -> docker.io/library/app:latest); returns
    them in full. Tags may name several repositories: the first is where agents push."""
    result: list[str] = []
    for tag in tags:
        if "@" in tag:
            raise UsageError(f"tag {tag!r}: give a tag, not a digest (registry/repository:tag)")
        try:
            # the coordinator parses tags the same way (proto.references), so what passes
            # here passes there
            ref = parse_reference(tag)
        except ReferenceError as exc:
            raise UsageError(f"invalid tag {tag!r}: {exc}") from None
        full = f"{ref.repository_ref}:{ref.tag}"
        if full not in result:
            result.append(full)
    return result


def _pairs(values: list[str] | None, flag: str, from_env: bool) -> dict[str, str]:
    """K=V flags; a bare K takes $K (build args, dropped when unset) or '' (labels)."""
    pairs: dict[str, str] = {}
    for value in values or []:
        key, sep, val = value.partition("=")
        if not key:
            raise UsageError(f"{flag} {value!r}: expected KEY=VALUE")
        if sep:
            pairs[key] = val
        elif not from_env:
            pairs[key] = ""
        elif key in os.environ:
            pairs[key] = os.environ[key]
    return pairs


def _client(args: argparse.Namespace) -> BuildClient:
    return BuildClient(
        args.coordinator,
        connect_timeout=args.connect_timeout,
        credentials=credentials_from_args(args),
    )


_TTL = re.compile(r"^(\d+)([smhd]?)$")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _ttl(text: str) -> int:
    match = _TTL.match(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a duration like 3600, 90m, 24h or 7d: {text!r}")
    return int(match[1]) * _TTL_UNITS[match[2]]


# -- build -------------------------------------------------------------------------------------


def cmd_build(args: argparse.Namespace, session: _Session) -> int:
    platforms = [str(p) for p in _platforms(args.platform, "--platform")]
    tags = validate_tags(args.tag or [])
    build_args = _pairs(args.build_arg, "--build-arg", from_env=True)
    labels = _pairs(args.label, "--label", from_env=False)
    quiet = args.progress in ("quiet", "rawjson")  # rawjson: nothing but the JSON lines
    secrets = dict(parse_secret(spec) for spec in args.secret or [])
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
    packed = pack_context(args.context, args.file)

    async def run() -> build_pb2.Build:
        async with _client(args) as client:
            uploaded = await client.upload_context(packed)
            if not quiet:
                where = "uploaded" if uploaded else "already on coordinator"
                _err(f"context {packed.digest} ({packed.size} bytes) {where}")
            response = await client.submit(
                context_digest=packed.digest,
                dockerfile=packed.dockerfile,
                platforms=platforms,
                tags=tags,
                build_args=build_args,
                target=args.target or "",
                labels=labels,
                emulation=EMULATION[args.emulation],
                idempotency_key=args.idempotency_key or str(uuid.uuid4()),
                cache_from=args.cache_from or [],
                cache_to=args.cache_to or [],
                registry_auths=registry_auths,
                secrets=secrets,
                no_cache=args.no_cache,
                pull=args.pull,
                annotations=args.annotation or [],
                no_publish=not publish,
            )
            session.build_id = response.build.id
            if not quiet:
                how = "attached to existing build" if response.existing else "submitted build"
                where = ", ".join(tags) or "no tag"
                _err(f"{how} {response.build.id}: {', '.join(platforms)} -> {where}")
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
                build = await client.follow(response.build.id, progress.handle, on_lost=_err)
            if build.state == common_pb2.BUILD_STATE_SUCCEEDED:
                for export, chosen in exports:
                    await write_export(
                        client, build.id, export, chosen, registry_auths,
                        (lambda line: None) if quiet else _err,
                    )  # fmt: skip
            return build

    try:
        build = asyncio.run(run())
    except OutputError as exc:
        _err(f"polyarch: error: {exc}")
        return EXIT_FAILED
    finally:
        packed.discard()
    if build.state != common_pb2.BUILD_STATE_SUCCEEDED:
        _err(*render.failure_summary(build))
        return EXIT_FAILED
    if not publish and not quiet:
        _err(f"built and verified; no tag published (--output): the index would be "
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
            _err(f"polyarch: error: cannot write {path}: {exc.strerror}")
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


# -- fleet and build inspection ----------------------------------------------------------------


def _ask(args: argparse.Namespace, call: Callable[[BuildClient], Awaitable[_T]]) -> _T:
    """Runs one request against the coordinator named by --coordinator."""

    async def run() -> _T:
        async with _client(args) as client:
            return await call(client)

    return asyncio.run(run())


def cmd_agents(args: argparse.Namespace, session: _Session) -> int:
    agents = _ask(args, lambda client: client.list_agents())
    if args.json:
        print(json.dumps([render.agent_to_dict(a) for a in agents], indent=2))
    else:
        print("\n".join(render.agents_table(agents)))
    return 0


def cmd_builds(args: argparse.Namespace, session: _Session) -> int:
    builds = _ask(args, lambda client: client.list_builds(args.limit))
    if args.json:
        print(json.dumps([render.build_to_dict(b) for b in builds], indent=2))
    else:
        print("\n".join(render.builds_table(builds)))
    return 0


def cmd_cancel(args: argparse.Namespace, session: _Session) -> int:
    reason = "cancelled with polyarch cancel"
    build = _ask(args, lambda client: client.cancel_build(args.build_id, reason))
    print(f"build {build.id}: {render.build_state(build.state)}")
    return 0


def cmd_drain(args: argparse.Namespace, session: _Session) -> int:
    drain = args.command == "drain"
    agent = _ask(
        args,
        lambda client: (
            client.drain_agent(args.agent) if drain else client.undrain_agent(args.agent)
        ),
    )
    print(f"agent {agent.name}: {render.agent_state(agent.state)}")
    return 0


def cmd_revoke_agent(args: argparse.Namespace, session: _Session) -> int:
    if _ask(args, lambda client: client.revoke_enrolment(args.agent)):
        print(f"agent {args.agent}: enrolment revoked; its certificate is refused from now on")
        return 0
    _err(f"polyarch: agent {args.agent} is not enrolled")
    return EXIT_FAILED


# -- tokens ------------------------------------------------------------------------------------

TOKEN_ROLES = {
    "read": trust_pb2.TOKEN_ROLE_READ,
    "ci": trust_pb2.TOKEN_ROLE_CI,
    "admin": trust_pb2.TOKEN_ROLE_ADMIN,
    "agent": trust_pb2.TOKEN_ROLE_AGENT,
}


def cmd_token(args: argparse.Namespace, session: _Session) -> int:
    if args.token_command == "create":
        created = _ask(
            args,
            lambda client: client.create_token(
                TOKEN_ROLES[args.role], args.ttl, args.description or ""
            ),
        )
        _err(f"token {created.token.id} ({args.role}) created; it is shown once:")
        print(created.token_text, flush=True)
    elif args.token_command == "list":
        tokens = _ask(args, lambda client: client.list_tokens())
        if args.json:
            print(json.dumps([render.token_to_dict(t) for t in tokens], indent=2))
        else:
            print("\n".join(render.tokens_table(tokens)))
    else:
        revoked = _ask(args, lambda client: client.revoke_token(args.id))
        print(f"token {revoked.id}: revoked")
    return 0


# -- servers (implemented by the coordinator and agent packages) --------------------------------


def _entry_point(module: str, name: str) -> Callable[..., int]:
    try:
        entry: Callable[..., int] = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise PolyarchError(f"{module}.{name} is not installed here: {exc}") from exc
    return entry


def cmd_coordinator(args: argparse.Namespace, session: _Session) -> int:
    return _entry_point("polyarch.coordinator.server", "run_coordinator")(args)


def cmd_agent(args: argparse.Namespace, session: _Session) -> int:
    """The agent gets its AgentConfig (defaults, file, flags) and the credential flags."""
    config = agent_config_from(args)
    return _entry_point("polyarch.agent.runtime", "run_agent")(config, args)


# -- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polyarch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"polyarch {polyarch_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--coordinator",
        type=_address,
        default=os.environ.get(COORDINATOR_ENV) or DEFAULT_COORDINATOR,
        help=f"coordinator HOST:PORT (default ${COORDINATOR_ENV} or {DEFAULT_COORDINATOR})",
    )
    client.add_argument(
        "--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT, metavar="SECONDS"
    )
    add_credential_flags(client)
    registries = argparse.ArgumentParser(add_help=False)
    registries.add_argument(
        "--insecure-registry", action="append", default=[], metavar="HOST",
        help="registry reached over plain HTTP (repeatable)",
    )  # fmt: skip

    p = commands.add_parser("coordinator", parents=[registries], help="run the coordinator")
    add_coordinator_flags(p)
    p.set_defaults(handler=cmd_coordinator)

    p = commands.add_parser("agent", help="run a build agent")
    add_agent_flags(p)
    add_credential_flags(p)
    p.add_argument("--replace", action="store_true",
                   help="re-enrol a name that is already enrolled")  # fmt: skip
    p.set_defaults(handler=cmd_agent)

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
    p.add_argument("-q", "--quiet", dest="progress", action="store_const", const="quiet",
                   help="as --progress quiet: only the index digest, on stdout")  # fmt: skip
    add_buildx_only_flags(p)
    p.add_argument("--cancel-on-interrupt", action="store_true",
                   help="on Ctrl-C cancel the build without asking")  # fmt: skip
    p.add_argument("context", metavar="CONTEXT_DIR")
    p.set_defaults(handler=cmd_build)

    from polyarch.client.bake import add_bake_command  # imported here: bake imports this module

    add_bake_command(commands, client)

    p = commands.add_parser("agents", parents=[client], help="list agents")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_agents)
    p = commands.add_parser("builds", parents=[client], help="list recent builds")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=_positive, default=20)
    p.set_defaults(handler=cmd_builds)
    p = commands.add_parser("cancel", parents=[client], help="cancel a build")
    p.add_argument("build_id", metavar="BUILD_ID")
    p.set_defaults(handler=cmd_cancel)
    for name in ("drain", "undrain"):
        p = commands.add_parser(name, parents=[client], help=f"{name} an agent")
        p.add_argument("agent", metavar="AGENT")
        p.set_defaults(handler=cmd_drain)
    p = commands.add_parser(
        "revoke-agent",
        parents=[client],
        help="forget an agent's enrolment: its certificate is refused (admin)",
    )
    p.add_argument("agent", metavar="AGENT")
    p.set_defaults(handler=cmd_revoke_agent)

    p = commands.add_parser("token", help="create, list and revoke API tokens (admin)")
    tokens = p.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    t = tokens.add_parser("create", parents=[client], help="print a new token, once")
    t.add_argument("--role", required=True, choices=list(TOKEN_ROLES))
    t.add_argument("--ttl", type=_ttl, default=0, metavar="DURATION",
                   help="e.g. 24h, 7d (default: never expires)")  # fmt: skip
    t.add_argument("--description", metavar="TEXT")
    t.set_defaults(handler=cmd_token)
    t = tokens.add_parser("list", parents=[client], help="every token, without secrets")
    t.add_argument("--json", action="store_true")
    t.set_defaults(handler=cmd_token)
    t = tokens.add_parser("revoke", parents=[client], help="refuse a token from now on")
    t.add_argument("id", metavar="ID")
    t.set_defaults(handler=cmd_token)
    add_wheelhouse_command(commands)
    add_deploy_command(commands, client)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns the process exit code (see the module docstring)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    session = _Session()
    try:
        code: int = args.handler(args, session)
        return code
    except (
        UsageError, ContextError, DockerignoreError, PlatformError, CredentialsError,
        SecretSpecError, ConfigError,
    ) as exc:  # fmt: skip
        _err(f"polyarch: error: {exc}")
        return EXIT_USAGE
    except CoordinatorUnreachable as exc:
        _err(f"polyarch: error: {exc}")
        return EXIT_UNREACHABLE
    except PolyarchError as exc:
        _err(f"polyarch: error: {exc}")
        return EXIT_USAGE if exc.code == grpc.StatusCode.INVALID_ARGUMENT else EXIT_FAILED
    except KeyboardInterrupt:
        if session.build_id:
            _interrupted(args, session.build_id)
        else:
            _err("interrupted")
        return EXIT_INTERRUPTED


def _interrupted(args: argparse.Namespace, build_id: str) -> None:
    """Ctrl-C during a build: cancel it if asked to (flag or prompt), else say how to."""
    cancel = bool(getattr(args, "cancel_on_interrupt", False))
    if not cancel and sys.stdin.isatty():
        try:
            answer = input(f"\ninterrupted: cancel build {build_id} on the coordinator? [y/N] ")
        except (EOFError, KeyboardInterrupt):
            answer = ""
        cancel = answer.strip().lower() in ("y", "yes")
    if not cancel:
        _err(
            f"interrupted: build {build_id} continues on the coordinator; "
            f"cancel with polyarch cancel {build_id}"
        )
        return
    try:
        _ask(args, lambda client: client.cancel_build(build_id, "interrupted by the client"))
        _err(f"interrupted: build {build_id} cancelled")
    except PolyarchError as exc:
        _err(f"interrupted: could not cancel build {build_id}: {exc}")
