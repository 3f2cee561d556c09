"""The ``shipyard`` command line: typer + rich, built on the SDK (never on server code).

Every command works against the embedded home, or a server when ``SHIPYARD_URL`` is set. Errors
print one line saying what went wrong and what to do, and exit non-zero.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from shipyard.client import Client
from shipyard.context import open_context
from shipyard.demo.lifecycle import Reporter, follow_job, run_demo
from shipyard.domain.models import JobStatus
from shipyard.errors import InvalidInputError, ShipyardError
from shipyard.security.tokens import create_token
from shipyard.settings import ENV_BLOBS, ENV_DB, Settings

app = typer.Typer(
    help="shipyard: data, jobs, tracking, registry, serving - on your hardware.",
    no_args_is_help=True,
    add_completion=False,
)
data_app = typer.Typer(help="Versioned datasets.", no_args_is_help=True)
jobs_app = typer.Typer(help="Training and batch jobs.", no_args_is_help=True)
runs_app = typer.Typer(help="Tracked runs.", no_args_is_help=True)
models_app = typer.Typer(help="The model registry.", no_args_is_help=True)
endpoints_app = typer.Typer(help="Deployed endpoints.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens (for a server with auth on).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(jobs_app, name="jobs")
app.add_typer(runs_app, name="runs")
app.add_typer(models_app, name="models")
app.add_typer(endpoints_app, name="endpoints")
app.add_typer(token_app, name="token")

console = Console()
err = Console(stderr=True)
ProjectOpt = Annotated[
    str | None,
    typer.Option("--project", "-p", help="Project (default: $SHIPYARD_PROJECT or 'default')."),
]


def _client() -> Client:
    return Client()


def _ago(ts: Any) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


# --- server and demo ------------------------------------------------------------------------


@app.command()
def server(
    host: Annotated[
        str, typer.Option(help="Address to bind; non-loopback needs --auth.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8340,
    auth: Annotated[bool, typer.Option("--auth/--no-auth", help="Require API tokens.")] = False,
    db: Annotated[
        str | None, typer.Option(help="Metadata store URL, e.g. postgresql://user@host/db.")
    ] = None,
    blobs: Annotated[
        str | None, typer.Option(help="Blob store URL (fsspec), e.g. s3://bucket/prefix.")
    ] = None,
) -> None:
    """Serve the REST API, /metrics and the web UI (on the embedded home unless --db/--blobs)."""
    args = [sys.executable, "-m", "shipyard.server", "--host", host, "--port", str(port)]
    if auth:
        args.append("--auth")
    env = dict(os.environ)
    if db:
        env[ENV_DB] = db
    if blobs:
        env[ENV_BLOBS] = blobs
    os.execve(sys.executable, args, env)


class RichReporter(Reporter):
    def step(self, title: str) -> None:
        console.rule(f"[bold cyan]{title}")

    def info(self, text: str) -> None:
        console.print(f"  {text}", highlight=False, soft_wrap=True)

    def log_line(self, text: str) -> None:
        console.print(f"  [dim]job |[/dim] {text}", highlight=False, soft_wrap=True)


@app.command()
def demo(
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 40,
    keep_endpoint: Annotated[bool, typer.Option(help="Leave the endpoint running.")] = False,
    workdir: Annotated[Path | None, typer.Option(help="Scratch folder for data and code.")] = None,
) -> None:
    """Run the whole lifecycle: data -> job -> run -> model -> endpoint -> predictions."""
    client = _client()
    settings = client.settings
    work = workdir or settings.home / "demo"
    started = time.time()
    result = run_demo(
        client, workdir=work, reporter=RichReporter(), epochs=epochs, keep_endpoint=keep_endpoint
    )
    table = Table(
        title=f"shipyard demo finished in {time.time() - started:.0f}s", show_header=False
    )
    table.add_row("accuracy (held-out)", f"{result.accuracy:.4f}")
    table.add_row("requests", str(result.requests))
    table.add_row("latency p50 / p99", f"{result.p50_ms:.2f} ms / {result.p99_ms:.2f} ms")
    table.add_row("throughput", f"{result.throughput_rps:.0f} req/s")
    where = settings.url or str(settings.home)
    table.add_row("home / server", where)
    if not client.is_remote:
        table.add_row("metadata", settings.database_url)
        table.add_row("blobs", settings.blob_url)
        table.add_row("job log", str(settings.jobs_dir / result.job.id / "output.log"))
    table.add_row("dataset", f"{result.dataset.dataset} v{result.dataset.version}")
    table.add_row("run", result.run.id)
    table.add_row("model", f"{result.model.model} v{result.model.version} (production)")
    table.add_row(
        "endpoint",
        f"{result.deployment.name}: "
        + ("stopped" if result.stopped else str(result.deployment.url)),
    )
    console.print(table)
    console.print("Look around:", style="bold")
    for cmd in (
        f"shipyard data show {result.dataset.dataset}",
        f"shipyard runs show {result.run.id}",
        f"shipyard jobs logs {result.job.id}",
        f"shipyard models show {result.model.model}",
        "shipyard endpoints list",
        f"shipyard deploy {result.model.model}@production --name {result.deployment.name}",
        "shipyard server   # then open http://127.0.0.1:8340/",
    ):
        console.print(f"  {cmd}", highlight=False)


# --- data -------------------------------------------------------------------------------------


@data_app.command("commit")
def data_commit(
    path: Annotated[Path, typer.Argument(help="Folder or file to commit.")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset name.")],
    message: Annotated[str, typer.Option("--message", "-m")] = "",
    project: ProjectOpt = None,
) -> None:
    """Commit files as a new, immutable dataset version (content-addressed, deduplicated)."""
    client = _client()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("hashing", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what[-40:])

        dv = client.datasets.commit(
            path, name=dataset, message=message, project=project, progress=progress
        )
    console.print(
        f"dataset [bold]{dv.dataset}[/bold] v{dv.version}: {dv.file_count} files, "
        f"{dv.total_bytes} bytes ({dv.new_bytes} new), manifest {dv.manifest_digest[:16]}"
    )
    for check in dv.validation:
        mark = "[green]ok[/green]" if check.passed else "[red]FAILED[/red]"
        console.print(f"  {mark} {check.check}: {check.message}")


@data_app.command("list")
def data_list(project: ProjectOpt = None) -> None:
    """List datasets."""
    table = Table("name", "latest version", "created")
    for ds in _client().datasets.list(project=project):
        table.add_row(ds.name, str(ds.latest_version or "-"), _ago(ds.created_at))
    console.print(table)


@data_app.command("show")
def data_show(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION.")],
    project: ProjectOpt = None,
) -> None:
    """Show a dataset version: files, profile, validation."""
    name, _, version = ref.partition("@")
    client = _client()
    dv = client.datasets.get(name, version or None, project=project)
    console.print(
        f"[bold]{dv.dataset}[/bold] v{dv.version}  {dv.file_count} files, "
        f"{dv.total_bytes} bytes  by {dv.created_by} at {_ago(dv.created_at)}  {dv.message}"
    )
    files = Table("path", "size", "blake3")
    for f in client.datasets.files(name, dv.version, project=project)[:50]:
        files.add_row(f.path, str(f.size), f.digest[:16])
    console.print(files)
    for t in dv.profile.tables:
        prof = Table(
            "column",
            "type",
            "count",
            "nulls",
            "min",
            "max",
            "mean",
            title=f"{t.path}: {t.rows} rows",
        )
        for c in t.columns[:20]:
            prof.add_row(
                c.name, c.type, str(c.count), str(c.nulls), _num(c.min), _num(c.max), _num(c.mean)
            )
        console.print(prof)
    for check in dv.validation:
        console.print(f"  {'ok' if check.passed else 'FAILED'} {check.check}: {check.message}")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


# --- jobs -------------------------------------------------------------------------------------


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    command: Annotated[list[str], typer.Argument(help="The command, after '--'.")],
    cpus: Annotated[float, typer.Option(help="CPUs to reserve.")] = 1.0,
    memory: Annotated[int, typer.Option("--memory", help="Memory to reserve, MB.")] = 512,
    gpus: Annotated[
        int, typer.Option(help="GPUs to reserve (pinned via CUDA_VISIBLE_DEVICES).")
    ] = 0,
    priority: Annotated[int, typer.Option(help="Higher runs first.")] = 0,
    max_runtime: Annotated[float | None, typer.Option(help="Kill after this many seconds.")] = None,
    name: Annotated[str | None, typer.Option(help="Job name.")] = None,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Do not follow the logs.")] = False,
    project: ProjectOpt = None,
) -> None:
    """Snapshot this folder and run COMMAND as a tracked job: shipyard run -- python train.py"""
    client = _client()
    tracked = client.backend.create_run(
        project=project or client.project, name=name, tags={"command": " ".join(command)[:200]}
    )
    job = client.jobs.submit(
        command,
        code_dir=Path.cwd(),
        cpus=cpus,
        memory_mb=memory,
        gpus=gpus,
        priority=priority,
        max_runtime_s=max_runtime,
        name=name,
        project=project,
        run_id=tracked.id,
    )
    err.print(f"job {job.id} {job.status.value} (run {tracked.id})")
    if detach:
        console.print(job.id)
        return
    job = follow_job(
        client, job.id, on_line=lambda line: console.print(line, highlight=False, markup=False)
    )
    err.print(
        f"job {job.id} {job.status.value}"
        + (f": {job.message}" if job.message else "")
        + f"  (wall {job.usage.wall_seconds:.1f}s, cpu {job.usage.cpu_seconds:.1f}s, "
        f"peak {job.usage.peak_memory_mb:.0f} MB)"
    )
    if job.status != JobStatus.SUCCEEDED:
        raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(
    status: Annotated[JobStatus | None, typer.Option(help="Only jobs in this state.")] = None,
    project: ProjectOpt = None,
) -> None:
    """List jobs, newest first."""
    table = Table("id", "name", "status", "gpus", "exit", "wall s", "created")
    for job in _client().jobs.list(project=project, status=status):
        table.add_row(
            job.id,
            job.name,
            job.status.value,
            ",".join(map(str, job.assigned_gpus)) or "-",
            "-" if job.exit_code is None else str(job.exit_code),
            f"{job.usage.wall_seconds:.1f}",
            _ago(job.created_at),
        )
    console.print(table)


@jobs_app.command("show")
def jobs_show(job_id: str) -> None:
    """Show one job."""
    console.print_json(_client().jobs.get(job_id).model_dump_json())


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")
    ] = False,
) -> None:
    """Print a job's captured output."""
    client = _client()
    if follow:
        follow_job(
            client, job_id, on_line=lambda line: console.print(line, highlight=False, markup=False)
        )
        return
    offset = 0
    while True:
        data, offset, _ = client.jobs.logs(job_id, offset=offset)
        if not data:
            break
        sys.stdout.write(data)
    sys.stdout.flush()


@jobs_app.command("cancel")
def jobs_cancel(job_id: str) -> None:
    """Cancel a queued or running job."""
    job = _client().jobs.cancel(job_id)
    console.print(f"job {job.id} {job.status.value}")


# --- runs -------------------------------------------------------------------------------------


@runs_app.command("list")
def runs_list(project: ProjectOpt = None) -> None:
    """List runs, newest first."""
    table = Table("id", "name", "status", "metrics", "created")
    for r in _client().runs.list(project=project):
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(r.metrics.items())[:4])
        table.add_row(r.id, r.name, r.status.value, metrics, _ago(r.created_at))
    console.print(table)


@runs_app.command("show")
def runs_show(run_id: str) -> None:
    """Show one run: params, latest metrics, artifacts."""
    console.print_json(_client().runs.get(run_id).model_dump_json())


# --- models -----------------------------------------------------------------------------------


@models_app.command("list")
def models_list(project: ProjectOpt = None) -> None:
    """List registered models."""
    table = Table("name", "latest", "aliases")
    for m in _client().models.list(project=project):
        table.add_row(
            m.name,
            str(m.latest_version or "-"),
            ", ".join(f"{a}->v{v}" for a, v in sorted(m.aliases.items())),
        )
    console.print(table)


@models_app.command("show")
def models_show(name: str, project: ProjectOpt = None) -> None:
    """Show a model's versions and alias history."""
    client = _client()
    table = Table("version", "format", "aliases", "metrics", "run", "created")
    for v in client.models.versions(name, project=project):
        metrics = ", ".join(f"{k}={val:.4g}" for k, val in sorted(v.metrics.items())[:3])
        table.add_row(
            str(v.version),
            v.format,
            ",".join(v.aliases),
            metrics,
            v.source_run_id or "-",
            _ago(v.created_at),
        )
    console.print(table)
    history = client.backend.alias_history(project=project or client.project, model=name)
    for e in history:
        before = f"v{e.previous_version}" if e.previous_version else "(none)"
        after = f"v{e.version}" if e.version else "(removed)"
        console.print(
            f"  {_ago(e.at)} {e.alias}: {before} -> {after} by {e.actor}", highlight=False
        )


@models_app.command("alias")
def models_alias(name: str, alias: str, version: str, project: ProjectOpt = None) -> None:
    """Point ALIAS of model NAME at VERSION (recorded in the alias history)."""
    mv = _client().models.set_alias(name, alias, version, project=project)
    console.print(f"{name}@{alias} -> v{mv.version}")


# --- serving ----------------------------------------------------------------------------------


@app.command()
def deploy(
    ref: Annotated[
        str, typer.Argument(help="MODEL@ALIAS or MODEL@VERSION (default alias: production).")
    ],
    name: Annotated[str, typer.Option("--name", "-n", help="Endpoint name.")],
    max_batch_size: Annotated[int, typer.Option(help="Adaptive batcher: max rows per batch.")] = 32,
    max_wait_ms: Annotated[
        float, typer.Option(help="Adaptive batcher: max wait for a batch.")
    ] = 5.0,
    project: ProjectOpt = None,
) -> None:
    """Serve a model version over the Open Inference Protocol v2 on 127.0.0.1."""
    model, _, alias = ref.partition("@")
    dep = _client().deployments.create(
        name,
        model=model,
        ref=alias or "production",
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        project=project,
    )
    console.print(
        f"endpoint {dep.name} {dep.status.value}: {dep.url}/v2/models/{dep.name}/infer "
        f"(model {dep.model} v{dep.version}, pid {dep.pid})"
    )


@endpoints_app.command("list")
def endpoints_list(project: ProjectOpt = None) -> None:
    """List endpoints."""
    table = Table("name", "model", "version", "status", "url", "pid")
    for d in _client().deployments.list(project=project):
        table.add_row(
            d.name, d.model, str(d.version), d.status.value, d.url or "-", str(d.pid or "-")
        )
    console.print(table)


@endpoints_app.command("stop")
def endpoints_stop(name: str, project: ProjectOpt = None) -> None:
    """Stop an endpoint's replica."""
    dep = _client().deployments.stop(name, project=project)
    console.print(f"endpoint {dep.name} {dep.status.value}")


@app.command()
def predict(
    name: Annotated[str, typer.Argument(help="Endpoint name.")],
    data: Annotated[str | None, typer.Option(help="Rows as JSON, e.g. '[[0, 1, ...]]'.")] = None,
    file: Annotated[
        Path | None, typer.Option(help="A JSON file with rows, or a full OIP v2 request.")
    ] = None,
    project: ProjectOpt = None,
) -> None:
    """Send rows to an endpoint (OIP v2) and print the outputs."""
    if (data is None) == (file is None):
        raise InvalidInputError("give exactly one of --data or --file", field="data")
    payload = json.loads(file.read_text() if file else data)  # type: ignore[arg-type]
    client = _client()
    dep = client.deployments.get(name, project=project)
    if not dep.url:
        raise InvalidInputError(
            f"endpoint {name} is {dep.status.value}; deploy it first", field="name"
        )
    if isinstance(payload, dict):
        request = payload
    else:
        mv = client.models.get(dep.model, dep.version, project=project)
        spec = mv.signature.inputs[0]
        rows = payload if isinstance(payload[0], list) else [payload]
        request = {
            "inputs": [
                {
                    "name": spec.name,
                    "datatype": spec.datatype,
                    "shape": [len(rows), len(rows[0])],
                    "data": [v for row in rows for v in row],
                }
            ]
        }
    response = httpx.post(f"{dep.url}/v2/models/{name}/infer", json=request, timeout=60)
    if response.status_code >= 400:
        raise InvalidInputError(f"endpoint {name} answered {response.status_code}: {response.text}")
    console.print_json(response.text)


# --- tokens -----------------------------------------------------------------------------------


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="A name to tell the token apart.")],
) -> None:
    """Create an API token on this host's home; it is shown once and stored only as a hash."""
    settings = Settings.from_env()
    if settings.url:
        raise InvalidInputError(
            "tokens are created on the server host, against its home: unset "
            "SHIPYARD_URL and run this there",
            field="SHIPYARD_URL",
        )
    token, secret = create_token(open_context(settings, actor="cli"), name=name)
    err.print(f"token {token.name} ({token.prefix}...) created; it will not be shown again:")
    console.print(secret)


def main() -> None:
    try:
        app()
    except ShipyardError as exc:
        field = f" [{exc.field}]" if exc.field else ""
        err.print(f"[red]error{escape(field)}:[/red] {escape(exc.message)}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
