"""Reading request tensors from a front end's shared-memory slabs (``router_api.shm``).

The front end reuses a bounded set of slabs, so each is mapped once and kept; a front
end that restarts makes new ones, so the oldest mappings are closed past a bound.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict

import numpy as np

from core.protocol import ShmRef

KEEP = 256  # mappings kept open

_maps: OrderedDict[str, mmap.mmap] = OrderedDict()
_lock = threading.Lock()  # two task threads may map at once


def read(ref: ShmRef) -> np.ndarray:
    """The referenced bytes, as a read-only view: stacking copies them into the batch."""
    with _lock:
        buf = _maps.get(ref.path)
        if buf is None:
            fd = os.open(ref.path, os.O_RDONLY)
            try:
                buf = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            _maps[ref.path] = buf
            while len(_maps) > KEEP:
                _, old = _maps.popitem(last=False)
                try:
                    old.close()
                except BufferError:  # a batch still reads it: it is unmapped when that view dies
                    pass
        else:
            _maps.move_to_end(ref.path)
    if ref.offset + ref.nbytes > len(buf):
        raise ValueError(f"shared memory reference past the end of {ref.path}")
    return np.frombuffer(buf, np.uint8, ref.nbytes, ref.offset)
