"""``/individual-gpu-metrics``: each worker's GPU over time, as its NVML sampler read it.

Throttling shows as red dots on every plot. A simulated GPU is drawn dashed and named
simulated in the legend and the note above; a CPU-only worker is listed, never drawn.
"""

from __future__ import annotations

import html

from bokeh.core.properties import without_property_validation
from bokeh.layouts import column, gridplot
from bokeh.models import ColumnDataSource, Div
from bokeh.plotting import figure
from distributed.utils import log_errors

from scheduler_plugins.dashboard.common import SIMULATED, color, gib, history_of, num, page
from scheduler_plugins.history import History

METRICS = (
    ("utilization", "GPU utilization (%)"),
    ("memory_used_gib", "GPU memory used (GiB; dotted: total)"),
    ("temperature", "Temperature (°C)"),
    ("power", "Power (W)"),
    ("sm_clock", "SM clock (MHz)"),
)
THROTTLED = "#d62728"


def series(rows: list[dict], address: str) -> dict[str, list]:
    """One worker's columns from history rows; rows where it had no GPU are skipped."""
    points = [(r["time"], r["workers"][address]) for r in rows if r["workers"].get(address, {}).get("gpu")]
    out: dict[str, list] = {"time": [1e3 * t for t, _ in points]}
    values = {
        "utilization": [num(p["utilization"]) for _, p in points],
        "memory_used_gib": [num(gib(p["memory_used"])) for _, p in points],
        "temperature": [num(p["temperature"]) for _, p in points],
        "power": [num(p["power"]) for _, p in points],
        "sm_clock": [num(p["sm_clock"]) for _, p in points],
    }
    out.update(values)
    out["memory_total_gib"] = [num(gib(p["memory_total"])) for _, p in points]
    hot = [p["throttling"] for _, p in points]
    for key, vals in values.items():
        out[f"{key}_throttled"] = [v if h else float("nan") for v, h in zip(vals, hot)]
    return out


def note(point_by_worker: dict[str, dict]) -> str:
    """What kind of GPU each worker has, said plainly above the plots."""
    if not point_by_worker:
        return "<p>No workers yet.</p>"
    items = []
    for p in sorted(point_by_worker.values(), key=lambda p: p["name"]):
        name = html.escape(str(p["name"]))
        if not p["gpu"] and p.get("missing"):
            why = html.escape(str(p["missing"]))
            items.append(f"<li><b>{name}</b>: runs on a GPU, but <b style='color:#d62728'>no sample</b>: {why}</li>")
        elif not p["gpu"] and p.get("unmetered"):
            items.append(f"<li><b>{name}</b>: runs on a GPU that reports no metrics (worker.gpu-metrics off, or no NVML)</li>")
        elif not p["gpu"]:
            items.append(f"<li><b>{name}</b>: CPU only, no GPU to draw</li>")
        elif p["simulated"]:
            items.append(f"<li><b>{name}</b>: <b style='color:#c060c0'>{SIMULATED} GPU</b> (numbers derived from the worker's busy time, not read from hardware; dashed)</li>")
        else:
            items.append(f"<li><b>{name}</b>: GPU read through NVML{' <b style=color:#d62728>throttling</b>' if p['throttling'] else ''}</li>")
    return "<ul style='margin:4px 0'>" + "".join(items) + "</ul>"


class GpuMetrics:
    def __init__(self, history: History) -> None:
        self.history = history
        self.seq = 0
        self.sources: dict[str, ColumnDataSource] = {}
        self.note = Div(text=note({}), sizing_mode="stretch_width", name="gpu-metrics-note")
        self.figures: dict[str, figure] = {}
        shared = None
        for key, title in METRICS:
            fig = figure(title=title, height=220, sizing_mode="stretch_width", x_axis_type="datetime",
                         tools="xpan,xwheel_zoom,reset", name=key, **({"x_range": shared} if shared else {}))  # fmt: skip
            shared = shared or fig.x_range
            self.figures[key] = fig
        grid = gridplot([[self.figures[k] for k, _ in METRICS[i : i + 2]] for i in range(0, len(METRICS), 2)],
                        sizing_mode="stretch_width", toolbar_location="right")  # fmt: skip
        self.root = column(self.note, grid, sizing_mode="stretch_width")

    def _add_worker(self, address: str, point: dict) -> ColumnDataSource:
        name = str(point["name"])
        source = ColumnDataSource(series([], address), name=f"gpu:{name}")
        label = f"{name} ({SIMULATED.lower()})" if point["simulated"] else name
        dash = "dashed" if point["simulated"] else "solid"
        c = color(len(self.sources))
        for key, _ in METRICS:
            fig = self.figures[key]
            fig.line("time", key, source=source, color=c, line_width=2, line_dash=dash, legend_label=label)
            fig.scatter("time", f"{key}_throttled", source=source, color=THROTTLED, size=6, legend_label="throttling")
            fig.legend.location = "top_left"
        self.figures["memory_used_gib"].line("time", "memory_total_gib", source=source, color=c, line_dash="dotted")
        self.sources[address] = source
        return source

    @without_property_validation
    @log_errors
    def update(self) -> None:
        new = History.since(self.history.gpu, self.seq)
        if not new:
            return
        self.seq = new[-1]["seq"]
        latest = new[-1]["workers"]
        self.note.text = note(latest)
        addresses = {a for r in new for a, p in r["workers"].items() if p.get("gpu")}
        for address in sorted(addresses):
            source = self.sources.get(address)
            if source is None:
                point = next(r["workers"][address] for r in reversed(new) if r["workers"].get(address, {}).get("gpu"))
                source = self._add_worker(address, point)
            source.stream(series(new, address), rollover=max(1, len(self.history.gpu)))


def gpu_metrics_doc(scheduler, extra: dict, doc) -> None:
    history = history_of(scheduler)
    # Once a second: GPU samples ride heartbeats, which come about that often, and a
    # refresh costs a Bokeh stream per worker (benchmarks/dashboard_cost.py).
    page(doc, extra, "GPU metrics", GpuMetrics(history) if history is not None else None, interval_ms=1000)
