"""One measured load window against a server, and the summary figures it yields.

The single run and every --rounds window measure the same way: warm up, run httpload's
closed- or open-loop load for --duration, drain, and read the model's stats endpoint at the
window's start and end so the mean batch covers that window only. The router and the bare
server are both measured through this one path, which is why it sits apart from the CLI,
the process management and the rounds logic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any, Optional
from urllib.parse import urlsplit

from benchmarks.http_client import Connection
from benchmarks.httpload import closed_loop, open_loop, summarize
from benchmarks.timeline import timeline


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


def _counts(stats: Optional[dict]) -> Optional[tuple[int, int, int]]:
    """Rows, batches, and rows of padding (0 from a server that pads nothing), summed
    over the models listed."""
    try:
        listed = stats["model_stats"]  # type: ignore[index]
        if not listed:
            return None
        return tuple(sum(int(s.get(k, 0) if k == "padded_count" else s[k]) for s in listed)
                     for k in ("inference_count", "execution_count", "padded_count"))  # type: ignore[return-value]
    except (TypeError, KeyError, IndexError, ValueError):
        return None


async def load_window(url: str, args: argparse.Namespace, path: str, headers: dict,
                      body: bytes, warmup: Optional[float] = None,
                      rows: int = 1) -> tuple[Any, Optional[dict]]:
    """Warm up, measure one window, drain: (Recorder, server stats delta or None)."""
    u = urlsplit(url)
    host, port, base = u.hostname or "127.0.0.1", u.port or 80, u.path.rstrip("/")
    # /v1/classify runs on whichever model name the router feeds images to (the
    # -uint8 one where there is one): count every model's batches.
    stats_path = f"{base}/v2/models/stats" if path.endswith("/v1/classify") else f"{base}/v2/models/{args.model}/stats"
    full = base + path
    warmup = args.warmup if warmup is None else warmup

    async def post(conn: Connection):
        return await conn.request("POST", full, headers, body)

    send = post
    protocol = getattr(args, "protocol", "http")
    if protocol == "http-shm":  # the same tensors, left in shared memory: the body names them
        from benchmarks.shmload import shm_sender

        meta = await get_json(host, port, f"{base}/v2/models/{args.model}")
        send = shm_sender(host, port, base, args.model, headers, body, meta["outputs"])
    elif protocol != "http":  # the same tensors as KServe v2 gRPC calls
        from benchmarks.grpcload import grpc_sender

        send = grpc_sender(args.grpc_target, args.model, headers, body, stream=protocol == "grpc-stream")

    async def stats_at_window_start() -> Optional[dict]:
        await asyncio.sleep(warmup)
        return await get_json(host, port, stats_path)

    before = asyncio.ensure_future(stats_at_window_start())
    common = dict(warmup=warmup, duration=args.duration, drain_cap=args.drain_cap,
                  timeout=args.timeout, progress=not args.quiet, rows=rows)
    if args.rate:
        rec = await open_loop(host, port, send, args.rate, seed=args.seed,
                              max_connections=args.max_connections, **common)
    else:
        rec = await closed_loop(host, port, send, args.concurrency, **common)
    if hasattr(send, "close"):
        await send.close()
    c0, c1 = _counts(await before), _counts(await get_json(host, port, stats_path))
    delta = None
    if c0 and c1 and c1[1] > c0[1]:
        delta = {"inference_count": c1[0] - c0[0], "execution_count": c1[1] - c0[1], "padded_count": c1[2] - c0[2]}
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
        if delta.get("padded_count") is not None:  # rows run as padding, of all rows run
            out["padded_fraction"] = round(delta["padded_count"] / (delta["inference_count"] + delta["padded_count"]), 4)
    return out


async def run_load(url: str, args: argparse.Namespace, path: str, headers: dict,
                   body: bytes, rows: int, warmup: Optional[float] = None) -> dict:
    """Warm up, measure one window, drain; mean batch from the server's stats around it,
    and the window over time for the report."""
    rec, delta = await load_window(url, args, path, headers, body, warmup, rows)
    out = window_summary(rec.latencies, rec.errors, rec.completed_ok, args.duration, rows,
                         rec.samples, delta)
    out["timeline"] = timeline(rec.trace, args.duration, rows)
    return out
