"""How long a full garbage collection stops each of the router's processes, with the
startup heap frozen (as shipped, core/heap.py) and without, side by side.

Spawns `batch-router up`, puts load on it, then, in every process (the front end with
its scheduler, each worker), times ``gc.collect()`` as it is and again with the heap
unfrozen, then freezes it back. A full collection runs on the event loop holding the
GIL, so its length is how long every request in that process waits when one happens.

    .venv/bin/python -m benchmarks.probes.gc_pause [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.servers import ROOT, spawn_router, spawned_flag, stop


def collect_both_ways() -> dict:
    """Runs inside the measured process (on its event loop, like a real collection)."""
    import gc
    import time

    frozen = gc.get_freeze_count()
    t = time.perf_counter()
    gc.collect()
    as_shipped = time.perf_counter() - t
    gc.unfreeze()
    tracked = len(gc.get_objects())
    t = time.perf_counter()
    gc.collect()
    unfrozen = time.perf_counter() - t
    gc.freeze()
    return {"frozen_objects": frozen, "tracked_objects": tracked, "as_shipped_ms": 1e3 * as_shipped, "unfrozen_ms": 1e3 * unfrozen}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="load window + measurement, this many times")
    p.add_argument("--load", default="5s", help="load window before each measurement")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    from distributed import Client

    router = argparse.Namespace(model_path=None, model="resnet50", spawn_args="--workers 2")
    proc, url = spawn_router(router)
    rows: dict[str, list[dict]] = {}
    try:
        with Client(f"tcp://127.0.0.1:{spawned_flag(proc, '--scheduler-port')}", timeout=30) as client:
            for r in range(args.rounds):
                subprocess.run([sys.executable, "-m", "benchmarks.loadtest", "--url", url, "--mode", "infer",
                                "--concurrency", "16", "--duration", args.load, "--quiet"], cwd=ROOT, check=True,
                               stdout=subprocess.DEVNULL)
                measured = {"front end + scheduler": client.run_on_scheduler(collect_both_ways)}
                for i, (_, m) in enumerate(sorted(client.run(collect_both_ways).items())):
                    measured[f"worker {i}"] = m
                for name, m in measured.items():
                    rows.setdefault(name, []).append(m)
                    print(f"round {r + 1}: {name:22s} full collection {m['as_shipped_ms']:7.1f} ms frozen (as shipped), "
                          f"{m['unfrozen_ms']:7.1f} ms unfrozen ({m['frozen_objects']} frozen, {m['tracked_objects']} tracked)")
    finally:
        stop(proc)
    summary = {
        name: {
            "as_shipped_ms": statistics.median(m["as_shipped_ms"] for m in ms),
            "unfrozen_ms": statistics.median(m["unfrozen_ms"] for m in ms),
            "tracked_objects": statistics.median(m["tracked_objects"] for m in ms),
        }
        for name, ms in rows.items()
    }
    print(f"medians over {args.rounds} rounds:")
    for name, s in summary.items():
        print(f"  {name:22s} {s['as_shipped_ms']:7.1f} ms frozen vs {s['unfrozen_ms']:7.1f} ms unfrozen "
              f"({s['unfrozen_ms'] / max(s['as_shipped_ms'], 1e-3):.0f}x)")
    if args.json:
        meta = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
        args.json.write_text(json.dumps({"meta": meta, "summary": summary, "rounds": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
