"""Item 13: schemathesis over the server's whole OpenAPI - no 5xx, no response off its schema.

Every operation of ``/openapi.json`` gets generated requests against the real app on a fresh
home, auth off: schemathesis's coverage cases (each bound's edges - a maximum and one past it -,
missing and wrong-typed values), then positive and negative fuzzing, a few examples each (the
whole file takes about 80 s on two cores). Two checks: ``not_a_server_error`` and
``response_schema_conformance``. Jobs are submitted
with a harmless command only (the generated command is replaced by ``["true"]`` and its
environment emptied); no deployment can start a replica, since no generated request can register
a model (that takes an uploaded ONNX blob whose BLAKE3 digest matches its URL).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import GenerationConfig
from schemathesis.specs.openapi.checks import response_schema_conformance
from sqlalchemy import select

from shipyard.compute import admission, jobs
from shipyard.compute.processes import process_alive
from shipyard.context import Context
from shipyard.domain.models import DeploymentStatus
from shipyard.server.app import create_app
from shipyard.settings import Settings
from shipyard.store.tables import DeploymentRow, JobRow
from tests.conftest import wait_for

MAX_EXAMPLES = 10  # per operation and mode (positive, negative)
MAX_COVERAGE_CASES = 60  # per operation
HARMLESS_COMMAND = ["true"]
CHECKS = [not_a_server_error, response_schema_conformance]


@pytest.fixture(scope="module")
def api_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    home = Path(tmp_path_factory.mktemp("schemathesis-home"))
    app = create_app(Settings(home=home), auth=False, scheduler=False)
    yield app
    _stop_everything(app.state.ctx)


@pytest.fixture(scope="module")
def api_schema(api_app: Any) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", api_app)


@pytest.mark.slow
def test_the_whole_openapi(api_schema: Any) -> None:
    """Positive and negative cases for every operation; every failure is collected, then shown.

    (Driven through ``APIOperation.as_strategy`` rather than ``schema.parametrize``: the
    fixture-based parametrization of schemathesis 4.32 breaks on pytest 9.2.)"""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 40, [op.label for op in operations]
    failures: dict[str, str] = {}
    seen: Counter[str] = Counter()
    for operation in operations:
        _cover(api_schema, operation, seen, failures)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz(operation, mode, seen)
            except Unsatisfiable:  # nothing to get wrong (no parameters, no body): positive only
                if mode is GenerationMode.POSITIVE:
                    failures[f"{operation.label} (positive)"] = "no case could be generated"
            except Exception as exc:  # one operation's failure must not hide the others'
                failures[f"{operation.label} ({mode.value})"] = f"{type(exc).__name__}: {exc}"[
                    :2000
                ]
    never = sorted(op.label for op in operations if not seen[op.label])
    print(
        f"\nschemathesis: {seen['cases']} cases over {len(operations)} operations, "
        f"{seen['5xx']} 5xx, {len(failures)} failing operation/modes"
    )
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    assert seen["5xx"] == 0
    assert not never, f"operations schemathesis never called: {never}"


def _cover(schema: Any, operation: Any, seen: Counter[str], failures: dict[str, str]) -> None:
    """schemathesis's coverage phase: each bound's edges (a maximum and one past it), missing
    and wrong-typed values, for every parameter and body field."""
    cases = schema.iter_coverage_cases(
        operation, generation_modes=list(GenerationMode), generation_config=GenerationConfig()
    )
    for number, case in enumerate(cases):
        if number >= MAX_COVERAGE_CASES:
            break
        try:
            _call(operation, case, seen)
        except Exception as exc:
            failures[f"{operation.label} (coverage #{number})"] = f"{type(exc).__name__}: {exc}"[
                :2000
            ]


def _call(operation: Any, case: Any, seen: Counter[str]) -> None:
    _make_harmless(case)
    response = case.call()
    seen["cases"] += 1
    seen[operation.label] += 1
    if response.status_code >= 500:
        seen["5xx"] += 1
    case.validate_response(response, checks=CHECKS)


def _fuzz(operation: Any, mode: GenerationMode, seen: Counter[str]) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,  # the same cases every run: a failure here is reproducible
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report, do not minimise
    )
    def run(case: Any) -> None:
        _call(operation, case, seen)

    run()


def _make_harmless(case: Any) -> None:
    """A generated job runs ``true`` with an empty environment, whatever else was generated."""
    if case.method.upper() == "POST" and case.path.endswith("/jobs"):
        body = case.body
        if isinstance(body, dict) and isinstance(body.get("spec"), dict):
            body["spec"]["command"] = list(HARMLESS_COMMAND)
            body["spec"]["env"] = {}


def _stop_everything(ctx: Context) -> None:
    """Cancel the jobs the run queued and wait for their supervisors; stop any deployment."""
    for job in jobs.list_jobs(ctx):
        if job.status.value in ("queued", "running"):
            jobs.cancel_job(ctx, job_id=job.id, project=job.project)
    with ctx.db.read() as s:
        supervisors = [
            ((ref or {}).get("supervisor_pid"), (ref or {}).get("supervisor_started"))
            for ref in s.scalars(select(JobRow.executor_ref))
        ]
        running = s.execute(
            select(DeploymentRow).where(
                DeploymentRow.status.in_(
                    [DeploymentStatus.RUNNING.value, DeploymentStatus.STARTING.value]
                )
            )
        ).scalars()
        live = [(d.project_id, d.name) for d in running]
    assert not live, f"a generated request started a deployment: {live}"
    for pid, started in supervisors:
        if pid is not None:
            wait_for(
                lambda p=pid, t=started: not process_alive(p, t), timeout=30, what="supervisor exit"
            )
    admission.step(ctx)
