"""Where one farm build's time went, from its own record and the client's clock.

Usage: polyarch builds --json | overhead_phases.py BUILD_ID CLIENT_START CLIENT_END
(epoch seconds; the coordinator's timestamps come from the same machine's clock)."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any


def at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def phases(build: dict[str, Any], start: float, end: float) -> list[tuple[str, float]]:
    created, finished = at(build["created_at"]), at(build["finished_at"])
    jobs = sorted(build["jobs"], key=lambda j: j["platform"])
    rows = [("pack, upload, submit (client start to build created)", created - start)]
    for job in jobs:
        queued, began, ended = at(job["queued_at"]), at(job["started_at"]), at(job["finished_at"])
        rows.append((f"{job['platform']}: queued to started (dispatch, pick-up)", began - queued))
        rows.append((f"{job['platform']}: started to result (context, build, push)", ended - began))
    last_result = max(at(j["finished_at"]) for j in jobs)
    rows.append(
        ("last result to index pushed (verify children, push index)", finished - last_result)
    )
    rows.append(("index pushed to client exit (watch, final read)", end - finished))
    rows.append(("total (client clock)", end - start))
    return rows


def main() -> None:
    build_id, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    (build,) = [b for b in json.load(sys.stdin) if b["id"] == build_id]
    for label, value in phases(build, start, end):
        print(f"  {label:<60} {value:7.3f} s")


if __name__ == "__main__":
    main()
