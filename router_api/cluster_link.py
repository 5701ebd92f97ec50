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
import pickle
from dataclasses import replace
from collections.abc import Awaitable, Callable
from typing import Any

from distributed.core import ConnectionPool
from distributed.protocol import to_serialize

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
from router_api.link_models import ModelSet
from router_api.telemetry import Telemetry
from router_api.unix_lane import Lane

logger = logging.getLogger("router_api.cluster_link")

WATCH_EVERY = 0.1  # seconds between watchdog ticks: O(batches in flight) each
RESYNC_EVERY = 2.0  # seconds between membership resyncs and checks for failed tasks
DIRECT_CONNECT = 3.0  # seconds to connect to a worker on this host before giving it tasks instead
DIRECT_RETRY = 30.0  # seconds a worker whose direct connection failed gets tasks before the lane is tried again
RECONNECT_EVERY = 0.5  # seconds between attempts to reach a lost scheduler


def lane_payload(spec: BatchSpec) -> bytes | Any:
    """A batch for the direct lane: pickled here into bytes when nothing in it travels
    out of band (tensors in shared memory, or small), which costs the front end ~130 µs
    less per batch than Dask's serialization of it (measured); else Dask's, so tensor
    bytes go as frames of their own, never copied into the pickle."""
    buffers: list = []
    data = pickle.dumps(spec, protocol=5, buffer_callback=buffers.append)
    return data if not buffers else to_serialize(spec)


class ClusterLink(ModelSet):
    """One Dispatcher per model the cluster serves (``models``: name -> its info, kept by
    ``link_models.ModelSet``), each with its own queue and statistics; what Dask says of
    workers goes to all of them, a reply to the one whose batch it is."""

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
        self.unreachable: dict[str, float] = {}  # worker -> when its direct connection failed: tasks until DIRECT_RETRY
        self._direct_calls: set[asyncio.Task] = set()
        self.pool: ConnectionPool | None = None  # connections to workers' listeners, made on first use
        self.lanes: dict[str, Lane] = {}  # workers' Unix-socket lanes, by path, connected on first use
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
        if self.pool is not None:
            await self.pool.close()
        for lane in self.lanes.values():
            await lane.close()
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

    def route(self, view) -> str:
        """How batches reach this worker: "direct" (same host, its own listener) or "task"."""
        same_host = self.direct and view.info.get("direct_address") and view.info.get("clock") == self.clock
        failed = self.unreachable.get(view.address)
        if failed is not None and self.loop is not None and self.now - failed > DIRECT_RETRY:
            del self.unreachable[view.address]  # try the direct lane again
            failed = None
        return "direct" if same_host and failed is None else "task"

    def shares_memory(self, view) -> bool:
        """Does this worker get its batches directly and see this front end's /dev/shm?"""
        return bool(self.shm) and self.route(view) == "direct" and view.info.get("shm") == self.shm

    def shm_workers(self) -> bool:
        """Is some worker able to read request bodies from shared memory?"""
        return self.direct and any(self.shares_memory(v) for d in self.dispatchers.values() for v in d.views.values())

    def _submit(self, batch, model: str) -> None:
        direct = batch.view is not None and self.route(batch.view) == "direct"
        if batch.view is not None:  # only a worker reached directly counts every batch it holds
            batch.view.reports_load = direct
        # Tensors in shared memory go as references to a worker that sees it, as bytes to others.
        shared = direct and self.shares_memory(batch.view)
        items = [(replace(i, inputs={}, codecs={}) if shared else replace(i, shm=None)) if getattr(i, "shm", None) else i
                 for i in batch.items]  # fmt: skip
        spec = BatchSpec(batch.id, self.topic, items, any(r.trace is not None for r in batch.requests), model)
        if direct and (lane := self._lane(batch.view)) is not None:
            address = batch.view.address
            try:
                lane.send(spec, lambda result: self._lane_replied(batch.id, address, result))
            except Exception as e:  # it could not even be written: as a failed send
                self.loop.call_soon(self._for_batch, NotSent(self.now, batch.id, f"{type(e).__name__}: {e}"))
            return
        if direct:
            call = self.loop.create_task(self._send_direct(batch.id, batch.view, spec))
            self._direct_calls.add(call)
            call.add_done_callback(self._direct_calls.discard)
            return
        where = {"workers": [batch.view.address], "allow_other_workers": False} if batch.view is not None else {}
        try:
            self.futures[batch.id] = self.client.submit(RUN_BATCH, spec, key=batch.id, pure=False, **where)
        except Exception as e:
            self.loop.call_soon(self._for_batch, NotSent(self.now, batch.id, str(e)))

    def _lane(self, view) -> Lane | None:
        """The worker's Unix-socket lane (``router_api.unix_lane``), where it has one in
        this front end's filesystem: same host, same /dev/shm, the same /tmp as a rule."""
        path = view.info.get("lane")
        if not path or view.info.get("shm") != self.shm:
            return None
        lane = self.lanes.get(path)
        if lane is None:
            lane = self.lanes[path] = Lane(path, DIRECT_CONNECT)
        return lane

    def _lane_replied(self, batch_id: str, address: str, result: dict | OSError) -> None:
        if isinstance(result, OSError):
            self._unreachable(batch_id, address, result)
        else:
            self._on_reply((None, result))

    def _unreachable(self, batch_id: str, address: str, e: BaseException) -> None:
        """A direct connection that cannot be made (in ``DIRECT_CONNECT`` seconds) or
        breaks puts the batch's requests back in the queue, and the worker gets tasks for
        ``DIRECT_RETRY`` seconds (a worker that left is removed by the scheduler's word)."""
        if address not in self.unreachable:
            logger.warning("direct lane to %s failed (%s: %s); sending it Dask tasks for %.0f s", address,
                           type(e).__name__, e, DIRECT_RETRY)  # fmt: skip
        self.unreachable[address] = self.now
        self._for_batch(Unreachable(self.now, batch_id, f"{type(e).__name__}: {e}"))

    async def _send_direct(self, batch_id: str, view, spec: BatchSpec) -> None:
        """One batch over a pooled connection to the worker's Dask listener (no lane in
        this front end's filesystem); the reply comes back on it. An error the worker
        itself raised fails the batch, as a task's would."""
        try:
            msg = await self._listener_call(view, spec)
        except (OSError, asyncio.TimeoutError) as e:  # CommClosedError is an OSError
            self._unreachable(batch_id, view.address, e)
            return
        except Exception as e:  # raised on the worker, sent back: the batch failed there
            logger.error("batch %s failed on %s: %s: %s", batch_id, view.address, type(e).__name__, e)
            self._for_batch(Lost(self.now, batch_id, f"{type(e).__name__}: {e}"))
            return
        self._on_reply((None, msg))

    async def _listener_call(self, view, spec: BatchSpec) -> dict:
        if self.pool is None:
            self.pool = ConnectionPool(timeout=DIRECT_CONNECT, deserialize=True, connection_args=self.client.connection_args)
            await self.pool.start()
        return await self.pool(view.info["direct_address"]).batch_router_run(spec=lane_payload(spec))

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
