"""Triton's repository extension on the scheduler: index, load, unload.

Load reads and validates the file (a bad one is refused here, once, with ONNX's reason),
then asks every worker with room in its GPU memory to load it (``batch_router_load``:
fetch, build, warm up), and only then tells front ends it is READY: a front end never
queues for a model no warm worker holds. Unload first tells front ends to stop taking
requests for it and waits until each has answered everything it queued and sent
(``batch_router_drained``), then frees it on the workers: nothing accepted is lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from core.protocol import EXTENSION, MODELS_TOPIC
from core.repository import RepositoryError, room_for
from scheduler_plugins.registry import LOADING, READY, UNLOADING, Registry

logger = logging.getLogger("scheduler_plugins.loading")

DRAIN_TIMEOUT = 60.0  # seconds an unload waits for front ends to answer what they queued


REFUSALS = ((PermissionError, "forbidden"), (KeyError, "not-found"), (ValueError, "invalid"), (OSError, "invalid"))


async def answered(call) -> dict:
    """A repository call's result, or its refusal as ``{"status": "error", "kind", "message"}``:
    an expected refusal is an answer, not a traceback in the scheduler's log."""
    try:
        return {"status": "OK", **(await call)}
    except Exception as e:
        kind = next((k for t, k in REFUSALS if isinstance(e, t)), None)
        if kind is None:
            logger.exception("repository call failed")
            kind = "failed"
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        return {"status": "error", "kind": kind, "message": message or type(e).__name__}


class Loader:
    def __init__(self, registry: Registry, allow_load: bool, headroom: float, publish: Callable[[], None]) -> None:
        self.registry = registry
        self.allow_load = allow_load
        self.headroom = headroom
        self.publish_workers = publish  # membership changed: tell front ends (the plugin's)
        self.scheduler = None
        self.frontends: set[str] = set()  # Dask client ids of front ends (they said hello)
        self._drained: dict[str, set[str]] = {}  # model -> front ends done with it
        self._drain_events: dict[str, asyncio.Event] = {}
        self._lock = asyncio.Lock()  # one load or unload at a time

    def event(self, action: str, name: str, info: dict | None = None) -> None:
        self.scheduler.log_event(MODELS_TOPIC, {"action": action, "name": name, "model": info, "version": self.registry.version})

    # -- index ---------------------------------------------------------------------------

    async def index(self, ready: bool = False) -> dict:
        rows = self.registry.index(await asyncio.to_thread(self.registry.on_disk))
        return {"status": "OK", "models": [r for r in rows if r["state"] == READY] if ready else rows}

    # -- load ----------------------------------------------------------------------------

    async def load(self, name: str) -> dict:
        return await answered(self._load(name))

    async def unload(self, name: str) -> dict:
        return await answered(self._unload_loaded(name))

    async def _load(self, name: str) -> dict:
        if not self.allow_load:
            raise PermissionError("loading models is off: set batch-router.repository.allow-load to let callers "
                                  "make workers read repository files")  # fmt: skip
        async with self._lock:
            file, spec = await self.registry.read(name)
            served = self.registry.models.get(name)
            if served is not None and served.file.sha256 == file.sha256 and served.state == READY:
                return {"name": name, "workers": sorted(served.loaded), "result": "already loaded"}
            if served is not None:  # a new file or config under the same name: the old one goes first
                await self._unload(name)
            served = self.registry.add(file, spec)
            served.state = LOADING
            try:
                loaded = await self._load_on_workers(name)
            except Exception as e:
                self.registry.remove(name, f"load failed: {e}")
                raise
            served.state = READY
            self.registry.version += 1
            self.event("load", name, served.info)
            self.publish_workers()
            return {"name": name, "workers": loaded, "result": "loaded"}

    def candidates(self, name: str) -> tuple[list[str], dict[str, str]]:
        """Running model workers with room for it in GPU memory, and why the others not."""
        from distributed.core import Status

        need = self.registry.need(name)
        chosen, refused = [], {}
        for ws in self.scheduler.workers.values():
            if ws.status != Status.running or EXTENSION not in ws.extra:
                continue
            metrics = ws.metrics.get(EXTENSION)
            why = room_for(metrics.get("gpu") if isinstance(metrics, dict) else None, need, self.headroom)
            if why is None:
                chosen.append(ws.address)
            else:
                refused[ws.address] = why
        return chosen, refused

    async def _load_on_workers(self, name: str) -> list[str]:
        chosen, refused = self.candidates(name)
        if not chosen:
            raise RepositoryError(f"no worker can load {name!r}: " + ("; ".join(f"{a} {why}" for a, why in refused.items()) or "no workers"))
        results = await asyncio.gather(*(self.scheduler.rpc(a).batch_router_load(name=name) for a in chosen), return_exceptions=True)
        served, loaded = self.registry.models[name], []
        for address, result in zip(chosen, results):
            if isinstance(result, BaseException):
                refused[address] = f"{type(result).__name__}: {result}"
                logger.error("worker %s could not load %s: %s", address, name, refused[address])
                continue
            self.holds(address, name, result)
            served.measured = max(served.measured, int(result.get("gpu_bytes") or 0))
            loaded.append(address)
        if not loaded:
            raise RepositoryError(f"no worker loaded {name!r}: " + "; ".join(f"{a}: {why}" for a, why in refused.items()))
        logger.info("model %s loaded on %d workers%s", name, len(loaded), f" (not on {sorted(refused)})" if refused else "")
        return loaded

    def holds(self, address: str, name: str, entry: dict | None) -> None:
        """Record what a worker holds (``entry``: its description of the model; None: not)."""
        ws = self.scheduler.workers.get(address)
        if ws is None or EXTENSION not in ws.extra:
            return
        models = ws.extra[EXTENSION].setdefault("models", {})
        if entry is None:
            models.pop(name, None)
            if name in self.registry.models:
                self.registry.models[name].loaded.discard(address)
        else:
            models[name] = entry
            self.registry.models[name].loaded.add(address)

    # -- unload --------------------------------------------------------------------------

    async def _unload_loaded(self, name: str) -> dict:
        async with self._lock:
            if name not in self.registry.models or self.registry.models[name].state != READY:
                raise KeyError(f"model {name!r} is not loaded")
            if len(self.registry.ready()) == 1:  # decision: a router always serves a model (its ready probe, /v1/classify)
                raise ValueError(f"model {name!r} is the only model served: load another before unloading it")
            return await self._unload(name)

    async def _unload(self, name: str) -> dict:
        served = self.registry.models[name]
        served.state = UNLOADING
        waiting = set(self.frontends)
        self._drained[name] = set()
        done = self._drain_events[name] = asyncio.Event()
        self.event("unloading", name)
        try:
            await asyncio.wait_for(self._until_drained(name, waiting, done), DRAIN_TIMEOUT)
        except asyncio.TimeoutError:
            logger.error("front ends %s did not finish %s's requests in %.0f s; unloading it anyway",
                         sorted(waiting - self._drained[name]), name, DRAIN_TIMEOUT)  # fmt: skip
        finally:
            self._drained.pop(name, None)
            self._drain_events.pop(name, None)
        workers = sorted(served.loaded)
        self.registry.remove(name)
        self.event("unload", name)
        await asyncio.gather(*(self.scheduler.rpc(a).batch_router_unload(name=name) for a in workers), return_exceptions=True)
        for a in workers:
            self.holds(a, name, None)
        self.publish_workers()
        logger.info("model %s unloaded from %d workers", name, len(workers))
        return {"name": name, "workers": workers, "result": "unloaded"}

    async def _until_drained(self, name: str, waiting: set[str], done: asyncio.Event) -> None:
        while not (waiting & self.frontends) <= self._drained[name]:
            done.clear()
            try:
                await asyncio.wait_for(done.wait(), 0.5)  # a front end that left counts as drained
            except asyncio.TimeoutError:
                pass

    def drained(self, name: str, frontend: str) -> None:
        """A front end has answered everything it held for ``name`` and takes no more."""
        if name in self._drained:
            self._drained[name].add(frontend)
            self._drain_events[name].set()
