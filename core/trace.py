"""Per-request traces: where one request's time goes, hop by hop (``batch-router.trace``).

A traced request collects monotonic timestamps, in seconds, as it passes each point:

    arrival        the front end has the request's headers (Tornado's prepare)
    queued         parsed and in the batch queue
    bound          its batch left for a worker (the batch that answered it)
    task_start     the worker's task began
    compute_start  the first run of its batch took the device
    compute_end    the last run of its batch gave the device back
    reply_sent     the worker handed the reply to Dask
    received       the front end had the reply
    answered       the response was written

Stamps from one host share ``CLOCK_MONOTONIC`` across processes (``core.host``). A worker on another
host has its own clock: its four stamps are then shifted so its span sits in the middle
of the front end's bound -> received interval (the offset a round trip can estimate),
and the trace says so. Off (the default), nothing is stamped: a request carries None.
"""

from __future__ import annotations

import statistics

STAMPS = ("arrival", "queued", "bound", "task_start", "compute_start", "compute_end", "reply_sent", "received", "answered")
WORKER_STAMPS = STAMPS[3:7]
# Each hop is the time between two consecutive stamps, named for what fills it.
HOPS = ("read_parse", "queue", "to_worker", "decode_wait", "compute", "output", "to_front_end", "respond")


def align(trace: dict, worker: list[float], same_clock: bool) -> None:
    """Add the worker's stamps to ``trace``, on the front end's clock."""
    offset = 0.0
    if not same_clock:
        offset = (trace["bound"] + trace["received"]) / 2 - (worker[0] + worker[-1]) / 2
    trace.update({name: t + offset for name, t in zip(WORKER_STAMPS, worker)})
    trace["clock"] = "shared" if same_clock else "estimated"


def hops(trace: dict) -> dict[str, float]:
    """Milliseconds spent in each hop; they add up to answered - arrival."""
    return {hop: round(1e3 * (trace[b] - trace[a]), 3) for hop, a, b in zip(HOPS, STAMPS, STAMPS[1:])}


def complete(trace: dict) -> bool:
    return all(name in trace for name in STAMPS)


def summary(traces: list[dict]) -> dict:
    """Median and mean of each hop, and of the whole, over complete traces."""
    done = [hops(t) for t in traces if complete(t)]
    if not done:
        return {"count": 0}
    totals = [sum(h.values()) for h in done]
    out: dict = {"count": len(done), "total_ms": {"p50": round(statistics.median(totals), 3),
                                                   "mean": round(statistics.fmean(totals), 3)}}  # fmt: skip
    out["hops_ms"] = {hop: {"p50": round(statistics.median(h[hop] for h in done), 3),
                            "mean": round(statistics.fmean(h[hop] for h in done), 3)} for hop in HOPS}  # fmt: skip
    return out
