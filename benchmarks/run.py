"""Run the benchmarks: each module in its own process, then a summary table and JSON.

Every ``benchmarks/<name>.py`` (not ``run.py``, not ``_*.py``) is a benchmark: it is run as
``python benchmarks/<name>.py [--quick] --out benchmarks/results/<name>.json`` and writes that
file. The runner then writes ``benchmarks/results/summary.json`` (each benchmark's status, wall
time and headline figures) and prints the headline figures as a table.

Usage: ``.venv/bin/python benchmarks/run.py [--only NAME ...] [--quick]`` (or ``make bench``,
which first installs the ``bench`` extra: the peers measured against).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BENCH_DIR,
    RESULTS_DIR,
    machine,
    progress,
)

TIMEOUT_S = 900
# Benchmarks that need longer than TIMEOUT_S (the full Philly replay: 12 simulations of 82k jobs).
# executor_latency: 1,000 jobs on the local executor and 1,000 on Ray (an actor process each).
TIMEOUTS = {"sim_philly": 4 * 3600, "executor_latency": 2 * 3600}
# Short names for --only (a benchmark is also always reachable by its module's name).
ALIASES = {
    "ddp": "ddp_overhead",
    "policy": "policy_decision",
    "sim": "sim_philly",
    "executor": "executor_latency",
}


def available() -> list[str]:
    return sorted(
        p.stem for p in BENCH_DIR.glob("*.py") if p.stem != "run" and not p.stem.startswith("_")
    )


def main(argv: list[str] | None = None) -> int:
    names = available()
    parser = argparse.ArgumentParser(description="Run shipyard's benchmarks against real peers.")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only this benchmark (repeatable, or comma-separated): {', '.join(names)}",
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run of each")
    args = parser.parse_args(argv)
    chosen = names
    if args.only:
        chosen = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
        chosen = [ALIASES.get(n, n) for n in chosen]
        unknown = sorted(set(chosen) - set(names))
        if unknown:
            parser.error(f"--only: unknown benchmark(s) {unknown}; available: {names}")

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "benchmarks": {},
    }
    for name in chosen:
        summary["benchmarks"][name] = run_one(name, quick=args.quick)
    summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out = RESULTS_DIR / "summary.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(table(summary))
    print(f"\nresults: {RESULTS_DIR}/<name>.json, summary: {out}")
    failed = [n for n, b in summary["benchmarks"].items() if b["status"] != "ok"]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def run_one(name: str, *, quick: bool) -> dict[str, Any]:
    result_path = RESULTS_DIR / f"{name}.json"
    result_path.unlink(missing_ok=True)  # never report a stale file as this run's
    argv = [sys.executable, str(BENCH_DIR / f"{name}.py"), "--out", str(result_path)]
    if quick:
        argv.append("--quick")
    progress(f"=== {name}{' (quick)' if quick else ''} ===")
    started = time.perf_counter()
    try:
        rc = subprocess.run(argv, timeout=TIMEOUTS.get(name, TIMEOUT_S)).returncode
    except subprocess.TimeoutExpired:
        rc = None
    seconds = round(time.perf_counter() - started, 1)
    entry: dict[str, Any] = {"seconds": seconds, "result": str(result_path)}
    if rc is None:
        entry.update(status="failed", error=f"timed out after {TIMEOUTS.get(name, TIMEOUT_S)}s")
    elif rc != 0 or not result_path.exists():
        entry.update(status="failed", error=f"exit status {rc}; see the output above")
    else:
        result = json.loads(result_path.read_text())
        entry.update(status="ok", headline=result.get("headline", []))
    progress(f"=== {name}: {entry['status']} in {seconds}s ===")
    return entry


def table(summary: dict[str, Any]) -> str:
    rows = [("benchmark", "figure", "value", "unit", "detail")]
    for name, entry in summary["benchmarks"].items():
        if entry["status"] != "ok":
            rows.append((name, "FAILED", "", "", entry.get("error", "")))
            continue
        for item in entry["headline"]:
            if item.get("skipped"):
                value, unit, detail = "-", "", f"skipped: {item['skipped']}"[:90]
            else:
                value, unit, detail = _num(item.get("value")), item.get("unit", ""), ""
                detail = item.get("detail") or ""
            rows.append((name, item["name"], value, unit, detail))
    widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
    lines = []
    for index, row in enumerate(rows):
        cells = [
            str(c).rjust(widths[i]) if i == 2 else str(c).ljust(widths[i])
            for i, c in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    info = summary["machine"]
    lines.append(
        f"\n{info['cpus']} CPUs ({info['cpu_model']}), load at start {info['loadavg']}, "
        f"python {info['python']}; one run, compare ratios within it"
    )
    return "\n".join(lines)


def _num(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and abs(value) < 100:
        return f"{value:.3g}" if abs(value) < 1 else f"{value:,.2f}"
    if isinstance(value, int | float):
        return f"{value:,.0f}"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
