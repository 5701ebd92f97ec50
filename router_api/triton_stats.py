"""Triton's statistics extension (``/v2/models/<name>/stats``): cumulative request and
compute counters per model, counted as Triton counts them. The front end's latency
histograms and HTTP outcomes, which Triton has no place for, are ``telemetry.py``."""

from __future__ import annotations

import time
from collections import defaultdict

FIELDS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


class ModelStats:
    def __init__(self, name: str, version: str = "1") -> None:
        self.name, self.version = name, version
        self.durations = {f: [0, 0] for f in FIELDS}  # field -> [count, ns]
        self.batch = defaultdict(lambda: {f: [0, 0] for f in ("compute_input", "compute_infer", "compute_output")})
        self.inference_count = 0  # rows
        self.padded_count = 0  # rows of padding run to fill batches up to their bucket
        self.device_wait = [0, 0]  # [requests, ns] waiting on a worker for its device; not a Triton field
        self.execution_count = 0  # batches
        self.last_inference_ms = 0
        self.rejected = defaultdict(int)  # reason -> count (queue_full, timeout, cancelled, unavailable, invalid: a 4xx from the worker)

    def _add(self, field: str, ns: int, n: int = 1) -> None:
        d = self.durations[field]
        d[0] += n
        d[1] += ns

    def request_done(self, ok: bool, total_ns: int, queue_ns: int) -> None:
        self._add("success" if ok else "fail", total_ns)
        if ok:
            self._add("queue", queue_ns)

    def batch_done(
        self, size: int, rows: int, requests: int, input_ns: int, infer_ns: int, output_ns: int, padded: int = 0,
        wait_ns: int = 0,
    ) -> None:
        """One batch of ``size`` rows run, serving ``requests`` requests (``rows`` rows)
        successfully, plus ``padded`` rows of padding. As in Triton, each request's
        compute took the whole batch's time; ``batch_stats`` counts the batch once, by
        the size that ran: its bucket."""
        self.inference_count += rows
        self.padded_count += padded
        self.device_wait[0] += requests
        self.device_wait[1] += wait_ns * requests
        size += padded
        self.execution_count += 1
        self.last_inference_ms = int(time.time() * 1000)
        for field, ns in (("compute_input", input_ns), ("compute_infer", infer_ns), ("compute_output", output_ns)):
            self._add(field, ns * requests, requests)
            b = self.batch[size][field]
            b[0] += 1
            b[1] += ns

    @classmethod
    def combined(cls, parts: list[ModelStats]) -> ModelStats:
        """Every model name's counters summed, under the first one's name: what the
        dashboard shows for the service as a whole."""
        total = cls(parts[0].name, parts[0].version)
        for p in parts:
            for f, (n, t) in p.durations.items():
                total._add(f, t, n)
            for size, fields in p.batch.items():
                for f, (n, t) in fields.items():
                    total.batch[size][f][0] += n
                    total.batch[size][f][1] += t
            for reason, n in p.rejected.items():
                total.rejected[reason] += n
            total.inference_count += p.inference_count
            total.padded_count += p.padded_count
            total.execution_count += p.execution_count
            total.device_wait = [a + b for a, b in zip(total.device_wait, p.device_wait)]
            total.last_inference_ms = max(total.last_inference_ms, p.last_inference_ms)
        return total

    def as_triton(self) -> dict:
        def stat(d):
            return {"count": d[0], "ns": d[1]}

        return {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "padded_count": self.padded_count,  # not Triton's: rows of padding, beside inference_count's real rows
            "inference_stats": {f: stat(d) for f, d in self.durations.items()},
            "batch_stats": [
                {"batch_size": size, **{f: stat(d) for f, d in fields.items()}}
                for size, fields in sorted(self.batch.items())
            ],
            "rejected": dict(self.rejected),
        }


class StatsByModel(dict):
    """Triton's statistics for each model name the service answers to (``core.entries``):
    the model's own, and its ``-uint8`` twin's. ``main`` is the model's own."""

    def __init__(self, model: dict) -> None:
        names = [model["name"]] + ([model["uint8"]["name"]] if model.get("uint8") else [])
        super().__init__({name: ModelStats(name) for name in names})
        self.main: ModelStats = self[model["name"]]

    def of(self, name: str) -> ModelStats:
        """The statistics of a model name ("" or unknown: the model's own)."""
        return self.get(name, self.main)

    def batch_done(self, served: list, t) -> None:
        """One batch's counts (``t``: its Timings), under the name each request it served
        came in for: a batch may carry both."""
        first = self.of(served[0].model)
        if all(self.of(r.model) is first for r in served):  # the usual case: one name
            parts = [(first, served)]
        else:
            parts = [(s, [r for r in served if self.of(r.model) is s]) for s in {self.of(r.model): None for r in served}]
        for stats, mine in parts:
            stats.batch_done(t.rows, sum(r.rows for r in mine), len(mine), t.input_ns, t.infer_ns, t.output_ns, t.padded, t.wait_ns)
