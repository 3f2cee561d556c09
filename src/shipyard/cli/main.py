"""The ``shipyard`` command line: typer + rich, built on the SDK (never on server code).

Every command works against the embedded home, or a server when ``SHIPYARD_URL`` is set. Errors
print one line saying what went wrong and what to do, and exit non-zero.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Column, Table

from shipyard.blobs.store import check_blob_url
from shipyard.client import Client
from shipyard.compute import sim as compute_sim
from shipyard.compute.policy import POLICIES
from shipyard.context import open_context
from shipyard.demo.lifecycle import Reporter, follow_job, run_demo
from shipyard.domain.models import (
    AutoscalingSpec,
    BatchingSpec,
    DatasetVersion,
    Deployment,
    DeploymentSpec,
    DeploymentTarget,
    Job,
    JobStatus,
    ModelVersion,
    QuotaSpec,
    ReplicaBounds,
    ReplicaResources,
)
from shipyard.errors import IntegrityError, InvalidInputError, ShipyardError, storage_fault
from shipyard.maintenance.gc import DEFAULT_GRACE_S, collect_garbage
from shipyard.security import principals as sec_principals
from shipyard.security.tokens import create_token, list_tokens, parse_duration, revoke_token
from shipyard.settings import ENV_BLOBS, ENV_DB, ENV_EXECUTOR, Settings
from shipyard.wiring import executor_scheme

app = typer.Typer(
    help="shipyard: data, jobs, tracking, registry, serving - on your hardware.",
    no_args_is_help=True,
    add_completion=False,
)
data_app = typer.Typer(help="Versioned datasets.", no_args_is_help=True)
jobs_app = typer.Typer(help="Training and batch jobs.", no_args_is_help=True)
runs_app = typer.Typer(help="Tracked runs.", no_args_is_help=True)
models_app = typer.Typer(help="The model registry.", no_args_is_help=True)
deployments_app = typer.Typer(
    help="Deployments: desired state (targets, replicas) that the reconciler makes so.",
    no_args_is_help=True,
)
token_app = typer.Typer(help="API tokens (for a server with auth on).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(jobs_app, name="jobs")
app.add_typer(runs_app, name="runs")
app.add_typer(models_app, name="models")
app.add_typer(deployments_app, name="deployments")
app.add_typer(deployments_app, name="endpoints", hidden=True, deprecated=True)  # the old name
app.add_typer(token_app, name="token")
users_app = typer.Typer(help="Users and service accounts (server host).", no_args_is_help=True)
projects_app = typer.Typer(help="Projects (server host).", no_args_is_help=True)
members_app = typer.Typer(help="Who may do what in a project (server host).", no_args_is_help=True)
app.add_typer(users_app, name="users")
app.add_typer(projects_app, name="projects")
app.add_typer(members_app, name="members")
audit_app = typer.Typer(help="The audit log: list events, verify the chain.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
nodes_app = typer.Typer(
    help="The cluster's nodes: CPUs, memory, GPUs, allocations.", no_args_is_help=True
)
queues_app = typer.Typer(
    help="Queues: quotas, cohorts, usage and waiting jobs.", no_args_is_help=True
)
app.add_typer(nodes_app, name="nodes")
app.add_typer(queues_app, name="queues")

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
    executor: Annotated[
        str | None,
        typer.Option(help="Where jobs run: local (default) or ray://HOST:PORT (a Ray cluster)."),
    ] = None,
    access_log: Annotated[
        bool, typer.Option("--access-log/--no-access-log", help="Write a line per request.")
    ] = True,
) -> None:
    """Serve the REST API, /metrics and the web UI (on the embedded home unless --db/--blobs)."""
    args = [sys.executable, "-m", "shipyard.server", "--host", host, "--port", str(port)]
    if auth:
        args.append("--auth")
    if not access_log:
        args.append("--no-access-log")
    env = dict(os.environ)
    if db:
        env[ENV_DB] = db
    if blobs:
        env[ENV_BLOBS] = blobs
    if executor:
        env[ENV_EXECUTOR] = executor
    if env.get(ENV_EXECUTOR):
        executor_scheme(env[ENV_EXECUTOR])  # an unknown executor is one error line, here
    if env.get(ENV_BLOBS):
        check_blob_url(env[ENV_BLOBS])  # a missing backend (s3fs) is one error line, here
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
        "shipyard deployments list",
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
    checks: Annotated[
        Path | None,
        typer.Option(
            "--checks",
            help="A validation suite (YAML, as shipyard-checks.yaml) to run instead of a "
            "shipyard-checks.yaml among the files.",
        ),
    ] = None,
    project: ProjectOpt = None,
) -> None:
    """Commit files as a new, immutable dataset version (content-addressed, deduplicated).

    A failed error-severity check refuses the commit with the failing rows; warnings and
    poisoning signals are recorded on the version (see `data show`)."""
    client = _client()
    with _byte_progress("hashing") as progress:
        dv = client.datasets.commit(
            path, name=dataset, message=message, project=project, progress=progress, checks=checks
        )
    console.print(
        f"dataset [bold]{dv.dataset}[/bold] v{dv.version}: {dv.file_count} files, "
        f"{dv.total_bytes} bytes ({dv.new_bytes} new), manifest {dv.manifest_digest[:16]}"
    )
    _print_checks(dv)


@contextlib.contextmanager
def _byte_progress(label: str) -> Iterator[Callable[[int, int, str], None]]:
    """A transient bar on stderr (bytes, speed, the current path), and its ``progress`` call."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what[-40:])

        yield progress


def _print_checks(dv: DatasetVersion) -> None:
    """The version's checks, then its poisoning signals (``signal.*``), failures first."""
    checks = [c for c in dv.validation if not c.check.startswith("signal.")]
    signals = [c for c in dv.validation if c.check.startswith("signal.")]
    for title, group in (("checks", checks), ("poisoning signals", signals)):
        if not group:
            continue
        flagged = sum(not c.passed for c in group)
        console.print(f"{title}: {len(group) - flagged} ok, {flagged} flagged")
        for c in sorted(group, key=lambda c: c.passed):
            mark = "[green]ok[/green]" if c.passed else "[yellow]FLAGGED[/yellow]"
            console.print(f"  {mark} {c.check}: {c.message}", highlight=False)


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
    _print_checks(dv)


@data_app.command("transform")
def data_transform(
    ref: Annotated[str, typer.Argument(help="The source version: NAME@VERSION (or NAME@TAG).")],
    fn: Annotated[
        str,
        typer.Option(
            "--fn",
            help="The function, pkg.module:function, importable from here. Rows mode: "
            "fn(batch: pyarrow.RecordBatch, **params) -> RecordBatch | Table | None; files "
            "mode: fn(path: str, data: bytes, **params) -> bytes | None.",
        ),
    ],
    to: Annotated[str, typer.Option("--to", help="The dataset to write the result to.")],
    params: Annotated[
        str | None, typer.Option("--params", help="Keyword arguments for fn, as a JSON object.")
    ] = None,
    mode: Annotated[
        str, typer.Option(help="rows (table batches), files, or auto (rows if any table).")
    ] = "auto",
    workers: Annotated[
        int, typer.Option(help="Worker processes (default: this machine's CPUs).")
    ] = 0,
    batch_rows: Annotated[int, typer.Option(help="The most rows of one batch.")] = 65_536,
    on: Annotated[
        str,
        typer.Option(
            "--on", help="Where fn runs: local (worker processes here) or ray (a Ray cluster)."
        ),
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="The Ray cluster's Ray Client address, ray://HOST:PORT (default: "
            "SHIPYARD_EXECUTOR).",
        ),
    ] = None,
    project: ProjectOpt = None,
) -> None:
    """Run a function over a version's rows or files and commit the result as a new version
    of --to, with lineage; the same version, code and params return the earlier result."""
    arguments: dict[str, Any] = {}
    if params:
        try:
            arguments = json.loads(params)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(
                f"--params is not valid JSON ({exc.msg} at column {exc.colno}); give an object "
                "like '{\"factor\": 2}'",
                field="params",
            ) from None
        if not isinstance(arguments, dict):
            raise InvalidInputError("--params must be a JSON object", field="params")
    if mode not in ("rows", "files", "auto"):
        raise InvalidInputError(f"--mode {mode!r}: give rows, files or auto", field="mode")
    if on not in ("local", "ray"):
        raise InvalidInputError(f"--on {on!r}: give local or ray", field="on")
    with _byte_progress("transforming") as progress:
        dv = _client().datasets.transform(
            ref,
            fn=fn,
            to=to,
            params=arguments,
            mode=mode,  # type: ignore[arg-type]
            workers=workers or os.cpu_count() or 1,
            batch_rows=batch_rows,
            search_path=[Path.cwd()],
            project=project,
            progress=progress,
            on=on,  # type: ignore[arg-type]
            ray_address=ray_address,
        )
    console.print(
        f"dataset [bold]{dv.dataset}[/bold] v{dv.version}: {dv.file_count} files, "
        f"{dv.total_bytes} bytes ({dv.new_bytes} new)  {dv.message}",
        highlight=False,
    )
    _print_checks(dv)


@data_app.command("versions")
def data_versions(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    all_: Annotated[bool, typer.Option("--all", help="Show soft-deleted versions too.")] = False,
    project: ProjectOpt = None,
) -> None:
    """List a dataset's versions, oldest first, with their tags."""
    table = Table("version", "tags", "files", "bytes", "new bytes", "by", "created", "message")
    for dv in _client().datasets.versions(name, project=project, include_deleted=all_):
        table.add_row(
            f"v{dv.version}" + (" (deleted)" if dv.deleted_at else ""),
            ", ".join(dv.tags),
            str(dv.file_count),
            str(dv.total_bytes),
            str(dv.new_bytes),
            dv.created_by,
            _ago(dv.created_at),
            dv.message,
        )
    console.print(table)


@data_app.command("tag")
def data_tag(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION to tag.")],
    tag: Annotated[str, typer.Argument(help="The tag; then NAME@TAG reads that version.")],
    force: Annotated[
        bool, typer.Option("--force", help="Move the tag if another version holds it.")
    ] = False,
    delete: Annotated[bool, typer.Option("--delete", help="Remove the tag instead.")] = False,
    project: ProjectOpt = None,
) -> None:
    """Tag a dataset version (or remove a tag with --delete)."""
    name, _, version = ref.partition("@")
    if delete:
        _client().datasets.untag(name, tag, project=project)
        console.print(f"removed tag {tag} of {name}")
        return
    dv = _client().datasets.tag(
        name, _need_version(ref, version), tag, force=force, project=project
    )
    console.print(f"{dv.dataset}@{tag} -> v{dv.version}")


@data_app.command("rm")
def data_rm(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION (or NAME@TAG) to delete.")],
    project: ProjectOpt = None,
) -> None:
    """Soft-delete a version: hidden and unreadable, restorable with `data restore` until
    `shipyard gc` reclaims the files only it held."""
    name, _, version = ref.partition("@")
    dv = _client().datasets.delete(name, _need_version(ref, version), project=project)
    console.print(
        f"deleted {dv.dataset} v{dv.version}; `shipyard data restore {dv.dataset}@{dv.version}` "
        "undoes it until `shipyard gc` runs"
    )


@data_app.command("restore")
def data_restore(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION to restore.")],
    project: ProjectOpt = None,
) -> None:
    """Undo `data rm` (before `shipyard gc` reclaimed the version)."""
    name, _, version = ref.partition("@")
    dv = _client().datasets.restore(name, _need_version(ref, version), project=project)
    console.print(f"restored {dv.dataset} v{dv.version}")


def _need_version(ref: str, version: str) -> str:
    if not version:
        raise InvalidInputError(f"{ref!r}: name the version, as NAME@3 or NAME@TAG", field="ref")
    return version


@data_app.command("status")
def data_status(
    path: Annotated[Path, typer.Argument(help="The working folder.")] = Path("."),
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset name.")] = "",
    version: Annotated[
        str, typer.Option("--version", "-v", help="Version (default: latest).")
    ] = "",
    project: ProjectOpt = None,
) -> None:
    """Compare a folder with a dataset version: files added, modified, removed (exit 1 when
    they differ). Unchanged files are known from the stat cache without being read."""
    if not dataset:
        raise typer.BadParameter("name the dataset to compare with: --dataset NAME")
    st = _client().datasets.status(path, name=dataset, version=version or None, project=project)
    for mark, paths in (("added", st.added), ("modified", st.modified), ("removed", st.removed)):
        for shown in paths:
            console.print(f"  {mark:9} {shown}")
    summary = (
        f"{len(st.added)} added, {len(st.modified)} modified, {len(st.removed)} removed, "
        f"{st.unchanged} unchanged"
    )
    console.print("clean: " + summary if st.clean else summary)
    if not st.clean:
        raise typer.Exit(1)


@data_app.command("diff")
def data_diff(
    a: Annotated[str, typer.Argument(help="NAME@VERSION (the older).")],
    b: Annotated[str, typer.Argument(help="NAME@VERSION, or @VERSION of the same dataset.")],
    project: ProjectOpt = None,
) -> None:
    """Files added, removed and modified between two versions, and tables whose row count or
    columns changed."""
    name, _, va = a.partition("@")
    other, _, vb = b.partition("@")
    if other and other != name:
        raise typer.BadParameter(f"both versions must be of one dataset ({name!r}, {other!r})")
    if not name or not va or not vb:
        raise typer.BadParameter("give two versions: NAME@A NAME@B")
    changes = _client().datasets.diff(name, va, vb, project=project)
    for mark in ("added", "removed", "modified"):
        for shown in changes[mark]:
            console.print(f"  {mark:9} {shown}")
    for table in changes["tables"]:
        rows = table["rows"]
        parts = [f"rows {rows[0]} -> {rows[1]}"] if rows[0] != rows[1] else []
        parts += [f"+{c}" for c in table["added"]] + [f"-{c}" for c in table["removed"]]
        parts += table["retyped"]
        console.print(f"  table     {table['path']}: {', '.join(parts)}")
    console.print(
        f"{len(changes['added'])} added, {len(changes['removed'])} removed, "
        f"{len(changes['modified'])} modified"
    )


@data_app.command("checkout")
def data_checkout(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION.")],
    dest: Annotated[Path, typer.Argument(help="Folder to write the files into.")],
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite local edits in the folder.")
    ] = False,
    link: Annotated[
        str, typer.Option("--link", help="auto (reflink, else copy), reflink, hardlink or copy.")
    ] = "auto",
    include: Annotated[
        list[str] | None,
        typer.Option("--include", help="Only files matching this glob (images/**); repeatable."),
    ] = None,
    project: ProjectOpt = None,
) -> None:
    """Write a version's files into a folder; only files that differ are written, and local
    edits are refused unless --force."""
    _checkout(ref, dest, force=force, link=link, include=include or [], project=project)


@data_app.command("pull")
def data_pull(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION.")],
    dest: Annotated[Path, typer.Argument(help="Folder to write the files into.")] = Path("."),
    include: Annotated[
        list[str] | None,
        typer.Option("--include", help="Only files matching this glob (images/**); repeatable."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite local edits in the folder.")
    ] = False,
    project: ProjectOpt = None,
) -> None:
    """Fetch part of a version (--include globs; all of it without) into a folder; only the
    matching files are read or downloaded."""
    _checkout(ref, dest, force=force, link="auto", include=include or [], project=project)


def _checkout(
    ref: str, dest: Path, *, force: bool, link: str, include: list[str], project: str | None
) -> None:
    name, _, version = ref.partition("@")
    with _byte_progress("writing") as progress:
        result = _client().datasets.checkout(
            name,
            dest,
            version or None,
            project=project,
            force=force,
            link=link,  # type: ignore[arg-type]  # checked by the writer, naming the field
            progress=progress,
            include=include,
        )
    how = f" ({result.linked} linked)" if result.linked else ""
    console.print(
        f"{result.dest}: {result.written} files written{how}, {result.unchanged} unchanged"
        + (f", {len(result.overwritten)} local edits overwritten" if result.overwritten else "")
    )


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


# --- jobs -------------------------------------------------------------------------------------


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    command: Annotated[list[str], typer.Argument(help="The command, after '--'.")],
    cpus: Annotated[float, typer.Option(help="CPUs to reserve.")] = 1.0,
    memory: Annotated[int, typer.Option("--memory", help="Memory to reserve, MB.")] = 512,
    gpus: Annotated[
        int, typer.Option(help="GPUs to reserve (pinned via CUDA_VISIBLE_DEVICES), per worker.")
    ] = 0,
    priority: Annotated[
        str, typer.Option(help="Higher runs first: an integer or low, normal, high, critical.")
    ] = "0",
    max_runtime: Annotated[float | None, typer.Option(help="Kill after this many seconds.")] = None,
    name: Annotated[str | None, typer.Option(help="Job name.")] = None,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Do not follow the logs.")] = False,
    workers: Annotated[
        int, typer.Option(help="Workers started together (a gang); resources are per worker.")
    ] = 1,
    gpus_per_worker: Annotated[
        int | None, typer.Option("--gpus-per-worker", help="Same as --gpus: GPUs per worker.")
    ] = None,
    gpu_type: Annotated[
        str | None, typer.Option("--gpu-type", help="GPU model the GPUs must be (e.g. A100).")
    ] = None,
    gpu_fraction: Annotated[
        float | None,
        typer.Option("--gpu-fraction", help="A share of one GPU (0 < F < 1) instead of --gpus."),
    ] = None,
    gpu_memory: Annotated[
        int | None,
        typer.Option("--gpu-memory", help="GPU memory bound, MB (goes with --gpu-fraction)."),
    ] = None,
    preemptible: Annotated[
        bool,
        typer.Option(
            "--preemptible", help="May be stopped (SIGTERM) and requeued for higher priority work."
        ),
    ] = False,
    queue: Annotated[
        str | None, typer.Option(help="Queue to wait in (default: the project's).")
    ] = None,
    output: Annotated[
        list[str] | None,
        typer.Option(
            "--output", help="A file or folder the job writes, kept as a run artifact (repeat)."
        ),
    ] = None,
    project: ProjectOpt = None,
) -> None:
    """Snapshot this folder and run COMMAND as a tracked job: shipyard run -- python train.py"""
    if gpus_per_worker is not None:
        if gpus and gpus != gpus_per_worker:
            raise InvalidInputError(
                f"--gpus {gpus} and --gpus-per-worker {gpus_per_worker} disagree; they are the "
                "same option (GPUs per worker): give one",
                field="gpus",
            )
        gpus = gpus_per_worker
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
        workers=workers,
        gpu_type=gpu_type,
        gpu_fraction=gpu_fraction,
        gpu_memory_mb=gpu_memory,
        preemptible=preemptible,
        queue=queue,
        outputs=output or [],
    )
    err.print(f"job {job.id} {job.status.value} (run {tracked.id})")
    if job.status is JobStatus.QUEUED and job.message:
        err.print(f"  {job.message}", highlight=False, markup=False)
    if detach:
        console.print(job.id)
        return
    job = follow_job(
        client,
        job.id,
        on_line=lambda line: console.print(line, highlight=False, markup=False),
        project=job.project,
    )
    err.print(
        f"job {job.id} {job.status.value}"
        + (f": {job.message}" if job.message else "")
        + f"  (wall {job.usage.wall_seconds:.1f}s, cpu {job.usage.cpu_seconds:.1f}s, "
        f"peak {job.usage.peak_memory_mb:.0f} MB)"
    )
    if job.attempt > 1:
        err.print(f"  attempts: {job.attempt} ({job.preemptions} preempted)")
    for line in _outputs_summary(job, tracked.id):
        err.print(line, highlight=False, markup=False)
    if job.status != JobStatus.SUCCEEDED:
        raise typer.Exit(1)


def _outputs_summary(job: Job, run_id: str) -> list[str]:
    """Where the job's files went: its stored outputs, and the folder the rest stay in."""
    lines = []
    if job.outputs:
        shown = ", ".join(job.outputs[:10]) + (" ..." if len(job.outputs) > 10 else "")
        lines.append(
            f"outputs: {len(job.outputs)} file(s) stored as artifacts of run {run_id}: {shown}"
        )
    missing = [p for p in job.spec.outputs if not any(_under(o, p) for o in job.outputs)]
    if missing:
        lines.append(f"outputs not stored: {', '.join(missing)} (see the log above)")
    return lines


def _under(stored: str, declared: str) -> bool:
    return stored == declared or stored.startswith(declared.rstrip("/") + "/")


@jobs_app.command("list")
def jobs_list(
    status: Annotated[JobStatus | None, typer.Option(help="Only jobs in this state.")] = None,
    project: ProjectOpt = None,
) -> None:
    """List jobs, newest first (a queued job says why it waits)."""
    table = Table(
        "id",
        "name",
        "status",
        "queue",
        "attempt",
        "placement",
        "exit",
        "wall s",
        "created",
        Column("waiting", overflow="fold"),
    )
    for job in _client().jobs.list(project=project, status=status):
        attempt = str(job.attempt) + (f" ({job.preemptions} preempted)" if job.preemptions else "")
        queued = job.status is JobStatus.QUEUED or job.message.startswith("preempting")
        note = job.message if queued else ""
        table.add_row(
            job.id,
            job.name,
            job.status.value,
            job.queue or "-",
            attempt,
            _placement_text(job.placement, job.assigned_gpus),
            "-" if job.exit_code is None else str(job.exit_code),
            f"{job.usage.wall_seconds:.1f}",
            _ago(job.created_at),
            note,
        )
    console.print(table)


def _placement_text(placement: list[dict[str, Any]], gpus: list[int]) -> str:
    """Node and GPUs per rank: ``r0 vm:0,1 r1 vm:2`` (a share: ``vm:0x0.5``)."""
    if not placement:
        return ",".join(map(str, gpus)) or "-"
    parts = []
    for rank, worker in enumerate(placement):
        devices = ",".join(str(g) for g in worker.get("gpus") or ())
        share = float(worker.get("gpu_share") or 0.0)
        where = str(worker.get("node_id") or "?") + (f":{devices}" if devices else "")
        if share:
            where += f"x{share:g}"
        parts.append(where if len(placement) == 1 else f"r{rank} {where}")
    return " ".join(parts)


@jobs_app.command("show")
def jobs_show(job_id: str, project: ProjectOpt = None) -> None:
    """Show one job (of --project)."""
    console.print_json(_client().jobs.get(job_id, project=project).model_dump_json())


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")
    ] = False,
    project: ProjectOpt = None,
) -> None:
    """Print a job's captured output."""
    client = _client()
    if follow:
        follow_job(
            client,
            job_id,
            on_line=lambda line: console.print(line, highlight=False, markup=False),
            project=project,
        )
        return
    offset = 0
    while True:
        data, offset, _ = client.jobs.logs(job_id, offset=offset, project=project)
        if not data:
            break
        sys.stdout.write(data)
    sys.stdout.flush()


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, project: ProjectOpt = None) -> None:
    """Cancel a queued or running job (of --project)."""
    job = _client().jobs.cancel(job_id, project=project)
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
def runs_show(run_id: str, project: ProjectOpt = None) -> None:
    """Show one run (of --project): params, latest metrics, artifacts."""
    console.print_json(_client().runs.get(run_id, project=project).model_dump_json())


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
def models_show(
    name: Annotated[str, typer.Argument(help="NAME (all versions) or NAME@VERSION / NAME@ALIAS.")],
    project: ProjectOpt = None,
) -> None:
    """Show a model's versions and alias history, or one version's signature, example and
    parity check (NAME@VERSION)."""
    client = _client()
    if "@" in name:
        model, _, ref = name.partition("@")
        _show_version(client.models.get(model, ref or "latest", project=project))
        return
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


def _show_version(v: ModelVersion) -> None:
    console.print(
        f"{escape(v.model)} v{v.version} ({v.format}, {v.artifact_size} bytes, "
        f"{_ago(v.created_at)}) aliases: {', '.join(v.aliases) or '-'}",
        highlight=False,
    )
    table = Table("", "name", "datatype", "shape")
    for kind, tensors in (("input", v.signature.inputs), ("output", v.signature.outputs)):
        for t in tensors:
            table.add_row(kind, escape(t.name), t.datatype, str(t.shape))
    console.print(table)
    parity = v.signature.parity
    if parity is None:
        console.print("parity: not checked (an ONNX file logged as is)", highlight=False)
    else:
        console.print(
            f"parity vs {parity.source} ({escape(parity.source_type)}): max abs diff "
            f"{parity.max_abs_diff:.3g} on {parity.checked_rows} rows "
            f"(atol={parity.atol:g}, rtol={parity.rtol:g}, label mismatches "
            f"{parity.label_mismatches})",
            highlight=False,
        )
    for ex in v.signature.example or []:
        values = ", ".join(str(x) for x in ex.data[:8]) + (", ..." if len(ex.data) > 8 else "")
        console.print(f"example {escape(ex.name)} {ex.shape}: [{escape(values)}]", highlight=False)


@models_app.command("alias")
def models_alias(name: str, alias: str, version: str, project: ProjectOpt = None) -> None:
    """Point ALIAS of model NAME at VERSION (recorded in the alias history)."""
    mv = _client().models.set_alias(name, alias, version, project=project)
    console.print(f"{name}@{alias} -> v{mv.version}")


# --- serving ----------------------------------------------------------------------------------


TargetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--target",
        "-t",
        help="REF[=WEIGHT|=shadow]: a version number or an alias, its traffic share in percent "
        "(the non-shadow weights sum to 100), or a shadow that gets a copy of each request. "
        "Repeat for a canary: -t production=90 -t 3=10.",
    ),
]
WaitOpt = Annotated[
    bool, typer.Option("--wait/--no-wait", help="Wait until the deployment has settled.")
]


@app.command()
def deploy(
    ref: Annotated[
        str, typer.Argument(help="MODEL@ALIAS or MODEL@VERSION (default alias: production).")
    ],
    name: Annotated[str, typer.Option("--name", "-n", help="Deployment name.")],
    target: TargetOpt = None,
    min_replicas: Annotated[int, typer.Option("--min", help="Replicas per target, at least.")] = 1,
    max_replicas: Annotated[
        int | None, typer.Option("--max", help="Replicas per target, at most.")
    ] = None,
    cpus: Annotated[int, typer.Option(help="Model threads per replica.")] = 1,
    gpus: Annotated[int, typer.Option(help="GPUs per replica.")] = 0,
    max_batch_size: Annotated[int, typer.Option(help="Adaptive batcher: max rows per batch.")] = 32,
    max_wait_ms: Annotated[
        float, typer.Option(help="Adaptive batcher: max wait for a batch.")
    ] = 5.0,
    wait: WaitOpt = True,
    project: ProjectOpt = None,
) -> None:
    """Serve model versions over the Open Inference Protocol v2; returns once they are ready
    (--no-wait: at once; `shipyard deployments show NAME` follows it)."""
    model, _, alias = ref.partition("@")
    if target and alias:
        raise InvalidInputError("give MODEL@REF or --target, not both", field="target")
    targets = _parse_targets(target or [alias or "production"])
    spec = DeploymentSpec(
        targets=targets,
        replicas=ReplicaBounds(min=min_replicas, max=max(max_replicas or 0, min_replicas)),
        resources=ReplicaResources(cpus=cpus, gpus=gpus),
        batching=BatchingSpec(max_batch=max_batch_size, wait_ms=max_wait_ms),
    )
    dep = _client().deployments.create(name, model=model, spec=spec, wait=wait, project=project)
    _print_deployment_line(dep)


@deployments_app.command("list")
def deployments_list(project: ProjectOpt = None) -> None:
    """List deployments: what serves, how many replicas are ready."""
    table = Table("name", "model", "serving", "status", "replicas", "url")
    for d in _client().deployments.list(project=project):
        ready = sum(1 for r in d.replicas if r.state.value == "ready")
        wanted = d.spec.replicas.min * max(1, len(d.targets))
        table.add_row(
            d.name,
            d.model,
            _describe_serving(d),
            d.status.value,
            f"{ready}/{wanted}",
            d.url or "-",
        )
    console.print(table)


@deployments_app.command("show")
def deployments_show(name: str, project: ProjectOpt = None) -> None:
    """A deployment's spec, what serves it, its rollout and each replica's state."""
    d = _client().deployments.get(name, project=project)
    console.print(f"deployment {escape(d.name)}: {d.status.value} - {escape(d.message)}")
    console.print(f"model {escape(d.model)}, serving {_describe_serving(d)}, url {d.url or '-'}")
    spec = d.spec
    console.print(
        f"spec: targets {escape(_describe_spec_targets(d))}; replicas {spec.replicas.min}-"
        f"{spec.replicas.max}; cpus {spec.resources.cpus}, gpus {spec.resources.gpus}; "
        f"batching {spec.batching.max_batch} rows / {spec.batching.wait_ms:g} ms"
    )
    if d.rollout is not None:
        to = ", ".join(f"v{t.version}" for t in d.rollout.to)
        state = f"failed: {d.rollout.error}" if d.rollout.error else "under way"
        console.print(f"rollout to {to}: {escape(state)}")
    table = Table("replica", "version", "state", "restarts", "pid", "url", "message")
    for r in d.replicas:
        table.add_row(
            r.id,
            str(r.version),
            r.state.value,
            str(r.restarts),
            str(r.pid or "-"),
            r.url or "-",
            escape(r.message.splitlines()[0] if r.message else ""),
        )
    console.print(table)


@deployments_app.command("scale")
def deployments_scale(
    name: str,
    min_replicas: Annotated[
        int,
        typer.Option(
            "--min", help="Replicas per target, at least (0: scale to zero; needs autoscaling)."
        ),
    ],
    max_replicas: Annotated[
        int | None, typer.Option("--max", help="Replicas per target, at most.")
    ] = None,
    wait: WaitOpt = True,
    project: ProjectOpt = None,
) -> None:
    """Change how many replicas each target runs (with autoscaling: its bounds)."""
    dep = _client().deployments.scale(
        name, min=min_replicas, max=max_replicas, wait=wait, project=project
    )
    _print_deployment_line(dep)


@deployments_app.command("update")
def deployments_update(
    name: str,
    target: TargetOpt = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Adaptive batcher: max rows.")] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help="Adaptive batcher: max wait.")] = None,
    target_in_flight: Annotated[
        float | None,
        typer.Option(help="Autoscale replicas (min..max) to this many requests in flight each."),
    ] = None,
    scale_down_delay: Annotated[
        float | None, typer.Option(help="Autoscaling: seconds of lower load before scaling down.")
    ] = None,
    no_autoscale: Annotated[
        bool, typer.Option("--no-autoscale", help="Turn autoscaling off.")
    ] = False,
    wait: WaitOpt = True,
    project: ProjectOpt = None,
) -> None:
    """Change targets (a rollout: new replicas start, traffic moves once they are ready, the old
    ones drain; a version that fails to load leaves the old one serving), the batcher or the
    autoscaling policy."""
    client = _client()
    autoscaling: AutoscalingSpec | Literal[False] | None = None
    if no_autoscale:
        if target_in_flight is not None or scale_down_delay is not None:
            raise InvalidInputError(
                "--no-autoscale turns autoscaling off; leave out --target-in-flight and "
                "--scale-down-delay",
                field="no_autoscale",
            )
        autoscaling = False
    elif target_in_flight is not None or scale_down_delay is not None:
        policy = client.deployments.get(name, project=project).spec.autoscaling
        policy = policy or AutoscalingSpec()
        autoscaling = policy.model_copy(
            update={
                k: v
                for k, v in (
                    ("target_in_flight", target_in_flight),
                    ("scale_down_delay_s", scale_down_delay),
                )
                if v is not None
            }
        )
    batching = None
    if max_batch_size is not None or max_wait_ms is not None:
        current = client.deployments.get(name, project=project).spec.batching
        batching = BatchingSpec(
            max_batch=current.max_batch if max_batch_size is None else max_batch_size,
            wait_ms=current.wait_ms if max_wait_ms is None else max_wait_ms,
        )
    if not target and batching is None and autoscaling is None:
        raise InvalidInputError(
            "nothing to change: give --target, a batcher or an autoscaling option",
            field="target",
        )
    dep = client.deployments.update(
        name,
        targets=_parse_targets(target) if target else None,
        batching=batching,
        autoscaling=autoscaling,
        wait=wait,
        project=project,
    )
    _print_deployment_line(dep)


@deployments_app.command("stop")
def deployments_stop(name: str, project: ProjectOpt = None) -> None:
    """Stop a deployment and all its replicas."""
    dep = _client().deployments.stop(name, project=project)
    console.print(f"deployment {dep.name} {dep.status.value}")


@app.command()
def predict(
    name: Annotated[str, typer.Argument(help="Deployment name.")],
    data: Annotated[str | None, typer.Option(help="Rows as JSON, e.g. '[[0, 1, ...]]'.")] = None,
    file: Annotated[
        Path | None, typer.Option(help="A JSON file with rows, or a full OIP v2 request.")
    ] = None,
    request_id: Annotated[
        str | None, typer.Option(help="The request's id (X-Request-Id); a new one if not given.")
    ] = None,
    project: ProjectOpt = None,
) -> None:
    """Send rows to a deployment (OIP v2; through the server's gateway when SHIPYARD_URL is
    set) and print the answer, with the version that served it."""
    if (data is None) == (file is None):
        raise InvalidInputError("give exactly one of --data or --file", field="data")
    payload = _predict_payload(data, file)
    client = _client()
    if isinstance(payload, dict):
        request = payload
    else:
        dep = client.deployments.get(name, project=project)
        mv = client.models.get(dep.model, dep.version, project=project)
        spec = mv.signature.inputs[0]
        rows = payload
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
    answer = client.deployments.predict(name, request, request_id=request_id, project=project)
    console.print_json(json.dumps(answer))


def _parse_targets(values: list[str]) -> list[DeploymentTarget]:
    """``REF[=WEIGHT|=shadow]`` each; a target without a weight gets 100."""
    targets = []
    for i, value in enumerate(values):
        ref, _, share = value.partition("=")
        ref = ref.strip()
        if not ref:
            raise InvalidInputError(f"--target {value!r} names no version or alias", field="target")
        shadow = share.strip().lower() == "shadow"
        if share and not shadow:
            try:
                weight = int(share)
            except ValueError:
                raise InvalidInputError(
                    f"--target {value!r}: the weight must be a whole percentage or 'shadow'",
                    field=f"targets[{i}].weight",
                ) from None
        else:
            weight = 0 if shadow else 100
        number = ref.removeprefix("v")
        if number.isdigit():
            targets.append(DeploymentTarget(version=int(number), weight=weight, shadow=shadow))
        else:
            targets.append(DeploymentTarget(alias=ref, weight=weight, shadow=shadow))
    return targets


def _describe_serving(d: Deployment) -> str:
    if not d.targets:
        return "-"
    parts = []
    for t in d.targets:
        share = " (shadow)" if t.shadow else f" {t.weight}%" if len(d.targets) > 1 else ""
        parts.append(f"v{t.version}{share}")
    return ", ".join(parts)


def _describe_spec_targets(d: Deployment) -> str:
    parts = []
    for t in d.spec.targets:
        ref = t.alias if t.alias is not None else f"v{t.version}"
        parts.append(f"{ref}=shadow" if t.shadow else f"{ref}={t.weight}")
    return " ".join(parts)


def _print_deployment_line(dep: Deployment) -> None:
    where = f"{dep.url}/v2/models/{dep.name}/infer" if dep.url else "-"
    console.print(
        f"deployment {dep.name} {dep.status.value}: {where} (model {dep.model} "
        f"{_describe_serving(dep)}; {escape(dep.message)})"
    )


def _predict_payload(data: str | None, file: Path | None) -> dict[str, Any] | list[list[Any]]:
    """The parsed ``--data``/``--file``: a full OIP v2 request (an object), or rows (a list of
    equally long lists of values; one flat list is one row). Bad JSON names the option."""
    field = "file" if file is not None else "data"
    if file is not None:
        try:
            text = file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            message = f"--file {str(file)!r} cannot be read: {exc}"
            raise InvalidInputError(message, field=field) from None
    else:
        text = data or ""
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(
            f"--{field} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            "give rows like '[[0.1, 0.2], [0.3, 0.4]]' or a full OIP v2 request object",
            field=field,
        ) from None
    if isinstance(payload, dict):
        return payload
    if not isinstance(payload, list) or not payload:
        raise InvalidInputError(
            f"--{field} must be a non-empty list of rows, e.g. '[[0.1, 0.2]]', or a full OIP v2 "
            "request object",
            field=field,
        )
    rows = payload if all(isinstance(r, list) for r in payload) else [payload]
    widths = {len(r) for r in rows}
    flat = [v for r in rows for v in r]
    if 0 in widths or len(widths) != 1 or not all(_is_value(v) for v in flat):
        raise InvalidInputError(
            f"--{field} rows must be non-empty lists of equal length holding numbers, strings "
            "or booleans, e.g. '[[0.1, 0.2], [0.3, 0.4]]'",
            field=field,
        )
    return rows


def _is_value(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool))


# --- maintenance ------------------------------------------------------------------------------


@app.command("batch")
def batch_command(
    ref: Annotated[
        str, typer.Argument(help="MODEL@ALIAS or MODEL@vN (default alias: production).")
    ],
    source: Annotated[
        str, typer.Option("--input", help="The dataset version to predict on: NAME@VERSION.")
    ],
    output: Annotated[
        str,
        typer.Option("--output", help="The dataset the predictions become the next version of."),
    ],
    columns: Annotated[
        str | None,
        typer.Option(help="The feature columns, in order: a,b,c (default: every numeric one)."),
    ] = None,
    input_column: Annotated[
        str | None,
        typer.Option("--input-column", help="One list column holding each row's features."),
    ] = None,
    keep: Annotated[
        str | None, typer.Option(help="Columns copied through to the predictions: id,...")
    ] = None,
    workers: Annotated[
        int, typer.Option(help="Worker processes (or Ray actors); default min(CPUs, 4).")
    ] = 0,
    batch_rows: Annotated[int, typer.Option(help="Rows per model call.")] = 256,
    on: Annotated[
        str, typer.Option("--on", help="local (worker processes) or ray (a Ray actor pool).")
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="The Ray cluster's Ray Client address, ray://HOST:PORT (default: "
            "SHIPYARD_EXECUTOR).",
        ),
    ] = None,
    memory: Annotated[int, typer.Option("--memory", help="Memory to reserve, MB.")] = 1024,
    here: Annotated[
        bool, typer.Option("--here", help="Run in this process instead of as a queued job.")
    ] = False,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Do not follow the job.")] = False,
    project: ProjectOpt = None,
) -> None:
    """Predict with a registered model over a dataset version, as a job, and commit the
    predictions as a new dataset version with lineage: shipyard batch clf@production --input
    features@3 --output scores"""
    if on not in ("local", "ray"):
        raise InvalidInputError(f"--on {on!r}: give local or ray", field="on")
    count = workers or None
    client = _client()
    if here:
        with _row_progress("predicting") as progress:
            dv = client.models.batch_predict(
                ref,
                input=source,
                output=output,
                columns=_names(columns),
                input_column=input_column,
                keep=_names(keep) or [],
                workers=count,
                batch_rows=batch_rows,
                on=on,  # type: ignore[arg-type]
                ray_address=ray_address,
                project=project,
                progress=progress,
            )
        console.print(
            f"dataset [bold]{dv.dataset}[/bold] v{dv.version}: {dv.file_count} table(s), "
            f"{dv.total_bytes} bytes  {dv.message}",
            highlight=False,
        )
        return
    if client.is_remote:
        raise InvalidInputError(
            "batch inference runs against this machine's home for now (the server has no API "
            "yet to record a batch's lineage); unset SHIPYARD_URL, or run it on the server's "
            "host",
            field="model",
        )
    command = [sys.executable, "-m", "shipyard.cli", "batch", ref, "--input", source]
    command += ["--output", output, "--batch-rows", str(batch_rows), "--on", on, "--here"]
    for flag, value in (
        ("--columns", columns),
        ("--input-column", input_column),
        ("--keep", keep),
        ("--ray-address", ray_address),
        ("--workers", str(workers) if workers else None),
    ):
        if value:
            command += [flag, value]
    cpus = 1 if on == "ray" else (workers or min(os.cpu_count() or 1, 4))
    job = client.jobs.submit(
        command, cpus=cpus, memory_mb=memory, name=f"batch-{output}"[:63], project=project
    )
    err.print(f"job {job.id} {job.status.value}: batch inference into {output}")
    if detach:
        console.print(job.id)
        return
    job = follow_job(
        client,
        job.id,
        on_line=lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True),
        project=job.project,
    )
    err.print(f"job {job.id} {job.status.value}" + (f": {job.message}" if job.message else ""))
    if job.status != JobStatus.SUCCEEDED:
        raise typer.Exit(1)


def _names(text: str | None) -> list[str] | None:
    """``a,b,c`` as a list (None when not given)."""
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


@contextlib.contextmanager
def _row_progress(label: str) -> Iterator[Callable[[int, int, str], None]]:
    with Progress(
        TextColumn(f"{label} {{task.fields[what]}}"),
        BarColumn(),
        TextColumn("{task.fields[rows]}"),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None, what="", rows="")

        def update(done: int, total: int, what: str) -> None:
            bar.update(
                task, completed=done, total=total, what=what, rows=f"{done:,}/{total:,} rows"
            )

        yield update


@app.command("gc")
def gc_command(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Delete nothing; report what would go.")
    ] = False,
    grace: Annotated[
        str,
        typer.Option(
            help="Keep unreferenced blobs and temp files younger than this (e.g. 90s, 30m, 2h)."
        ),
    ] = f"{DEFAULT_GRACE_S / 3600:g}h",
) -> None:
    """Reclaim blobs that no version, artifact, model or job snapshot references (host only)."""
    settings = Settings.from_env()
    if settings.url:
        raise InvalidInputError(
            "garbage collection runs on the server host, against its home: unset SHIPYARD_URL "
            "and run it there",
            field="SHIPYARD_URL",
        )
    report = collect_garbage(
        open_context(settings, actor="cli"), grace_s=_duration(grace), dry_run=dry_run
    )
    verb = "would remove" if report.dry_run else "removed"
    console.print(
        f"{verb} {report.swept} unreferenced blobs ({report.swept_bytes} bytes) and "
        f"{report.temp_files} stale temp files ({report.temp_bytes} bytes); kept "
        f"{report.scanned - report.swept} of {report.scanned} blobs "
        f"({report.kept_recent} unreferenced but younger than {grace}, "
        f"{report.kept_recent_bytes} bytes)"
        + (
            f"; {'would reclaim' if report.dry_run else 'reclaimed'} "
            f"{report.versions_reclaimed} deleted dataset versions"
            if report.versions_reclaimed
            else ""
        ),
        highlight=False,
    )


def _duration(text: str) -> float:
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    raw = text.strip().lower()
    scale = units.get(raw[-1:])
    number = raw[:-1] if scale is not None else raw
    try:
        value = float(number) * (scale or 1.0)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise InvalidInputError(
            f"--grace {text!r} is not a duration: use seconds or a number with s, m, h or d "
            "(e.g. 30m)",
            field="grace",
        )
    return value


# --- simulation -------------------------------------------------------------------------------


@app.command("sim")
def sim_command(
    trace: Annotated[
        Path, typer.Option(help="Trace CSV: timestamp,duration,num_gpus,cluster (e.g. philly.csv).")
    ],
    policy: Annotated[
        list[str] | None,
        typer.Option(
            help="Policy to replay (repeatable): fifo, fifo-backfill, drf, las, srtf, default."
        ),
    ] = None,
    load: Annotated[
        list[float] | None,
        typer.Option(
            help="Offered load to reach, e.g. 0.9 (repeatable). Without --nodes the cluster is "
            "sized for it; with --nodes submission times are scaled. Default: the trace as is."
        ),
    ] = None,
    nodes: Annotated[
        int | None, typer.Option(help="Nodes in the cluster (default 64, or sized for --load).")
    ] = None,
    gpus_per_node: Annotated[int, typer.Option(help="GPUs per node.")] = 8,
    packing: Annotated[
        str,
        typer.Option(
            help="nodes: a worker's GPUs on one node, jobs above a node take whole nodes; "
            "count: GPUs counted cluster-wide."
        ),
    ] = "nodes",
    jobs: Annotated[int | None, typer.Option(help="Only the first N jobs (a quick slice).")] = None,
    start: Annotated[
        str | None, typer.Option(help="Only jobs submitted from this time (2017-10-09 ...).")
    ] = None,
    end: Annotated[str | None, typer.Option(help="Only jobs submitted before this time.")] = None,
    round_s: Annotated[float, typer.Option(help="Scheduling round period (simulated s).")] = 60.0,
    restart_penalty: Annotated[
        float, typer.Option(help="Seconds a preempted job loses on each restart.")
    ] = 30.0,
    declared_runtime: Annotated[
        float | None,
        typer.Option(help="Give every job max_runtime = K x its duration (backfill estimates)."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress lines on stderr.")] = False,
) -> None:
    """Replay a cluster trace through the admission policies in a discrete-event simulation."""
    policies = policy or ["default"]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise InvalidInputError(
            f"unknown policy {unknown[0]!r}; use one of {', '.join(POLICIES)}", field="policy"
        )
    if packing not in compute_sim.PACKINGS:
        raise InvalidInputError(
            f"--packing {packing!r} is not one of {', '.join(compute_sim.PACKINGS)}",
            field="packing",
        )
    for value in load or []:
        if not value > 0:
            raise InvalidInputError(
                f"--load must be above 0 (0.9 = 90%), not {value}", field="load"
            )
    trace_jobs = compute_sim.load_trace(trace, start=start, end=end, jobs=jobs)
    progress = None if quiet else (lambda line: err.print(line, highlight=False))
    results = []
    targets: list[float | None] = list(load) if load else [None]
    for target in targets:
        config = compute_sim.SimConfig(
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            packing=packing,
            load=target,
            round_s=round_s,
            restart_penalty_s=restart_penalty,
            declared_runtime=declared_runtime,
        )
        for name in policies:
            results.append(compute_sim.simulate(trace_jobs, name, config, progress=progress))
    columns = "policy load nodes JCT-mean median p99 wait-mean makespan GPU-util max-rho"
    headers = [c.replace("-", " ") for c in columns.split()]
    table = Table(*headers, "queue rho", "starved", "preempt", "wall")
    # a narrow terminal squeezes the figures, never the policy's name
    table.columns[0].min_width = max(len(r.policy) for r in results) if results else None
    for r in results:
        m = r.metrics
        table.add_row(
            r.policy,
            f"{r.cluster['offered_load']:.0%}",
            f"{r.cluster['nodes']}x{gpus_per_node}",
            _hours(m.get("jct_mean_s")),
            _hours(m.get("jct_median_s")),
            _hours(m.get("jct_p99_s")),
            _hours(m.get("wait_mean_s")),
            _hours(m.get("makespan_s")),
            f"{m['gpu_utilisation']:.0%}" if m.get("gpu_utilisation") is not None else "-",
            f"{m['rho_max']:,.0f}" if "rho_max" in m else "-",
            f"{m['queue_rho_max']:.2f}" if "queue_rho_max" in m else "-",
            str(m.get("starved_24h", "-")),
            str(m.get("preemptions", 0)),
            f"{r.perf['wall_s']:.0f}s",
        )
    console.print(table)
    console.print(
        f"{len(trace_jobs)} jobs, packing {packing}; times in hours; rho = JCT / time on the "
        "job's fair share (shipyard.compute.sim)",
        highlight=False,
    )
    if out is not None:
        document = {
            "trace": str(trace),
            "jobs": len(trace_jobs),
            "results": [r.to_dict() for r in results],
        }
        out.write_text(json.dumps(document, indent=2) + "\n")
        console.print(f"wrote {out}", highlight=False)


def _hours(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 3600:,.2f}h"


# --- tokens -----------------------------------------------------------------------------------


def _host_ctx(what: str) -> Any:
    """The local admin's context on this host's home (users, projects, members and tokens are
    managed on the server host; remotely, use /api/v1/users, /projects, /tokens)."""
    settings = Settings.from_env()
    if settings.url:
        raise InvalidInputError(
            f"{what} are managed on the server host, against its home: unset SHIPYARD_URL and "
            "run this there (or use the REST API: /api/v1/tokens, /api/v1/users, /api/v1/projects)",
            field="SHIPYARD_URL",
        )
    return open_context(settings, actor="cli")


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="A name to tell the token apart.")],
    user: Annotated[
        str | None, typer.Option("--user", help="Whose token (default: the server admin 'admin').")
    ] = None,
    project: Annotated[str | None, typer.Option(help="Narrow it to this project.")] = None,
    role: Annotated[str | None, typer.Option(help="Narrow it to viewer, editor or admin.")] = None,
    expires: Annotated[
        str | None, typer.Option(help="Lifetime: 90m, 12h, 30d, 8w (default: until revoked).")
    ] = None,
) -> None:
    """Create an API token on this host's home; it is shown once and stored only as a hash."""
    ctx = _host_ctx("tokens")
    expires_at = None
    if expires is not None:
        expires_at = datetime.now(UTC) + parse_duration(expires, field="expires")
    token, secret = create_token(
        ctx, name=name, principal=user, project=project, role=role, expires_at=expires_at
    )
    err.print(f"token {token.name} ({token.prefix}...) created; it will not be shown again:")
    console.print(secret)


@token_app.command("list")
def token_list(
    user: Annotated[str | None, typer.Option("--user", help="Only this user's.")] = None,
) -> None:
    """Every token on this host's home: whose, narrowed to what, expiry, last use."""
    # the id never wraps: it is what 'token revoke' takes
    table = Table(
        Column("id", no_wrap=True),
        "name",
        "prefix",
        "user",
        "project",
        "role",
        "expires",
        "last used",
        "revoked",
    )
    for t in list_tokens(_host_ctx("tokens"), principal=user):
        table.add_row(
            t.id,
            t.name,
            t.prefix + "...",
            t.principal or "",
            t.project or "*",
            t.role or "*",
            _ago(t.expires_at) if t.expires_at else "never",
            _ago(t.last_used_at) if t.last_used_at else "never",
            _ago(t.revoked_at) if t.revoked_at else "",
        )
    console.print(table)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (token list).")],
) -> None:
    """Revoke a token: it stops working at once."""
    token = revoke_token(_host_ctx("tokens"), token_id=token_id)
    console.print(f"token {token.name} ({token.prefix}...) revoked")


@users_app.command("create")
def users_create(
    name: str,
    service: Annotated[bool, typer.Option("--service", help="A service account.")] = False,
    admin: Annotated[bool, typer.Option("--admin", help="A server admin.")] = False,
) -> None:
    """Create a user (or a service account)."""
    info = sec_principals.create_principal(
        _host_ctx("users"), name=name, kind="service" if service else "user", server_admin=admin
    )
    console.print(f"{info.kind.value} {info.name} created")


@users_app.command("list")
def users_list() -> None:
    table = Table("name", "kind", "server admin", "disabled")
    for p in sec_principals.list_principals(_host_ctx("users")):
        admin, disabled = "yes" if p.server_admin else "", "yes" if p.disabled else ""
        table.add_row(p.name, p.kind.value, admin, disabled)
    console.print(table)


@users_app.command("disable")
def users_disable(name: str) -> None:
    """Disable a user or service account: its tokens stop working at once."""
    sec_principals.disable_principal(_host_ctx("users"), name=name)
    console.print(f"{name} disabled")


@projects_app.command("create")
def projects_create(name: str) -> None:
    sec_principals.create_project(_host_ctx("projects"), name=name)
    console.print(f"project {name} created")


@projects_app.command("list")
def projects_list() -> None:
    for p in sec_principals.list_projects(_host_ctx("projects")):
        console.print(p.name)


@members_app.command("add")
def members_add(
    project: str,
    user: str,
    role: Annotated[str, typer.Option(help="viewer, editor or admin.")] = "viewer",
) -> None:
    """Give USER ROLE in PROJECT (or change their role there)."""
    m = sec_principals.set_member(_host_ctx("members"), project=project, principal=user, role=role)
    console.print(f"{m.principal} is {m.role.value} of {m.project}")


@members_app.command("remove")
def members_remove(project: str, user: str) -> None:
    sec_principals.remove_member(_host_ctx("members"), project=project, principal=user)
    console.print(f"{user} removed from {project}")


@members_app.command("list")
def members_list(project: str) -> None:
    table = Table("member", "kind", "role")
    for m in sec_principals.list_members(_host_ctx("members"), project=project):
        table.add_row(m.principal, m.kind.value, m.role.value)
    console.print(table)


# --- audit ------------------------------------------------------------------------------------


@audit_app.command("list")
def audit_list(
    after: Annotated[int, typer.Option(min=0, help="Only events with a larger seq.")] = 0,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many.")] = 100,
) -> None:
    """Audit events, oldest first (page on with --after the last seq shown)."""
    table = Table("seq", "at", "actor", "action", "resource", "details")
    for e in _client().backend.audit_events(after=after, limit=limit):
        details = json.dumps(e.details, sort_keys=True, default=str)
        table.add_row(str(e.seq), _ago(e.at), e.actor, e.action, e.resource, escape(details))
    console.print(table)


@audit_app.command("verify")
def audit_verify() -> None:
    """Check the audit chain against its key and head anchor; exit 1 naming the first bad seq."""
    result = _client().backend.verify_audit()
    if not result.ok:
        raise IntegrityError(
            f"the audit chain is broken at event {result.first_bad_seq}: {result.problem}",
            field="audit",
        )
    legacy = f" ({result.legacy_through} from before the key)" if result.legacy_through else ""
    console.print(f"audit chain ok: {result.events} events{legacy}, anchored at {result.head_seq}")


# --- cluster: nodes and queues -----------------------------------------------------------------


@nodes_app.command("list")
def nodes_list() -> None:
    """Every node: CPUs, memory and GPUs (allocated / total), its jobs, whether it is healthy."""
    table = Table("id", "healthy", "CPUs", "memory MB", "GPUs", "jobs", "message")
    for n in _client().nodes.list():
        table.add_row(
            escape(n.id),
            "yes" if n.healthy else "[red]no[/red]",
            f"{n.allocated_cpus:g}/{n.cpus:g}",
            f"{n.allocated_memory_mb}/{n.memory_mb}",
            escape(_gpus_text(n.gpus, n.gpu_source)),
            escape(", ".join(n.jobs)) or "-",
            escape(n.message),
        )
    console.print(table)


@nodes_app.command("show")
def nodes_show(node_id: str) -> None:
    """One node: its GPUs (index, model, memory) and what is allocated to which jobs."""
    n = _client().nodes.get(node_id)
    health = "healthy" if n.healthy else "UNHEALTHY"
    console.print(
        f"node {escape(n.id)} ({escape(n.hostname or '-')}, {escape(n.address or '-')}): {health}",
        highlight=False,
    )
    if n.message:
        console.print(f"  {escape(n.message)}", highlight=False)
    console.print(
        f"  CPUs {n.allocated_cpus:g}/{n.cpus:g} allocated, memory {n.allocated_memory_mb}/"
        f"{n.memory_mb} MB, GPUs from {n.gpu_source}, jobs: {escape(', '.join(n.jobs)) or '-'}",
        highlight=False,
    )
    table = Table("index", "model", "memory MB", "allocated", "jobs")
    for g in n.gpus:
        table.add_row(
            str(g.index),
            escape(g.model),
            str(g.memory_mb),
            f"{g.allocated:g}",
            escape(", ".join(g.jobs)) or "-",
        )
    console.print(table)


@queues_app.command("list")
def queues_list() -> None:
    """Every queue: usage / nominal quota, borrowed capacity, running and waiting jobs."""
    table = Table(
        "queue", "cohort", "weight", "GPUs", "CPUs", "memory MB", "borrowed", "running", "waiting"
    )
    for q in _client().queues.list():
        table.add_row(
            escape(q.name) + ("" if q.configured else " [dim](default)[/dim]"),
            escape(q.cohort or "-"),
            f"{q.weight:g}",
            _used_of(q.usage.gpus, q.nominal.gpus),
            _used_of(q.usage.cpus, q.nominal.cpus),
            _used_of(q.usage.memory_mb, q.nominal.memory_mb),
            _borrowed_text(q.borrowed),
            str(q.running_count),
            str(len(q.waiting)),
        )
    console.print(table)


@queues_app.command("show")
def queues_show(name: str) -> None:
    """One queue: its quota, usage and borrowed capacity, and its waiting jobs in order."""
    q = _client().queues.get(name)
    _print_queue(q)


@queues_app.command("set")
def queues_set(
    name: str,
    gpus: Annotated[
        float | None, typer.Option(help="Nominal GPUs (unlimited if left out).")
    ] = None,
    cpus: Annotated[float | None, typer.Option(help="Nominal CPUs.")] = None,
    memory: Annotated[int | None, typer.Option("--memory", help="Nominal memory, MB.")] = None,
    gpu_model: Annotated[
        list[str] | None,
        typer.Option("--gpu-model", help="GPUs of one model, MODEL=N (repeatable), e.g. A100=4."),
    ] = None,
    cohort: Annotated[str | None, typer.Option(help="The cohort it borrows and lends in.")] = None,
    borrow_gpus: Annotated[
        float | None, typer.Option(help="At most this many GPUs borrowed.")
    ] = None,
    borrow_cpus: Annotated[
        float | None, typer.Option(help="At most this many CPUs borrowed.")
    ] = None,
    borrow_memory: Annotated[
        int | None, typer.Option("--borrow-memory", help="At most this much memory borrowed, MB.")
    ] = None,
    weight: Annotated[float, typer.Option(help="Fair-share weight (1 = an equal share).")] = 1.0,
) -> None:
    """Create or replace queue NAME's quota (server admins). A quota below what it uses now
    lets its running jobs run on; new ones wait."""
    q = _client().queues.set(
        name,
        nominal=QuotaSpec(
            gpus=gpus, cpus=cpus, memory_mb=memory, gpus_by_model=_gpu_models(gpu_model or [])
        ),
        cohort=cohort,
        borrowing_limit=QuotaSpec(gpus=borrow_gpus, cpus=borrow_cpus, memory_mb=borrow_memory),
        weight=weight,
    )
    console.print(f"queue {escape(q.name)} set", highlight=False)
    _print_queue(q)


@queues_app.command("delete")
def queues_delete(name: str) -> None:
    """Remove queue NAME's configuration (server admins): it is unlimited again."""
    _client().queues.delete(name)
    console.print(f"queue {escape(name)} deleted", highlight=False)


def _print_queue(q: Any) -> None:
    where = f", cohort {q.cohort}" if q.cohort else ""
    kind = "" if q.configured else " (a project's default queue: unlimited)"
    console.print(
        f"queue {escape(q.name)}{kind}{escape(where)}, weight {q.weight:g}", highlight=False
    )
    table = Table("", "GPUs", "CPUs", "memory MB")
    table.add_row("used", f"{q.usage.gpus:g}", f"{q.usage.cpus:g}", str(q.usage.memory_mb))
    table.add_row(
        "nominal", _limit(q.nominal.gpus), _limit(q.nominal.cpus), _limit(q.nominal.memory_mb)
    )
    table.add_row(
        "borrowing limit",
        _limit(q.borrowing_limit.gpus),
        _limit(q.borrowing_limit.cpus),
        _limit(q.borrowing_limit.memory_mb),
    )
    table.add_row(
        "borrowed", f"{q.borrowed.gpus:g}", f"{q.borrowed.cpus:g}", str(q.borrowed.memory_mb)
    )
    console.print(table)
    for model, quota in sorted(q.nominal.gpus_by_model.items()):
        used = q.gpus_by_model.get(model, 0.0)
        console.print(f"  {escape(model)} GPUs: {used:g}/{quota:g}", highlight=False)
    if q.message:
        console.print(f"  [yellow]{escape(q.message)}[/yellow]", highlight=False)
    console.print(
        f"  running: {q.running_count}" + (f" ({', '.join(q.running)})" if q.running else ""),
        highlight=False,
    )
    if q.waiting:
        waiting = Table("position", "job", "project", "reason")
        for w in q.waiting:
            waiting.add_row(
                str(w.position), w.job_id or "(hidden)", escape(w.project or "-"), escape(w.reason)
            )
        console.print(waiting)
    else:
        console.print("  waiting: none", highlight=False)


def _gpu_models(pairs: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for pair in pairs:
        model, sep, count = pair.rpartition("=")
        try:
            value = float(count) if sep and model.strip() else None
        except ValueError:
            value = None
        if value is None:
            raise InvalidInputError(
                f"--gpu-model {pair!r} is not MODEL=N (e.g. --gpu-model A100=4)", field="gpu-model"
            )
        out[model.strip()] = value
    return out


def _gpus_text(gpus: Any, source: str) -> str:
    if not gpus:
        return f"0 ({source})"
    used = sum(g.allocated for g in gpus)
    models = sorted({g.model for g in gpus})
    return f"{used:g}/{len(gpus)} {', '.join(models)}"


def _used_of(used: float, quota: float | None) -> str:
    return f"{used:g}/{_limit(quota)}"


def _limit(quota: float | None) -> str:
    return "∞" if quota is None else f"{quota:g}"


def _borrowed_text(b: Any) -> str:
    parts = [f"{b.gpus:g} GPUs" if b.gpus else "", f"{b.cpus:g} CPUs" if b.cpus else ""]
    parts.append(f"{b.memory_mb} MB" if b.memory_mb else "")
    return ", ".join(p for p in parts if p) or "-"


def main() -> None:
    try:
        app()
    except ShipyardError as exc:
        _print_error(exc)
        sys.exit(1)
    except Exception as exc:
        # A full or read-only disk (blob folder, database, job folder) is one clear line, not a
        # traceback; so is any other OS error (a file that cannot be read, say).
        clean = storage_fault(exc)
        if clean is None and isinstance(exc, OSError):
            where = f": {exc.filename}" if exc.filename else ""
            clean = ShipyardError(f"{exc.strerror or exc}{where}", field="os")
        if clean is None:
            raise
        _print_error(clean)
        sys.exit(1)


def _print_error(exc: ShipyardError) -> None:
    field = f" [{exc.field}]" if exc.field else ""
    # soft_wrap: one line however narrow the terminal (or 80 columns when piped), for scripts
    err.print(
        f"[red]error{escape(field)}:[/red] {escape(exc.message)}", highlight=False, soft_wrap=True
    )


if __name__ == "__main__":
    main()
