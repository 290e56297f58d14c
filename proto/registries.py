"""Shared rules: which registries speak plain HTTP, how retries back off, what version we are."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable
from importlib import metadata


def registry_host(registry: str) -> str:
    """The host of `host`, `host:port` or `[v6]:port` (a registry as image references name it)."""
    if registry.startswith("["):
        return registry[1 : registry.index("]")] if "]" in registry else registry
    if registry.count(":") == 1:
        return registry.split(":", 1)[0]
    return registry


def is_loopback_address(address: str) -> bool:
    """True when `host`, `host:port` or `[v6]:port` names localhost, 127.0.0.0/8 or ::1."""
    host = registry_host(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_registry(registry: str) -> bool:
    """True for the registries Docker speaks plain HTTP to unasked: loopback ones."""
    return is_loopback_address(registry)


def registry_is_plain_http(registry: str, insecure: Iterable[str] = ()) -> bool:
    """Plain HTTP for loopback registries (as Docker does) and those named insecure
    (by `host:port` or by host)."""
    named = set(insecure)
    return registry in named or registry_host(registry) in named or is_loopback_registry(registry)


def polyarch_version() -> str:
    """The installed package's version: one source for `--version`, hellos and welcomes."""
    try:
        return metadata.version("polyarch")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def backoff_delay(attempt: int, base: float = 0.2, cap: float = 5.0) -> float:
    """Full-jitter exponential backoff for retry number `attempt` (0-based): the one rule for
    registry requests, pushes and reconnects."""
    return random.uniform(base / 2, min(cap, base * (2**attempt)))
