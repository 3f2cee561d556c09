"""DRF across queues, FIFO within: the fair-share baseline (and QuotaBook's shares)."""

from __future__ import annotations

from shipyard.compute.policy import get_policy
from shipyard.compute.policy.base import QueueConfig, Quota
from shipyard.compute.policy.drf import Drf, QuotaBook, ordinal
from tests.compute.policy._helpers import (
    admitted,
    check_consistent,
    node,
    nodes,
    pending,
    running,
    snapshot,
)


def decide(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
    snap = snapshot(*args, **kwargs)  # type: ignore[arg-type]
    decision = Drf().decide(snap)
    check_consistent(snap, decision)
    return decision


def test_registered() -> None:
    assert isinstance(get_policy("drf"), Drf)


def test_the_queue_with_the_smallest_dominant_share_goes_first() -> None:
    ns = [node("n", gpus=4, cpus=8)]
    # a holds 1 GPU (25%); b holds 4 of 8 CPUs (50%): b's dominant share is larger
    run = [running("a0", [("n", [0])], queue="a"), running("b0", "n", queue="b", cpus=4)]
    pend = [pending("b1", gpus=1, queue="b"), pending("a1", gpus=1, queue="a", submitted_at=9)]
    d = decide(ns, pend, run)
    assert admitted(d) == ["a1", "b1"]


def test_weights_divide_shares() -> None:
    ns = [node("n", gpus=4)]
    run = [running("a0", [("n", [0, 1])], queue="a"), running("b0", [("n", [2])], queue="b")]
    pend = [pending("a1", gpus=1, queue="a"), pending("b1", gpus=1, queue="b")]
    assert admitted(decide(ns, pend, run)) == ["b1"]
    heavy = [QueueConfig(name="a", weight=4.0)]
    assert admitted(decide(ns, pend, run, queues=heavy)) == ["a1"]


def test_head_of_line_within_a_queue_but_other_queues_go_on() -> None:
    ns = [node("n", gpus=2)]
    pend = [
        pending("a-big", gpus=4, queue="a", submitted_at=0),  # never fits: unschedulable
        pending("a-wide", gpus=2, queue="a", submitted_at=1),
        pending("a-small", gpus=1, queue="a", submitted_at=2),
        pending("b1", gpus=1, queue="b", submitted_at=3),
    ]
    run = [running("x", [("n", [0])], queue="c")]
    d = decide(ns, pend, run)
    assert "a-big" in d.unschedulable
    assert admitted(d) == ["b1"]
    assert d.waiting["a-wide"].startswith("waiting: 1st in queue a; needs 2 GPUs")
    assert d.waiting["a-small"] == "waiting: 2nd in queue a, behind job a-wide"


def test_quotas_and_gangs_and_no_preemption() -> None:
    queues = [QueueConfig(name="a", nominal=Quota(gpus=2))]
    run = [running("low", [("n0", [0, 1])], queue="b", priority=-100, preemptible=True)]
    pend = [
        pending("a1", gpus=2, queue="a"),
        pending("a2", gpus=1, queue="a", submitted_at=1),
        pending("g", gpus=4, workers=2, queue="c", priority=100),
    ]
    d = decide(nodes(2, gpus=4), pend, run, queues=queues)
    assert admitted(d) == ["a1"] or admitted(d)[0] == "a1"
    assert "queue a is at its GPU quota 2/2" in d.waiting["a2"]
    assert "g" in d.waiting and d.preempt == []  # 6 free GPUs, but not 4 + 4 on two nodes


def test_quota_book_shares_and_borrowing() -> None:
    queues = {
        "a": QueueConfig(name="a", nominal=Quota(gpus=2), cohort="lab", weight=2.0),
        "b": QueueConfig(name="b", nominal=Quota(gpus=6), cohort="lab"),
    }
    ns = nodes(1, gpus=8, cpus=64)
    run = [running("a0", [("n0", [0, 1, 2, 3])], queue="a", cpus=2)]
    book = QuotaBook(queues, ns, run)
    assert book.share("a") == 0.25  # 4 of 8 GPUs, weight 2
    assert book.share("b") == 0.0
    assert book.borrowing("a") and not book.borrowing("b")
    # within its nominal quota a queue may always start (the capacity check and reclaiming
    # decide the rest); beyond it, it borrows only what the cohort has idle: 4 + 7 > 8
    assert book.check(pending("b1", gpus=6, queue="b")) is None
    assert "cohort lab has no idle GPU quota" in str(book.check(pending("b1", gpus=7, queue="b")))
    assert not book.within_nominal(pending("a1", gpus=1, queue="a"))
    assert book.within_nominal(pending("b1", gpus=6, queue="b"))


def test_ordinals() -> None:
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111, 25_000)] == [
        "1st",
        "2nd",
        "3rd",
        "4th",
        "11th",
        "12th",
        "13th",
        "21st",
        "22nd",
        "101st",
        "111th",
        "25000th",
    ]
