"""The cluster page (``/nodes``) in a real browser, against a real server: a queue configured
with the CLI over HTTP, a running job holding a GPU and a second one waiting at the queue's
quota, all shown with the node's GPUs and escaped. Same browser and conventions as
``test_browser.py`` (Debian's chromium through Playwright; skipped without it, except in CI)."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from typer.testing import CliRunner

from shipyard.cli.main import app
from shipyard.client import Client
from shipyard.domain.models import JobStatus
from shipyard.errors import InvalidStateError
from shipyard.settings import Settings
from tests.conftest import LiveServer, wait_for
from tests.job_user import job_python
from tests.ui.test_browser import HOSTILE, Watch, browser  # noqa: F401 - the browser fixture

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = pytest.mark.slow

MODEL = f"A100 {HOSTILE}"  # a GPU model is whatever the settings say: shown as text


def test_the_cluster_page_shows_nodes_allocations_and_queues(
    browser: Browser,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    home = tmp_path / "server-home"
    home.mkdir()
    server = LiveServer(
        home,
        env={"SHIPYARD_GPUS": "2", "SHIPYARD_GPU_MODEL": MODEL, "SHIPYARD_GPU_MEMORY_MB": "40960"},
    )
    client = Client(settings=Settings(home=tmp_path / "client", url=server.url, project="vision"))
    jobs: list[str] = []
    try:
        # an admin sets the quota with the CLI, against the server
        made = CliRunner().invoke(
            app,
            ["queues", "set", "vision", "--gpus", "1", "--cohort", "lab"],
            env={
                "SHIPYARD_URL": server.url,
                "SHIPYARD_HOME": str(tmp_path / "cli"),
                "COLUMNS": "200",
            },
        )
        assert made.exit_code == 0, made.output

        sleeper = [job_python()[0], "-c", "import time; time.sleep(120)"]
        running = client.jobs.submit(sleeper, gpus=1, name="holds-a-gpu")
        jobs.append(running.id)
        wait_for(
            lambda: client.jobs.get(running.id).status is JobStatus.RUNNING,
            timeout=30,
            what="the first job to run",
        )
        waiting = client.jobs.submit(sleeper, gpus=1, name="over-quota")
        jobs.append(waiting.id)
        reason = wait_for(
            lambda: (m := client.jobs.get(waiting.id).message).startswith("waiting") and m,
            timeout=30,
            what="the second job to wait with a reason",
        )
        assert client.jobs.get(waiting.id).status is JobStatus.QUEUED

        page = browser.new_page(viewport={"width": 1280, "height": 900})
        watch = Watch(page)
        page.goto(f"{server.url}/")
        page.click("header nav a[href='/nodes']")  # linked from the project page
        page.wait_for_url("**/nodes")
        expect(page).to_have_title("shipyard · cluster")

        here = socket.gethostname()
        node = page.locator(f"#nodes tr[data-node='{here}']")
        expect(node.locator(".badge")).to_have_text("healthy")
        expect(node.locator("td.cpus")).to_contain_text("1 / ")
        gpus = node.locator(".gpu")
        expect(gpus).to_have_count(2)
        expect(gpus.nth(0)).to_contain_text(f"#0 {MODEL} · 40960 MB · allocated 1")
        expect(gpus.nth(0).locator(".id")).to_have_text(running.id)
        expect(gpus.nth(1)).to_contain_text("allocated 0")
        expect(node.locator("td.jobs")).to_have_text(running.id)

        queue = page.locator("#queues tr[data-queue='vision']")
        expect(queue.locator("td.usage-gpus")).to_have_text("1 / 1")
        expect(queue).to_contain_text("lab")
        wait_row = queue.locator(".wait")
        expect(wait_row).to_have_count(1)
        expect(wait_row.locator(".kv")).to_have_text("1")
        expect(wait_row.locator(".id")).to_have_text(waiting.id)
        expect(wait_row).to_contain_text(reason)

        # the model name is text, never markup; the refreshed sections answer too
        expect(page.locator("main img")).to_have_count(0)
        refreshed = page.request.get(f"{server.url}/ui/cluster/nodes")
        assert refreshed.status == 200 and running.id in refreshed.text()
        assert page.request.get(f"{server.url}/ui/cluster/queues").status == 200
        assert page.request.get(f"{server.url}/ui/cluster/bogus").status == 422
        assert page.evaluate("typeof window.htmx") == "object"

        # on a phone-sized screen the wide tables scroll inside their cards
        page.set_viewport_size({"width": 390, "height": 844})
        widths = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert widths[0] <= widths[1], f"the page is {widths[0]}px wide in a {widths[1]}px window"
        watch.assert_clean()
        page.close()
    finally:
        for job_id in reversed(jobs):
            with contextlib.suppress(InvalidStateError):
                client.jobs.cancel(job_id)
        client.close()
        server.stop()
