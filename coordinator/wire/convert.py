"""Translation between the coordinator's domain records and polyarch.v1 messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from polyarch.coordinator.core.fleet import AgentSession
from polyarch.coordinator.core.model import (
    BuildRecord,
    BuildState,
    EmulationPolicy,
    JobRecord,
    JobState,
    Mode,
)
from polyarch.proto.v1 import build_pb2, common_pb2, fleet_pb2

BUILD_STATES = {
    BuildState.QUEUED: common_pb2.BUILD_STATE_QUEUED,
    BuildState.RUNNING: common_pb2.BUILD_STATE_RUNNING,
    BuildState.ASSEMBLING: common_pb2.BUILD_STATE_ASSEMBLING,
    BuildState.SUCCEEDED: common_pb2.BUILD_STATE_SUCCEEDED,
    BuildState.FAILED: common_pb2.BUILD_STATE_FAILED,
    BuildState.CANCELLED: common_pb2.BUILD_STATE_CANCELLED,
}
JOB_STATES = {
    JobState.QUEUED: common_pb2.JOB_STATE_QUEUED,
    JobState.ASSIGNED: common_pb2.JOB_STATE_ASSIGNED,
    JobState.RUNNING: common_pb2.JOB_STATE_RUNNING,
    JobState.PUSHED: common_pb2.JOB_STATE_PUSHED,
    JobState.FAILED: common_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: common_pb2.JOB_STATE_CANCELLED,
}
MODES = {Mode.NATIVE: common_pb2.BUILD_MODE_NATIVE, Mode.EMULATED: common_pb2.BUILD_MODE_EMULATED}
POLICIES = {
    common_pb2.EMULATION_POLICY_UNSPECIFIED: EmulationPolicy.FALLBACK,
    common_pb2.EMULATION_POLICY_FALLBACK: EmulationPolicy.FALLBACK,
    common_pb2.EMULATION_POLICY_NEVER: EmulationPolicy.NEVER,
    common_pb2.EMULATION_POLICY_ALLOW: EmulationPolicy.ALLOW,
}
POLICIES_TO_WIRE = {
    v: k for k, v in POLICIES.items() if k != common_pb2.EMULATION_POLICY_UNSPECIFIED
}


def timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def job_message(job: JobRecord) -> build_pb2.Job:
    return build_pb2.Job(
        id=job.id,
        platform=job.platform,
        state=JOB_STATES[job.state],
        agent=job.agent,
        mode=MODES[job.mode] if job.mode else common_pb2.BUILD_MODE_UNSPECIFIED,
        digest=job.digest,
        size=job.size,
        media_type=job.media_type,
        attempt=job.attempt,
        error=job.error,
        failed_step=job.failed_step,
        queued_at=timestamp(job.queued_at),
        started_at=timestamp(job.started_at),
        finished_at=timestamp(job.finished_at),
        requeue_reasons=job.requeue_reasons,
    )


def build_message(build: BuildRecord, jobs: list[JobRecord]) -> build_pb2.Build:
    return build_pb2.Build(
        id=build.id,
        state=BUILD_STATES[build.state],
        tags=build.spec.tags,
        index_digest=build.index_digest,
        index_media_type=build.index_media_type,
        index_size=build.index_size,
        jobs=[job_message(j) for j in jobs],
        error=build.error,
        context_digest=build.spec.context_digest,
        dockerfile=build.spec.dockerfile,
        created_at=timestamp(build.created_at),
        finished_at=timestamp(build.finished_at),
        emulation=POLICIES_TO_WIRE[build.spec.emulation],
    )


def agent_message(session: AgentSession, running: list[JobRecord]) -> fleet_pb2.Agent:
    """A connected agent as the fleet API shows it."""
    state = fleet_pb2.AGENT_STATE_DRAINING if session.draining else fleet_pb2.AGENT_STATE_READY
    return fleet_pb2.Agent(
        name=session.name,
        state=state,
        builder=session.builder,
        native_platforms=sorted(str(p) for p in session.native),
        emulated_platforms=sorted(str(p) for p in session.emulated),
        slots=session.slots,
        running=[
            fleet_pb2.AgentJob(
                build_id=j.build_id, job_id=j.id, platform=j.platform, attempt=j.attempt
            )
            for j in running
        ],
        version=session.version,
        connected_at=timestamp(session.connected_at),
        last_heartbeat=timestamp(session.last_seen),
        peer=session.peer,
    )
