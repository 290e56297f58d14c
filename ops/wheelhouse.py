"""Wheelhouses: polyarch's wheel plus its runtime dependencies, as binary wheels for one target."""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# What `uname -m` says for each name a user may give: Docker/Debian names and kernel names.
MACHINES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}
# pip installs the wheelhouse on the target: with it in the wheelhouse, the target needs no
# pip and no python3-venv (Debian splits ensurepip out), only `python3 -m venv --without-pip`.
INSTALLER = "pip"
PIP_TIMEOUT = 900.0


class WheelhouseError(RuntimeError):
    """A wheelhouse could not be built; the message says which step failed and pip's words."""


@dataclass(frozen=True)
class WheelTarget:
    """The interpreter and machine the wheels are for: CPython `python` on glibc Linux `machine`.

    `glibc` is the oldest glibc the target may have: wheels tagged for a newer one are skipped
    (2.17 = manylinux2014, which every current Debian, Ubuntu and RHEL exceeds)."""

    python: str = "3.11"
    machine: str = "x86_64"
    glibc: tuple[int, int] = (2, 17)

    @classmethod
    def parse(cls, python: str, arch: str, glibc: str = "2.17") -> WheelTarget:
        """From user spellings: python "3.11", arch "arm64"/"aarch64"/..., glibc "2.28"."""
        if not re.fullmatch(r"3\.\d{1,2}", python):
            raise WheelhouseError(f"python version must look like 3.11, got {python!r}")
        machine = MACHINES.get(arch.lower())
        if machine is None:
            raise WheelhouseError(f"unsupported arch {arch!r}: use one of {', '.join(MACHINES)}")
        major, _, minor = glibc.partition(".")
        if not (major == "2" and minor.isdigit() and int(minor) >= 17):
            raise WheelhouseError(f"glibc must be 2.17 or newer, like 2.36; got {glibc!r}")
        return cls(python, machine, (2, int(minor)))

    @property
    def abi(self) -> str:
        """CPython's ABI tag: cp311."""
        return "cp" + self.python.replace(".", "")

    @property
    def name(self) -> str:
        """The target as one word, for cache directories: cp311-aarch64-glibc2.17."""
        return f"{self.abi}-{self.machine}-glibc{self.glibc[0]}.{self.glibc[1]}"

    def pip_flags(self) -> list[str]:
        """pip's flags that resolve for this target instead of the running interpreter."""
        tags = [f"manylinux_2_{m}_{self.machine}" for m in range(self.glibc[1], 16, -1)]
        tags.append(f"manylinux2014_{self.machine}")  # the legacy alias of 2_17
        flags = ["--only-binary=:all:", "--implementation", "cp"]
        flags += ["--python-version", self.python, "--abi", self.abi]
        for tag in tags:
            flags += ["--platform", tag]
        return flags


@dataclass(frozen=True)
class Wheelhouse:
    """The wheels of one target inside `directory` (which may hold other targets' wheels too)."""

    directory: Path
    target: WheelTarget
    wheels: tuple[Path, ...]

    @property
    def total_bytes(self) -> int:
        return sum(w.stat().st_size for w in self.wheels)


def default_cache_dir() -> Path:
    """$POLYARCH_CACHE_DIR, else /var/cache/polyarch when writable (as deploy/ scripts), else
    ~/.cache/polyarch; downloads go under its wheels/ subdirectory."""
    if env := os.environ.get("POLYARCH_CACHE_DIR"):
        return Path(env) / "wheels"
    system = Path("/var/cache/polyarch")
    if os.access(system if system.exists() else system.parent, os.W_OK):
        return system / "wheels"
    return Path.home() / ".cache" / "polyarch" / "wheels"


def source_tree() -> Path:
    """The project checkout this module runs from (editable installs link into it)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise WheelhouseError(f"no pyproject.toml at {root}: pass the project's source directory")
    return root


def build_wheelhouse(
    dest: Path,
    target: WheelTarget,
    *,
    project: Path | None = None,
    cache_dir: Path | None = None,
    extra: Sequence[str] = (INSTALLER,),
) -> Wheelhouse:
    """Puts the project's wheel, every runtime dependency for `target` and `extra` into `dest`.

    Blocking (runs pip); call it through asyncio.to_thread from async code. Downloads are
    cached per target and resolved from the cache alone when it has everything, so a warm
    call makes no request to PyPI; the project's wheel is cached by the hash of its sources.
    """
    project = project or source_tree()
    cache = cache_dir or default_cache_dir()
    downloads = cache / target.name
    downloads.mkdir(parents=True, exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    with _locked(cache / f"{target.name}.lock"), tempfile.TemporaryDirectory() as tmp:
        own = project_wheel(project, cache / "project")
        resolve = [*target.pip_flags(), str(own), *extra]
        offline = ["--no-index", "--find-links", str(downloads), "--dest", tmp, *resolve]
        if _pip("download", *offline, check=False).returncode != 0:
            # Something is missing from the cache: fetch from the index, then resolve offline
            # again so the wheelhouse holds exactly the resolved set.
            _pip("download", "--dest", str(downloads), *resolve)
            for stale in downloads.glob(f"{own.name.split('-')[0]}-*.whl"):
                stale.unlink()  # our own wheel comes from project_wheel, never the cache
            _pip("download", *offline)
        wheels = []
        for wheel in sorted(Path(tmp).glob("*.whl")):
            shutil.copy2(wheel, dest / wheel.name)
            wheels.append(dest / wheel.name)
    return Wheelhouse(dest, target, tuple(wheels))


def project_wheel(project: Path, cache: Path) -> Path:
    """The project's own wheel (pure Python), built from a copy of its declared sources so the
    checkout gets no build/ litter; reused while those sources are unchanged."""
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    tops = ["pyproject.toml", "README.md", *_package_dirs(pyproject)]
    files = sorted(p for top in tops for p in _files(project / top) if "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(project)).encode() + b"\0" + path.read_bytes())
    out = cache / digest.hexdigest()[:16]
    if built := sorted(out.glob("*.whl")):
        return built[0]
    with tempfile.TemporaryDirectory() as tmp:
        for path in files:
            copy = Path(tmp, "src", path.relative_to(project))
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, copy)
        _pip("wheel", "--no-deps", "--wheel-dir", str(Path(tmp, "out")), str(Path(tmp, "src")))
        (wheel,) = Path(tmp, "out").glob("*.whl")
        out.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(wheel, out / wheel.name))


def _package_dirs(pyproject: dict[str, Any]) -> list[str]:
    package_dir = pyproject.get("tool", {}).get("setuptools", {}).get("package-dir", {})
    return sorted({str(d) for d in package_dir.values()})


def _files(top: Path) -> Iterator[Path]:
    if top.is_file():
        yield top
    elif top.is_dir():
        yield from (p for p in top.rglob("*") if p.is_file())


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One writer per target's download cache (parallel installs to hosts of one kind)."""
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _pip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "-q"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT)
    if check and done.returncode != 0:
        raise WheelhouseError(
            f"pip {args[0]} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}"
        )
    return done


# -- `polyarch wheelhouse` ---------------------------------------------------------------------


def add_wheelhouse_command(commands: Any) -> None:
    """Adds `polyarch wheelhouse` to the CLI's subcommands (an argparse subparsers object)."""
    p = commands.add_parser(
        "wheelhouse", help="download polyarch's wheel and dependencies for a Python and arch",
        description="Put polyarch's wheel, its runtime dependencies and pip, as binary wheels "
        "for one CPython version and machine, into DIR (which may hold other targets' wheels). "
        "Prints one `WHEEL BYTES` line per wheel on stdout and the total on stderr.",
    )  # fmt: skip
    p.add_argument("--arch", default=platform.machine(), help="amd64|arm64 (default: this host)")
    p.add_argument("--python", default="3.11", metavar="X.Y", help="target CPython (3.11)")
    p.add_argument("--glibc", default="2.17", metavar="2.N", help="the target's oldest glibc")
    p.add_argument("--project", type=Path, help="source directory (default: this checkout)")
    p.add_argument("directory", type=Path, metavar="DIR")
    p.set_defaults(handler=lambda args, _session: run_wheelhouse_command(args))


def run_wheelhouse_command(args: argparse.Namespace) -> int:
    try:
        target = WheelTarget.parse(args.python, args.arch, args.glibc)
        house = build_wheelhouse(args.directory, target, project=args.project)
    except WheelhouseError as exc:
        print(f"polyarch: error: {exc}", file=sys.stderr)
        return 1
    for wheel in house.wheels:
        print(f"{wheel.name} {wheel.stat().st_size}")
    total = house.total_bytes
    print(f"{len(house.wheels)} wheels for {target.name}: {total} bytes", file=sys.stderr)
    return 0
