"""``GET /metrics``: the front end's state in Prometheus's text format (version 0.0.4).

Names follow Triton's where Triton has one (shared/research/peers-and-protocols.md §1.8):
``nv_inference_*`` for requests and durations, ``nv_gpu_*`` for GPUs, labelled by worker
instead of by local GPU. What Triton lacks is ``batch_router_*``: latency histograms per
phase, batch sizes, HTTP outcomes, and per-worker placement state. A worker without a
GPU has no ``nv_gpu_*`` series; a simulated one carries ``simulated="true"``.
"""

from __future__ import annotations

import math
from typing import Iterable

from router_api.telemetry import BOUNDS, PHASES
from scheduler_plugins.policies import throttling

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Sample = tuple[str, dict, float]  # name suffix, labels, value

# Triton's failure reasons: which of ours each one counts (BACKEND: failed after dispatch).
FAILURE_REASONS = {"REJECTED": ("timeout",), "CANCELED": ("cancelled",), "OTHER": ("queue_full", "unavailable")}


def escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return f"{float(value):.10g}" if not float(value).is_integer() else str(int(value))


class Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> None:
        rows = [(suffix, labels, value) for suffix, labels, value in samples if value is not None]
        if not rows:
            return
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in rows:
            text = ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{suffix}{{{text}}} {number(value)}" if text else f"{name}{suffix} {number(value)}")

    def histogram(self, name: str, help_text: str, labels: dict, counts: list[int], bounds: Iterable[float], total: float) -> None:
        samples: list[Sample] = []
        running = 0
        for bound, n in zip([*bounds, math.inf], counts):
            running += n
            samples.append(("_bucket", {**labels, "le": "+Inf" if math.isinf(bound) else number(bound)}, running))
        samples += [("_sum", labels, total), ("_count", labels, running)]
        self.family(name, "histogram", help_text, samples)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(snapshot: dict, stats, workers: list[dict], version: str) -> str:
    """``snapshot``: Telemetry.snapshot(); ``stats``: the ModelStats; ``workers``: the
    front end's ``/v1/workers`` entries (with their latest GPU sample)."""
    out = Exposition()
    model = {"model": snapshot["model"], "version": version}
    us = 1e-3  # ns -> µs

    out.family("nv_inference_request_success", "counter", "Requests answered successfully",
               [("", model, stats.durations["success"][0])])  # fmt: skip
    failures = [("", {**model, "reason": r}, sum(snapshot["rejected"].get(k, 0) for k in keys)) for r, keys in FAILURE_REASONS.items()]
    failures.append(("", {**model, "reason": "BACKEND"}, stats.durations["fail"][0]))
    out.family("nv_inference_request_failure", "counter",
               "Failed requests: REJECTED timed out (504), OTHER refused (503: queue full, no scheduler, "
               "shutting down), CANCELED client went away, BACKEND failed on a worker", failures)  # fmt: skip
    out.family("nv_inference_count", "counter", "Inferences performed (a batch of n counts n)", [("", model, stats.inference_count)])
    out.family("nv_inference_exec_count", "counter", "Batches executed", [("", model, stats.execution_count)])
    out.family("nv_inference_pending_request_count", "gauge", "Requests waiting in the front end's queue",
               [("", model, sum(snapshot["queue"]["levels"]))])  # fmt: skip
    for field, name, text in (
        ("success", "nv_inference_request_duration_us", "Cumulative request duration, successful requests"),
        ("queue", "nv_inference_queue_duration_us", "Cumulative time requests waited in the queue"),
        ("compute_input", "nv_inference_compute_input_duration_us", "Cumulative compute input duration"),
        ("compute_infer", "nv_inference_compute_infer_duration_us", "Cumulative compute inference duration"),
        ("compute_output", "nv_inference_compute_output_duration_us", "Cumulative compute output duration"),
    ):
        out.family(name, "counter", text + " (microseconds)", [("", model, stats.durations[field][1] * us)])

    for phase in PHASES:
        h = snapshot["latency"][phase]
        out.histogram(f"batch_router_{phase}_duration_seconds", PHASE_HELP[phase], model, h["counts"], BOUNDS, h["sum"])
    sizes = {int(k): int(v) for k, v in snapshot["batch_sizes"].items()}
    bounds = batch_bounds(max(snapshot["queue"]["max_batch_size"], *sizes, 1))  # fixed buckets, scrape after scrape
    counts = [0] * (len(bounds) + 1)
    for size, n in sizes.items():
        counts[next((i for i, b in enumerate(bounds) if size <= b), len(bounds))] += n
    out.histogram("batch_router_batch_size", "Rows per batch sent to a worker", model, counts, bounds,
                  sum(s * n for s, n in sizes.items()))  # fmt: skip
    out.family("batch_router_http_responses_total", "counter", "HTTP responses by status code",
               [("", {"code": code}, n) for code, n in sorted(snapshot["responses"].items())])  # fmt: skip

    worker_families(out, workers)
    return out.text()


PHASE_HELP = {
    "request": "Request latency from arrival to answer, successful requests",
    "queue": "Time waiting in the front end's queue",
    "transfer": "Round trip to the worker less compute: the network both ways, and waiting there behind earlier batches",
    "compute": "Time the worker spent on the request's batch",
}


def batch_bounds(largest: int) -> list[float]:
    """Powers of two up to ``largest`` (the larger of max_batch_size and any batch seen)."""
    bounds, b = [], 1
    while b < largest:
        bounds.append(float(b))
        b *= 2
    return [*bounds, float(b)]


def worker_families(out: Exposition, workers: list[dict]) -> None:
    def who(w: dict) -> dict:
        return {"worker": w["name"] or w["address"], "address": w["address"]}

    gpus = [(w, w["gpu"]) for w in workers if w.get("gpu")]

    def gpu_labels(w: dict, g: dict) -> dict:
        return {**who(w), "gpu_uuid": g.get("uuid") or "", "simulated": "true" if w["simulated"] else "false"}

    def gpu_samples(key: str, scale: float = 1.0) -> list[Sample]:
        return [("", gpu_labels(w, g), None if g.get(key) is None else g[key] * scale) for w, g in gpus]

    out.family("nv_gpu_utilization", "gauge", "GPU utilization (0.0-1.0)", gpu_samples("utilization_gpu", 0.01))
    out.family("nv_gpu_memory_total_bytes", "gauge", "GPU total memory, in bytes", gpu_samples("memory_total"))
    out.family("nv_gpu_memory_used_bytes", "gauge", "GPU used memory, in bytes", gpu_samples("memory_used"))
    out.family("nv_gpu_power_usage", "gauge", "GPU power usage in watts", gpu_samples("power"))
    out.family("nv_gpu_power_limit", "gauge", "GPU power limit in watts", gpu_samples("power_limit"))
    out.family("batch_router_gpu_temperature_celsius", "gauge", "GPU temperature", gpu_samples("temperature"))
    out.family("batch_router_gpu_sm_clock_mhz", "gauge", "GPU SM clock", gpu_samples("sm_clock"))
    out.family("batch_router_gpu_throttling", "gauge", "1 while clocks are held down or past the slowdown temperature",
               [("", gpu_labels(w, g), 1 if throttling(g) else 0) for w, g in gpus])  # fmt: skip
    out.family("batch_router_worker_in_flight_batches", "gauge", "Batches sent to the worker and not answered yet",
               [("", who(w), w["in_flight"]) for w in workers])  # fmt: skip
    out.family("batch_router_worker_weight", "gauge", "The worker's share of capacity as placement sees it (0-1)",
               [("", who(w), w["weight"]) for w in workers])  # fmt: skip
    out.family("batch_router_worker_responsive", "gauge", "1 unless the worker is presumed stuck",
               [("", who(w), 1 if w["responsive"] else 0) for w in workers])  # fmt: skip
    out.family("batch_router_worker_rows_total", "counter", "Rows the worker answered for this front end",
               [("", who(w), w["rows"]) for w in workers])  # fmt: skip
