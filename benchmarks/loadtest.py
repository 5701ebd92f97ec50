"""Load-test the router over HTTP, optionally next to raw ONNX Runtime and a bare server.

    python -m benchmarks.loadtest --url http://127.0.0.1:8000 --concurrency 16 --duration 30s
        [--rate R] [--mode classify|infer] [--baseline] [--baseline-bare] [--spawn] [--json P]
        [--rounds N] [--report [PATH]] [--quiet]

This module is the command line and the single-run flow: start the router if asked, say
where its dashboard is, measure it for one window (a progress line a second on stderr),
then each baseline one after another, never beside the router (they share the same cores,
so ratios measured in one invocation are the figures worth comparing; absolute numbers on
a shared machine drift between runs). With --rounds N the interleaved flow of rounds.py
runs instead; payloads.py builds the requests, windows.py measures, servers.py starts and
stops the processes, report.py prints and records, and load_report.py draws latency and
throughput over time (--report).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from benchmarks.load_report import write_report
from benchmarks.payloads import payload
from benchmarks.report import dashboard_line, print_summary, run_record, trace_line, write_json
from benchmarks.rounds import ratio, run_rounds
from benchmarks.servers import (DEFAULT_BATCH_SIZES, run_raw, spawn_bare, spawn_router,
                                spawned_dashboard, stop)
from benchmarks.windows import get_json, run_load


def parse_duration(text: str) -> float:
    """"30s", "2m", "500ms", "1.5" (seconds) -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (use e.g. 30s, 2m, 500ms)")
    return float(m.group(1)) * {"ms": 1e-3, "s": 1, "m": 60, "h": 3600}[m.group(2) or "s"]


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loadtest",
                                description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--url", default="http://127.0.0.1:8000", help="router base URL (ignored with --spawn)")
    a("--mode", choices=("classify", "infer"), default="classify")
    a("--protocol", choices=("http", "http-shm", "grpc", "grpc-stream"), default="http",
      help="infer mode: KServe v2 over HTTP, HTTP with tensors in system shared memory, gRPC (unary), "
           "or gRPC with one stream per client")
    a("--grpc-target", default="127.0.0.1:8001", help="the router's gRPC address (ignored with --spawn)")
    a("--baseline-http", action="store_true", help="with another --protocol: the same load over plain HTTP, same router")
    a("--model", default="resnet50", help="model name in /v2/models/<model>")
    a("--concurrency", type=int, default=16, help="closed loop: connections in flight")
    a("--rate", type=float, help="open loop: Poisson arrivals at this many req/s")
    a("--max-connections", type=int, default=256, help="open loop: connection cap")
    a("--duration", type=parse_duration, default=30.0)
    a("--warmup", type=parse_duration, default=2.0)
    a("--drain-cap", type=parse_duration, default=30.0, help="max wait for in-flight at end")
    a("--timeout", type=parse_duration, default=120.0, help="per-request timeout")
    a("--batch-rows", type=int, default=1, help="infer mode: rows per request")
    a("--jpeg-size", default="320x240", help="classify mode: the JPEG's WIDTHxHEIGHT[qQUALITY], e.g. 500x375q90")
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
    a("--report", type=Path, nargs="?", const=Path("loadtest-report.png"),
      help="draw latency and throughput over time of the router window(s) to this PNG "
           "(or .svg, .pdf; bare --report: ./loadtest-report.png); needs matplotlib")
    a("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    try:
        sizes = [int(b) for b in args.baseline_batch_sizes.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        p.error(f"bad --baseline-batch-sizes {args.baseline_batch_sizes!r} (e.g. 1,8,32)")
    if args.protocol != "http" and args.mode != "infer":
        p.error("--protocol grpc needs --mode infer (classify is HTTP only)")
    return args


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
    result: dict[str, Any] = run_record(args, url)
    try:
        u = urlsplit(url)
        result["dashboard"] = asyncio.run(get_json(u.hostname or "127.0.0.1", u.port or 80,
                                                   f"{u.path.rstrip('/')}/v1/dashboard"))
        known = spawned_dashboard(router) if router is not None else None
        print(dashboard_line(result["dashboard"], known), flush=True)
        meta = asyncio.run(get_json(u.hostname or "127.0.0.1", u.port or 80,
                                    f"{u.path.rstrip('/')}/v2/models/{args.model}"))
        path, headers, body, rows = payload(args, meta)
        result.update(metadata=meta, payload={"path": path, "bytes": len(body), "rows": rows})
        loop = f"open loop {args.rate} req/s" if args.rate else \
            f"closed loop {args.concurrency} conn"
        title = f"router {url} {args.mode} over {args.protocol}, {loop}, {args.duration:g} s"
        if args.rounds > 1:
            result.update(run_rounds(args, url, meta, path, headers, body, rows, title))
        else:
            result["router"] = asyncio.run(run_load(url, args, path, headers, body, rows))
            print_summary(title, result["router"])
            if args.baseline_http:  # the same router, the same load, over HTTP
                http_args = argparse.Namespace(**{**vars(args), "protocol": "http"})
                result["baseline_http"] = asyncio.run(run_load(url, http_args, path, headers, body, rows))
                print_summary("the same router and load over HTTP", result["baseline_http"])
        trace = asyncio.run(get_json(u.hostname or "127.0.0.1", u.port or 80, f"{u.path.rstrip('/')}/v1/trace"))
        if trace and trace.get("count"):  # a router started with --trace: where the time went
            result["trace"] = trace
            print(trace_line(trace), flush=True)
    finally:
        if router is not None:
            stop(router)
    if args.rounds > 1:
        return finish(args, result)
    ratios: dict[str, Any] = {}
    if args.baseline_http:
        http = result["baseline_http"]
        ratios["router_over_http_req"] = ratio(result["router"]["req_per_s"], http["req_per_s"])
        print(f"{args.protocol} req/s / HTTP req/s: {ratios['router_over_http_req']}")
    if args.baseline_bare:
        bare = result["baseline_bare"] = bare_baseline(args, meta, path, headers, body, rows)
        ratios["router_over_bare_req"] = ratio(result["router"]["req_per_s"],
                                               bare["req_per_s"])
        print(f"router req/s / bare req/s: {ratios['router_over_bare_req']}")
    if args.baseline:
        raw = result["baseline_raw"] = run_raw(args, args.baseline_duration)
        r, best = result["router"], raw["best_rows_per_s"]
        ratios["throughput_router_over_raw"] = ratio(r["img_per_s"], best)
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
    """Record, then draw: a figure that cannot be drawn fails the run (exit 1) but never
    costs the JSON."""
    if args.json:
        write_json(args.json, result)
    drawn = write_report(result, args.report) if args.report else True
    return 0 if result["router"]["ok"] and drawn else 1


if __name__ == "__main__":
    sys.exit(main())
