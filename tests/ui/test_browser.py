"""The web page in a real browser: Debian's chromium, driven by Playwright, against a real
``python -m shipyard.server`` on 127.0.0.1, with every resource created through the SDK over HTTP.

Where chromium (``/usr/bin/chromium``) or the ``playwright`` package is missing these tests skip,
except in CI (CI=true), where that is a failure: a UI nobody drives is a UI nobody checks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import shipyard
from shipyard.client import Client
from shipyard.context import open_context
from shipyard.domain.models import JobStatus
from shipyard.errors import InvalidStateError, NotFoundError
from shipyard.security.tokens import create_token
from shipyard.settings import Settings
from shipyard.store.engine import forget_database
from tests.conftest import LiveServer, wait_for
from tests.job_user import job_python
from tests.onnx_models import linear_model

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Dialog, Frame, Page, Request, Response

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
# Headless, and nothing that reaches past 127.0.0.1 (no sync, component updates or QUIC probes).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL = (
    "install Debian's chromium (apt-get install --no-install-recommends chromium, which gives "
    "/usr/bin/chromium) and the playwright package (pip install playwright; it is in the dev "
    "extra). Do not run 'playwright install': these tests drive Debian's browser"
)
SECTIONS = ("datasets", "runs", "models", "jobs", "deployments")
# Markup a user may type as a param value: the page must show it as text and never run it.
HOSTILE = "<img src=x onerror=alert(1)>"
REFRESH_TIMEOUT_MS = 15_000  # the sections refresh every 5 s


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's chromium, headless; each launch gets a fresh temporary profile from Playwright."""
    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} is missing")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright package is not installed")
    if missing:
        reason = "; ".join(missing)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI needs a browser for the UI tests ({reason}): {INSTALL}", pytrace=False)
        pytest.skip(f"no browser for the UI tests: {reason}")
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


class Watch:
    """What a page reports that a healthy page must not: console errors, uncaught exceptions,
    failed requests, HTTP errors and dialogs (dismissed); and every response and navigation."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.problems: list[str] = []
        self.dialogs: list[str] = []
        self.responses: list[Response] = []
        self.navigations = 0
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(f"uncaught: {exc}"))
        page.on("requestfailed", self._failed)
        page.on("response", self._response)
        page.on("dialog", self._dialog)
        page.on("framenavigated", self._navigated)

    def statuses(self, path: str) -> list[int]:
        """The statuses of the responses seen for ``path`` (query left out)."""
        return [r.status for r in self.responses if r.url.split("?")[0].endswith(path)]

    def assert_clean(self) -> None:
        assert self.problems == [], self.problems
        assert self.dialogs == [], self.dialogs

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.problems.append(f"console error: {message.text}")

    def _failed(self, request: Request) -> None:
        # a refresh still in flight when the page navigates away is cancelled: not a fault
        if request.failure == "net::ERR_ABORTED" and "/ui/sections/" in request.url:
            return
        self.problems.append(f"request failed: {request.method} {request.url}: {request.failure}")

    def _response(self, response: Response) -> None:
        self.responses.append(response)
        if response.status >= 400:
            request = response.request
            self.problems.append(f"HTTP {response.status}: {request.method} {response.url}")

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def _navigated(self, frame: Frame) -> None:
        if frame == self.page.main_frame:
            self.navigations += 1


def test_the_page_shows_refreshes_and_escapes_in_a_browser(
    browser: Browser, live_server: LiveServer, home: Path, tmp_path: Path
) -> None:
    client = Client(settings=Settings(home=home, url=live_server.url))
    try:
        created = _populate(client, tmp_path)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            _check_page(page, Watch(page), client, live_server.url, created, tmp_path)
        finally:
            page.close()
    finally:
        with contextlib.suppress(NotFoundError, InvalidStateError):  # never deployed, or failed
            client.deployments.stop("digits-api")  # its replica would outlive the server
        client.close()


def test_with_auth_on_the_page_needs_a_token(browser: Browser, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    home = tmp_path / "auth-home"
    home.mkdir()
    settings = Settings(home=home)
    _, secret = create_token(open_context(settings, actor="admin"), name="alice")  # user:admin
    forget_database(settings.database_url)
    server = LiveServer(home, auth=True)
    try:
        anonymous = browser.new_page()
        response = anonymous.goto(f"{server.url}/")
        assert response is not None and response.status == 401
        assert response.json()["code"] == "unauthenticated"
        assert "shipyard ·" not in anonymous.content()
        anonymous.close()

        # with the token on every request: the page, its static files and the htmx refreshes
        context = browser.new_context(extra_http_headers={"Authorization": f"Bearer {secret}"})
        page = context.new_page()
        watch = Watch(page)
        response = page.goto(f"{server.url}/")
        assert response is not None and response.status == 200
        expect(page).to_have_title("shipyard · default")
        expect(page.locator("header .actor")).to_have_text("signed in as user:admin")
        assert watch.statuses("/static/htmx.min.js") == [200]
        assert page.evaluate("typeof window.htmx") == "object"
        watch.assert_clean()
        context.close()
    finally:
        server.stop()


# --- helpers ------------------------------------------------------------------------------------


def _populate(client: Client, tmp_path: Path) -> dict[str, str]:
    """A dataset, a finished run with metrics, a model with alias production, a succeeded job
    and a running deployment, all in the default project, all through the SDK over HTTP."""
    data = tmp_path / "faces"
    data.mkdir()
    pq.write_table(pa.table({"x": [1.0, 2.0, 3.0], "label": [0, 1, 0]}), data / "train.parquet")
    client.datasets.commit(data, name="faces", message=f"first cut {HOSTILE}")

    model_file = tmp_path / "model.onnx"
    model_file.write_bytes(linear_model(4, 2).data)
    with shipyard.init(
        client=client, name="train-1", params={"lr": 0.01, "note": HOSTILE}, flush_interval=0.1
    ) as run:
        run.use_dataset("faces")
        run.log({"accuracy": 0.9375, "loss": 0.25})
        run.log_model(model_file, name="digits")
    client.models.set_alias("digits", "production", 1)

    job = client.jobs.submit([job_python()[0], "-c", "print(1)"], name="hello")
    done = wait_for(
        lambda: (j := client.jobs.get(job.id)).status.finished and j,
        timeout=30,
        what=f"job {job.id} to finish",
    )
    assert done.status is JobStatus.SUCCEEDED, done.message

    deployment = client.deployments.create("digits-api", model="digits")
    assert deployment.url, deployment.message
    return {"run_id": run.id, "job_id": job.id, "deployment_url": deployment.url}


def _check_page(
    page: Page, watch: Watch, client: Client, url: str, created: dict[str, str], tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    response = page.goto(f"{url}/")
    assert response is not None and response.status == 200
    expect(page).to_have_title("shipyard · default")

    # every section shows what the SDK created
    datasets = page.locator("#datasets tbody tr")
    expect(datasets).to_have_count(1)
    expect(datasets.locator("td.name")).to_have_text("faces")
    expect(datasets).to_contain_text("v1")
    run_row = page.locator("#runs tbody tr", has_text=created["run_id"])
    expect(run_row.locator("td.name")).to_contain_text("train-1")
    expect(run_row.locator(".badge")).to_have_text("finished")
    expect(run_row.locator(".kv", has_text="accuracy=")).to_have_text("accuracy=0.9375")
    expect(run_row.locator(".kv", has_text="lr=")).to_have_text("lr=0.01")
    models = page.locator("#models tbody tr")
    expect(models.locator("td.name")).to_have_text("digits")
    expect(models).to_contain_text("v1")
    expect(models.locator(".kv")).to_have_text("production → v1")
    job_row = page.locator("#jobs tbody tr", has_text=created["job_id"])
    expect(job_row.locator("td.name")).to_contain_text("hello")
    expect(job_row.locator(".badge")).to_have_text("succeeded")
    deployment = page.locator("#deployments tbody tr")
    expect(deployment.locator("td.name")).to_have_text("digits-api")
    expect(deployment.locator(".badge")).to_have_text("running")
    expect(deployment).to_contain_text("digits v1 (production)")
    expect(deployment.locator("a")).to_have_attribute("href", created["deployment_url"])

    # what a user wrote is shown as text: no element is made of it, nothing of it runs
    expect(run_row.locator(".kv", has_text="note=")).to_have_text(f"note={HOSTILE}")
    expect(page.locator("main img")).to_have_count(0)

    # htmx comes from the package, and runs
    assert watch.statuses("/static/htmx.min.js") == [200]
    assert watch.statuses("/static/style.css") == [200]
    assert page.evaluate("typeof window.htmx") == "object"
    watch.assert_clean()

    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 10_000
    # on a phone-sized screen a wide table scrolls inside its card, never the whole page
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=str(tmp_path / "page-narrow.png"), full_page=True)
    widths = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], f"the page is {widths[0]}px wide in a {widths[1]}px window"
    page.set_viewport_size({"width": 1280, "height": 900})

    # a new run appears by itself: htmx swaps the section in, the page is not reloaded
    page.evaluate("window.notReloaded = true")
    navigations = watch.navigations
    with shipyard.init(client=client, name="fresh-run", flush_interval=0.1) as fresh:
        fresh.log({"loss": 0.5})
    fresh_row = page.locator("#runs tbody tr", has_text=fresh.id)
    expect(fresh_row.locator(".kv")).to_have_text("loss=0.5", timeout=REFRESH_TIMEOUT_MS)
    expect(fresh_row.locator(".badge")).to_have_text("finished")
    assert page.evaluate("window.notReloaded") is True
    assert watch.navigations == navigations
    assert 200 in watch.statuses("/ui/sections/runs")
    # the swapped-in section escapes too
    expect(page.locator("#runs .kv", has_text="note=")).to_have_text(f"note={HOSTILE}")
    expect(page.locator("main img")).to_have_count(0)
    watch.assert_clean()

    # the project form checks names in the browser (its pattern must compile: a broken one is
    # only reported on the console, and then nothing is checked) and does not submit a bad one
    page.fill("#project", "../vision")
    page.click("form.project button")
    watch.assert_clean()
    assert watch.navigations == navigations, f"the form submitted a bad name: {page.url}"
    assert page.eval_on_selector("#project", "e => e.validity.patternMismatch") is True

    # another project through the form: every section is empty, and stays empty when htmx
    # refreshes it (the refresh asks for the same project)
    page.fill("#project", "other")
    page.click("form.project button")
    page.wait_for_url("**/?project=other")
    expect(page).to_have_title("shipyard · other")
    for name in SECTIONS:
        expect(page.locator(f"#{name} .empty")).to_have_text(f"No {name} in other yet.")
    expect(page.locator("main table")).to_have_count(0)
    with page.expect_response(
        lambda r: "/ui/sections/runs" in r.url, timeout=REFRESH_TIMEOUT_MS
    ) as refreshed:
        pass
    refresh_url = refreshed.value.url
    assert refresh_url.endswith("/ui/sections/runs?project=other"), refresh_url
    assert refreshed.value.status == 200
    expect(page.locator("#runs .empty")).to_have_text("No runs in other yet.")
    watch.assert_clean()
