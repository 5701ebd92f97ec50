"""Admission by expected wait: shed at the door what would wait too long anyway.

A bounded queue (``max-queue-size``) bounds memory, not latency: 512 requests ahead of
a slow cluster is 17 s of waiting, and every accepted request waits it. Triton and Ray
Serve both shed at the door; so do we, by time: a request whose rows would reach a
worker later than ``max-queue-wait`` gets 503 (with Retry-After) at once.
"""

from __future__ import annotations

from core.placement import Tuning, expected
from core.worker_view import WorkerView


def drain_rate(views: list[WorkerView], max_batch: int, now: float, tuning: Tuning) -> float | None:
    """Rows per second the cluster serves at full batches (each worker runs one batch at
    a time); None until some worker has been measured."""
    rate, known = 0.0, False
    for v in views:
        if not v.responsive:
            continue
        t = expected(v, max_batch, views, now, tuning, aged=False)
        if t > 0:
            rate, known = rate + max_batch / t, True
    return rate if known else None


def expected_wait(rows_ahead: int, rate: float | None) -> float | None:
    """Seconds until a request arriving now reaches a worker: the rows queued and in
    flight ahead of it, at the measured rate. None: not known yet (admitted)."""
    return rows_ahead / rate if rate else None
