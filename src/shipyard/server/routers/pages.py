"""The web page (``/``): one project's datasets, runs, models, jobs and deployments.

Server-rendered with Jinja2 (autoescaped: every name, param and message a user chose is text,
never markup). Each section is also served alone (``/ui/sections/{section}``), and htmx swaps it
in every few seconds, so the page stays current without a client-side app. Each section is one
service call.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from shipyard.compute import jobs, nodes, queues
from shipyard.context import Context
from shipyard.data import datasets
from shipyard.domain.names import validate_name
from shipyard.errors import NotFoundError
from shipyard.server.deps import DEFAULT_PROJECT, Ctx, Project
from shipyard.serving import deployments
from shipyard.tracking import registry, runs

router = APIRouter(include_in_schema=False)

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
REFRESH_SECONDS = 5
RUNS_SHOWN = 50

templates = Jinja2Templates(
    env=jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,
    )
)

Section = Literal["datasets", "runs", "models", "jobs", "deployments"]
SECTIONS: dict[str, Callable[[Context, str], list[Any]]] = {
    "datasets": lambda ctx, project: datasets.list_datasets(ctx, project=project),
    "runs": lambda ctx, project: runs.list_runs(ctx, project=project, limit=RUNS_SHOWN),
    "models": lambda ctx, project: registry.list_models(ctx, project=project),
    "jobs": lambda ctx, project: jobs.list_jobs(ctx, project=project),
    "deployments": lambda ctx, project: deployments.list_deployments(ctx, project=project),
}


@router.get("/", response_class=HTMLResponse)
def index(request: Request, ctx: Ctx, project: Project = DEFAULT_PROJECT) -> HTMLResponse:
    validate_name(project, field="project")
    items = {name: _load(name, ctx, project) for name in SECTIONS}
    return templates.TemplateResponse(
        request,
        "index.html",
        {
            "project": project,
            "sections": items,
            "refresh": REFRESH_SECONDS,
            "actor": ctx.actor,
        },
    )


@router.get("/ui/sections/{section}", response_class=HTMLResponse)
def section(
    section: Section, request: Request, ctx: Ctx, project: Project = DEFAULT_PROJECT
) -> HTMLResponse:
    validate_name(project, field="project")
    return templates.TemplateResponse(
        request,
        f"section_{section}.html",
        {"project": project, "items": _load(section, ctx, project)},
    )


def _load(section: str, ctx: Context, project: str) -> list[Any]:
    try:
        return SECTIONS[section](ctx, project)
    except NotFoundError as exc:
        if exc.field == "project":  # a project nobody has written to yet: nothing to show
            return []
        raise


# --- the cluster page (``/nodes``): nodes and queues, not per project ---------------------------

ClusterSection = Literal["nodes", "queues"]
CLUSTER_SECTIONS: dict[str, Callable[[Context], list[Any]]] = {
    "nodes": lambda ctx: nodes.list_nodes(ctx),
    "queues": lambda ctx: queues.list_queues(ctx),
}


@router.get("/nodes", response_class=HTMLResponse)
def cluster(request: Request, ctx: Ctx) -> HTMLResponse:
    return templates.TemplateResponse(
        request,
        "nodes.html",
        {
            "sections": {name: load(ctx) for name, load in CLUSTER_SECTIONS.items()},
            "refresh": REFRESH_SECONDS,
            "actor": ctx.actor,
        },
    )


@router.get("/ui/cluster/{section}", response_class=HTMLResponse)
def cluster_section(section: ClusterSection, request: Request, ctx: Ctx) -> HTMLResponse:
    return templates.TemplateResponse(
        request, f"section_{section}.html", {"items": CLUSTER_SECTIONS[section](ctx)}
    )
