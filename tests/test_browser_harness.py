"""The browser harness itself, proved on a stock Dask dashboard (no batch-router):
the page really renders, its data is readable, and a JS error really is caught."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.browser import bokeh_sources, open_page, wait_for_bokeh, wait_for_rows
from tests.cluster import ROOT, free_port
from tests.conftest import ARTIFACTS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dashboard() -> Iterator[tuple[str, str]]:
    """A plain `dask scheduler` with one `dask worker`: (dashboard URL, scheduler address)."""
    ARTIFACTS.mkdir(exist_ok=True)
    sched, dash = free_port(), free_port()
    address, url = f"tcp://127.0.0.1:{sched}", f"http://127.0.0.1:{dash}"
    commands = {
        "scheduler": ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(sched),
                      "--dashboard-address", f"127.0.0.1:{dash}"],
        "worker": ["distributed.cli.dask_worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard"],
    }  # fmt: skip
    procs = []
    try:
        for name, args in commands.items():
            with open(ARTIFACTS / f"browser-dask-{name}.log", "w") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while workers(url) < 1:
            assert time.monotonic() < deadline, f"no worker after 60s; logs in {ARTIFACTS}/browser-dask-*.log"
            assert all(p.poll() is None for p in procs), f"dask exited; logs in {ARTIFACTS}/browser-dask-*.log"
            time.sleep(0.25)
        yield url, address
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(30)


def workers(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/json/counts.json", timeout=2) as r:
            return json.load(r)["workers"]
    except OSError:
        return 0


def test_dask_status_page_renders_without_errors(browser, dashboard):
    url, _ = dashboard
    with open_page(browser, f"{url}/status", screenshot="dask-status.png") as visit:
        state = wait_for_bokeh(visit.page)
        sources = bokeh_sources(visit.page)
    assert state["bokeh"] and state["canvases"] >= 1, state
    assert sources, "a rendered dashboard has ColumnDataSources"
    assert visit.errors == []
    assert visit.screenshot is not None and visit.screenshot.stat().st_size > 10_000


def test_rows_streamed_after_the_page_opened_are_seen(browser, dashboard):
    """Run 8 tasks while the task-stream page is open: its only source must grow to 8 rows."""
    from distributed import Client

    url, address = dashboard
    with open_page(browser, f"{url}/individual-task-stream", screenshot="dask-task-stream.png") as visit:
        wait_for_bokeh(visit.page)
        [source] = bokeh_sources(visit.page)  # unnamed: keyed by its id
        with Client(address, timeout=30) as client:
            assert client.gather(client.map(abs, range(-8, 0))) == list(range(8, 0, -1))
        rows = wait_for_rows(visit.page, {source: 8}, timeout=20)
    assert rows[source] >= 8  # one rectangle per task
    assert visit.errors == []


def test_a_javascript_error_is_recorded(browser):
    """Otherwise `visit.errors == []` above would prove nothing."""
    page = "data:text/html,<script>console.error('logged'); throw new Error('boom')</script>"
    with open_page(browser, page) as visit:
        pass
    assert any("logged" in e for e in visit.errors), visit.errors
    assert any("pageerror" in e and "boom" in e for e in visit.errors), visit.errors


def test_waiting_for_bokeh_on_a_page_without_it_fails_clearly(browser):
    with open_page(browser, "data:text/html,<p>no plots here</p>") as visit:
        with pytest.raises(AssertionError, match="Bokeh did not render"):
            wait_for_bokeh(visit.page, timeout=0.5)
        assert bokeh_sources(visit.page) == {}


def test_an_http_error_page_is_not_mistaken_for_a_loaded_one(browser, dashboard):
    url, _ = dashboard
    with pytest.raises(AssertionError, match="HTTP 404"):
        with open_page(browser, f"{url}/no-such-page"):
            pass


def test_the_screenshot_is_saved_also_when_the_test_body_fails(browser):
    with pytest.raises(ZeroDivisionError):
        with open_page(browser, "data:text/html,<h1>failing</h1>", screenshot="harness-failure.png") as visit:
            1 / 0
    assert visit.screenshot is not None and visit.screenshot.exists()
