"""The front end's end of the same-host lane over a Unix socket (``worker_setup.unix_lane``):
one connection per worker, batches written as they go, replies matched to their batch
by id as they come back, in any order.

It is a protocol, not a stream: a batch is written in the loop iteration that formed
it, and a reply reaches its callback in the iteration that read it. Tasks awaiting
futures would cost a loop iteration at each end, and under load an iteration of the
front end's loop lasts long enough that each one is a share of every request's latency.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections.abc import Callable

from core.frames import frame, split_frames
from core.protocol import BatchSpec

logger = logging.getLogger("router_api.unix_lane")

OnReply = Callable[[dict | OSError], None]


class Lane:
    def __init__(self, path: str, connect_timeout: float) -> None:
        self.path, self.connect_timeout = path, connect_timeout
        self.conn: _Connection | None = None
        self._unsent: list[tuple[str, bytes, OnReply]] = []  # batches sent while it connects
        self._connecting: asyncio.Task | None = None

    @property
    def in_flight(self) -> int:
        return len(self._unsent) + (len(self.conn.waiting) if self.conn is not None else 0)

    def send(self, spec: BatchSpec, on_reply: OnReply) -> None:
        """Write the batch now (once connected, if it is not); ``on_reply`` later gets its
        reply (``BatchReply.to_wire()``'s form) or the OSError that lost it, once."""
        data = frame(pickle.dumps(spec, protocol=5))
        if self.conn is not None and self.conn.usable:
            self.conn.write(spec.id, data, on_reply)
            return
        self._unsent.append((spec.id, data, on_reply))
        if self._connecting is None:  # batches sent while it connects wait for the same connection
            self._connecting = asyncio.ensure_future(self._open())

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_unix_connection(lambda: _Connection(self), self.path), self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            unsent, self._unsent = self._unsent, []
            error = ConnectionRefusedError(f"cannot reach the lane at {self.path}: {type(e).__name__}: {e}")
            for _, _, on_reply in unsent:
                _deliver(on_reply, error)
        finally:
            self._connecting = None

    def _connected(self, conn: _Connection) -> None:
        self.conn = conn
        unsent, self._unsent = self._unsent, []
        for batch_id, data, on_reply in unsent:
            conn.write(batch_id, data, on_reply)

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.close()


class _Connection(asyncio.Protocol):
    """One connection of a lane: a broken one fails exactly the batches written on it."""

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.transport: asyncio.Transport | None = None
        self.waiting: dict[str, OnReply] = {}
        self._buffer = bytearray()
        self._broken: str | None = None

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def write(self, batch_id: str, data: bytes, on_reply: OnReply) -> None:
        self.waiting[batch_id] = on_reply
        self.transport.write(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.lane._connected(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            replies = [pickle.loads(f) for f in split_frames(self._buffer)]
        except Exception as e:  # a reply that is not one: this connection is no good
            self._broken = f"sent a bad reply: {type(e).__name__}: {e}"
            self.transport.close()  # connection_lost fails what it carried
            return
        for msg in replies:
            on_reply = self.waiting.pop(msg.get("id"), None) if isinstance(msg, dict) else None
            if on_reply is not None:
                _deliver(on_reply, msg)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lane.conn is self:
            self.lane.conn = None
        why = self._broken or (f"broke: {type(exc).__name__}: {exc}" if exc else "closed")
        waiting, self.waiting = self.waiting, {}
        error = ConnectionResetError(f"the lane to {self.lane.path} {why}")
        for on_reply in waiting.values():
            _deliver(on_reply, error)


def _deliver(on_reply: OnReply, result: dict | OSError) -> None:
    """One batch's outcome to its sender. Its handling failing must not break the lane
    (asyncio would close the connection under every other batch on it)."""
    try:
        on_reply(result)
    except Exception:
        logger.exception("handling a lane reply failed")
