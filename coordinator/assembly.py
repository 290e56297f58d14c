"""Publishing a finished build: verify each pushed image, then push one index under every tag."""

from __future__ import annotations

from polyarch.coordinator.index import IndexResult, assemble_index
from polyarch.coordinator.model import BuildSpec, JobRecord
from polyarch.coordinator.registry import RegistryClient, parse_reference
from polyarch.proto.platforms import parse_platform


class IndexPublisher:
    """Builds and pushes the image index of a build through the coordinator's registry client."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client

    async def publish(self, spec: BuildSpec, jobs: list[JobRecord]) -> IndexResult:
        children = {parse_platform(job.platform): job.digest for job in jobs}
        tags = [parse_reference(tag).tag for tag in spec.tags]
        result = await assemble_index(
            self.client, spec.registry, spec.repository, children, [t for t in tags if t]
        )
        # The registry's word on each child (media type, size) replaces the agent's report.
        verified = {child.platform: child for child in result.children}
        for job in jobs:
            child = verified.get(parse_platform(job.platform))
            if child is not None:
                job.media_type, job.size = child.media_type, child.size
        return result
