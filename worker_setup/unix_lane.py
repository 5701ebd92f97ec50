"""The worker's end of the same-host lane over a Unix socket (``core.frames``).

The Dask listener's direct lane (``direct_lane``) costs the front end ~250 µs of CPU
per batch in Dask's RPC machinery; a framed pickle on a Unix socket ~100 µs (measured
with bare round trips), and a front end on the worker's host is CPU-bound long before
its workers are. Batches on one connection run concurrently, as many as the worker's
lane threads allow, and each reply goes back as soon as it is ready, with its id. A
protocol, not a stream: a batch goes to a thread in the loop iteration that read it,
and its reply is written in the one after it finished.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import secrets
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from core.frames import frame, lane_dir, split_frames
from worker_setup.execute import run_spec
from worker_setup.shelf import Shelf

logger = logging.getLogger("worker_setup.unix_lane")

EXTENSION = "batch-router-unix-lane"  # has close(): the socket goes with the worker


class UnixLane:
    def __init__(self, worker, shelf: Shelf, pool: ThreadPoolExecutor) -> None:
        self.worker, self.shelf, self.pool = worker, shelf, pool
        self.server: asyncio.base_events.Server | None = None
        self.path: str | None = None

    async def start(self) -> str | None:
        """Listen; the socket's path, or None (then front ends use the Dask listener)."""
        try:
            path = lane_dir() / f"lane-{os.getpid()}-{secrets.token_hex(4)}.sock"
            self.server = await asyncio.get_running_loop().create_unix_server(self._serve, str(path))
            os.chmod(path, 0o600)
        except OSError as e:
            logger.warning("no Unix-socket lane (%s): front ends on this host use the Dask listener", e)
            return None
        self.path = str(path)
        return self.path

    def _serve(self) -> asyncio.Protocol:
        return _Connection(self)

    def run(self, spec, reply: Callable[[bytes], None]) -> None:
        """One batch on a lane thread; its framed reply goes to ``reply`` on the loop."""
        loop = asyncio.get_running_loop()
        self.shelf.accept()  # waiting for a thread counts: it is this worker's load

        def ran(done: Future) -> None:  # on the lane thread
            load = self.shelf.reply_leaves()
            try:
                out = done.result()
                out.load = load
                data = frame(pickle.dumps(out.to_wire(), protocol=5))
            except Exception as e:  # run_spec answers every item itself: this is a bug, logged
                logger.exception("batch %s: no reply: %s", getattr(spec, "id", "?"), e)
                return
            try:
                loop.call_soon_threadsafe(reply, data)
            except RuntimeError:  # the worker's loop closed meanwhile: nobody to answer
                pass

        self.pool.submit(run_spec, self.worker.address, spec, lambda: self.shelf.get(spec.model)).add_done_callback(ran)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.path is not None:
            Path(self.path).unlink(missing_ok=True)


class _Connection(asyncio.Protocol):
    """One front end's connection."""

    def __init__(self, lane: UnixLane) -> None:
        self.lane = lane
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            for f in split_frames(self._buffer):
                self.lane.run(pickle.loads(f), self._reply)
        except Exception as e:  # a frame that is not a batch: this connection is no good
            logger.error("closing a lane connection: %s: %s", type(e).__name__, e)
            self.transport.close()

    def _reply(self, data: bytes) -> None:
        if not self.transport.is_closing():  # the front end went: nobody waits for it
            self.transport.write(data)
