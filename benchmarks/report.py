"""What a load test prints, and the parts of its JSON record that describe the run.

The human-readable output (one window's throughput, latency, errors and mean batch block,
the per-round table) and the JSON record's head (the configuration and the machine, git
commit included) and its writing live here, so that the single run and --rounds print and
record in the same format, defined in one place; the measured figures themselves come from
windows.py and rounds.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Optional

from benchmarks.servers import ROOT


def machine() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "git_commit": commit}


PAGE_LABELS = {"gpu-metrics": "GPU metrics", "batch-queues": "batch queues"}


def dashboard_line(info: Any, known: Optional[str] = None) -> str:
    """Where to watch the run live, from the server's GET /v1/dashboard answer: its overview
    page, then the others. `known` is the dashboard we started it with (--spawn), shown only
    when the server does not say (an older router, or not a router at all)."""
    pages = info.get("pages") if isinstance(info, dict) else None
    pages = {k: v for k, v in pages.items() if isinstance(v, str)} \
        if isinstance(pages, dict) else {}
    main = pages.pop("overview", None) or (info.get("dashboard")
                                           if isinstance(info, dict) else None)
    if not isinstance(main, str):
        return "dashboard: not reported by the server" + \
            (f"; the spawned router's Dask dashboard: {known}" if known else "")
    rest = ", ".join(f"{PAGE_LABELS.get(k, k.replace('-', ' '))}: {v}" for k, v in pages.items())
    return f"dashboard: {main}" + (f" ({rest})" if rest else "")


def print_summary(title: str, s: dict) -> None:
    lat = s["latency_ms"]
    ms = "  ".join(f"{k} {'n/a' if lat[k] is None else f'{lat[k]:.1f}'}"
                   for k in ("p50", "p95", "p99", "max"))
    errs = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "none"
    why = "".join(f"\n    {k}: {v!r}" for k, v in s.get("error_samples", {}).items())
    mb, pad = s.get("mean_batch"), s.get("padded_fraction")
    padding = "" if pad is None else f" rows ({100 * pad:.1f} % of the rows run were padding)"
    print(f"{title}\n"
          f"  throughput  {s['req_per_s']:.1f} req/s  {s['img_per_s']:.1f} img/s"
          f"  ({s['ok']} ok in {s['duration_s']:.1f} s)\n"
          f"  latency ms  {ms}\n"
          f"  errors      {errs}{why}\n"
          f"  mean batch  {'n/a' if mb is None else f'{mb:.2f}'}{padding}", flush=True)


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


def round_line(rnd: dict, total: int) -> str:
    """The line printed as each round ends: its headline figures and ratios, then the cores
    others kept busy in each of its windows and what the idle router used meanwhile."""
    other, idle = rnd["other_cpu_cores"], rnd["router_idle_cpu_cores"]
    errs = sum(rnd["router"]["errors"].values())
    line = (f"round {rnd['round']}/{total}: router "
            f"{_fmt(rnd['router_img_per_s'], '{:.1f}')} img/s "
            f"p50 {_fmt(rnd['router_p50_ms'], '{:.2f}')} ms"
            f"{f' ({errs} errors)' if errs else ''}")
    if "bare" in rnd:
        line += (f" | bare {_fmt(rnd['bare_req_per_s'], '{:.1f}')} req/s "
                 f"p50 {_fmt(rnd['bare_p50_ms'], '{:.2f}')} ms, "
                 f"ratio {_fmt(rnd['router_over_bare_req'], '{:.3f}')}")
    if "raw" in rnd:
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
    return line


def run_record(args: argparse.Namespace, url: str) -> dict:
    """The JSON record's head: the configuration (paths as strings), the machine, the URL."""
    return {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": machine(), "url": url}


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def trace_line(trace: dict) -> str:
    """A router's /v1/trace summary (core.trace) as one line: each hop's median, in order."""
    hops = ", ".join(f"{hop} {v['p50']}" for hop, v in trace["hops_ms"].items())
    return (f"trace of the last {trace['count']} requests, p50 ms a hop: {hops}; "
            f"whole p50 {trace['total_ms']['p50']}, mean {trace['total_ms']['mean']}")
