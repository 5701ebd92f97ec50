"""The front end's link to the Dask cluster: it turns what Dask says into Dispatcher
events, and the Dispatcher's actions into Dask calls and answers to waiting requests.

Everything here is I/O and timing; every decision is the Dispatcher's. Batches go out
as ``client.submit(RUN_BATCH, spec)`` pinned to one worker; replies come back as events
on the worker's own stream (``log_event`` -> ``subscribe_topic``), one hop instead of a
gather's two, and without connecting to the worker. A worker on this host gets its
batches straight over a connection to its listener instead (``direct-lane``), and
answers on it: one hop each way, and no task for the scheduler to keep.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from collections.abc import Awaitable, Callable
from typing import Any

from core.config import Settings
from core.host import clock_id, shm_namespace
from core.protocol import MODELS_TOPIC, RESULTS_PREFIX, RUN_BATCH, STATE_TOPIC, WORKERS_TOPIC, BatchReply, BatchSpec, Item
from router_api.dispatch_events import (
    ModelGone,
    Abort,
    Answer,
    Arrived,
    Cancelled,
    Closing,
    Event,
    Fail,
    Forget,
    Lost,
    MetricsDigest,
    NotSent,
    Replied,
    Request,
    SchedulerBack,
    SchedulerLost,
    Send,
    Tick,
    Unreachable,
    Wake,
    WorkerJoined,
    WorkerLeft,
    WorkersListed,
)
from router_api.dispatcher import Dispatcher
from router_api.link_lanes import DirectLanes
from router_api.link_models import ModelSet
from router_api.telemetry import Telemetry

logger = logging.getLogger("router_api.cluster_link")

WATCH_EVERY = 0.1  # seconds between watchdog ticks: O(batches in flight) each
RESYNC_EVERY = 2.0  # seconds between membership resyncs and checks for failed tasks
RECONNECT_EVERY = 0.5  # seconds between attempts to reach a lost scheduler


class ClusterLink(ModelSet, DirectLanes):
    """One Dispatcher per model the cluster serves (``models``: name -> its info, kept by
    ``link_models.ModelSet``), each with its own queue and statistics; what Dask says of
    workers goes to all of them, a reply to the one whose batch it is. Workers on this
    host get their batches over ``link_lanes.DirectLanes``."""

    def __init__(self, client, settings: Settings, models: dict[str, dict], connect: Callable[[], Awaitable[Any]] | None = None) -> None:
        self.client = client
        self.settings = settings
        # A new Client for the same scheduler address (`serve`'s), for when Dask's own
        # reconnection gives up; None: only Dask's (`up`'s in-process client).
        self.connect = connect
        self.reconnecting: asyncio.Task | None = None
        self.clock, self.shm = clock_id(), shm_namespace()
        self.telemetry = Telemetry()  # every response of this front end, whichever model
        self._init_models(models)
        self.on_models: Callable[[], None] | None = None  # the Router's: refresh its model names
        self.direct = settings.direct_lane == "same-host" and bool(self.clock)
        self._init_lanes()
        self._direct_calls: set[asyncio.Task] = set()  # calls and fire-and-forget tasks in flight (``_spawn``)
        self.topic = RESULTS_PREFIX + client.id
        self.send_interval = settings.batched_send_interval
        self.report_interval = settings.dashboard.interval
        self.futures: dict[str, Any] = {}  # batch id -> distributed.Future, while in flight
        self.loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._wake_scheduled = False
        self._tasks: list[asyncio.Task] = []
        self._report_failing = False

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self._attach()
        self._tasks = [
            asyncio.create_task(self._every(WATCH_EVERY, self._tick)),
            asyncio.create_task(self._every(RESYNC_EVERY, self._resync)),
        ]
        if self.report_interval > 0:
            self._tasks.append(asyncio.create_task(self._every(self.report_interval, self._report)))

    async def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests, answer everything queued and in flight, then stop."""
        self.handle(Closing(self.now))
        deadline = self.now + timeout
        while any(not d.idle and d.views for d in self.dispatchers.values()) and self.now < deadline:
            self._reap_failed()
            await asyncio.sleep(0.05)
        self.handle(Abort(self.now))
        await self._close_lanes()
        for task in [*self._tasks, self.reconnecting]:
            if task is not None:
                task.cancel()
        if self._timer:
            self._timer.cancel()
        if self.connect is not None and self.client.status != "closed":  # one of ours; the first is its caller's
            await self.client.close()

    @property
    def now(self) -> float:
        return self.loop.time()

    # -- what the handlers call --------------------------------------------------------

    def submit(
        self, item: Item, rows: int, priority: int = 0, timeout_us: int = 0, packed: Item | None = None, model: str = "",
        trace: dict | None = None, copyable: bool = True,
    ) -> tuple[Request, asyncio.Future]:
        """Queue one request on the dispatcher of the name ``model`` it came in for (""
        = the first model); its future gets the Answer, or the error to answer with
        (DeadlineExceeded: 504). A request refused at once raises here (ValueError:
        400, Unavailable: 503, ModelGone: 404), so a multi-part request stops at its first
        refused part."""
        future = self.loop.create_future()
        request = Request(rows, priority, self.now, item=item, packed=packed, waiter=future, timeout_s=timeout_us / 1e6, model=model,
                          trace=trace, copyable=copyable)  # fmt: skip
        d = self.serving(model)
        if d is None:
            raise ModelGone(f"model {model!r} is not loaded")
        request.dispatcher = d
        self.handle(Arrived(self.now, request), d)
        if future.done():
            raise future.exception()
        self._wake_soon()
        return request, future

    def cancel(self, request: Request) -> None:
        self.handle(Cancelled(self.now, request), request.dispatcher)
        request.waiter.cancel()

    # -- events in, actions out ----------------------------------------------------------

    def handle(self, event: Event, dispatcher: Dispatcher | None = None) -> None:
        """Give ``event`` to one dispatcher (a request's, a batch's) or, without one, to all."""
        for d in [dispatcher] if dispatcher is not None else list(self.dispatchers.values()):
            self._perform(d, d.handle(event))
        self._arm_timer()

    def _perform(self, d: Dispatcher, actions: list) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._submit(action.batch, d.name)
            elif isinstance(action, Answer):
                if not action.request.waiter.done():
                    action.request.waiter.set_result(action)
            elif isinstance(action, Fail):
                if not action.request.waiter.done():
                    action.request.waiter.set_exception(action.error)
            elif isinstance(action, Forget):
                future = self.futures.pop(action.batch_id, None)
                if future is not None:
                    future.release()
            # Requeue needs nothing here: the Dispatcher has queued them and logged why.
        if d.draining and d.idle:
            self._drained(d)

    def _submit(self, batch, model: str) -> None:
        direct = batch.view is not None and self.route(batch.view) == "direct"
        if batch.view is not None:  # only a worker reached directly counts every batch it holds
            batch.view.reports_load = direct
        # Tensors in shared memory go as references to a worker that sees it, as bytes to others.
        shared = direct and self.shares_memory(batch.view)
        items = [(replace(i, inputs={}, codecs={}) if shared else replace(i, shm=None)) if getattr(i, "shm", None) else i
                 for i in batch.items]  # fmt: skip
        spec = BatchSpec(batch.id, self.topic, items, any(r.trace is not None for r in batch.requests), model)
        if direct:
            return self._send_direct(batch.id, batch.view, spec)
        where = {"workers": [batch.view.address], "allow_other_workers": False} if batch.view is not None else {}
        try:
            self.futures[batch.id] = self.client.submit(RUN_BATCH, spec, key=batch.id, pure=False, **where)
        except Exception as e:
            self.loop.call_soon(self._for_batch, NotSent(self.now, batch.id, str(e)))

    def _wake_soon(self) -> None:
        """Wake once the event loop has read every request already waiting: requests
        that arrive in the same loop iteration then share one batch (one Dask task)
        instead of each taking a free worker slot alone; a lone request still leaves
        within the same millisecond."""
        if not self._wake_scheduled:
            self._wake_scheduled = True
            self.loop.call_soon(self._wake)

    def _wake(self) -> None:
        self._wake_scheduled = False
        self.handle(Wake(self.now))

    def _for_batch(self, event: Lost | NotSent | Unreachable | Replied) -> None:
        """An event about one batch, to the dispatcher that sent it (gone: nobody waits)."""
        d = self._of_batch(event.reply.id if isinstance(event, Replied) else event.batch_id)
        if d is not None:
            self.handle(event, d)

    def _arm_timer(self) -> None:
        wakes = [w for d in self.dispatchers.values() if (w := d.next_wakeup(self.now)) is not None]
        wake = min(wakes) if wakes else None
        if self._timer is not None and (wake is None or self._timer.when() != wake):
            self._timer.cancel()
            self._timer = None
        if wake is not None and self._timer is None:
            self._timer = self.loop.call_at(wake, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.handle(Wake(self.now))

    # -- what Dask says ----------------------------------------------------------------

    def _on_reply(self, event: tuple) -> None:
        _, msg = event
        try:
            reply = BatchReply.from_wire(msg)
        except ValueError as e:
            logger.error("%s from %s", e, msg.get("worker") if isinstance(msg, dict) else "?")
            if isinstance(msg, dict) and "id" in msg:
                self._for_batch(Lost(self.now, str(msg["id"]), str(e)))
            return
        self._for_batch(Replied(self.now, reply))

    def _on_worker_event(self, event: tuple) -> None:
        _, msg = event
        version = msg.get("version", 0)
        if msg["action"] == "list":  # what workers hold changed: ask who holds what
            self._spawn(self._sync_workers())
        elif msg["action"] == "add":
            self.handle(WorkerJoined(self.now, msg["worker"], version))
        else:
            self.handle(WorkerLeft(self.now, msg["worker"]["address"], version))

    def _spawn(self, coro) -> None:
        """Fire and forget, logged: a failure here must not vanish."""
        task = self.loop.create_task(coro)
        self._direct_calls.add(task)

        def done(t: asyncio.Task) -> None:
            self._direct_calls.discard(t)
            if not t.cancelled() and t.exception() is not None:
                logger.warning("%s failed: %s", getattr(coro, "__name__", "call"), t.exception())

        task.add_done_callback(done)

    def _on_state(self, event: tuple) -> None:
        _, msg = event
        self.handle(MetricsDigest(self.now, msg.get("workers", {})))

    def _reap_failed(self) -> None:
        """Batches whose task ended without replying. ``run_batch`` replies on every
        error it can catch, so this is rare; polling the futures costs nothing per
        batch, unlike a done-callback (a thread hop each)."""
        for batch_id, future in list(self.futures.items()):
            if future.status in ("error", "cancelled"):
                self._for_batch(Lost(self.now, batch_id, future.status))

    # -- periodic work ---------------------------------------------------------------

    async def _every(self, seconds: float, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await step()
            except Exception:  # a bug here must not stop the watchdog for good
                logger.exception("%s failed", step.__name__)

    async def _tick(self) -> None:
        if self.reconnecting is None and self.client.status != "running" and not self.dispatcher.closing:
            self._lose(f"client {self.client.status}")
        self.handle(Tick(self.now))

    # -- the scheduler lost and found -------------------------------------------------

    async def _attach(self) -> None:
        """Subscribe to replies, membership and metrics, and list the workers: at start
        and on every reconnection (a new scheduler knows none of it)."""
        self.topic = RESULTS_PREFIX + self.client.id
        self.client.subscribe_topic(self.topic, self._on_reply)
        self.client.subscribe_topic(WORKERS_TOPIC, self._on_worker_event)
        self.client.subscribe_topic(STATE_TOPIC, self._on_state)
        self.client.subscribe_topic(MODELS_TOPIC, self._on_models)
        await self._fast_streams(force=True)
        await self._sync_models()
        await self._sync_workers()

    def _lose(self, reason: str) -> None:
        self.futures.clear()  # the client cancelled them; releasing them would need the scheduler
        self.handle(SchedulerLost(self.now, reason))
        self.reconnecting = self.loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        """Until a scheduler answers at the same address. Dask's client tries for its
        connect timeout, then closes; after that (``serve``), a new client each try."""
        while True:
            await asyncio.sleep(RECONNECT_EVERY)
            fresh = None
            try:
                if self.client.status == "closed" and self.connect is not None:
                    fresh = await self.connect()
                elif self.client.status != "running":
                    continue  # Dask's own reconnection is still trying
                client = fresh or self.client
                await client.scheduler.batch_router_models()
                self.client = client
                await self._attach()
            except Exception as e:  # not there yet, or gone again
                logger.debug("scheduler not back yet: %s", e)
                if fresh is not None and fresh is not self.client:
                    await fresh.close()
                continue
            self.handle(SchedulerBack(self.now))
            logger.warning("connected to the scheduler again (%s)", self.client.scheduler.address)
            self.reconnecting = None
            return

    async def _resync(self) -> None:
        """Membership events are the fast path; this catches anything they missed."""
        if self.reconnecting is not None:
            return
        self._reap_failed()
        self._prune_lanes()
        try:
            await self._fast_streams()
            await self._sync_workers()
        except Exception as e:  # the scheduler may be briefly unreachable
            logger.warning("could not refresh the worker list: %s", e)

    async def _sync_workers(self) -> None:
        snapshot = await self.client.scheduler.batch_router_workers()
        self.handle(WorkersListed(self.now, snapshot["workers"], snapshot["version"]))

    async def _fast_streams(self, force: bool = False) -> None:
        """Dask coalesces client<->scheduler messages for 2-10 ms; we want none. Redone
        after a reconnect, which creates new streams with Dask's defaults."""
        comm = self.client.scheduler_comm
        if comm is not None and (force or comm.interval != self.send_interval):
            comm.interval = self.send_interval
            await self.client.scheduler.batch_router_hello(client=self.client.id)

    async def _report(self) -> None:
        """Send the statistics snapshot to the dashboard's pages. A scheduler that cannot
        take it (unreachable for a moment, or without the plugin) costs a warning when
        it starts failing, never a request; the next interval simply tries again."""
        try:
            snapshot = self.telemetry.snapshot(list(self.dispatchers.values()), self.now)
            reply = await self.client.scheduler.batch_router_frontend(frontend=self.client.id, stats=snapshot)
            if reply.get("status") != "OK":
                raise ValueError(reply.get("message"))
        except Exception as e:
            if not self._report_failing:
                logger.warning("could not send statistics to the dashboard: %s", e)
            self._report_failing = True
        else:
            if self._report_failing:
                logger.info("dashboard statistics reach the scheduler again")
            self._report_failing = False
