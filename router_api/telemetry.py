"""What the front end measures for people watching it: latency histograms per phase,
HTTP outcomes, and a compact snapshot of it all for the dashboard and ``/metrics``.

Recording a request is O(1); a snapshot is O(workers + buckets), whatever the request
rate, so it can be sent to the scheduler every half second (the dashboard's data path)
and scraped by Prometheus as often as anyone likes.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING

from core.histogram import PHASES, Histogram
from router_api.triton_stats import ModelStats

if TYPE_CHECKING:
    from router_api.dispatcher import Dispatcher


class Telemetry:
    """The front end's own measurements, for the dashboard and ``/metrics``: latency per
    phase, and every HTTP response by status. Triton's statistics extension, which counts
    requests and compute per model as Triton does, is ``triton_stats.ModelStats``."""

    def __init__(self) -> None:
        self.latency = {phase: Histogram() for phase in PHASES}
        self.responses: Counter[int] = Counter()  # HTTP status -> count, every request

    def request_served(self, total_s: float, queue_s: float, round_trip_s: float, compute_s: float) -> None:
        """One answered request, split into its phases: waiting in our queue, getting to
        the worker and back (the round trip less the worker's compute), and compute."""
        self.latency["request"].observe(total_s)
        self.latency["queue"].observe(queue_s)
        self.latency["transfer"].observe(max(0.0, round_trip_s - compute_s))
        self.latency["compute"].observe(compute_s)

    def snapshot(self, dispatchers: Dispatcher | list[Dispatcher], now: float | None = None) -> dict:
        """Everything the dashboard needs from this front end, cumulative where it can be
        so that a lost update loses nothing but resolution: all models together, and
        each model's own row (``models``). ``now`` is the dispatchers' clock (the event
        loop's, ``time.monotonic``)."""
        ds = dispatchers if isinstance(dispatchers, list) else [dispatchers]
        stats = ModelStats.combined([s for d in ds for s in d.entry_stats.values()])
        now = time.monotonic() if now is None else now
        levels = [sum(d.queue.depths[i] for d in ds) for i in range(len(ds[0].queue.depths))]
        workers: dict[str, dict] = {}
        for d in ds:
            weights = d.weights(now)
            for v in d.views.values():
                w = workers.setdefault(v.address, {"name": v.name, "in_flight": 0, "weight": 0.0, "responsive": True, "rows": 0})
                w["in_flight"] += v.in_flight
                w["weight"] = round(max(w["weight"], weights.get(v.address, 0.0)), 4)
                w["responsive"] = w["responsive"] and v.responsive
                w["rows"] += v.rows
        return {
            "time": time.time(),
            "clock": time.monotonic(),  # rates are measured on this clock: it never steps
            "model": stats.name,
            "queue": {"levels": levels, "max_batch_size": max(d.queue.max_batch_size for d in ds)},
            "success": stats.durations["success"][0],
            "failure": stats.durations["fail"][0],
            "rejected": dict(stats.rejected),
            "responses": {str(code): n for code, n in self.responses.items()},
            "rows": stats.inference_count,
            "padded_rows": stats.padded_count,
            "batches": stats.execution_count,
            "batch_sizes": {str(size): d["compute_infer"][0] for size, d in stats.batch.items()},
            "latency": {phase: h.snapshot() for phase, h in self.latency.items()},
            "workers": workers,
            "models": {d.name: model_row(d) for d in ds},
        }


def model_row(d: Dispatcher) -> dict:
    """One model's line on the dashboard: its queue, its counts, the workers holding it."""
    s = ModelStats.combined(list(d.entry_stats.values()))
    return {"queued": len(d.queue), "in_flight": len(d.batches), "success": s.durations["success"][0],
            "failure": s.durations["fail"][0], "rows": s.inference_count, "batches": s.execution_count,
            "workers": len(d.views), "draining": d.draining, "max_batch_size": d.queue.max_batch_size}  # fmt: skip
