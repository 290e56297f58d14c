"""What cosign signing costs on a 3-platform build: --sign-key against no signature.

Side by side in one run (bench/publish_cost.py: one real docker agent, amd64 native, arm64
and arm/v7 under QEMU, a local registry; modes alternated), provenance at its default
(mode=min) in both: the median wall time of the whole `polyarch build` and of index assembly
alone (verify, attest, push by digest, sign, push the tags).

    .venv/bin/python bench/sign_cost.py --builds 5
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from publish_cost import compare, parse_args

MODES = ("unsigned", "signed")


async def main() -> None:
    args = parse_args(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        key = work / "sign.key"  # outside the build context: never uploaded
        key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))  # fmt: skip
        await compare("signature", MODES,
                      lambda mode, _: ["--sign-key", str(key)] if mode == "signed" else [],
                      args, work)  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
