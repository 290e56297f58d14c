"""What the `polyarch` client commands share: exit codes, errors, flag parsing, the client."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from polyarch.client.api import BuildClient
from polyarch.client.credentials import credentials_from_args
from polyarch.proto.platforms import Platform, PlatformError, parse_platforms
from polyarch.proto.references import ReferenceError, parse_reference
from polyarch.proto.v1 import common_pb2

_T = TypeVar("_T")
EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 1, 2, 3, 130
EMULATION = {
    "fallback": common_pb2.EMULATION_POLICY_FALLBACK,
    "never": common_pb2.EMULATION_POLICY_NEVER,
    "allow": common_pb2.EMULATION_POLICY_ALLOW,
}


class UsageError(Exception):
    """Bad flags or input; printed as `polyarch: error: ...` with exit code 2."""


@dataclass
class Session:
    """What an interrupted command needs to say where it left off."""

    build_id: str | None = None


def err(*lines: str) -> None:
    for line in lines:
        print(line, file=sys.stderr, flush=True)


def address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def platforms_of(values: list[str] | None, flag: str) -> list[Platform]:
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


def pairs(values: list[str] | None, flag: str, from_env: bool) -> dict[str, str]:
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


def client_of(args: argparse.Namespace) -> BuildClient:
    return BuildClient(
        args.coordinator,
        connect_timeout=args.connect_timeout,
        credentials=credentials_from_args(args),
    )


def ask(args: argparse.Namespace, call: Callable[[BuildClient], Awaitable[_T]]) -> _T:
    """Runs one request against the coordinator named by --coordinator."""

    async def run() -> _T:
        async with client_of(args) as client:
            return await call(client)

    return asyncio.run(run())
