"""Scheduling decisions of the pure scheduler: native first, least loaded, policy, fairness."""

from polyarch.coordinator.core.model import EmulationPolicy, Mode
from polyarch.coordinator.core.scheduler import AgentView, Placement, QueuedJob, Scheduler
from polyarch.proto.platforms import Platform, parse_platform

AMD64 = parse_platform("linux/amd64")
ARM64 = parse_platform("linux/arm64")
ARMV7 = parse_platform("linux/arm/v7")


def agent(
    name: str,
    native: tuple[Platform, ...] = (),
    emulated: tuple[Platform, ...] = (),
    slots: int = 1,
) -> AgentView:
    return AgentView(name, frozenset(native), frozenset(emulated), slots)


def job(
    job_id: str,
    platform: Platform,
    build: str = "b1",
    policy: EmulationPolicy = EmulationPolicy.FALLBACK,
    repository: str = "team/app",
    avoid: frozenset[str] = frozenset(),
) -> QueuedJob:
    return QueuedJob(job_id, build, platform, policy, repository, avoid)


def test_native_agent_wins_over_an_emulating_one() -> None:
    s = Scheduler()
    s.add_agent(agent("emulator", native=(AMD64,), emulated=(ARM64,), slots=4))
    s.add_agent(agent("arm-box", native=(ARM64,)))
    s.enqueue(job("j1", ARM64))
    assert s.schedule() == [Placement("j1", "arm-box", Mode.NATIVE)]


def test_fallback_waits_for_a_busy_native_agent_rather_than_emulating() -> None:
    s = Scheduler()
    s.add_agent(agent("emulator", native=(AMD64,), emulated=(ARM64,), slots=4))
    s.add_agent(agent("arm-box", native=(ARM64,), slots=1))
    s.enqueue(job("j1", ARM64))
    s.enqueue(job("j2", ARM64))
    assert s.schedule() == [Placement("j1", "arm-box", Mode.NATIVE)]
    assert list(s.queue) == ["j2"]
    s.release("j1")
    assert s.schedule() == [Placement("j2", "arm-box", Mode.NATIVE)]


def test_fallback_emulates_when_no_agent_is_native() -> None:
    s = Scheduler()
    s.add_agent(agent("emulator", native=(AMD64,), emulated=(ARM64, ARMV7), slots=2))
    s.enqueue(job("j1", ARM64))
    s.enqueue(job("j2", ARMV7))
    assert s.schedule() == [
        Placement("j1", "emulator", Mode.EMULATED),
        Placement("j2", "emulator", Mode.EMULATED),
    ]


def test_never_policy_refuses_emulation() -> None:
    s = Scheduler()
    s.add_agent(agent("emulator", native=(AMD64,), emulated=(ARM64,)))
    s.enqueue(job("j1", ARM64, policy=EmulationPolicy.NEVER))
    assert s.eligible_modes(ARM64, EmulationPolicy.NEVER) == set()
    assert s.schedule() == []


def test_allow_policy_emulates_while_the_native_agent_is_busy() -> None:
    s = Scheduler()
    s.add_agent(agent("emulator", native=(AMD64,), emulated=(ARM64,)))
    s.add_agent(agent("arm-box", native=(ARM64,)))
    s.enqueue(job("j1", ARM64, policy=EmulationPolicy.ALLOW))
    s.enqueue(job("j2", ARM64, policy=EmulationPolicy.ALLOW))
    assert s.schedule() == [
        Placement("j1", "arm-box", Mode.NATIVE),
        Placement("j2", "emulator", Mode.EMULATED),
    ]


def test_least_loaded_native_agent_wins() -> None:
    s = Scheduler()
    s.add_agent(agent("a", native=(AMD64,), slots=4))
    s.add_agent(agent("b", native=(AMD64,), slots=4))
    for i in range(4):
        s.enqueue(job(f"j{i}", AMD64, build=f"b{i}", repository=f"team/r{i}"))
    assert [p.agent for p in s.schedule()] == ["a", "b", "a", "b"]


def test_load_is_relative_to_slots() -> None:
    s = Scheduler()
    s.add_agent(agent("small", native=(AMD64,), slots=1))
    s.add_agent(agent("big", native=(AMD64,), slots=4))
    s.add_agent(agent("busy", native=(AMD64,), slots=2))
    s.adopt_running("old", "b0", "busy")
    s.enqueue(job("j1", AMD64))
    assert s.schedule()[0].agent == "big"


def test_tie_goes_to_the_agent_that_built_the_repository_last() -> None:
    s = Scheduler()
    s.add_agent(agent("a", native=(AMD64,)))
    s.add_agent(agent("b", native=(AMD64,)))
    s.enqueue(job("warmup", AMD64, repository="team/other"))
    s.enqueue(job("warmup2", AMD64, build="b2", repository="team/app"))
    placed = {p.job_id: p.agent for p in s.schedule()}
    s.release("warmup")
    s.release("warmup2")
    s.enqueue(job("j", AMD64, build="b3", repository="team/app"))
    assert s.schedule()[0].agent == placed["warmup2"]


def test_draining_agent_gets_no_new_jobs() -> None:
    s = Scheduler()
    s.add_agent(agent("a", native=(AMD64,)))
    s.set_draining("a", True)
    s.enqueue(job("j1", AMD64))
    assert s.schedule() == []
    s.set_draining("a", False)
    assert s.schedule() == [Placement("j1", "a", Mode.NATIVE)]


def test_jobs_of_different_builds_interleave() -> None:
    s = Scheduler()
    s.add_agent(agent("a", native=(AMD64,), slots=1))
    for i in range(3):
        s.enqueue(job(f"big{i}", AMD64, build="big"))
    s.enqueue(job("small0", AMD64, build="small"))
    assert s.schedule()[0].job_id == "big0"
    s.release("big0")
    # "big" has run one job, "small" none: a fresh placement round treats them equally
    # by running count; with big0 done both have 0 running, so submission order decides.
    assert s.schedule()[0].job_id == "big1"
    # while big1 runs on a second agent's slot, small goes first
    s.add_agent(agent("b", native=(AMD64,), slots=1))
    assert s.schedule()[0].job_id == "small0"


def test_removing_an_agent_returns_its_running_jobs() -> None:
    s = Scheduler()
    s.add_agent(agent("a", native=(AMD64,), slots=2))
    s.enqueue(job("j1", AMD64))
    s.enqueue(job("j2", AMD64, build="b2"))
    s.schedule()
    assert s.remove_agent("a") == ["j1", "j2"]
    assert s.running_by_build == {}
    assert s.remove_agent("a") == []


def test_retry_avoids_the_agent_it_failed_on_when_another_can_take_it() -> None:
    s = Scheduler()
    s.add_agent(agent("a", native=(AMD64,)))
    s.add_agent(agent("b", native=(AMD64,)))
    s.enqueue(job("j1", AMD64, avoid=frozenset({"a"})))
    assert s.schedule() == [Placement("j1", "b", Mode.NATIVE)]
    s2 = Scheduler()
    s2.add_agent(agent("a", native=(AMD64,)))
    s2.enqueue(job("j1", AMD64, avoid=frozenset({"a"})))
    assert s2.schedule() == [Placement("j1", "a", Mode.NATIVE)]


def test_no_capable_agent_means_no_placement_and_no_eligible_mode() -> None:
    s = Scheduler()
    s.add_agent(agent("a", native=(AMD64,)))
    s.enqueue(job("j1", ARMV7))
    assert s.eligible_modes(ARMV7, EmulationPolicy.FALLBACK) == set()
    assert s.schedule() == []
    assert s.queued_by_platform() == {ARMV7: 1}
