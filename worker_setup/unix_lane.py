"""The worker's end of the same-host lane over a Unix socket (``core.frames``).

The Dask listener's direct lane (``direct_lane``) costs the front end ~250 µs of CPU
per batch in Dask's RPC machinery; a framed pickle on a Unix socket ~100 µs (measured
with bare round trips), and a front end on the worker's host is CPU-bound long before
its workers are. Batches on one connection run concurrently, as many as the worker's
lane threads allow, and each reply goes back as soon as it is ready, with its id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from core.frames import frame, lane_dir, read_frame
from worker_setup.execute import run_spec
from worker_setup.shelf import Shelf

logger = logging.getLogger("worker_setup.unix_lane")

EXTENSION = "batch-router-unix-lane"  # has close(): the socket goes with the worker


class UnixLane:
    def __init__(self, worker, shelf: Shelf, pool: ThreadPoolExecutor) -> None:
        self.worker, self.shelf, self.pool = worker, shelf, pool
        self.server: asyncio.base_events.Server | None = None
        self.path: str | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> str | None:
        """Listen; the socket's path, or None (then front ends use the Dask listener)."""
        try:
            path = lane_dir() / f"lane-{os.getpid()}-{secrets.token_hex(4)}.sock"
            self.server = await asyncio.start_unix_server(self._serve, str(path))
            os.chmod(path, 0o600)
        except OSError as e:
            logger.warning("no Unix-socket lane (%s): front ends on this host use the Dask listener", e)
            return None
        self.path = str(path)
        return self.path

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                spec = pickle.loads(await read_frame(reader))
                task = asyncio.create_task(self._run(spec, writer))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the front end closed it
        except Exception as e:  # a frame that is not a batch: this connection is no good
            logger.error("closing a lane connection: %s: %s", type(e).__name__, e)
        finally:
            writer.close()

    async def _run(self, spec, writer: asyncio.StreamWriter) -> None:
        self.shelf.accept()  # waiting for a thread counts: it is this worker's load
        try:
            reply = await asyncio.get_running_loop().run_in_executor(
                self.pool, run_spec, self.worker.address, spec, lambda: self.shelf.get(spec.model)
            )
        finally:
            load = self.shelf.reply_leaves()
        reply.load = load
        if not writer.is_closing():
            writer.write(frame(pickle.dumps(reply.to_wire(), protocol=5)))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.path is not None:
            Path(self.path).unlink(missing_ok=True)
