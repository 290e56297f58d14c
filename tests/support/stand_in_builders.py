"""A builder for agents whose builds are beside the point of a test: it never builds."""

from __future__ import annotations

from collections.abc import Callable

from polyarch.agent.builders.base import BuildRequest, PushedImage


class IdleBuilder:
    """An agent's builder that is never asked to build (subclasses that are override
    build_and_push)."""

    name = "idle"

    async def idle(self) -> None:
        pass

    def may_link_context(self, dockerfile: bytes | None) -> bool:
        return False

    async def check(self) -> None:
        pass

    async def build_and_push(
        self, request: BuildRequest, on_line: Callable[[str], None]
    ) -> PushedImage:
        raise AssertionError("no build runs in this test")
