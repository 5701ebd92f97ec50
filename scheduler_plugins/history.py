"""What the dashboard pages draw, kept in the scheduler: a bounded history of every
worker's GPU samples and of the front ends' statistics, plus the current state.

Pure logic with time passed in. Each update is O(workers + histogram buckets), never
O(requests): the front ends send cumulative counters and histograms
(router_api/telemetry.py), and rates and quantiles come from the difference between two
of their snapshots.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from router_api.telemetry import BOUNDS, PHASES, difference, quantile
from scheduler_plugins.policies import throttling

QUANTILES = (0.5, 0.95, 0.99)
STALE_AFTER = 5.0  # seconds without a snapshot: that front end is gone


@dataclass
class FrontEnd:
    last: dict  # its latest cumulative snapshot
    seen: float  # monotonic time it arrived
    interval: dict | None = None  # what changed between its last two snapshots


def _delta(new: dict, old: dict, key: str) -> int:
    n, o = int(new.get(key, 0)), int(old.get(key, 0))
    return n - o if n >= o else n


def interval(new: dict, old: dict) -> dict | None:
    """Rates and latency counts between two snapshots of one front end."""
    dt = new["time"] - old["time"]
    if dt <= 0:
        return None
    requests = _delta(new, old, "success") + _delta(new, old, "failure")
    codes = set(new["responses"]) | set(old["responses"])
    workers = {}
    for address, w in new["workers"].items():
        before = old["workers"].get(address, {})
        workers[address] = {"rows_per_s": _delta(w, before, "rows") / dt}
    return {
        "dt": dt,
        "requests_per_s": requests / dt,
        "rows_per_s": _delta(new, old, "rows") / dt,
        "batches_per_s": _delta(new, old, "batches") / dt,
        "status_per_s": {c: _delta(new["responses"], old["responses"], c) / dt for c in codes},
        "latency": {
            p: difference(new["latency"][p]["counts"], old["latency"][p]["counts"]) for p in PHASES
        },
        "workers": workers,
    }


WORKER_KEYS = {"name", "in_flight", "weight", "responsive", "rows"}


def check(snapshot: dict) -> None:
    """The fields the history reads, with the types it reads them as."""
    try:
        ok = (
            isinstance(snapshot["time"], (int, float))
            and all(isinstance(n, int) for n in snapshot["queue"]["levels"])
            and isinstance(snapshot["queue"]["rows"], int)
            and all(isinstance(snapshot[k], int) for k in ("success", "failure", "rows", "batches"))
            and all(isinstance(n, int) for n in snapshot["responses"].values())
            and all(int(k) >= 0 and isinstance(n, int) for k, n in snapshot["batch_sizes"].items())
            and all(len(snapshot["latency"][p]["counts"]) == len(BOUNDS) + 1 for p in PHASES)
            and all(WORKER_KEYS <= set(w) for w in snapshot["workers"].values())
        )
    except (KeyError, TypeError, AttributeError, ValueError):
        ok = False
    if not ok:
        raise ValueError("not a batch-router front-end snapshot")


def gpu_point(state: dict) -> dict:
    """One worker's sample as the GPU page draws it; ``gpu: False`` for CPU-only."""
    gpu = state.get("gpu") or None
    if not gpu:
        return {"gpu": False, "simulated": bool(state.get("simulated"))}
    return {
        "gpu": True,
        "simulated": bool(state.get("simulated")) or gpu.get("source") == "simulated",
        "utilization": gpu.get("utilization_gpu"),
        "memory_used": gpu.get("memory_used"),
        "memory_total": gpu.get("memory_total"),
        "temperature": gpu.get("temperature"),
        "power": gpu.get("power"),
        "power_limit": gpu.get("power_limit"),
        "sm_clock": gpu.get("sm_clock"),
        "throttling": throttling(gpu),
        "throttle_reasons": list(gpu.get("throttle_reasons") or []),
    }


class History:
    def __init__(self, keep: int = 1200) -> None:
        self.frontends: dict[str, FrontEnd] = {}
        self.gpu: deque[dict] = deque(maxlen=keep)  # {"seq", "time", "workers": {address: gpu_point}}
        self.queue: deque[dict] = deque(maxlen=keep)  # one aggregate row per front-end snapshot
        self.workers: dict[str, dict] = {}  # address -> {"info", "state"}: the latest tick
        self.seq = 0

    # -- input --------------------------------------------------------------------

    def add_workers(self, wall: float, workers: dict[str, dict]) -> None:
        """The plugin's tick: ``{address: {"info": startup entry, "state": metrics}}``."""
        self.workers = workers
        self.seq += 1
        points = {a: {"name": w["info"].get("name", a), **gpu_point(w["state"])} for a, w in workers.items()}
        self.gpu.append({"seq": self.seq, "time": wall, "workers": points})

    def add_frontend(self, key: str, snapshot: dict, now: float) -> None:
        """Raises ValueError, keeping nothing, for a snapshot not shaped like
        ``Telemetry.snapshot()``: one bad sender must not break the pages for all."""
        check(snapshot)
        fe = self.frontends.get(key)
        if fe is None:
            self.frontends[key] = FrontEnd(snapshot, now)
        else:
            fe.interval = interval(snapshot, fe.last) or fe.interval
            fe.last, fe.seen = snapshot, now
        self._forget_stale(now)
        row = self._aggregate(snapshot["time"])
        if row is not None:
            self.queue.append(row)

    def _forget_stale(self, now: float) -> None:
        for key in [k for k, fe in self.frontends.items() if now - fe.seen > STALE_AFTER]:
            del self.frontends[key]

    def _aggregate(self, wall: float) -> dict | None:
        """One row across every live front end: their latest intervals summed."""
        live = [fe for fe in self.frontends.values() if fe.interval is not None]
        if not live:
            return None
        self.seq += 1
        levels = max(len(fe.last["queue"]["levels"]) for fe in self.frontends.values())
        queue = [sum(fe.last["queue"]["levels"][i] for fe in self.frontends.values() if i < len(fe.last["queue"]["levels"])) for i in range(levels)]
        row: dict = {
            "seq": self.seq,
            "time": wall,
            "queue_levels": queue,
            "queue_rows": sum(fe.last["queue"]["rows"] for fe in self.frontends.values()),
            "requests_per_s": sum(fe.interval["requests_per_s"] for fe in live),
            "rows_per_s": sum(fe.interval["rows_per_s"] for fe in live),
            "batches_per_s": sum(fe.interval["batches_per_s"] for fe in live),
            "503_per_s": sum(fe.interval["status_per_s"].get("503", 0.0) for fe in live),
            "504_per_s": sum(fe.interval["status_per_s"].get("504", 0.0) for fe in live),
        }
        for phase in PHASES:
            counts = [sum(c) for c in zip(*(fe.interval["latency"][phase] for fe in live))]
            for q in QUANTILES:
                value = quantile(counts, q)
                row[f"{phase}_p{round(q * 100)}_ms"] = None if value is None else 1e3 * value
        row["workers"] = self._worker_rows(live)
        return row

    def _worker_rows(self, live: list[FrontEnd]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for fe in self.frontends.values():
            for address, w in fe.last["workers"].items():
                o = out.setdefault(address, {"name": w["name"], "in_flight": 0, "weight": w["weight"], "rows_per_s": 0.0})
                o["in_flight"] += w["in_flight"]
        for fe in live:
            for address, w in fe.interval["workers"].items():
                if address in out:
                    out[address]["rows_per_s"] += w["rows_per_s"]
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
                out[int(size)] = out.get(int(size), 0) + int(n)
        return dict(sorted(out.items()))

    def summary(self) -> dict:
        """The overview's headline numbers."""
        last = self.queue[-1] if self.queue else {}
        responses: dict[str, int] = {}
        for fe in self.frontends.values():
            for code, n in fe.last["responses"].items():
                responses[code] = responses.get(code, 0) + int(n)
        return {
            "frontends": len(self.frontends),
            "queue": sum(sum(fe.last["queue"]["levels"]) for fe in self.frontends.values()),
            "rows_per_s": last.get("rows_per_s"),
            "p50_ms": last.get("request_p50_ms"),
            "p99_ms": last.get("request_p99_ms"),
            "served": sum(int(fe.last["success"]) for fe in self.frontends.values()),
            "503": responses.get("503", 0),
            "504": responses.get("504", 0),
        }

    def cards(self) -> list[dict]:
        """One card per worker: what it is, how its GPU is, how placement treats it."""
        seen: dict[str, dict] = {}
        for fe in self.frontends.values():
            for address, w in fe.last["workers"].items():
                s = seen.setdefault(address, {"in_flight": 0, "weight": w["weight"], "responsive": True})
                s["in_flight"] += w["in_flight"]
                s["responsive"] = s["responsive"] and w["responsive"]
        cards = []
        for address, w in sorted(self.workers.items(), key=lambda kv: kv[1]["info"].get("name", kv[0])):
            info, state = w["info"], w["state"]
            point = gpu_point(state)
            fe = seen.get(address, {})
            cards.append(
                {
                    "address": address,
                    "name": info.get("name", address),
                    "device": info.get("device"),
                    "providers": list(info.get("providers") or []),
                    "gpu_name": (state.get("gpu") or {}).get("name"),
                    **point,
                    "weight": fe.get("weight"),
                    "in_flight": fe.get("in_flight"),
                    "health": health(info, state, point, fe.get("responsive", True)),
                }
            )
        return cards


def health(info: dict, state: dict, point: dict, responsive: bool) -> str:
    """The worst thing about a worker, in a word or two."""
    if not responsive:
        return "unresponsive"
    if info.get("cuda_fallback"):
        return "CUDA fell back to CPU"
    if state.get("error"):
        return "metrics error"
    if point.get("throttling"):
        return "throttling"
    if state.get("errors"):
        return "errors"
    return "ok"
