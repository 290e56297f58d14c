"""Turns builds, jobs and agents into CI log lines, tables, JSON and buildx-style metadata."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC
from typing import Any, TextIO

from google.protobuf.timestamp_pb2 import Timestamp

from polyarch.proto.v1 import build_pb2, common_pb2, fleet_pb2, trust_pb2

TERMINAL_BUILD_STATES = frozenset(
    {
        common_pb2.BUILD_STATE_SUCCEEDED,
        common_pb2.BUILD_STATE_FAILED,
        common_pb2.BUILD_STATE_CANCELLED,
    }
)


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    try:
        name: str = enum.Name(value)
    except ValueError:  # a newer coordinator's value this client does not know
        return str(value)
    return name.removeprefix(prefix).lower()


def build_state(value: int) -> str:
    return _enum_name(common_pb2.BuildState, value, "BUILD_STATE_")


def job_state(value: int) -> str:
    return _enum_name(common_pb2.JobState, value, "JOB_STATE_")


def build_mode(value: int) -> str:
    """'native', 'emulated', or '' when the job has no agent yet."""
    return "" if value == 0 else _enum_name(common_pb2.BuildMode, value, "BUILD_MODE_")


def agent_state(value: int) -> str:
    return _enum_name(fleet_pb2.AgentState, value, "AGENT_STATE_")


def _time(stamp: Timestamp) -> str | None:
    if stamp.seconds == 0 and stamp.nanos == 0:
        return None
    return stamp.ToDatetime(tzinfo=UTC).isoformat()


def _on_agent(job: build_pb2.Job) -> str:
    if not job.agent:
        return ""
    mode = build_mode(job.mode)
    return f" on {job.agent}" + (f" ({mode})" if mode else "")


def describe_job(job: build_pb2.Job) -> str:
    """One line for a job's current state, without the platform prefix."""
    state = job.state
    if state == common_pb2.JOB_STATE_QUEUED:
        if job.attempt > 1:
            reason = job.requeue_reasons[-1] if job.requeue_reasons else "re-queued"
            return f"re-queued (attempt {job.attempt}): {reason}"
        return "queued"
    if state == common_pb2.JOB_STATE_ASSIGNED:
        mode = build_mode(job.mode)
        attempt = f", attempt {job.attempt}" if job.attempt > 1 else ""
        return f"assigned to {job.agent}" + (f" ({mode}{attempt})" if mode else "")
    if state == common_pb2.JOB_STATE_RUNNING:
        return "running" + _on_agent(job)
    if state == common_pb2.JOB_STATE_PUSHED:
        return f"pushed {job.digest}"
    if state == common_pb2.JOB_STATE_FAILED:
        step = f' at step "{job.failed_step}"' if job.failed_step else ""
        agent = f" on {job.agent}" if job.agent else ""
        return f"FAILED{step}{agent}: {job.error or 'unknown error'}"
    return job_state(state)


class ProgressRenderer:
    """Writes one plain line per job state change and log line: `[linux/arm64] queued`."""

    def __init__(self, out: TextIO, quiet: bool = False) -> None:
        self.out = out
        self.quiet = quiet
        self.build: build_pb2.Build | None = None
        self._seen: dict[str, tuple[int, int, str]] = {}

    def _write(self, line: str) -> None:
        if not self.quiet:
            print(line, file=self.out, flush=True)

    def handle(self, event: build_pb2.BuildEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "build":
            self._on_build(event.build)
        elif kind == "job":
            self._on_job(event.job)
        elif kind == "log":
            line = event.log.line.rstrip("\r\n")
            self._write(f"[{event.log.platform}] {line}")

    def _on_build(self, build: build_pb2.Build) -> None:
        previous = self.build.state if self.build is not None else None
        self.build = build
        for job in build.jobs:
            self._on_job(job)
        if build.state == previous:
            return
        if build.state == common_pb2.BUILD_STATE_ASSEMBLING:
            self._write(f"assembling the image index from {len(build.jobs)} platform images")
        elif build.state == common_pb2.BUILD_STATE_SUCCEEDED:
            self._write(f"build {build.id} succeeded: {build.index_digest}")
        # A failed or cancelled build is reported by failure_summary, once.

    def _on_job(self, job: build_pb2.Job) -> None:
        key = job.id or job.platform
        state = (job.state, job.attempt, job.agent)
        if self._seen.get(key) == state:
            return
        self._seen[key] = state
        self._write(f"[{job.platform}] {describe_job(job)}")
        if self.build is not None:  # keep the snapshot's jobs current for the final summary
            for known in self.build.jobs:
                if (known.id or known.platform) == key:
                    known.CopyFrom(job)


class RawJsonRenderer:
    """`--progress rawjson`: every event as one line of JSON, a polyarch.v1.BuildEvent in
    proto3's JSON mapping with the .proto field names and every field (empty ones as "", 0,
    [] or the enum's zero name): {"build": {...}}, {"job": {...}} or
    {"log": {"job_id", "platform", "attempt", "line"}}, in the order they arrive."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def handle(self, event: build_pb2.BuildEvent) -> None:
        from google.protobuf.json_format import MessageToDict

        # every field, empty ones too: consumers see one stable shape per event kind
        fields = MessageToDict(
            event, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        print(json.dumps(fields, separators=(",", ":")), file=self.out, flush=True)


def failure_summary(build: build_pb2.Build) -> list[str]:
    """What went wrong and what was pushed anyway, one platform per line."""
    lines = [f"build {build.id} {build_state(build.state)}: {build.error or 'a platform failed'}"]
    for job in build.jobs:
        if job.state == common_pb2.JOB_STATE_FAILED:
            step = f' at step "{job.failed_step}"' if job.failed_step else ""
            attempt = f", attempt {job.attempt}" if job.attempt else ""
            lines.append(
                f"  {job.platform}: FAILED{step}{_on_agent(job)}{attempt}: "
                f"{job.error or 'unknown error'}"
            )
        elif job.state == common_pb2.JOB_STATE_PUSHED:
            lines.append(f"  {job.platform}: pushed {job.digest}{_on_agent(job)}")
        else:
            lines.append(f"  {job.platform}: {job_state(job.state)}{_on_agent(job)}")
    if not build.index_digest:
        lines.append(f"no image index was pushed to {', '.join(build.tags) or 'the tags'}")
    return lines


def build_metadata(build: build_pb2.Build, coordinator: str = "") -> dict[str, Any]:
    """buildx's --metadata-file keys, plus polyarch's own per-platform record.
    buildx.build.ref names the build as buildx names its own (builder/node/ref):
    polyarch/<coordinator address>/<build id>."""
    descriptor: dict[str, Any] = {
        "mediaType": build.index_media_type,
        "digest": build.index_digest,
        "size": build.index_size,
    }
    return {
        "containerimage.descriptor": descriptor,
        "containerimage.digest": build.index_digest,
        "image.name": ",".join(build.tags),
        "buildx.build.ref": f"polyarch/{coordinator}/{build.id}",
        # as buildx: the config digest of a single-platform build's image
        **(
            {"containerimage.config.digest": build.jobs[0].config_digest}
            if len(build.jobs) == 1 and build.jobs[0].config_digest
            else {}
        ),
        "polyarch.build.id": build.id,
        "polyarch.platforms": {
            job.platform: {
                "digest": job.digest,
                "agent": job.agent,
                "mode": build_mode(job.mode),
                **({"attestation": job.attestation_digest} if job.attestation_digest else {}),
            }
            for job in build.jobs
        },
    }


def job_to_dict(job: build_pb2.Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "platform": job.platform,
        "state": job_state(job.state),
        "agent": job.agent,
        "mode": build_mode(job.mode),
        "digest": job.digest,
        "size": job.size,
        "media_type": job.media_type,
        "attempt": job.attempt,
        "error": job.error,
        "failed_step": job.failed_step,
        "requeue_reasons": list(job.requeue_reasons),
        "config_digest": job.config_digest,
        "queued_at": _time(job.queued_at),
        "started_at": _time(job.started_at),
        "finished_at": _time(job.finished_at),
    }


def build_to_dict(build: build_pb2.Build) -> dict[str, Any]:
    return {
        "id": build.id,
        "state": build_state(build.state),
        "tags": list(build.tags),
        "index_digest": build.index_digest,
        "index_media_type": build.index_media_type,
        "error": build.error,
        "context_digest": build.context_digest,
        "dockerfile": build.dockerfile,
        "emulation": _enum_name(common_pb2.EmulationPolicy, build.emulation, "EMULATION_POLICY_"),
        "created_at": _time(build.created_at),
        "finished_at": _time(build.finished_at),
        "jobs": [job_to_dict(job) for job in build.jobs],
    }


def agent_to_dict(agent: fleet_pb2.Agent) -> dict[str, Any]:
    return {
        "name": agent.name,
        "state": agent_state(agent.state),
        "builder": agent.builder,
        "native_platforms": list(agent.native_platforms),
        "emulated_platforms": list(agent.emulated_platforms),
        "slots": agent.slots,
        "running": [
            {
                "build_id": run.build_id,
                "job_id": run.job_id,
                "platform": run.platform,
                "attempt": run.attempt,
            }
            for run in agent.running
        ],
        "version": agent.version,
        "peer": agent.peer,
        "connected_at": _time(agent.connected_at),
        "last_heartbeat": _time(agent.last_heartbeat),
    }


def aligned(rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Left-aligned columns two spaces apart; trailing blanks trimmed."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def agents_table(agents: Sequence[fleet_pb2.Agent]) -> list[str]:
    rows = [
        [
            a.name,
            agent_state(a.state),
            a.builder,
            ",".join(a.native_platforms) or "-",
            ",".join(a.emulated_platforms) or "-",
            f"{len(a.running)}/{a.slots}",
            ",".join(f"{r.build_id}/{r.platform}" for r in a.running) or "-",
        ]
        for a in agents
    ]
    headers = ["NAME", "STATE", "BUILDER", "NATIVE", "EMULATED", "SLOTS", "RUNNING"]
    return aligned([headers, *rows])


def builds_table(builds: Sequence[build_pb2.Build]) -> list[str]:
    """One row per build, each followed by its platforms, indented."""
    headers = ["ID", "STATE", "TAGS", "INDEX-DIGEST"]
    head, *build_lines = aligned([headers, *(_build_row(b) for b in builds)])
    lines = [head]
    for build, row_line in zip(builds, build_lines, strict=True):
        lines.append(row_line)
        rows = [
            [
                job.platform,
                job_state(job.state),
                job.agent or "-",
                build_mode(job.mode) or "-",
                job.digest or "-",
                f"attempt {job.attempt}",
                (f'step "{job.failed_step}": ' if job.failed_step else "") + job.error,
            ]
            for job in build.jobs
        ]
        lines.extend(aligned(rows, indent="    "))
        for job in build.jobs:
            for reason in job.requeue_reasons:
                lines.append(f"      {job.platform} re-queued: {reason}")
    return lines


def _build_row(build: build_pb2.Build) -> list[str]:
    return [
        build.id,
        build_state(build.state),
        ",".join(build.tags) or "-",
        build.index_digest or "-",
    ]


def token_to_dict(token: trust_pb2.Token) -> dict[str, Any]:
    return {
        "id": token.id,
        "role": _enum_name(trust_pb2.TokenRole, token.role, "TOKEN_ROLE_"),
        "description": token.description,
        "created_at": _time(token.created_at),
        "expires_at": _time(token.expires_at) if token.HasField("expires_at") else None,
        "revoked_at": _time(token.revoked_at) if token.HasField("revoked_at") else None,
    }


def tokens_table(tokens: Sequence[trust_pb2.Token]) -> list[str]:
    rows = []
    for token in tokens:
        data = token_to_dict(token)
        state = "revoked" if data["revoked_at"] else "active"
        rows.append([data["id"], data["role"], state, data["expires_at"] or "never",
                     data["description"] or "-"])  # fmt: skip
    return aligned([["ID", "ROLE", "STATE", "EXPIRES", "DESCRIPTION"], *rows])
