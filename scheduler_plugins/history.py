"""What the dashboard pages draw, kept in the scheduler: a bounded history of every
worker's GPU samples and of the front ends' statistics, plus the current state.

Pure logic with time passed in (the scheduler's wall clock, so both series share one
time axis). Each update is O(workers + histogram buckets), never O(requests): front
ends send cumulative counters and histograms, and rates and quantiles come from the
difference between two of their snapshots (snapshots.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from core.histogram import PHASES, quantile
from core.placement import throttling
from scheduler_plugins.snapshots import clean, interval

QUANTILES = (0.5, 0.95, 0.99)
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclass
class FrontEnd:
    last: dict  # its latest clean snapshot
    seen: float  # when it arrived
    interval: dict | None = None  # what changed between its last two snapshots


def gpu_point(state: dict, info: dict) -> dict:
    """One worker's GPU as the pages draw it. ``gpu`` is whether there is a sample to
    draw. A worker with a GPU source but no sample (sampler failing, no heartbeat yet)
    says why in ``missing``; one on CUDA with GPU metrics off is ``unmetered``; neither
    passes for CPU-only."""
    sample = state.get("gpu") or None
    if not sample:
        sampled = info.get("gpu") is not None  # the worker registered a GPU source
        on_gpu = info.get("device") == "cuda" or any(p in GPU_PROVIDERS for p in info.get("providers") or ())
        why = state.get("error") or "; ".join(state.get("errors") or ()) or "no GPU sample yet"
        return {"gpu": False, "simulated": bool(state.get("simulated")), "missing": why if sampled else None,
                "unmetered": on_gpu and not sampled}  # fmt: skip
    return {
        "gpu": True,
        "simulated": bool(state.get("simulated")) or sample.get("source") == "simulated",
        "utilization": sample.get("utilization_gpu"),
        "memory_used": sample.get("memory_used"),
        "memory_total": sample.get("memory_total"),
        "temperature": sample.get("temperature"),
        "power": sample.get("power"),
        "power_limit": sample.get("power_limit"),
        "sm_clock": sample.get("sm_clock"),
        "throttling": throttling(sample),
        "throttle_reasons": list(sample.get("throttle_reasons") or []),
    }


class History:
    def __init__(self, keep_s: float = 600.0, stale_after: float = 5.0, levels: int = 3, max_rows: int = 20_000) -> None:
        self.keep_s, self.stale_after = keep_s, stale_after
        self.levels = levels  # priority levels the front ends queue by, at least
        self.frontends: dict[str, FrontEnd] = {}
        self.gpu: deque[dict] = deque(maxlen=max_rows)  # {"seq", "time", "workers": {address: point}}
        self.queue: deque[dict] = deque(maxlen=max_rows)  # one aggregate row per front-end snapshot
        self.workers: dict[str, dict] = {}  # address -> {"info", "state", "placement"}: the latest tick
        self.seq = 0

    # -- input --------------------------------------------------------------------

    def add_workers(self, now: float, workers: dict[str, dict]) -> None:
        """The plugin's tick: ``{address: {"info": startup entry, "state": heartbeat
        metrics, "placement": {"weight", "in_flight"} as the plugin sees them}}``."""
        self.workers = workers
        self._forget_stale(now)
        self.seq += 1
        points = {a: {"name": w["info"].get("name", a), **gpu_point(w["state"], w["info"])} for a, w in workers.items()}
        self._append(self.gpu, {"seq": self.seq, "time": now, "workers": points})

    def add_frontend(self, key: str, snapshot: dict, now: float) -> None:
        """Raises ValueError, keeping nothing, for a snapshot not shaped like
        ``Telemetry.snapshot()``."""
        snap = clean(snapshot)
        fe = self.frontends.get(key)
        if fe is None:
            self.frontends[key] = FrontEnd(snap, now)
            return
        new = interval(snap, fe.last)
        fe.interval = new or fe.interval  # a repeated snapshot keeps its last rates for the others' rows
        fe.last, fe.seen = snap, now
        self._forget_stale(now)
        if new is not None:
            self._append(self.queue, self._aggregate(now))

    def _forget_stale(self, now: float) -> None:
        for key in [k for k, fe in self.frontends.items() if now - fe.seen > self.stale_after]:
            del self.frontends[key]

    def _append(self, series: deque[dict], row: dict) -> None:
        series.append(row)
        while series and series[0]["time"] < row["time"] - self.keep_s:
            series.popleft()

    def _aggregate(self, now: float) -> dict:
        """One row across every live front end: their latest intervals summed."""
        live = [fe.interval for fe in self.frontends.values() if fe.interval is not None]
        self.seq += 1
        row: dict = {
            "seq": self.seq,
            "time": now,
            "queue_levels": self.queue_levels(),
            "requests_per_s": sum(i["requests_per_s"] for i in live),
            "rows_per_s": sum(i["rows_per_s"] for i in live),
            "batches_per_s": sum(i["batches_per_s"] for i in live),
            "503_per_s": sum(i["status_per_s"].get("503", 0.0) for i in live),
            "504_per_s": sum(i["status_per_s"].get("504", 0.0) for i in live),
        }
        for phase in PHASES:
            counts = [sum(c) for c in zip(*(i["latency"][phase] for i in live))]
            for q in QUANTILES:
                value = quantile(counts, q)
                row[f"{phase}_p{round(q * 100)}_ms"] = None if value is None else 1e3 * value
        row["workers"] = self._worker_rows()
        return row

    def queue_levels(self) -> list[int]:
        """Queued requests per priority level, summed over front ends."""
        levels = [fe.last["levels"] for fe in self.frontends.values()]
        return [sum(lv[i] for lv in levels if i < len(lv)) for i in range(max(map(len, levels), default=0))]

    def _worker_rows(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for fe in self.frontends.values():
            for address, w in fe.last["workers"].items():
                o = out.setdefault(address, {"name": w["name"], "in_flight": 0, "weight": w["weight"], "rows_per_s": 0.0})
                o["in_flight"] += w["in_flight"]
                if fe.interval is not None:
                    o["rows_per_s"] += fe.interval["workers"].get(address, 0.0)
        return out

    # -- what the pages read --------------------------------------------------------

    @staticmethod
    def since(series: deque[dict], seq: int) -> list[dict]:
        """Rows newer than ``seq``, oldest first (a page streams only what it lacks)."""
        out = []
        for row in reversed(series):
            if row["seq"] <= seq:
                break
            out.append(row)
        out.reverse()
        return out

    def batch_sizes(self) -> dict[int, int]:
        """Batches run per size, since each live front end started."""
        out: dict[int, int] = {}
        for fe in self.frontends.values():
            for size, n in fe.last["batch_sizes"].items():
                out[size] = out.get(size, 0) + n
        return dict(sorted(out.items()))

    def summary(self, now: float) -> dict:
        """The overview's headline numbers; rates only while a front end reports."""
        last = self.queue[-1] if self.queue and now - self.queue[-1]["time"] <= self.stale_after else {}
        responses: dict[str, int] = {}
        for fe in self.frontends.values():
            for code, n in fe.last["responses"].items():
                responses[code] = responses.get(code, 0) + n
        return {
            "frontends": len(self.frontends),
            "queue": sum(self.queue_levels()),
            "rows_per_s": last.get("rows_per_s"),
            "p50_ms": last.get("request_p50_ms"),
            "p99_ms": last.get("request_p99_ms"),
            "served": sum(fe.last["success"] for fe in self.frontends.values()),
            "503": responses.get("503", 0),
            "504": responses.get("504", 0),
        }

    def models(self) -> list[dict]:
        """One row per model, summed over live front ends (each sees every model): its
        queue, batches in flight, requests served and failed, and the workers holding it."""
        out: dict[str, dict] = {}
        for fe in self.frontends.values():
            for name, m in fe.last.get("models", {}).items():
                row = out.setdefault(name, {"model": name, "queued": 0, "in_flight": 0, "success": 0, "failure": 0,
                                            "rows": 0, "batches": 0, "workers": 0, "state": "READY"})  # fmt: skip
                for k in ("queued", "in_flight", "success", "failure", "rows", "batches"):
                    row[k] += m[k]
                row["workers"] = max(row["workers"], m["workers"])
                if m["draining"]:
                    row["state"] = "UNLOADING"
        return [out[n] for n in sorted(out)]

    def cards(self) -> list[dict]:
        """One card per worker: what it is, how its GPU is, how placement treats it. The
        front ends' view of weight and in-flight work, else the scheduler plugin's."""
        seen: dict[str, dict] = {}
        for fe in self.frontends.values():
            for address, w in fe.last["workers"].items():
                s = seen.setdefault(address, {"in_flight": 0, "weight": w["weight"], "responsive": True})
                s["in_flight"] += w["in_flight"]
                s["responsive"] = s["responsive"] and w["responsive"]
        cards = []
        for address, w in sorted(self.workers.items(), key=lambda kv: str(kv[1]["info"].get("name", kv[0]))):
            info, state = w["info"], w["state"]
            point = gpu_point(state, info)
            placement = seen.get(address) or {**w.get("placement", {}), "responsive": True}
            cards.append(
                {
                    "address": address,
                    "name": info.get("name", address),
                    "device": info.get("device"),
                    "providers": list(info.get("providers") or []),
                    "gpu_name": (state.get("gpu") or {}).get("name"),
                    **point,
                    "weight": placement.get("weight"),
                    "in_flight": placement.get("in_flight"),
                    "health": health(info, state, point, placement["responsive"]),
                    "restarts": info.get("restarts") or 0,  # times `up` started it again after it died
                }
            )
        return cards


def health(info: dict, state: dict, point: dict, responsive: bool) -> str:
    """The worst thing about a worker, in a word or two."""
    if not responsive:
        return "unresponsive"
    if info.get("cuda_fallback"):
        return "CUDA fell back to CPU"
    if state.get("error") or point.get("missing"):
        return "metrics error" if state.get("error") else "no GPU sample"
    if point.get("throttling"):
        return "throttling"
    if state.get("errors"):
        return "errors"
    return "ok"
