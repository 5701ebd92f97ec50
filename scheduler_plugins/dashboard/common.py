"""What the pages share: how a page is put in Dask's template, where the history lives,
colors per worker, and the small formatting rules."""

from __future__ import annotations

import math
from typing import Any, Protocol

from bokeh.models import Div
from bokeh.palettes import Category10_10

from core.protocol import EXTENSION

INTERVAL_MS = 500  # the front ends report every 500 ms by default: at least once a second
SIMULATED = "SIMULATED"


class Component(Protocol):
    root: Any

    def update(self) -> None: ...


def history_of(scheduler):
    """The plugin's History, or None when this scheduler runs without batch-router."""
    plugin = scheduler.extensions.get(EXTENSION)
    return getattr(plugin, "history", None)


def page(doc, extra: dict, title: str, component: Component | None, interval_ms: int = INTERVAL_MS) -> None:
    """Lay a component into Dask's page template (navigation bar and all) and refresh it
    on the scheduler's event loop."""
    from distributed.dashboard.components import add_periodic_callback
    from distributed.dashboard.components.scheduler import BOKEH_THEME, env

    doc.title = f"Dask: {title}"
    if component is None:
        doc.add_root(Div(text="<p>This scheduler runs without the batch-router plugin: nothing to show.</p>"))
    else:
        component.update()
        add_periodic_callback(doc, component, interval_ms)
        doc.add_root(component.root)
    doc.template = env.get_template("simple.html")
    doc.template_variables.update(extra)
    doc.theme = BOKEH_THEME


def color(i: int) -> str:
    return Category10_10[i % len(Category10_10)]


def num(value: Any) -> float:
    """Bokeh draws NaN as a gap; None would break a numeric column."""
    return float("nan") if value is None else float(value)


def fmt(value: Any, spec: str = ".0f", unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:{spec}}{unit}"


def gib(n: Any) -> float | None:
    return None if n is None else n / 2**30
