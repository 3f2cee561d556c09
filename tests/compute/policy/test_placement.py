"""Placement on its own: the free view of the nodes, packing rules, never-fits wording."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

import pytest

from shipyard.compute.policy.base import (
    Gpu,
    Node,
    Packing,
    PendingJob,
    Placement,
    RunningJob,
    Snapshot,
)
from shipyard.compute.policy.placement import FreeCapacity, never_fits
from tests.compute.policy._helpers import as_running, node, nodes, pending, running


def snap(ns: list[Node], run: Sequence[RunningJob] = (), packing: Packing = "nodes") -> Snapshot:
    return Snapshot(now=0.0, nodes=ns, queues={}, pending=[], running=list(run), packing=packing)


def where(placement: Placement | None) -> list[tuple[str, tuple[int, ...]]]:
    assert placement is not None
    return [(w.node_id, w.gpus) for w in placement.workers]


def test_free_capacity_subtracts_running_jobs() -> None:
    free = FreeCapacity.of(snap(nodes(2), [running("r", [("n0", [0, 1, 2])], cpus=10)]))
    assert free.total_free_gpus() == 13
    assert free.node_free("n0") == (54.0, 511_000.0, 5)
    assert free.most_free_gpus_on_a_node() == 8


def test_whole_gpus_of_one_worker_are_on_one_node_best_fit() -> None:
    # n0 has 3 free GPUs, n1 has 5, n2 8: a 3-GPU worker takes n0 (tightest), a 4-GPU one n1.
    run = [running("a", [("n0", range(5))]), running("b", [("n1", range(3))])]
    free = FreeCapacity.of(snap(nodes(3), run))
    assert where(free.place(pending("j", gpus=3))) == [("n0", (5, 6, 7))]
    assert where(free.place(pending("k", gpus=4))) == [("n1", (3, 4, 5, 6))]
    # 6 GPUs: only n2 has them on one node, although 8 are free on n0 + n1 together.
    assert where(free.place(pending("m", gpus=6))) == [("n2", (0, 1, 2, 3, 4, 5))]
    assert free.place(pending("x", gpus=9)) is None


def test_place_changes_nothing_take_and_give_back_round_trip() -> None:
    free = FreeCapacity.of(snap(nodes(1)))
    job = pending("j", gpus=2, cpus=4, memory_mb=100)
    first = free.place(job)
    assert first is not None and free.place(job) == first  # no commit
    free.take(job, first)
    assert free.node_free("n0") == (60.0, 511_900.0, 6)
    assert where(free.place(job)) == [("n0", (2, 3))]
    free.give_back(job, first)
    assert free.node_free("n0") == (64.0, 512_000.0, 8)
    assert free.total_free_gpus() == 8


def test_cpus_and_memory_bind_on_the_node_of_the_gpus() -> None:
    free = FreeCapacity.of(snap([node("small", cpus=2), node("big", cpus=32)]))
    assert where(free.place(pending("j", gpus=1, cpus=8))) == [("big", (0,))]
    assert free.place(pending("j", gpus=1, cpus=33)) is None
    assert free.place(pending("j", gpus=1, memory_mb=600_000)) is None


def test_a_worker_asking_for_a_whole_node_takes_a_whole_free_node() -> None:
    run = [running("a", [("n0", [0])]), running("b", [("n2", [7])])]
    free = FreeCapacity.of(snap(nodes(3), run))
    assert where(free.place(pending("j", gpus=8))) == [("n1", tuple(range(8)))]
    job = pending("g", gpus=8, workers=2)
    assert free.place(job) is None  # only one node is wholly free


def test_gpu_type_is_matched_case_insensitively_as_a_substring() -> None:
    ns = [node("a", model="NVIDIA A100-SXM4-80GB"), node("h", model="NVIDIA H100 80GB HBM3")]
    free = FreeCapacity.of(snap(ns))
    assert where(free.place(pending("j", gpus=2, gpu_type="h100"))) == [("h", (0, 1))]
    assert where(free.place(pending("j", gpus=2, gpu_type="A100"))) == [("a", (0, 1))]
    assert free.place(pending("j", gpus=1, gpu_type="V100")) is None
    # a node of mixed models: only the matching devices count
    mixed = Node(
        id="m",
        cpus=8,
        memory_mb=10_000,
        gpus=(Gpu(index=0, model="T4"), Gpu(index=1, model="A100"), Gpu(index=2, model="A100")),
    )
    free = FreeCapacity.of(snap([mixed]))
    assert where(free.place(pending("j", gpus=2, gpu_type="a100"))) == [("m", (1, 2))]
    assert free.place(pending("j", gpus=3, gpu_type="a100")) is None
    gang = pending("g", gpus=1, workers=2, gpu_type="A100", cpus=1, memory_mb=10)
    assert where(free.place(gang)) == [("m", (1,)), ("m", (2,))]


def test_fractions_pack_best_fit_onto_shared_devices() -> None:
    run = [
        running("a", [("n0", [0])], gpu_fraction=0.5, gpu_memory_mb=40_000),
        running("b", [("n0", [1])], gpu_fraction=0.75, gpu_memory_mb=10_000),
    ]
    free = FreeCapacity.of(snap(nodes(1), run))
    assert free.total_free_gpus() == pytest.approx(6.75)
    # 0.25 fits on both shared devices: best fit is device 1 (0.25 left there)
    quarter = pending("q", gpu_fraction=0.25, gpu_memory_mb=1000)
    p = free.place(quarter)
    assert p is not None and where(p) == [("n0", (1,))] and p.workers[0].gpu_share == 0.25
    # 0.5 only fits on device 0; with 50 GB of memory it fits on no shared one: a free device
    assert where(free.place(pending("h", gpu_fraction=0.5, gpu_memory_mb=1000))) == [("n0", (0,))]
    assert where(free.place(pending("h", gpu_fraction=0.5, gpu_memory_mb=50_000))) == [("n0", (2,))]
    # a whole-GPU job never lands on a shared device
    assert where(free.place(pending("w", gpus=6))) == [("n0", (2, 3, 4, 5, 6, 7))]
    assert free.place(pending("w", gpus=7)) is None


def test_fractions_on_devices_of_unknown_memory_are_bound_by_share_only() -> None:
    free = FreeCapacity.of(snap(nodes(1, gpus=1, gpu_memory_mb=0)))
    job = pending("f", gpu_fraction=0.3, gpu_memory_mb=999_999)
    for i in range(3):
        p = free.place(job)
        assert p is not None, i
        free.take(job, p)
    assert free.place(job) is None  # 0.9 held, 0.1 left


def test_a_gang_goes_onto_as_few_nodes_as_possible() -> None:
    # free: n0 2, n1 4, n2 8, n3 6
    run = [
        running("a", [("n0", range(6))]),
        running("b", [("n1", range(4))]),
        running("c", [("n3", range(2))]),
    ]
    free = FreeCapacity.of(snap(nodes(4), run))
    # 4 workers x 1 GPU: fits on n1 alone (tightest that holds all)
    assert {n for n, _ in where(free.place(pending("g", gpus=1, workers=4)))} == {"n1"}
    # 12 workers x 1 GPU: n2 (8) then the tightest for the remaining 4: n1
    got = where(free.place(pending("g", gpus=1, workers=12)))
    assert [n for n, _ in got] == ["n2"] * 8 + ["n1"] * 4
    # 2 x 8 GPUs: only one whole free node -> no placement, nothing partial
    assert free.place(pending("g", gpus=8, workers=2)) is None
    # every GPU given once within a gang
    got = where(free.place(pending("g", gpus=2, workers=10)))
    flat = [(n, g) for n, gs in got for g in gs]
    assert len(flat) == len(set(flat)) == 20


def test_a_gang_is_bounded_by_cpus_on_each_node() -> None:
    free = FreeCapacity.of(snap([node("a", cpus=4), node("b", cpus=8)]))
    got = where(free.place(pending("g", gpus=1, cpus=4, workers=3)))
    assert sorted(n for n, _ in got) == ["a", "b", "b"]
    assert free.place(pending("g", gpus=1, cpus=4, workers=4)) is None


def test_cpu_only_workers_prefer_nodes_without_free_gpus() -> None:
    ns = [node("gpu"), node("cpu", gpus=0)]
    free = FreeCapacity.of(snap(ns))
    assert where(free.place(pending("c", cpus=2, workers=2))) == [("cpu", ()), ("cpu", ())]


def test_unhealthy_nodes_and_excluded_nodes_get_nothing() -> None:
    free = FreeCapacity.of(snap([node("sick", healthy=False), node("ok", gpus=2)]))
    assert free.total_free_gpus() == 2
    assert where(free.place(pending("j", gpus=1))) == [("ok", (0,))]
    assert free.place(pending("j", gpus=3)) is None
    assert free.place(pending("j", gpus=1), exclude={"ok"}) is None


def test_can_take_checks_another_views_placement() -> None:
    free = FreeCapacity.of(snap(nodes(1, gpus=2)))
    job = pending("j", gpus=1)
    p = free.place(job)
    assert p is not None and free.can_take(job, p)
    free.take(job, p)
    assert not free.can_take(job, p)
    other = free.copy()
    other.give_back(job, p)
    assert other.can_take(job, p) and not free.can_take(job, p)


def test_count_packing_spreads_gpus_across_nodes() -> None:
    run = [running("a", [("n0", range(5))]), running("b", [("n1", range(5))])]
    free = FreeCapacity.of(snap(nodes(2), run, packing="count"))
    job = pending("j", gpus=6)
    p = free.place(job, "count")
    assert p is not None
    assert sum(len(w.gpus) for w in p.workers) == 6
    assert {w.node_id for w in p.workers} == {"n0", "n1"}
    free.take(job, p, packing="count")
    assert free.total_free_gpus() == 0
    assert free.place(pending("k", gpus=1), "count") is None
    free.give_back(job, p, packing="count")
    assert free.total_free_gpus() == 6


def test_never_fits_names_the_largest_node() -> None:
    ns = [node("n1", gpus=4), node("n3", gpus=8, cpus=32), node("n2", gpus=2, cpus=96)]
    assert never_fits(ns, pending("j", gpus=8), "nodes") is None
    assert never_fits(ns, pending("j", gpus=16), "nodes") == (
        "needs 16 GPUs; the largest node (n3) has 8"
    )
    assert (
        never_fits(ns, pending("j", gpus=16, workers=2), "nodes")
        == "needs 16 GPUs per worker; the largest node (n3) has 8"
    )
    assert "the largest node (n2) has 96" in str(never_fits(ns, pending("j", cpus=100), "nodes"))
    assert "MB of memory" in str(never_fits(ns, pending("j", memory_mb=10**9), "nodes"))
    # each resource exists, but not together on one node
    both = never_fits(ns, pending("j", gpus=8, cpus=64), "nodes")
    assert both is not None and "on one node" in both
    # a gang bigger than the cluster
    gang = never_fits(ns, pending("g", gpus=4, workers=4), "nodes")
    assert gang is not None and "holds only 3" in gang
    assert never_fits(ns, pending("g", gpus=4, workers=3), "nodes") is None
    # unknown GPU model
    typed = never_fits(ns, pending("j", gpus=1, gpu_type="H100"), "nodes")
    assert typed is not None and "'H100'" in typed and "A100" in typed
    # count packing: the cluster's total
    assert never_fits(ns, pending("j", gpus=14), "count") is None
    assert "the cluster has 14" in str(never_fits(ns, pending("j", gpus=15), "count"))
    # fraction with too much memory
    frac = never_fits(ns, pending("f", gpu_fraction=0.5, gpu_memory_mb=100_000), "nodes")
    assert frac is not None and "80000 MB" in frac
    # an empty cluster: wait for nodes rather than fail
    assert never_fits([], pending("j", gpus=1), "nodes") is None


@pytest.mark.parametrize("seed", range(40))
def test_random_placements_never_oversubscribe(seed: int) -> None:
    """Place and take random jobs until nothing fits: no device over 1, no GPU given twice
    (whole), CPUs and memory within each node, whole-GPU workers on one node."""
    rng = random.Random(seed)
    ns = [
        node(
            f"n{i}",
            gpus=rng.choice([0, 1, 2, 4, 8]),
            cpus=rng.choice([4, 8, 16]),
            memory_mb=rng.choice([8000, 32000]),
            gpu_memory_mb=rng.choice([0, 16000, 80000]),
            model=rng.choice(["A100", "H100"]),
        )
        for i in range(rng.randint(1, 6))
    ]
    free = FreeCapacity.of(snap(ns))
    taken = []
    for k in range(60):
        kind = rng.random()
        job = pending(
            f"j{k}",
            gpus=rng.choice([1, 2, 4]) if kind < 0.5 else 0,
            gpu_fraction=rng.choice([0.1, 0.25, 0.3, 0.5, 0.7]) if 0.5 <= kind < 0.85 else 0.0,
            gpu_memory_mb=rng.choice([0, 1000, 20000]),
            cpus=rng.choice([0.5, 1, 2, 4]),
            memory_mb=rng.choice([100, 1000, 4000]),
            workers=rng.choice([1, 1, 1, 2, 3]),
            gpu_type=rng.choice([None, None, "a100", "H100"]),
        )
        p = free.place(job)
        if p is None:
            continue
        assert len(p.workers) == job.workers
        free.take(job, p)
        taken.append((job, p))
        if taken and rng.random() < 0.15:  # some end
            gone_job, gone = taken.pop(rng.randrange(len(taken)))
            free.give_back(gone_job, gone)
    by_id = {n.id: n for n in ns}
    share: dict[tuple[str, int], float] = defaultdict(float)
    mem: dict[tuple[str, int], int] = defaultdict(int)
    whole: dict[tuple[str, int], int] = defaultdict(int)
    cpus: dict[str, float] = defaultdict(float)
    memory: dict[str, int] = defaultdict(int)
    for job, p in taken:
        for w in p.workers:
            cpus[w.node_id] += job.demand.cpus
            memory[w.node_id] += job.demand.memory_mb
            if job.demand.gpus:
                assert len(w.gpus) == job.demand.gpus
            for g in w.gpus:
                model = by_id[w.node_id].gpus[g].model
                if job.demand.gpu_type:
                    assert job.demand.gpu_type.lower() in model.lower()
                if w.gpu_share:
                    share[(w.node_id, g)] += w.gpu_share
                    mem[(w.node_id, g)] += job.demand.gpu_memory_mb
                else:
                    whole[(w.node_id, g)] += 1
                    share[(w.node_id, g)] += 1.0
    for key, total in share.items():
        assert total <= 1 + 1e-9, key
        assert whole[key] <= 1
        capacity = by_id[key[0]].gpus[key[1]].memory_mb
        if capacity and not whole[key]:
            assert mem[key] <= capacity
    for node_id, used in cpus.items():
        assert used <= by_id[node_id].cpus + 1e-9
        assert memory[node_id] <= by_id[node_id].memory_mb
    # the incremental view equals one rebuilt from scratch
    rebuilt = FreeCapacity.of(snap(ns, [as_running(j, p) for j, p in taken]))
    assert rebuilt.total_free_gpus() == pytest.approx(free.total_free_gpus())
    for n in ns:
        a, b = rebuilt.node_free(n.id), free.node_free(n.id)
        assert a[2] == b[2] and a[0] == pytest.approx(b[0]) and a[1] == pytest.approx(b[1])


def test_the_static_node_view_is_reused_only_for_the_same_nodes() -> None:
    same = nodes(2)
    assert FreeCapacity.of(snap(same)).total_free_gpus() == 16
    assert FreeCapacity.of(snap(same)).total_free_gpus() == 16
    # equal-looking but new objects with other contents: rebuilt, not served from the cache
    assert FreeCapacity.of(snap(nodes(2, gpus=4))).total_free_gpus() == 8
    assert FreeCapacity.of(snap([*same[:1], node("n1", gpus=1)])).total_free_gpus() == 9


def test_buckets_stay_correct_through_many_moves() -> None:
    """Nodes move between free-GPU buckets thousands of times (the buckets compact)."""
    ns = nodes(50)
    free = FreeCapacity.of(snap(ns))
    rng = random.Random(7)
    held: list[tuple[PendingJob, Placement]] = []
    for k in range(3000):
        if held and rng.random() < 0.5:
            gone, where_ = held.pop(rng.randrange(len(held)))
            free.give_back(gone, where_)
        else:
            job = pending(f"j{k}", gpus=rng.choice([1, 2, 3]))
            p = free.place(job)
            if p is not None:
                free.take(job, p)
                held.append((job, p))
    rebuilt = FreeCapacity.of(snap(ns, [as_running(j, p) for j, p in held]))
    assert free.total_free_gpus() == rebuilt.total_free_gpus()
    for n in ns:
        assert free.node_free(n.id) == rebuilt.node_free(n.id)
    assert free.most_free_gpus_on_a_node() == rebuilt.most_free_gpus_on_a_node()
