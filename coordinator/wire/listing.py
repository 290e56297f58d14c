"""ListBuilds pages: a stable cursor, a page size cap and a byte budget per response."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Awaitable, Callable

from polyarch.coordinator.core.model import BuildRecord, InvalidRequest, JobRecord
from polyarch.coordinator.limits import MIB, Limits, clip_utf8
from polyarch.coordinator.wire import convert
from polyarch.proto.v1 import build_pb2

DEFAULT_PAGE_SIZE = 50
# gRPC clients refuse messages over 4 MiB by default; a page stops well below that.
RESPONSE_BUDGET_BYTES = 3 * MIB
# Free text in a listed build (errors, requeue reasons, failed steps) comes from agents and
# registries; a listing shows this much of each (GetBuild shows all of it).
LISTED_TEXT_BYTES = 2048
LISTED_REQUEUE_REASONS = 8
# Why one build always fits the budget, at the default limits: tags are capped at
# max_tags (64) x 512 bytes = 32 KiB; jobs at max_platforms (32), each job's free text at
# (1 + 1 + 8) x 2 KiB by trimming, plus under 1 KiB of ids, names, digests and times:
# 32 x 21 KiB = 672 KiB; the dockerfile path at 4 KiB. Well under 3 MiB, so every page
# makes progress; the budget, not the page size, is what bounds a response.

# (limit, cursor) -> builds newest first after the cursor, each with its jobs
Pager = Callable[
    [int, tuple[float, str] | None], Awaitable[list[tuple[BuildRecord, list[JobRecord]]]]
]


def encode_token(build: BuildRecord) -> str:
    """An opaque cursor: the (created_at, id) of the last build of a page."""
    text = json.dumps([build.created_at, build.id])
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_token(token: str) -> tuple[float, str] | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created_at, build_id = json.loads(raw)
        if isinstance(created_at, int | float) and isinstance(build_id, str):
            return float(created_at), build_id
    except (binascii.Error, ValueError, TypeError):
        pass
    raise InvalidRequest(f"malformed page_token {token[:40]!r}: pass a next_page_token back")


def page_size(request: build_pb2.ListBuildsRequest, limits: Limits) -> int:
    """page_size, else the old limit, else the default; never above max_list_page."""
    wanted = request.page_size if request.page_size > 0 else request.limit
    return min(wanted if wanted > 0 else DEFAULT_PAGE_SIZE, limits.max_list_page)


async def list_page(
    pager: Pager, request: build_pb2.ListBuildsRequest, limits: Limits
) -> build_pb2.ListBuildsResponse:
    """One page, newest first, with the token of the next (or "" when there is none)."""
    size = page_size(request, limits)
    # one more than asked: tells whether a next page exists without a trailing empty one
    records = await pager(size + 1, decode_token(request.page_token))
    response = build_pb2.ListBuildsResponse()
    used = 0
    for index, (record, jobs) in enumerate(records[:size]):
        message = trimmed(convert.build_message(record, jobs))
        cost = message.ByteSize() + 8  # field tag and length prefix
        if response.builds and used + cost > RESPONSE_BUDGET_BYTES:
            response.next_page_token = encode_token(records[index - 1][0])
            return response
        response.builds.append(message)
        used += cost
    if len(records) > size:
        response.next_page_token = encode_token(records[size - 1][0])
    return response


def trimmed(build: build_pb2.Build) -> build_pb2.Build:
    """The build with its free text clipped for a listing."""
    build.error = _clip(build.error)
    for job in build.jobs:
        job.error = _clip(job.error)
        job.failed_step = _clip(job.failed_step)
        reasons = [_clip(r) for r in job.requeue_reasons[-LISTED_REQUEUE_REASONS:]]
        del job.requeue_reasons[:]
        job.requeue_reasons.extend(reasons)
    return build


def _clip(text: str) -> str:
    kept, cut = clip_utf8(text, LISTED_TEXT_BYTES)
    return f"{kept}... [{cut} more bytes; GetBuild has all]" if cut else text
