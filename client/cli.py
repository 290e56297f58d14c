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
import importlib
import json
import re
import sys
from collections.abc import Callable, Sequence

import grpc

from polyarch.agent.config import add_agent_flags, agent_config_from
from polyarch.client import render
from polyarch.client.api import (
    COORDINATOR_ENV,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_COORDINATOR,
    CoordinatorUnreachable,
    PolyarchError,
)
from polyarch.client.bake import add_bake_command
from polyarch.client.build_command import add_build_command
from polyarch.client.build_secrets import (
    SecretSpecError,
)
from polyarch.client.cli_common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Session,
    UsageError,
    address,
    ask,
    err,
    positive,
)
from polyarch.client.context import ContextError
from polyarch.client.credentials import (
    CredentialsError,
    add_credential_flags,
)
from polyarch.client.dockerignore import DockerignoreError
from polyarch.client.verify_command import add_verify_command
from polyarch.coordinator.config import add_coordinator_flags
from polyarch.ops.deploy_cli import add_deploy_command
from polyarch.ops.wheelhouse import add_wheelhouse_command
from polyarch.proto.config_files import ConfigError
from polyarch.proto.platforms import (
    PlatformError,
)
from polyarch.proto.registries import polyarch_version
from polyarch.proto.v1 import trust_pb2

_TTL = re.compile(r"^(\d+)([smhd]?)$")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _ttl(text: str) -> int:
    match = _TTL.match(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a duration like 3600, 90m, 24h or 7d: {text!r}")
    return int(match[1]) * _TTL_UNITS[match[2]]


# -- fleet and build inspection ----------------------------------------------------------------


def cmd_agents(args: argparse.Namespace, session: Session) -> int:
    agents = ask(args, lambda client: client.list_agents())
    if args.json:
        print(json.dumps([render.agent_to_dict(a) for a in agents], indent=2))
    else:
        print("\n".join(render.agents_table(agents)))
    return 0


def cmd_builds(args: argparse.Namespace, session: Session) -> int:
    builds = ask(args, lambda client: client.list_builds(args.limit))
    if args.json:
        print(json.dumps([render.build_to_dict(b) for b in builds], indent=2))
    else:
        print("\n".join(render.builds_table(builds)))
    return 0


def cmd_cancel(args: argparse.Namespace, session: Session) -> int:
    reason = "cancelled with polyarch cancel"
    build = ask(args, lambda client: client.cancel_build(args.build_id, reason))
    print(f"build {build.id}: {render.build_state(build.state)}")
    return 0


def cmd_drain(args: argparse.Namespace, session: Session) -> int:
    drain = args.command == "drain"
    agent = ask(
        args,
        lambda client: (
            client.drain_agent(args.agent) if drain else client.undrain_agent(args.agent)
        ),
    )
    print(f"agent {agent.name}: {render.agent_state(agent.state)}")
    return 0


def cmd_revoke_agent(args: argparse.Namespace, session: Session) -> int:
    if ask(args, lambda client: client.revoke_enrolment(args.agent)):
        print(f"agent {args.agent}: enrolment revoked; its certificate is refused from now on")
        return 0
    err(f"polyarch: agent {args.agent} is not enrolled")
    return EXIT_FAILED


# -- tokens ------------------------------------------------------------------------------------

TOKEN_ROLES = {
    "read": trust_pb2.TOKEN_ROLE_READ,
    "ci": trust_pb2.TOKEN_ROLE_CI,
    "admin": trust_pb2.TOKEN_ROLE_ADMIN,
    "agent": trust_pb2.TOKEN_ROLE_AGENT,
}


def cmd_token(args: argparse.Namespace, session: Session) -> int:
    if args.token_command == "create":
        created = ask(
            args,
            lambda client: client.create_token(
                TOKEN_ROLES[args.role], args.ttl, args.description or ""
            ),
        )
        err(f"token {created.token.id} ({args.role}) created; it is shown once:")
        print(created.token_text, flush=True)
    elif args.token_command == "list":
        tokens = ask(args, lambda client: client.list_tokens())
        if args.json:
            print(json.dumps([render.token_to_dict(t) for t in tokens], indent=2))
        else:
            print("\n".join(render.tokens_table(tokens)))
    else:
        revoked = ask(args, lambda client: client.revoke_token(args.id))
        print(f"token {revoked.id}: revoked")
    return 0


# -- servers (implemented by the coordinator and agent packages) --------------------------------


def _entry_point(module: str, name: str) -> Callable[..., int]:
    try:
        entry: Callable[..., int] = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise PolyarchError(f"{module}.{name} is not installed here: {exc}") from exc
    return entry


def cmd_coordinator(args: argparse.Namespace, session: Session) -> int:
    return _entry_point("polyarch.coordinator.server", "run_coordinator")(args)


def cmd_agent(args: argparse.Namespace, session: Session) -> int:
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
        type=address,
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

    add_build_command(commands, client)

    add_bake_command(commands, client)

    add_verify_command(commands, registries)

    p = commands.add_parser("agents", parents=[client], help="list agents")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_agents)
    p = commands.add_parser("builds", parents=[client], help="list recent builds")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=positive, default=20)
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
    credentials = argparse.ArgumentParser(add_help=False)
    add_credential_flags(credentials)
    add_deploy_command(commands, credentials)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns the process exit code (see the module docstring)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    session = Session()
    try:
        code: int = args.handler(args, session)
        return code
    except (
        UsageError, ContextError, DockerignoreError, PlatformError, CredentialsError,
        SecretSpecError, ConfigError,
    ) as exc:  # fmt: skip
        err(f"polyarch: error: {exc}")
        return EXIT_USAGE
    except CoordinatorUnreachable as exc:
        err(f"polyarch: error: {exc}")
        return EXIT_UNREACHABLE
    except PolyarchError as exc:
        err(f"polyarch: error: {exc}")
        return EXIT_USAGE if exc.code == grpc.StatusCode.INVALID_ARGUMENT else EXIT_FAILED
    except KeyboardInterrupt:
        if session.build_id:
            _interrupted(args, session.build_id)
        else:
            err("interrupted")
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
        err(
            f"interrupted: build {build_id} continues on the coordinator; "
            f"cancel with polyarch cancel {build_id}"
        )
        return
    try:
        ask(args, lambda client: client.cancel_build(build_id, "interrupted by the client"))
        err(f"interrupted: build {build_id} cancelled")
    except PolyarchError as exc:
        err(f"interrupted: could not cancel build {build_id}: {exc}")
