"""``/gpu-router``: the whole service on one screen. Headline numbers, one card per
worker (device, GPU state, weight, in flight, health), throughput and latency lately."""

from __future__ import annotations

import time
from collections.abc import Callable

from bokeh.core.properties import without_property_validation
from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource, Range1d
from bokeh.plotting import figure
from distributed.utils import log_errors
from distributed.dashboard.utils import update

from scheduler_plugins.dashboard.common import SIMULATED, fmt, gib, history_of, num, page
from scheduler_plugins.history import History

PER_ROW = 4
CARD_PX = 190
HEALTH_COLORS = {"ok": "#d9f2d9", "throttling": "#ffe0b3", "errors": "#ffe0b3"}  # anything else: red
TILES = (("queue", "queued requests", "d"), ("rows_per_s", "img/s", ".1f"), ("p50_ms", "p50 ms", ".1f"),
         ("p99_ms", "p99 ms", ".1f"), ("served", "served", "d"), ("503", "503 (refused)", "d"),
         ("504", "504 (timeout)", "d"))  # fmt: skip


def card_text(card: dict) -> str:
    """The lines on a worker's card; a simulated GPU says so on every card."""
    device = card.get("device") or "?"
    providers = ", ".join(p.replace("ExecutionProvider", "") for p in card["providers"]) or "?"
    lines = [f"{device} ({providers})"]
    if card["gpu"]:
        label = f"GPU {SIMULATED}" if card["simulated"] else (card.get("gpu_name") or "GPU")
        lines.append(f"{label}: {fmt(card['utilization'], 'd' if isinstance(card['utilization'], int) else '.0f', ' %')} busy")
        lines.append(f"memory {fmt(gib(card['memory_used']), '.1f')} / {fmt(gib(card['memory_total']), '.1f')} GiB")
        lines.append(f"{fmt(card['temperature'], '.0f', ' °C')} · {fmt(card['power'], '.0f', ' W')}")
    elif card.get("missing"):
        lines.append(f"GPU: no sample ({card['missing'][:40]})")
    elif card.get("unmetered"):
        lines.append("GPU: no metrics (gpu-metrics off or no NVML)")
    else:
        lines.append("no GPU: CPU only")
    lines.append(f"weight {fmt(card['weight'], '.2f')} · in flight {fmt(card['in_flight'], 'd')}")
    restarts = card.get("restarts") or 0
    lines.append(f"health: {card['health']}" + (f" · restarted {restarts}x" if restarts else ""))
    return "\n".join(lines)


def card_columns(cards: list[dict]) -> dict[str, list]:
    xs = [i % PER_ROW + 0.5 for i in range(len(cards))]
    ys = [i // PER_ROW + 0.5 for i in range(len(cards))]
    return {
        "x": xs,
        "y": ys,
        "title_x": [x - 0.45 for x in xs],
        "title_y": [y - 0.4 for y in ys],
        "body_y": [y - 0.24 for y in ys],
        "name": [c["name"] for c in cards],
        "body": [card_text(c) for c in cards],
        "health": [c["health"] for c in cards],
        "color": [HEALTH_COLORS.get(c["health"], "#f8c4c4") for c in cards],
        "line": ["#c060c0" if c["simulated"] else "#666666" for c in cards],
    }


def tile_columns(summary: dict) -> dict[str, list]:
    return {
        "x": [i + 0.5 for i in range(len(TILES))],
        "label": [label for _, label, _ in TILES],
        "value": [fmt(summary.get(key), spec) for key, _, spec in TILES],
        "color": ["#f8c4c4" if key in ("503", "504") and summary.get(key) else "#eef3fb" for key, _, _ in TILES],
    }


def timeline_columns(rows: list[dict]) -> dict[str, list]:
    return {
        "time": [1e3 * r["time"] for r in rows],
        "rows_per_s": [r["rows_per_s"] for r in rows],
        "p50": [num(r["request_p50_ms"]) for r in rows],
        "p99": [num(r["request_p99_ms"]) for r in rows],
        "queue": [sum(r["queue_levels"]) for r in rows],
    }


def _board(height: int, n_cols: int, name: str) -> figure:
    fig = figure(
        height=height, sizing_mode="stretch_width", tools="", toolbar_location=None, name=name,
        x_range=Range1d(0, n_cols), y_range=Range1d(1, 0),
    )  # fmt: skip
    fig.axis.visible = False
    fig.grid.visible = False
    fig.outline_line_color = None
    return fig


class Overview:
    def __init__(self, history: History, clock: Callable[[], float] = time.time) -> None:
        self.history = history
        self.clock = clock
        self.seq = 0
        self.tiles = ColumnDataSource(tile_columns({}), name="gpu-router-summary")
        self.cards = ColumnDataSource(card_columns([]), name="gpu-router-cards")
        self.timeline = ColumnDataSource(timeline_columns([]), name="gpu-router-timeline")

        tiles = _board(90, len(TILES), "tiles")
        tiles.rect("x", 0.5, 0.94, 0.9, source=self.tiles, fill_color="color", line_color="#99aacc")
        tiles.text("x", 0.42, text="value", source=self.tiles, text_align="center", text_font_size="20pt", text_font_style="bold")
        tiles.text("x", 0.8, text="label", source=self.tiles, text_align="center", text_font_size="10pt")

        self.board = _board(CARD_PX, PER_ROW, "cards")
        self.board.rect("x", "y", 0.96, 0.92, source=self.cards, fill_color="color", line_color="line", line_width=2)
        self.board.text("title_x", "title_y", text="name", source=self.cards, text_font_size="13pt", text_font_style="bold",
                        text_baseline="top")  # fmt: skip
        self.board.text("title_x", "body_y", text="body", source=self.cards, text_font_size="10pt", text_line_height=1.25,
                        text_baseline="top")  # fmt: skip

        throughput = figure(title="Throughput (img/s)", height=240, sizing_mode="stretch_width", x_axis_type="datetime",
                            tools="", toolbar_location=None, name="throughput")  # fmt: skip
        throughput.line("time", "rows_per_s", source=self.timeline, line_width=2)
        latency = figure(title="Request latency (ms)", height=240, sizing_mode="stretch_width", x_axis_type="datetime",
                         tools="", toolbar_location=None, name="latency")  # fmt: skip
        latency.line("time", "p50", source=self.timeline, legend_label="p50", line_width=2)
        latency.line("time", "p99", source=self.timeline, legend_label="p99", line_width=2, color="#d62728")
        latency.legend.location = "top_left"
        self.root = column(tiles, self.board, row(throughput, latency, sizing_mode="stretch_width"), sizing_mode="stretch_width")

    @without_property_validation
    @log_errors
    def update(self) -> None:
        """O(workers) plus the rows this page has not drawn yet."""
        cards = self.history.cards()
        update(self.tiles, tile_columns(self.history.summary(self.clock())))
        rows_needed = max(1, -(-len(cards) // PER_ROW))
        self.board.height = CARD_PX * rows_needed
        self.board.y_range.start = rows_needed
        update(self.cards, card_columns(cards))
        new = History.since(self.history.queue, self.seq)
        if new:
            self.seq = new[-1]["seq"]
            self.timeline.stream(timeline_columns(new), rollover=max(1, len(self.history.queue)))


def overview_doc(scheduler, extra: dict, doc) -> None:
    history = history_of(scheduler)
    page(doc, extra, "GPU router", Overview(history) if history is not None else None)
