"""Publishing a finished build: verify each pushed image, then push one index under every tag."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections import Counter

from polyarch.coordinator.core.model import BuildSpec, JobRecord, push_tag
from polyarch.coordinator.registry.annotations import parse_annotations
from polyarch.coordinator.registry.build_credentials import BuildCredentials, client_for
from polyarch.coordinator.registry.client import RegistryClient, RegistryError
from polyarch.coordinator.registry.copies import publish_copy, tags_by_repository
from polyarch.coordinator.registry.gate import SupplyChainGate
from polyarch.coordinator.registry.index import IndexResult, assemble_index, render_index
from polyarch.coordinator.registry.provenance import builder_id, provenance_attacher
from polyarch.coordinator.registry.signatures import signer, signing_key_of
from polyarch.coordinator.registry.staging import remove_staging_tags
from polyarch.proto.platforms import parse_platform

log = logging.getLogger(__name__)


class IndexPublisher:
    """Builds and pushes the image index of a build through the coordinator's registry client."""

    def __init__(
        self, client: RegistryClient, gate: SupplyChainGate | None = None, builder: str = ""
    ) -> None:
        self.client = client
        self.gate = gate or SupplyChainGate()
        self.builder = builder or builder_id()  # SLSA runDetails.builder.id
        # staging-tag removals run after the build is reported: CI waits for none of them
        self._cleanups: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        """Lets running removals finish (bounded by the registry client's timeouts)."""
        await asyncio.gather(*self._cleanups, return_exceptions=True)

    async def publish(
        self, spec: BuildSpec, jobs: list[JobRecord], own: BuildCredentials | None = None
    ) -> IndexResult:
        client = client_for(self.client, own)
        await asyncio.gather(*(self.check_pushed(client, spec, job) for job in jobs))
        # Supply-chain gate (gate.py): every image is pushed and verified, no tag has moved;
        # it scans, and its client refuses to move an immutable tag right before each PUT.
        client = await self.gate.before_tags(client, spec, jobs)
        # the key is the build's own (memory only) or the farm's; the index is signed in
        # every repository it lands in, by digest, before a tag there moves
        sign = signer(client, signing_key_of(spec, own, self.gate.farm_key))
        children = {parse_platform(job.platform): job.digest for job in jobs}
        groups = tags_by_repository(spec.tags)
        primary = (spec.registry, spec.repository)
        annotations = parse_annotations(spec.annotations, list(children))
        result = await assemble_index(
            client, spec.registry, spec.repository, children, groups.pop(primary, []),
            annotations, push=not spec.no_publish,
            attest=provenance_attacher(client, spec, jobs, self.builder), sign=sign,
        )  # fmt: skip
        if groups and not spec.no_publish:
            index = (render_index(result.children, annotations), result.media_type, result.digest)
            for target, tags in groups.items():
                how = await publish_copy(
                    client, primary, target, result.children, index, tags, sign
                )
                log.info("index %s copied to %s/%s (blobs: %s)", result.digest, *target,
                         ", ".join(f"{n} {w}" for w, n in Counter(how).items()))  # fmt: skip
        cleanup = asyncio.get_running_loop().create_task(
            self.remove_staging_tags(client, spec, [copy.copy(j) for j in jobs])
        )
        self._cleanups.add(cleanup)
        cleanup.add_done_callback(self._cleanups.discard)
        # The registry's word on each child (media type, size) replaces the agent's report.
        verified = {child.platform: child for child in result.children}
        for job in jobs:
            child = verified.get(parse_platform(job.platform))
            if child is not None:
                job.media_type, job.size = child.media_type, child.size
                job.config_digest = child.config_digest
                if child.attestation is not None:
                    job.attestation_digest = child.attestation.digest
                    job.attestation_size = child.attestation.size
        return result

    @staticmethod
    async def check_pushed(client: RegistryClient, spec: BuildSpec, job: JobRecord) -> None:
        """The job's own per-job tag must hold the digest its agent reported: an agent cannot
        point the index at some other image of the repository (an old release, say)."""
        tag = push_tag(job.build_id, job.platform, job.attempt)
        try:
            held = await client.head_manifest(spec.registry, spec.repository, tag)
        except RegistryError as exc:
            raise RegistryError(
                f"{job.platform}: the per-job tag {tag} cannot be read ({exc}); agent "
                f"{job.agent} reported {job.digest}", exc.registry, exc.status,
            ) from None  # fmt: skip
        if held.digest != job.digest:
            raise RegistryError(
                f"{job.platform}: agent {job.agent} reported {job.digest} but its per-job tag "
                f"{tag} holds {held.digest}; refusing to publish",
                spec.registry,
            )

    @staticmethod
    async def remove_staging_tags(
        client: RegistryClient, spec: BuildSpec, jobs: list[JobRecord]
    ) -> None:
        """Every attempt's per-job tag goes once the index is published; a registry that
        refuses deletes keeps them (said in the log), and nothing here fails the build."""
        tags = [push_tag(j.build_id, j.platform, a) for j in jobs for a in range(1, j.attempt + 1)]
        if not jobs or not tags:
            return
        try:
            await remove_staging_tags(
                client, spec.registry, spec.repository, jobs[0].build_id, tags
            )
        except RegistryError as exc:
            log.warning("build %s: staging tags stay: %s", jobs[0].build_id, exc)
