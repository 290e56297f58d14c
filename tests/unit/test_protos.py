"""The committed generated protobuf/gRPC code matches what proto/generate.py produces now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_current() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, (
        f"proto/generate.py --check exited {done.returncode}:\n{done.stdout}{done.stderr}"
    )
