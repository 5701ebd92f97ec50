"""Request bodies in shared memory, for workers on this host (``shared-memory``).

A 602 KB tensor request sent to a worker over a socket is written into the kernel by the
front end and read out again by the worker: on a 2-core host that write was the front
end's largest single cost. Instead the front end reads each request body into a slab of
shared memory (the one copy it makes of it, in place of joining its chunks) and a batch
sent straight to a worker on this host names the slab, the offset and the length
(``core.protocol.ShmRef``); the worker maps the slab and stacks the rows from it.

Slabs are files in /dev/shm, ``batch-router-<pid namespace>-<pid>-<token>-<n>`` (the token:
a restarted front end with the same pid never reuses a name a worker has mapped; the
namespace: a front end judges only its own namespace's pids dead), reused: a request's slab goes
back to the pool when its response is finished or its client went away. A copy of its
batch still running then (a hedge, a probe, a batch whose request timed out) may read
the next request's bytes, but its answer is discarded: the request it carried is done.
The pool is bounded; past the bound a body is read as before, into memory of its own.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.protocol import ShmRef

logger = logging.getLogger("router_api.shm")

DIRECTORY = Path("/dev/shm")
PREFIX = "batch-router-"
MIN_SLAB = 64 * 1024  # smaller bodies are cheap to send as they are
_NAME = re.compile(rf"^{PREFIX}(\d+)-(\d+)-[0-9a-f]+-\d+$")


@dataclass(eq=False)
class Slab:
    path: str
    size: int
    buf: mmap.mmap = field(repr=False)
    address: int = 0  # where the mapping starts in this process

    def ref(self, data: memoryview) -> ShmRef | None:
        """Where ``data`` (a view into this slab) lies, for a worker on this host; None
        for bytes elsewhere (a JSON request's tensor was built from its numbers)."""
        start = np.frombuffer(data, np.uint8).ctypes.data - self.address if data.nbytes else 0
        if not 0 <= start <= self.size - data.nbytes:
            return None
        return ShmRef(self.path, start, data.nbytes)


class ShmPool:
    """Slabs by size class (powers of two), at most ``max_bytes`` of them in all."""

    def __init__(self, max_bytes: int, directory: Path = DIRECTORY) -> None:
        self.max_bytes, self.directory = max_bytes, directory
        self.free: dict[int, list[Slab]] = {}
        self.total = 0  # bytes of slabs made
        self.in_use: set[Slab] = set()
        self._n = 0
        self.full = False  # /dev/shm refused a slab once (logged once)
        self._token = secrets.token_hex(4)
        sweep_stale(directory)

    def take(self, nbytes: int) -> Slab | None:
        size = max(MIN_SLAB, 1 << (max(nbytes, 1) - 1).bit_length())
        free = self.free.get(size)
        if free:
            slab = free.pop()
        elif self.total + size > self.max_bytes:
            return None
        else:
            try:
                slab = self._make(size)
            except OSError as e:  # /dev/shm is full (a container's is often 64 MB): bodies stay in memory
                if not self.full:
                    logger.warning("no room for shared memory in %s (%s); request bodies travel in messages", self.directory, e)
                self.full = True
                return None
        self.in_use.add(slab)
        return slab

    def give_back(self, slab: Slab) -> None:
        if slab in self.in_use:
            self.in_use.discard(slab)
            self.free.setdefault(slab.size, []).append(slab)

    def stats(self) -> dict:
        return {"slabs_in_use": len(self.in_use), "bytes_in_use": sum(s.size for s in self.in_use), "bytes": self.total}

    def close(self) -> None:
        for slab in [*self.in_use, *(s for free in self.free.values() for s in free)]:
            Path(slab.path).unlink(missing_ok=True)
            try:
                slab.buf.close()
            except BufferError:  # a view of it is still alive: the mapping goes with it
                pass
        self.free.clear()
        self.in_use.clear()
        self.total = 0

    def _make(self, size: int) -> Slab:
        self._n += 1
        path = self.directory / f"{PREFIX}{pid_namespace()}-{os.getpid()}-{self._token}-{self._n}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)  # this user's workers only
        try:
            # Reserve the pages now: a tmpfs that fills up later would kill us with SIGBUS
            # on a write into the mapping, where this fails with ENOSPC instead.
            os.posix_fallocate(fd, 0, size)
            buf = mmap.mmap(fd, size)
        except OSError:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.total += size
        address = np.frombuffer(buf, np.uint8).ctypes.data
        return Slab(str(path), size, buf, address)


def pid_namespace() -> int:
    """This process's pid namespace: containers sharing a /dev/shm do not share pids."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def sweep_stale(directory: Path = DIRECTORY) -> None:
    """Remove slabs of front ends that are gone (killed before they could): only those
    of this pid namespace, where a pid that does not exist means a front end that does not."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    here = pid_namespace()
    for name in names:
        m = _NAME.match(name)
        if m is None or int(m.group(1)) != here or int(m.group(2)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(2)), 0)
        except ProcessLookupError:
            (directory / name).unlink(missing_ok=True)
        except PermissionError:  # another user's live process
            pass
