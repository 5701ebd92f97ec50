"""Reading request tensors from a front end's shared-memory slabs (``router_api.shm``).

The front end reuses a bounded set of slabs, so each is mapped once and kept. A front end
that restarts makes new ones and removes its old ones: whenever a new slab is mapped,
mappings of files that are gone are closed, so their memory is freed.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict

import numpy as np

from core.protocol import ShmRef

KEEP = 256  # mappings kept open at most


class ShmUnreadable(RuntimeError):
    """The front end's slab cannot be read here: the worker's fault, not the request's."""


_maps: OrderedDict[str, mmap.mmap] = OrderedDict()
_lock = threading.Lock()  # two task threads may map at once


def _close(buf: mmap.mmap) -> None:
    try:
        buf.close()
    except BufferError:  # a batch still reads it: it is unmapped when that view dies
        pass


def _map(path: str) -> mmap.mmap:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ShmUnreadable(f"cannot open the front end's shared memory {path}: {e}") from None
    try:
        return mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


def read_client(ref: ShmRef) -> np.ndarray:
    """Bytes in a client's region: read, not mapped (see ShmRef). A region gone or cut
    short is the request's fault (ValueError: a 400 for it alone)."""
    out = np.empty(ref.nbytes, np.uint8)
    try:
        fd = os.open(ref.path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise ValueError(f"the client's shared-memory region {ref.path} cannot be read: {e.strerror}") from None
    try:
        got = os.preadv(fd, [out], ref.offset)
    finally:
        os.close(fd)
    if got != ref.nbytes:
        raise ValueError(f"the client's shared-memory region {ref.path} holds {got} of the {ref.nbytes} bytes asked at {ref.offset}")
    return out


def read(ref: ShmRef) -> np.ndarray:
    """The referenced bytes, as a read-only view: stacking copies them into the batch."""
    if ref.client:
        return read_client(ref)
    with _lock:
        buf = _maps.get(ref.path)
        if buf is None:
            for gone in [p for p in _maps if not os.path.exists(p)]:
                _close(_maps.pop(gone))
            buf = _maps[ref.path] = _map(ref.path)
            while len(_maps) > KEEP:
                _close(_maps.popitem(last=False)[1])
        else:
            _maps.move_to_end(ref.path)
        if ref.offset + ref.nbytes > len(buf):
            raise ShmUnreadable(f"shared memory reference past the end of {ref.path}")
        return np.frombuffer(buf, np.uint8, ref.nbytes, ref.offset)
