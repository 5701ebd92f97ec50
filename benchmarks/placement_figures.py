"""The placement benchmark's figures and targets: pure functions over what a run
recorded, so tests drive every one of them on synthetic data."""

from __future__ import annotations

import math
import statistics
from typing import Any, Iterable, Optional

LOADS = (0.70, 0.95)
BIN_S = 0.5  # kill run: completions are counted per bin of this width


def load_key(load: float) -> str:
    """0.7 -> "0.70": the key a load's figures are stored under."""
    return f"{load:.2f}"


def goodput(latencies_s: Iterable[float], deadline_s: float, duration_s: float) -> float:
    """Answers (2xx, scheduled inside the window) within the deadline, per window second."""
    return sum(1 for x in latencies_s if x <= deadline_s) / duration_s if duration_s > 0 \
        else 0.0


def worker_deltas(before: Optional[dict], after: Optional[dict]) -> dict[str, dict]:
    """Per worker name, from two GET /v1/workers snapshots: rows and batches served in
    between, its share of all those rows, its mean batch, its service-time curve at the
    end. A worker that joined in between counts from zero; one gone by the end (killed) is
    left out, its rows unknown."""
    def by_name(snap: Optional[dict]) -> dict[str, dict]:
        return {w.get("name") or w["address"]: w for w in (snap or {}).get("workers", [])}

    b, out = by_name(before), {}
    for name, w in sorted(by_name(after).items()):
        w0 = b.get(name, {})
        rows = max(0, int(w.get("rows", 0)) - int(w0.get("rows", 0)))
        batches = max(0, int(w.get("batches", 0)) - int(w0.get("batches", 0)))
        out[name] = {"rows": rows, "batches": batches,
                     "mean_batch": round(rows / batches, 3) if batches else None,
                     "service_s": w.get("service_s") or {}, "weight": w.get("weight")}
    total = sum(d["rows"] for d in out.values())
    for d in out.values():
        d["share"] = round(d["rows"] / total, 4) if total else None
    return out


def curve_estimate(service_s: dict, rows: float) -> Optional[float]:
    """Seconds per batch of `rows` from a /v1/workers `service_s` curve ({"1": s, "4": s},
    keyed by batch size): linear between measured sizes, the smallest's time below them,
    the largest's per-row time above them. None when nothing was measured."""
    pts = sorted((int(k), float(v)) for k, v in (service_s or {}).items())
    if not pts:
        return None
    if rows <= pts[0][0]:
        return pts[0][1]
    if rows >= pts[-1][0]:
        return pts[-1][1] * rows / pts[-1][0]
    for (lo, tlo), (hi, thi) in zip(pts, pts[1:]):
        if lo <= rows <= hi:
            return tlo + (thi - tlo) * (rows - lo) / (hi - lo)
    return None  # unreachable


def latency_bound(worker: str, delta: Optional[dict], max_queue_delay_s: float,
                  factor: float = 1.5) -> dict:
    """The 70 % target's bound: factor x (the worker's batch latency + max_queue_delay),
    its batch latency being its service-time curve (at the window's end) read at the mean
    batch it ran in the window (rows delta / batches delta)."""
    if not delta or not delta.get("batches"):
        return {"worker": worker, "bound_ms": None,
                "how": f"{worker} ran no batches in the window: no bound"}
    mean = delta["rows"] / delta["batches"]
    est = curve_estimate(delta["service_s"], mean)
    if est is None:
        return {"worker": worker, "bound_ms": None, "mean_batch": round(mean, 3),
                "how": f"{worker} has no service_s curve: no bound"}
    bound = factor * (est + max_queue_delay_s)
    curve = ", ".join(f"{k}: {float(v) * 1e3:.1f}" for k, v in
                      sorted(delta["service_s"].items(), key=lambda kv: int(kv[0])))
    how = (f"{worker} ran {delta['rows']} rows in {delta['batches']} batches (mean "
           f"{mean:.2f}); its service_s curve at the window's end (ms per batch by size) "
           f"{{{curve}}} gives {est * 1e3:.1f} ms at {mean:.2f} rows; "
           f"{factor:g} x ({est * 1e3:.1f} + max_queue_delay {max_queue_delay_s * 1e3:g}) "
           f"= {bound * 1e3:.1f} ms")
    return {"worker": worker, "mean_batch": round(mean, 3), "batch_latency_ms":
            round(est * 1e3, 3), "bound_ms": round(bound * 1e3, 3), "how": how}


def is_lost(kind: str) -> bool:
    """Outcome kinds (an HTTP status, or an error name) that mean the request is lost: a
    5xx, or no answer at all (connection error, client timeout, still unanswered when the
    drain ended: "unfinished", "CancelledError"). 2xx is answered, 4xx rejected."""
    return not (kind.isdigit() and int(kind) < 500)


def lost_requests(outcomes: dict[str, int]) -> dict:
    """Lost and rejected (4xx) counts from outcome kind -> count."""
    lost = {k: v for k, v in outcomes.items() if is_lost(k)}
    return {"lost": sum(lost.values()), "lost_by_kind": lost,
            "rejected_4xx": sum(v for k, v in outcomes.items()
                                if k.isdigit() and 400 <= int(k) < 500)}


def throughput_bins(done_at: Iterable[float], t_kill: float, start: float, end: float,
                    width: float = BIN_S) -> list[tuple[float, float]]:
    """Completions per second in bins of `width` covering [start, end), aligned so that a
    bin edge falls on t_kill: (bin start relative to the kill, rate). Only bins wholly
    inside [start, end) are returned."""
    k0, k1 = math.ceil((start - t_kill) / width - 1e-9), math.floor((end - t_kill) / width)
    counts = [0] * max(0, k1 - k0)
    for t in done_at:
        k = math.floor((t - t_kill) / width) - k0
        if 0 <= k < len(counts):
            counts[k] += 1
    return [(round((k0 + i) * width, 6), c / width) for i, c in enumerate(counts)]


def recovery_time(bins: list[tuple[float, float]], threshold: float,
                  sustain: int = 2) -> Optional[float]:
    """Seconds from the kill to the start of the first bin after it that is >= threshold
    and starts a stretch of `sustain` bins whose mean is too (one lucky bin is not enough;
    a backlog burst after an empty bin does not hide it). 0.0: no visible dip; resolution
    one bin. None if the window ended first."""
    post = [(t, r) for t, r in bins if t >= 0]
    for i in range(len(post) - sustain + 1):
        if post[i][1] >= threshold and \
                statistics.fmean(r for _, r in post[i:i + sustain]) >= threshold:
            return post[i][0]
    return None


def survivor_fraction(slowdowns: list[float], killed: int) -> float:
    """The survivors' share of capacity if worker i serves in proportion to 1/slowdown_i."""
    speeds = [1 / s for s in slowdowns]
    return (sum(speeds) - speeds[killed]) / sum(speeds)


HEADLINE = ("offered_req_per_s", "completed_req_per_s", "goodput_req_per_s",
            "goodput_over_capacity", "goodput_over_offered", "mean_batch")


def median_summary(windows: list[dict]) -> dict:
    """One policy at one load over its rounds: the median of each figure (rounds where it
    is missing left out), error counts summed, per-worker shares as medians."""
    def med(xs: list) -> Optional[float]:
        xs = [x for x in xs if x is not None]
        return round(statistics.median(xs), 4) if xs else None

    out: dict[str, Any] = {"rounds": len(windows)}
    for k in HEADLINE:
        out[k] = med([w.get(k) for w in windows])
    out["latency_ms"] = {q: med([w["latency_ms"].get(q) for w in windows])
                         for q in ("p50", "p95", "p99", "max")}
    errors: dict[str, int] = {}
    for w in windows:
        for k, v in w["errors"].items():
            errors[k] = errors.get(k, 0) + v
    out["errors"] = errors
    names = sorted({n for w in windows for n in w["workers"]})
    out["share"] = {n: med([w["workers"].get(n, {}).get("share") for w in windows])
                    for n in names}
    bounds = [w.get("latency_bound") or {} for w in windows]
    out["latency_bound_ms"] = med([b.get("bound_ms") for b in bounds])
    out["latency_bound_how"] = [
        f"{'round ' + str(w['round']) + ': ' if len(windows) > 1 and 'round' in w else ''}"
        f"{b['how']}" for w, b in zip(windows, bounds) if b.get("how")]
    return out


def _check(name: str, measured: Optional[float], op: str, threshold: Optional[float],
           unit: str, how: str) -> dict:
    met = None
    if measured is not None and threshold is not None:
        met = measured >= threshold if op == ">=" else measured <= threshold
    return {"target": name, "measured": measured, "op": op, "threshold": threshold,
            "unit": unit, "met": met, "how": how}


def check_targets(summary: dict[str, dict[str, dict]], capacity: Optional[float]) -> list[dict]:
    """The issue's targets from the per-policy summaries (summary[policy][load_key]);
    met is None where a figure was not measured."""
    lo, hi = load_key(LOADS[0]), load_key(LOADS[1])
    ga = summary.get("gpu-aware", {})
    out = []
    g = ga.get(hi, {}).get("goodput_req_per_s")
    offered = ga.get(hi, {}).get("offered_req_per_s")
    out.append(_check(
        "gpu-aware goodput at 95 % load >= 0.95 x aggregate capacity",
        None if g is None or not capacity else round(g / capacity, 4), ">=", 0.95, "x C",
        f"goodput {g} req/s / capacity {capacity} req/s; the window's Poisson arrivals "
        f"offered {offered} req/s, and goodput cannot exceed that"))
    s = ga.get(lo, {})
    p99, bound = s.get("latency_ms", {}).get("p99"), s.get("latency_bound_ms")
    out.append(_check(
        "gpu-aware p99 at 70 % load <= 1.5 x (fastest worker's batch latency + "
        "max_queue_delay)", p99, "<=", bound, "ms",
        " | ".join(s.get("latency_bound_how") or ["gpu-aware not measured at 70 %"])))
    for other in ("round-robin", "seed-score"):
        for key in (lo, hi):
            mine = ga.get(key, {}).get("latency_ms", {}).get("p99")
            theirs = summary.get(other, {}).get(key, {}).get("latency_ms", {}).get("p99")
            ratio = round(theirs / mine, 3) if mine and theirs is not None else None
            out.append(_check(
                f"gpu-aware p99 >= 2x better than {other} at {float(key):.0%} load", ratio,
                ">=", 2.0, "x", f"{other} p99 {theirs} ms / gpu-aware p99 {mine} ms"))
    return out


def kill_target(k: dict) -> dict:
    """The kill run's target: throughput back within 5 s (the requests lost are in `how`)."""
    return _check(
        "kill run: throughput back to >= 90 % of the survivors' expected rate within 5 s",
        k.get("recovery_s"), "<=", 5.0, "s",
        f"first {k['bin_s']:g} s bin after the kill that, and the mean of it and the next "
        f"bin, is >= {k['threshold_req_per_s']} req/s (0.9 x min(offered {k['rate']}, "
        f"kill-run capacity {k['capacity']['req_per_s']} x survivors' speed share "
        f"{k['survivor_fraction']})); requests lost: {k['lost']}")
