"""Builds and jobs as database rows, for every SQL StateStore (SQLite, PostgreSQL)."""

from __future__ import annotations

import json
from typing import Any

from polyarch.coordinator.core.model import (
    BuildRecord,
    BuildSpec,
    BuildState,
    EmulationPolicy,
    JobRecord,
    JobState,
    Mode,
    spec_json,
)
from polyarch.coordinator.core.presence import AgentPresence

Row = tuple[Any, ...]

BUILD_COLUMNS = (
    "id, state, spec, created_at, finished_at, idempotency_key, "
    "index_digest, index_media_type, index_size, error, owner, request_hash"
)
JOB_COLUMNS = (
    "id, build_id, platform, state, agent, mode, attempt, digest, size, media_type, "
    "error, failed_step, queued_at, started_at, finished_at, requeue_reasons, config_digest, "
    "attestation_digest, attestation_size"
)
# Where a job row keeps its id, state and attempt (a transition is a change of the last two).
JOB_ID, JOB_STATE, JOB_ATTEMPT = 0, 3, 6
# Where a build row keeps its created_at and idempotency key.
BUILD_CREATED_AT, BUILD_KEY = 3, 5
# Terminal build states: unfinished_builds leaves them out.
TERMINAL_STATES = tuple(s.value for s in BuildState if s.terminal)


def upsert_assignments(columns: str) -> str:
    """`a = excluded.a, ...` for every column but the first (the id)."""
    names = [c.strip() for c in columns.split(",")]
    return ", ".join(f"{n} = excluded.{n}" for n in names[1:])


def spec_from_json(text: str) -> BuildSpec:
    data: dict[str, Any] = json.loads(text)
    data["emulation"] = EmulationPolicy(data["emulation"])
    return BuildSpec(**data)


def build_row(build: BuildRecord) -> Row:
    """The whole build, as create_build writes it (an empty key is NULL: keys never collide)."""
    return (
        build.id, build.state.value, spec_json(build.spec), build.created_at,
        build.finished_at, build.idempotency_key or None, build.index_digest,
        build.index_media_type, build.index_size, build.error, build.owner,
        build.request_hash,
    )  # fmt: skip


def outcome_row(build: BuildRecord) -> Row:
    """What save_build writes: state and outcome, then the id (the request is written once)."""
    return (
        build.state.value, build.finished_at, build.index_digest, build.index_media_type,
        build.index_size, build.error, build.id,
    )  # fmt: skip


def job_row(job: JobRecord) -> Row:
    return (
        job.id, job.build_id, job.platform, job.state.value, job.agent,
        job.mode.value if job.mode else None, job.attempt, job.digest, job.size,
        job.media_type, job.error, job.failed_step, job.queued_at, job.started_at,
        job.finished_at, json.dumps(job.requeue_reasons) if job.requeue_reasons else "[]",
        job.config_digest, job.attestation_digest, job.attestation_size,
    )  # fmt: skip


def build_from_row(row: Row) -> BuildRecord:
    return BuildRecord(
        id=row[0], state=BuildState(row[1]), spec=spec_from_json(row[2]),
        created_at=row[3], finished_at=row[4], idempotency_key=row[5] or "",
        index_digest=row[6], index_media_type=row[7], index_size=row[8], error=row[9],
        owner=row[10], request_hash=row[11],
    )  # fmt: skip


def job_from_row(row: Row) -> JobRecord:
    return JobRecord(
        id=row[0], build_id=row[1], platform=row[2], state=JobState(row[3]), agent=row[4],
        mode=Mode(row[5]) if row[5] else None, attempt=row[6], digest=row[7], size=row[8],
        media_type=row[9], error=row[10], failed_step=row[11], queued_at=row[12],
        started_at=row[13], finished_at=row[14], requeue_reasons=json.loads(row[15]),
        config_digest=row[16], attestation_digest=row[17], attestation_size=row[18],
    )  # fmt: skip


# Agents' arrivals and departures (presence.py); %s placeholders (SQLite swaps in ?).
UPSERT_PRESENCE = (
    "INSERT INTO agent_presence (name, native, emulated, present, at) "
    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET native = excluded.native, "
    "emulated = excluded.emulated, present = excluded.present, at = excluded.at"
)
PRESENT_AGENTS = (
    "SELECT name, native, emulated, present, at FROM agent_presence "
    "WHERE present = 1 OR at >= %s ORDER BY name"
)


def presence_row(presence: AgentPresence) -> Row:
    return (presence.name, json.dumps(presence.native), json.dumps(presence.emulated),
            int(presence.present), presence.at)  # fmt: skip


def presence_from_row(row: Row) -> AgentPresence:
    name, native, emulated, present, at = row
    return AgentPresence(str(name), tuple(json.loads(native)), tuple(json.loads(emulated)),
                         bool(present), float(at))  # fmt: skip
