"""Watching batches in flight: a slow one gets a copy elsewhere (hedging, within a
budget), a stuck worker's batches move to the others, and a request whose deadline
passes while in flight is answered 504 at its deadline. Mixed into the Dispatcher,
whose state it reads; it runs every 100 ms, O(batches in flight)."""

from __future__ import annotations

import asyncio
import logging

from scheduler_plugins.policies import expected

logger = logging.getLogger("router_api.dispatch")


class DeadlineExceeded(Exception):
    """504: the request's timeout passed before it was answered."""


class Watchdog:
    """Needs from the Dispatcher: loop, in_flight, views, hedge_*, sent, hedges,
    policy_tuning, stats, closing, and _send, _resend, _fail, _pump."""

    def _check_overdue(self) -> None:
        """A worker that holds a batch far past its expected time gets no new batches,
        and its batches go to the others; whichever answer comes first is used. A
        request whose deadline passes while in flight is answered 504 at once."""
        now = self.loop.time()
        self._hedge(now)
        stuck = {b.view for b in self.in_flight.values() if b.view is not None and now > b.due}
        for view in stuck:
            view.responsive = False
            batches = [b for b in self.in_flight.values() if b.view is view]
            logger.warning(
                "worker %s is overdue on %d batches; sending them elsewhere and giving it no new batches until it answers",
                view.address,
                len(batches),
            )
            for batch in batches:
                self._resend(batch)
        for batch in list(self.in_flight.values()):
            for p in batch.items:
                if p.deadline is not None and now >= p.deadline and not p.payload.future.done():
                    self.stats.rejected["timeout"] += 1
                    self._fail(p, DeadlineExceeded("request timeout expired while in flight"))
        if stuck:
            self._pump()

    def _hedge(self, now: float) -> None:
        """A batch well past its expected finish (``hedge-factor`` x, at least
        ``hedge-min``) is also sent to the worker that would finish it first, while at
        most ``hedge-budget`` of all batches are such copies. The first answer wins; the
        slow worker is not written off, since it may only be briefly slow."""
        for batch in list(self.in_flight.values()):
            if batch.hedged or batch.view is None or now < batch.hedge_at:
                continue
            if self.hedges + 1 > self.hedge_budget * self.sent:
                return
            live = [p for p in batch.items if not p.payload.future.done()]
            others = [v for v in self.views.values() if v is not batch.view and v.responsive and v.has_room]
            if not live or not others:
                continue
            views = list(self.views.values())
            rows = sum(p.rows for p in live)
            target = min(others, key=lambda v: v.remaining(now) + v.overhead + expected(v, rows, views, now, self.policy_tuning))
            copy = self._send(target, live, now)
            if copy is None:
                continue
            batch.hedged = copy.hedged = True
            self.hedges += 1
            logger.info("hedging batch %s: %.0f ms on %s, past its expected finish; a copy goes to %s",
                        batch.id, 1e3 * (now - batch.sent_at), batch.view.address, target.address)

    async def _watch_loop(self) -> None:
        while not self.closing:
            await asyncio.sleep(0.1)
            self._check_overdue()
