"""The Dispatcher's watchdog, as decisions over its ledger: which workers are stuck,
which requests ran out of time in flight, which slow batches get a hedged copy and
where, and which idle workers get a probe. Pure functions; the Dispatcher applies them.
Hedges and probes are generators, so each decision sees the ones applied before it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from core.placement import Tuning, expected
from core.worker_view import WorkerView
from router_api.dispatch_events import Batch, Request


def stuck(batches: Iterable[Batch], now: float) -> list[WorkerView]:
    """Workers holding a batch far past its expected time (its ``due``)."""
    return list({b.view: None for b in batches if b.view is not None and now > b.due})


def expired(batches: Iterable[Batch], now: float) -> list[Request]:
    """Unanswered requests whose deadline passed while a batch carries them."""
    return list({r: None for b in batches for r in b.requests if r.deadline is not None and now >= r.deadline and not r.done})


def hedges(
    batches: list[Batch], views: list[WorkerView], now: float, tuning: Tuning, within_budget: Callable[[], bool]
) -> Iterator[tuple[Batch, WorkerView, list[Request]]]:
    """Batches past ``hedge_at`` not hedged yet, each with the other worker (responsive,
    with room) that would finish its live requests first; none once the budget is spent.
    The slow worker is not written off: it may only be briefly slow."""
    for batch in batches:
        if batch.hedged or batch.view is None or now < batch.hedge_at:
            continue
        if not within_budget():
            return
        live = [r for r in batch.requests if not r.done and r.copyable]
        others = [v for v in views if v is not batch.view and v.responsive and v.has_room]
        if live and others:
            rows = sum(r.rows for r in live)
            yield batch, min(others, key=lambda v: v.remaining(now) + v.overhead + expected(v, rows, views, now, tuning)), live


def due_for_probe(views: list[WorkerView], now: float, fresh_for: float) -> list[WorkerView]:
    """Workers with room and nothing in flight whose curve is older than ``fresh_for``,
    and not probed within it (a probe that failed measures nothing). Unmeasured workers
    are left out: they borrow the fastest estimate and get work."""
    return [
        v
        for v in views
        if v.responsive
        and v.has_room
        and not v.flights
        and v.service.known
        and v.service.updated is not None
        and now - v.service.updated > fresh_for
        and now - v.probed_at > fresh_for
    ]


def probes(sent: list[Batch], views: list[WorkerView], now: float, fresh_for: float) -> Iterator[tuple[WorkerView, Batch, Request]]:
    """For each idle worker whose curve went stale: the smallest live request of a batch
    just sent elsewhere, to copy to it."""
    for view in due_for_probe(views, now, fresh_for):
        source = next((b for b in reversed(sent) if b.view is not view), None)
        live = [r for r in source.requests if not r.done and r.item is not None and r.copyable] if source else []
        if live:
            yield view, source, min(live, key=lambda r: r.rows)
