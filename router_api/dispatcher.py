"""The front end's dispatcher as a state machine: events in, actions out, no I/O.

It holds the batch queue, the ledger of batches in flight (``batches``, indexed per
worker by each view's ``flights``) and the worker views placement reads. Its rules:
work-conserving late binding (a batch leaves only for a worker with room, as big as the
queue and the policy make it); each request answered once, by the first successful
reply of any batch carrying it; hedged copies of slow batches and probe copies for idle,
stale workers (decided in ``watchdog.py``); stuck workers written off until they answer;
deadlines kept in flight. ``router_api.cluster_link`` feeds it Dask's events and
performs its actions.
"""

from __future__ import annotations

import itertools
import logging

from core.admission import drain_rate, expected_wait
from core.codec import pack_item
from core.config import Settings, placement_tuning
from core.buckets import batch_shapes
from core.placement import bucket_rows, current_weights, expected, make_policy
from core.protocol import Item, ItemError
from core.trace import align
from core.worker_view import Flight, WorkerView, adaptive_window, apply_metrics, learn_from_reply
from router_api import watchdog
from router_api.batching import QUEUED, BatchQueue, QueueFull, resolve_priority, resolve_timeout
from router_api.dispatch_events import (Abort, Action, Answer, Arrived, Batch, Cancelled, Closing, DeadlineExceeded, Event,
                                        Fail, Forget, Hedge, Lost, MetricsDigest, ModelGone, NotSent, Probe, Replied, Request,
                                        Requeue, SchedulerBack, SchedulerLost, Send, Tick, Unavailable, Unreachable, Wake,
                                        WorkerJoined, WorkerLeft, WorkersListed)  # fmt: skip
from router_api.telemetry import Telemetry
from router_api.triton_stats import ModelStats, StatsByModel

logger = logging.getLogger("router_api.dispatcher")


RATE_EVERY = 0.1  # seconds a measured drain rate serves admission before it is taken again


def ns(seconds: float) -> int:
    return int(seconds * 1e9)


class Dispatcher:
    def __init__(self, settings: Settings, model: dict, batch_prefix: str = "batch-router", clock: str = "",
                 telemetry: Telemetry | None = None) -> None:  # fmt: skip
        self.name = model["name"]  # one Dispatcher per model: its own queue, statistics and views of workers
        self.model = model  # its info, from the scheduler: metadata, config
        self.model_sha256 = model["sha256"]
        self.draining = False  # being unloaded: answers what it holds, takes nothing new
        self.drained_sent = False  # ... and has told the scheduler it holds nothing more
        self.clock = clock  # core.host.clock_id() of the front end: workers that share it share its clock
        self.window = settings.window
        self.frontends = settings.http.frontends  # they share each worker's window
        self.max_window = max(settings.window, settings.max_window)
        self.levels = settings.priority_levels
        self.default_level = settings.default_priority_level
        self.default_timeout = settings.default_timeout
        self.max_queue_wait = settings.max_queue_wait
        self._rate, self._rate_at = None, -RATE_EVERY  # drain_rate's last figure, and when
        shape = model["inputs"][0]["shape"]
        limit = model.get("max_batch_size") or settings.max_batch_size  # the model's config, else the cluster's
        most, self.buckets = batch_shapes(shape[0] if shape else None, limit, model.get("buckets"))
        delay = model.get("max_queue_delay")
        self.queue = BatchQueue(
            max_batch_size=most,
            max_queue_size=settings.max_queue_size,
            priority_levels=self.levels,
            max_queue_delay=settings.max_queue_delay if delay is None else delay,
            starvation_limit=settings.starvation_limit,
        )
        p = settings.placement
        self.tuning = placement_tuning(settings)
        self.policy = make_policy(p.policy, self.tuning)
        self.overdue_factor, self.overdue_min = p.overdue_factor, p.overdue_min
        self.hedge_factor, self.hedge_min, self.hedge_budget = p.hedge_factor, p.hedge_min, p.hedge_budget
        self.probe_after = p.probe_after if self.policy.probes_idle else None
        self.compress_beyond = settings.compress_beyond
        self.views: dict[str, WorkerView] = {}
        self.batches: dict[str, Batch] = {}  # the ledger: every batch in flight
        self.sent = self.hedges = self.probes = 0  # batches sent (the hedge budget's base), copies
        self.received = 0  # requests ever queued
        self.entry_stats = StatsByModel(model)  # Triton's statistics, per model name
        self.stats = self.entry_stats.main
        self.telemetry = telemetry or Telemetry()  # shared by a front end's dispatchers
        self.closing = False
        self.scheduler_lost: str | None = None  # why, while the client has no scheduler
        self.membership_version = 0  # the plugin's count of worker events applied so far
        self._prefix = batch_prefix
        self._ids = itertools.count()
        self._out: list[Action] = []
        self._handlers = {
            Arrived: self._arrived,
            Cancelled: self._cancelled,
            Wake: lambda e: self._pump(e.now),
            Tick: self._tick,
            WorkerJoined: self._worker_joined,
            WorkerLeft: self._worker_left,
            WorkersListed: self._workers_listed,
            MetricsDigest: self._metrics,
            Replied: self._replied,
            Lost: self._lost,
            NotSent: self._not_sent,
            Unreachable: self._unreachable,
            Closing: self._closing,
            Abort: self._abort,
            SchedulerLost: self._scheduler_lost,
            SchedulerBack: self._scheduler_back,
        }

    def handle(self, event: Event) -> list[Action]:
        """Apply one event; return what the shell must do, in order."""
        self._out = []
        self._handlers[type(event)](event)
        return self._out

    # -- what the shell and the endpoints read ------------------------------------------

    @property
    def ready(self) -> bool:
        return bool(self.views) and not self.closing and self.scheduler_lost is None

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing in flight."""
        return not len(self.queue) and not self.batches

    def next_wakeup(self, now: float) -> float | None:
        """When the queue changes by itself (a deadline, a delay ending): wake it then."""
        return self.queue.next_wakeup(now)

    def stats_of(self, r: Request) -> ModelStats:
        return self.entry_stats.of(r.model)

    def far_workers(self) -> bool:
        """Some worker is far enough that tensors travel to it compressed: the front
        end then compresses each tensor request on a thread as it arrives."""
        return self.compress_beyond is not None and any(v.link >= self.compress_beyond for v in self.views.values())

    def weights(self, now: float) -> dict[str, float]:
        return current_weights(list(self.views.values()), self.queue.max_batch_size, now, self.tuning)

    # -- requests ----------------------------------------------------------------------

    def _arrived(self, e: Arrived) -> None:
        r = e.request
        if self.closing:
            self.stats_of(r).rejected["unavailable"] += 1
            return self._fail(r, Unavailable("server is shutting down"))
        if self.scheduler_lost is not None:
            self.stats_of(r).rejected["unavailable"] += 1
            return self._fail(r, Unavailable(self.scheduler_lost))
        if self.draining:
            return self._fail(r, ModelGone(f"model {self.name!r} is being unloaded"))
        if self.max_queue_wait is not None:  # shed at the door what would wait too long anyway
            ahead = self.queue.rows + sum(v.rows_in_flight for v in self.views.values())
            wait = expected_wait(ahead, self._drain_rate(e.now))
            if wait is not None and wait > self.max_queue_wait:
                self.stats_of(r).rejected["queue_full"] += 1
                return self._fail(r, Unavailable(f"the queue is {wait:.1f} s deep at the rate the workers serve, "
                                                 f"over max-queue-wait ({self.max_queue_wait:g} s)"))  # fmt: skip
        try:
            r.priority = resolve_priority(r.priority, self.levels, self.default_level)
            timeout = resolve_timeout(r.timeout_s, self.default_timeout)
            r.arrival, r.deadline = e.now, (e.now + timeout if timeout else None)
            self.queue.push(r)
            if r.trace is not None:
                r.trace["queued"] = e.now
        except QueueFull as err:
            self.stats_of(r).rejected["queue_full"] += 1
            return self._fail(r, Unavailable(str(err)))
        except ValueError as err:
            return self._fail(r, err)
        self.received += 1

    def _drain_rate(self, now: float) -> float | None:
        """The cluster's measured rows/s, taken again at most every RATE_EVERY seconds:
        every arrival asks, and curves move slower than requests come."""
        if now - self._rate_at >= RATE_EVERY:
            self._rate = drain_rate(list(self.views.values()), self.queue.max_batch_size, now, self.tuning)
            self._rate_at = now
        return self._rate

    def _cancelled(self, e: Cancelled) -> None:
        """Dropped if not sent yet; if on a worker, its answer is discarded and it is
        not sent again should that worker die."""
        r = e.request
        if r.done:
            return
        if self.queue.cancel(r):
            r.item = r.packed = None  # its bytes need not wait for the entry to reach the head
        self.stats_of(r).rejected["cancelled"] += 1  # queued or already on a worker
        r.done = True

    def _pump(self, now: float) -> None:
        """Send every batch that can go now, then probe idle workers."""
        for r in self.queue.expire(now):
            self.stats_of(r).rejected["timeout"] += not r.done
            r.item = r.packed = None
            self._fail(r, DeadlineExceeded("request timeout expired while queued"))
        views = list(self.views.values())
        sent: list[Batch] = []
        unplaced = sum(1 for b in self.batches.values() if b.view is None)  # dask-default's batches
        while self.queue.ready(now):
            placement = self.policy.place(views, self.queue.rows, self.queue.max_batch_size, now, unplaced)
            if placement is None:
                break
            rows = bucket_rows(placement.view, placement.rows, self.buckets, self.queue.rows - placement.skip)
            requests = self.queue.take(now, max_rows=rows, skip=placement.skip)
            if not requests:
                break
            sent.append(self._send(placement.view, requests, now, Send))
            unplaced += placement.view is None
        self._probe(sent, now)

    def _send(
        self, view: WorkerView | None, requests: list[Request], now: float, kind: type[Send], copy_of: Batch | None = None
    ) -> Batch:
        far = view is not None and self.compress_beyond is not None and view.link >= self.compress_beyond
        items = [self._packed(r) if far else r.item for r in requests]
        batch = Batch(f"{self._prefix}-{next(self._ids)}", view, requests, items, sent_at=now, probe=kind is Probe, copy_of=copy_of)
        if not batch.probe:  # a probe never holds a request back from being queued again
            for r in requests:
                r.carriers += 1
            self.sent += 1
        self.batches[batch.id] = batch
        if view is None:
            batch.due = now + self.overdue_min * self.overdue_factor
        else:
            cost = expected(view, batch.rows, list(self.views.values()), now, self.tuning)
            batch.alone = not view.flights
            finish = view.remaining(now) + view.overhead + cost
            batch.due = now + max(self.overdue_min, self.overdue_factor * finish)
            if self.hedge_budget > 0:
                batch.hedge_at = now + max(self.hedge_min, self.hedge_factor * finish)
            view.flights[batch.id] = Flight(now, cost, batch.rows)
        self._out.append(kind(batch))
        return batch

    @staticmethod
    def _packed(r: Request) -> Item:
        if r.packed is None:
            r.packed = pack_item(r.item)
        return r.packed

    # -- replies and losses --------------------------------------------------------------

    def _replied(self, e: Replied) -> None:
        reply, now = e.reply, e.now
        batch = self.batches.pop(reply.id, None)
        if batch is None:  # already answered (re-sent or abandoned); its worker lives, though
            late = self.views.get(reply.worker)
            if late is not None and not late.responsive:
                late.responsive = True
                self._pump(now)
            return
        t = reply.timings
        view = batch.view or self.views.get(reply.worker)
        self._release(batch)
        if view is not None:
            failed = any(isinstance(r, ItemError) and r.status >= 500 for r in reply.results)
            learn_from_reply(view, batch.rows, t.rows, t.service_s, failed, now - batch.sent_at, batch.alone, now, t.padded)
            view.foreign = max(0, reply.load - len(view.flights))  # other front ends' batches on it
            view.window = adaptive_window(view, self.window, self.max_window, max(1, view.rows // max(1, view.batches)))
        # Triton's counts are of requests served: a copy that lost the race ran, but
        # answered nobody, so it is not counted again.
        served = [r for r, res in zip(batch.requests, reply.results) if not r.done and not isinstance(res, ItemError)]
        if t.rows and served:
            self.entry_stats.batch_done(served, t)
        name = view.name if view is not None and view.name else reply.worker
        round_trip, compute = now - batch.sent_at, t.service_s or 0.0
        for r, result in zip(batch.requests, reply.results):
            ok = not isinstance(result, ItemError)
            if r.done or (not ok and r.carriers > 0):  # another batch still carries it: wait for that
                continue
            # Queue wait lasts until the batch that answered left (a hedged copy's
            # requests waited through the first try).
            queue = batch.sent_at - r.arrival
            if ok or result.status >= 500:
                self.stats_of(r).request_done(ok, ns(now - r.arrival), ns(queue))
            else:  # an image that does not decode, say: the client's mistake, not the backend's
                self.stats_of(r).rejected["invalid"] += 1
            if ok:
                self.telemetry.request_served(now - r.arrival, queue, round_trip, compute)
            if r.trace is not None and t.stamps:
                r.trace.update(bound=batch.sent_at, received=now)
                align(r.trace, t.stamps, bool(self.clock) and view is not None and view.info.get("clock") == self.clock)
            self._settle(r)
            self._out.append(Answer(r, result, name, t.rows))
        self._pump(now)

    def _lost(self, e: Lost) -> None:
        """The task ended without replying (it could not even be unpickled, say)."""
        batch = self.batches.get(e.batch_id)
        if batch is None:
            return
        where = batch.view.address if batch.view is not None else "a worker"
        self._abandon(batch, RuntimeError(f"batch failed on {where}: {e.reason}"), e.now)
        self._pump(e.now)

    def _unreachable(self, e: Unreachable) -> None:
        batch = self.batches.get(e.batch_id)
        if batch is None:  # answered meanwhile by a copy
            return
        self._resend(batch, f"lost the direct connection to {batch.view.address if batch.view else '?'}: {e.reason}")
        self._pump(e.now)

    def _not_sent(self, e: NotSent) -> None:
        """Dask refused the task (the client lost the scheduler): answer, never drop."""
        batch = self.batches.pop(e.batch_id, None)
        if batch is None:
            return
        logger.error("could not submit batch %s: %s", batch.id, e.reason)
        self._release(batch)
        if not batch.probe:
            self.sent -= 1
        if batch.copy_of is not None:  # a copy that never left: its original may be copied again
            if batch.probe:
                self.probes -= 1
            else:
                batch.copy_of.hedged = False
                self.hedges -= 1
        for r in self._orphans(batch):  # a hedge's requests still run on the first try
            self.stats_of(r).rejected["unavailable"] += 1
            self._fail(r, Unavailable(f"cannot reach the scheduler: {e.reason}"))

    def _release(self, batch: Batch) -> None:
        """Take a batch off the ledger (answered, failed or re-sent)."""
        self.batches.pop(batch.id, None)
        if batch.view is not None:
            batch.view.flights.pop(batch.id, None)
        if not batch.probe:
            for r in batch.requests:
                r.carriers -= 1
        self._out.append(Forget(batch.id))

    @staticmethod
    def _orphans(batch: Batch) -> list[Request]:
        """Requests not answered that no batch in flight carries, nor the queue holds:
        only these may be failed or queued again (a hedged copy may still answer the
        rest, and a queued one will be sent again)."""
        return [r for r in batch.requests if not r.done and r.carriers == 0 and r.state != QUEUED]

    def _abandon(self, batch: Batch, error: Exception, now: float) -> None:
        self._release(batch)
        for r in self._orphans(batch):
            self.stats_of(r).request_done(False, ns(now - r.arrival), 0)
            self._fail(r, error)

    def _resend(self, batch: Batch, reason: str) -> None:
        self._release(batch)
        orphans = self._orphans(batch)
        if orphans:
            self.queue.requeue(orphans)
            self._out.append(Requeue(orphans, reason))

    def _fail(self, r: Request, error: Exception) -> None:
        if not r.done:
            self._settle(r)
            self._out.append(Fail(r, error))

    def _settle(self, r: Request) -> None:
        """Answered or failed for good: if it was queued again meanwhile (its batch was
        re-sent while a probe carried it), it no longer needs to go out."""
        r.done = True
        self.queue.cancel(r)

    # -- the watchdog: hedges, stuck workers, deadlines in flight -------------------------

    def _tick(self, e: Tick) -> None:
        now = e.now
        for batch, target, live in watchdog.hedges(list(self.batches.values()), list(self.views.values()), now,
                                                    self.tuning, lambda: self.hedges + 1 <= self.hedge_budget * self.sent):  # fmt: skip
            copy = self._send(target, live, now, Hedge, copy_of=batch)
            batch.hedged = copy.hedged = True
            self.hedges += 1
            logger.info("hedging batch %s: %.0f ms on %s, past its expected finish; a copy goes to %s",
                        batch.id, 1e3 * (now - batch.sent_at), batch.view.address, target.address)  # fmt: skip
        stuck = watchdog.stuck(self.batches.values(), now)
        for view in stuck:
            view.responsive = False
            batches = [b for b in self.batches.values() if b.view is view]
            logger.warning("worker %s is overdue on %d batches; sending them elsewhere and giving it no new "
                           "batches until it answers", view.address, len(batches))  # fmt: skip
            for batch in batches:
                self._resend(batch, f"worker {view.address} is overdue")
        for r in watchdog.expired(self.batches.values(), now):
            self.stats_of(r).rejected["timeout"] += 1
            self._fail(r, DeadlineExceeded("request timeout expired while in flight"))
        if stuck:
            self._pump(now)

    def _probe(self, sent: list[Batch], now: float) -> None:
        """Copy one request of a batch just sent to each idle worker whose curve went
        stale: the first answer serves the request, the probe's re-measures the worker."""
        if not sent or self.probe_after is None or self.closing:
            return
        for view, source, request in watchdog.probes(sent, list(self.views.values()), now, self.probe_after):
            view.probed_at = now
            copy = self._send(view, [request], now, Probe, copy_of=source)
            copy.hedged = True  # a probe is never hedged in turn
            self.probes += 1
            logger.debug("probing idle worker %s with a copy from batch %s", view.address, source.id)

    # -- membership and metrics ----------------------------------------------------------

    def _worker_joined(self, e: WorkerJoined) -> None:
        self.membership_version = max(self.membership_version, e.version)
        self._add_view(e.info)
        self._pump(e.now)

    def _worker_left(self, e: WorkerLeft) -> None:
        self.membership_version = max(self.membership_version, e.version)
        self._remove_view(e.address)
        self._pump(e.now)

    def _workers_listed(self, e: WorkersListed) -> None:
        if e.version < self.membership_version:
            return  # taken before an event already applied: it would undo it
        self.membership_version = e.version
        for info in e.workers.values():
            self._add_view(info)
        for address in set(self.views) - set(e.workers):
            self._remove_view(address)
        self._pump(e.now)

    def _metrics(self, e: MetricsDigest) -> None:
        for address, state in e.workers.items():
            if (view := self.views.get(address)) is not None:
                mine = (state.get("models") or {}).get(self.name)  # this model's statistics on that worker
                apply_metrics(view, {**state, "stats": mine} if mine is not None else state)
        self._pump(e.now)

    def _add_view(self, info: dict) -> None:
        """A worker that holds this model gets a view; one that no longer does (unloaded
        there) loses it, its batches going back to the queue."""
        held = info["models"].get(self.name) if "models" in info else info  # without "models": one model, its own
        if held is None or held.get("sha256") != self.model_sha256:
            if info["address"] in self.views:
                self._remove_view(info["address"])
            return
        view = self.views.get(info["address"])
        if view is None:
            view = self.views[info["address"]] = WorkerView(info["address"], info.get("name", ""), self.window, info,
                                                            frontends=self.frontends)  # fmt: skip
            view.service.buckets = self.buckets
            logger.info("worker %s joined (%s, %s)", info["address"], info.get("device"), info.get("providers"))
        else:
            view.info = info

    def _remove_view(self, address: str) -> None:
        view = self.views.pop(address, None)
        if view is None:
            return
        lost = [b for b in self.batches.values() if b.view is view]
        logger.warning("worker %s left with %d batches in flight; re-queueing them", address, len(lost))
        for batch in lost:
            self._resend(batch, f"worker {address} left")

    # -- shutdown -------------------------------------------------------------------------

    def _closing(self, e: Closing) -> None:
        self.closing = True

    def _abort(self, e: Abort, why: str = "server is shutting down") -> None:
        for r in self.queue.drain():
            self.stats_of(r).rejected["unavailable"] += not r.done
            self._fail(r, Unavailable(why))
        for batch in list(self.batches.values()):
            self._abandon(batch, Unavailable(why), e.now)

    # -- the scheduler ----------------------------------------------------------------------

    def _scheduler_lost(self, e: SchedulerLost) -> None:
        """Without a scheduler nothing can be sent, and the workers that held batches
        lose it too: every request is answered 503 at once (never left to hang), and
        the workers are forgotten; the listing after reconnecting says who is there."""
        self.scheduler_lost = f"lost the Dask scheduler ({e.reason}); reconnecting"
        logger.error("%s: answering 503 until it is back", self.scheduler_lost)
        self._abort(e, self.scheduler_lost)
        self.views.clear()
        self.membership_version = 0  # a new scheduler counts its worker events from zero

    def _scheduler_back(self, e: SchedulerBack) -> None:
        self.scheduler_lost = None
        self._pump(e.now)
