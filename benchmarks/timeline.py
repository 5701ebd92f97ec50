"""A measured window over time: per-second bins and a thinned sample of single requests.

httpload's Trace records every request that ended from the window start on; this module
turns it into what the JSON record keeps and the report draws (req/s, img/s, p50/p99 and
errors by kind per bin of the window, the same for the drain after it as a whole), so a
figure can be redrawn from the JSON alone. Pure functions
with no I/O, so the tests drive them with exact numbers.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Optional, Sequence

from benchmarks.httpload import Trace, percentile


def _stats(latencies: list[float], errors: Counter) -> dict:
    xs = sorted(latencies)
    return {"ok": len(xs), "p50_ms": round(percentile(xs, 50) * 1e3, 3) if xs else None,
            "p99_ms": round(percentile(xs, 99) * 1e3, 3) if xs else None,
            "errors": dict(sorted(errors.items()))}


def _bin(t: float, latencies: list[float], errors: Counter, width: float, rows: int) -> dict:
    ok = len(latencies)
    return {"t": t, "req_per_s": round(ok / width, 2), "img_per_s": round(ok * rows / width, 2),
            **_stats(latencies, errors)}


def bins(times: Sequence[float], latencies: Sequence[float],
         errors: Sequence[Optional[str]], window_s: float, bin_s: float = 1.0,
         rows: int = 1) -> list[dict]:
    """One dict per `bin_s`-wide bin of the window [0, window_s), each request in the bin
    where it ended (later ones are the drain's). Throughput and latency count successes
    only (an error's latency is how long it took to fail, often a timeout); rates are per
    the bin's width, which for the last bin may be less than `bin_s`."""
    n = math.ceil(window_s / bin_s - 1e-9)
    ok: list[list[float]] = [[] for _ in range(n)]
    errs: list[Counter] = [Counter() for _ in range(n)]
    for t, lat, err in zip(times, latencies, errors):
        if t >= window_s:
            continue
        i = min(int(t // bin_s), n - 1)
        if err is None:
            ok[i].append(lat)
        else:
            errs[i][err] += 1
    return [_bin(round(i * bin_s, 3), ok[i], errs[i], min(bin_s, window_s - i * bin_s), rows)
            for i in range(n)]


def drain(times: Sequence[float], latencies: Sequence[float],
          errors: Sequence[Optional[str]], window_s: float) -> dict:
    """The requests that ended after the window, in one summary (no rates: nothing new was
    sent); `s` is how long after the window the last one ended."""
    tail = [i for i, t in enumerate(times) if t >= window_s]
    span = max((times[i] for i in tail), default=window_s) - window_s
    errs = Counter(errors[i] for i in tail if errors[i] is not None)
    ok = [latencies[i] for i in tail if errors[i] is None]
    return {"s": round(span, 3), **_stats(ok, errs)}


def sample(times: Sequence[float], latencies: Sequence[float],
           errors: Sequence[Optional[str]], max_points: int = 1000) -> dict:
    """Every k-th success (k as small as keeps it under `max_points`): the report's scatter
    of single requests, small enough to keep in the JSON record."""
    ok = [i for i, e in enumerate(errors) if e is None]
    every = max(1, math.ceil(len(ok) / max_points))
    picked = ok[::every]
    return {"every": every, "t": [round(times[i], 3) for i in picked],
            "latency_ms": [round(latencies[i] * 1e3, 2) for i in picked]}


def timeline(trace: Trace, window_s: float, rows: int = 1, bin_s: float = 1.0) -> dict:
    """The JSON record's "timeline" of one window: its bins, its drain, the sample, and how
    many requests the trace kept (`dropped`: ended after its cap was reached)."""
    t, lat, err = trace.t, trace.latency, trace.error
    return {"bin_s": bin_s, "window_s": window_s, "rows_per_request": rows,
            "requests": len(trace), "dropped": trace.dropped,
            "bins": bins(t, lat, err, window_s, bin_s, rows),
            "drain": drain(t, lat, err, window_s), "sample": sample(t, lat, err)}
