"""What the front end measures for people watching it: latency histograms per phase,
HTTP outcomes, and a compact snapshot of it all for the dashboard and ``/metrics``.

Recording a request is O(1); a snapshot is O(workers + buckets), whatever the request
rate, so it can be sent to the scheduler every half second (the dashboard's data path)
and scraped by Prometheus as often as anyone likes.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router_api.dispatch import Dispatcher

# Upper bounds in seconds, √2 apart from 0.25 ms to about 46 s: quantiles read from them
# are within ~±20 % in the worst case, far better with interpolation, at 36 numbers.
BOUNDS: tuple[float, ...] = tuple(round(0.00025 * 2 ** (k / 2), 7) for k in range(36))
PHASES = ("request", "queue", "transfer", "compute")


class Histogram:
    """Cumulative counts in fixed buckets: mergeable across front ends, and the
    quantiles of any interval come from the difference of two snapshots."""

    def __init__(self, bounds: tuple[float, ...] = BOUNDS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> dict:
        return {"counts": list(self.counts), "sum": self.sum}


def quantile(counts: list[int], q: float, bounds: tuple[float, ...] = BOUNDS) -> float | None:
    """The q-quantile of bucketed counts, interpolated within its bucket (as
    Prometheus's ``histogram_quantile``); None when there is nothing counted."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(bounds):  # beyond the last bound: all we know is "more than it"
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * max(0.0, rank - seen) / n
        seen += n
    return bounds[-1]


def difference(new: list[int], old: list[int] | None) -> list[int]:
    """Counts added between two cumulative snapshots (a restart starts again at zero)."""
    if not old or len(old) != len(new) or any(n < o for n, o in zip(new, old)):
        return list(new)
    return [n - o for n, o in zip(new, old)]


class Telemetry:
    """The front end's own measurements, beside Triton's statistics (router_api/stats.py)."""

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

    def snapshot(self, dispatcher: Dispatcher) -> dict:
        """Everything the dashboard needs from this front end, cumulative where it can be
        so that a lost update loses nothing but resolution."""
        stats, queue = dispatcher.stats, dispatcher.queue
        weights = dispatcher.weights()
        return {
            "time": time.time(),
            "clock": time.monotonic(),  # rates are measured on this clock: it never steps
            "model": stats.name,
            "queue": {"levels": list(queue.depths), "max_batch_size": queue.max_batch_size},
            "success": stats.durations["success"][0],
            "failure": stats.durations["fail"][0],
            "rejected": dict(stats.rejected),
            "responses": {str(code): n for code, n in self.responses.items()},
            "rows": stats.inference_count,
            "batches": stats.execution_count,
            "batch_sizes": {str(size): d["compute_infer"][0] for size, d in stats.batch.items()},
            "latency": {phase: h.snapshot() for phase, h in self.latency.items()},
            "workers": {
                v.address: {
                    "name": v.name,
                    "in_flight": v.in_flight,
                    "weight": round(weights.get(v.address, 0.0), 4),
                    "responsive": v.responsive,
                    "rows": v.rows,
                }
                for v in dispatcher.views.values()
            },
        }
