"""--progress tty: the live per-platform view, played through a tiny terminal emulator."""

from __future__ import annotations

import io
import re
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from polyarch.client import cli
from polyarch.client.tty_render import BAR_CELLS, TtyRenderer, fit, progress_mode
from polyarch.proto.v1 import build_pb2, build_pb2_grpc, common_pb2
from tests.support.poll import poll_until
from tests.support.terminal import SGR, Screen, play

INDEX = "sha256:" + "1" * 64
AMD64 = "sha256:" + "a" * 64
ARM64 = "sha256:" + "b" * 64
NATIVE, EMULATED = common_pb2.BUILD_MODE_NATIVE, common_pb2.BUILD_MODE_EMULATED
QUEUED, ASSIGNED, RUNNING = (
    common_pb2.JOB_STATE_QUEUED, common_pb2.JOB_STATE_ASSIGNED, common_pb2.JOB_STATE_RUNNING,
)  # fmt: skip
PUSHED, FAILED = common_pb2.JOB_STATE_PUSHED, common_pb2.JOB_STATE_FAILED
BAR = re.compile(r"\[(#*)(-*)\]")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def job(
    platform: str, state: common_pb2.JobState, attempt: int = 1, **fields: Any
) -> build_pb2.Job:
    return build_pb2.Job(id=f"j-{platform}", platform=platform, state=state, attempt=attempt,
                         **fields)  # fmt: skip


def job_event(platform: str, state: common_pb2.JobState, **fields: Any) -> build_pb2.BuildEvent:
    return build_pb2.BuildEvent(job=job(platform, state, **fields))


def log_event(platform: str, line: str, attempt: int = 1) -> build_pb2.BuildEvent:
    log = build_pb2.LogLine(job_id=f"j-{platform}", platform=platform, attempt=attempt, line=line)
    return build_pb2.BuildEvent(log=log)


def build_event(
    state: common_pb2.BuildState, *jobs: build_pb2.Job, **fields: Any
) -> build_pb2.BuildEvent:
    build = build_pb2.Build(id="b-1", state=state, tags=["127.0.0.1:5000/team/app:1"],
                            jobs=list(jobs), **fields)  # fmt: skip
    return build_pb2.BuildEvent(build=build)


SNAPSHOT = build_event(
    common_pb2.BUILD_STATE_QUEUED, job("linux/amd64", QUEUED), job("linux/arm64", QUEUED)
)


class Harness:
    """A renderer on a StringIO at a fixed width, fed events at fake times."""

    def __init__(self, width: int = 120, rows: int = 40, color: bool = False) -> None:
        self.out = io.StringIO()
        self.clock = Clock()
        self.renderer = TtyRenderer(self.out, width=lambda: width, rows=lambda: rows,
                                    clock=self.clock, color=color)  # fmt: skip
        self.width = width

    def feed(self, *events: build_pb2.BuildEvent, at: float | None = None) -> Harness:
        for event in events:
            if at is not None:
                self.clock.now = at
            self.renderer.handle(event)
        return self

    def tick(self, at: float) -> Harness:
        self.clock.now = at
        self.renderer.refresh()
        return self

    @property
    def screen(self) -> list[str]:
        return play(self.out.getvalue())

    def line(self, platform: str) -> str:
        (found,) = [line for line in self.screen if line.startswith(f" {platform} ")]
        return found

    def bar(self, platform: str) -> int:
        match = BAR.search(self.line(platform))
        assert match is not None and len(match[1]) + len(match[2]) == BAR_CELLS
        return len(match[1])


def running(t: Harness) -> Harness:
    """amd64 native on agent-a at step 2 of 3, arm64 emulated on agent-b at step 3 of 3."""
    t.feed(SNAPSHOT, at=100.0)
    t.feed(job_event("linux/amd64", ASSIGNED, agent="agent-a", mode=NATIVE), at=100.5)
    t.feed(job_event("linux/amd64", RUNNING, agent="agent-a", mode=NATIVE), at=101.0)
    t.feed(job_event("linux/arm64", RUNNING, agent="agent-b", mode=EMULATED), at=101.2)
    t.feed(log_event("linux/amd64", "#4 [1/3] FROM 127.0.0.1:5000/polyarch/busybox\n"), at=102.0)
    t.feed(log_event("linux/amd64", "#5 [2/3] RUN make\n"), at=102.2)
    t.feed(log_event("linux/amd64", "\n"), at=102.3)  # BuildKit's blank line between steps
    t.feed(log_event("linux/arm64", "STEP 3/3: COPY greeting.txt /greeting.txt\n"), at=103.0)
    return t.tick(at=104.0)


def test_the_live_view_has_a_header_and_a_line_per_platform() -> None:
    t = running(Harness())
    assert t.screen == [
        "[+] build b-1 4.0s (0/2 platforms done) queued",
        " linux/amd64 [####--------]    4.0s  building on agent-a native    #5 [2/3] RUN make",
        " linux/arm64 [#######-----]    4.0s  building on agent-b emulated"
        "  STEP 3/3: COPY greeting.txt /greeting.txt",
    ]


def test_the_bar_shows_known_phases_not_a_percentage() -> None:
    t = Harness().feed(SNAPSHOT, at=100.0).tick(101.0)
    assert t.bar("linux/amd64") == 0  # queued
    t.feed(job_event("linux/amd64", ASSIGNED, agent="a", mode=NATIVE)).tick(102.0)
    assert t.bar("linux/amd64") == 1  # assigned
    t.feed(job_event("linux/amd64", RUNNING, agent="a", mode=NATIVE)).tick(103.0)
    assert t.bar("linux/amd64") == 2  # building, no step seen yet
    t.feed(log_event("linux/amd64", "#6 [stage-1 4/4] COPY --from=build /app /app")).tick(104.0)
    assert t.bar("linux/amd64") == 7  # 3 of 4 steps done: 2 + 7 * 3/4, rounded
    t.feed(log_event("linux/amd64", "#7 [stage-1 2/4] RUN late output")).tick(105.0)
    assert t.bar("linux/amd64") == 7  # never moves back
    t.feed(log_event("linux/amd64", "polyarch: pushing 127.0.0.1:5000/team/app:x")).tick(106.0)
    assert t.bar("linux/amd64") == 10
    assert "pushing from a native" in t.line("linux/amd64")
    t.feed(job_event("linux/amd64", PUSHED, agent="a", mode=NATIVE, digest=AMD64)).tick(107.0)
    assert t.bar("linux/amd64") == BAR_CELLS
    # docker push's own first line also marks the push (an agent without the marker)
    t.feed(job_event("linux/arm64", RUNNING, agent="b", mode=EMULATED))
    t.feed(log_event("linux/arm64", "The push refers to repository [127.0.0.1:5000/team/app]"))
    assert t.tick(108.0).bar("linux/arm64") == 10


def test_a_requeued_job_starts_its_bar_and_log_again() -> None:
    t = running(Harness())
    reason = ["agent agent-b lost"]
    t.feed(job_event("linux/arm64", QUEUED, attempt=2, requeue_reasons=reason), at=105.0)
    t.feed(log_event("linux/arm64", "STEP 2/3: RUN late line of attempt 1", attempt=1))
    assert t.tick(106.0).bar("linux/arm64") == 0
    assert t.line("linux/arm64").rstrip().endswith("re-queued (attempt 2)")


def test_successful_build_leaves_a_static_summary_with_short_digests() -> None:
    t = running(Harness())
    t.feed(log_event("linux/amd64", "polyarch: pushing 127.0.0.1:5000/team/app:polyarch-b-1"))
    t.feed(job_event("linux/amd64", PUSHED, agent="agent-a", mode=NATIVE, digest=AMD64), at=110)
    amd = job("linux/amd64", PUSHED, agent="agent-a", mode=NATIVE, digest=AMD64)
    arm = job("linux/arm64", PUSHED, agent="agent-b", mode=EMULATED, digest=ARM64)
    t.feed(job_event("linux/arm64", PUSHED, agent="agent-b", mode=EMULATED, digest=ARM64), at=112)
    t.feed(build_event(common_pb2.BUILD_STATE_ASSEMBLING, amd, arm), at=113.0)
    t.feed(build_event(common_pb2.BUILD_STATE_SUCCEEDED, amd, arm, index_digest=INDEX), at=115)
    final = t.screen
    assert final == [
        "[+] build b-1 15.0s (2/2 platforms done) succeeded",
        " linux/amd64 [############]   10.0s  done sha256:aaaaaaaaaaaa"
        "  polyarch: pushing 127.0.0.1:5000/team/app:polyarch-b-1",
        " linux/arm64 [############]   12.0s  done sha256:bbbbbbbbbbbb"
        "  STEP 3/3: COPY greeting.txt /greeting.txt",
        f"build b-1 succeeded: {INDEX}",
    ]
    written = t.out.getvalue()
    t.tick(200.0)
    t.renderer.note("a message after the end")  # printed below, the summary stays
    t.renderer.close()
    assert t.out.getvalue() == written + "a message after the end\n"


def test_a_failed_platform_prints_its_last_log_lines_in_full() -> None:
    t = running(Harness(width=60))
    long_line = "#5 0.412 make: *** [Makefile:3: all] Error 1 " + "x" * 80
    t.feed(log_event("linux/amd64", long_line + "\n"), at=105.0)
    t.feed(log_event("linux/amd64", "#5 ERROR: process did not complete successfully\n"))
    failed = job("linux/amd64", FAILED, agent="agent-a", mode=NATIVE,
                 failed_step="[2/3] RUN make", error="exit code: 2")  # fmt: skip
    arm = job("linux/arm64", RUNNING, agent="agent-b", mode=EMULATED)
    t.feed(build_pb2.BuildEvent(job=failed), at=106.0)
    t.feed(build_event(common_pb2.BUILD_STATE_FAILED, failed, arm, error="linux/amd64 failed"),
           at=107.0)  # fmt: skip
    screen = t.screen
    assert screen[0] == "[+] build b-1 7.0s (0/2 platforms done) failed: linux/amd64"
    assert screen[1] == ' linux/amd64 [####--------]    6.0s  failed at "[2/3] RUN m'
    assert screen[3:] == [
        "--- linux/amd64: last log lines ---",
        "[linux/amd64] #4 [1/3] FROM 127.0.0.1:5000/polyarch/busybox",
        "[linux/amd64] #5 [2/3] RUN make",
        "[linux/amd64] ",
        f"[linux/amd64] {long_line}",  # in full, wider than the terminal
        "[linux/amd64] #5 ERROR: process did not complete successfully",
    ]
    assert all(len(line) <= 59 for line in screen[:3])


def test_every_live_line_is_cut_to_the_terminal_width() -> None:
    t = running(Harness(width=50))
    t.feed(log_event("linux/arm64", "#7 " + "y" * 200), at=105.0)
    screen = Screen().feed(t.tick(106.0).out.getvalue())
    assert screen.widest == 49  # one column short of the width: no terminal wraps the line
    assert screen.lines[1:] == [
        " linux/amd64 [####--------]    6.0s  building on ",
        " linux/arm64 [#######-----]    6.0s  building on ",
    ]
    wide = running(Harness(width=120))
    wide.feed(log_event("linux/arm64", "#8 " + "構築" * 60), at=105.0)
    line = wide.tick(106.0).line("linux/arm64")
    assert line.endswith("emulated  #8 " + "構築" * 12)  # two columns each: 119 - 67 - 3 = 49
    assert fit("構築x", 3) == "構" and fit("構築x", 5) == "構築x"


def test_a_builders_escapes_and_carriage_returns_never_reach_the_screen() -> None:
    t = running(Harness(width=120))
    t.feed(log_event("linux/arm64", "\x1b[31mred\x1b[0m\ttabbed\x07"), at=105.0)
    assert t.tick(106.0).line("linux/arm64").endswith("emulated  red tabbed")
    t.feed(log_event("linux/arm64", "#9 copying 10%\r#9 copying 100%\r\n"), at=107.0)
    assert t.tick(108.0).line("linux/arm64").endswith("emulated  #9 copying 100%")
    assert "\x1b[31m" not in t.out.getvalue() and "\x07" not in t.out.getvalue()


def test_redraws_at_most_ten_times_a_second_and_on_the_timer() -> None:
    t = Harness().feed(SNAPSHOT, at=100.0)
    for n in range(50):
        t.feed(log_event("linux/amd64", f"#5 line {n}"), at=100.05)
    assert t.out.getvalue().count("[+] build") == 1  # the snapshot's frame only
    t.tick(100.125)
    assert t.out.getvalue().count("[+] build") == 2
    assert t.line("linux/amd64").endswith("#5 line 49")
    t.tick(100.2)
    assert t.out.getvalue().count("[+] build") == 2
    t.tick(101.0)  # nothing happened but the clock: the elapsed times move
    assert t.screen[0] == "[+] build b-1 1.0s (0/2 platforms done) queued"


def test_too_many_platforms_for_the_terminal_are_summed_up_until_the_end() -> None:
    t = Harness(rows=6)
    platforms = [f"linux/arch{n}" for n in range(8)]
    t.feed(build_event(common_pb2.BUILD_STATE_QUEUED, *(job(p, QUEUED) for p in platforms)))
    assert t.screen[1:] == [
        " linux/arch0 [------------]    0.0s  queued",
        " linux/arch1 [------------]    0.0s  queued",
        " linux/arch2 [------------]    0.0s  queued",
        " ... 5 more platforms",
    ]
    t.feed(build_event(common_pb2.BUILD_STATE_CANCELLED, *(job(p, QUEUED) for p in platforms)))
    assert len(t.screen) == 9


def test_a_note_is_printed_above_the_live_view() -> None:
    t = running(Harness())
    t.renderer.note("lost the coordinator (connection refused); re-attaching to build b-1")
    screen = t.screen
    assert screen[0] == "lost the coordinator (connection refused); re-attaching to build b-1"
    assert screen[1].startswith("[+] build b-1 4.0s") and len(screen) == 4


def test_no_color_turns_colours_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    coloured = io.StringIO()
    TtyRenderer(coloured, width=lambda: 80, rows=lambda: 24).handle(SNAPSHOT)
    assert SGR.search(coloured.getvalue())
    monkeypatch.setenv("NO_COLOR", "1")
    plain = io.StringIO()
    TtyRenderer(plain, width=lambda: 80, rows=lambda: 24).handle(SNAPSHOT)
    assert not SGR.search(plain.getvalue())
    assert play(plain.getvalue()) == play(coloured.getvalue())


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_tty_on_a_terminal_and_plain_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")
    assert progress_mode("auto", Terminal()) == "tty"
    assert progress_mode("auto", io.StringIO()) == "plain"
    assert progress_mode("plain", Terminal()) == "plain"
    assert progress_mode("tty", io.StringIO()) == "tty"  # asked for: drawn anyway (README)
    monkeypatch.setenv("TERM", "dumb")  # no cursor movement there
    assert progress_mode("auto", Terminal()) == "plain"


async def test_the_timer_redraws_while_following_and_stops_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("polyarch.client.tty_render.REDRAW_INTERVAL", 0.01)
    t = Harness()
    async with t.renderer.live():
        t.feed(SNAPSHOT, at=100.0)
        t.clock.now = 103.0
        await poll_until(lambda: t.screen[0].startswith("[+] build b-1 3.0s"), timeout=5,
                         message="the timer redrew the elapsed time")  # fmt: skip
    left = t.out.getvalue()
    t.feed(log_event("linux/amd64", "after the end"), at=104.0)
    assert t.out.getvalue() == left  # interrupted or ended: the last screen stays as it was


def test_polyarch_build_progress_tty_draws_on_stderr_and_prints_the_digest_on_stdout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.unit.test_cli import AMD64, ARM64, INDEX, FakeCoordinator, build_argv

    monkeypatch.setenv("POLYARCH_INSECURE", "1")  # the fake coordinator speaks plaintext
    for name in ("POLYARCH_TOKEN", "POLYARCH_TOKEN_FILE", "POLYARCH_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setenv("NO_COLOR", "1")
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    build_pb2_grpc.add_BuildServiceServicer_to_server(FakeCoordinator(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        code = cli.main(build_argv(f"127.0.0.1:{port}", tmp_path, "--progress", "tty"))
    finally:
        server.stop(None)
    out, err = capsys.readouterr()
    assert code == 0 and out.splitlines() == [INDEX]
    screen = play(err)
    assert screen[0].startswith("context sha256:") and screen[1].startswith("submitted build b-1")
    assert re.fullmatch(r"\[\+\] build b-1 \d+\.\ds \(2/2 platforms done\) succeeded", screen[2])
    assert re.fullmatch(rf" linux/amd64 \[#{{12}}\] +\d+\.\ds  done {AMD64[:19]}", screen[3])
    arm = rf" linux/arm64 \[#{{12}}\] +\d+\.\ds  done {ARM64[:19]}  #5 \[2/3\] RUN make"
    assert re.fullmatch(arm, screen[4])
    assert screen[5:] == [f"build b-1 succeeded: {INDEX}"]
