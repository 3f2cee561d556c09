"""Prometheus service discovery (``/prometheus/targets``): thin HTTP over
``shipyard.monitoring.discovery``, in Prometheus's ``http_sd`` format.

Point ``http_sd_configs`` at ``/api/v1/prometheus/targets`` with a token (``authorization:
credentials_file:``) to scrape the server and every replica of the projects the token may view;
``/api/v1/projects/{project}/prometheus/targets`` lists one project's replicas (viewer role).
See ``deploy/prometheus/prometheus.yml``.
"""

from __future__ import annotations

from fastapi import APIRouter

from shipyard.monitoring import discovery
from shipyard.monitoring.discovery import TargetGroup
from shipyard.schemas import ErrorBody
from shipyard.server.deps import API_PREFIX, PROJECT_PREFIX, Ctx, ProjectPath

router = APIRouter(tags=["prometheus"], responses={404: {"model": ErrorBody}})


@router.get(f"{API_PREFIX}/prometheus/targets")
def list_targets(ctx: Ctx) -> list[TargetGroup]:
    return discovery.to_http_sd(discovery.scrape_targets(ctx))


@router.get(f"{PROJECT_PREFIX}/prometheus/targets")
def list_project_targets(project: ProjectPath, ctx: Ctx) -> list[TargetGroup]:
    return discovery.to_http_sd(discovery.scrape_targets(ctx, project=project))
