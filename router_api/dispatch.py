"""The front end's bridge to Dask: batches go out when a worker has room, one Dask task
per batch, and each request gets its own rows back when the worker's reply arrives.

Work-conserving: a lone request leaves at once for a free worker; while every worker is
at its window, the queue grows into bigger batches by itself. Which worker, and how many
rows, is the placement policy's call (scheduler_plugins/policies.py), made on the live
view kept here: in-flight work and measured service times from every reply, GPU
metrics from the scheduler plugin's state events. Replies come back as events on the
worker's own stream (``log_event`` -> ``subscribe_topic``), one hop instead of a
gather's two, and without connecting to the worker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgpack

from router_api import config
from router_api.batching import BatchQueue, Pending, QueueFull, resolve_priority, resolve_timeout
from router_api.codec import pack_item
from router_api.membership import Membership
from router_api.probing import Probing
from router_api.reporting import report_loop
from router_api.stats import ModelStats
from router_api.telemetry import Telemetry
from router_api.views import adaptive_window, current_weights, learn_from_reply
from router_api.watchdog import DeadlineExceeded, Watchdog
from scheduler_plugins.plugin import RESULTS_PREFIX, STATE_TOPIC, WORKERS_TOPIC
from scheduler_plugins.policies import DaskDefault, GpuAware, WorkerView, expected, make_policy
from worker_setup.execute import run_batch

logger = logging.getLogger("router_api.dispatch")


class Unavailable(Exception):
    """503: queue full, shutting down, or no worker can take the request."""


@dataclass(eq=False)
class Ticket:
    """One request as the dispatcher carries it: what travels, and who waits for it."""

    item: dict | None  # sent to the worker as is; dropped once it never will be
    future: asyncio.Future
    arrival_ns: int = field(default_factory=time.perf_counter_ns)
    packed: dict | None = None  # ``item`` compressed for far workers, when first needed
    carriers: int = 0  # batches in flight holding it (2 while a hedged copy runs)


@dataclass
class Reply:
    """One request's result plus where and how it ran."""

    result: dict
    worker: str
    batch_rows: int
    queue_ns: int


@dataclass(eq=False)
class Batch:
    id: str
    view: WorkerView | None  # None: sent unrestricted (dask-default), Dask picks
    items: list[Pending]
    future: Any  # distributed.Future
    sent: float = 0.0  # wall clock, to compare with the worker's stamps
    sent_ns: int = 0  # perf_counter_ns: its requests' queue wait ends here, its round trip starts
    sent_at: float = 0.0  # loop clock
    due: float = 0.0  # loop clock: past this the worker is presumed stuck
    hedge_at: float = float("inf")  # loop clock: past this a copy may go to another worker
    hedged: bool = False  # a copy was sent (or this is the copy): never hedge twice
    alone: bool = False  # its worker had nothing else in flight: the round trip is clean
    probe: bool = False  # a copy that re-measures an idle worker: it carries nobody

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.items)


class Dispatcher(Watchdog, Membership, Probing):
    def __init__(self, client, model: dict) -> None:
        self.client = client
        self.model = model
        self.window = int(config.get("window"))
        self.max_window = max(self.window, int(config.get("max-window")))
        self.levels = int(config.get("priority-levels"))
        self.default_level = int(config.get("default-priority-level"))
        self.default_timeout = config.seconds("default-timeout")
        # A model with a fixed batch dimension caps every batch at that size.
        batch_dim = model["inputs"][0]["shape"][0] if model["inputs"][0]["shape"] else -1
        max_batch = int(config.get("max-batch-size"))
        self.queue = BatchQueue(
            max_batch_size=min(max_batch, batch_dim) if batch_dim > 0 else max_batch,
            max_queue_size=int(config.get("max-queue-size")),
            priority_levels=self.levels,
            max_queue_delay=config.seconds("max-queue-delay"),
            starvation_limit=config.seconds("starvation-limit"),
        )
        self.views: dict[str, WorkerView] = {}
        self.policy_tuning = config.placement_tuning()
        self.policy = make_policy(config.get("placement.policy"), self.policy_tuning)
        self.overdue_factor = float(config.get("placement.overdue-factor"))
        self.overdue_min = config.seconds("placement.overdue-min")
        self.hedge_factor = float(config.get("placement.hedge-factor"))
        self.hedge_min = config.seconds("placement.hedge-min")
        self.hedge_budget = float(config.get("placement.hedge-budget"))
        probe_after = config.seconds_or_off("placement.probe-after")
        self.probe_after = probe_after if isinstance(self.policy, GpuAware) else None
        self.probes = 0
        self.compress_beyond = config.seconds_or_off("compress-beyond")
        self.sent = 0  # batches sent, the hedging budget's base
        self.hedges = 0
        self.unrestricted = 0  # dask-default batches in flight
        self.in_flight: dict[str, Batch] = {}
        self.stats = ModelStats(model["name"])
        self.telemetry = Telemetry()
        self.topic = RESULTS_PREFIX + client.id
        self._ids = itertools.count()
        self._prefix = f"batch-router-{uuid.uuid4().hex[:8]}"
        self._timer: asyncio.TimerHandle | None = None
        self._pump_scheduled = False
        self._resync: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self._report: asyncio.Task | None = None
        self.closing = False
        self.received = 0  # requests ever queued: lets callers see arrivals in order
        self.membership_version = 0  # the plugin's count of worker events seen so far
        self.loop = asyncio.get_running_loop()

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self.client.subscribe_topic(self.topic, self._on_reply)
        self.client.subscribe_topic(WORKERS_TOPIC, self._on_worker_event)
        self.client.subscribe_topic(STATE_TOPIC, self._on_state)
        await self._fast_streams(force=True)
        await self.sync_workers()
        self._resync = asyncio.create_task(self._resync_loop())
        self._watch = asyncio.create_task(self._watch_loop())
        self._report = asyncio.create_task(report_loop(self))

    async def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests, answer everything queued and in flight, then stop."""
        self.closing = True
        deadline = time.monotonic() + timeout
        while (len(self.queue) or self.in_flight) and time.monotonic() < deadline and self.views:
            self._reap_failed()
            await asyncio.sleep(0.05)
        for p in self.queue.drain():
            self.stats.rejected["unavailable"] += not p.payload.future.done()
            self._fail(p, Unavailable("server is shutting down"))
        for batch in list(self.in_flight.values()):
            self._abandon(batch, Unavailable("server is shutting down"))
        for task in (self._resync, self._watch, self._report):
            if task:
                task.cancel()
        if self._timer:
            self._timer.cancel()

    @property
    def ready(self) -> bool:
        return bool(self.views) and not self.closing

    # -- requests ----------------------------------------------------------------------

    def submit(
        self, item: dict, rows: int, priority: int = 0, timeout_us: int = 0, packed: dict | None = None
    ) -> tuple[Pending, asyncio.Future]:
        """Queue one request. Raises ValueError (400) or Unavailable (503) at once.
        ``packed``: the item already compressed for far workers (see ``far_workers``)."""
        if self.closing:
            self.stats.rejected["unavailable"] += 1
            raise Unavailable("server is shutting down")
        level = resolve_priority(priority, self.levels, self.default_level)
        timeout = resolve_timeout(timeout_us / 1e6, self.default_timeout)
        now = self.loop.time()
        ticket = Ticket(item=item, future=self.loop.create_future(), packed=packed)
        pending = Pending(rows=rows, priority=level, arrival=now, deadline=now + timeout if timeout else None, payload=ticket)
        try:
            self.queue.push(pending)
        except QueueFull as e:
            self.stats.rejected["queue_full"] += 1
            raise Unavailable(str(e)) from None
        self.received += 1
        self._pump_soon()
        return pending, ticket.future

    def cancel(self, pending: Pending) -> None:
        """The client went away: drop its request if not sent yet; if it is on a worker,
        its answer is discarded and it is not sent again should that worker die."""
        if self.queue.cancel(pending):
            self.stats.rejected["cancelled"] += 1
            pending.payload.item = None  # its bytes need not wait for the entry to reach the head
        pending.payload.future.cancel()

    # -- the pump: everything that moves requests runs here, synchronously --------------

    def _pump_soon(self) -> None:
        """Pump once the event loop has read every request that is already waiting.

        Requests that arrive in the same loop iteration then share one batch (one Dask
        task) instead of each taking a free worker slot alone; a lone request still
        leaves within the same millisecond.
        """
        if not self._pump_scheduled:
            self._pump_scheduled = True
            self.loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        now = self.loop.time()
        for p in self.queue.expire(now):
            self.stats.rejected["timeout"] += not p.payload.future.done()
            p.payload.item = None  # its bytes need not wait for the entry to reach the head
            self._fail(p, DeadlineExceeded("request timeout expired while queued"))
        views = list(self.views.values())
        max_batch = self.queue.max_batch_size
        sent: list[Batch] = []
        while self.queue.ready(now):
            if isinstance(self.policy, DaskDefault):
                placement = self.policy.place_unrestricted(views, self.unrestricted, self.queue.rows, max_batch)
            else:
                placement = self.policy.place(views, self.queue.rows, max_batch, now)
            if placement is None:
                break
            items = self.queue.take(now, max_rows=placement.rows, skip=placement.skip)
            if not items:
                break
            if (batch := self._send(placement.view, items, now)) is not None:
                sent.append(batch)
        self._probe(sent, now)
        self._arm_timer(now)

    def _arm_timer(self, now: float) -> None:
        wake = self.queue.next_wakeup(now)
        if self._timer is not None and (wake is None or self._timer.when() != wake):
            self._timer.cancel()
            self._timer = None
        if wake is not None and self._timer is None:
            self._timer = self.loop.call_at(wake, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    def _send(self, view: WorkerView | None, items: list[Pending], now: float, probe: bool = False) -> Batch | None:
        batch_id = f"{self._prefix}-{next(self._ids)}"
        now_ns = time.perf_counter_ns()
        far = view is not None and self.compress_beyond is not None and view.link >= self.compress_beyond
        spec = {"id": batch_id, "topic": self.topic, "items": [self._packed(p) if far else p.payload.item for p in items]}
        where = {"workers": [view.address], "allow_other_workers": False} if view else {}
        try:
            future = self.client.submit(run_batch, spec, key=batch_id, pure=False, **where)
        except Exception as e:  # e.g. the client lost the scheduler: answer, never drop
            logger.error("could not submit batch %s: %s", batch_id, e)
            for p in self._orphans(items):  # a hedge's requests still run on the first try
                self.stats.rejected["unavailable"] += 1
                self._fail(p, Unavailable(f"cannot reach the scheduler: {e}"))
            return None
        batch = Batch(batch_id, view, items, future, sent=time.time(), sent_ns=now_ns, sent_at=now, probe=probe)
        if not probe:  # a probe never holds a request back from being re-queued
            for p in items:
                p.payload.carriers += 1
            self.sent += 1
        self.in_flight[batch_id] = batch
        if view is None:
            self.unrestricted += 1
            batch.due = now + self.overdue_min * self.overdue_factor
            return batch
        views = list(self.views.values())
        cost = expected(view, batch.rows, views, now, self.policy_tuning)
        ahead = view.remaining(now)
        batch.alone = not view.flights
        expected_finish = ahead + view.overhead + cost
        batch.due = now + max(self.overdue_min, self.overdue_factor * expected_finish)
        if self.hedge_budget > 0:
            batch.hedge_at = now + max(self.hedge_min, self.hedge_factor * expected_finish)
        view.flights[batch_id] = (now, cost)
        view.in_flight += 1
        view.rows_in_flight += batch.rows
        return batch

    def far_workers(self) -> bool:
        """Some worker is far enough that its tensors travel compressed: the front end
        then compresses each tensor request on a thread as it arrives, not on the loop."""
        return self.compress_beyond is not None and any(v.link >= self.compress_beyond for v in self.views.values())

    def _packed(self, p: Pending) -> dict:
        """The request compressed for a far worker, made once per request."""
        ticket: Ticket = p.payload
        if ticket.packed is None:
            ticket.packed = pack_item(ticket.item)
        return ticket.packed

    # -- replies ----------------------------------------------------------------------

    def _on_reply(self, event) -> None:
        _, msg = event
        batch = self.in_flight.pop(msg["id"], None)
        if batch is None:  # already answered (re-sent or abandoned); its worker lives, though
            late = self.views.get(msg.get("worker", ""))
            if late is not None and not late.responsive:
                late.responsive = True
                self._pump()
            return
        reply = msgpack.unpackb(msg["blob"], raw=False)
        t = reply["timings"]
        view = batch.view or self.views.get(reply["worker"])
        self._finish(batch, view, t, any(r.get("status") == 500 for r in reply["results"]))
        rows = t.get("rows", 0)
        if "started" in t and logger.isEnabledFor(logging.DEBUG):
            to, on, back = t["started"] - batch.sent, t["finished"] - t["started"], time.time() - t["finished"]
            logger.debug("batch %s: to worker %.2f ms, on worker %.2f ms, back %.2f ms", batch.id, 1e3 * to, 1e3 * on, 1e3 * back)
        # Triton's counts are of requests served: a hedged copy that lost the race ran,
        # but answered nobody, so it is not counted again.
        served = [p for p, r in zip(batch.items, reply["results"]) if not p.payload.future.done() and "error" not in r]
        if rows and served:
            self.stats.batch_done(rows, sum(p.rows for p in served), len(served), t["input_ns"], t["infer_ns"], t["output_ns"])
        done_ns = time.perf_counter_ns()
        name = view.name if view and view.name else reply["worker"]
        compute_s = t.get("service_s") or 0.0
        round_trip_s = 1e-9 * (done_ns - batch.sent_ns)
        for p, result in zip(batch.items, reply["results"]):
            ticket: Ticket = p.payload
            # Queue wait lasts until the batch that answered left (a hedged copy's
            # requests waited through the first try).
            queue_ns = batch.sent_ns - ticket.arrival_ns
            ok = "error" not in result
            if not ok and ticket.carriers > 0:
                continue  # another batch still carries it (the first try, or a hedge): wait for it
            if not ticket.future.done():
                self.stats.request_done(ok, done_ns - ticket.arrival_ns, queue_ns)
                if ok:
                    self.telemetry.request_served(1e-9 * (done_ns - ticket.arrival_ns), 1e-9 * queue_ns, round_trip_s, compute_s)
                ticket.future.set_result(Reply(result, name, rows, queue_ns))
        self._pump()

    def _reap_failed(self) -> None:
        """Answer batches whose task ended without replying (e.g. it could not even be
        unpickled on the worker). ``run_batch`` replies on every error it can catch, so
        this is rare; polling client-side future state costs nothing per batch, unlike a
        done-callback (a thread hop each)."""
        failed = [b for b in self.in_flight.values() if b.future.status in ("error", "cancelled")]
        for batch in failed:
            where = batch.view.address if batch.view else "a worker"
            self._abandon(batch, RuntimeError(f"batch failed on {where}: {batch.future.status}"))
        if failed:
            self._pump()

    def _release(self, batch: Batch) -> None:
        """Forget a batch's bookkeeping on its worker (answered, failed or re-sent)."""
        if batch.view is None:
            self.unrestricted = max(0, self.unrestricted - 1)
        elif batch.view.flights.pop(batch.id, None) is not None:
            batch.view.in_flight = max(0, batch.view.in_flight - 1)
            batch.view.rows_in_flight = max(0, batch.view.rows_in_flight - batch.rows)
        if not batch.probe:
            for p in batch.items:
                p.payload.carriers = max(0, p.payload.carriers - 1)
        batch.future.release()

    @staticmethod
    def _orphans(items: list[Pending]) -> list[Pending]:
        """Requests not answered yet that no batch in flight carries any more: only
        these may be failed or queued again (a hedged copy may still answer the rest)."""
        return [p for p in items if not p.payload.future.done() and p.payload.carriers == 0]

    def _finish(self, batch: Batch, view: WorkerView | None, timings: dict, failed: bool) -> None:
        self._release(batch)
        if view is not None:
            learn_from_reply(view, batch.rows, timings, failed, self.loop.time() - batch.sent_at, batch.alone, self.loop.time())
            view.window = adaptive_window(view, self.window, self.max_window, max(1, view.rows // max(1, view.batches)))

    def _abandon(self, batch: Batch, error: Exception) -> None:
        self.in_flight.pop(batch.id, None)
        self._release(batch)
        for p in self._orphans(batch.items):
            self.stats.request_done(False, time.perf_counter_ns() - p.payload.arrival_ns, 0)
            self._fail(p, error)

    def _fail(self, p: Pending, error: Exception) -> None:
        if not p.payload.future.done():
            p.payload.future.set_exception(error)

    def _resend(self, batch: Batch) -> None:
        self.in_flight.pop(batch.id, None)
        self._release(batch)
        self.queue.requeue(self._orphans(batch.items))

    def weights(self) -> dict[str, float]:
        return current_weights(list(self.views.values()), self.queue.max_batch_size, self.loop.time(), self.policy_tuning)
