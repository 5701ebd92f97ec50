"""How a front end sends batches straight to the workers on its own host (``direct-lane:
same-host``): over a worker's Unix-socket lane (``router_api.unix_lane``) where it has
one in this front end's filesystem, else over a pooled connection to its Dask listener;
either way the reply comes back on that connection. A connection that cannot be made
or breaks puts its batches' requests back in the queue, and that worker gets Dask tasks
for a while.

Mixed into ``ClusterLink``, whose loop, clock, events (``_for_batch``, ``_on_reply``)
and settings it uses.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from typing import Any

from distributed.core import ConnectionPool
from distributed.protocol import to_serialize

from core.protocol import BatchSpec
from router_api.dispatch_events import Lost, NotSent, Unreachable
from router_api.unix_lane import Lane

logger = logging.getLogger("router_api.link_lanes")

DIRECT_CONNECT = 3.0  # seconds to connect to a worker on this host before giving it tasks instead
DIRECT_RETRY = 30.0  # seconds a worker whose direct connection failed gets tasks before the lane is tried again


def lane_payload(spec: BatchSpec) -> bytes | Any:
    """A batch for the direct lane: pickled here into bytes when nothing in it travels
    out of band (tensors in shared memory, or small), which costs the front end ~130 µs
    less per batch than Dask's serialization of it (measured); else Dask's, so tensor
    bytes go as frames of their own, never copied into the pickle."""
    buffers: list = []
    data = pickle.dumps(spec, protocol=5, buffer_callback=buffers.append)
    return data if not buffers else to_serialize(spec)


class DirectLanes:
    def _init_lanes(self) -> None:
        self.unreachable: dict[str, float] = {}  # worker -> when its direct connection failed: tasks until DIRECT_RETRY
        self.pool: ConnectionPool | None = None  # connections to workers' listeners, made on first use
        self.lanes: dict[str, Lane] = {}  # workers' Unix-socket lanes, by path, connected on first use

    def _prune_lanes(self) -> None:
        """A lane whose worker no dispatcher knows any more (it left, or came back with a
        new socket) is closed and forgotten."""
        known = {v.info.get("lane") for d in self.dispatchers.values() for v in d.views.values()}
        for path in [p for p in self.lanes if p not in known]:
            self._spawn(self.lanes.pop(path).close())

    async def _close_lanes(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        for lane in self.lanes.values():
            await lane.close()

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

    def _send_direct(self, batch_id: str, view, spec: BatchSpec) -> None:
        """Written now on the worker's lane (its reply handled as it is read), else sent
        to its listener by a task."""
        if (lane := self._lane(view)) is not None:
            address = view.address
            try:
                lane.send(spec, lambda result: self._lane_replied(batch_id, address, result))
            except Exception as e:  # it could not even be written: as a failed send
                self.loop.call_soon(self._for_batch, NotSent(self.now, batch_id, f"{type(e).__name__}: {e}"))
            return
        self._spawn(self._send_to_listener(batch_id, view, spec))

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

    async def _send_to_listener(self, batch_id: str, view, spec: BatchSpec) -> None:
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
