"""A headless Chromium for dashboard tests: Playwright drives Debian's `chromium`.

Playwright's own browser download is not used (it needs internet), so the
executable must come from the system. Where there is none, the browser tests skip
on a laptop but fail under CI, so a CI run can never pass by skipping them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page

SCREENSHOTS = Path(__file__).parent / "artifacts" / "screenshots"
VIEWPORT = {"width": 1600, "height": 1000}
# Root in a container: no user namespaces for the sandbox, no GPU, and a small
# /dev/shm (Debian's launcher would add --disable-dev-shm-usage itself, but its
# check breaks when /dev/shm has two mounts).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
INSTALL_HINT = "apt-get install chromium (or set BATCH_ROUTER_CHROMIUM to a Chromium/Chrome executable)"


def find_chromium() -> str | None:
    """$BATCH_ROUTER_CHROMIUM if set (and then nothing else, so a wrong value is
    noticed rather than papered over), else the usual names on PATH."""
    override = os.environ.get("BATCH_ROUTER_CHROMIUM")
    if override:
        return shutil.which(override)
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> NoReturn:
    """Skip locally; fail under CI, where a skipped browser test would hide a broken setup."""
    if in_ci():
        pytest.fail(f"{reason}; CI is set, so this fails instead of skipping", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """A headless Chromium per test module (a launch costs about a second).

    Not per session: Playwright's sync API keeps its asyncio loop marked as running
    on the main thread until it stops, so every later `asyncio.run()` in the suite
    would fail with "cannot be called from a running event loop"
    (microsoft/playwright-pytest#167). For the same reason, a module using this
    fixture cannot call `asyncio.run()` itself.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright package is missing: pip install -e '.[test]'")
    executable = find_chromium()
    if executable is None:
        where = os.environ.get("BATCH_ROUTER_CHROMIUM")
        what = f"BATCH_ROUTER_CHROMIUM={where!r} is not an executable" if where else "no chromium on PATH"
        unavailable(f"{what}: {INSTALL_HINT}")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@dataclass
class PageVisit:
    """An open page plus every JavaScript error it has reported so far."""

    page: Page
    errors: list[str] = field(default_factory=list)
    screenshot: Path | None = None

    def record_console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            loc = msg.location
            self.errors.append(f"console.error: {msg.text} ({loc.get('url')}:{loc.get('lineNumber')})")


@contextmanager
def open_page(
    browser: Browser, url: str, screenshot: Path | str | None = None, *, timeout: float = 30.0
) -> Iterator[PageVisit]:
    """Open `url` in a fresh context at a fixed viewport and wait for `load`.

    Errors are recorded from before the first byte, so none slip past. The
    full-page screenshot (relative paths go under tests/artifacts/screenshots/) is
    taken on exit, also when the test body failed: that is when it is wanted most.
    """
    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        page.set_default_timeout(timeout * 1000)
        visit = PageVisit(page)
        page.on("pageerror", lambda err: visit.errors.append(f"pageerror: {err}"))
        page.on("console", visit.record_console)
        response = page.goto(url, wait_until="load")
        if response is not None and not response.ok:  # None for data: and about: URLs
            raise AssertionError(f"GET {url} -> HTTP {response.status}")
        try:
            yield visit
        except BaseException:
            if screenshot is not None:
                _save_screenshot(visit, screenshot, quiet=True)
            raise
        if screenshot is not None:
            _save_screenshot(visit, screenshot)
    finally:
        context.close()


def _save_screenshot(visit: PageVisit, name: Path | str, quiet: bool = False) -> None:
    path = SCREENSHOTS / name  # an absolute `name` replaces SCREENSHOTS
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        visit.page.screenshot(path=str(path), full_page=True)
        visit.screenshot = path
    except Exception:
        if not quiet:
            raise


# BokehJS 3.x: plots draw into <canvas> elements inside shadow roots, so
# document.querySelectorAll("canvas") finds none; walk the shadow roots instead.
# Bokeh.index holds the root views; has_finished() is true once each has painted.
_RENDER_STATE_JS = """() => {
  const B = window.Bokeh;
  const countCanvases = (root) => {
    let n = root.querySelectorAll("canvas").length;
    for (const el of root.querySelectorAll("*")) if (el.shadowRoot) n += countCanvases(el.shadowRoot);
    return n;
  };
  const views = B && B.index ? Object.values(B.index) : [];
  return {
    bokeh: B ? B.version : null,
    documents: B ? B.documents.length : 0,
    views: views.length,
    finished: views.every((v) => typeof v.has_finished !== "function" || v.has_finished()),
    canvases: countCanvases(document),
  };
}"""


def bokeh_render_state(page: Page) -> dict:
    """What BokehJS has done so far: version, documents, root views, canvases."""
    return page.evaluate(_RENDER_STATE_JS)


def wait_for_bokeh(page: Page, *, min_canvases: int = 1, timeout: float = 30.0) -> dict:
    """Wait until BokehJS has a document whose root views have painted at least
    `min_canvases` canvases (0 for pages of widgets only); returns the render state."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    ready = f"""() => {{
      const s = ({_RENDER_STATE_JS})();
      return s.documents > 0 && s.views > 0 && s.finished && s.canvases >= {int(min_canvases)};
    }}"""
    try:
        page.wait_for_function(ready, polling=100, timeout=timeout * 1000)
    except PlaywrightTimeout:
        raise AssertionError(f"Bokeh did not render in {timeout}s: {bokeh_render_state(page)}") from None
    return bokeh_render_state(page)


# Every ColumnDataSource (subclasses such as AjaxDataSource included) in every Bokeh
# document, keyed by name, or by id when unnamed; a name used twice keeps the
# longer source. get_length() is null for a source without columns.
_SOURCES_JS = """() => {
  const B = window.Bokeh;
  if (!B) return {};
  const CDS = B.Models.get("ColumnDataSource");
  const rows = {};
  for (const doc of B.documents)
    for (const model of doc.all_models)
      if (model instanceof CDS) {
        const key = model.name ?? model.id;
        rows[key] = Math.max(rows[key] ?? 0, model.get_length() ?? 0);
      }
  return rows;
}"""


def bokeh_sources(page: Page) -> dict[str, int]:
    """Rows in each ColumnDataSource of the page, read from BokehJS itself: the
    data the browser actually has, not what the server meant to send."""
    return page.evaluate(_SOURCES_JS)


def wait_for_rows(page: Page, minimum: dict[str, int], *, timeout: float = 30.0) -> dict[str, int]:
    """Wait until each named source has at least the given number of rows (a
    dashboard streams data after the page opens); returns all row counts."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    enough = f"""(minimum) => {{
      const rows = ({_SOURCES_JS})();
      return Object.entries(minimum).every(([key, n]) => (rows[key] ?? -1) >= n);
    }}"""
    try:
        page.wait_for_function(enough, arg=minimum, polling=100, timeout=timeout * 1000)
    except PlaywrightTimeout:
        raise AssertionError(f"sources never reached {minimum} in {timeout}s: {bokeh_sources(page)}") from None
    return bokeh_sources(page)
