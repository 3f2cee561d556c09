"""Metric logging throughput: the shipyard SDK (embedded and over HTTP) against MLflow 3.

One workload for every variant: ``KEYS`` metric keys logged at each of ``steps`` steps (4 x 2,500
= 10,000 points; ``--quick``: 4 x 250). Each variant gets a fresh store, and its clock runs from
the first logging call until the run is finished (so shipyard's final flush, and MLflow's
end_run / async flush, are inside it); creating the store and the run is outside it. Afterwards
every variant's points are read back and counted, so a variant that drops points cannot win.

Variants:

- ``shipyard_embedded``: ``shipyard.init(client=Client(settings=Settings(home=tmp)))``,
  ``run.log({...}, step=i)``, ``run.finish()``.
- ``shipyard_server``: the same, with ``Settings(url=...)`` against ``python -m shipyard.server``
  started as a subprocess on 127.0.0.1 (its own ``SHIPYARD_HOME``).
- ``mlflow_log_metric``: ``mlflow.log_metric(key, value, step=i)`` per point (the idiomatic loop).
- ``mlflow_log_metrics``: ``mlflow.log_metrics({...}, step=i)`` per step (the call shape of
  ``run.log``).
- ``mlflow_log_metrics_async``: the same with ``synchronous=False`` (MLflow's own non-blocking
  logging, the closest in semantics to shipyard's buffered ``run.log``).
- ``mlflow_log_batch``: ``MlflowClient().log_batch(run_id, metrics=[...])`` in chunks of 1,000.

All MLflow variants log to ``sqlite:///<tmp>/mlflow.db``. The per-call MLflow variants are slow
(tens of milliseconds a point on a busy disk), so they stop at a step boundary after
``--budget-s`` seconds; their rate is then over the points they did log, and the JSON says
``"truncated": true`` with the points planned.

Run: ``.venv/bin/python benchmarks/tracking.py [--quick] [--budget-s S] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    PYTHON,
    SHIPYARD_ENV,
    child,
    child_env,
    free_port,
    loadavg,
    machine,
    progress,
    ratio,
    wait_http_ok,
    write_result,
)

NAME = "tracking"
KEYS = ("loss", "accuracy", "learning_rate", "grad_norm")
FULL_STEPS = 2500
QUICK_STEPS = 250
FULL_BUDGET_S = 30.0
QUICK_BUDGET_S = 6.0
MLFLOW_CHUNK = 1000

Rows = list[dict[str, float]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (4 x 250 points)")
    parser.add_argument("--steps", type=int, help="steps per key (default 2500; quick 250)")
    parser.add_argument(
        "--budget-s",
        type=float,
        help="time cap for each per-call MLflow variant (default 30; quick 6)",
    )
    parser.add_argument("--out", type=Path, help="result file (default results/tracking.json)")
    args = parser.parse_args(argv)
    steps = args.steps or (QUICK_STEPS if args.quick else FULL_STEPS)
    budget = args.budget_s or (QUICK_BUDGET_S if args.quick else FULL_BUDGET_S)
    for key in SHIPYARD_ENV:
        os.environ.pop(key, None)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("mlflow", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    result = run(steps=steps, budget_s=budget, quick=args.quick)
    write_result(NAME, result, args.out)
    return 0


def run(*, steps: int, budget_s: float, quick: bool) -> dict[str, Any]:
    rows = workload(steps)
    points = steps * len(KEYS)
    info = machine()
    progress(
        f"tracking: {len(KEYS)} keys x {steps} steps = {points} points per variant "
        f"({info['cpus']} CPUs, load {info['loadavg']})"
    )
    variants: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="shipyard-bench-tracking-") as tmp_name:
        tmp = Path(tmp_name)
        plan: list[tuple[str, Callable[[Path], dict[str, Any]]]] = [
            ("shipyard_embedded", lambda d: bench_shipyard_embedded(d, rows)),
            ("shipyard_server", lambda d: bench_shipyard_server(d, rows)),
            ("mlflow_log_batch", lambda d: bench_mlflow_log_batch(d, rows)),
            ("mlflow_log_metrics", lambda d: bench_mlflow_fluent(d, rows, "per_step", budget_s)),
            (
                "mlflow_log_metrics_async",
                lambda d: bench_mlflow_fluent(d, rows, "per_step_async", budget_s),
            ),
            ("mlflow_log_metric", lambda d: bench_mlflow_fluent(d, rows, "per_point", budget_s)),
        ]
        for name, fn in plan:
            where = tmp / name
            where.mkdir()
            progress(f"  {name} ...")
            try:
                outcome = fn(where)
            except ImportError as exc:
                outcome = {"skipped": f"not installed: {exc} (run 'make bench')"}
            if "skipped" in outcome:
                progress(f"  {name}: skipped: {outcome['skipped']}")
            else:
                outcome["planned_points"] = points
                outcome["truncated"] = outcome["points"] < points
                progress(
                    f"  {name}: {outcome['points']} points in {outcome['seconds']:.3f}s = "
                    f"{outcome['points_per_s']:,.0f} points/s"
                    + (" (time-capped)" if outcome["truncated"] else "")
                )
            variants[name] = outcome

    ratios = {}
    for ours in ("shipyard_embedded", "shipyard_server"):
        for theirs in (n for n in variants if n.startswith("mlflow_")):
            ratios[f"{ours}/{theirs}"] = ratio(
                variants[ours].get("points_per_s"), variants[theirs].get("points_per_s")
            )
    headline: list[dict[str, Any]] = [
        {
            "name": name,
            "value": v.get("points_per_s"),
            "unit": "points/s",
            "skipped": v.get("skipped"),
            "detail": f"{v['points']} points in {v['seconds']} s"
            + (" (time-capped)" if v.get("truncated") else "")
            if "points" in v
            else "",
        }
        for name, v in variants.items()
    ]
    headline += [
        {"name": f"ratio {key}", "value": value, "unit": "x points/s"}
        for key, value in ratios.items()
        if key.endswith(("/mlflow_log_batch", "/mlflow_log_metric"))
    ]
    return {
        "benchmark": NAME,
        "quick": quick,
        "workload": {
            "keys": list(KEYS),
            "steps": steps,
            "points": points,
            "per_call_time_budget_s": budget_s,
            "mlflow_log_batch_chunk": MLFLOW_CHUNK,
        },
        "machine": info,
        "variants": variants,
        "ratios": ratios,
        "ratio_definition": "points/s of the shipyard variant / points/s of the MLflow variant "
        "(> 1: shipyard is faster)",
        "headline": headline,
        "loadavg_after": loadavg(),
        "caveats": [
            "One run, wall-clock time on a shared machine; compare the ratios, not the absolute "
            "figures, and only within one run.",
            "shipyard's SQLite runs in WAL mode with synchronous=NORMAL; MLflow's SQLAlchemy "
            "store uses SQLite's defaults (rollback journal, synchronous=FULL), so MLflow pays "
            "more fsyncs per transaction.",
            "shipyard_server goes over HTTP to a local server process, while every MLflow "
            "variant writes to its SQLite file in-process (mlflow-skinny has no tracking "
            "server); the server comparison favours MLflow.",
            "Time-capped variants ('truncated': true) report the rate over the points they "
            "logged before the cap.",
            "mlflow_log_batch sends 1,000 metrics per call, the most MLflow accepts in one "
            "batch (MAX_METRICS_PER_BATCH); shipyard's run.log buffers and sends up to 5,000 "
            "points per transaction from a background thread.",
            "The MLflow per-call variants are bound by SQLite commits (an fsync each), so they "
            "swing with other disk activity on the machine.",
        ],
    }


def workload(steps: int) -> Rows:
    """The same values for every variant, computed before any clock starts."""
    return [
        {
            "loss": 2.5 * math.exp(-i / 500) + 0.01 * math.sin(i),
            "accuracy": 1.0 - math.exp(-i / 400),
            "learning_rate": 0.001 * 0.5 ** (i // 1000),
            "grad_norm": 1.0 + 0.5 * math.cos(i / 7),
        }
        for i in range(steps)
    ]


def outcome(points: int, seconds: float, **extra: Any) -> dict[str, Any]:
    return {
        "points": points,
        "seconds": round(seconds, 4),
        "points_per_s": round(points / seconds, 1) if seconds > 0 else None,
        **extra,
    }


# --- shipyard ----------------------------------------------------------------------------------


def bench_shipyard_embedded(where: Path, rows: Rows) -> dict[str, Any]:
    from shipyard.client import Client
    from shipyard.settings import Settings

    with Client(settings=Settings(home=where / "home", project="bench")) as client:
        return _shipyard_loop(client, rows, api="shipyard.init(); run.log(dict, step=i)")


def bench_shipyard_server(where: Path, rows: Rows) -> dict[str, Any]:
    from shipyard.client import Client
    from shipyard.settings import Settings

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [PYTHON, "-m", "shipyard.server", "--port", str(port), "--no-auth"]
    env = child_env(SHIPYARD_HOME=str(where / "server-home"), PYTHONUNBUFFERED="1")
    with child(argv, env=env, log_path=where / "server.log") as server:
        why = wait_http_ok(server, f"{url}/healthz", timeout=60)
        if why is not None:
            return {"skipped": f"the shipyard server did not start: {why}"}
        settings = Settings(home=where / "client-home", url=url, project="bench")
        with Client(settings=settings) as client:
            result = _shipyard_loop(
                client, rows, api="shipyard.init() over HTTP; run.log(dict, step=i)"
            )
        result["server"] = " ".join(argv[1:])
        return result


def _shipyard_loop(client: Any, rows: Rows, *, api: str) -> dict[str, Any]:
    import shipyard

    run = shipyard.init(client=client, project="bench", name="bench-tracking")
    started = time.perf_counter()
    for step, row in enumerate(rows):
        run.log(row, step=step)
    run.finish()
    seconds = time.perf_counter() - started
    _verify(
        rows,
        {
            key: [(p.step, p.value) for p in client.backend.metric_history(run.id, key=key)]
            for key in KEYS
        },
    )
    return outcome(len(rows) * len(KEYS), seconds, verified=True, api=api)


# --- MLflow ------------------------------------------------------------------------------------


_MLFLOW_TEMPLATE: Path | None = None


def _mlflow_setup(where: Path) -> tuple[Any, str]:
    """A fresh MLflow SQLite store in ``where`` with an experiment; the clock is not running.

    MLflow creates its schema with alembic migrations (seconds); that is done once, into a
    template file, and each variant starts from a copy of it.
    """
    global _MLFLOW_TEMPLATE
    import mlflow
    from mlflow import MlflowClient

    if _MLFLOW_TEMPLATE is None:
        template = where.parent / "mlflow-template" / "mlflow.db"
        template.parent.mkdir()
        mlflow.set_tracking_uri(f"sqlite:///{template}")
        MlflowClient().search_experiments()  # creates the schema
        _MLFLOW_TEMPLATE = template
    shutil.copyfile(_MLFLOW_TEMPLATE, where / "mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{where / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.create_experiment("bench", artifact_location=(where / "artifacts").as_uri())
    return client, experiment


def bench_mlflow_log_batch(where: Path, rows: Rows) -> dict[str, Any]:
    from mlflow.entities import Metric

    client, experiment = _mlflow_setup(where)
    run_id = client.create_run(experiment).info.run_id
    started = time.perf_counter()
    chunk: list[Any] = []
    for step, row in enumerate(rows):
        now = int(time.time() * 1000)
        for key, value in row.items():
            chunk.append(Metric(key, value, now, step))
        if len(chunk) >= MLFLOW_CHUNK:
            client.log_batch(run_id, metrics=chunk)
            chunk = []
    if chunk:
        client.log_batch(run_id, metrics=chunk)
    client.set_terminated(run_id)
    seconds = time.perf_counter() - started
    _verify(rows, _mlflow_history(client, run_id))
    return outcome(
        len(rows) * len(KEYS),
        seconds,
        verified=True,
        api=f"MlflowClient().log_batch(run_id, metrics=[...{MLFLOW_CHUNK}])",
    )


def bench_mlflow_fluent(where: Path, rows: Rows, mode: str, budget_s: float) -> dict[str, Any]:
    import mlflow

    client, experiment = _mlflow_setup(where)
    active = mlflow.start_run(experiment_id=experiment)
    run_id = active.info.run_id
    logged = 0
    started = time.perf_counter()
    deadline = started + budget_s
    try:
        for step, row in enumerate(rows):
            if mode == "per_point":
                for key, value in row.items():
                    mlflow.log_metric(key, value, step=step)
            elif mode == "per_step":
                mlflow.log_metrics(row, step=step)
            else:
                mlflow.log_metrics(row, step=step, synchronous=False)
            logged = step + 1
            if time.perf_counter() > deadline:
                break
        if mode == "per_step_async":
            mlflow.flush_async_logging()
    finally:
        mlflow.end_run()
    seconds = time.perf_counter() - started
    _verify(rows[:logged], _mlflow_history(client, run_id))
    api = {
        "per_point": "mlflow.log_metric(key, value, step=i) per point",
        "per_step": "mlflow.log_metrics(dict, step=i) per step",
        "per_step_async": "mlflow.log_metrics(dict, step=i, synchronous=False) per step",
    }[mode]
    return outcome(logged * len(KEYS), seconds, verified=True, api=api)


def _mlflow_history(client: Any, run_id: str) -> dict[str, list[tuple[int, float]]]:
    return {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in KEYS
    }


# --- checks ------------------------------------------------------------------------------------


def _verify(rows: Rows, history: dict[str, list[tuple[int, float]]]) -> None:
    """Every point logged is stored once, with its step and value; raises otherwise."""
    for key in KEYS:
        got = sorted(history.get(key, []))
        want = [(step, row[key]) for step, row in enumerate(rows)]
        if len(got) != len(want):
            raise AssertionError(f"{key}: {len(got)} points stored, {len(want)} logged")
        for (gs, gv), (ws, wv) in zip(got, want, strict=True):
            if gs != ws or not math.isclose(gv, wv, rel_tol=1e-9, abs_tol=1e-12):
                raise AssertionError(f"{key}: stored ({gs}, {gv}), logged ({ws}, {wv})")


if __name__ == "__main__":
    sys.exit(main())
