"""The one translation between domain records and polyarch.v1 messages, both directions."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from polyarch.coordinator.core.events import BuildChanged, BuildEvent, JobChanged, LogLine
from polyarch.coordinator.core.fleet import AgentCommand, AgentSession, Assign, Cancel, Hello
from polyarch.coordinator.core.model import (
    BuildRecord,
    BuildSpec,
    BuildState,
    EmulationPolicy,
    InvalidRequest,
    JobRecord,
    JobState,
    Mode,
)
from polyarch.coordinator.core.states import JobOutcome
from polyarch.coordinator.exports.exporter import ExportFormat
from polyarch.coordinator.registry.provenance import parse_mode
from polyarch.coordinator.registry.signatures import SIGN_FARM, SIGN_OWN
from polyarch.proto.v1 import agent_pb2, build_pb2, common_pb2, fleet_pb2

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
        config_digest=job.config_digest,
        attestation_digest=job.attestation_digest,
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


# ---- client requests and events -----------------------------------------------------------
def spec_from(request: build_pb2.SubmitBuildRequest) -> BuildSpec:
    return BuildSpec(
        context_digest=request.context_digest,
        dockerfile=request.dockerfile,
        platforms=list(request.platforms),
        tags=list(request.tags),
        build_args=dict(request.build_args),
        target=request.target,
        labels=dict(request.labels),
        emulation=POLICIES[request.emulation],
        cache_from=list(request.cache_from),
        cache_to=list(request.cache_to),
        no_cache=request.no_cache,
        pull=request.pull,
        annotations=list(request.annotations),
        no_publish=request.no_publish,
        scan_command=request.scan_command,
        provenance=parse_mode(request.provenance),
        sign=sign_mode(request.sign_key, request.sign_with),
    )


def sign_mode(sign_key: bytes, sign_with: str) -> str:
    """BuildSpec.sign of a request: "key" (its own key), "farm" or "" (no signature)."""
    if sign_with not in ("", SIGN_FARM):
        raise InvalidRequest(f"sign_with {sign_with[:40]!r}: only 'farm' is known")
    if sign_with and sign_key:
        raise InvalidRequest("--sign-key and --sign-with farm together: choose one key")
    return SIGN_FARM if sign_with else SIGN_OWN if sign_key else ""


def event_message(event: BuildEvent) -> build_pb2.BuildEvent:
    if isinstance(event, LogLine):
        return build_pb2.BuildEvent(log=log_message(event))
    if isinstance(event, JobChanged):
        return build_pb2.BuildEvent(job=job_message(event.job))
    assert isinstance(event, BuildChanged)
    return build_pb2.BuildEvent(build=build_message(event.build, list(event.jobs)))


def log_message(line: LogLine) -> build_pb2.LogLine:
    return build_pb2.LogLine(
        job_id=line.job_id, platform=line.platform, attempt=line.attempt, line=line.line
    )


# ---- the agent channel ------------------------------------------------------------------------
def hello_from(message: agent_pb2.AgentHello) -> Hello:
    return Hello(
        name=message.name, builder=message.builder, version=message.version,
        native_platforms=tuple(message.native_platforms),
        emulated_platforms=tuple(message.emulated_platforms), slots=message.slots,
        labels=dict(message.labels),
        running=tuple((r.job_id, r.attempt) for r in message.running),
    )  # fmt: skip


def outcome_from(result: agent_pb2.JobResult) -> JobOutcome:
    return JobOutcome(
        ok=result.ok, digest=result.digest, size=result.size, media_type=result.media_type,
        error=result.error, failed_step=result.failed_step,
        infrastructure_error=result.infrastructure_error,
    )  # fmt: skip


def command_message(command: AgentCommand) -> agent_pb2.CoordinatorMessage:
    if isinstance(command, Assign):
        return agent_pb2.CoordinatorMessage(assign=assignment_message(command))
    if isinstance(command, Cancel):
        cancel = agent_pb2.CancelJob(
            job_id=command.job_id, attempt=command.attempt, reason=command.reason
        )
        return agent_pb2.CoordinatorMessage(cancel=cancel)
    welcome = agent_pb2.Welcome(
        coordinator_version=command.coordinator_version,
        heartbeat_interval_ms=int(command.heartbeat_interval * 1000),
    )
    return agent_pb2.CoordinatorMessage(welcome=welcome)


def assignment_message(assign: Assign) -> agent_pb2.Assignment:
    spec, own = assign.spec, assign.credentials
    return agent_pb2.Assignment(
        registry_auths=[
            common_pb2.RegistryAuth(registry=r, username=c.username, password=c.password)
            for r, c in sorted(own.registry_auths.items())
        ],
        secrets=[common_pb2.BuildSecret(id=i, value=v) for i, v in sorted(own.secrets.items())],
        job_id=assign.job_id, attempt=assign.attempt, build_id=assign.build_id,
        platform=assign.platform,
        mode=MODES[Mode.EMULATED if assign.emulated else Mode.NATIVE],
        context_digest=spec.context_digest, dockerfile=spec.dockerfile,
        build_args=spec.build_args, target=spec.target, labels=spec.labels,
        repository=f"{spec.registry}/{spec.repository}", push_tag=assign.push_tag,
        cache_from=spec.cache_from, cache_to=spec.cache_to, no_cache=spec.no_cache,
        pull=spec.pull,
    )  # fmt: skip


_EXPORT_FORMATS = {
    build_pb2.EXPORT_FORMAT_OCI_LAYOUT: ExportFormat.OCI_LAYOUT,
    build_pb2.EXPORT_FORMAT_DOCKER_ARCHIVE: ExportFormat.DOCKER_ARCHIVE,
    build_pb2.EXPORT_FORMAT_ROOTFS: ExportFormat.ROOTFS,
}


def export_format_from(value: int) -> ExportFormat:
    try:
        return _EXPORT_FORMATS[value]  # type: ignore[index]
    except KeyError:
        raise InvalidRequest(f"unknown export format {value}") from None
