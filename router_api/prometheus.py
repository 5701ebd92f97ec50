"""``GET /metrics``: the front end's state in Prometheus's text format, written by
prometheus_client from a collector that reads our own counters and histograms.

Names follow Triton's where Triton has one: ``nv_inference_*`` for requests and
durations, ``nv_gpu_*`` for GPUs, labelled by worker instead of by local GPU. What
Triton lacks is ``batch_router_*``: latency histograms per phase, batch sizes, HTTP
outcomes, and per-worker placement state. A worker without a GPU has no ``nv_gpu_*``
series; a simulated one carries ``simulated="true"``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from core.histogram import BOUNDS, PHASES
from core.placement import throttling
from router_api.triton_stats import ModelStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the format generate_latest writes

# Triton's failure reasons: which of ours each one counts (BACKEND: failed after dispatch).
FAILURE_REASONS = {"REJECTED": ("timeout",), "CANCELED": ("cancelled",), "OTHER": ("queue_full", "unavailable", "invalid")}

PHASE_HELP = {
    "request": "Request latency from arrival to answer, successful requests",
    "queue": "Time waiting in the front end's queue",
    "transfer": "Round trip to the worker less compute: the network both ways, and waiting there behind earlier batches",
    "compute": "Time the worker spent on the request's batch",
}

# prometheus_client's text writer names every counter ``<name>_total``; Triton's own
# counters (``nv_inference_*``) have no such suffix, and dashboards built for Triton
# query them by their names, so the suffix comes off those.
_TRITON_TOTAL = re.compile(r"^((?:# (?:HELP|TYPE) )?nv_inference_\w+?)_total\b", re.M)


def number(value: float) -> str:
    """A bucket bound as it appears in ``le``: ``4``, not ``4.0``."""
    return str(int(value)) if float(value).is_integer() else f"{float(value):.10g}"


def batch_bounds(largest: int) -> list[float]:
    """Powers of two up to ``largest`` (the larger of max_batch_size and any batch seen)."""
    bounds, b = [], 1
    while b < largest:
        bounds.append(float(b))
        b *= 2
    return [*bounds, float(b)]


def histogram(name: str, help_text: str, labels: dict, counts: list[int], bounds: list[float], total: float) -> Metric:
    h = HistogramMetricFamily(name, help_text, labels=list(labels))
    running, buckets = 0, []
    for bound, n in zip([*bounds, math.inf], counts):
        running += n
        buckets.append(("+Inf" if math.isinf(bound) else number(bound), running))
    h.add_metric(list(labels.values()), buckets, total)
    return h


def family(kind: type, name: str, help_text: str, rows: list[tuple[dict, float | None]]) -> Metric | None:
    """A counter or gauge family of ``(labels, value)`` rows; None rows are left out, and
    a family with no rows at all is not written."""
    rows = [(labels, value) for labels, value in rows if value is not None]
    if not rows:
        return None
    f = kind(name, help_text, labels=list(rows[0][0]))
    for labels, value in rows:
        f.add_metric([str(v) for v in labels.values()], value)
    return f


class RouterCollector(Collector):
    """One scrape's worth of state: ``snapshot`` is Telemetry.snapshot(), ``stats`` the
    ModelStats, ``workers`` the ``/v1/workers`` entries (with their latest GPU sample)."""

    def __init__(self, snapshot: dict, stats: ModelStats | list[ModelStats], workers: list[dict], version: str) -> None:
        self.stats = stats if isinstance(stats, list) else [stats]  # one per model name, Triton's ``model`` label
        self.snapshot, self.workers, self.version = snapshot, workers, version

    def collect(self) -> Iterator[Metric]:
        metrics = [*self.requests(), *self.latency(), *self.per_worker()]
        yield from (m for m in metrics if m is not None)

    def requests(self) -> list[Metric | None]:
        snap, us = self.snapshot, 1e-3  # ns -> µs
        models = [({"model": s.name, "version": self.version}, s) for s in self.stats]

        def rows(value) -> list[tuple[dict, float]]:
            return [(labels, value(s)) for labels, s in models]

        failures = [({**m, "reason": r}, sum(s.rejected.get(k, 0) for k in keys)) for m, s in models for r, keys in FAILURE_REASONS.items()]
        failures += [({**m, "reason": "BACKEND"}, s.durations["fail"][0]) for m, s in models]
        out = [
            family(CounterMetricFamily, "nv_inference_request_success", "Requests answered successfully", rows(lambda s: s.durations["success"][0])),
            family(CounterMetricFamily, "nv_inference_request_failure",
                   "Failed requests: REJECTED timed out (504), OTHER refused (503: queue full, no scheduler, "
                   "shutting down), CANCELED client went away, BACKEND failed on a worker", failures),
            family(CounterMetricFamily, "nv_inference_count", "Inferences performed (a batch of n counts n)", rows(lambda s: s.inference_count)),
            family(CounterMetricFamily, "nv_inference_exec_count", "Batches executed", rows(lambda s: s.execution_count)),
            family(CounterMetricFamily, "batch_router_padded_rows", "Rows of padding run to fill batches up to their "
                   "bucket (nv_inference_count counts only real rows)", rows(lambda s: s.padded_count)),
            # One queue serves every model name: its depth is the cluster model's row.
            family(GaugeMetricFamily, "nv_inference_pending_request_count", "Requests waiting in the front end's queue",
                   [(models[0][0], sum(snap["queue"]["levels"]))]),
        ]  # fmt: skip
        for field, name, text in (
            ("success", "nv_inference_request_duration_us", "Cumulative request duration, successful requests"),
            ("queue", "nv_inference_queue_duration_us", "Cumulative time requests waited in the queue"),
            ("compute_input", "nv_inference_compute_input_duration_us", "Cumulative compute input duration"),
            ("compute_infer", "nv_inference_compute_infer_duration_us", "Cumulative compute inference duration"),
            ("compute_output", "nv_inference_compute_output_duration_us", "Cumulative compute output duration"),
        ):
            out.append(family(CounterMetricFamily, name, text + " (microseconds)", rows(lambda s: s.durations[field][1] * us)))
        out.append(family(CounterMetricFamily, "batch_router_device_wait_duration_us", "Cumulative time requests' "
                          "batches waited on their worker for its device while another batch ran (microseconds)",
                          rows(lambda s: s.device_wait[1] * us)))  # fmt: skip
        return out

    def latency(self) -> list[Metric | None]:
        snap = self.snapshot
        model = {"model": snap["model"], "version": self.version}
        out: list[Metric | None] = []
        for phase in PHASES:
            h = snap["latency"][phase]
            out.append(histogram(f"batch_router_{phase}_duration_seconds", PHASE_HELP[phase], model, h["counts"], list(BOUNDS), h["sum"]))
        sizes = {int(k): int(v) for k, v in snap["batch_sizes"].items()}
        bounds = batch_bounds(max(snap["queue"]["max_batch_size"], *sizes, 1))  # fixed buckets, scrape after scrape
        counts = [0] * (len(bounds) + 1)
        for size, n in sizes.items():
            counts[next((i for i, b in enumerate(bounds) if size <= b), len(bounds))] += n
        out.append(histogram("batch_router_batch_size", "Rows per batch sent to a worker", model, counts, bounds,
                             sum(s * n for s, n in sizes.items())))  # fmt: skip
        out.append(family(CounterMetricFamily, "batch_router_http_responses", "HTTP responses by status code",
                          [({"code": code}, n) for code, n in sorted(snap["responses"].items())]))  # fmt: skip
        return out

    def per_worker(self) -> list[Metric | None]:
        workers = self.workers
        gpus = [(w, w["gpu"]) for w in workers if w.get("gpu")]

        def who(w: dict) -> dict:
            return {"worker": w["name"] or w["address"], "address": w["address"]}

        def gpu_labels(w: dict, g: dict) -> dict:
            return {**who(w), "gpu_uuid": g.get("uuid") or "", "simulated": "true" if w["simulated"] else "false"}

        def gauge(name: str, text: str, key: str, scale: float = 1.0) -> Metric | None:
            return family(GaugeMetricFamily, name, text,
                          [(gpu_labels(w, g), None if g.get(key) is None else g[key] * scale) for w, g in gpus])  # fmt: skip

        return [
            gauge("nv_gpu_utilization", "GPU utilization (0.0-1.0)", "utilization_gpu", 0.01),
            gauge("nv_gpu_memory_total_bytes", "GPU total memory, in bytes", "memory_total"),
            gauge("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", "memory_used"),
            gauge("nv_gpu_power_usage", "GPU power usage in watts", "power"),
            gauge("nv_gpu_power_limit", "GPU power limit in watts", "power_limit"),
            gauge("batch_router_gpu_temperature_celsius", "GPU temperature", "temperature"),
            gauge("batch_router_gpu_sm_clock_mhz", "GPU SM clock", "sm_clock"),
            family(GaugeMetricFamily, "batch_router_gpu_throttling", "1 while clocks are held down or past the slowdown temperature",
                   [(gpu_labels(w, g), 1 if throttling(g) else 0) for w, g in gpus]),
            family(GaugeMetricFamily, "batch_router_worker_in_flight_batches", "Batches sent to the worker and not answered yet",
                   [(who(w), w["in_flight"]) for w in workers]),
            family(GaugeMetricFamily, "batch_router_worker_weight", "The worker's share of capacity as placement sees it (0-1)",
                   [(who(w), w["weight"]) for w in workers]),
            family(GaugeMetricFamily, "batch_router_worker_responsive", "1 unless the worker is presumed stuck",
                   [(who(w), 1 if w["responsive"] else 0) for w in workers]),
            family(CounterMetricFamily, "batch_router_worker_rows", "Rows the worker answered for this front end",
                   [(who(w), w["rows"]) for w in workers]),
        ]  # fmt: skip


def render(snapshot: dict, stats: ModelStats | list[ModelStats], workers: list[dict], version: str) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RouterCollector(snapshot, stats, workers, version))
    return _TRITON_TOTAL.sub(r"\1", generate_latest(registry).decode())
