"""Triton's system shared-memory extension: regions a client on this host registers, so
its tensors cross by region and offset instead of through the socket.

A region is a POSIX shared-memory object (``shm_open``'s key, /dev/shm/<key>) that the
client made, as ``tritonclient.utils.shared_memory`` does. Every use checks it again:
the object must still be this user's and large enough for the bytes asked (a client
may truncate it meanwhile: reading past its end would be a SIGBUS, not an error), and
the offset and size must fall inside the registered range. A bad reference is a
``ProtocolError`` (400 / INVALID_ARGUMENT), never a read outside the region.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.protocol import ShmRef
from router_api.kserve import DTYPES, InferRequest, ProtocolError, ShmTensor, datatype_of

SHM_DIR = Path("/dev/shm")
KEY = re.compile(r"^/?[A-Za-z0-9_.\-]{1,250}$")  # one name, no directories


@dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    map: mmap.mmap | None = None  # the object's first offset + byte_size bytes

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


class Registry:
    """The regions registered with this front end, by name."""

    def __init__(self) -> None:
        self.regions: dict[str, Region] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name:
            raise ProtocolError("a region needs a name")
        if name in self.regions:
            raise ProtocolError(f"shared memory region '{name}' is already registered")
        if not isinstance(key, str) or not KEY.match(key):
            raise ProtocolError(f"shared memory key {key!r} is not a POSIX shared-memory name")
        if type(offset) is not int or type(byte_size) is not int or offset < 0 or byte_size <= 0:
            raise ProtocolError("offset must be a non-negative integer and byte_size a positive one")
        try:
            fd = os.open(SHM_DIR / key.lstrip("/"), os.O_RDWR | os.O_NOFOLLOW)
        except OSError as e:
            raise ProtocolError(f"cannot open shared memory key {key!r}: {e.strerror}") from None
        region = Region(name, key, offset, byte_size, fd)
        try:
            self._check(region, 0, byte_size)
            region.map = mmap.mmap(fd, offset + byte_size)
        except (ProtocolError, OSError) as e:
            os.close(fd)
            raise e if isinstance(e, ProtocolError) else ProtocolError(f"cannot map shared memory key {key!r}: {e}") from None
        self.regions[name] = region

    def unregister(self, name: str | None = None) -> None:
        """One region, or all of them (no name)."""
        for n in [name] if name else list(self.regions):
            region = self.regions.pop(n, None)
            if region is not None:
                self._close(region)

    def status(self, name: str | None = None) -> list[dict]:
        if name and name not in self.regions:
            raise ProtocolError(f"no shared memory region '{name}'", status=404)
        return [r.status() for n, r in self.regions.items() if not name or n == name]

    def read(self, name: str, offset: int, size: int) -> bytes:
        """A copy of ``size`` bytes at ``offset`` in the region (the client may change the
        region once answered; the worker gets its own bytes)."""
        region, view = self._view(name, offset, size)
        try:
            return bytes(view)
        finally:
            view.release()

    def write(self, name: str, offset: int, data: bytes | memoryview) -> None:
        region, view = self._view(name, offset, len(data))
        try:
            view[:] = data
        finally:
            view.release()

    def resolve(self, req: InferRequest, refer: bool = False) -> dict[str, ShmRef] | None:
        """Replace every input given by region with its bytes (``kserve`` checked sizes).

        ``refer`` (a worker on this host will run it): when every input lies in a region,
        return where, for the worker to read itself, and leave each input a view of its
        region (no copy: sent as bytes only if the batch goes elsewhere after all)."""
        given = [i for i in req.inputs if isinstance(i.data, ShmTensor)]
        if refer and given and len(given) == len(req.inputs):
            refs = {}
            for i in given:
                t = i.data
                region, i.data = self._view(t.region, t.offset, t.byte_size)
                refs[i.name] = ShmRef(str(SHM_DIR / region.key.lstrip("/")), region.offset + t.offset, t.byte_size, client=True)
            return refs
        for i in given:
            i.data = self.read(i.data.region, i.data.offset, i.data.byte_size)
        return None

    def write_outputs(self, arrays: list) -> None:
        """Outputs asked for in a region go there (the response then names it only)."""
        for requested, arr in arrays:
            if (to := requested.shm) is None:
                continue
            raw = np.ascontiguousarray(arr, dtype=DTYPES[datatype_of(arr.dtype)])
            if raw.nbytes > to.byte_size:
                raise ProtocolError(f"output '{requested.name}' is {raw.nbytes} bytes, over the {to.byte_size} "
                                    f"given in region '{to.region}'")  # fmt: skip
            self.write(to.region, to.offset, memoryview(raw).cast("B"))

    def close(self) -> None:
        self.unregister()

    # -- checks -------------------------------------------------------------------------

    def _view(self, name: str, offset: int, size: int) -> tuple[Region, memoryview]:
        region = self.regions.get(name)
        if region is None:
            raise ProtocolError(f"no shared memory region '{name}'")
        if type(offset) is not int or type(size) is not int or offset < 0 or size < 0 or offset + size > region.byte_size:
            raise ProtocolError(f"offset {offset} and size {size} fall outside region '{name}' ({region.byte_size} bytes)")
        self._check(region, offset, size)  # still this user's, and not truncated under us
        start = region.offset + offset
        return region, memoryview(region.map)[start : start + size]

    @staticmethod
    def _check(region: Region, offset: int, size: int) -> None:
        st = os.fstat(region.fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise ProtocolError(f"shared memory key {region.key!r} is not a region of this user's")
        if st.st_size < region.offset + offset + size:
            raise ProtocolError(f"shared memory key {region.key!r} holds {st.st_size} bytes, fewer than region "
                                f"'{region.name}' needs ({region.offset + offset + size})")  # fmt: skip

    @staticmethod
    def _close(region: Region) -> None:
        try:
            region.map.close()
        except BufferError:  # a view still exported (a request that referred to it, in a cycle): collect, then close
            import gc

            gc.collect()
            try:
                region.map.close()
            except BufferError:  # still in use: unmapped when its last view goes
                pass
        os.close(region.fd)
