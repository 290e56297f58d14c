"""What SLSA provenance costs on a 3-platform build: --provenance=false, mode=min and mode=max.

Side by side in one run (bench/publish_cost.py: one real docker agent, amd64 native, arm64
and arm/v7 under QEMU, a local registry; modes alternated): the median wall time of the
whole `polyarch build` and of index assembly alone.

    .venv/bin/python bench/provenance_cost.py --builds 5
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from publish_cost import compare, parse_args

MODES = ("false", "mode=min", "mode=max")


async def main() -> None:
    args = parse_args(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        await compare("provenance", MODES, lambda mode, _: [f"--provenance={mode}"], args,
                      Path(tmp))  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
