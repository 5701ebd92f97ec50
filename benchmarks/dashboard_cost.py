"""What the dashboard costs the scheduler's event loop, per update, as workers and
requests grow: the claim is O(workers), never O(requests).

    python -m benchmarks.dashboard_cost [--workers 2,8,32,128] [--json PATH]

For each worker count it times, in this one process: the plugin's tick (every worker's
heartbeat metrics into the history), one front-end snapshot taken and taken in, and one
refresh of each page's components, with the front end having served 100 requests and
then 100,000 (the baseline column). It also times the per-request recording.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

from benchmarks.report import machine
from core.worker_view import WorkerView
from router_api.batching import BatchQueue
from router_api.telemetry import Telemetry
from router_api.triton_stats import ModelStats
from scheduler_plugins.dashboard.batch_queues import BatchQueues
from scheduler_plugins.dashboard.gpu_metrics import GpuMetrics
from scheduler_plugins.dashboard.overview import Overview
from scheduler_plugins.history import History

GPU = {"source": "nvml", "name": "T4", "uuid": "GPU-x", "utilization_gpu": 50, "memory_used": 2**31, "memory_total": 2**34,
       "temperature": 60, "temperature_slowdown": 90, "power": 40.0, "power_limit": 70.0, "sm_clock": 1590,
       "throttle_reasons": []}  # fmt: skip


def front_end(n_workers: int, requests: int) -> tuple[SimpleNamespace, Telemetry]:
    views = {f"tcp://w{i}": WorkerView(f"tcp://w{i}", f"w{i}", rows=i) for i in range(n_workers)}
    stats = ModelStats("resnet50")
    d = SimpleNamespace(stats=stats, entry_stats={stats.name: stats}, queue=BatchQueue(32, priority_levels=3), views=views, hedges=0,
                        weights=lambda now=0.0: {a: 1 / n_workers for a in views})  # fmt: skip
    t = Telemetry()
    for i in range(requests):
        t.request_served(0.001 * (i % 300), 0.0005, 0.002, 0.001)
        if i % 8 == 0:
            d.stats.batch_done(8, 8, 8, 1, 1, 1)
        d.stats.request_done(True, 1, 1)
    return d, t


def per_call_us(fn, repeat: int) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return 1e6 * (time.perf_counter() - t0) / repeat


def measure(n_workers: int, requests: int, repeat: int) -> dict:
    d, t = front_end(n_workers, requests)
    h = History(keep_s=1e9)
    workers = {a: {"info": {"name": v.name, "device": "cuda", "providers": ["CUDAExecutionProvider"]},
                   "state": {"gpu": GPU, "simulated": False, "errors": []}} for a, v in d.views.items()}  # fmt: skip
    clock = iter(range(10**9))

    def tick() -> None:
        h.add_workers(float(next(clock)), workers)

    def report() -> None:
        snap = t.snapshot(d)
        snap["time"] = float(next(clock))
        snap["clock"] = snap["time"]
        h.add_frontend("fe", snap, snap["time"])

    out = {"workers": n_workers, "requests": requests,
           "tick_us": per_call_us(tick, repeat), "frontend_update_us": per_call_us(report, repeat)}  # fmt: skip
    for name, cls in (("overview", Overview), ("gpu_metrics", GpuMetrics), ("batch_queues", BatchQueues)):
        page = cls(h)
        page.update()  # the first one draws the whole history; a refresh draws what is new
        spent, n = 0.0, max(5, repeat // 10)
        for _ in range(n):
            tick()
            report()
            t0 = time.perf_counter()
            page.update()
            spent += time.perf_counter() - t0
        out[f"{name}_refresh_us"] = 1e6 * spent / n
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dashboard_cost", description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="2,8,32,128")
    p.add_argument("--repeat", type=int, default=200)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    t = Telemetry()
    record_ns = 1e3 * per_call_us(lambda: t.request_served(0.01, 0.001, 0.005, 0.004), 100_000)
    print(f"per request, recorded on the front end's loop: {record_ns:.0f} ns")
    rows = []
    header = f"{'workers':>7} {'requests':>9} {'tick µs':>8} {'front-end µs':>12} {'overview µs':>11} {'gpu page µs':>11} {'queues µs':>9}"
    print(header)
    for n in (int(x) for x in args.workers.split(",")):
        for requests in (100, 100_000):
            r = measure(n, requests, args.repeat)
            rows.append(r)
            print(f"{n:>7} {requests:>9} {r['tick_us']:>8.1f} {r['frontend_update_us']:>12.1f} {r['overview_refresh_us']:>11.1f} "
                  f"{r['gpu_metrics_refresh_us']:>11.1f} {r['batch_queues_refresh_us']:>9.1f}", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "per_request_ns": record_ns, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
