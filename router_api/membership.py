"""Which workers the front end may send to: membership events from the scheduler plugin
(the fast path), a periodic resync that catches anything they missed, and the plugin's
state digests. Mixed into the Dispatcher, like the Watchdog."""

from __future__ import annotations

import asyncio
import logging

from router_api import config
from router_api.views import apply_state
from scheduler_plugins.policies import WorkerView

logger = logging.getLogger("router_api.dispatch")


class Membership:
    """Needs from the Dispatcher: client, model, window, views, in_flight, closing,
    membership_version, and _pump, _resend, _reap_failed."""

    def _on_worker_event(self, event) -> None:
        _, msg = event
        self.membership_version = max(self.membership_version, msg.get("version", 0))
        if msg["action"] == "add":
            self._add_view(msg["worker"])
        else:
            self._remove_view(msg["worker"]["address"])
        self._pump()

    def _on_state(self, event) -> None:
        _, msg = event
        apply_state(self.views, msg)
        self._pump()

    def _add_view(self, info: dict) -> None:
        if info["sha256"] != self.model["sha256"]:
            return
        view = self.views.get(info["address"])
        if view is None:
            self.views[info["address"]] = WorkerView(info["address"], info.get("name", ""), self.window, info)
            logger.info("worker %s joined (%s, %s)", info["address"], info.get("device"), info.get("providers"))
        else:
            view.info = info

    def _remove_view(self, address: str) -> None:
        view = self.views.pop(address, None)
        if view is None:
            return
        lost = [b for b in self.in_flight.values() if b.view is view]
        logger.warning("worker %s left with %d batches in flight; re-queueing them", address, len(lost))
        for batch in lost:
            self._resend(batch)

    async def sync_workers(self) -> None:
        snapshot = await self.client.scheduler.batch_router_workers()
        if snapshot["version"] < self.membership_version:
            return  # taken before an event we already applied: it would undo it
        self.membership_version = snapshot["version"]
        workers = snapshot["workers"]
        for info in workers.values():
            self._add_view(info)
        for address in set(self.views) - set(workers):
            self._remove_view(address)
        self._pump()

    async def _fast_streams(self, force: bool = False) -> None:
        """Dask coalesces client<->scheduler messages for 2-10 ms; we want none. Redone
        after a reconnect, which creates new streams with Dask's defaults."""
        interval = config.seconds("batched-send-interval")
        comm = self.client.scheduler_comm
        if comm is not None and (force or comm.interval != interval):
            comm.interval = interval
            await self.client.scheduler.batch_router_hello(client=self.client.id)

    async def _resync_loop(self) -> None:
        """Membership events are the fast path; this catches anything they missed."""
        while not self.closing:
            await asyncio.sleep(2.0)
            self._reap_failed()
            try:
                await self._fast_streams()
                await self.sync_workers()
            except Exception as e:  # the scheduler may be briefly unreachable
                logger.warning("could not refresh the worker list: %s", e)
