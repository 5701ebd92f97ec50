"""Load-test the router over HTTP, optionally next to raw ONNX Runtime and a bare server.

    python -m benchmarks.loadtest --url http://127.0.0.1:8000 --concurrency 16 --duration 30s
        [--rate R] [--mode classify|infer] [--baseline] [--baseline-bare] [--spawn] [--json P]

Baselines run one after another, never beside the router: they share the same cores, so
ratios measured in one invocation are the figures worth comparing (absolute numbers on a
shared machine drift between runs).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

import numpy as np

from benchmarks.httpload import Connection, closed_loop, open_loop, summarize

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"FP32": "float32", "FP16": "float16", "FP64": "float64", "UINT8": "uint8",
          "INT8": "int8", "INT32": "int32", "INT64": "int64"}


def parse_duration(text: str) -> float:
    """"30s", "2m", "500ms", "1.5" (seconds) -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (use e.g. 30s, 2m, 500ms)")
    return float(m.group(1)) * {"ms": 1e-3, "s": 1, "m": 60, "h": 3600}[m.group(2) or "s"]


def make_jpeg(width: int = 320, height: int = 240, seed: int = 0, quality: int = 85) -> bytes:
    """A deterministic natural-ish photo (gradients, blobs, texture): ~20 KB like a real one,
    so decode cost and upload size resemble real traffic rather than a flat test card."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([90 + 80 * y / height, 130 + 60 * x / width, 200 - 70 * y / height], -1)
    img = Image.fromarray(sky.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(14):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(10, 70)
        fill = tuple(int(c) for c in rng.integers(20, 235, 3))
        draw.ellipse((cx - r, cy - r * 0.7, cx + r, cy + r * 0.7), fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(2))
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 9, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def random_tensor(shape: list[int], datatype: str, seed: int = 0) -> np.ndarray:
    """The fixed request tensor, same in router and raw runs."""
    rng, dtype = np.random.default_rng(seed), np.dtype(DTYPES.get(datatype, datatype))
    if dtype.kind in "iu":
        return rng.integers(0, 128, shape).astype(dtype)
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype)


def infer_request(meta: dict[str, Any], rows: int, seed: int = 0) -> tuple[dict, bytes]:
    """KServe v2 binary tensor extension: JSON header then the raw input bytes."""
    inp = meta["inputs"][0]
    shape = [rows if i == 0 and d in (-1, None) else (1 if d in (-1, None) else int(d))
             for i, d in enumerate(inp["shape"])]
    data = random_tensor(shape, inp["datatype"], seed).tobytes()
    outputs = [{"name": o["name"], "parameters": {"binary_data": True}}
               for o in meta.get("outputs", [])[:1]]
    header = json.dumps({"inputs": [{
        "name": inp["name"], "shape": shape, "datatype": inp["datatype"],
        "parameters": {"binary_data_size": len(data)}}], "outputs": outputs}).encode()
    headers = {"Inference-Header-Content-Length": str(len(header)),
               "Content-Type": "application/octet-stream"}
    return headers, header + data


async def get(host: str, port: int, path: str) -> tuple[int, bytes]:
    """One GET on its own connection; status 0 if it could not be made."""
    conn = Connection(host, port)
    try:
        return (await asyncio.wait_for(conn.request("GET", path), 10))[::2]
    except (OSError, ValueError, asyncio.TimeoutError):
        return 0, b""
    finally:
        conn.close()


async def get_json(host: str, port: int, path: str) -> Optional[dict]:
    """GET path as JSON; None on any failure (the caller prints n/a)."""
    status, body = await get(host, port, path)
    try:
        return json.loads(body) if status == 200 else None
    except ValueError:
        return None


def _counts(stats: Optional[dict]) -> Optional[tuple[int, int]]:
    try:
        s = stats["model_stats"][0]  # type: ignore[index]
        return int(s["inference_count"]), int(s["execution_count"])
    except (TypeError, KeyError, IndexError, ValueError):
        return None


async def run_load(url: str, args: argparse.Namespace, path: str, headers: dict,
                   body: bytes, rows: int) -> dict:
    """Warm up, measure one window, drain; mean batch from the server's stats around it."""
    u = urlsplit(url)
    host, port, base = u.hostname or "127.0.0.1", u.port or 80, u.path.rstrip("/")
    stats_path = f"{base}/v2/models/{args.model}/stats"
    full = base + path

    async def send(conn: Connection):
        return await conn.request("POST", full, headers, body)

    async def stats_at_window_start() -> Optional[dict]:
        await asyncio.sleep(args.warmup)
        return await get_json(host, port, stats_path)

    before = asyncio.ensure_future(stats_at_window_start())
    common = dict(warmup=args.warmup, duration=args.duration, drain_cap=args.drain_cap,
                  timeout=args.timeout, progress=not args.quiet)
    if args.rate:
        rec = await open_loop(host, port, send, args.rate, seed=args.seed,
                              max_connections=args.max_connections, **common)
    else:
        rec = await closed_loop(host, port, send, args.concurrency, **common)
    c0, c1 = _counts(await before), _counts(await get_json(host, port, stats_path))
    out = summarize(rec.latencies, rec.errors, rec.completed_ok, args.duration, rows)
    out["error_samples"] = rec.samples
    out["mean_batch"] = None
    if c0 and c1 and c1[1] > c0[1]:
        out["mean_batch"] = round((c1[0] - c0[0]) / (c1[1] - c0[1]), 3)
        out["stats_delta"] = {"inference_count": c1[0] - c0[0],
                              "execution_count": c1[1] - c0[1]}
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, url: str, timeout: float, what: str) -> None:
    u, deadline = urlsplit(url), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode} before it was ready")
        ready = f"{u.path.rstrip('/')}/v2/health/ready"
        if asyncio.run(get(u.hostname or "127.0.0.1", u.port or 80, ready))[0] == 200:
            return
        time.sleep(0.5)
    stop(proc)
    raise SystemExit(f"{what} not ready at {url}/v2/health/ready within {timeout:.0f} s")


def stop(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGINT (a clean shutdown, as Ctrl-C would), then SIGKILL if it will not go."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def spawn_router(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    exe = Path(sys.executable).parent / "batch-router"
    port = _free_port()
    cmd = [str(exe) if exe.exists() else "batch-router", "up", "--port", str(port),
           "--dashboard-port", str(_free_port()), "--scheduler-port", str(_free_port())]
    if args.model_path:
        cmd += ["--model", str(args.model_path)]
    cmd += ["--model-name", args.model]  # the name the load is sent to
    cmd += shlex.split(args.spawn_args)
    # Its log goes to a file, so the progress bar and summary stay readable.
    log = tempfile.NamedTemporaryFile("w", prefix="batch-router-", suffix=".log", delete=False)
    print(f"spawning: {shlex.join(cmd)}\n  log: {log.name}", flush=True)
    # Own session: a terminal Ctrl-C reaches only us; we then stop the router ourselves.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, 120, "batch-router")
    except SystemExit:
        print("".join(Path(log.name).read_text().splitlines(True)[-20:]), file=sys.stderr)
        raise
    return proc, url


def spawn_bare(meta: Optional[dict]) -> tuple[subprocess.Popen, str, Optional[str]]:
    cmd = [sys.executable, "-m", "benchmarks.bare_server", "--port", "0"]
    meta_file = None
    if meta:
        fd, meta_file = tempfile.mkstemp(prefix="bare-meta-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f)
        cmd += ["--metadata", meta_file]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    line = proc.stdout.readline() if proc.stdout else ""  # "... listening on 127.0.0.1:P"
    m = re.search(r":(\d+)\s*$", line)
    if not m:
        stop(proc)
        raise SystemExit(f"bare_server did not start: {line!r}")
    url = f"http://127.0.0.1:{m.group(1)}"
    _wait_ready(proc, url, 30, "bare_server")
    return proc, url, meta_file


def run_raw(args: argparse.Namespace, duration: float) -> dict:
    """raw_ort in a subprocess: its own threads and memory, nothing shared with us."""
    model_path = args.model_path
    if model_path is None:
        from worker_setup.resnet50 import ensure_default_model

        model_path = ensure_default_model()
    cmd = [sys.executable, "-m", "benchmarks.raw_ort", "--model-path", str(model_path),
           "--mode", args.mode, "--threads", str(args.baseline_threads),
           "--duration", f"{duration}s", "--seed", str(args.seed)]
    print("baseline:", shlex.join(cmd), flush=True)
    out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True).stdout
    lines = out.strip().splitlines()
    print("\n".join(lines[:-1]), flush=True)
    return json.loads(lines[-1])


def machine() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "git_commit": commit}


def print_summary(title: str, s: dict) -> None:
    lat = s["latency_ms"]
    ms = "  ".join(f"{k} {'n/a' if lat[k] is None else f'{lat[k]:.1f}'}"
                   for k in ("p50", "p95", "p99", "max"))
    errs = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "none"
    why = "".join(f"\n    {k}: {v!r}" for k, v in s.get("error_samples", {}).items())
    mb = s.get("mean_batch")
    print(f"{title}\n"
          f"  throughput  {s['req_per_s']:.1f} req/s  {s['img_per_s']:.1f} img/s"
          f"  ({s['ok']} ok in {s['duration_s']:.1f} s)\n"
          f"  latency ms  {ms}\n"
          f"  errors      {errs}{why}\n"
          f"  mean batch  {'n/a' if mb is None else f'{mb:.2f}'}", flush=True)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loadtest",
                                description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--url", default="http://127.0.0.1:8000", help="router base URL (ignored with --spawn)")
    a("--mode", choices=("classify", "infer"), default="classify")
    a("--model", default="resnet50", help="model name in /v2/models/<model>")
    a("--concurrency", type=int, default=16, help="closed loop: connections in flight")
    a("--rate", type=float, help="open loop: Poisson arrivals at this many req/s")
    a("--max-connections", type=int, default=256, help="open loop: connection cap")
    a("--duration", type=parse_duration, default=30.0)
    a("--warmup", type=parse_duration, default=2.0)
    a("--drain-cap", type=parse_duration, default=30.0, help="max wait for in-flight at end")
    a("--timeout", type=parse_duration, default=120.0, help="per-request timeout")
    a("--batch-rows", type=int, default=1, help="infer mode: rows per request")
    a("--seed", type=int, default=0)
    a("--baseline", action="store_true", help="then raw ONNX Runtime in a subprocess")
    a("--baseline-threads", type=int, default=os.cpu_count() or 1)
    a("--baseline-duration", type=parse_duration, default=10.0, help="per raw measurement")
    a("--baseline-bare", action="store_true", help="then a bare Tornado server, same load")
    a("--model-path", type=Path, help="ONNX file (default: the built-in ResNet-50)")
    a("--spawn", action="store_true", help="start `batch-router up` on free ports")
    a("--spawn-args", default="", help="extra arguments for batch-router up")
    a("--json", type=Path, help="write every figure here")
    a("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def payload(args: argparse.Namespace, meta: Optional[dict]) -> tuple[str, dict, bytes, int]:
    if args.mode == "classify":
        jpeg = make_jpeg(seed=args.seed)
        print(f"payload: {len(jpeg)} byte JPEG 320x240 q85 -> POST /v1/classify", flush=True)
        return "/v1/classify", {"Content-Type": "image/jpeg"}, jpeg, 1
    if meta is None:
        raise SystemExit(f"cannot read model metadata GET /v2/models/{args.model}")
    headers, body = infer_request(meta, args.batch_rows, args.seed)
    print(f"payload: {len(body)} byte KServe binary request, {args.batch_rows} row(s)",
          flush=True)
    return f"/v2/models/{args.model}/infer", headers, body, args.batch_rows


def _ratio(a: float, b: float) -> Optional[float]:
    return round(a / b, 4) if b else None


def bare_baseline(args: argparse.Namespace, meta: Optional[dict], path: str, headers: dict,
                  body: bytes, rows: int) -> dict:
    """The same load, same settings, against bare_server: the HTTP ceiling."""
    proc, url, meta_file = spawn_bare(meta)
    try:
        out = asyncio.run(run_load(url, args, path, headers, body, rows))
    finally:
        stop(proc)
        if meta_file:
            os.unlink(meta_file)
    print_summary(f"bare Tornado server {url}, same load", out)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    router, url = spawn_router(args) if args.spawn else (None, args.url.rstrip("/"))
    result: dict[str, Any] = {"config": {k: str(v) if isinstance(v, Path) else v
                                         for k, v in vars(args).items()},
                              "machine": machine(), "url": url}
    try:
        u = urlsplit(url)
        meta = asyncio.run(get_json(u.hostname or "127.0.0.1", u.port or 80,
                                    f"{u.path.rstrip('/')}/v2/models/{args.model}"))
        path, headers, body, rows = payload(args, meta)
        result.update(metadata=meta, payload={"path": path, "bytes": len(body), "rows": rows})
        loop = f"open loop {args.rate} req/s" if args.rate else \
            f"closed loop {args.concurrency} conn"
        title = f"router {url} {args.mode}, {loop}, {args.duration:g} s"
        result["router"] = asyncio.run(run_load(url, args, path, headers, body, rows))
        print_summary(title, result["router"])
    finally:
        if router is not None:
            stop(router)
    ratios: dict[str, Any] = {}
    if args.baseline_bare:
        bare = result["baseline_bare"] = bare_baseline(args, meta, path, headers, body, rows)
        ratios["router_over_bare_req"] = _ratio(result["router"]["req_per_s"],
                                                bare["req_per_s"])
        print(f"router req/s / bare req/s: {ratios['router_over_bare_req']}")
    if args.baseline:
        raw = result["baseline_raw"] = run_raw(args, args.baseline_duration)
        r, best = result["router"], raw["best_rows_per_s"]
        ratios["throughput_router_over_raw"] = _ratio(r["img_per_s"], best)
        p50 = r["latency_ms"]["p50"]
        ratios["latency_p50_delta_ms"] = None if p50 is None else \
            round(p50 - raw["latency_b1_ms"]["p50"], 3)
        print(f"router img/s / best raw img/s ({best:.1f} at batch {raw['best_batch']}): "
              f"{ratios['throughput_router_over_raw']}\n"
              f"router p50 - raw batch-1 p50 (meaningful at --concurrency 1 only): "
              f"{ratios['latency_p50_delta_ms']} ms", flush=True)
    result["ratios"] = ratios
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if result["router"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
