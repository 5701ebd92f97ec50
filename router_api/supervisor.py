"""`up`'s local workers come back when they die, as under Dask's Nanny.

A worker process that exits while `up` runs (killed, out of memory, a crash) is started
again under the same name, after a back-off that doubles while it keeps dying young
(1 s … 60 s), so a worker that cannot start does not spin. Its restarts count rides its
startup information to ``/v1/workers``. Its batches in flight were already re-queued by
the front end when the scheduler said it left.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import Callable

logger = logging.getLogger("router_api.supervisor")

YOUNG = 30.0  # seconds: a worker that dies sooner than this is crash-looping
MAX_BACKOFF = 60.0


class Supervisor:
    def __init__(self, spawn: Callable[[int, int], subprocess.Popen], count: int, every: float = 0.5) -> None:
        """``spawn(index, restarts)`` starts worker ``index``."""
        self.spawn, self.every = spawn, every
        self.procs = [spawn(i, 0) for i in range(count)]
        self.restarts = [0] * count
        self.started = [time.monotonic()] * count
        self.backoff = [1.0] * count
        self.due: list[float | None] = [None] * count  # when a dead worker starts again

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            self.check(time.monotonic())

    def check(self, now: float) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is None:
                continue
            if self.due[i] is None:
                lived = now - self.started[i]
                self.backoff[i] = min(MAX_BACKOFF, self.backoff[i] * 2) if lived < YOUNG else 1.0
                self.due[i] = now + (self.backoff[i] if lived < YOUNG else 0.0)
                logger.warning("worker %d exited (code %s) after %.0f s; starting it again%s", i, proc.returncode, lived,
                               f" in {self.due[i] - now:.0f} s" if self.due[i] > now else "")  # fmt: skip
            if now >= self.due[i]:
                self.restarts[i] += 1
                self.procs[i], self.started[i], self.due[i] = self.spawn(i, self.restarts[i]), now, None
