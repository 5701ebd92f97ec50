"""Load-test the router over HTTP, optionally next to raw ONNX Runtime and a bare server.

    python -m benchmarks.loadtest --url http://127.0.0.1:8000 --concurrency 16 --duration 30s
        [--rate R] [--mode classify|infer] [--baseline] [--baseline-bare] [--spawn] [--json P]
        [--rounds N]

Baselines run one after another, never beside the router: they share the same cores, so
ratios measured in one invocation are the figures worth comparing (absolute numbers on a
shared machine drift between runs).

On a noisy machine even one invocation drifts (the same ONNX Runtime loop can take 32 ms
one minute and 48 ms the next), so --rounds N alternates: router window, baseline window(s),
router window, ... The router and the baselines (a raw_ort --serve process with the model
loaded once, a bare server) stay up throughout and each idles while another is measured.
The figures to quote are the medians over rounds of the per-round ratios and p50 deltas.
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
import statistics
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
DEFAULT_BATCH_SIZES = "1,8,32"
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


async def load_window(url: str, args: argparse.Namespace, path: str, headers: dict,
                      body: bytes, warmup: Optional[float] = None) -> tuple[Any, Optional[dict]]:
    """Warm up, measure one window, drain: (Recorder, server stats delta or None)."""
    u = urlsplit(url)
    host, port, base = u.hostname or "127.0.0.1", u.port or 80, u.path.rstrip("/")
    stats_path = f"{base}/v2/models/{args.model}/stats"
    full = base + path
    warmup = args.warmup if warmup is None else warmup

    async def send(conn: Connection):
        return await conn.request("POST", full, headers, body)

    async def stats_at_window_start() -> Optional[dict]:
        await asyncio.sleep(warmup)
        return await get_json(host, port, stats_path)

    before = asyncio.ensure_future(stats_at_window_start())
    common = dict(warmup=warmup, duration=args.duration, drain_cap=args.drain_cap,
                  timeout=args.timeout, progress=not args.quiet)
    if args.rate:
        rec = await open_loop(host, port, send, args.rate, seed=args.seed,
                              max_connections=args.max_connections, **common)
    else:
        rec = await closed_loop(host, port, send, args.concurrency, **common)
    c0, c1 = _counts(await before), _counts(await get_json(host, port, stats_path))
    delta = None
    if c0 and c1 and c1[1] > c0[1]:
        delta = {"inference_count": c1[0] - c0[0], "execution_count": c1[1] - c0[1]}
    return rec, delta


def window_summary(latencies: list[float], errors: dict, completed_ok: int, duration: float,
                   rows: int, samples: dict, delta: Optional[dict]) -> dict:
    """summarize() plus error samples and the mean batch from the server's stats delta."""
    out = summarize(latencies, errors, completed_ok, duration, rows)
    out["error_samples"] = samples
    out["mean_batch"] = None
    if delta and delta["execution_count"] > 0:
        out["mean_batch"] = round(delta["inference_count"] / delta["execution_count"], 3)
        out["stats_delta"] = delta
    return out


async def run_load(url: str, args: argparse.Namespace, path: str, headers: dict,
                   body: bytes, rows: int, warmup: Optional[float] = None) -> dict:
    """Warm up, measure one window, drain; mean batch from the server's stats around it."""
    rec, delta = await load_window(url, args, path, headers, body, warmup)
    return window_summary(rec.latencies, rec.errors, rec.completed_ok, args.duration, rows,
                          rec.samples, delta)


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


def _model_path(args: argparse.Namespace) -> Path:
    if args.model_path is not None:
        return args.model_path
    from worker_setup.resnet50 import ensure_default_model

    return ensure_default_model()


def run_raw(args: argparse.Namespace, duration: float) -> dict:
    """raw_ort in a subprocess: its own threads and memory, nothing shared with us."""
    cmd = [sys.executable, "-m", "benchmarks.raw_ort", "--model-path", str(_model_path(args)),
           "--mode", args.mode, "--threads", str(args.baseline_threads),
           "--duration", f"{duration}s", "--seed", str(args.seed)]
    if args.baseline_batch_sizes != DEFAULT_BATCH_SIZES:
        cmd += ["--batch-sizes", args.baseline_batch_sizes]
    print("baseline:", shlex.join(cmd), flush=True)
    out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True).stdout
    lines = out.strip().splitlines()
    print("\n".join(lines[:-1]), flush=True)
    return json.loads(lines[-1])


class RawServer:
    """`raw_ort --serve` in a subprocess: the session is loaded once, then each window()
    runs one measurement there while we wait (so nothing else runs beside it)."""

    def __init__(self, args: argparse.Namespace, batch_sizes: list[int]) -> None:
        cmd = [sys.executable, "-m", "benchmarks.raw_ort", "--serve",
               "--model-path", str(_model_path(args)), "--mode", args.mode,
               "--threads", str(args.baseline_threads), "--duration", f"{args.duration}s",
               "--batch-sizes", ",".join(map(str, batch_sizes)), "--seed", str(args.seed)]
        print("baseline:", shlex.join(cmd), flush=True)
        # Own session: a terminal Ctrl-C reaches only us; close() ends it.
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            self.info = self._answer()
        except BaseException:
            self.close()
            raise

    def _answer(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.lstrip().startswith("{"):
                out = json.loads(line)
                if "error" in out:
                    raise SystemExit(f"raw_ort: {out['error']}")
                return out
        raise SystemExit(f"raw_ort exited with code {self.proc.wait()}")

    def window(self, duration: float, batch_sizes: list[int]) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"duration": duration,
                                          "batch_sizes": batch_sizes}) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        """EOF on its stdin ends it; killed if it does not go."""
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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
    a("--baseline-duration", type=parse_duration, default=10.0,
      help="per raw measurement (one round only; with --rounds each raw batch size runs "
           "for --duration)")
    a("--baseline-batch-sizes", default=DEFAULT_BATCH_SIZES,
      help="raw batch sizes; throughput is the best of them, latency is batch 1's")
    a("--baseline-bare", action="store_true", help="then a bare Tornado server, same load")
    a("--model-path", type=Path, help="ONNX file (default: the built-in ResNet-50)")
    a("--spawn", action="store_true", help="start `batch-router up` on free ports")
    a("--spawn-args", default="", help="extra arguments for batch-router up")
    a("--rounds", type=int, default=1,
      help="alternate router and baseline windows this many times; quote the medians")
    a("--json", type=Path, help="write every figure here")
    a("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    try:
        sizes = [int(b) for b in args.baseline_batch_sizes.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        p.error(f"bad --baseline-batch-sizes {args.baseline_batch_sizes!r} (e.g. 1,8,32)")
    return args


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


class CpuProbe:
    """Cores kept busy, during a window, by processes that are not ours (this one and its
    descendants: router, workers, raw_ort, bare server) or stolen by the hypervisor. On a
    shared machine a round where this differs between its windows was not a fair race."""

    def __init__(self) -> None:
        try:
            import psutil
        except ImportError:  # figures are then None
            psutil = None
        self.ps = psutil
        self.me = psutil.Process() if psutil else None

    def sample(self) -> Optional[tuple]:
        if self.ps is None:
            return None
        t = self.ps.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        ours: dict[int, float] = {}
        for proc in [self.me] + self.me.children(recursive=True):
            try:
                c = proc.cpu_times()
                ours[proc.pid] = c.user + c.system
            except (self.ps.NoSuchProcess, self.ps.AccessDenied, self.ps.ZombieProcess):
                pass
        return time.monotonic(), busy, getattr(t, "steal", 0.0), ours

    @staticmethod
    def others(a: Optional[tuple], b: Optional[tuple]) -> Optional[float]:
        """Cores used by others between samples a and b (ours: per process, so one that
        started in between counts whole and one that ended is simply missing)."""
        if a is None or b is None or b[0] <= a[0]:
            return None
        ours = sum(v - a[3].get(pid, 0.0) for pid, v in b[3].items())
        return round(max(0.0, (b[1] - a[1]) - ours + (b[2] - a[2])) / (b[0] - a[0]), 2)

    def ours_except(self, a: Optional[tuple], b: Optional[tuple],
                    exclude: set[int]) -> Optional[float]:
        """Cores used by our processes other than `exclude` and this one: what the idle
        router (and its workers) cost while a baseline was measured."""
        if a is None or b is None or b[0] <= a[0] or self.me is None:
            return None
        skip = exclude | {self.me.pid}
        used = sum(v - a[3].get(pid, 0.0) for pid, v in b[3].items() if pid not in skip)
        return round(max(0.0, used) / (b[0] - a[0]), 3)


# Per-round figures: (key, label, format). Ratios and deltas are per round, then medians.
ROUND_METRICS = [
    ("router_img_per_s", "router img/s", "{:.1f}"),
    ("router_req_per_s", "router req/s", "{:.1f}"),
    ("router_p50_ms", "router p50 ms", "{:.2f}"),
    ("raw_best_img_per_s", "raw best img/s", "{:.1f}"),
    ("raw_p50_ms", "raw batch-1 p50 ms", "{:.2f}"),
    ("throughput_router_over_raw", "router img/s / best raw img/s", "{:.3f}"),
    ("latency_p50_delta_ms", "router p50 - raw batch-1 p50 ms", "{:+.2f}"),
    ("bare_req_per_s", "bare req/s", "{:.1f}"),
    ("bare_p50_ms", "bare p50 ms", "{:.2f}"),
    ("router_over_bare_req", "router req/s / bare req/s", "{:.3f}"),
    ("latency_p50_delta_vs_bare_ms", "router p50 - bare p50 ms", "{:+.2f}"),
]


def round_figures(router: dict, raw: Optional[dict] = None,
                  bare: Optional[dict] = None) -> dict:
    """One round's headline figures, ratios and p50 deltas (None where not measurable)."""
    p50 = router["latency_ms"]["p50"]
    f: dict[str, Any] = {"router_img_per_s": router["img_per_s"],
                         "router_req_per_s": router["req_per_s"], "router_p50_ms": p50}
    if raw is not None:
        raw_p50 = raw["latency_b1_ms"]["p50"]
        f.update(raw_best_img_per_s=raw["best_rows_per_s"], raw_best_batch=raw["best_batch"],
                 raw_p50_ms=raw_p50,
                 throughput_router_over_raw=_ratio(router["img_per_s"],
                                                   raw["best_rows_per_s"]),
                 latency_p50_delta_ms=None if p50 is None else round(p50 - raw_p50, 3))
    if bare is not None:
        bare_p50 = bare["latency_ms"]["p50"]
        f.update(bare_req_per_s=bare["req_per_s"], bare_p50_ms=bare_p50,
                 router_over_bare_req=_ratio(router["req_per_s"], bare["req_per_s"]),
                 latency_p50_delta_vs_bare_ms=None if p50 is None or bare_p50 is None
                 else round(p50 - bare_p50, 3))
    return f


def summarize_rounds(rounds: list[dict]) -> dict:
    """Median, min and max over rounds of every per-round figure (rounds missing one, e.g.
    no latency because every request failed, are left out of that figure's median)."""
    out: dict[str, dict] = {}
    for key, _, _ in ROUND_METRICS:
        xs = [r[key] for r in rounds if r.get(key) is not None]
        if xs:
            out[key] = {"median": round(statistics.median(xs), 4), "min": min(xs),
                        "max": max(xs), "n": len(xs)}
    return out


def pooled_summary(windows: list[tuple[Any, Optional[dict]]], duration: float,
                   rows: int) -> dict:
    """The router's windows taken together: every latency sample, every error, and the
    mean batch from the summed stats deltas (rounds without stats are left out of it)."""
    lat: list[float] = []
    errors: dict[str, int] = {}
    samples: dict[str, str] = {}
    ok = inference = execution = 0
    for rec, delta in windows:
        lat += rec.latencies
        ok += rec.completed_ok
        for k, v in rec.errors.items():
            errors[k] = errors.get(k, 0) + v
        for k, v in rec.samples.items():
            samples.setdefault(k, v)
        if delta:
            inference += delta["inference_count"]
            execution += delta["execution_count"]
    delta = {"inference_count": inference, "execution_count": execution} if execution \
        else None
    return window_summary(lat, errors, ok, duration * len(windows), rows, samples, delta)


def _fmt(value: Any, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def print_rounds_table(rounds: list[dict]) -> None:
    cols = [("router_img_per_s", "router img/s", "{:.1f}"),
            ("router_p50_ms", "router p50", "{:.2f}")]
    if any("raw_p50_ms" in r for r in rounds):
        cols += [("raw_best_img_per_s", "raw img/s", "{:.1f}"),
                 ("raw_best_batch", "at batch", "{}"), ("raw_p50_ms", "raw p50", "{:.2f}"),
                 ("throughput_router_over_raw", "img ratio", "{:.3f}"),
                 ("latency_p50_delta_ms", "p50 - raw", "{:+.2f}")]
    if any("bare_p50_ms" in r for r in rounds):
        cols += [("bare_req_per_s", "bare req/s", "{:.1f}"),
                 ("bare_p50_ms", "bare p50", "{:.2f}"),
                 ("router_over_bare_req", "req ratio", "{:.3f}"),
                 ("latency_p50_delta_vs_bare_ms", "p50 - bare", "{:+.2f}")]
    for side in ("router", "bare", "raw"):
        if any(side in r.get("other_cpu_cores", {}) for r in rounds):
            cols.append((f"other_cpu_cores.{side}", f"others@{side}", "{:.2f}"))
    widths = [max(len(h), 9) for _, h, _ in cols]
    print("per round (img/s, req/s; p50 in ms; ratio = router / baseline, same round):")
    print("round  " + "  ".join(h.rjust(w) for (_, h, _), w in zip(cols, widths)))

    def get(r: dict, key: str) -> Any:
        for part in key.split("."):
            r = r.get(part) if isinstance(r, dict) else None  # type: ignore[assignment]
        return r

    for r in rounds:
        print(f"{r['round']:5d}  " + "  ".join(
            _fmt(get(r, k), f).rjust(w) for (k, _, f), w in zip(cols, widths)))
    if any(r.get("other_cpu_cores") for r in rounds):
        print("  others@X: cores busy with processes not started by this run (plus "
              "hypervisor steal) during window X; a round where these differ much between "
              "its windows was not measured under the same conditions")


def run_rounds(args: argparse.Namespace, url: str, meta: Optional[dict], path: str,
               headers: dict, body: bytes, rows: int, title: str) -> dict:
    """--rounds N: router window, then each baseline's window, N times over; the router
    and the baselines stay up throughout and idle while another one is measured."""
    sizes = [int(b) for b in args.baseline_batch_sizes.split(",")]
    raw: Optional[RawServer] = None
    probe = CpuProbe()
    bare_proc: Optional[subprocess.Popen] = None
    bare_url: Optional[str] = None
    meta_file: Optional[str] = None
    rounds: list[dict] = []
    windows: list[tuple[Any, Optional[dict]]] = []
    try:
        if args.baseline:
            raw = RawServer(args, sizes)
            print(f"raw onnxruntime ({', '.join(raw.info['providers'])}, "
                  f"{args.baseline_threads} threads, {args.mode}"
                  f"{' incl. preprocessing' if args.mode == 'classify' else ''}), "
                  f"model loaded once", flush=True)
        if args.baseline_bare:
            bare_proc, bare_url, meta_file = spawn_bare(meta)
            print(f"bare Tornado server {bare_url}, same load", flush=True)
        parts = [f"router {args.duration:g} s"]
        if bare_url:
            parts.append(f"bare {args.duration:g} s")
        if raw:
            parts.append(f"raw {args.duration:g} s x batch {','.join(map(str, sizes))}")
        print(f"{args.rounds} rounds of: {' -> '.join(parts)}"
              f" (first router window after {args.warmup:g} s warmup)\n"
              "  the router stays up and gets no traffic (idles) while a baseline is "
              "measured; each baseline idles while the router is measured", flush=True)
        for i in range(args.rounds):
            warmup = args.warmup if i == 0 else 0.0
            other: dict[str, Optional[float]] = {}
            idle: dict[str, Optional[float]] = {}  # the router's own CPU in baseline windows
            t0 = probe.sample()
            rec, delta = asyncio.run(load_window(url, args, path, headers, body, warmup))
            t1 = probe.sample()
            other["router"] = probe.others(t0, t1)
            windows.append((rec, delta))
            router = window_summary(rec.latencies, rec.errors, rec.completed_ok,
                                    args.duration, rows, rec.samples, delta)
            bare = raw_out = None
            if bare_url:
                bare = asyncio.run(run_load(bare_url, args, path, headers, body, rows,
                                            warmup))
                t1, t0 = probe.sample(), t1
                other["bare"] = probe.others(t0, t1)
                idle["bare"] = probe.ours_except(t0, t1, {bare_proc.pid})  # type: ignore
            if raw:
                raw_out = raw.window(args.duration, sizes)
                t1, t0 = probe.sample(), t1
                other["raw"] = probe.others(t0, t1)
                idle["raw"] = probe.ours_except(t0, t1, {raw.proc.pid})
            rnd = {"round": i + 1, **round_figures(router, raw_out, bare),
                   "other_cpu_cores": other, "router_idle_cpu_cores": idle, "router": router}
            if bare is not None:
                rnd["bare"] = bare
            if raw_out is not None:
                rnd["raw"] = {k: v for k, v in raw_out.items()
                              if k not in ("model_path", "mode", "threads", "providers",
                                           "input_shape")}
            rounds.append(rnd)
            errs = sum(router["errors"].values())
            line = (f"round {i + 1}/{args.rounds}: router "
                    f"{_fmt(rnd['router_img_per_s'], '{:.1f}')} img/s "
                    f"p50 {_fmt(rnd['router_p50_ms'], '{:.2f}')} ms"
                    f"{f' ({errs} errors)' if errs else ''}")
            if bare is not None:
                line += (f" | bare {_fmt(rnd['bare_req_per_s'], '{:.1f}')} req/s "
                         f"p50 {_fmt(rnd['bare_p50_ms'], '{:.2f}')} ms, "
                         f"ratio {_fmt(rnd['router_over_bare_req'], '{:.3f}')}")
            if raw_out is not None:
                line += (f" | raw {_fmt(rnd['raw_best_img_per_s'], '{:.1f}')} img/s "
                         f"(batch {rnd['raw_best_batch']}) "
                         f"p50 {_fmt(rnd['raw_p50_ms'], '{:.2f}')} ms, "
                         f"ratio {_fmt(rnd['throughput_router_over_raw'], '{:.3f}')}, "
                         f"p50 delta {_fmt(rnd['latency_p50_delta_ms'], '{:+.2f}')} ms")
            line += " | others busy " + ", ".join(f"{k} {_fmt(v, '{:.2f}')}"
                                                  for k, v in other.items())
            if idle:
                line += " | idle router " + ", ".join(f"in {k} {_fmt(v, '{:.3f}')}"
                                                      for k, v in idle.items()) + " cores"
            print(line, flush=True)
    finally:
        if raw is not None:
            raw.close()
        if bare_proc is not None:
            stop(bare_proc)
        if meta_file:
            os.unlink(meta_file)

    pooled = pooled_summary(windows, args.duration, rows)
    print()
    print_summary(f"{title}, pooled over {args.rounds} rounds", pooled)
    print()
    print_rounds_table(rounds)
    summary = summarize_rounds(rounds)
    quote = [k for k in ("throughput_router_over_raw", "latency_p50_delta_ms",
                         "router_over_bare_req", "latency_p50_delta_vs_bare_ms")
             if k in summary]
    if quote:
        print(f"medians over {args.rounds} rounds (min .. max) - quote these medians, "
              "not the pooled or single-round figures:")
        for key, label, fmt in ROUND_METRICS:
            if key in quote:
                m = summary[key]
                note = " (meaningful at --concurrency 1 only)" \
                    if key == "latency_p50_delta_ms" and (args.rate or args.concurrency != 1) \
                    else ""
                print(f"  {label}: {fmt.format(m['median'])}  "
                      f"({fmt.format(m['min'])} .. {fmt.format(m['max'])}){note}")
    return {"router": pooled, "rounds": rounds, "rounds_summary": summary,
            "ratios": {k: summary[k]["median"] for k in quote},
            "raw_session": raw.info if raw is not None else None,
            "rounds_note": "each round: router window, then baseline window(s) of the same "
                           "length (raw: per batch size); the router idled during baseline "
                           "windows; ratios are medians of per-round ratios"}


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
        if args.rounds > 1:
            result.update(run_rounds(args, url, meta, path, headers, body, rows, title))
        else:
            result["router"] = asyncio.run(run_load(url, args, path, headers, body, rows))
            print_summary(title, result["router"])
    finally:
        if router is not None:
            stop(router)
    if args.rounds > 1:
        return finish(args, result)
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
    return finish(args, result)


def finish(args: argparse.Namespace, result: dict) -> int:
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if result["router"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
