"""The web page: lists a project's resources, escapes what users wrote, refreshes by section."""

from __future__ import annotations

from pathlib import Path

from shipyard.blobs import hash_bytes
from shipyard.context import Context
from shipyard.data.datasets import commit_files
from shipyard.domain.models import FileEntry, MetricPoint
from shipyard.tracking import registry, runs
from tests.onnx_models import linear_model
from tests.server.conftest import TestClient

STATIC = Path(__file__).resolve().parents[2] / "src" / "shipyard" / "server" / "static"


def _populate(ctx: Context) -> str:
    data = b"a,b\n1,2\n"
    ctx.blobs.put_bytes(data)
    commit_files(
        ctx,
        project="vision",
        name="faces",
        files=[FileEntry(path="t.csv", digest=hash_bytes(data), size=len(data))],
    )
    run = runs.create_run(
        ctx, project="vision", name="train-1", params={"note": "<script>alert('x')</script>"}
    )
    runs.log_batch(
        ctx,
        run_id=run.id,
        metrics=[MetricPoint(key="accuracy", value=0.9375, step=1, timestamp=1.0)],
    )
    digest = ctx.blobs.put_bytes(
        linear_model(4, 2, input_name="input", output_name="logits").data
    ).digest
    registry.register_version(ctx, project="vision", model="digits", digest=digest)
    registry.set_alias(ctx, project="vision", model="digits", alias="production", version=1)
    return run.id


def test_the_page_lists_the_projects_resources(client: TestClient, ctx: Context) -> None:
    run_id = _populate(ctx)
    response = client.get("/", params={"project": "vision"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    for expected in (
        "faces",
        "v1",
        "train-1",
        run_id,
        "running",
        "accuracy=0.9375",
        "digits",
        "production → v1",
        "No jobs in vision yet",
        "No deployments in vision yet",
    ):
        assert expected in page, expected
    # what users wrote is text, never markup
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page
    # htmx from the package, sections that refresh themselves
    assert '<script src="/static/htmx.min.js"' in page
    assert 'hx-get="/ui/sections/runs?project=vision"' in page
    assert 'hx-trigger="every 5s"' in page


def test_sections_render_alone(client: TestClient, ctx: Context) -> None:
    _populate(ctx)
    runs_section = client.get("/ui/sections/runs", params={"project": "vision"})
    assert runs_section.status_code == 200
    assert "train-1" in runs_section.text and "<html" not in runs_section.text
    models_section = client.get("/ui/sections/models", params={"project": "vision"}).text
    assert "digits" in models_section and "train-1" not in models_section
    assert client.get("/ui/sections/secrets").status_code == 422


def test_an_empty_or_unknown_project_renders_empty(client: TestClient, ctx: Context) -> None:
    _populate(ctx)
    page = client.get("/").text  # the default project has nothing
    assert "No runs in default yet" in page and "train-1" not in page
    assert "No datasets in nowhere yet" in client.get("/", params={"project": "nowhere"}).text
    bad = client.get("/", params={"project": "../vision"})
    assert bad.status_code == 422 and bad.json()["field"] == "project"


def test_htmx_is_served_from_the_package(client: TestClient) -> None:
    response = client.get("/static/htmx.min.js")
    assert response.status_code == 200
    assert response.content == (STATIC / "htmx.min.js").read_bytes()
    assert response.content.startswith(b"var htmx=")
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/static/nope.js").status_code == 404
