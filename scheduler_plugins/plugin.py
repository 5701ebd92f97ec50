"""The scheduler side of batch-router: model registry, live worker state, placement of
Python-API tasks, fast streams.

Shaped like ``distributed/semaphore.py``: state, RPC handlers, and a few plugin hooks.
It runs inside the Dask scheduler, either added by ``batch-router scheduler`` or by
``dask scheduler --preload scheduler_plugins.preload``.
"""

from __future__ import annotations

import logging
import time

from distributed.diagnostics.plugin import SchedulerPlugin

from core.config import Settings, buckets, placement_tuning
from core.placement import make_policy, weights
from core.protocol import API_PREFIXES, EXTENSION, STATE_TOPIC, WORKERS_TOPIC
from core.worker_view import Flight, WorkerView, apply_metrics
from scheduler_plugins.builtin_models import default_name
from scheduler_plugins.history import History
from scheduler_plugins.loading import Loader
from scheduler_plugins.registry import Registry
from scheduler_plugins.roles import refuse_workers
from scheduler_plugins.spans import PRUNE_EVERY_S, forget, tolerate_pruned

logger = logging.getLogger("scheduler_plugins.plugin")


def worker_entry(ws) -> dict | None:
    """What front ends need to know about a worker; None if it has no router model.
    ``models``: what it holds now, by name (kept up to date as models load and unload)."""
    extra = ws.extra.get(EXTENSION)
    if not extra:
        return None
    return {"address": ws.address, "name": str(ws.name), "nthreads": ws.nthreads, **extra, "models": dict(extra.get("models") or {})}


def serves(entry: dict, models: dict[str, dict]) -> bool:
    """Does this worker hold one of the cluster's models, as the cluster has it?"""
    held = entry.get("models") or {}
    return any(m.get("sha256") == models[n]["sha256"] for n, m in held.items() if n in models)


def running(ws) -> dict[str, Flight]:
    """The tasks Dask has sent to a worker, as placement counts work in flight."""
    return {ts.key: Flight(0.0, 0.0) for ts in ws.processing}


class BatchRouterPlugin(SchedulerPlugin):
    name = EXTENSION

    def __init__(self, model_path: str | None, settings: Settings) -> None:
        name = settings.model_name or default_name(model_path) if model_path else None
        self.registry = Registry(settings, model_path, name)
        self.loader = Loader(self.registry, settings.repository.allow_load, settings.placement.memory_headroom, self.membership_changed)
        self.started = False
        self.scheduler = None
        # The cluster's batch shapes and precision (per model, in the registry): every worker
        # and front end takes them from here, so a remote worker configured otherwise cannot disagree.
        self.buckets = buckets(settings)
        self.interval = settings.batched_send_interval
        self.publish_every = settings.worker.metrics_interval or 0.5
        # Bumped on every membership event, so a front end can tell a snapshot that
        # left before an event from one taken after it.
        self.version = 0
        self.views: dict[str, WorkerView] = {}  # for placing Python-API tasks
        self.tuning = placement_tuning(settings)
        self.policy = make_policy(settings.placement.policy, self.tuning)
        self._publisher = self._pruner = None
        # A front end silent for a few of its reporting intervals is gone.
        self.history = History(settings.dashboard.history, max(5.0, 4 * settings.dashboard.interval), settings.priority_levels)
        self._refused: set[str] = set()  # front ends whose statistics were refused (logged once)

    async def start(self, scheduler) -> None:
        self.scheduler = self.loader.scheduler = scheduler
        await self.registry.start()
        self.started = True
        scheduler.handlers.update(
            {
                "batch_router_model": self.model_info,
                "batch_router_models": self.models,
                "batch_router_model_chunk": self.model_chunk,
                "batch_router_repository_index": self.loader.index,
                "batch_router_repository_load": self.loader.load,
                "batch_router_repository_unload": self.loader.unload,
                "batch_router_drained": self.loader.drained,
                "batch_router_workers": self.membership,
                "batch_router_hello": self.hello,
                "batch_router_frontend": self.frontend_stats,
                "batch_router_dashboard": self.dashboard,
            }
        )
        scheduler.extensions[EXTENSION] = self
        # A join token's worker certificate: a worker, never a client (scheduler_plugins/roles.py).
        refuse_workers(scheduler)
        from scheduler_plugins.dashboard import add_to_navigation

        add_to_navigation(scheduler)
        from tornado.ioloop import PeriodicCallback

        self._publisher = PeriodicCallback(self.publish_state, 1e3 * self.publish_every)
        self._publisher.start()
        # Dask keeps a span and a TaskGroup per burst of batches for ever, and caches each key: forget them.
        tolerate_pruned(scheduler)
        self._pruner = PeriodicCallback(lambda: forget(scheduler), 1e3 * PRUNE_EVERY_S)
        self._pruner.start()
        for name, served in self.registry.models.items():
            logger.info("serving model %s from %s sha256=%s", name, served.file.path, served.file.sha256[:12])

    async def close(self) -> None:
        for callback in (self._publisher, self._pruner):
            if callback is not None:
                callback.stop()

    # -- live worker state ----------------------------------------------------------

    def publish_state(self) -> None:
        """Digest each model worker's heartbeat metrics into one event for front ends.

        O(workers) per tick, whatever the request rate. Heartbeats replace
        ``ws.metrics`` wholesale, so this always sees the latest.
        """
        if self.scheduler is None or not self.started:
            return
        digest = {}
        workers = self.workers_info()
        for address in workers:
            ws = self.scheduler.workers[address]
            metrics = ws.metrics.get(EXTENSION)
            state = dict(metrics) if isinstance(metrics, dict) else {"error": "no batch-router metrics in heartbeat"}
            digest[address] = state
            view = self.views.get(address) or self.views.setdefault(address, self._view(address, str(ws.name)))
            apply_metrics(view, state)
            view.flights = running(ws)
        for address in set(self.views) - set(digest):
            del self.views[address]
        w = weights(list(self.views.values()), 1, 0.0, self.tuning)
        for address, view in self.views.items():
            view.weight = w.get(address, 0.0)
        self.history.add_workers(
            time.time(),
            {
                a: {"info": workers[a], "state": digest[a], "placement": {"weight": self.views[a].weight, "in_flight": self.views[a].in_flight}}
                for a in digest
            },
        )
        if digest:
            self.scheduler.log_event(STATE_TOPIC, {"workers": digest})

    def _view(self, address: str, name: str) -> WorkerView:
        view = WorkerView(address, name)
        view.service.buckets = self.buckets  # its curve reads batches at their bucket, as workers run them
        return view

    # -- RPC handlers ------------------------------------------------------------

    def model_info(self, name: str | None = None) -> dict:
        """A model (the first when unnamed) with its batching, precision, and the
        ``-uint8`` name's metadata (None when not served): workers build that graph,
        front ends route to it. Raises KeyError for a model not loaded."""
        return self.registry.get(name).info

    def models(self) -> dict:
        """Every READY model, and the registry's version (bumped on each change)."""
        return {"version": self.registry.version, "models": self.registry.ready()}

    def model_chunk(self, offset: int, name: str | None = None) -> bytes:
        return self.registry.get(name).file.read_chunk(int(offset))

    def workers_info(self) -> dict:
        """Running workers that hold one of the cluster's models, keyed by address (a
        paused or closing worker takes no new batch)."""
        from distributed.core import Status

        out, models = {}, self.registry.ready()
        for ws in self.scheduler.workers.values():
            if ws.status != Status.running:
                continue
            entry = worker_entry(ws)
            if entry and serves(entry, models):
                out[ws.address] = entry
        return out

    def membership(self) -> dict:
        return {"version": self.version, "workers": self.workers_info()}

    def membership_changed(self) -> None:
        """What workers hold changed (a model loaded or unloaded): front ends list them again."""
        self.version += 1
        self.scheduler.log_event(WORKERS_TOPIC, {"action": "list", "version": self.version})

    def frontend_stats(self, frontend: str, stats: dict) -> dict:
        """A front end's periodic statistics, for the dashboard pages (O(workers)). A
        malformed one is refused with a reason, logged once per sender."""
        try:
            self.history.add_frontend(frontend, stats, time.time())
        except ValueError as e:
            if frontend not in self._refused and len(self._refused) < 1024:
                self._refused.add(frontend)
                logger.warning("refused statistics from front end %s: %s", frontend, e)
            return {"status": "error", "message": str(e)}
        return {"status": "OK"}

    def dashboard(self) -> str | None:
        """The dashboard's base URL as this scheduler serves it, for front ends to show."""
        server = self.scheduler.services.get("dashboard")
        if server is None or not getattr(server, "port", None):
            return None
        host = server.address if server.address not in ("", "0.0.0.0", "::") else "127.0.0.1"
        return f"http://[{host}]:{server.port}" if ":" in host else f"http://{host}:{server.port}"

    def hello(self, client: str) -> None:
        """A front end's client connected: stop coalescing the stream back to it.

        The scheduler->client stream is created after ``add_client`` runs, so this cannot
        be a plugin hook.
        """
        comm = self.scheduler.client_comms.get(client)
        if comm is not None:
            comm.interval = self.interval
        self.loader.frontends.add(client)

    def remove_client(self, scheduler, client: str) -> None:
        self.loader.frontends.discard(client)  # an unload waiting on it stops waiting

    # -- plugin hooks --------------------------------------------------------------

    def add_worker(self, scheduler, worker: str) -> None:
        # Dask's scheduler->worker stream coalesces for 5 ms by default.
        comm = scheduler.stream_comms.get(worker)
        if comm is not None:
            comm.interval = self.interval
        entry = worker_entry(scheduler.workers[worker])
        if entry is None:
            logger.warning("worker %s has no batch-router model; it gets no batches", worker)
            return
        models = self.registry.ready()
        for name, held in entry["models"].items():
            if name in models and held.get("sha256") == models[name]["sha256"]:
                self.registry.models[name].loaded.add(worker)
        if not serves(entry, models):
            logger.error("worker %s holds none of the cluster's models as they are now (%s); it gets no batches",
                         worker, {n: m.get("sha256", "")[:12] for n, m in entry["models"].items()})  # fmt: skip
            return
        if entry.get("cuda_fallback"):
            logger.error("worker %s asked for CUDA but ONNX Runtime runs on CPU", worker)
        self.version += 1
        scheduler.log_event(WORKERS_TOPIC, {"action": "add", "worker": entry, "version": self.version})

    def update_graph(self, scheduler, *, tasks, **kwargs) -> None:
        """Place Python-API tasks (``client.submit(classify, ...)``) by the same policy
        as the front end's batches, on model workers only.

        Runs before the new tasks leave ``released``, so the restriction holds from
        their first placement. The chosen worker is a loose
        restriction: should it die first, Dask runs the task elsewhere. Under
        ``dask-default`` the tasks may run on any model worker, Dask's choice.
        """
        # Runs for every batch the front end submits: look at workers only when an
        # API task is actually present (front-end batches are already pinned).
        api = [
            ts
            for key in tasks
            if (ts := scheduler.tasks.get(key)) is not None
            and ts.state == "released"
            and ts.prefix.name in API_PREFIXES
            and not ts.worker_restrictions
        ]
        eligible = set(self.workers_info()) if api else set()
        if not eligible:
            return
        views = [self.views.get(a) or self._view(a, str(scheduler.workers[a].name)) for a in eligible]
        for view in views:
            view.flights = running(scheduler.workers[view.address])
        for ts in api:
            view = self.policy.pick(views, time.monotonic())
            if view is None:
                ts.worker_restrictions = set(eligible)
                ts.loose_restrictions = False
            else:
                view.flights[ts.key] = Flight(time.monotonic(), 0.0)  # so the next task of the graph sees it
                ts.worker_restrictions = {view.address}
                ts.loose_restrictions = True

    def remove_worker(self, scheduler, worker: str, **kwargs) -> None:
        for served in self.registry.models.values():
            served.loaded.discard(worker)
        self.version += 1
        scheduler.log_event(WORKERS_TOPIC, {"action": "remove", "worker": {"address": worker}, "version": self.version})

