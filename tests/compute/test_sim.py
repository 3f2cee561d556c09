"""The trace simulator: exact JCTs on a hand trace, conservation of work, no GPU held twice, bad
trace inputs, and ``shipyard sim`` end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shipyard.cli.main import app, main
from shipyard.compute import sim
from shipyard.compute.policy import POLICIES
from shipyard.compute.policy.base import Decision, Placement, Snapshot, WorkerPlacement
from shipyard.compute.policy.fifo import Fifo
from shipyard.compute.sim import SimConfig, TraceJob, load_trace, simulate
from shipyard.errors import InvalidInputError, InvalidStateError, NotFoundError

HEADER = "timestamp,duration,num_gpus,gpu_time,cluster\n"

# One node of 4 GPUs. A holds the whole node 0..100; B (2 GPUs) and C (1 GPU) wait behind it;
# D (4 GPUs) then blocks E (1 GPU) although a GPU is free (head-of-line blocking).
HAND = [
    ("A", 0.0, 100.0, 4),
    ("B", 10.0, 50.0, 2),
    ("C", 20.0, 10.0, 1),
    ("D", 30.0, 200.0, 4),
    ("E", 40.0, 5.0, 1),
]
ONE_NODE = SimConfig(nodes=1, gpus_per_node=4, restart_penalty_s=30.0)


def hand_jobs() -> list[TraceJob]:
    return [TraceJob(name, t, d, g, "q1" if name in "ABC" else "q2") for name, t, d, g in HAND]


def run_hand(policy: str) -> dict[str, float]:
    jobs = hand_jobs()
    result = simulate(jobs, policy, ONE_NODE, check=True, record_jobs=True)
    assert result.metrics["jobs_finished"] == len(jobs)
    return {k: round(v, 6) for k, v in result.jobs["jct_s"].items()}


def test_fifo_exact_jcts_with_head_of_line_blocking() -> None:
    # A 0-100; B 100-150 and C 100-110 start together; D waits for B: 150-350; E is behind D
    # (strict FIFO) although one GPU is free from 110: 350-355.
    assert run_hand("fifo") == {"A": 100.0, "B": 140.0, "C": 90.0, "D": 320.0, "E": 315.0}


def test_srtf_exact_jcts_with_preemption_and_restart_penalty() -> None:
    # t=10: B (50 s) preempts A (90 s left) and runs 10-60; C 20-30; E 40-45; at 60 A restarts
    # with its 10 s of progress kept, pays 30 s: 60-180; D 180-380.
    assert run_hand("srtf") == {"A": 180.0, "B": 50.0, "C": 10.0, "D": 350.0, "E": 5.0}


def test_srtf_preemption_is_counted_and_work_conserved() -> None:
    result = simulate(hand_jobs(), "srtf", ONE_NODE, check=True)
    assert result.metrics["preemptions"] == 1 and result.metrics["jobs_preempted"] == 1
    checks = result.checks
    # A held 4 GPUs 10 s, then 120 s of which 30 s were the restart penalty.
    assert checks["penalty_gpu_s"] == pytest.approx(4 * 30.0)
    assert checks["allocated_gpu_s"] - checks["penalty_gpu_s"] == pytest.approx(
        checks["trace_gpu_s_finished"]
    )
    assert checks["trace_gpu_s_finished"] == pytest.approx(sum(d * g for _, _, d, g in HAND))


def test_metrics_of_the_hand_trace() -> None:
    result = simulate(hand_jobs(), "fifo", ONE_NODE)
    m = result.metrics
    assert m["jct_mean_s"] == pytest.approx((100 + 140 + 90 + 320 + 315) / 5)
    assert m["jct_median_s"] == pytest.approx(140.0)
    assert m["makespan_s"] == pytest.approx(355.0)
    # waits: A 0, B 90, C 80, D 120, E 310
    assert m["wait_mean_s"] == pytest.approx((0 + 90 + 80 + 120 + 310) / 5)
    busy = 4 * 100 + 2 * 50 + 10 + 4 * 200 + 5
    assert m["gpu_utilisation"] == pytest.approx(busy / (4 * 355.0), abs=1e-4)
    # rho: A alone in the cluster (1 active queue) -> ideal 100, rho 1; E arrives with both
    # queues active: share 2 GPUs, it needs 1 -> ideal 5, rho 315 / 5.
    assert m["rho_max"] == pytest.approx(63.0)
    assert m["starved_24h"] == 0 and m["jobs_dropped"] == 0 and m["complete"] is True


@pytest.mark.parametrize("packing", ["nodes", "count"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_holds_no_gpu_twice_and_conserves_work(
    policy: str, packing: str, tmp_path: Path
) -> None:
    """A busy slice with gangs larger than a node, on 4 nodes of 8 GPUs, at 150% load."""
    jobs = _busy_trace(tmp_path / "t.csv")
    config = SimConfig(nodes=4, gpus_per_node=8, packing=packing, load=1.5)  # type: ignore[arg-type]
    result = simulate(jobs, policy, config, check=True)  # check: raises on a GPU held twice
    m = result.metrics
    assert m["jobs_finished"] == len(jobs) - m["jobs_dropped"]
    assert m["jobs_dropped"] == 0  # a 32-GPU job fits a 4 x 8 cluster
    checks = result.checks
    assert checks["allocated_gpu_s"] - checks["penalty_gpu_s"] == pytest.approx(
        checks["useful_gpu_s"], rel=1e-9
    )
    if packing == "count":  # no whole-node rounding: delivered = the trace's gpu_time
        assert checks["useful_gpu_s"] == pytest.approx(checks["trace_gpu_s_finished"])
    assert 0 < m["gpu_utilisation"] <= 1.0


def _busy_trace(path: Path, jobs: int = 96) -> list[TraceJob]:
    lines = [HEADER]
    sizes = [1, 1, 2, 1, 4, 1, 8, 1, 16, 2, 1, 12, 1, 4, 1, 32]
    for k in range(jobs):
        g = sizes[k % len(sizes)]
        duration = 30 + (k * 7919) % 2000
        lines.append(f"{k * 20.0},{duration}.0,{g},{duration * g}.0,q{k % 3}\n")
    path.write_text("".join(lines))
    return load_trace(path)


class _AlwaysAskedFifo(Fifo):
    idle_until_release = False


def test_skipping_idle_fifo_rounds_changes_no_result(tmp_path: Path) -> None:
    jobs = _busy_trace(tmp_path / "t.csv")
    config = SimConfig(nodes=4, gpus_per_node=8, load=1.5)
    skipping = simulate(jobs, Fifo(), config, record_jobs=True)
    asked = simulate(jobs, _AlwaysAskedFifo(), config, record_jobs=True)
    assert skipping.perf["rounds_skipped_idle"] > 0
    assert asked.perf["rounds_skipped_idle"] == 0
    assert skipping.perf["decisions"] < asked.perf["decisions"]
    assert skipping.jobs == asked.jobs


def test_a_wall_budget_stops_with_lower_bounds(tmp_path: Path) -> None:
    jobs = _busy_trace(tmp_path / "t.csv")
    result = simulate(jobs, "fifo", SimConfig(nodes=4, gpus_per_node=8), max_wall_s=0.0)
    m = result.metrics
    assert m["complete"] is False
    assert m["jobs_unfinished"] + m["jobs_not_submitted"] + m["jobs_finished"] == len(jobs)
    assert m["jct_mean_lower_bound_s"] is not None and m["makespan_lower_bound_s"] >= 0


class _DoubleBooker:
    """A broken policy: puts every pending job on GPU 0 of the first node."""

    name = "double-booker"

    def decide(self, snapshot: Snapshot) -> Decision:
        node = snapshot.nodes[0].id
        return Decision(
            admit=[
                Placement(job_id=j.id, workers=(WorkerPlacement(node_id=node, gpus=(0,)),))
                for j in snapshot.pending
            ]
        )


def test_a_policy_that_oversubscribes_a_gpu_is_caught() -> None:
    jobs = [TraceJob("x", 0.0, 10.0, 1, "q"), TraceJob("y", 0.0, 10.0, 1, "q")]
    with pytest.raises(InvalidStateError, match="GPU 0 of node n000, which job x holds"):
        simulate(jobs, _DoubleBooker(), SimConfig(nodes=1, gpus_per_node=2), check=True)


def test_a_job_no_node_can_hold_is_dropped_and_counted() -> None:
    jobs = [TraceJob("big", 0.0, 10.0, 16, "q"), TraceJob("ok", 1.0, 10.0, 1, "q")]
    result = simulate(jobs, "fifo", SimConfig(nodes=1, gpus_per_node=8), record_jobs=True)
    assert result.metrics["jobs_dropped"] == 1 and result.metrics["jobs_finished"] == 1
    assert "2 workers of 8 GPUs" in result.metrics["dropped_examples"]["big"]
    assert result.jobs["jct_s"] == {"ok": 10.0}


def test_load_sizes_the_cluster_or_scales_time() -> None:
    jobs = [TraceJob(f"j{k}", k * 100.0, 50.0, 8, "q") for k in range(11)]  # span 1000 s
    work = 11 * 50.0 * 8
    nodes, scale, _, how = sim.size_cluster(jobs, SimConfig(load=0.5, gpus_per_node=8))
    assert nodes == round(work / (0.5 * 1000 * 8)) and scale == 1.0 and "sized" in how
    nodes, scale, scaled, how = sim.size_cluster(jobs, SimConfig(load=0.5, nodes=2))
    assert nodes == 2 and scaled[-1].submitted_at == pytest.approx(1000 * scale)
    assert sim.offered_load(jobs, 16, time_scale=scale) == pytest.approx(0.5)
    assert "scaled" in how


# --- bad trace inputs -------------------------------------------------------------------------


def test_missing_trace_file(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist") as info:
        load_trace(tmp_path / "nope.csv")
    assert info.value.field == "trace"


@pytest.mark.parametrize(
    ("text", "field", "where"),
    [
        (
            "timestamp,duration,cluster\n1,2,q\n",
            "num_gpus",
            r"line 1 lacks the column\(s\) num_gpus",
        ),
        (HEADER + "2017-10-01 00:00:00,60,1,60,q\nyesterday,60,1,60,q\n", "timestamp", "line 3"),
        (HEADER + "2017-10-01 00:00:00,sixty,1,60,q\n", "duration", "line 2: column duration"),
        (HEADER + "2017-10-01 00:00:00,-5,1,60,q\n", "duration", "line 2"),
        (HEADER + "2017-10-01 00:00:00,60,0,0,q\n", "num_gpus", "line 2: column num_gpus is '0'"),
        (HEADER + "2017-10-01 00:00:00,60,1.5,90,q\n", "num_gpus", "line 2"),
        (HEADER + "2017-10-01 00:00:00,60,1,60,\n", "cluster", "line 2"),
        ("", "trace", "empty"),
        (HEADER, "trace", "has no jobs"),
    ],
)
def test_bad_trace_names_the_column_and_line(
    tmp_path: Path, text: str, field: str, where: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(InvalidInputError, match=where) as info:
        load_trace(path)
    assert info.value.field == field


def test_window_and_slice(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(
        HEADER
        + "2017-10-02 00:00:00,60,1,60,q\n2017-10-01 00:00:00,60,2,120,q\n"
        + "2017-10-03 00:00:00,60,4,240,r\n\n"
    )
    jobs = load_trace(path)
    assert [(j.id, j.submitted_at, j.gpus) for j in jobs] == [
        ("L3", 0.0, 2),
        ("L2", 86400.0, 1),
        ("L4", 2 * 86400.0, 4),
    ]
    assert [j.id for j in load_trace(path, start="2017-10-02", end="2017-10-03")] == ["L2"]
    assert [j.id for j in load_trace(path, jobs=2)] == ["L3", "L2"]
    with pytest.raises(InvalidInputError, match="has no jobs in") as info:
        load_trace(path, start="2018-01-01")
    assert info.value.field == "trace"
    with pytest.raises(InvalidInputError) as bad:
        load_trace(path, start="soon")
    assert bad.value.field == "start"
    with pytest.raises(InvalidInputError) as zero:
        load_trace(path, jobs=0)
    assert zero.value.field == "jobs"


def test_unknown_policy_and_packing() -> None:
    jobs = hand_jobs()
    with pytest.raises(InvalidInputError, match="unknown policy 'nope'") as info:
        simulate(jobs, "nope", ONE_NODE)
    assert info.value.field == "policy"
    with pytest.raises(InvalidInputError) as packing:
        simulate(jobs, "fifo", SimConfig(packing="gpus"))  # type: ignore[arg-type]
    assert packing.value.field == "packing"


# --- the CLI ----------------------------------------------------------------------------------


def _hand_csv(path: Path) -> Path:
    rows = [HEADER] + [
        f"2017-10-01 00:00:{int(t):02d},{d},{g},{d * g},{'q1' if n in 'ABC' else 'q2'}\n"
        for n, t, d, g in HAND
    ]
    path.write_text("".join(rows))
    return path


def test_cli_sim_writes_json_and_prints_a_table(tmp_path: Path) -> None:
    trace = _hand_csv(tmp_path / "hand.csv")
    out = tmp_path / "result.json"
    args = ["sim", "--trace", str(trace), "--policy", "fifo", "--policy", "srtf"]
    args += ["--nodes", "1", "--gpus-per-node", "4", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "fifo" in result.output and "srtf" in result.output
    document = json.loads(out.read_text())
    assert document["jobs"] == 5
    by_policy = {r["policy"]: r for r in document["results"]}
    assert by_policy["fifo"]["metrics"]["jct_mean_s"] == pytest.approx(193.0)
    assert by_policy["srtf"]["metrics"]["jct_mean_s"] == pytest.approx(119.0)
    assert by_policy["srtf"]["cluster"]["gpus"] == 4


def test_cli_sim_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the entry point (main): one line naming the field, exit status 1, no traceback
    monkeypatch.setattr(sys, "argv", ["shipyard", "sim", "--trace", str(tmp_path / "none.csv")])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 1
    stderr = capsys.readouterr().err
    assert "error [trace]" in stderr and "does not exist" in stderr
    assert "Traceback" not in stderr
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "2017-10-01 00:00:00,60,one,60,q\n")
    column = CliRunner().invoke(app, ["sim", "--trace", str(bad)])
    assert isinstance(column.exception, InvalidInputError)
    assert column.exception.field == "num_gpus" and "line 2" in column.exception.message
    trace = _hand_csv(tmp_path / "hand.csv")
    unknown = CliRunner().invoke(app, ["sim", "--trace", str(trace), "--policy", "magic"])
    assert isinstance(unknown.exception, InvalidInputError)
    assert unknown.exception.field == "policy" and "'magic'" in unknown.exception.message
    packing = CliRunner().invoke(app, ["sim", "--trace", str(trace), "--packing", "gpus"])
    assert isinstance(packing.exception, InvalidInputError)
    assert packing.exception.field == "packing"
