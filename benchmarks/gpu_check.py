"""The one prepared check for a GPU machine (a session gets ~15 minutes of device time).

It records which providers ONNX Runtime really uses, raw ONNX Runtime CUDA throughput on
ResNet-50 at batch 32 and 128, and throughput through the router (one CUDA worker) with
batches of 32 and 128 rows, side by side in one run; then, on the batch-32 router, the
c=1 latency target (router p50 minus raw ORT batch-1 p50, alternating windows). While the router runs it samples the
worker's NVML metrics from /v1/workers, idle and then under load (utilisation and power
must rise with load), scrapes ``/metrics`` halfway through the load, and checks that the
dashboard pages answer. Everything goes to ``--out`` (``$OUT`` on the device machine), as
JSON and text, plus the router logs.

    PYTHONPATH=/tmp/site:. python3 -m benchmarks.gpu_check --out "$OUT"
    .venv/bin/python -m benchmarks.gpu_check --device cpu --quick --out /tmp/gpu-check  # rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import dask.config
import numpy as np

from benchmarks.servers import ROOT, free_port, _wait_ready, stop
from core.config import cache_dir, parse


def raw_throughput(path: str, device: str, batch: int, seconds: float) -> dict:
    """Rows/s of session.run on numpy input, the way a worker runs a batch."""
    from worker_setup.session import ModelSession

    s = ModelSession.load(path, device=device)
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    s.run({"input": x})
    runs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s.run({"input": x})
        runs += 1
    elapsed = time.perf_counter() - t0
    return {"batch": batch, "img_per_s": round(runs * batch / elapsed, 1), "ms_per_batch": round(1e3 * elapsed / runs, 2),
            "providers": s.providers, "device": s.device, "cuda_fallback": s.cuda_fallback}


GPU_FIELDS = ("utilization_gpu", "utilization_memory", "memory_used", "temperature", "power", "sm_clock", "throttle_reasons")


def sample_gpu(url: str, phase: str, samples: list, stop_at: threading.Event, every: float = 0.5) -> None:
    """The worker's latest GPU sample as the front end sees it, every ``every`` seconds."""
    while not stop_at.is_set():
        try:
            for w in json.load(urllib.request.urlopen(url + "/v1/workers", timeout=5))["workers"]:
                g = w.get("gpu") or {}
                samples.append({"t": round(time.time(), 3), "phase": phase, "worker": w["name"], "source": g.get("source"),
                                "simulated": w.get("simulated"), **{k: g.get(k) for k in GPU_FIELDS}})
        except OSError:
            pass
        stop_at.wait(every)


def scrape_midway(url: str, path: Path, delay: float, found: dict) -> None:
    """``/metrics`` halfway through the load (GPU gauges are the latest sample, so
    under load is when they say something), and whether the dashboard pages answer."""
    time.sleep(delay)
    try:
        path.write_bytes(urllib.request.urlopen(url + "/metrics", timeout=10).read())
        pages = json.load(urllib.request.urlopen(url + "/v1/dashboard", timeout=10))["pages"]
        found.update({name: urllib.request.urlopen(page, timeout=10).status for name, page in pages.items()})
    except (OSError, ValueError, KeyError) as e:  # a failed scrape is recorded, never fatal
        found["error"] = f"{type(e).__name__}: {e}"


def gpu_rise(samples: list) -> dict:
    """Mean utilisation and power, idle vs under load."""
    out = {}
    for key in ("utilization_gpu", "power", "memory_used", "temperature", "sm_clock"):
        by = {ph: [s[key] for s in samples if s["phase"] == ph and s.get(key) is not None] for ph in ("idle", "load")}
        out[key] = {ph: (round(statistics.fmean(v), 1) if v else None) for ph, v in by.items()}
    return out


def latency_c1(url: str, seconds: str, rounds: int, out: Path) -> dict:
    """Issue 2's c=1 target where it means most: one client, one row, router p50 against
    raw ORT batch-1 p50 (CUDA when there is one), windows alternating."""
    result = out / "c1.json"
    subprocess.run([sys.executable, "-m", "benchmarks.loadtest", "--url", url, "--mode", "infer", "--concurrency", "1",
                    "--duration", seconds, "--rounds", str(rounds), "--baseline", "--baseline-batch-sizes", "1",
                    "--quiet", "--json", str(result)], cwd=ROOT, check=True)
    r = json.loads(result.read_text())
    return {"rounds_summary": r.get("rounds_summary"), "ratios": r.get("ratios"), "raw_providers": (r.get("raw_session") or {}).get("providers")}


def router_throughput(device: str, batch: int, seconds: str, out: Path, gpu_metrics: str = "auto", c1: tuple | None = None) -> dict:
    """One worker behind the router; clients send requests of up to 32 rows that the
    router batches up to ``batch`` rows. ``c1``: (seconds, rounds) of the c=1 check to
    run on this router afterwards."""
    port = free_port()
    log = open(out / f"router-b{batch}.log", "w")
    cmd = [sys.executable, "-m", "router_api.cli", "up", "--workers", "1", "--device", device,
           "--max-batch-size", str(batch), "--port", str(port), "--gpu-metrics", gpu_metrics,
           "--scheduler-port", str(free_port()), "--dashboard-port", str(free_port())]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, 300, "router")
        workers = json.load(urllib.request.urlopen(url + "/v1/workers"))["workers"]
        rows = min(32, batch)
        clients = max(2, 2 * batch // rows)
        result = out / f"router-b{batch}.json"
        samples: list = []
        idle = threading.Event()
        sample_gpu_thread = threading.Thread(target=sample_gpu, args=(url, "idle", samples, idle))
        sample_gpu_thread.start()
        time.sleep(3)
        idle.set()
        sample_gpu_thread.join()
        busy = threading.Event()
        sample_gpu_thread = threading.Thread(target=sample_gpu, args=(url, "load", samples, busy))
        sample_gpu_thread.start()
        pages: dict = {}
        seconds_s = float(seconds.rstrip("s"))
        scrape = threading.Thread(target=scrape_midway, args=(url, out / f"metrics-b{batch}.txt", 2 + seconds_s / 2, pages))
        scrape.start()
        try:
            subprocess.run([sys.executable, "-m", "benchmarks.loadtest", "--url", url, "--mode", "infer", "--batch-rows",
                            str(rows), "--concurrency", str(clients), "--duration", seconds, "--quiet",
                            "--json", str(result)], cwd=ROOT, check=True)
        finally:
            busy.set()
            sample_gpu_thread.join()
            scrape.join()
        router = json.loads(result.read_text())["router"]
        found = {"batch": batch, "clients": clients, "rows_per_request": rows, "workers": workers, "router": router,
                 "gpu_rise": gpu_rise(samples), "gpu_samples": samples, "dashboard_pages": pages}
        if c1:
            try:
                found["c1"] = latency_c1(url, *c1, out)
            except subprocess.CalledProcessError as e:  # recorded; the throughput figures stand
                found["c1"] = {"error": str(e)}
        return found
    finally:
        stop(proc)
        log.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check")))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="short windows and batch 4/8 (a CPU rehearsal)")
    p.add_argument("--gpu-metrics", default="auto", help="auto (NVML); 'simulated' only to rehearse on a CPU")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from scheduler_plugins.builtin_models import ensure_default_model

    import onnxruntime as ort

    batches, raw_s, load = ((4, 8), 3.0, "3s") if args.quick else ((32, 128), 10.0, "20s")
    c1 = ("2s", 2) if args.quick else ("5s", 3)
    report = {
        "ort_version": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "nvidia_smi": subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout if args.device == "cuda" else None,
        "cache_dir": str(cache_dir(parse(dask.config.get("batch-router", None)))),
    }
    path = str(ensure_default_model())
    report["raw"] = [raw_throughput(path, args.device, b, raw_s) for b in batches]
    print(json.dumps(report["raw"], indent=1), flush=True)
    report["through_router"] = [
        router_throughput(args.device, b, load, args.out, args.gpu_metrics, c1 if i == 0 else None) for i, b in enumerate(batches)
    ]
    for raw, routed in zip(report["raw"], report["through_router"]):
        img_s = routed["router"]["img_per_s"]
        routed["ratio_vs_raw"] = round(img_s / raw["img_per_s"], 3) if img_s else None
        print(f"batch {raw['batch']}: raw {raw['img_per_s']} img/s on {raw['providers'][0]}; "
              f"router {img_s} img/s; ratio {routed['ratio_vs_raw']}; GPU idle->load {routed['gpu_rise']}", flush=True)
    c1_found = report["through_router"][0].get("c1") or {}
    print(f"c=1: router p50 - raw batch-1 p50 = {(c1_found.get('ratios') or {}).get('latency_p50_delta_ms')} ms "
          f"(raw on {c1_found.get('raw_providers')}; target <= 2 ms)", flush=True)
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
