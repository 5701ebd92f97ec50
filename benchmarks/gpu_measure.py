"""What ``gpu_check`` measures besides load: raw ONNX Runtime with the router's own
session options, the ``/metrics`` split of a request's time, GPU samples from
``/v1/workers``, and fp16's accuracy against fp32."""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
import urllib.request
from dataclasses import replace

import numpy as np

from core.config import Settings


def open_session(path: str, device: str, settings: Settings, graphs: bool, tf32: bool | None = None):
    """A session exactly as a router worker opens one: same provider options, IOBinding,
    one device thread on CUDA."""
    from worker_setup.session import ModelSession

    cuda = replace(settings.worker.cuda, graphs=graphs)
    if tf32 is not None:
        cuda = replace(cuda, use_tf32=tf32)
    return ModelSession.load(path, device=device, cuda=cuda, io_binding=settings.worker.io_binding)


def raw_throughput(session, batch: int, seconds: float) -> dict:
    """Rows/s of back-to-back batches from host memory (copied in, outputs read back),
    as a worker runs them, after warming this batch size."""
    session.warm_up((batch,), cpu_max_rows=batch)
    name = session.inputs[0].name
    x = np.random.default_rng(0).standard_normal((batch,) + tuple(session.inputs[0].shape[1:])).astype(session.inputs[0].dtype)
    lat, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds or len(lat) < 3:
        t = time.perf_counter()
        session.run({name: x})
        lat.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t0
    return {"batch": batch, "img_per_s": round(len(lat) * batch / elapsed, 1), "ms_p50": round(1e3 * statistics.median(lat), 3),
            "runs": len(lat), "providers": session.providers, "device": session.device, "cuda_fallback": session.cuda_fallback,
            "options": dict(session.options), "cuda_graphs": session.cuda_graphs}  # fmt: skip


def fp16_accuracy(fp32, fp16, n: int = 16) -> dict:
    """fp16 against fp32 on the same fixed generated images: max |Δlogit|, top-1 and top-5
    agreement. Reported, not assumed."""
    from worker_setup.precision import compare_precision, reference_images

    images = reference_images(tuple(fp32.inputs[0].shape[1:]), n)
    name = fp32.inputs[0].name

    def runner(session):
        return lambda x: np.concatenate([session.run({name: x[i : i + 1]})[0] for i in range(len(x))])

    return compare_precision(runner(fp32), runner(fp16), images)


_SAMPLE = re.compile(r'^(nv_inference_\w+|batch_router_\w+)\{[^}]*\} ([0-9.eE+-]+)$')


def scrape(url: str) -> dict[str, float]:
    """Triton's cumulative counters, and ours, from ``/metrics``."""
    return counters(urllib.request.urlopen(url + "/metrics", timeout=10).read().decode())


def counters(text: str) -> dict[str, float]:
    """Every ``nv_inference_*`` and ``batch_router_*`` sample of a scrape, summed over
    labels (failure reasons left out), by the name the text gives it."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and 'reason="' not in line:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def split(before: dict, after: dict) -> dict:
    """Where a request's time went, per successful request, between two scrapes: queued
    in the front end, waiting on the worker for its device (another batch on it),
    compute on the worker (decode/stack, run, cut), and everything else (HTTP, Dask's
    hops, moving the tensors): transfer."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    n = d.get("nv_inference_request_success", 0.0)
    if not n:
        return {"requests": 0}
    ms = {k: d.get(f"nv_inference_{k}_duration_us", 0.0) / n / 1e3 for k in ("request", "queue", "compute_input", "compute_infer", "compute_output")}
    compute = ms["compute_input"] + ms["compute_infer"] + ms["compute_output"]
    wait = d.get("batch_router_device_wait_duration_us_total", 0.0) / n / 1e3
    rows, padded = d.get("nv_inference_count", 0.0), d.get("batch_router_padded_rows_total", 0.0)
    return {"requests": int(n), "request_ms": round(ms["request"], 3), "queue_ms": round(ms["queue"], 3),
            "device_wait_ms": round(wait, 3), "compute_ms": round(compute, 3), "compute_infer_ms": round(ms["compute_infer"], 3),
            "transfer_ms": round(ms["request"] - ms["queue"] - wait - compute, 3),
            "padded_fraction": round(padded / (rows + padded), 4) if rows + padded else None}  # fmt: skip


def model_stats(url: str) -> dict:
    """Triton's statistics of every model name."""
    return json.load(urllib.request.urlopen(url + "/v2/models/stats", timeout=10))


def input_ms_per_row(before: dict, after: dict) -> float | None:
    """Milliseconds the workers spent decoding and stacking per row between two
    ``model_stats`` (each batch's compute_input once, over the rows it ran): for
    /v1/classify, the decode time per image, the pool's threads working in parallel."""

    def totals(stats: dict) -> tuple[int, int]:
        ns = sum(b["compute_input"]["ns"] for m in stats["model_stats"] for b in m["batch_stats"])
        return ns, sum(m["inference_count"] for m in stats["model_stats"])

    (ns0, rows0), (ns1, rows1) = totals(before), totals(after)
    return round((ns1 - ns0) / (rows1 - rows0) / 1e6, 3) if rows1 > rows0 else None


GPU_FIELDS = ("utilization_gpu", "memory_used", "power", "sm_clock", "temperature", "throttle_reasons")


class GpuSampler(threading.Thread):
    """The workers' latest GPU samples as the front end serves them, twice a second."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.samples, self.phase, self._done = url, [], "idle", threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                for w in json.load(urllib.request.urlopen(self.url + "/v1/workers", timeout=5))["workers"]:
                    g = w.get("gpu") or {}
                    self.samples.append({"phase": self.phase, "worker": w["name"], "source": g.get("source"),
                                         **{k: g.get(k) for k in GPU_FIELDS}})  # fmt: skip
            except OSError:
                pass
            self._done.wait(0.5)

    def stop(self) -> dict:
        self._done.set()
        self.join()
        out = {}
        for key in ("utilization_gpu", "power", "memory_used"):
            by = {ph: [s[key] for s in self.samples if s["phase"] == ph and s.get(key) is not None] for ph in ("idle", "load")}
            out[key] = {ph: (round(statistics.fmean(v), 1) if v else None) for ph, v in by.items()}
        out["source"] = sorted({str(s["source"]) for s in self.samples})
        return out
