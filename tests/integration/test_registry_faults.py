"""Index assembly through registry hiccups: retried with a bound, terminal errors explained."""

from __future__ import annotations

from collections import Counter

import pytest

from polyarch.coordinator.registry.client import RegistryClient, RegistryError
from polyarch.coordinator.registry.index import assemble_index
from polyarch.proto.platforms import parse_platform
from tests.support.faulty_proxy import FaultyProxy
from tests.support.verify import index_platforms, skopeo_raw

LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


def children_of(base_image: str) -> dict[str, str]:
    """The per-platform images of the offline base index, read by skopeo."""
    return index_platforms(skopeo_raw(base_image))


async def test_transient_faults_are_retried_and_the_index_lands_once(
    registry, base_image: str
) -> None:
    children = children_of(base_image)
    seen: Counter[str] = Counter()

    def flaky(method: str, path: str, headers: dict[str, str]) -> int | str | None:
        kind = "put-index" if method == "PUT" else f"{method}-manifest"
        if "/manifests/" not in path:
            return None
        seen[kind] += 1
        if kind == "put-index" and seen[kind] <= 2:
            return (503, 502)[seen[kind] - 1]
        if kind == "GET-manifest" and seen[kind] == 1:
            return "reset"
        if kind == "GET-manifest" and seen[kind] == 2:
            return 504
        return None

    errors: list[str] = []
    async with FaultyProxy(registry.address, flaky) as proxy:
        client = RegistryClient(retries=4, on_request_error=errors.append)
        async with client:
            platforms = {parse_platform(p): d for p, d in children.items()}
            first = await assemble_index(client, proxy.address, "polyarch/busybox", platforms,
                                         ["flaky"])  # fmt: skip
            again = await assemble_index(client, proxy.address, "polyarch/busybox", platforms,
                                         ["flaky"])  # fmt: skip
    assert first.digest == again.digest  # pushing the same index twice is harmless
    assert sorted(errors) == ["http_5xx", "http_5xx", "http_5xx", "unreachable"]
    direct = skopeo_raw(f"{registry.address}/polyarch/busybox:flaky")
    assert direct["mediaType"] == LIST
    assert index_platforms(direct) == children


async def test_terminal_errors_are_not_retried_and_carry_the_registry_message(
    registry, base_image: str
) -> None:
    children = {parse_platform(p): d for p, d in children_of(base_image).items()}

    def refuse_puts(method: str, path: str, headers: dict[str, str]) -> int | None:
        return 400 if method == "PUT" else None

    async with FaultyProxy(registry.address, refuse_puts) as proxy:
        async with RegistryClient(retries=4) as client:
            with pytest.raises(RegistryError, match="HTTP 400") as raised:
                await assemble_index(client, proxy.address, "polyarch/busybox", children, ["x"])
        puts = [r for r in proxy.requests if r[0] == "PUT"]
    assert len(puts) == 1
    assert proxy.address in str(raised.value)
    assert "INJECTED: injected by the test proxy" in str(raised.value)


async def test_retries_are_bounded(registry, base_image: str) -> None:
    children = {parse_platform(p): d for p, d in children_of(base_image).items()}

    def always_unavailable(method: str, path: str, headers: dict[str, str]) -> int | None:
        return 503 if method == "PUT" else None

    async with FaultyProxy(registry.address, always_unavailable) as proxy:
        async with RegistryClient(retries=2, backoff_base=0.01) as client:
            with pytest.raises(RegistryError, match="503"):
                await assemble_index(client, proxy.address, "polyarch/busybox", children, ["y"])
        assert len([r for r in proxy.requests if r[0] == "PUT"]) == 3
