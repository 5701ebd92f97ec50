"""What a front end does as the scheduler's models come and go: one Dispatcher per
model (``add_model``), a name or a batch finding its own (``serving``, ``_of_batch``),
a model's queue drained before it is unloaded (``_on_models``), and the set as the
scheduler has it after a reconnection, a load or an unload (``sync``).

Mixed into ``ClusterLink``, whose event loop, client and ``handle`` it uses: the link
turns Dask's events into the dispatchers' and back; this is only which dispatchers.
"""

from __future__ import annotations

import logging
import uuid

from router_api.dispatch_events import Abort, Wake
from router_api.dispatcher import Dispatcher

logger = logging.getLogger("router_api.cluster_link")


class ModelSet:
    def _init_models(self, models: dict[str, dict]) -> None:
        self._prefix = f"batch-router-{uuid.uuid4().hex[:8]}"  # a batch's id names its dispatcher: prefix-serial-n
        self._serial = 0
        self.dispatchers: dict[str, Dispatcher] = {}
        self._by_prefix: dict[str, Dispatcher] = {}
        for info in models.values():
            self.add_model(info)

    @property
    def dispatcher(self) -> Dispatcher:
        """The first model's (what a one-model front end has); the shared state (telemetry,
        readiness) reads the same on any."""
        return next(iter(self.dispatchers.values()))

    def add_model(self, info: dict) -> Dispatcher:
        self._serial += 1
        prefix = f"{self._prefix}-{self._serial}"
        d = Dispatcher(self.settings, info, prefix, self.clock, self.telemetry)
        if self.dispatchers:  # loaded while this front end is shutting down, or without its scheduler: the same for it
            d.closing, d.scheduler_lost = self.dispatcher.closing, self.dispatcher.scheduler_lost
        self.dispatchers[info["name"]] = self._by_prefix[prefix] = d
        return d

    def remove_model(self, name: str) -> None:
        if name not in self.dispatchers or len(self.dispatchers) == 1:
            return  # the last one stays (the scheduler never unloads it): it answers 404s and 503s, not a crash
        self._retire(self.dispatchers.pop(name))

    def _retire(self, d: Dispatcher) -> None:
        self.handle(Abort(self.now), d)  # nothing left after draining; anything else is answered, never dropped
        self._by_prefix = {p: x for p, x in self._by_prefix.items() if x is not d}

    def serving(self, name: str) -> Dispatcher | None:
        """The dispatcher of a name served: a model's own, or its -uint8 twin's."""
        if not name:
            return self.dispatcher
        d = self.dispatchers.get(name)
        return d if d is not None else next((x for x in self.dispatchers.values() if name in x.entry_stats), None)

    def _of_batch(self, batch_id: str) -> Dispatcher | None:
        return self._by_prefix.get(batch_id.rsplit("-", 1)[0])

    def _on_models(self, event: tuple) -> None:
        """A model loaded (a dispatcher for it, then the workers that hold it), being
        unloaded (take nothing new; say when all it holds is answered), or unloaded."""
        _, msg = event
        name, action = msg["name"], msg["action"]
        if action == "load" and msg.get("model"):
            old = self.dispatchers.get(name)
            self.add_model(msg["model"])
            if old is not None:  # another file under the same name
                self._retire(old)
            self._spawn(self._sync_workers())
        elif action == "unloading" and (d := self.dispatchers.get(name)) is not None:
            d.draining = True
            logger.info("model %s is being unloaded: answering its %d queued requests and %d batches in flight, taking no more",
                        name, len(d.queue), len(d.batches))  # fmt: skip
            self.handle(Wake(self.now), d)
            if d.idle:
                self._drained(d)
        elif action == "unloading":
            self._spawn(self.client.scheduler.batch_router_drained(name=name, frontend=self.client.id))
        elif action == "unload":
            self.remove_model(name)
        if self.on_models is not None:
            self.on_models()

    def _drained(self, d: Dispatcher) -> None:
        if d.drained_sent:
            return
        d.drained_sent = True
        self._spawn(self.client.scheduler.batch_router_drained(name=d.name, frontend=self.client.id))

    async def sync(self) -> None:
        """Models and workers as the scheduler has them now (after a load or unload)."""
        await self._sync_models()
        await self._sync_workers()

    async def _sync_models(self) -> None:
        """The models the scheduler serves now: a new one gets a dispatcher, one gone
        (unloaded while this front end was away) loses its, its requests answered 503."""
        listing = await self.client.scheduler.batch_router_models()
        models = listing["models"]
        for name, info in models.items():
            old = self.dispatchers.get(name)
            if old is None or info["sha256"] != old.model_sha256:  # new, or another file under the same name
                self.add_model(info)
                if old is not None:
                    self._retire(old)
        for name in [n for n in self.dispatchers if n not in models]:
            if len(self.dispatchers) == 1:
                logger.error("the scheduler no longer serves %s: no worker will be used for it", name)
            self.remove_model(name)
        if self.on_models is not None:
            self.on_models()
