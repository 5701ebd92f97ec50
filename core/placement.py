"""Placement policies: which worker gets the next batch, and how many rows.

Pure functions over ``WorkerView`` snapshots, so every rule is unit-tested without Dask.
The front end calls ``place`` each time it could send a batch (late binding: only
workers with room are ever handed a batch); the scheduler plugin calls ``pick`` for
Python-API tasks, which arrive one task at a time with no batch size of their own.
Every policy has the same interface; what differs is only what it does with it.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Protocol

from core.buckets import bucket_for, floor_bucket
from core.worker_view import WorkerView

POLICIES = ("gpu-aware", "round-robin", "least-loaded", "dask-default", "seed-score")


@dataclass(frozen=True)
class Tuning:
    throttle_penalty: float = 0.7  # speed multiplier for a throttling GPU
    memory_headroom: float = 0.1  # fraction of GPU memory never planned for
    error_window: float = 30.0  # seconds a failed batch keeps lowering a worker's weight


def throttling(gpu: dict | None) -> bool:
    """NVML says clocks are held down, or the GPU is past its slowdown temperature."""
    if not gpu:
        return False
    if gpu.get("throttle_reasons"):
        return True
    temp, limit = gpu.get("temperature"), gpu.get("temperature_slowdown")
    return temp is not None and limit is not None and temp >= limit


def slowness(view: WorkerView, now: float, tuning: Tuning) -> float:
    """Multiplier >= 1 on expected service time for signs of trouble that measured
    times have not caught up with yet."""
    factor = 1.0
    if throttling(view.gpu):
        factor /= tuning.throttle_penalty
    recent = sum(1 for t in view.errors if now - t <= tuning.error_window)
    return factor * (1 + recent)


def rows_that_fit(view: WorkerView, tuning: Tuning) -> int | None:
    """Rows a batch may have before it would not fit in free GPU memory; None = no limit
    known. Sizes the worker already ran are free (its allocator keeps that memory)."""
    gpu, per_row = view.gpu, view.reported.get("memory_per_row")
    if not gpu or not per_row or not gpu.get("memory_total") or gpu.get("memory_used") is None:
        return None
    usable = gpu["memory_total"] * (1 - tuning.memory_headroom) - gpu["memory_used"]
    ran = max(view.service.points, default=0)
    return max(0, ran + int(max(0.0, usable) // per_row))


def expected(
    view: WorkerView, rows: int, views: list[WorkerView], now: float, tuning: Tuning, aged: bool = True
) -> float:
    """Seconds a batch of ``rows`` takes on this worker. Unmeasured workers borrow the
    fastest known estimate: they get work at once and are measured by it. ``aged=False``
    reads the curves as measured, without the optimism an idle worker's estimate gains."""
    at = now if aged else None
    t = view.service.estimate(rows, at)
    if t is None:
        known = [e for v in views if (e := v.service.estimate(rows, at)) is not None]
        t = min(known) if known else 0.0
    return t * slowness(view, now, tuning)


def weights(views: list[WorkerView], rows: int, now: float, tuning: Tuning) -> dict[str, float]:
    """Each worker's share of total capacity at this batch size (sums to 1)."""
    speed = {}
    for v in views:
        t = expected(v, rows, views, now, tuning)
        speed[v.address] = (rows / t if t > 0 else 1.0) if v.responsive else 0.0
    total = sum(speed.values())
    return {a: (s / total if total else 0.0) for a, s in speed.items()}


def current_weights(views: list[WorkerView], max_batch: int, now: float, tuning: Tuning) -> dict[str, float]:
    """Each worker's share of capacity at the mean batch size served so far (display)."""
    served = sum(v.rows for v in views) / max(1, sum(v.batches for v in views))
    return weights(views, max(1, min(max_batch, round(served))), now, tuning)


@dataclass(frozen=True)
class Placement:
    view: WorkerView | None  # None: no restriction, Dask decides
    rows: int
    skip: int = 0  # queued rows to leave for workers that will finish them sooner


class Policy(Protocol):
    name: str
    probes_idle: bool  # idle workers with stale curves get probe copies (see the dispatcher)

    def place(
        self, views: list[WorkerView], queued_rows: int, max_batch: int, now: float, unplaced: int = 0
    ) -> Placement | None:
        """The next batch to send now, or None to keep the queue waiting. ``unplaced``:
        batches in flight that no worker was chosen for (Dask placed them)."""

    def pick(self, views: list[WorkerView], now: float) -> WorkerView | None:
        """A worker for one Python-API task (None: leave it to Dask)."""


def _usable(views: list[WorkerView], tuning: Tuning) -> list[WorkerView]:
    return [v for v in views if v.responsive and rows_that_fit(v, tuning) != 0]


def _even_split(views: list[WorkerView], queued_rows: int, max_batch: int) -> int:
    """Split what is queued across the free slots instead of handing it all to one
    worker while another idles (closed-loop clients arrive in waves)."""
    free = sum(max(0, v.window - v.load) for v in views)
    return max(1, min(max_batch, -(-queued_rows // max(1, free))))


def bucket_rows(view: WorkerView | None, rows: int, buckets: tuple[int, ...], queued: int = 0) -> int:
    """The rows a batch placed for ``rows`` should take, knowing it runs padded to a
    bucket. Nearer the bucket above, with that many rows ``queued``: filled up to it
    (more rows for the same shape, no padding). Otherwise cut to the bucket below (all
    real work) or kept and padded up, whichever this worker's curve says serves more
    rows a second: on a GPU a few rows cost about what one does, so small batches are
    padded; on a CPU time grows with rows, so they are cut. A bucket not measured yet is
    padded to, which measures it (workers report their warm-up times, so that is rare)."""
    if not buckets or view is None:
        return rows
    lo, hi = floor_bucket(rows, buckets), bucket_for(rows, buckets)
    if lo >= rows:
        return rows
    if queued >= hi and hi - rows <= rows - lo:
        return hi
    if hi not in view.service.points:
        return rows
    t_lo, t_hi = view.service.estimate(lo), view.service.estimate(hi)
    return rows if t_lo and t_hi and rows / t_hi > lo / t_lo else lo


def _cap(view: WorkerView, rows: int, tuning: Tuning) -> int:
    fit = rows_that_fit(view, tuning)
    return rows if fit is None else max(1, min(rows, fit))


def share_out(starts: list[float], per_row: list[float], rows: int, chunks_per_worker: int = 8) -> tuple[list[int], list[int]]:
    """Rows each worker should take so that all ``rows`` finish as early as possible,
    given when each worker could start and its seconds per row; and, per worker, how
    many queued rows come before its first one.

    List scheduling in small chunks, in queue order: each chunk goes to the worker that
    would finish it first, counting what it was already given. A slow or busy worker
    gets nothing unless that makes the queue finish sooner; one row alone goes to its
    earliest finisher. The oldest rows land on the earliest finishers, so a slow worker's
    rows come from behind the ones a faster worker will finish sooner.
    """
    load = list(starts)
    alloc = [0] * len(starts)
    first = [rows] * len(starts)
    chunk = max(1, -(-rows // (chunks_per_worker * max(1, len(starts)))))
    done = 0
    while done < rows:
        k = min(chunk, rows - done)
        i = min(range(len(load)), key=lambda j: load[j] + k * per_row[j])
        load[i] += k * per_row[i]
        if not alloc[i]:
            first[i] = done
        alloc[i] += k
        done += k
    return alloc, first


@dataclass
class GpuAware:
    """Queued rows are shared so that they all finish as early as possible, from each
    worker's measured speed at this batch size and the work it already has in flight
    (a throttling, memory-full, failing or stuck worker counts as slower or absent).

    A worker with room gets its share now; a share that belongs to a busy worker
    stays queued for it (late binding), so a batch never runs late on a slow worker
    when a faster one would have finished it sooner.
    """

    tuning: Tuning = field(default_factory=Tuning)
    name: str = "gpu-aware"
    probes_idle: bool = True

    def place(self, views, queued_rows, max_batch, now, unplaced=0):
        usable = _usable(views, self.tuning)
        if not usable or queued_rows <= 0:
            return None
        n = min(queued_rows, max_batch)
        starts = [v.remaining(now) + v.overhead for v in usable]
        shares, first = share_out(starts, self._per_row(usable, n, now, aged=True), queued_rows)
        # What the measurements alone justify: an idle worker's aged, optimistic
        # estimate earns it one row, not a full share at a speed it has not shown.
        measured = shares
        if any(v.service.confidence(now) < 1 for v in usable):
            measured, _ = share_out(starts, self._per_row(usable, n, now, aged=False), queued_rows)
        ranked = sorted(range(len(usable)), key=lambda i: (first[i], -shares[i], usable[i].in_flight))
        for i in ranked:
            v = usable[i]
            if v.has_room and shares[i] >= 1:
                rows = min(shares[i], max(1, measured[i]), max_batch)
                return Placement(v, _cap(v, rows, self.tuning), skip=first[i])
        return None  # every share belongs to a busy worker: the queue waits for it

    def _per_row(self, usable: list[WorkerView], n: int, now: float, aged: bool) -> list[float]:
        return [max(expected(v, n, usable, now, self.tuning, aged) / n, 1e-9) for v in usable]

    def pick(self, views, now):
        usable = _usable(views, self.tuning)
        if not usable:
            return None
        return min(usable, key=lambda v: ((v.in_flight + 1) * expected(v, 1, usable, now, self.tuning), v.in_flight))


@dataclass
class RoundRobin:
    name: str = "round-robin"
    probes_idle: bool = False
    _turn: itertools.count = field(default_factory=itertools.count)

    def _next(self, views: list[WorkerView]) -> WorkerView | None:
        ordered = sorted(views, key=lambda v: v.address)
        for _ in range(len(ordered)):
            v = ordered[next(self._turn) % len(ordered)]
            if v.has_room and v.responsive:
                return v
        return None

    def place(self, views, queued_rows, max_batch, now, unplaced=0):
        v = self._next(views) if views else None
        return Placement(v, _even_split(views, queued_rows, max_batch)) if v else None

    def pick(self, views, now):
        ordered = sorted((v for v in views if v.responsive), key=lambda v: v.address)
        return ordered[next(self._turn) % len(ordered)] if ordered else None


@dataclass
class LeastLoaded:
    """Fewest batches in flight; ties go to the one that has served fewest, so idle
    workers share work instead of one taking all."""

    name: str = "least-loaded"
    probes_idle: bool = False

    def _best(self, views: list[WorkerView], need_room: bool) -> WorkerView | None:
        ok = [v for v in views if v.responsive and (v.has_room or not need_room)]
        return min(ok, key=lambda v: (v.in_flight, v.batches), default=None)

    def place(self, views, queued_rows, max_batch, now, unplaced=0):
        v = self._best(views, need_room=True)
        return Placement(v, _even_split(views, queued_rows, max_batch)) if v else None

    def pick(self, views, now):
        return self._best(views, need_room=False)


@dataclass
class DaskDefault:
    """No restriction: Dask's scheduler decides where each batch runs. The front end
    still holds the queue back to the cluster's total window, so batches still form."""

    name: str = "dask-default"
    probes_idle: bool = False

    def place(self, views, queued_rows, max_batch, now, unplaced=0):
        room = sum(v.window for v in views if v.responsive) - unplaced
        if room <= 0 or queued_rows <= 0:
            return None
        return Placement(None, max(1, min(max_batch, -(-queued_rows // room))))

    def pick(self, views, now):
        return None


def seed_score(view: WorkerView) -> float:
    """The replaced Go router's score, on live numbers: free-VRAM percent, minus
    queue/10, latency ms/10, utilisation/2, and 50 if hot."""
    if not view.responsive:
        return -1000.0
    g = view.gpu or {}
    score = 0.0
    if g.get("memory_total"):
        score += (g["memory_total"] - (g.get("memory_used") or 0)) / g["memory_total"] * 100
    score -= view.in_flight / 10
    latency = view.service.estimate(max(1, view.rows // max(1, view.batches))) or 0.0
    score -= latency * 1e3 / 10
    score -= (g.get("utilization_gpu") or 0) / 100 * 50
    if (g.get("temperature") or 0) > 80:
        score -= 50
    return score


@dataclass
class SeedScore:
    """The old system's weighted random choice among the top 3 scores, for comparison."""

    name: str = "seed-score"
    probes_idle: bool = False
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def _choose(self, views: list[WorkerView]) -> WorkerView | None:
        if not views:
            return None
        top = sorted(views, key=seed_score, reverse=True)[:3]
        low = min(seed_score(v) for v in top)
        w = [seed_score(v) - low + 1 for v in top]
        x = self.rng.random() * sum(w)
        for v, wi in zip(top, w):
            x -= wi
            if x <= 0:
                return v
        return top[0]

    def place(self, views, queued_rows, max_batch, now, unplaced=0):
        v = self._choose([v for v in views if v.has_room and v.responsive])
        return Placement(v, _even_split(views, queued_rows, max_batch)) if v else None

    def pick(self, views, now):
        return self._choose([v for v in views if v.responsive])


def make_policy(name: str, tuning: Tuning | None = None) -> Policy:
    tuning = tuning or Tuning()
    if name == "gpu-aware":
        return GpuAware(tuning)
    if name == "round-robin":
        return RoundRobin()
    if name == "least-loaded":
        return LeastLoaded()
    if name == "dask-default":
        return DaskDefault()
    if name == "seed-score":
        return SeedScore()
    raise ValueError(f"unknown placement policy {name!r}: use one of {', '.join(POLICIES)}")
