"""`polyarch build --progress tty|auto` on real builders, its stderr a pseudo-terminal."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import struct
import termios
from pathlib import Path

import pytest

from polyarch.agent.builders.docker import DockerBuilder
from tests.support.farm import POLYARCH, Farm
from tests.support.services import Registry
from tests.support.terminal import play

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello"
COLUMNS = 160
CURSOR_UP = re.compile(r"\x1b\[\d+A")


def _drain(master: int) -> bytes:
    """Everything written to the terminal, until its last writer closed it."""
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def build_on_a_terminal(farm: Farm, *args: str) -> tuple[int, str, str]:
    """Runs `polyarch build ARGS` with stderr on a COLUMNS-wide pseudo-terminal and stdout on
    a pipe (as `digest=$(polyarch build ...)` in a terminal): (exit code, stdout, terminal)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, COLUMNS, 0, 0))
    env = farm.cli_env({"TERM": "xterm-256color"})
    for name in ("COLUMNS", "LINES", "NO_COLOR"):
        env.pop(name, None)
    try:
        proc = await asyncio.create_subprocess_exec(
            POLYARCH, "build", *args, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=slave,
        )  # fmt: skip
    finally:
        os.close(slave)
    try:
        terminal = asyncio.create_task(asyncio.to_thread(_drain, master))
        out, _ = await asyncio.wait_for(proc.communicate(), 600)
        screen = await asyncio.wait_for(terminal, 30)
    finally:
        if proc.returncode is None:  # timed out
            proc.kill()
            await proc.wait()
        os.close(master)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), screen.decode()


@pytest.mark.emulated
async def test_tty_progress_leaves_every_platform_done_with_its_digest_and_auto_picks_it(
    farm: Farm,
    docker_binary: str,
    registry: Registry,
    base_image: str,
    unique_repo: str,
    tmp_path: Path,
) -> None:
    await farm.add_agent("agent", DockerBuilder(docker_binary), native=["linux/amd64"],
                         emulated=["linux/arm64"], slots=2)  # fmt: skip
    repo = f"{registry.address}/{unique_repo}"
    metadata = tmp_path / "metadata.json"
    code, stdout, terminal = await build_on_a_terminal(
        farm, "--progress", "tty", "--platform", "linux/amd64,linux/arm64", "-t", f"{repo}:v1",
        "--build-arg", f"BASE={base_image}", "--metadata-file", str(metadata), str(EXAMPLE),
    )  # fmt: skip
    assert code == 0, terminal
    index = stdout.strip()
    assert CURSOR_UP.search(terminal), "the view was never redrawn in place"
    screen = play(terminal)
    (head,) = [line for line in screen if line.startswith("[+] build ")]
    at = screen.index(head)
    assert all(len(line) < COLUMNS for line in screen[at : at + 3]), screen
    assert head.endswith("(2/2 platforms done) succeeded"), screen
    platforms = json.loads(metadata.read_text())["polyarch.platforms"]
    for row, (platform, mode) in enumerate(
        [("linux/amd64", "native"), ("linux/arm64", "emulated")]
    ):
        digest = platforms[platform]["digest"]
        assert platforms[platform]["mode"] == mode
        line = screen[at + 1 + row]
        pattern = rf" {platform} \[#{{12}}\] +\d+\.\ds  done {digest[:19]}\b.*"
        assert re.fullmatch(pattern, line), screen
    assert screen[at + 3] == f"build {head.split()[2]} succeeded: {index}"

    # auto: tty on a terminal ...
    build = ["--platform", "linux/amd64", "-t", f"{repo}:v2", "--build-arg", f"BASE={base_image}"]
    code, stdout, terminal = await build_on_a_terminal(farm, *build, str(EXAMPLE))
    assert code == 0, terminal
    screen = play(terminal)
    assert CURSOR_UP.search(terminal) and any(" linux/amd64 [#" in line for line in screen)
    assert not any(line.startswith("[linux/amd64] ") for line in screen), screen
    # ... and plain on a pipe
    piped = await farm.cli("build", *build, "--progress", "auto", str(EXAMPLE))
    assert piped.returncode == 0, piped.stderr
    assert "\x1b[" not in piped.stderr and "[+] build" not in piped.stderr, piped.stderr
    assert re.search(r"^\[linux/amd64\] pushed sha256:", piped.stderr, re.MULTILINE), piped.stderr
    assert re.search(r"^\[linux/amd64\] #\d+ \[1/3\] FROM ", piped.stderr, re.MULTILINE)


async def test_tty_progress_prints_a_failed_platforms_last_log_lines(
    farm: Farm, docker_binary: str, registry: Registry, base_image: str, unique_repo: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    await farm.add_agent("agent", DockerBuilder(docker_binary), native=["linux/amd64"])
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(
        'ARG BASE\nFROM ${BASE}\nRUN echo "no luck today" >&2; exit 3\n'
    )
    code, _, terminal = await build_on_a_terminal(
        farm, "--progress", "tty", "--platform", "linux/amd64",
        "-t", f"{registry.address}/{unique_repo}:v1", "--build-arg", f"BASE={base_image}",
        str(context),
    )  # fmt: skip
    assert code == 1, terminal
    screen = play(terminal)
    (head,) = [line for line in screen if line.startswith("[+] build ")]
    at = screen.index(head)
    assert "(0/1 platforms done) failed: " in head, screen
    assert re.match(r" linux/amd64 \[#*-+\] +\d+\.\ds  failed at ", screen[at + 1]), screen
    assert screen[at + 2] == "--- linux/amd64: last log lines ---", screen
    shown = screen[at + 3 : screen.index(next(s for s in screen if s.startswith("build ")))]
    assert all(line.startswith("[linux/amd64] ") for line in shown), screen
    assert any("no luck today" in line for line in shown), screen
