"""Placement benchmark: every policy against the same offered load on unequal workers.

    python -m benchmarks.placement [--slowdown 1,4] [--mode classify|infer]
        [--policies gpu-aware,round-robin,...] [--duration 30s] [--deadline 2s]
        [--rounds N] [--send-deadline] [--no-kill-run] [--json P] [--plot P.png] [--quick]

For each policy a fresh `batch-router up --worker-slowdown 1,4 --policy P` is started on
free ports and warmed up (so every worker has measured service times). The first policy's
router (gpu-aware by default) also measures the aggregate capacity C once, in a closed loop
that saturates it; every policy then faces the same open-loop Poisson windows at 70 % and
95 % of that C, with the same arrival sequence. Goodput counts the 2xx answers that came
within --deadline of their *scheduled* arrival, per second of window; with
--send-deadline each request also carries that deadline as its Triton ``timeout``, as a
client with a deadline would send it, so the router sheds what is already late. Policies run in the
order given, and with --rounds N the whole set repeats N times (the machine's speed drifts
by minutes) and the medians per policy are quoted.

The kill run starts gpu-aware with one extra fast worker (default 1,1,4), measures that
cluster's capacity, offers 60 % of it, SIGKILLs the fast worker local-0 mid-window and
records every completion's time: the requests lost, and how long until completions per
0.5 s are back to 90 % of what the survivors can serve.

The figures and targets are computed by pure functions in placement_figures.py (tests
drive them on synthetic data) and printed by placement_report.py; httpload makes the
load, placement_routers.py starts the routers (through servers.py) and finds their
workers, plot.py draws the PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from benchmarks.http_client import Connection
from benchmarks.httpload import closed_loop, open_loop, summarize
from benchmarks.loadtest import parse_duration
from benchmarks.placement_figures import (
    BIN_S,
    LOADS,
    check_targets,
    goodput,
    kill_target,
    latency_bound,
    load_key,
    lost_requests,
    median_summary,
    recovery_time,
    survivor_fraction,
    throughput_bins,
    worker_deltas,
)
from benchmarks.placement_report import (
    kill_lines,
    print_table,
    print_targets,
    window_line,
)
from benchmarks.placement_routers import Router, git_dirty, is_dead, worker_pids
from benchmarks.report import machine, write_json
from benchmarks.windows import get_json
from core.placement import POLICIES

RESULTS = Path(__file__).resolve().parent / "results"


# -- measurements ----------------------------------------------------------------------


def warm_up(r: Router, args: argparse.Namespace) -> None:
    """A short closed loop, so every worker has run batches and has a service-time curve."""
    asyncio.run(closed_loop(r.host, r.port, r.send, args.warmup_concurrency, warmup=0.0,
                            duration=args.warmup, drain_cap=args.drain_cap,
                            timeout=args.timeout, progress=False))


def measure_capacity(r: Router, args: argparse.Namespace) -> dict:
    """Completed req/s of a closed loop with enough connections to keep every worker busy."""
    rec = asyncio.run(closed_loop(r.host, r.port, r.send, args.capacity_concurrency,
                                  warmup=1.0, duration=args.capacity_duration,
                                  drain_cap=args.drain_cap, timeout=args.timeout,
                                  progress=not args.quiet))
    s = summarize(rec.latencies, dict(rec.errors), rec.completed_ok, args.capacity_duration)
    print(f"capacity ({r.policy}, {len(r.slowdown)} workers at {r.slowdown}, "
          f"{args.capacity_concurrency} connections, {args.capacity_duration:g} s): "
          f"{s['req_per_s']:.2f} req/s, p50 {s['latency_ms']['p50']} ms, "
          f"errors {s['errors'] or 'none'}", flush=True)
    return {"req_per_s": s["req_per_s"], "policy": r.policy, "slowdown": r.slowdown,
            "concurrency": args.capacity_concurrency, "duration_s": args.capacity_duration,
            "errors": s["errors"], "latency_ms": s["latency_ms"]}


async def _open_window(r: Router, args: argparse.Namespace, rate: float, duration: float,
                       seed: int, kill: Optional[tuple[float, int]] = None,
                       done_log: Optional[list] = None):
    """One open-loop window; /v1/workers read as the measured part starts and after the
    drain. `kill` = (seconds into the measured part, pid): SIGKILL it then; `done_log`
    collects (monotonic time, status or error kind) of every answer."""
    send = r.send
    if done_log is not None:
        async def send(conn: Connection):  # noqa: F811 - the same send, timed
            try:
                resp = await r.send(conn)
            except BaseException as e:
                done_log.append((time.monotonic(), type(e).__name__))
                raise
            done_log.append((time.monotonic(), str(resp[0])))
            return resp

    killed: dict[str, Any] = {}

    async def at_start() -> Optional[dict]:
        await asyncio.sleep(args.window_warmup)
        snap = await get_json(r.host, r.port, "/v1/workers")
        if kill is not None:
            await asyncio.sleep(kill[0])
            killed["snap"] = await get_json(r.host, r.port, "/v1/workers")
            os.kill(kill[1], signal.SIGKILL)
            killed["t"] = time.monotonic()
            print(f"\nkilled pid {kill[1]} at {kill[0]:g} s into the window", flush=True)
        return snap

    before = asyncio.ensure_future(at_start())
    rec = await open_loop(r.host, r.port, send, rate, warmup=args.window_warmup,
                          duration=duration, seed=seed, max_connections=args.max_connections,
                          drain_cap=args.drain_cap, timeout=args.timeout,
                          progress=not args.quiet)
    snap0 = await before
    snap1 = await get_json(r.host, r.port, "/v1/workers")
    return rec, snap0, snap1, killed


def window_figures(rec: Any, snap0: Optional[dict], snap1: Optional[dict], rate: float,
                   duration: float, capacity: float, deadline: float) -> dict:
    """A window's figures from its Recorder and the /v1/workers snapshots around it."""
    s = summarize(rec.latencies, dict(rec.errors), rec.completed_ok, duration)
    sent = s["ok"] + s["error_count"]  # scheduled inside the window
    good = goodput(rec.latencies, deadline, duration)
    workers = worker_deltas(snap0, snap1)
    rows = sum(w["rows"] for w in workers.values())
    batches = sum(w["batches"] for w in workers.values())
    return {"rate": round(rate, 3), "offered_req_per_s": round(sent / duration, 3),
            "sent": sent, "ok": s["ok"],
            "completed_req_per_s": s["req_per_s"], "goodput_req_per_s": round(good, 3),
            "within_deadline": round(good * duration),
            "goodput_over_capacity": round(good / capacity, 4) if capacity else None,
            "goodput_over_offered": round(good * duration / sent, 4) if sent else None,
            "latency_ms": s["latency_ms"], "errors": s["errors"],
            "error_samples": dict(rec.samples), "workers": workers,
            "mean_batch": round(rows / batches, 3) if batches else None}


def fastest(slowdown: list[float]) -> str:
    return f"local-{min(range(len(slowdown)), key=lambda i: slowdown[i])}"


def run_policy(args: argparse.Namespace, policy: str, rnd: int,
               capacity: Optional[dict]) -> tuple[Optional[dict], list[dict]]:
    """Start a router with this policy, warm it, (measure capacity if not yet known), then
    one open-loop window per load. Returns (capacity, windows)."""
    r = Router(args, policy, args.slowdown)
    windows = []
    try:
        print(f"[round {rnd}] {policy}: warming up {args.warmup:g} s  (log {r.log})",
              flush=True)
        warm_up(r, args)
        if capacity is None:
            capacity = measure_capacity(r, args)
        c = capacity["req_per_s"]
        for i, load in enumerate(LOADS):
            rate = load * c
            rec, s0, s1, _ = asyncio.run(_open_window(r, args, rate, args.duration,
                                                      args.seed + i))
            w = window_figures(rec, s0, s1, rate, args.duration, c, args.deadline)
            w.update(policy=policy, load=load, round=rnd)
            name = fastest(args.slowdown)
            w["latency_bound"] = latency_bound(name, w["workers"].get(name),
                                               args.max_queue_delay_s)
            windows.append(w)
            print(window_line(w), flush=True)
    finally:
        r.close()
    return capacity, windows


def kill_run(args: argparse.Namespace) -> dict:
    """gpu-aware with one more fast worker; SIGKILL local-0 mid-window; every completion's
    time kept for the throughput timeline."""
    slowdown = args.kill_slowdown or [min(args.slowdown)] + args.slowdown
    r = Router(args, "gpu-aware", slowdown)
    try:
        print(f"kill run: gpu-aware, {len(slowdown)} workers at {slowdown}  (log {r.log})",
              flush=True)
        warm_up(r, args)
        cap = measure_capacity(r, args)
        victim = fastest(slowdown)
        pid = worker_pids(r.proc.pid).get(victim)
        if pid is None:
            raise RuntimeError(f"no worker process named {victim} under the router")
        rate = args.kill_load * cap["req_per_s"]
        log: list[tuple[float, str]] = []
        t0 = time.monotonic()
        rec, s0, s1, killed = asyncio.run(_open_window(
            r, args, rate, args.kill_duration, args.seed + 7, kill=(args.kill_at, pid),
            done_log=log))
        dead = is_dead(pid)
    finally:
        r.close()
    start = rec.start
    t_kill = killed.get("t", start + args.kill_at)
    frac = survivor_fraction(slowdown, int(victim.rsplit("-", 1)[1]))
    expected = min(rate, cap["req_per_s"] * frac)
    threshold = 0.9 * expected
    ok_times = [t for t, kind in log if kind.isdigit() and 200 <= int(kind) < 300]
    bins = throughput_bins(ok_times, t_kill, start, rec.end)
    pre = [x for t, x in bins if t < 0]
    s = summarize(rec.latencies, dict(rec.errors), rec.completed_ok, args.kill_duration)
    out = {"slowdown": slowdown, "capacity": cap, "load": args.kill_load,
           "rate": round(rate, 3), "killed": victim, "pid": pid, "pid_dead_after": dead,
           "kill_at_s": round(t_kill - start, 3), "duration_s": args.kill_duration,
           "sent": s["ok"] + s["error_count"], "ok": s["ok"], "errors": s["errors"],
           "error_samples": dict(rec.samples), "sent_whole_run": len(log),
           **lost_requests(dict(Counter(kind for _, kind in log))),
           "latency_ms": s["latency_ms"], "survivor_fraction": round(frac, 4),
           "expected_req_per_s": round(expected, 3), "threshold_req_per_s": round(threshold, 3),
           "pre_kill_req_per_s": round(statistics.fmean(pre), 3) if pre else None,
           "recovery_s": recovery_time(bins, threshold), "bin_s": BIN_S,
           "bins": [{"t": t, "req_per_s": x} for t, x in bins],
           "load_start_s": round(start - t0, 3),
           "workers_before_kill": worker_deltas(s0, killed.get("snap")),
           "workers_after_kill": worker_deltas(killed.get("snap"), s1), "log": r.log}
    print(kill_lines(out), flush=True)
    return out


# -- command line ----------------------------------------------------------------------


def _slowdowns(text: str) -> list[float]:
    try:
        xs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected factors like 1,4: {text!r}") from None
    if not xs or min(xs) < 1:
        raise argparse.ArgumentTypeError("slowdown factors must be >= 1")
    return xs


def _path(text: str) -> Optional[Path]:
    return Path(text) if text else None


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.placement",
                                description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--slowdown", type=_slowdowns, default=[1.0, 4.0],
      help="per worker, 2-4 factors (--worker-slowdown); default 1,4")
    a("--threads", type=int, default=1, help="ONNX Runtime threads per worker")
    a("--mode", choices=("classify", "infer"), default="classify")
    a("--model", default="resnet50", help="model name in /v2/models/<model>")
    a("--model-path", type=Path, help="ONNX file (default: the built-in ResNet-50)")
    a("--batch-rows", type=int, default=1, help="infer mode: rows per request")
    a("--policies", help=f"comma-separated, in run order (default: all, {','.join(POLICIES)})")
    a("--max-queue-delay", default="0ms", help="batch-router up --max-queue-delay")
    a("--window", type=int, help="batch-router up --window (default: its own)")
    a("--spawn-args", default="", help="more arguments for batch-router up")
    a("--warmup", type=parse_duration, default=3.0, help="per router, closed loop")
    a("--warmup-concurrency", type=int, default=8)
    a("--capacity", type=float, help="skip the capacity measurement: use this req/s")
    a("--capacity-duration", type=parse_duration, default=10.0)
    a("--capacity-concurrency", type=int, default=24)
    a("--duration", type=parse_duration, default=30.0, help="each open-loop window")
    a("--window-warmup", type=parse_duration, default=2.0,
      help="open-loop arrivals before each measured window (same rate)")
    a("--deadline", type=parse_duration, default=2.0, help="goodput: answered within this")
    a("--send-deadline", action="store_true",
      help="send --deadline as each request's timeout, so the router sheds late requests (504)")
    a("--rounds", type=int, default=1, help="repeat every policy; medians are quoted")
    a("--kill-run", action=argparse.BooleanOptionalAction, default=True,
      help="gpu-aware with one more fast worker, SIGKILL local-0 mid-window")
    a("--kill-slowdown", type=_slowdowns,
      help="kill run's workers (default: the fastest factor, then --slowdown)")
    a("--kill-load", type=float, default=0.6, help="of the kill cluster's capacity")
    a("--kill-duration", type=parse_duration, default=20.0)
    a("--kill-at", type=parse_duration, help="into the window (default 40 %% of it)")
    a("--max-connections", type=int, default=256)
    a("--timeout", type=parse_duration, default=60.0, help="per request (client side)")
    a("--drain-cap", type=parse_duration, default=30.0, help="max wait for in-flight at end")
    a("--seed", type=int, default=0)
    a("--json", type=_path, default=RESULTS / "placement.json", help="'' for none")
    a("--plot", type=_path, default=RESULTS / "placement.png",
      help="PNG (needs the bench extra: matplotlib); '' for none")
    a("--quick", action="store_true",
      help="smoke test: 2 policies, windows of seconds, short kill run")
    a("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not 2 <= len(args.slowdown) <= 4:
        p.error("--slowdown takes 2 to 4 factors (one per worker)")
    if args.quick:
        given = set(argv or [])
        quick = {"--capacity-duration": ("capacity_duration", 2.0),
                 "--duration": ("duration", 3.0), "--warmup": ("warmup", 1.0),
                 "--window-warmup": ("window_warmup", 0.5),
                 "--kill-duration": ("kill_duration", 4.0), "--drain-cap": ("drain_cap", 10.0)}
        for flag, (attr, value) in quick.items():
            if flag not in given and not any(g.startswith(flag + "=") for g in given):
                setattr(args, attr, value)
        if args.policies is None:
            args.policies = "gpu-aware,round-robin"
    args.policies = [x.strip() for x in (args.policies or ",".join(POLICIES)).split(",")
                     if x.strip()]
    bad = [x for x in args.policies if x not in POLICIES]
    if bad or not args.policies:
        p.error(f"unknown policies {bad}; choose from {','.join(POLICIES)}")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    try:
        args.max_queue_delay_s = parse_duration(args.max_queue_delay)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.kill_at is None:
        args.kill_at = 0.4 * args.kill_duration
    if not 0 < args.kill_at < args.kill_duration:
        p.error("--kill-at must fall inside --kill-duration")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    record: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {**machine(), "git_dirty": git_dirty()}}
    capacity: Optional[dict] = None
    if args.capacity:
        capacity = {"req_per_s": args.capacity, "policy": None, "given": True}
    windows: list[dict] = []
    failures: list[dict] = []
    for rnd in range(1, args.rounds + 1):
        for policy in args.policies:
            try:
                capacity, ws = run_policy(args, policy, rnd, capacity)
                windows += ws
            except (Exception, SystemExit) as e:  # one broken policy must not end the run
                print(f"[round {rnd}] {policy} failed: {e!r}", file=sys.stderr, flush=True)
                failures.append({"policy": policy, "round": rnd, "error": repr(e)})
    record["capacity"] = capacity
    if args.kill_run:
        try:
            record["kill_run"] = kill_run(args)
        except (Exception, SystemExit) as e:
            print(f"kill run failed: {e!r}", file=sys.stderr, flush=True)
            failures.append({"policy": "kill-run", "error": repr(e)})
    c = capacity["req_per_s"] if capacity else None
    summary: dict[str, dict[str, dict]] = {}
    for policy in args.policies:
        for load in LOADS:
            ws = [w for w in windows if w["policy"] == policy and w["load"] == load]
            if ws:
                summary.setdefault(policy, {})[load_key(load)] = median_summary(ws)
    record.update(windows=windows, summary=summary, failures=failures)
    if c:
        print_table(summary, c, args.rounds)
    targets = check_targets(summary, c)
    if "kill_run" in record:
        targets.append(kill_target(record["kill_run"]))
    record["targets"] = targets
    print_targets(targets)
    if args.json:
        write_json(args.json, record)
    if args.plot:
        from benchmarks.plot import plot_placement

        plot_placement(record, args.plot)
    return 1 if failures or not windows else 0


if __name__ == "__main__":
    sys.exit(main())
