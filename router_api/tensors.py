"""A validated tensor request (``kserve.InferRequest``, from REST or gRPC) as the item a
worker runs, and a worker's result as the arrays the protocol answers with."""

from __future__ import annotations

import numpy as np

from core.protocol import TensorItem
from router_api import kserve
from router_api.shm import MIN_SLAB, ShmPool, Slab


def as_frame(data: bytes | memoryview) -> np.ndarray:
    """Wrap request bytes so Dask ships them as their own frame, never copied into a
    pickle: protocol 5 sends numpy buffers out of band, but not ``bytes``."""
    return np.frombuffer(data, dtype=np.uint8)


def tensor_item(req: kserve.InferRequest, kind: str, shm: dict | None = None) -> TensorItem:
    return TensorItem(
        rows=req.rows,
        inputs={i.name: as_frame(i.data) for i in req.inputs},
        shapes={i.name: tuple(i.shape) for i in req.inputs},
        outputs=tuple(o.name for o in req.outputs),
        entry=kind,
        shm=shm,
    )


def output_arrays(req: kserve.InferRequest, outputs: dict) -> list[tuple[kserve.RequestedOutput, np.ndarray]]:
    """Views of the bytes the worker packed: no copy until the response is written."""
    return [(o, np.frombuffer(outputs[o.name].data, outputs[o.name].dtype).reshape(outputs[o.name].shape)) for o in req.outputs]


def into_slab(pool: ShmPool | None, inputs: list[kserve.InferInput]) -> tuple[Slab | None, dict | None]:
    """Inputs that arrived elsewhere (a gRPC message, a client's region) copied once into
    a slab that workers on this host map: their bytes then skip the socket to the
    worker, as an HTTP body read straight into shared memory does. The caller gives the
    slab back once the request is answered or abandoned."""
    total = sum(len(i.data) for i in inputs)
    if pool is None or total < MIN_SLAB or (slab := pool.take(total)) is None:
        return None, None
    refs, at, view = {}, 0, memoryview(slab.buf)
    for i in inputs:
        n = len(i.data)
        view[at : at + n] = i.data
        refs[i.name] = slab.ref(view[at : at + n])
        at += n
    return slab, refs
