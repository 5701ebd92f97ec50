"""``/individual-batch-queues``: the front ends' queues and batches over time. Queue depth
per priority and dispatch rate, batch sizes, latency percentiles split into queue wait,
transfer and compute, 503/504 rates, and how placement shares the rows out."""

from __future__ import annotations

import itertools

from bokeh.core.properties import without_property_validation
from bokeh.layouts import column, gridplot
from bokeh.models import AdaptiveTicker, ColumnDataSource, DataTable, FactorRange, TableColumn
from bokeh.plotting import figure
from distributed.utils import log_errors
from bokeh.transform import dodge
from distributed.dashboard.utils import update

from scheduler_plugins.dashboard.common import color, history_of, num, page
from scheduler_plugins.history import QUANTILES, History

PHASE_TITLES = (("request", "Request latency, total (ms)"), ("queue", "Queue wait (ms)"),
                ("transfer", "Transfer: round trip less compute (ms)"), ("compute", "Compute on the worker (ms)"))  # fmt: skip
QUANTILE_COLORS = ("#1f77b4", "#ff7f0e", "#d62728")
SHARE_WINDOW_S = 10.0


def timeline_columns(rows: list[dict], levels: int) -> dict[str, list]:
    out: dict[str, list] = {"time": [1e3 * r["time"] for r in rows]}
    for i in range(levels):
        out[f"level_{i + 1}"] = [r["queue_levels"][i] if i < len(r["queue_levels"]) else 0 for r in rows]
    for key in ("requests_per_s", "rows_per_s", "batches_per_s", "503_per_s", "504_per_s"):
        out[key] = [r[key] for r in rows]
    for phase, _ in PHASE_TITLES:
        for q in QUANTILES:
            key = f"{phase}_p{round(q * 100)}_ms"
            out[key] = [num(r[key]) for r in rows]
    return out


MODEL_COLUMNS = (("model", "Model"), ("state", "State"), ("queued", "Queued"), ("in_flight", "Batches in flight"),
                 ("success", "Served"), ("failure", "Failed"), ("rows", "Rows"), ("batches", "Batches"),
                 ("workers", "Workers holding it"))  # fmt: skip


def model_columns(rows: list[dict]) -> dict[str, list]:
    """The models table: one row per model the front ends serve (its own batcher)."""
    return {key: [r[key] for r in rows] for key, _ in MODEL_COLUMNS}


def size_columns(sizes: dict[int, int]) -> dict[str, list]:
    return {"size": list(sizes), "count": list(sizes.values())}


def share_columns(rows: list[dict]) -> dict[str, list]:
    """Each worker's share of the rows served over ``rows`` (the last few seconds) beside
    the weight placement gives it now."""
    served: dict[str, float] = {}
    for r in rows:
        for address, w in r["workers"].items():
            served[address] = served.get(address, 0.0) + w["rows_per_s"]
    total = sum(served.values())
    latest = rows[-1]["workers"] if rows else {}
    workers = sorted(latest.items(), key=lambda kv: str(kv[1]["name"]))
    return {
        "worker": [str(w["name"]) for _, w in workers],
        "share": [served.get(a, 0.0) / total if total > 0 else 0.0 for a, _ in workers],
        "weight": [w["weight"] for _, w in workers],
    }


def in_flight_columns(rows: list[dict], address: str) -> dict[str, list]:
    points = [(r["time"], r["workers"][address]["in_flight"]) for r in rows if address in r["workers"]]
    return {"time": [1e3 * t for t, _ in points], "in_flight": [n for _, n in points]}


def _timeseries(title: str, name: str, **kwargs) -> figure:
    return figure(title=title, height=210, sizing_mode="stretch_width", x_axis_type="datetime",
                  tools="xpan,xwheel_zoom,reset", name=name, **kwargs)  # fmt: skip


class BatchQueues:
    def __init__(self, history: History, levels: int | None = None) -> None:
        self.history = history
        self.seq = 0
        self.levels = levels or history.levels
        self.timeline = ColumnDataSource(timeline_columns([], self.levels), name="batch-queues-timeline")
        self.sizes = ColumnDataSource(size_columns({}), name="batch-queues-sizes")
        self.share = ColumnDataSource(share_columns([]), name="batch-queues-share")
        self.in_flight: dict[str, ColumnDataSource] = {}
        self.models = ColumnDataSource(model_columns([]), name="batch-queues-models")
        table = DataTable(source=self.models, columns=[TableColumn(field=k, title=t) for k, t in MODEL_COLUMNS],
                          height=130, sizing_mode="stretch_width", index_position=None, name="models-table")  # fmt: skip

        self.depth = depth = _timeseries("Queue depth per priority (requests; 1 is highest)", "queue-depth")
        for i in range(self.levels):
            self._level_line(i)
        x = depth.x_range
        rate = _timeseries("Dispatch rate (per second)", "dispatch-rate", x_range=x)
        rate.line("time", "batches_per_s", source=self.timeline, line_width=2, legend_label="batches")
        rate.line("time", "requests_per_s", source=self.timeline, line_width=2, color="#2ca02c", legend_label="requests")
        sizes = figure(title="Batches run, by bucket (rows padded up to it)", height=210, sizing_mode="stretch_width", tools="", name="batch-sizes")
        sizes.vbar("size", top="count", width=0.8, source=self.sizes)
        sizes.xaxis.axis_label = "rows per batch"
        sizes.xaxis.ticker = AdaptiveTicker(min_interval=1)
        latency = []
        for phase, title in PHASE_TITLES:
            fig = _timeseries(title, f"latency-{phase}", x_range=x)
            for q, c in zip(QUANTILES, QUANTILE_COLORS):
                label = f"p{round(q * 100)}"
                fig.line("time", f"{phase}_{label}_ms", source=self.timeline, color=c, line_width=2, legend_label=label)
            latency.append(fig)
        errors = _timeseries("Refused: 503 queue full, 504 timeout (per second)", "rejections", x_range=x)
        errors.line("time", "503_per_s", source=self.timeline, color="#ff7f0e", line_width=2, legend_label="503")
        errors.line("time", "504_per_s", source=self.timeline, color="#d62728", line_width=2, legend_label="504")
        self.share_fig = figure(title="Placement: share of rows over the last 10 s, and weight now", height=210, sizing_mode="stretch_width",
                                x_range=FactorRange(), tools="", name="placement-share")  # fmt: skip
        self.share_fig.vbar(dodge("worker", -0.18, range=self.share_fig.x_range), top="share", width=0.34, source=self.share, legend_label="share")
        self.share_fig.vbar(dodge("worker", 0.18, range=self.share_fig.x_range), top="weight", width=0.34, source=self.share, color="#ff7f0e", legend_label="weight")
        self.flight_fig = _timeseries("In flight per worker (batches)", "in-flight", x_range=x)
        figures = [depth, rate, sizes, errors, *latency, self.share_fig, self.flight_fig]
        for fig in figures:
            if fig.legend:
                fig.legend.location = "top_left"
        grid = gridplot([figures[i : i + 2] for i in range(0, len(figures), 2)], sizing_mode="stretch_width", toolbar_location="right")
        self.root = column(table, grid, sizing_mode="stretch_width")

    def _level_line(self, i: int) -> None:
        self.depth.line("time", f"level_{i + 1}", source=self.timeline, color=color(i), line_width=2, legend_label=f"priority {i + 1}")

    @without_property_validation
    @log_errors
    def update(self) -> None:
        update(self.sizes, size_columns(self.history.batch_sizes()))
        update(self.models, model_columns(self.history.models()))
        new = History.since(self.history.queue, self.seq)
        if not new:
            return
        self.seq = new[-1]["seq"]
        levels = max(len(r["queue_levels"]) for r in new)
        if levels > self.levels:  # a front end configured with more levels than ours
            for i in range(self.levels, levels):
                self._level_line(i)
            self.levels = levels
            self.timeline.data = timeline_columns(list(self.history.queue), levels)
        else:
            self.timeline.stream(timeline_columns(new, self.levels), rollover=max(1, len(self.history.queue)))
        recent = list(itertools.takewhile(lambda r: r["time"] >= new[-1]["time"] - SHARE_WINDOW_S, reversed(self.history.queue)))[::-1]
        share = share_columns(recent)
        if list(self.share_fig.x_range.factors) != share["worker"]:
            self.share_fig.x_range.factors = share["worker"]
        update(self.share, share)
        for address in sorted({a for r in new for a in r["workers"]}):
            source = self.in_flight.get(address)
            if source is None:
                name = next(r["workers"][address]["name"] for r in new if address in r["workers"])
                source = self.in_flight[address] = ColumnDataSource(in_flight_columns([], address), name=f"inflight:{name}")
                self.flight_fig.step("time", "in_flight", source=source, color=color(len(self.in_flight) - 1), line_width=2,
                                     legend_label=str(name), mode="after")  # fmt: skip
                self.flight_fig.legend.location = "top_left"
            source.stream(in_flight_columns(new, address), rollover=max(1, len(self.history.queue)))


def batch_queues_doc(scheduler, extra: dict, doc) -> None:
    history = history_of(scheduler)
    page(doc, extra, "Batch queues", BatchQueues(history) if history is not None else None)
