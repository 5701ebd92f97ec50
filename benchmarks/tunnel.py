"""Tunnel benchmark: the same worker near and far, throughput and bytes on the link.

    python -m benchmarks.tunnel [--rtt-ms 0,150] [--batch-time 50ms] [--max-batch-size 8]
        [--concurrency 64] [--duration 20s] [--json benchmarks/results/tunnel.json]

For each round-trip time, one fresh deployment as a user would run it on a laptop: a
scheduler with mutual TLS and a public address, a bore-like relay in front of it adding
RTT/2 each way (benchmarks/relay.py; the kernel here has no netem), one worker joined
with the JOIN_TOKEN through the relay, and the front end (`batch-router serve`) on the
scheduler's side. Each batch takes a fixed time on the worker (`worker.batch-time`, a
device of known speed), so the only thing that changes between runs is the link.

Printed per RTT: throughput, p50/p99, the worker's window as the front end grew it, and
the bytes that crossed the relay per image, each way, next to the JPEG's own size.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from benchmarks.http_client import Connection
from benchmarks.httpload import closed_loop, summarize
from benchmarks.loadtest import parse_duration
from benchmarks.payloads import make_jpeg
from benchmarks.report import machine, write_json
from benchmarks.servers import ROOT, free_port, stop
from benchmarks.windows import get_json

RESULTS = Path(__file__).resolve().parent / "results"


def _launch(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, **env},
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(pattern: str, log: Path, proc: subprocess.Popen, timeout: float = 120) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if m := re.search(pattern, log.read_text(), re.M):
            return m
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[2:4]} exited early; see {log}")
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {pattern!r} in {log}")


def relay_bytes(relay: subprocess.Popen, log: Path) -> tuple[int, int]:
    """(to the scheduler, from the scheduler) so far, as the relay counts them."""
    seen = len(re.findall(r"^bytes ", log.read_text(), re.M))
    relay.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = re.findall(r"^bytes to-local=(\d+) from-local=(\d+)$", log.read_text(), re.M)
        if len(found) > seen:
            return int(found[-1][0]), int(found[-1][1])
        time.sleep(0.05)
    raise SystemExit("the relay did not report its byte counts")


def request_for(mode: str, jpeg: bytes) -> tuple[str, dict, bytes]:
    """classify: the JPEG as sent. infer: the float32 tensor made from that JPEG (602 KB,
    what a client that preprocesses itself sends), KServe binary."""
    if mode == "classify":
        return "/v1/classify", {"Content-Type": "image/jpeg"}, jpeg
    import json

    import numpy as np

    from worker_setup.preprocess import ImageLayout, image_to_row

    x = image_to_row(jpeg, ImageLayout())[None].astype(np.float32)
    header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    return (f"/v2/models/{MODEL_NAME}/infer",
            {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
            header + x.tobytes())


MODEL_NAME = "trivial"


def run_setting(rtt_ms: float, args: argparse.Namespace, jpeg: bytes, work: Path) -> dict:
    sport, dport, hport = free_port(), free_port(), free_port()
    env = {"DASK_BATCH_ROUTER__TLS__DIR": str(work / f"tls-{rtt_ms:g}")}
    logs = {k: work / f"{k}-{rtt_ms:g}ms.log" for k in ("relay", "scheduler", "worker", "serve")}
    procs: list[subprocess.Popen] = []
    try:
        relay = _launch(["-m", "benchmarks.relay", "--to", f"127.0.0.1:{sport}",
                         "--delay-ms", str(rtt_ms / 2)], logs["relay"], {})
        procs.append(relay)
        rport = _wait_for(r"listening at 127\.0\.0\.1:(\d+)", logs["relay"], relay).group(1)
        sched = _launch(["-m", "router_api.cli", "scheduler", "--port", str(sport), "--dashboard-port",
                         str(dport), "--public-address", f"127.0.0.1:{rport}", "--model", str(args.model),
                         "--model-name", MODEL_NAME],
                        logs["scheduler"], env)
        procs.append(sched)
        token = _wait_for(r"^JOIN_TOKEN=(\S+)$", logs["scheduler"], sched).group(1)
        worker_env = {"DASK_BATCH_ROUTER__WORKER__BATCH_TIME": args.batch_time}
        procs.append(_launch(["-m", "router_api.cli", "worker", "--join", token, "--name", "far",
                              "--threads", "1"], logs["worker"], worker_env))
        # The relay stands for distance: a worker that far is on another host, where the
        # direct lane never applies, so the front end must not take it to this one.
        serve = _launch(["-m", "router_api.cli", "serve", "--scheduler", f"tls://127.0.0.1:{sport}",
                         "--port", str(hport), "--grpc-port", "0", "--max-batch-size", str(args.max_batch_size)],
                        logs["serve"], {**env, "DASK_BATCH_ROUTER__DIRECT_LANE": "off"})
        procs.append(serve)
        deadline = time.monotonic() + 180
        while not (asyncio.run(get_json("127.0.0.1", hport, "/v1/workers")) or {}).get("workers"):
            if time.monotonic() > deadline or serve.poll() is not None:
                raise SystemExit(f"the worker did not join through the relay; see {work}")
            time.sleep(0.5)

        path, headers, body = request_for(args.mode, jpeg)

        async def send(conn: Connection):
            return await conn.request("POST", path, headers, body)

        # Warm-up: the front end measures the round trip and grows the window.
        asyncio.run(closed_loop("127.0.0.1", hport, send, args.concurrency, 0.0, args.warmup, progress=False))
        w0 = asyncio.run(get_json("127.0.0.1", hport, "/v1/workers"))["workers"][0]
        up0, down0 = relay_bytes(relay, logs["relay"])
        rec = asyncio.run(closed_loop("127.0.0.1", hport, send, args.concurrency, 0.0, args.duration,
                                      progress=not args.quiet))
        up1, down1 = relay_bytes(relay, logs["relay"])
        w1 = asyncio.run(get_json("127.0.0.1", hport, "/v1/workers"))["workers"][0]
    finally:
        for p in reversed(procs):
            stop(p, grace=30)
    s = summarize(rec.latencies, dict(rec.errors), rec.completed_ok, args.duration)
    images = max(1, w1["rows"] - w0["rows"])
    batches = max(1, w1["batches"] - w0["batches"])
    return {"rtt_ms": rtt_ms, "router": s, "images_on_worker": images, "mean_batch": round(images / batches, 2),
            "window": w1["window"], "overhead_ms": round(1e3 * w1["overhead_s"], 1),
            "link_ms": round(1e3 * w1["link_s"], 1),
            "bytes_to_worker_per_image": round((down1 - down0) / images, 1),
            "bytes_from_worker_per_image": round((up1 - up0) / images, 1),
            "to_worker_over_jpeg": round((down1 - down0) / images / len(jpeg), 4),
            "to_worker_over_request": round((down1 - down0) / images / len(request_for(args.mode, jpeg)[2]), 4)}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rtt-ms", default="0,150", help="comma-separated round-trip times to add")
    p.add_argument("--batch-time", default="50ms", help="fixed time per batch on the worker (the device's speed)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=parse_duration, default=20.0)
    p.add_argument("--warmup", type=parse_duration, default=5.0)
    p.add_argument("--json", type=Path, default=RESULTS / "tunnel.json")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--mode", choices=["classify", "infer"], default="classify",
                   help="infer: send the 602 KB float32 tensor of the same image (compressed for far workers)")
    p.add_argument("--model", type=Path, default=None, help="ONNX classifier (default: a trivial one-node model)")
    args = p.parse_args(argv)
    jpeg = make_jpeg()
    if args.model is None:  # compute ~0: each batch takes --batch-time, the device's speed
        from scheduler_plugins.builtin_models import build_trivial

        args.model = Path(tempfile.mkdtemp(prefix="batch-router-model-")) / "trivial.onnx"
        build_trivial(args.model)
    rtts = [float(x) for x in args.rtt_ms.split(",")]
    work = Path(tempfile.mkdtemp(prefix="batch-router-tunnel-"))
    print(f"JPEG {len(jpeg)} bytes; batch time {args.batch_time}, max batch {args.max_batch_size}; logs in {work}",
          flush=True)
    runs = []
    for rtt in rtts:
        r = run_setting(rtt, args, jpeg, work)
        s = r["router"]
        print(f"RTT {rtt:g} ms: {s['img_per_s']:.1f} img/s, p50 {s['latency_ms']['p50']} p99 "
              f"{s['latency_ms']['p99']} ms, errors {s['errors'] or 'none'}, mean batch {r['mean_batch']}, "
              f"window {r['window']} (overhead {r['overhead_ms']} ms, link {r['link_ms']} ms); link bytes per image: to worker "
              f"{r['bytes_to_worker_per_image']:.0f} ({r['to_worker_over_jpeg']:.3f} x JPEG, "
              f"{r['to_worker_over_request']:.3f} x the request body), "
              f"back {r['bytes_from_worker_per_image']:.0f}", flush=True)
        runs.append(r)
    base = runs[0]["router"]["img_per_s"]
    targets = []
    for r in runs[1:]:
        ratio = r["router"]["img_per_s"] / base if base else None
        targets.append({"name": f"throughput at {r['rtt_ms']:g} ms RTT >= 0.9 x at {runs[0]['rtt_ms']:g} ms",
                        "measured": round(ratio, 3) if ratio else None, "met": bool(ratio and ratio >= 0.9)})
    if args.mode == "classify":
        worst = max(r["to_worker_over_jpeg"] for r in runs)
        targets.append({"name": "bytes per image to the worker <= 1.05 x JPEG", "measured": worst, "met": worst <= 1.05})
    for t in targets:
        print(f"  [{'met' if t['met'] else 'NOT MET'}] {t['name']}: {t['measured']}", flush=True)
    if args.json:
        write_json(args.json, {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                               "jpeg_bytes": len(jpeg), "runs": runs, "targets": targets})
    return 0


if __name__ == "__main__":
    sys.exit(main())
