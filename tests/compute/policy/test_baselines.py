"""The baseline policies on hand-made snapshots: FIFO, FIFO + EASY backfill, LAS and SRTF."""

from __future__ import annotations

from dataclasses import replace

from shipyard.compute.policy import get_policy
from shipyard.compute.policy.base import MAX_PREEMPTIONS
from shipyard.compute.policy.fifo import Fifo, FifoBackfill
from shipyard.compute.policy.las import Las
from shipyard.compute.policy.srtf import Srtf
from tests.compute.policy._helpers import (
    admitted,
    check_consistent,
    nodes,
    pending,
    running,
    snapshot,
)


def test_registry_builds_the_baselines() -> None:
    for name, cls in [
        ("fifo", Fifo),
        ("fifo-backfill", FifoBackfill),
        ("las", Las),
        ("srtf", Srtf),
    ]:
        policy = get_policy(name)
        assert isinstance(policy, cls) and policy.name == name


# --- FIFO -------------------------------------------------------------------------------------


def test_fifo_blocks_behind_the_head() -> None:
    snap = snapshot(
        nodes(1, gpus=4),
        [pending("a", gpus=4, submitted_at=0), pending("b", gpus=1, submitted_at=1)],
        [running("r", [("n0", [0, 1])])],
    )
    decision = Fifo().decide(snap)
    check_consistent(snap, decision)
    assert admitted(decision) == []  # b would fit, but a is first
    assert "first in line" in decision.waiting["a"] and "needs 4 GPUs" in decision.waiting["a"]
    assert "behind job a" in decision.waiting["b"]


def test_fifo_order_is_priority_then_submission() -> None:
    snap = snapshot(
        nodes(1, gpus=2),
        [
            pending("old", gpus=2, submitted_at=0),
            pending("urgent", gpus=2, submitted_at=5, priority=100),
            pending("older", gpus=1, submitted_at=-1),
        ],
    )
    decision = Fifo().decide(snap)
    check_consistent(snap, decision)
    assert admitted(decision) == ["urgent"]
    assert "behind job older" in decision.waiting["old"]


def test_fifo_drops_what_never_fits_without_blocking() -> None:
    snap = snapshot(nodes(2, gpus=8), [pending("huge", gpus=16), pending("small", gpus=1)])
    decision = Fifo().decide(snap)
    check_consistent(snap, decision)
    assert "largest node" in decision.unschedulable["huge"]
    assert admitted(decision) == ["small"]


# --- FIFO + EASY backfill ---------------------------------------------------------------------


def test_backfill_only_jobs_that_end_before_the_reservation() -> None:
    # One node of 4 GPUs; r holds 2 until t=100. The head needs 4: reserved from t=100.
    snap = snapshot(
        nodes(1, gpus=4),
        [
            pending("head", gpus=4, submitted_at=0),
            pending("unknown", gpus=1, submitted_at=1),  # no max runtime: cannot backfill
            pending("long", gpus=1, submitted_at=2, max_runtime_s=500),  # ends after t=100
            pending("short", gpus=1, submitted_at=3, max_runtime_s=50),  # ends at t=50
        ],
        [running("r", [("n0", [0, 1])], max_runtime_s=100, started_at=0)],
    )
    decision = FifoBackfill().decide(snap)
    check_consistent(snap, decision)
    assert admitted(decision) == ["short"]
    assert decision.reserved == {"head": 100.0}
    assert "would delay job head" in decision.waiting["unknown"]
    assert "would delay job head" in decision.waiting["long"]
    assert "reserved" in decision.waiting["head"]
    # Strict FIFO starts none of them.
    assert admitted(Fifo().decide(snap)) == []


def test_backfill_a_job_without_estimate_outside_the_reserved_node() -> None:
    # n0 is busy until t=100 (the head's reservation); n1 has 2 GPUs free for good.
    snap = snapshot(
        nodes(2, gpus=4),
        [pending("head", gpus=4, submitted_at=0), pending("free-rider", gpus=2, submitted_at=1)],
        [
            running("r0", [("n0", [0, 1, 2, 3])], max_runtime_s=100),
            running("r1", [("n1", [0, 1])]),  # no max runtime: never ends in the reckoning
        ],
    )
    decision = FifoBackfill().decide(snap)
    check_consistent(snap, decision)
    assert admitted(decision) == ["free-rider"]
    assert decision.admit[0].workers[0].node_id == "n1"
    assert decision.reserved == {"head": 100.0}


def test_backfill_count_packing_by_gpu_count() -> None:
    snap = snapshot(
        nodes(2, gpus=4),
        [pending("head", gpus=6, submitted_at=0), pending("x", gpus=2, submitted_at=1)],
        [running("r0", [("n0", [0, 1, 2, 3])], max_runtime_s=100)],
        packing="count",
    )
    # At t=100 8 GPUs are free, the head takes 6: 2 are left for x, which may start now.
    decision = FifoBackfill().decide(snap)
    check_consistent(snap, decision)
    assert admitted(decision) == ["x"]
    bigger = replace(snap, pending=[snap.pending[0], pending("y", gpus=3, submitted_at=1)])
    assert admitted(FifoBackfill().decide(bigger)) == []


# --- LAS --------------------------------------------------------------------------------------


def test_las_new_job_preempts_one_with_more_service() -> None:
    snap = snapshot(
        nodes(1, gpus=2),
        [pending("new", gpus=2, submitted_at=10)],
        [
            running("old", [("n0", [0, 1])], preemptible=True, attained_gpu_s=40_000),
        ],
    )
    decision = Las().decide(snap)
    check_consistent(snap, decision)
    assert [p.job_id for p in decision.preempt] == ["old"]
    assert decision.preempt[0].for_job == "new" and admitted(decision) == []
    assert "being preempted" in decision.waiting["new"]


def test_las_spares_same_level_unpreemptible_and_often_preempted_jobs() -> None:
    snap = snapshot(
        nodes(1, gpus=3),
        [pending("new", gpus=1, submitted_at=10)],
        [
            running("peer", [("n0", [0])], preemptible=True, attained_gpu_s=100),  # level 0
            running("pinned", [("n0", [1])], preemptible=False, attained_gpu_s=90_000),
            running(
                "tired",
                [("n0", [2])],
                preemptible=True,
                attained_gpu_s=90_000,
                preemptions=MAX_PREEMPTIONS,
            ),
        ],
    )
    decision = Las().decide(snap)
    check_consistent(snap, decision)
    assert decision.preempt == [] and admitted(decision) == []


def test_las_preempts_only_the_victims_on_the_node_it_uses() -> None:
    # Two nodes of 4 GPUs, each GPU a 1-GPU job at level 2; a 4-GPU job at level 0 needs a node.
    run = [
        running(f"r{n}{g}", [(f"n{n}", [g])], preemptible=True, attained_gpu_s=50_000, started_at=g)
        for n in range(2)
        for g in range(4)
    ]
    snap = snapshot(nodes(2, gpus=4), [pending("gang", gpus=4, submitted_at=10)], run)
    decision = Las().decide(snap)
    check_consistent(snap, decision)
    victims = {p.job_id for p in decision.preempt}
    assert len(victims) == 4 and len({v[:2] for v in victims}) == 1  # one node's four jobs


def test_las_is_work_conserving_and_holds_what_a_preemption_frees() -> None:
    snap = snapshot(
        nodes(1, gpus=4),
        [
            pending("blocked", gpus=4, submitted_at=0),
            pending("small", gpus=1, submitted_at=5),
        ],
        [running("r", [("n0", [0, 1])], preemptible=False)],
    )
    decision = Las().decide(snap)
    check_consistent(snap, decision)
    assert admitted(decision) == ["small"]  # the blocked one does not block it
    # With a preemptible victim, the blocked job claims the free GPUs too: small waits.
    preemptible = replace(
        snap, running=[replace(snap.running[0], attained_gpu_s=50_000, preemptible=True)]
    )
    decision = Las().decide(preemptible)
    check_consistent(preemptible, decision)
    assert [p.job_id for p in decision.preempt] == ["r"] and admitted(decision) == []


# --- SRTF -------------------------------------------------------------------------------------


def test_srtf_shortest_remaining_first_and_preempts_longer() -> None:
    long_run = replace(
        running("long", [("n0", [0, 1])], preemptible=True, attained_gpu_s=2 * 100),
        duration_s=1000.0,
    )  # 900 s left
    snap = snapshot(
        nodes(1, gpus=2),
        [
            replace(pending("medium", gpus=2, submitted_at=0), duration_s=500.0),
            replace(pending("short", gpus=1, submitted_at=5), duration_s=60.0),
        ],
        [long_run],
    )
    decision = Srtf().decide(snap)
    check_consistent(snap, decision)
    # short (60 s) first: it preempts long (900 s left); medium then finds the victim taken.
    assert [(p.job_id, p.for_job) for p in decision.preempt] == [("long", "short")]
    assert admitted(decision) == []
    nearly_done = replace(long_run, attained_gpu_s=2 * 990)  # 10 s left: spared
    decision = Srtf().decide(replace(snap, running=[nearly_done]))
    assert decision.preempt == []


def test_srtf_without_durations_falls_back_to_max_runtime() -> None:
    snap = snapshot(
        nodes(1, gpus=1),
        [
            pending("unknown", gpus=1, submitted_at=0),
            pending("bounded", gpus=1, submitted_at=1, max_runtime_s=30),
        ],
    )
    decision = Srtf().decide(snap)
    check_consistent(snap, decision)
    assert admitted(decision) == ["bounded"]
