"""A validated tensor request (``kserve.InferRequest``, from REST or gRPC) as the item a
worker runs, and a worker's result as the arrays the protocol answers with."""

from __future__ import annotations

import numpy as np

from core.protocol import TensorItem
from router_api import kserve


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
