"""--rounds N: router and baseline windows interleaved, and their median/min/max summary.

On a noisy machine even one invocation drifts (the same ONNX Runtime loop can take 32 ms
one minute and 48 ms the next), so --rounds N alternates: router window, baseline window(s),
router window, ... The router and the baselines (a raw_ort --serve process with the model
loaded once, a bare server) stay up throughout and each idles while another is measured.
The figures to quote are the medians over rounds of the per-round ratios and p50 deltas;
this module computes those per-round figures and their summary, and runs the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
from typing import Any, Optional

from benchmarks.cpu_probe import CpuProbe
from benchmarks.report import print_rounds_table, print_summary, round_line
from benchmarks.servers import RawServer, spawn_bare, stop
from benchmarks.timeline import timeline
from benchmarks.windows import load_window, run_load, window_summary


def ratio(a: float, b: float) -> Optional[float]:
    return round(a / b, 4) if b else None


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
    ("http_req_per_s", "same router over HTTP req/s", "{:.1f}"),
    ("router_over_http_req", "this protocol's req/s / plain HTTP req/s", "{:.3f}"),
]


def round_figures(router: dict, raw: Optional[dict] = None,
                  bare: Optional[dict] = None, http: Optional[dict] = None) -> dict:
    """One round's headline figures, ratios and p50 deltas (None where not measurable)."""
    p50 = router["latency_ms"]["p50"]
    f: dict[str, Any] = {"router_img_per_s": router["img_per_s"],
                         "router_req_per_s": router["req_per_s"], "router_p50_ms": p50}
    if raw is not None:
        raw_p50 = raw["latency_b1_ms"]["p50"]
        f.update(raw_best_img_per_s=raw["best_rows_per_s"], raw_best_batch=raw["best_batch"],
                 raw_p50_ms=raw_p50,
                 throughput_router_over_raw=ratio(router["img_per_s"],
                                                  raw["best_rows_per_s"]),
                 latency_p50_delta_ms=None if p50 is None else round(p50 - raw_p50, 3))
    if bare is not None:
        bare_p50 = bare["latency_ms"]["p50"]
        f.update(bare_req_per_s=bare["req_per_s"], bare_p50_ms=bare_p50,
                 router_over_bare_req=ratio(router["req_per_s"], bare["req_per_s"]),
                 latency_p50_delta_vs_bare_ms=None if p50 is None or bare_p50 is None
                 else round(p50 - bare_p50, 3))
    if http is not None:  # --baseline-http: the same router, the same load over HTTP
        f.update(http_req_per_s=http["req_per_s"], router_over_http_req=ratio(router["req_per_s"], http["req_per_s"]))
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
    ok = inference = execution = padded = 0
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
            padded += delta.get("padded_count", 0)
    delta = {"inference_count": inference, "execution_count": execution, "padded_count": padded} if execution \
        else None
    return window_summary(lat, errors, ok, duration * len(windows), rows, samples, delta)


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
            rec, delta = asyncio.run(load_window(url, args, path, headers, body, warmup,
                                                 rows))
            t1 = probe.sample()
            other["router"] = probe.others(t0, t1)
            windows.append((rec, delta))
            router = window_summary(rec.latencies, rec.errors, rec.completed_ok,
                                    args.duration, rows, rec.samples, delta)
            router["timeline"] = timeline(rec.trace, args.duration, rows)
            bare = raw_out = http = None
            if getattr(args, "baseline_http", False):
                http = asyncio.run(run_load(url, argparse.Namespace(**{**vars(args), "protocol": "http"}), path, headers,
                                            body, rows, warmup))  # fmt: skip
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
            rnd = {"round": i + 1, **round_figures(router, raw_out, bare, http),
                   "other_cpu_cores": other, "router_idle_cpu_cores": idle, "router": router}
            if bare is not None:
                rnd["bare"] = bare
            if http is not None:
                rnd["http"] = http
            if raw_out is not None:
                rnd["raw"] = {k: v for k, v in raw_out.items()
                              if k not in ("model_path", "mode", "threads", "providers",
                                           "input_shape")}
            rounds.append(rnd)
            print(round_line(rnd, args.rounds), flush=True)
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
                         "router_over_bare_req", "latency_p50_delta_vs_bare_ms", "router_over_http_req")
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
