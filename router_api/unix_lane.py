"""The front end's end of the same-host lane over a Unix socket (``worker_setup.unix_lane``):
one connection per worker, batches written as they go, replies matched to their batch
by id as they come back, in any order."""

from __future__ import annotations

import asyncio
import pickle

from core.frames import frame, read_frame
from core.protocol import BatchSpec


class Lane:
    def __init__(self, path: str, connect_timeout: float) -> None:
        self.path, self.connect_timeout = path, connect_timeout
        self.writer: asyncio.StreamWriter | None = None
        self.waiting: dict[str, asyncio.Future] = {}
        self._connecting: asyncio.Task | None = None
        self._reader: asyncio.Task | None = None

    async def call(self, spec: BatchSpec) -> dict:
        """The batch's reply (``BatchReply.to_wire()``'s form); OSError if the lane broke."""
        if self.writer is None or self.writer.is_closing():
            await self._connect()
        done = self.waiting[spec.id] = asyncio.get_running_loop().create_future()
        try:
            self.writer.write(frame(pickle.dumps(spec, protocol=5)))
        except Exception:
            self.waiting.pop(spec.id, None)
            raise
        return await done

    async def _connect(self) -> None:
        if self._connecting is None:  # batches sent while it connects wait for the same connection
            self._connecting = asyncio.ensure_future(self._open())
        try:
            await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _open(self) -> None:
        reader, self.writer = await asyncio.wait_for(asyncio.open_unix_connection(self.path), self.connect_timeout)
        self._reader = asyncio.ensure_future(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        error: Exception = ConnectionResetError(f"the lane to {self.path} closed")
        try:
            while True:
                msg = pickle.loads(await read_frame(reader))
                waiter = self.waiting.pop(msg["id"], None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(msg)
        except (asyncio.IncompleteReadError, OSError) as e:
            error = ConnectionResetError(f"the lane to {self.path} broke: {type(e).__name__}: {e}")
        except Exception as e:  # a reply that is not one: this connection is no good
            error = ConnectionResetError(f"the lane to {self.path} sent a bad reply: {type(e).__name__}: {e}")
        finally:
            if self.writer is not None:
                self.writer.close()
            self.writer = None
            for waiter in self.waiting.values():
                if not waiter.done():
                    waiter.set_exception(error)
            self.waiting.clear()

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self._reader is not None:
            self._reader.cancel()
