"""The admission policy, on its own: pure inputs, pure outputs."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from shipyard.compute.scheduler import (
    Allocation,
    Capacity,
    Request,
    never_fits,
    schedule,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def req(
    job_id: str,
    *,
    cpus: float = 1,
    memory_mb: int = 100,
    gpus: int = 0,
    priority: int = 0,
    age: int = 0,
) -> Request:
    """A request created ``age`` seconds after T0 (higher ``age`` = younger)."""
    return Request(
        job_id=job_id,
        cpus=cpus,
        memory_mb=memory_mb,
        gpus=gpus,
        priority=priority,
        created_at=T0 + timedelta(seconds=age),
    )


def admitted(decision: object) -> list[str]:
    return [a.job_id for a in decision.admitted]  # type: ignore[attr-defined]


def test_priority_first_then_oldest_first() -> None:
    cap = Capacity(cpus=3, memory_mb=10_000)
    queued = [
        req("low-old", age=0),
        req("high-young", priority=5, age=2),
        req("high-old", priority=5, age=1),
        req("low-young", age=3),
    ]
    assert admitted(schedule(capacity=cap, running=[], queued=queued)) == [
        "high-old",
        "high-young",
        "low-old",
    ]


def test_same_time_ties_break_by_id_so_the_order_is_stable() -> None:
    cap = Capacity(cpus=1, memory_mb=10_000)
    queued = [req("b"), req("a")]
    assert admitted(schedule(capacity=cap, running=[], queued=queued)) == ["a"]


def test_running_jobs_hold_their_share() -> None:
    cap = Capacity(cpus=4, memory_mb=1000)
    running = [Allocation(job_id="r", cpus=3, memory_mb=200)]
    decision = schedule(capacity=cap, running=running, queued=[req("a", cpus=2), req("b")])
    # 'a' does not fit in the 1 CPU left, and blocks 'b' behind it (no backfill).
    assert admitted(decision) == []
    assert decision.blocked == "a"


def test_memory_is_a_limit_too() -> None:
    cap = Capacity(cpus=8, memory_mb=1000)
    decision = schedule(
        capacity=cap, running=[], queued=[req("a", memory_mb=600), req("b", memory_mb=600, age=1)]
    )
    assert admitted(decision) == ["a"]
    assert decision.blocked == "b"


def test_no_backfill_past_a_blocked_higher_priority_job() -> None:
    """A big high-priority job keeps the freed capacity; small low-priority jobs wait behind it."""
    cap = Capacity(cpus=4, memory_mb=10_000)
    running = [Allocation(job_id="r", cpus=2, memory_mb=100)]
    queued = [req("big", cpus=4, priority=10), req("small", cpus=1, priority=0)]
    decision = schedule(capacity=cap, running=running, queued=queued)
    assert admitted(decision) == []
    assert decision.blocked == "big"
    # Once the running job ends, the big one goes first.
    decision = schedule(capacity=cap, running=[], queued=queued)
    assert admitted(decision) == ["big"]


def test_gpus_are_distinct_lowest_first_and_never_shared_with_running_jobs() -> None:
    cap = Capacity(cpus=16, memory_mb=10_000, gpus=(0, 1, 2, 3))
    running = [Allocation(job_id="r", cpus=1, memory_mb=1, gpus=(1,))]
    decision = schedule(
        capacity=cap,
        running=running,
        queued=[req("a", gpus=2), req("b", gpus=1, age=1), req("c", gpus=1, age=2)],
    )
    got = {a.job_id: a.gpus for a in decision.admitted}
    assert got == {"a": (0, 2), "b": (3,)}
    assert decision.blocked == "c"


def test_a_job_that_can_never_fit_is_unschedulable_and_blocks_nobody() -> None:
    cap = Capacity(cpus=2, memory_mb=1000, gpus=(0, 1))
    queued = [
        req("huge-gpu", gpus=3, priority=9),
        req("huge-cpu", cpus=2.5, priority=9),
        req("huge-mem", memory_mb=1001, priority=9),
        req("ok", cpus=2),
    ]
    decision = schedule(capacity=cap, running=[], queued=queued)
    assert admitted(decision) == ["ok"]
    reasons = {r.job_id: r.reason for r in decision.unschedulable}
    assert set(reasons) == {"huge-gpu", "huge-cpu", "huge-mem"}
    assert "3 GPUs (this machine has 2)" in reasons["huge-gpu"]
    assert "2.5 CPUs (this machine has 2)" in reasons["huge-cpu"]
    assert "1001 MB" in reasons["huge-mem"]


def test_unschedulable_jobs_behind_a_blocked_one_are_still_reported() -> None:
    cap = Capacity(cpus=2, memory_mb=1000)
    running = [Allocation(job_id="r", cpus=2, memory_mb=1)]
    decision = schedule(
        capacity=cap, running=running, queued=[req("waits"), req("never", cpus=3, age=1)]
    )
    assert decision.blocked == "waits"
    assert [r.job_id for r in decision.unschedulable] == ["never"]


def test_fractional_cpus_add_up_without_float_surprises() -> None:
    cap = Capacity(cpus=0.3, memory_mb=1000)
    decision = schedule(
        capacity=cap, running=[], queued=[req(f"j{i}", cpus=0.1, age=i) for i in range(4)]
    )
    assert admitted(decision) == ["j0", "j1", "j2"]


def test_over_committed_machine_admits_nothing() -> None:
    """Capacity lowered under running jobs (settings changed): nothing new until they end."""
    cap = Capacity(cpus=1, memory_mb=100)
    running = [Allocation(job_id="r", cpus=4, memory_mb=1000)]
    assert (
        admitted(schedule(capacity=cap, running=running, queued=[req("a", cpus=0.5, memory_mb=1)]))
        == []
    )


def test_never_fits_is_none_for_what_the_machine_has() -> None:
    cap = Capacity(cpus=2, memory_mb=1000, gpus=(0,))
    assert never_fits(cap, cpus=2, memory_mb=1000, gpus=1) is None
    assert never_fits(cap, cpus=2, memory_mb=1000, gpus=2) is not None


@pytest.mark.parametrize("seed", range(30))
def test_random_queues_never_exceed_capacity(seed: int) -> None:
    rng = random.Random(seed)
    cap = Capacity(
        cpus=rng.choice([1, 2, 4, 8, 3.5]),
        memory_mb=rng.randint(500, 8000),
        gpus=tuple(sorted(rng.sample(range(8), rng.randint(0, 4)))),
    )
    running: list[Allocation] = []
    free_gpus = list(cap.gpus)
    for i in range(rng.randint(0, 3)):
        gpus = tuple(free_gpus[:1]) if free_gpus and rng.random() < 0.5 else ()
        free_gpus = [g for g in free_gpus if g not in gpus]
        running.append(Allocation(job_id=f"r{i}", cpus=0.5, memory_mb=100, gpus=gpus))
    queued = [
        req(
            f"q{i}",
            cpus=rng.choice([0.25, 0.5, 1, 2, 3]),
            memory_mb=rng.randint(1, 3000),
            gpus=rng.randint(0, 3),
            priority=rng.randint(-2, 2),
            age=rng.randint(0, 100),
        )
        for i in range(rng.randint(0, 15))
    ]
    decision = schedule(capacity=cap, running=running, queued=queued)
    by_id = {q.job_id: q for q in queued}
    chosen = [by_id[a.job_id] for a in decision.admitted]
    assert (
        sum(a.cpus for a in running) + sum(q.cpus for q in chosen)
        <= max(cap.cpus, sum(a.cpus for a in running)) + 1e-9
    )
    assert sum(a.memory_mb for a in running) + sum(q.memory_mb for q in chosen) <= max(
        cap.memory_mb, sum(a.memory_mb for a in running)
    )
    held = [g for a in running for g in a.gpus] + [g for a in decision.admitted for g in a.gpus]
    assert len(held) == len(set(held)), "a GPU was handed out twice"
    assert set(held) <= set(cap.gpus)
    for admission in decision.admitted:
        assert len(admission.gpus) == by_id[admission.job_id].gpus
    # Admission follows queue order: every admitted job comes before the blocked one.
    order = sorted(queued, key=lambda q: (-q.priority, q.created_at, q.job_id))
    rejected = {r.job_id for r in decision.unschedulable}
    runnable = [q.job_id for q in order if q.job_id not in rejected]
    assert [a.job_id for a in decision.admitted] == runnable[: len(decision.admitted)]
    if decision.blocked is not None:
        assert runnable[len(decision.admitted)] == decision.blocked
    for job_id in rejected:
        assert (
            never_fits(
                cap,
                cpus=by_id[job_id].cpus,
                memory_mb=by_id[job_id].memory_mb,
                gpus=by_id[job_id].gpus,
            )
            is not None
        )
