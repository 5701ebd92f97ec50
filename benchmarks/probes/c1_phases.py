"""Where one request's time goes at concurrency 1, for one source tree or several side by
side: the router's own ``/metrics`` split (queue wait; transfer, the round trip to the
worker less its compute; compute; all means) beside the client's p50 and mean.

Comparing two trees (the code before and after a change) alternates them round by
round, each with its own fresh ``batch-router up`` started from that tree, so a drifting
VM drifts for both. The transfer phase is the router's path: HTTP excluded, Dask's hops
and our dispatch included.

    .venv/bin/python -m benchmarks.probes.c1_phases [--trees .,/tmp/old] [--rounds 2] [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from benchmarks.http_client import Connection
from benchmarks.servers import ROOT, spawn_router, stop

PHASES = ("request", "queue", "transfer", "compute")


def phase_sums(port: int) -> dict[str, tuple[float, float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for phase in PHASES:
        total = re.search(rf"^batch_router_{phase}_duration_seconds_sum\S* (\S+)", text, re.M)
        count = re.search(rf"^batch_router_{phase}_duration_seconds_count\S* (\S+)", text, re.M)
        out[phase] = (float(total.group(1)), float(count.group(1)))
    return out


async def send(port: int, n: int) -> list[float]:
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 224, 224],
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()  # fmt: skip
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    conn, body, latencies = Connection("127.0.0.1", port), head + x.tobytes(), []
    for _ in range(n):
        t = time.perf_counter()
        status, _, _ = await conn.request("POST", "/v2/models/resnet50/infer", headers, body)
        latencies.append(time.perf_counter() - t)
        if status != 200:
            raise SystemExit(f"HTTP {status}")
    conn.close()
    return latencies


def one_round(tree: Path, requests: int) -> dict:
    router = SimpleNamespace(model_path=None, model="resnet50", spawn_args="--workers 1 --threads 2")
    proc, url = spawn_router(router, tree)
    port = int(url.rsplit(":", 1)[1])
    try:
        asyncio.run(send(port, 30))  # warm-up
        before = phase_sums(port)
        latencies = asyncio.run(send(port, requests))
        after = phase_sums(port)
    finally:
        stop(proc)
    means = {p: 1e3 * (after[p][0] - before[p][0]) / max(1.0, after[p][1] - before[p][1]) for p in PHASES}
    return {"tree": str(tree), "client_p50_ms": 1e3 * statistics.median(latencies), "client_mean_ms": 1e3 * statistics.fmean(latencies),
            **{f"{p}_ms": v for p, v in means.items()}}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trees", default=str(ROOT), help="comma-separated source trees, measured in turn")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rows = []
    for r in range(args.rounds):
        for tree in [Path(t).resolve() for t in args.trees.split(",")]:
            row = {"round": r + 1, **one_round(tree, args.requests)}
            rows.append(row)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    for tree in dict.fromkeys(row["tree"] for row in rows):
        mine = [row for row in rows if row["tree"] == tree]
        print(tree, {k: round(statistics.median(row[k] for row in mine), 3) for k in mine[0] if k.endswith("_ms")})
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
