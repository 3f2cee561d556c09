"""shipyard's default policy on small hand-built snapshots: every rule, and random ones."""

from __future__ import annotations

import random

import pytest

from shipyard.compute.policy import get_policy
from shipyard.compute.policy.base import (
    MAX_PREEMPTIONS,
    Decision,
    QueueConfig,
    Quota,
    RunningJob,
    Snapshot,
)
from shipyard.compute.policy.default import DefaultPolicy
from shipyard.compute.policy.placement import FreeCapacity
from tests.compute.policy._helpers import (
    admitted,
    as_running,
    check_consistent,
    node,
    nodes,
    pending,
    running,
    snapshot,
)

HOUR = 3600.0


def decide(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
    snap = snapshot(*args, **kwargs)  # type: ignore[arg-type]
    decision = DefaultPolicy().decide(snap)
    check_consistent(snap, decision)
    return decision


def test_registered_as_default() -> None:
    assert isinstance(get_policy(), DefaultPolicy)
    assert get_policy("default").name == "default"


# -- order (ported from the old strict-priority scheduler, plus LAS and DRF) --------------------


def test_priority_first_then_oldest_first() -> None:
    ns = [node("n", gpus=0, cpus=3)]
    pend = [
        pending("low-old", submitted_at=0),
        pending("high-young", priority=5, submitted_at=2),
        pending("high-old", priority=5, submitted_at=1),
        pending("low-young", submitted_at=3),
    ]
    d = decide(ns, pend)
    assert admitted(d) == ["high-old", "high-young", "low-old"]
    assert d.waiting["low-young"].startswith("waiting: 4th in queue q; needs 1 CPUs")


def test_same_time_ties_break_by_id_so_the_order_is_stable() -> None:
    d = decide([node("n", gpus=0, cpus=1)], [pending("b"), pending("a")])
    assert admitted(d) == ["a"]


def test_running_jobs_hold_their_share_and_memory_binds() -> None:
    ns = [node("n", gpus=0, cpus=4, memory_mb=1000)]
    d = decide(ns, [pending("a", cpus=2, memory_mb=100)], [running("r", "n", cpus=3, memory_mb=1)])
    assert admitted(d) == []
    d = decide(ns, [pending("a", memory_mb=600), pending("b", memory_mb=600, submitted_at=1)])
    assert admitted(d) == ["a"]


def test_fractional_cpus_add_up_without_float_surprises() -> None:
    ns = [node("n", gpus=0, cpus=0.3)]
    d = decide(ns, [pending(f"j{i}", cpus=0.1, memory_mb=1, submitted_at=i) for i in range(4)])
    assert admitted(d) == ["j0", "j1", "j2"]


def test_over_committed_node_admits_nothing() -> None:
    """Capacity lowered under running jobs: nothing new until they end."""
    ns = [node("n", gpus=0, cpus=1, memory_mb=100)]
    run = [running("r", "n", cpus=4, memory_mb=1000)]
    assert admitted(decide(ns, [pending("a", cpus=0.5, memory_mb=1)], run)) == []


def test_gpus_are_distinct_and_never_shared_with_running_jobs() -> None:
    ns = [node("n", gpus=4)]
    d = decide(
        ns,
        [
            pending("a", gpus=2),
            pending("b", gpus=1, submitted_at=1),
            pending("c", gpus=1, submitted_at=2),
        ],
        [running("r", [("n", [1])])],
    )
    got = {p.job_id: p.workers[0].gpus for p in d.admit}
    assert got == {"a": (0, 2), "b": (3,)}
    assert "needs 1 GPU" in d.waiting["c"]


def test_least_attained_service_goes_first_within_a_priority() -> None:
    ns = [node("n", gpus=1)]
    pend = [
        pending("long-old", gpus=1, submitted_at=0, attained_gpu_s=20 * HOUR),
        pending("mid", gpus=1, submitted_at=1, attained_gpu_s=2 * HOUR),
        pending("new", gpus=1, submitted_at=2),
    ]
    d = decide(ns, pend)
    assert admitted(d) == ["new"]
    assert d.waiting["mid"].startswith("waiting: 2nd in queue q")
    assert d.waiting["long-old"].startswith("waiting: 3rd in queue q")
    # priority still comes before attained service
    pend.append(pending("urgent", gpus=1, submitted_at=3, attained_gpu_s=50 * HOUR, priority=1))
    assert admitted(decide(ns, pend)) == ["urgent"]


def test_queues_share_by_weighted_dominant_share() -> None:
    ns = [node("n", gpus=4)]
    run = [running("a1", [("n", [0])], queue="a")]  # a holds 1 of 4 GPUs; b none
    pend = [pending("a2", gpus=1, queue="a"), pending("b1", gpus=1, queue="b", submitted_at=5)]
    d = decide(ns, pend[:1] + pend[1:], run)
    assert admitted(d) == ["b1", "a2"]  # b has the smaller share, though younger
    # with only one GPU left, b gets it
    run.append(running("x", [("n", [1, 2])], queue="c"))
    d = decide(ns, pend, run)
    assert admitted(d) == ["b1"]
    # a weight of 4 makes a's share 1/16 < b's 0: still b; but a share of 0.25/4 < 0.5/1
    run2 = [running("a1", [("n", [0])], queue="a"), running("b0", [("n", [1, 2])], queue="b")]
    queues = [QueueConfig(name="a", weight=4.0)]
    d = decide(ns, pend, run2, queues=queues)
    assert admitted(d) == ["a2"]


def test_higher_priority_goes_first_across_queues() -> None:
    ns = [node("n", gpus=2)]
    run = [running("a0", [("n", [0])], queue="a")]
    pend = [pending("b1", gpus=1, queue="b"), pending("a1", gpus=1, queue="a", priority=100)]
    assert admitted(decide(ns, pend, run)) == ["a1"]


# -- quotas --------------------------------------------------------------------------------------


def test_a_queue_at_its_gpu_quota_waits_with_the_reason() -> None:
    queues = [QueueConfig(name="vision", nominal=Quota(gpus=8))]
    run = [running(f"r{i}", [("n0", [i])], queue="vision") for i in range(8)]
    pend = [pending("v", gpus=1, queue="vision"), pending("free", gpus=1, queue="other")]
    d = decide(nodes(2), pend, run, queues=queues)
    assert admitted(d) == ["free"]  # an unconfigured queue is unlimited
    assert d.waiting["v"] == "waiting: 1st in queue vision; queue vision is at its GPU quota 8/8"


def test_cpu_memory_and_per_model_quotas() -> None:
    queues = [
        QueueConfig(name="c", nominal=Quota(cpus=4)),
        QueueConfig(name="m", nominal=Quota(memory_mb=2000)),
        QueueConfig(name="g", nominal=Quota(gpus_by_model={"A100": 1})),
    ]
    ns = [node("a", model="A100"), node("h", model="H100", gpus=1)]
    pend = [
        pending("c1", queue="c", cpus=3),
        pending("c2", queue="c", cpus=2, submitted_at=1),
        pending("m1", queue="m", memory_mb=1500),
        pending("m2", queue="m", memory_mb=1000, submitted_at=1),
        pending("g1", queue="g", gpus=1, gpu_type="A100"),
        pending("g2", queue="g", gpus=1, gpu_type="A100", submitted_at=1),
        pending("g3", queue="g", gpus=1, submitted_at=2),  # any model: goes to the H100
    ]
    d = decide(ns, pend, queues=queues)
    assert sorted(admitted(d)) == ["c1", "g1", "g3", "m1"]
    assert "queue c is at its CPU quota 3/4" in d.waiting["c2"]
    assert "queue m is at its memory quota 1500/2000 MB" in d.waiting["m2"]
    assert "queue g is at its A100 GPU quota 1/1" in d.waiting["g2"]
    g3 = next(p for p in d.admit if p.job_id == "g3")
    assert g3.workers[0].node_id == "h"


def test_a_job_larger_than_its_quota_waits_and_says_so() -> None:
    queues = [QueueConfig(name="small", nominal=Quota(gpus=2))]
    d = decide(nodes(1), [pending("big", gpus=4, queue="small")], queues=queues)
    assert d.waiting["big"] == (
        "waiting: 1st in queue small; needs 4 GPUs, more than queue small's GPU quota 2; "
        "it waits until the quota is raised"
    )
    assert not d.unschedulable


def test_quota_shrunk_below_use_keeps_running_jobs_and_new_ones_wait() -> None:
    queues = [QueueConfig(name="vision", nominal=Quota(gpus=2))]
    run = [running(f"r{i}", [("n0", [i])], queue="vision", preemptible=True) for i in range(4)]
    d = decide(nodes(1), [pending("v", gpus=1, queue="vision")], run, queues=queues)
    assert d.preempt == [] and d.admit == []
    assert "queue vision is at its GPU quota 4/2" in d.waiting["v"]


def test_cohort_members_borrow_idle_quota_up_to_their_limit() -> None:
    queues = [
        QueueConfig(name="a", nominal=Quota(gpus=4), cohort="lab", borrowing_limit=Quota(gpus=2)),
        QueueConfig(name="b", nominal=Quota(gpus=4), cohort="lab"),
        QueueConfig(name="solo", nominal=Quota(gpus=1)),
    ]
    pend = [pending(f"a{i}", gpus=1, queue="a", submitted_at=i) for i in range(8)]
    d = decide(nodes(2), pend, queues=queues)
    assert admitted(d) == [f"a{i}" for i in range(6)]  # 4 nominal + 2 borrowed
    assert "queue a is at its GPU quota 6/4 and its borrowing limit 2" in d.waiting["a6"]
    # b without a borrowing limit may take all of the cohort's idle quota, but no more
    pend = [pending(f"b{i}", gpus=1, queue="b", submitted_at=i) for i in range(9)]
    run = [running("a0", [("n1", [7])], queue="a")]
    d = decide(nodes(2), pend, run, queues=queues)
    assert len(d.admit) == 7
    assert "cohort lab has no idle GPU quota to lend (8/8 in use)" in d.waiting["b7"]
    # a queue outside any cohort never borrows
    d = decide(
        nodes(1),
        [pending("s1", gpus=1, queue="solo"), pending("s2", gpus=1, queue="solo", submitted_at=1)],
        queues=queues,
    )
    assert admitted(d) == ["s1"]


def test_a_queue_below_nominal_reclaims_lent_quota_from_borrowers() -> None:
    queues = [
        QueueConfig(name="a", nominal=Quota(gpus=4), cohort="lab"),
        QueueConfig(name="b", nominal=Quota(gpus=4), cohort="lab"),
    ]
    # a borrows: 8 GPUs of a 8-GPU cluster, all preemptible; one started later (less lost work)
    run = [
        running(f"a{i}", [("n0", [i])], queue="a", preemptible=True, started_at=float(i))
        for i in range(8)
    ]
    d = decide(nodes(1), [pending("b1", gpus=2, queue="b")], run, queues=queues, now=100.0)
    assert admitted(d) == []
    victims = sorted(p.job_id for p in d.preempt)
    assert victims == ["a6", "a7"]  # the least lost work, just enough
    assert all("queue b reclaims its lent quota for job b1" in p.reason for p in d.preempt)
    assert all(p.for_job == "b1" for p in d.preempt)
    assert "preempting 2 jobs to make room (a7, a6)" in d.waiting["b1"]
    # next decision: the victims are stopping; b1 waits for them, nobody else is preempted
    stopping = [
        running(
            r.id,
            [("n0", list(r.placement.workers[0].gpus))],
            queue="a",
            preemptible=True,
            started_at=r.started_at,
            stopping=r.id in victims,
        )
        for r in run
    ]
    d = decide(nodes(1), [pending("b1", gpus=2, queue="b")], stopping, queues=queues, now=101.0)
    assert d.preempt == [] and d.admit == []
    assert "starts once the jobs being stopped have freed its capacity" in d.waiting["b1"]
    # once they are gone it starts
    rest = [r for r in stopping if not r.stopping]
    d = decide(nodes(1), [pending("b1", gpus=2, queue="b")], rest, queues=queues, now=102.0)
    assert admitted(d) == ["b1"]


def test_jobs_within_nominal_are_not_reclaimed_and_unconfigured_queues_do_not_reclaim() -> None:
    queues = [
        QueueConfig(name="a", nominal=Quota(gpus=8), cohort="lab"),
        QueueConfig(name="b", nominal=Quota(gpus=4), cohort="lab"),
    ]
    run = [running(f"a{i}", [("n0", [i])], queue="a", preemptible=True) for i in range(8)]
    d = decide(
        nodes(1),
        [pending("b1", gpus=1, queue="b"), pending("x", gpus=1, queue="x")],
        run,
        queues=queues,
    )
    assert d.preempt == []


# -- preemption ---------------------------------------------------------------------------------


def test_priority_preemption_picks_lowest_priority_then_least_lost_work() -> None:
    ns = [node("n0", gpus=4)]
    run = [
        running("low-old", [("n0", [0])], priority=-100, preemptible=True, started_at=0),
        running("low-new", [("n0", [1])], priority=-100, preemptible=True, started_at=50),
        running("normal", [("n0", [2])], priority=0, preemptible=True, started_at=90),
        running("pinned", [("n0", [3])], priority=-100, preemptible=False),
    ]
    d = decide(ns, [pending("vip", gpus=2, priority=100)], run, now=100.0)
    assert sorted(p.job_id for p in d.preempt) == ["low-new", "low-old"]
    assert all(p.reason == "preempted for job vip (priority high)" for p in d.preempt)
    assert admitted(d) == []  # it starts once they have stopped
    d = decide(ns, [pending("vip", gpus=3, priority=100)], run, now=100.0)
    assert sorted(p.job_id for p in d.preempt) == ["low-new", "low-old", "normal"]
    # a job of the same priority preempts no one (all have little attained service)
    d = decide(ns, [pending("peer", gpus=1, priority=-100)], run, now=100.0)
    assert d.preempt == []
    # nothing preemptible is enough: no victims at all, rather than useless ones
    d = decide(ns, [pending("vip", gpus=4, priority=100)], run, now=100.0)
    assert d.preempt == []


def test_victims_actually_make_room_on_one_node() -> None:
    ns = [node("n0", gpus=4), node("n1", gpus=4)]
    run = [
        running("v1", [("n0", [0, 1])], priority=-100, preemptible=True, started_at=90),
        running("v3", [("n1", [0, 1])], priority=-100, preemptible=True, started_at=10),
        running("v2", [("n0", [2, 3])], priority=0, preemptible=True, started_at=80),
        running("v4", [("n1", [2, 3])], priority=-100),
    ]
    d = decide(ns, [pending("vip", gpus=4, priority=100)], run, now=100.0)
    # v1 + v3 free 4 GPUs but on two nodes; n0 needs v2 too; v3 is then spared
    assert sorted(p.job_id for p in d.preempt) == ["v1", "v2"]


def test_never_a_victim_stopping_or_preempted_too_often() -> None:
    ns = [node("n0", gpus=2)]
    run = [
        running(
            "tired", [("n0", [0])], priority=-100, preemptible=True, preemptions=MAX_PREEMPTIONS
        ),
        running("leaving", [("n0", [1])], priority=-100, preemptible=True, stopping=True),
    ]
    d = decide(ns, [pending("vip", gpus=2, priority=100)], run)
    assert d.preempt == []
    # the stopping job's GPU is counted as freeing: a 1-GPU job holds it
    d = decide(
        ns, [pending("vip", gpus=1, priority=100), pending("small", gpus=1, submitted_at=1)], run
    )
    assert d.preempt == [] and d.admit == []
    assert "starts once the jobs being stopped" in d.waiting["vip"]


def test_held_capacity_is_not_given_to_others() -> None:
    ns = [node("n0", gpus=4)]
    run = [running("low", [("n0", [0, 1])], priority=-100, preemptible=True)]
    pend = [pending("vip", gpus=4, priority=100), pending("small", gpus=2, submitted_at=1)]
    d = decide(ns, pend, run)
    assert [p.job_id for p in d.preempt] == ["low"]
    assert admitted(d) == []  # the 2 free GPUs are part of vip's room
    assert "small" in d.waiting


def test_same_queue_priority_preemption_frees_quota() -> None:
    queues = [QueueConfig(name="v", nominal=Quota(gpus=2))]
    run = [
        running(f"r{i}", [("n0", [i])], queue="v", priority=-100, preemptible=True, started_at=i)
        for i in range(2)
    ]
    d = decide(
        nodes(1), [pending("vip", gpus=1, queue="v", priority=100)], run, queues=queues, now=10.0
    )
    assert [p.job_id for p in d.preempt] == ["r1"]


def test_las_preemption_with_hysteresis() -> None:
    ns = [node("n0", gpus=1)]
    hog = running("hog", [("n0", [0])], preemptible=True, started_at=0.0, attained_gpu_s=20 * HOUR)
    d = decide(ns, [pending("new", gpus=1, submitted_at=5000)], [hog], now=5000.0)
    assert [p.job_id for p in d.preempt] == ["hog"]
    assert "which has run for less time (0.0 vs 20.0 hours per GPU)" in d.preempt[0].reason
    # it has run only 100 s in this attempt: not yet
    fresh = running(
        "hog", [("n0", [0])], preemptible=True, started_at=4900.0, attained_gpu_s=20 * HOUR
    )
    assert decide(ns, [pending("new", gpus=1)], [fresh], now=5000.0).preempt == []
    # same level: no preemption
    peer = running("peer", [("n0", [0])], preemptible=True, attained_gpu_s=300.0)
    assert decide(ns, [pending("new", gpus=1)], [peer], now=5000.0).preempt == []
    # not preemptible: never
    pinned = running("pin", [("n0", [0])], attained_gpu_s=20 * HOUR)
    assert decide(ns, [pending("new", gpus=1)], [pinned], now=5000.0).preempt == []


# -- EASY backfill ------------------------------------------------------------------------------


def test_backfill_runs_small_jobs_that_cannot_delay_the_reservation() -> None:
    ns = [node("n0", gpus=4), node("n1", gpus=4)]
    run = [
        running("r0", [("n0", [0, 1])], started_at=0, max_runtime_s=100),  # n0 frees at 100
        running("r1", [("n1", [0, 1, 2])], started_at=0, max_runtime_s=1000),
    ]
    pend = [
        pending("big", gpus=4, submitted_at=0),
        pending("long", gpus=2, submitted_at=1, max_runtime_s=500),  # only n0 has 2: delays big
        pending("short", gpus=2, submitted_at=2, max_runtime_s=50),  # ends before 100
        pending("elsewhere", gpus=1, submitted_at=3),  # fits on n1, not reserved
    ]
    d = decide(ns, pend, run, now=10.0)
    assert d.reserved == {"big": 100.0}
    assert sorted(admitted(d)) == ["elsewhere", "short"]
    assert {p.job_id: p.workers[0].node_id for p in d.admit} == {"short": "n0", "elsewhere": "n1"}
    assert "holds the reservation, expected to start in 90 s" in d.waiting["big"]
    assert "behind job big's reservation" in d.waiting["long"]


def test_without_max_runtimes_the_reserved_nodes_drain() -> None:
    ns = [node("n0", gpus=4), node("n1", gpus=4)]
    run = [
        running("r0", [("n0", [0, 1])], started_at=0),
        running("r1", [("n1", [0])], started_at=5),
    ]
    pend = [
        pending("big", gpus=4),
        pending("a", gpus=2, submitted_at=1),
        pending("b", gpus=2, submitted_at=2),
    ]
    d = decide(ns, pend, run, now=10.0)
    assert d.reserved == {}  # the time is unknown, but the nodes are held
    assert "start time unknown" in d.waiting["big"]
    # big waits for n0 (r0 started first); a and b go to n1 only
    assert {p.workers[0].node_id for p in d.admit} <= {"n1"}
    assert "a" in admitted(d) and "b" in d.waiting


@pytest.mark.parametrize("seed", range(40))
def test_backfill_never_delays_the_reserved_job(seed: int) -> None:
    """At the reservation time, with every job then ended by its max runtime released, the
    reserved job fits beside the jobs admitted now."""
    rng = random.Random(seed)
    ns = nodes(rng.randint(1, 4), gpus=4)
    free = FreeCapacity.of(snapshot(ns))
    run: list[RunningJob] = []
    for i in range(rng.randint(1, 8)):
        probe = pending(f"r{i}", gpus=rng.choice([1, 2, 4]))
        p = free.place(probe)
        if p is None:
            continue
        free.take(probe, p)
        run.append(
            running(
                probe.id,
                [(w.node_id, list(w.gpus)) for w in p.workers],
                started_at=rng.uniform(0, 50),
                max_runtime_s=rng.choice([None, 60.0, 120.0, 400.0]),
            )
        )
    pend = [
        pending(
            f"p{i}",
            gpus=rng.choice([1, 2, 3, 4]),
            workers=rng.choice([1, 1, 2]),
            submitted_at=float(i),
            max_runtime_s=rng.choice([None, 10.0, 50.0, 200.0]),
        )
        for i in range(rng.randint(1, 10))
    ]
    now = 60.0
    snap = snapshot(ns, pend, run, now=now)
    d = DefaultPolicy().decide(snap)
    check_consistent(snap, d)
    if not d.reserved:
        return
    ((job_id, at),) = d.reserved.items()
    by_id = {j.id: j for j in pend}
    # the world at time `at`: running and admitted jobs that have not ended by then
    still = [r for r in run if r.max_runtime_s is None or r.started_at + r.max_runtime_s > at]
    for p in d.admit:
        job = by_id[p.job_id]
        if job.max_runtime_s is None or now + job.max_runtime_s > at:
            still.append(as_running(job, p, started_at=now))
    later = FreeCapacity.of(snapshot(ns, run=still))
    assert later.place(by_id[job_id]) is not None, "backfill delayed the reserved job"


# -- gangs, placement, unschedulable ------------------------------------------------------------


def test_gangs_start_whole_or_not_at_all() -> None:
    ns = nodes(2, gpus=4)
    pend = [pending("g1", gpus=2, workers=3), pending("g2", gpus=2, workers=3, submitted_at=1)]
    d = decide(ns, pend)
    assert admitted(d) == ["g1"]
    assert len(d.admit[0].workers) == 3
    assert "needs 3 workers x 2 GPUs" in d.waiting["g2"]


def test_a_gang_is_packed_onto_the_fewest_nodes() -> None:
    ns = nodes(4, gpus=8)
    run = [running("x", [("n1", [0, 1, 2, 3])])]
    d = decide(
        ns, [pending("g", gpus=1, workers=4), pending("h", gpus=4, workers=3, submitted_at=1)], run
    )
    where = {p.job_id: [w.node_id for w in p.workers] for p in d.admit}
    assert where["g"] == ["n1"] * 4  # the tightest node that holds all four
    assert len(set(where["h"])) == 2


def test_gpu_type_and_fractions_through_the_policy() -> None:
    ns = [node("a", model="A100", gpus=1), node("h", model="H100", gpus=1)]
    pend = [
        pending("t", gpus=1, gpu_type="h100"),
        pending("f1", gpu_fraction=0.5, gpu_memory_mb=1000, submitted_at=1),
        pending("f2", gpu_fraction=0.5, gpu_memory_mb=1000, submitted_at=2),
        pending("f3", gpu_fraction=0.5, gpu_memory_mb=1000, submitted_at=3),
    ]
    d = decide(ns, pend)
    where = {
        p.job_id: (p.workers[0].node_id, p.workers[0].gpus, p.workers[0].gpu_share) for p in d.admit
    }
    assert where["t"] == ("h", (0,), 0.0)
    assert where["f1"] == where["f2"] == ("a", (0,), 0.5)
    assert "f3" in d.waiting


def test_jobs_no_node_could_hold_are_unschedulable_and_block_nobody() -> None:
    ns = [node("n3", gpus=8), node("n1", gpus=2)]
    pend = [
        pending("huge", gpus=16, priority=9),
        pending("typed", gpus=1, gpu_type="TPU", priority=9),
        pending("ok", gpus=8),
    ]
    d = decide(ns, pend)
    assert admitted(d) == ["ok"]
    assert d.unschedulable["huge"] == "needs 16 GPUs; the largest node (n3) has 8"
    assert "'TPU'" in d.unschedulable["typed"]


def test_an_empty_cluster_makes_everyone_wait() -> None:
    d = decide([], [pending("a", gpus=1)])
    assert d.admit == [] and "a" in d.waiting and not d.unschedulable


def test_count_packing() -> None:
    ns = nodes(2, gpus=4)
    run = [running("r", [("n0", [0, 1, 2])])]
    d = decide(ns, [pending("j", gpus=5)], run, packing="count")
    assert admitted(d) == ["j"]
    assert sum(len(w.gpus) for w in d.admit[0].workers) == 5


@pytest.mark.parametrize("seed", range(60))
def test_random_snapshots_are_consistent(seed: int) -> None:
    """Any mix: one outcome per pending job, nothing oversubscribed, victims preemptible."""
    rng = random.Random(1000 + seed)
    ns = [
        node(
            f"n{i}",
            gpus=rng.choice([0, 2, 4, 8]),
            cpus=rng.choice([8, 32]),
            model=rng.choice(["A100", "H100"]),
        )
        for i in range(rng.randint(1, 5))
    ]
    free = FreeCapacity.of(snapshot(ns))
    names = ["a", "b", "c"]
    run: list[RunningJob] = []
    for i in range(rng.randint(0, 10)):
        probe = pending(
            f"r{i}", gpus=rng.choice([0, 1, 2]), cpus=rng.choice([1, 2]), queue=rng.choice(names)
        )
        p = free.place(probe)
        if p is None:
            continue
        free.take(probe, p)
        job = as_running(probe, p, started_at=rng.uniform(0, 900))
        run.append(
            RunningJob(
                id=job.id,
                queue=job.queue,
                demand=job.demand,
                placement=p,
                workers=job.workers,
                priority=rng.choice([-100, 0, 100]),
                started_at=job.started_at,
                max_runtime_s=rng.choice([None, 300.0]),
                preemptible=rng.random() < 0.6,
                preemptions=rng.choice([0, 0, 3]),
                attained_gpu_s=rng.choice([0.0, 20 * HOUR]),
                stopping=rng.random() < 0.1,
            )
        )
    queues = [
        QueueConfig(name="a", nominal=Quota(gpus=rng.choice([2, 4])), cohort="lab"),
        QueueConfig(
            name="b",
            nominal=Quota(gpus=rng.choice([0, 2]), cpus=16),
            cohort="lab",
            borrowing_limit=Quota(gpus=2),
        ),
    ]
    pend = [
        pending(
            f"p{i}",
            queue=rng.choice(names),
            gpus=rng.choice([0, 1, 2, 4, 16]) if rng.random() < 0.8 else 0,
            gpu_fraction=0.25 if rng.random() < 0.1 else 0.0,
            workers=rng.choice([1, 1, 2]),
            priority=rng.choice([-100, 0, 100]),
            submitted_at=rng.uniform(0, 1000),
            max_runtime_s=rng.choice([None, 100.0]),
            attained_gpu_s=rng.choice([0.0, 2 * HOUR]),
            gpu_type=rng.choice([None, None, "H100"]),
        )
        for i in range(rng.randint(0, 14))
    ]
    pend = [
        j if not (j.demand.gpus and j.demand.gpu_fraction) else pending(j.id, gpu_fraction=0.25)
        for j in pend
    ]
    snap = snapshot(
        ns, pend, run, queues=queues, now=1000.0, packing=rng.choice(["nodes", "nodes", "count"])
    )
    d = DefaultPolicy().decide(snap)
    check_consistent(snap, d)
    for victim in d.preempt:
        assert victim.for_job in {j.id for j in pend}
        assert victim.for_job in d.waiting


def test_unschedulable_jobs_behind_a_blocked_one_are_still_reported() -> None:
    ns = [node("n", gpus=2)]
    run = [running("r", [("n", [0, 1])])]
    d = decide(ns, [pending("waits", gpus=1), pending("never", gpus=3, submitted_at=1)], run)
    assert "waits" in d.waiting and list(d.unschedulable) == ["never"]


def test_many_jobs_of_few_shapes_get_their_own_positions() -> None:
    """The fast path for a busy queue still names each job's own position."""
    ns = [node("n", gpus=1)]
    pend = [pending(f"j{i:03d}", gpus=1, submitted_at=float(i)) for i in range(300)]
    d = decide(ns, pend)
    assert admitted(d) == ["j000"]
    assert d.waiting["j001"].startswith("waiting: 2nd in queue q; needs 1 GPU")
    assert d.waiting["j299"].startswith("waiting: 300th in queue q; needs 1 GPU")


def test_a_decision_pauses_the_cyclic_collector_and_restores_it() -> None:
    import gc

    from shipyard.compute.policy import base

    seen: list[bool] = []

    class Probe(DefaultPolicy):
        def _decide(self, snapshot: Snapshot) -> Decision:
            seen.append(gc.isenabled())
            if snapshot.now < 0:
                raise RuntimeError("bad snapshot")
            return super()._decide(snapshot)

    assert gc.isenabled()
    Probe().decide(Snapshot(now=1.0, nodes=[], queues={}, pending=[], running=[]))
    with pytest.raises(RuntimeError):
        Probe().decide(Snapshot(now=-1.0, nodes=[], queues={}, pending=[], running=[]))
    assert seen == [False, False] and gc.isenabled()  # enabled again, even after an error
    gc.disable()
    try:
        with base.cyclic_gc_paused():
            pass
        assert not gc.isenabled()  # a caller's own pause is left as it was
    finally:
        gc.enable()


def test_las_levels_count_running_time_so_wide_jobs_are_not_demoted_for_their_width() -> None:
    wide = pending("wide", gpus=8, attained_gpu_s=8 * 1200.0)  # ran 20 min on 8 GPUs
    narrow = pending("narrow", gpus=1, attained_gpu_s=3000.0)  # ran 50 min on 1 GPU
    fresh = pending("fresh", gpus=1)
    by_time = DefaultPolicy()
    assert [by_time.level_of(j) for j in (fresh, wide, narrow)] == [0, 1, 1]
    by_gpu = DefaultPolicy(las_service="gpu")  # Tiresias' GPU time: 9,600 GPU-s is level 2
    assert [by_gpu.level_of(j) for j in (fresh, wide, narrow)] == [0, 2, 1]
    # in one queue, the same level: the older job first; by GPU time the narrow one overtakes
    ns = [node("n0", gpus=8)]
    older_wide = pending("wide", gpus=8, attained_gpu_s=8 * 1200.0, submitted_at=0.0)
    later_narrow = pending("narrow", gpus=1, attained_gpu_s=3000.0, submitted_at=1.0)
    assert admitted(decide(ns, [older_wide, later_narrow], [], now=10.0)) == ["wide"]
    snap = snapshot(ns, [older_wide, later_narrow], [], now=10.0)
    assert [p.job_id for p in by_gpu.decide(snap).admit] == ["narrow"]
    with pytest.raises(ValueError, match="las_service"):
        DefaultPolicy(las_service="gpus")
