"""Synthetic scheduler and front-end state for the dashboard's tests: what a front end
sends (router_api/telemetry.py) and what a worker's heartbeat carries."""

from __future__ import annotations

from core.histogram import BOUNDS, Histogram

LEVELS = 3


def latency(*values: float) -> dict:
    h = Histogram()
    for v in values:
        h.observe(v)
    return h.snapshot()


def frontend(t: float, success: int = 0, rows: int = 0, batches: int = 0, responses: dict | None = None,
             levels: list[int] | None = None, workers: dict | None = None, request_s: tuple = (),
             batch_sizes: dict | None = None, models: dict | None = None) -> dict:  # fmt: skip
    """A front end's cumulative snapshot at wall time ``t``."""
    empty = {"counts": [0] * (len(BOUNDS) + 1), "sum": 0.0}
    req = latency(*request_s) if request_s else empty
    return {
        "time": t,
        "clock": t,
        "model": "resnet50",
        "queue": {"levels": levels or [0] * LEVELS, "max_batch_size": 32},
        "success": success,
        "failure": 0,
        "rejected": {},
        "responses": {str(k): v for k, v in (responses or {}).items()},
        "rows": rows,
        "batches": batches,
        "batch_sizes": {str(k): v for k, v in (batch_sizes or {}).items()},
        "latency": {"request": req, "queue": req, "transfer": empty, "compute": empty},
        "workers": workers or {},
        "models": models or {},
    }


def fe_model(queued: int = 0, success: int = 0, workers: int = 1, draining: bool = False) -> dict:
    """One model's line in a front end's snapshot."""
    return {"queued": queued, "in_flight": 1, "success": success, "failure": 0, "rows": success, "batches": success,
            "workers": workers, "draining": draining}  # fmt: skip


def fe_worker(name: str, rows: int = 0, in_flight: int = 0, weight: float = 0.5, responsive: bool = True) -> dict:
    return {"name": name, "in_flight": in_flight, "weight": weight, "responsive": responsive, "rows": rows}


def gpu(util: int = 50, throttle: list[str] | None = None, source: str = "nvml", temp: int = 60) -> dict:
    return {
        "source": source, "name": "Tesla T4", "uuid": "GPU-1", "utilization_gpu": util, "utilization_memory": 10,
        "memory_used": 3 * 2**30, "memory_total": 15 * 2**30, "temperature": temp, "temperature_slowdown": 90,
        "power": 40.0, "power_limit": 70.0, "sm_clock": 1590, "sm_clock_max": 1590,
        "throttle_reasons": throttle or [], "ecc_errors": None, "sampled_at": 0.0,
    }  # fmt: skip


def worker(name: str, device: str = "cuda", sample: dict | None = None, simulated: bool = False, restarts: int = 0, **state) -> dict:
    """A worker as the plugin's tick sees it: startup info plus heartbeat metrics."""
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    metered = device == "cuda" or simulated  # the worker registered a GPU source
    return {
        "info": {"name": name, "device": device, "providers": providers, "cuda_fallback": False,
                 "gpu": {"source": "simulated" if simulated else "nvml"} if metered else None, "restarts": restarts},  # fmt: skip
        "state": {"gpu": sample, "simulated": simulated, "stats": {}, "errors": [], **state},
    }
