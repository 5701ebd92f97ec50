"""Keeping an idle worker's speed measured without making a request wait on it.

A worker that gets no batches is never re-measured, so an estimate taken while it was
contended or throttled would keep it idle for good. Routing a real request to it "to
see" makes that request pay the slow worker's latency: in the placement benchmark those
probes were the 3-9 % of requests that set p95 and p99. Instead, when a batch leaves
for one worker, an idle worker whose curve has gone stale gets a copy of one of its
requests. The first successful answer wins (the copy machinery of hedging); the copy
never holds its request back from being queued again should the first try's worker
die, so the request is never later than without the probe, and the idle worker's
reply refreshes its curve.
"""

from __future__ import annotations

import logging

from scheduler_plugins.policies import WorkerView

logger = logging.getLogger("router_api.dispatch")


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


class Probing:
    """Needs from the Dispatcher: views, probe_after, probes, closing, _send."""

    def _probe(self, sent: list, now: float) -> None:
        """Copy the smallest request of a batch just sent to each idle, stale worker."""
        if not sent or self.probe_after is None or self.closing:
            return
        for view in due_for_probe(list(self.views.values()), now, self.probe_after):
            source = next((b for b in reversed(sent) if b.view is not view), None)
            if source is None:
                continue
            live = [p for p in source.items if not p.payload.future.done() and p.payload.item is not None]
            if not live:
                continue
            view.probed_at = now
            copy = self._send(view, [min(live, key=lambda p: p.rows)], now, probe=True)
            if copy is None:
                continue
            copy.hedged = True  # a probe is never hedged in turn
            self.probes += 1
            logger.debug("probing idle worker %s with a copy from batch %s", view.address, source.id)
