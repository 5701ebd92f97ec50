"""Load: closed loops (N clients, each sending again as soon as it is answered) and open
loops (Poisson arrivals at a rate, whatever the server does), with what they record:
latencies, errors by kind, a trace over time, progress lines. The connections are
``benchmarks.http_client``'s.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterator, Optional

from benchmarks.http_client import Connection, Pool, Response

_timeout = getattr(asyncio, "timeout", None)  # Python >= 3.11; cheaper than wait_for


def poisson_arrivals(rate: float, seed: int = 0) -> Iterator[float]:
    """Arrival offsets (s) of a Poisson process: exponential gaps with mean 1/rate."""
    rng, t = random.Random(seed), 0.0
    while True:
        t += rng.expovariate(rate)
        yield t


def percentile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of an already sorted list."""
    if not sorted_xs:
        return float("nan")
    pos = (len(sorted_xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(latencies_s: list[float], errors: dict[str, int], completed_ok: int,
              duration_s: float, rows_per_request: int = 1) -> dict:
    """Throughput, latency percentiles (ms) and errors of one measured window."""
    xs = sorted(latencies_s)
    rps = completed_ok / duration_s if duration_s > 0 else 0.0
    ms: dict[str, Optional[float]] = {"p50": None, "p95": None, "p99": None,
                                      "max": None, "mean": None}
    if xs:
        ms.update({f"p{q}": round(percentile(xs, q) * 1e3, 3) for q in (50, 95, 99)})
        ms.update(max=round(xs[-1] * 1e3, 3), mean=round(sum(xs) / len(xs) * 1e3, 3))
    return {"duration_s": round(duration_s, 3), "ok": len(xs), "completed_ok": completed_ok,
            "errors": dict(sorted(errors.items())), "error_count": sum(errors.values()),
            "req_per_s": round(rps, 2), "img_per_s": round(rps * rows_per_request, 2),
            "latency_ms": ms}


class Trace:
    """Every request that ended at or after the window start: when (s after the start), its
    latency (s) and its error kind (None: ok), for plots over time. Times sit in arrays of
    doubles and at most `cap` requests are kept, so a long run's memory stays bounded."""

    def __init__(self, cap: int = 500_000) -> None:
        self.cap, self.dropped = cap, 0
        self.t, self.latency = array("d"), array("d")
        self.error: list[Optional[str]] = []

    def add(self, t: float, latency: float, error: Optional[str]) -> None:
        if len(self.error) >= self.cap:
            self.dropped += 1
            return
        self.t.append(t)
        self.latency.append(latency)
        self.error.append(error)

    def __len__(self) -> int:
        return len(self.error)


@dataclass
class Recorder:
    """Counts one run. A request belongs to the window if it was *scheduled* inside it
    (latency and errors); throughput counts successes that *completed* inside it, so a
    drain after an overloaded open-loop run cannot inflate req/s. The trace keeps each
    request that *ended* from the window start on, drain included, for plots over time."""

    start: float
    end: float
    latencies: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)  # first error body per status
    completed_ok: int = 0
    done: int = 0
    failed: int = 0
    trace: Trace = field(default_factory=Trace)
    failed_by: Counter = field(default_factory=Counter)  # every error, warmup included
    tick: Optional[list[float]] = None  # ok latencies since the last progress line, if any

    def record(self, t_sched: float, kind: Optional[str]) -> None:
        now = time.monotonic()
        self.done += 1
        if now >= self.start:
            self.trace.add(now - self.start, now - t_sched, kind)
        in_window = self.start <= t_sched < self.end
        if kind is not None:
            self.failed += 1
            self.failed_by[kind] += 1
            if in_window:
                self.errors[kind] += 1
            return
        if self.tick is not None:
            self.tick.append(now - t_sched)
        if in_window:
            self.latencies.append(now - t_sched)
        if self.start <= now < self.end:
            self.completed_ok += 1

    def unfinished(self, t_sched: float) -> None:
        """Still in flight when the drain cap ran out."""
        now = time.monotonic()
        self.failed_by["unfinished"] += 1
        self.trace.add(now - self.start, now - t_sched, "unfinished")
        if self.start <= t_sched < self.end:
            self.errors["unfinished"] += 1


Send = Callable[[Connection], Awaitable[Response]]


async def _one(rec: Recorder, conn: Connection, send: Send, t_sched: float,
               timeout: float) -> None:
    """One request, recorded; a cancelled in-window request counts as "unfinished"."""
    try:
        if _timeout is not None:
            async with _timeout(timeout):
                status, _, body = await send(conn)
        else:
            status, _, body = await asyncio.wait_for(send(conn), timeout)
        if 200 <= status < 300:
            rec.record(t_sched, None)
        else:  # keep the first body of each status: it says why (e.g. "top_k must be...")
            rec.record(t_sched, str(status))
            rec.samples.setdefault(str(status), body[:200].decode("utf-8", "replace"))
    except asyncio.CancelledError:
        rec.unfinished(t_sched)
        raise
    except Exception as e:  # noqa: BLE001 - the class name is the error kind we report
        rec.record(t_sched, type(e).__name__)
        await asyncio.sleep(0.01)  # a dead server must not turn the client into a busy loop


async def _drain(tasks: set[asyncio.Task], cap: float) -> None:
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=cap)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def closed_loop(host: str, port: int, send: Send, concurrency: int, warmup: float,
                      duration: float, drain_cap: float = 30.0, timeout: float = 120.0,
                      progress: bool = True, rows: int = 1,
                      progress_every: float = 1.0) -> Recorder:
    """`concurrency` connections, each sending its next request when the last completes
    (`rows` per request only scales the progress line's img/s)."""
    t0 = time.monotonic()
    rec = Recorder(t0 + warmup, t0 + warmup + duration)

    async def worker() -> None:
        conn = Connection(host, port)
        try:
            while time.monotonic() < rec.end:
                await _one(rec, conn, send, time.monotonic(), timeout)
        finally:
            conn.close()

    bar = Progress(rec, t0, rows, progress_every).start() if progress else None
    tasks = {asyncio.ensure_future(worker()) for _ in range(concurrency)}
    await asyncio.sleep(max(0.0, rec.end - time.monotonic()))
    await _drain(tasks, drain_cap)
    if bar is not None:
        await bar.stop()
    return rec


async def open_loop(host: str, port: int, send: Send, rate: float, warmup: float,
                    duration: float, seed: int = 0, max_connections: int = 256,
                    drain_cap: float = 30.0, timeout: float = 120.0,
                    progress: bool = True, rows: int = 1,
                    progress_every: float = 1.0) -> Recorder:
    """Poisson arrivals at `rate` req/s whatever the server does; latency is measured from
    the scheduled arrival, so waiting for a connection counts (no coordinated omission)."""
    pool = Pool(host, port, max_connections)
    t0 = time.monotonic()
    rec = Recorder(t0 + warmup, t0 + warmup + duration)
    tasks: set[asyncio.Task] = set()

    async def arrival(t_sched: float) -> None:
        try:
            conn = await pool.acquire()
        except asyncio.CancelledError:  # still queued for a connection when the drain ended
            rec.unfinished(t_sched)
            raise
        try:
            await _one(rec, conn, send, t_sched, timeout)
        finally:
            pool.release(conn)

    bar = Progress(rec, t0, rows, progress_every).start() if progress else None
    for offset in poisson_arrivals(rate, seed):
        t_sched = t0 + offset
        if t_sched >= rec.end:
            break
        # sleep(0) when behind schedule still lets in-flight requests progress
        await asyncio.sleep(max(0.0, t_sched - time.monotonic()))
        task = asyncio.ensure_future(arrival(t_sched))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await _drain(set(tasks), drain_cap)
    pool.close()
    if bar is not None:
        await bar.stop()
    return rec


def _ms(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f} ms"


class Progress:
    """The live stderr line, a new one every `every` seconds (readable in a terminal, a log
    or CI alike): the last interval's throughput and p50/p99, so a trend shows while the run
    goes on, plus requests done and errors by kind so far."""

    def __init__(self, rec: Recorder, t0: float, rows: int = 1, every: float = 1.0) -> None:
        self.rec, self.t0, self.rows, self.every = rec, t0, rows, every
        self.last = t0
        self.shown = (0, 0)  # requests done and failed as of the last line
        self._task: Optional[asyncio.Future] = None
        rec.tick = []

    def line(self) -> str:
        """The line for the interval since the previous one (its phase: where it began);
        starts the next interval."""
        rec, now = self.rec, time.monotonic()
        lat, rec.tick = sorted(rec.tick or ()), []
        began, self.last = self.last, now
        dt = max(1e-9, now - began)
        phase = "warmup" if began < rec.start else ("run" if began < rec.end else "drain")
        rps = len(lat) / dt
        p50, p99 = (percentile(lat, 50), percentile(lat, 99)) if lat else (None, None)
        errs = sum(rec.failed_by.values())
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(rec.failed_by.items()))
        return (f"[{now - self.t0:6.1f}s/{round(rec.end - self.t0, 1):g}s {phase:>6}] "
                f"done {rec.done:7d} | last {dt:.1f}s: {rps:7.1f} req/s "
                f"{rps * self.rows:7.1f} img/s  p50 {_ms(p50)}  p99 {_ms(p99)} | "
                f"errors {errs}{f' ({kinds})' if errs else ''}")

    def _write(self) -> None:
        self.shown = (self.rec.done, sum(self.rec.failed_by.values()))
        sys.stderr.write(self.line() + "\n")
        sys.stderr.flush()

    async def _run(self) -> None:
        due = self.t0
        while True:
            due += self.every  # on a schedule, so a busy loop cannot make the lines drift
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            self._write()

    def start(self) -> "Progress":
        self._task = asyncio.ensure_future(self._run())
        return self

    async def stop(self) -> None:
        """Cancel the ticker and stop counting; a last line for the rest (the drain) unless
        it is too short to say anything the previous line did not."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        failed = sum(self.rec.failed_by.values())
        more = self.rec.done != self.shown[0] and time.monotonic() - self.last >= self.every / 5
        if more or failed != self.shown[1]:
            self._write()
        self.rec.tick = None
