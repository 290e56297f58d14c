"""Scheduling decisions of the pure scheduler: native first, least loaded, policy, fairness."""

import random

import pytest

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


def test_tie_goes_to_the_least_recently_assigned_agent_not_a_warm_cache() -> None:
    s = Scheduler()
    s.add_agent(agent("a", native=(AMD64,)))
    s.add_agent(agent("b", native=(AMD64,)))
    s.enqueue(job("warmup", AMD64, repository="team/other"))
    s.enqueue(job("warmup2", AMD64, build="b2", repository="team/app"))
    assert [p.agent for p in s.schedule()] == ["a", "b"]
    s.release("warmup")
    s.release("warmup2")
    # b built team/app last, but a has waited longer: registry caches warm both
    s.enqueue(job("j", AMD64, build="b3", repository="team/app"))
    assert s.schedule() == [Placement("j", "a", Mode.NATIVE)]
    s.release("j")
    s.enqueue(job("k", AMD64, build="b4", repository="team/app"))
    assert s.schedule() == [Placement("k", "b", Mode.NATIVE)]


def test_an_idle_fleet_spreads_quick_jobs_of_one_repository() -> None:
    s = Scheduler()
    names = [f"agent-{i:02}" for i in range(50)]
    for name in names:
        s.add_agent(agent(name, native=(AMD64,), slots=2))
    counts = dict.fromkeys(names, 0)
    for i in range(602):
        s.enqueue(job(f"j{i}", AMD64, build=f"b{i}", repository="team/app"))
        (placement,) = s.schedule()
        counts[placement.agent] += 1
        s.release(placement.job_id)
    assert min(counts.values()) >= 12
    assert max(counts.values()) - min(counts.values()) <= 1


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


def test_the_build_with_fewest_running_jobs_goes_first_across_platforms() -> None:
    s = Scheduler()
    s.add_agent(agent("x86", native=(AMD64,), slots=1))
    s.add_agent(agent("arm", native=(ARM64,), slots=1))
    for i in range(3):
        s.enqueue(job(f"big-amd{i}", AMD64, build="big"))
        s.enqueue(job(f"big-arm{i}", ARM64, build="big"))
    s.enqueue(job("small-amd", AMD64, build="small"))
    s.enqueue(job("small-arm", ARM64, build="small"))
    # big was first, but once one of its jobs runs, small's arm64 job goes before big's
    assert s.schedule() == [
        Placement("big-amd0", "x86", Mode.NATIVE),
        Placement("small-arm", "arm", Mode.NATIVE),
    ]
    s.release("big-amd0")  # big 0 running, small 1: big goes next
    assert s.schedule() == [Placement("big-amd1", "x86", Mode.NATIVE)]
    s.release("small-arm")
    s.release("big-amd1")  # both idle: big-arm0 was submitted first, then small is behind
    assert s.schedule() == [
        Placement("big-arm0", "arm", Mode.NATIVE),
        Placement("small-amd", "x86", Mode.NATIVE),
    ]
    assert s.running_by_build == {"big": 1, "small": 1}


# ---- randomized: every schedule() checked against the rules, placement by placement ----

SEEDS = [11, 12, 13]


def _choices(
    agents: dict[str, AgentView], running: dict[str, int], queued: QueuedJob
) -> list[tuple[tuple[bool, bool, float, int, str], Mode]]:
    """Every (agent key, mode) the rules allow for `queued` right now, best first."""
    native_connected = any(queued.platform in a.native for a in agents.values())
    out = []
    for a in agents.values():
        mode = a.mode_for(queued.platform)
        if mode is None or a.draining or running[a.name] >= a.slots:
            continue
        if mode is Mode.EMULATED and not (
            queued.policy is EmulationPolicy.ALLOW
            or (queued.policy is EmulationPolicy.FALLBACK and not native_connected)
        ):
            continue
        key = (
            mode is Mode.EMULATED,
            a.name in queued.avoid,
            running[a.name] / a.slots,
            a.last_assigned,
            a.name,
        )
        out.append((key, mode))
    return sorted(out)


def _check_round(
    s: Scheduler,
    agents: dict[str, AgentView],
    queue: list[QueuedJob],
    by_build: dict[str, int],
    placements: list[Placement],
) -> None:
    """Replays `placements` on a snapshot taken before schedule() with the rules in full."""
    running = {name: len(a.running) for name, a in agents.items()}
    last = max([a.last_assigned for a in agents.values()] + [0])
    for placement in placements:
        ready = [(by_build.get(q.build_id, 0), i, q) for i, q in enumerate(queue)]
        ready = [r for r in ready if _choices(agents, running, r[2])]
        assert ready, f"{placement} placed with nothing placeable"
        _, _, chosen = min(ready, key=lambda r: r[:2])
        assert placement.job_id == chosen.job_id
        (key, mode), *_ = _choices(agents, running, chosen)
        assert (placement.agent, placement.mode) == (key[-1], mode)
        queue.remove(chosen)
        running[placement.agent] += 1
        last += 1
        agents[placement.agent].last_assigned = last
        by_build[chosen.build_id] = by_build.get(chosen.build_id, 0) + 1
    # the invariant: nothing left in the queue could run anywhere right now
    assert not [q.job_id for q in queue if _choices(agents, running, q)]
    assert list(s.queue) == [q.job_id for q in queue]


@pytest.mark.parametrize("seed", SEEDS)
def test_random_events_keep_every_rule(seed: int) -> None:
    rng = random.Random(seed)
    platforms = [AMD64, ARM64, ARMV7]
    policies = list(EmulationPolicy)
    names = [f"n{i}" for i in range(10)]
    s = Scheduler()
    queued: dict[str, QueuedJob] = {}  # what the test believes is queued
    running: dict[str, tuple[str, str]] = {}  # job -> (agent, build)
    next_job = 0
    placed: dict[Mode, int] = dict.fromkeys(Mode, 0)
    platform_of: dict[str, Platform] = {}

    def new_job(job_id: str, build: str, platform: Platform) -> QueuedJob:
        platform_of[job_id] = platform
        avoid = frozenset(rng.sample(names, rng.choice([0, 0, 1, 2])))
        return job(job_id, platform, build, rng.choice(policies), "team/app", avoid)

    for step in range(4000):
        event = rng.choice(
            ["connect", "leave", "drain", "enqueue", "enqueue", "enqueue", "release",
             "release", "adopt", "requeue"]
        )  # fmt: skip
        connected = sorted(s.agents)
        if event == "connect" and len(connected) < len(names):
            name = rng.choice([n for n in names if n not in s.agents])
            native = tuple(p for p in platforms if rng.random() < 0.4)
            emulated = tuple(p for p in platforms if rng.random() < 0.3)
            view = agent(name, native, emulated, slots=rng.randint(1, 3))
            view.draining = rng.random() < 0.1
            s.add_agent(view)
        elif event == "leave" and connected:
            name = rng.choice(connected)
            mine = sorted(j for j, (a, _) in running.items() if a == name)
            assert s.remove_agent(name) == mine
            for job_id in mine:
                _, build = running.pop(job_id)
                if rng.random() < 0.8:  # the manager re-queues it, avoiding the agent
                    queued[job_id] = job(
                        job_id, platform_of[job_id], build, avoid=frozenset({name})
                    )
                    s.enqueue(queued[job_id])
        elif event == "drain" and connected:
            s.set_draining(rng.choice(connected), rng.random() < 0.5)
        elif event == "enqueue":
            next_job += 1
            queued[f"j{next_job}"] = new_job(f"j{next_job}", f"b{rng.randint(0, 5)}",
                                             rng.choice(platforms))  # fmt: skip
            s.enqueue(queued[f"j{next_job}"])
        elif event == "requeue" and queued:  # enqueued again while queued: keeps its place
            old = queued[rng.choice(sorted(queued))]
            queued[old.job_id] = new_job(old.job_id, old.build_id, old.platform)
            s.enqueue(queued[old.job_id])
        elif event == "release" and (queued or running):
            job_id = rng.choice(sorted(queued) + sorted(running))
            queued.pop(job_id, None)
            running.pop(job_id, None)
            s.release(job_id)
        elif event == "adopt" and queued:
            free = [a for a in s.agents.values() if a.free_slots > 0]
            if free:
                job_id = rng.choice(sorted(queued))
                target = rng.choice(free).name
                running[job_id] = (target, queued.pop(job_id).build_id)
                s.adopt_running(job_id, running[job_id][1], target)
        if rng.random() < 0.3:
            continue  # events pile up before the next schedule()
        agents = {
            n: AgentView(a.name, a.native, a.emulated, a.slots, set(a.running), a.draining,
                         a.last_assigned)
            for n, a in s.agents.items()
        }  # fmt: skip
        queue, by_build = list(s.queue.values()), dict(s.running_by_build)
        placements = s.schedule()
        _check_round(s, agents, queue, by_build, placements)
        for placement in placements:
            assert placement.job_id in queued, f"step {step}: placed twice or unknown"
            placed[placement.mode] += 1
            running[placement.job_id] = (placement.agent, queued.pop(placement.job_id).build_id)
        # nothing lost, nothing duplicated, the counters agree with the jobs
        assert set(s.queue) == set(queued)
        for name, view in s.agents.items():
            assert view.running == {j for j, (a, _) in running.items() if a == name}
            assert len(view.running) <= view.slots
        for job_id, (name, _) in running.items():
            assert s.agent_of(job_id) == name
        builds: dict[str, int] = {}
        for _, build in running.values():
            builds[build] = builds.get(build, 0) + 1
        assert s.running_by_build == builds
        platforms_queued: dict[Platform, int] = {}
        for q in queued.values():
            platforms_queued[q.platform] = platforms_queued.get(q.platform, 0) + 1
        assert s.queued_by_platform() == platforms_queued
    # the run exercised both modes, not only empty rounds
    assert placed[Mode.NATIVE] > 300 and placed[Mode.EMULATED] > 30, placed
