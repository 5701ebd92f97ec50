"""The wire protocol between the rooms, defined once: the names Dask knows us by, the
items a batch carries to a worker, and the reply that comes back.

A batch goes out as one Dask task, ``RUN_BATCH(BatchSpec)``: Dask pickles the spec,
and the numpy arrays in it (image bytes, tensors) travel as frames of their own, never
copied into the pickle. The reply comes back on the worker's own stream as a Dask event
(``log_event``), so it must be plain msgpack: ``BatchReply.to_wire`` packs each output
tensor once, as the bytes ONNX Runtime produced, and the front end writes those bytes
to HTTP as they arrive.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, ClassVar, Union

import numpy as np

# The key under which batch-router lives in ws.extra, ws.metrics, worker.extensions and
# scheduler.extensions.
EXTENSION = "batch-router"
WORKERS_TOPIC = "batch-router-workers"  # membership events, plugin -> front ends
MODELS_TOPIC = "batch-router-models"  # a model loaded, unloading or unloaded, plugin -> front ends
STATE_TOPIC = "batch-router-state"  # every metrics interval: each worker's heartbeat metrics
RESULTS_PREFIX = "batch-router-results-"  # + the front end's client id: batch replies
DIRECT_OP = "batch_router_run"  # a worker's handler for batches sent straight to it (same host)
# Task prefixes of the Python API (worker_setup.api): they need a worker with the model.
API_PREFIXES = frozenset({"classify", "classify_files", "infer"})


@dataclass(frozen=True)
class TaskRef:
    """A worker-side function, named rather than imported: the front end submits it
    without loading what it needs (onnxruntime, Pillow); the worker resolves it."""

    module: str
    name: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(self.module), self.name)(*args, **kwargs)


RUN_BATCH = TaskRef("worker_setup.execute", "run_batch")


@dataclass(frozen=True)
class TensorInfo:
    """One model input or output as the model file declares it."""

    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]  # -1 for symbolic dims


# -- front end -> worker ---------------------------------------------------------------


@dataclass
class ImageItem:
    """One encoded image (JPEG or PNG), decoded on the worker; the answer is its top k."""

    data: np.ndarray  # the file's bytes as uint8
    top_k: int
    rows: ClassVar[int] = 1


@dataclass(frozen=True)
class ShmRef:
    """Bytes in a shared-memory slab of a front end on the worker's host, or in a region
    a client registered with it (``client``: read with pread, never mapped, since the
    client may truncate it under the worker: a short read is an error, not a SIGBUS)."""

    path: str  # the file, under /dev/shm
    offset: int
    nbytes: int
    client: bool = False


@dataclass
class TensorItem:
    """One request's input tensors, ``rows`` rows each, as the client sent them."""

    rows: int
    inputs: dict[str, np.ndarray]  # little-endian row-major bytes as uint8 (zlib'd where codecs says)
    shapes: dict[str, tuple[int, ...]]
    outputs: tuple[str, ...]  # which outputs to return
    codecs: dict[str, str] = field(default_factory=dict)  # input name -> "zlib"
    entry: str = ""  # "uint8": the model name with in-graph preprocessing (core.entries)
    # Where each input lies in the front end's shared memory; a batch sent straight to a
    # worker on its host carries these instead of ``inputs`` (router_api.shm).
    shm: dict[str, ShmRef] | None = None


Item = Union[ImageItem, TensorItem]


@dataclass
class BatchSpec:
    id: str
    topic: str  # where the worker publishes the reply
    items: list[Item]
    trace: bool = False  # stamp the task's progress into the reply (core.trace)
    model: str = ""  # which of the worker's models runs it ("": its first)


# -- worker -> front end ---------------------------------------------------------------


@dataclass
class TopK:
    indices: list[int]
    probabilities: list[float]


@dataclass
class Output:
    dtype: str  # numpy dtype string, byte order included ("<f4")
    shape: tuple[int, ...]
    data: bytes | np.ndarray  # row-major: the rows' own array until the reply is sent


@dataclass
class Tensors:
    outputs: dict[str, Output]


@dataclass
class ItemError:
    message: str
    status: int  # 400: the request caused it; 500: the worker did


Result = Union[TopK, Tensors, ItemError]


@dataclass
class Timings:
    rows: int = 0  # rows that ran
    input_ns: int = 0  # decoding and stacking
    infer_ns: int = 0  # ONNX Runtime
    output_ns: int = 0  # cutting the outputs per item
    service_s: float | None = None  # how long the batch held the worker, all included
    padded: int = 0  # rows of padding run beside ``rows`` to fill the batch's bucket
    wait_ns: int = 0  # waiting on the worker for its device, while another batch ran
    stamps: list[float] | None = None  # traced batches: the worker's core.trace.WORKER_STAMPS
    # Not sent: when the batch first took the device and last gave it back (monotonic s).
    compute_start: float = field(default=0.0, compare=False)
    compute_end: float = field(default=0.0, compare=False)


FRAME_MIN = 64 * 1024  # bytes: smaller outputs are cheaper copied than framed (a pickle each)


@dataclass
class BatchReply:
    id: str
    worker: str
    results: list[Result]
    timings: Timings
    load: int = 0  # router batches still on the worker as this one left, from every front end

    def to_wire(self, frame: Callable[[np.ndarray], Any] | None = None) -> dict:
        """The reply as plain data. Output arrays become bytes (one copy, for an event
        on Dask's streams), or with ``frame`` (Dask's ``to_serialize``, on a direct
        connection) travel as frames of their own, not copied at all, when they are
        large enough (``FRAME_MIN``) for that to cost less than the copy."""
        t = self.timings
        return {
            "id": self.id,
            "worker": self.worker,
            "timings": [t.rows, t.input_ns, t.infer_ns, t.output_ns, t.service_s, t.padded, t.wait_ns, t.stamps],
            "results": [_result_to_wire(r, frame) for r in self.results],
            "load": self.load,
        }

    @classmethod
    def from_wire(cls, msg: dict) -> BatchReply:
        """Raises ValueError for anything not shaped like ``to_wire``'s output."""
        try:
            timings = Timings(*msg["timings"][:8])
            results = [_result_from_wire(r) for r in msg["results"]]
            return cls(str(msg["id"]), str(msg["worker"]), results, timings, int(msg.get("load", 0)))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"malformed batch reply: {type(e).__name__}: {e}") from None


def _result_to_wire(r: Result, frame: Callable[[np.ndarray], Any] | None = None) -> list:
    if isinstance(r, TopK):
        return ["topk", r.indices, r.probabilities]
    if isinstance(r, Tensors):
        def data(d: bytes | np.ndarray) -> Any:
            if isinstance(d, bytes):
                return d
            return frame(d) if frame is not None and d.nbytes >= FRAME_MIN else d.tobytes()

        return ["tensors", {name: [o.dtype, list(o.shape), data(o.data)] for name, o in r.outputs.items()}]
    return ["error", r.message, r.status]


def _result_from_wire(w: list) -> Result:
    kind = w[0]
    if kind == "topk":
        return TopK(list(w[1]), list(w[2]))
    if kind == "tensors":
        return Tensors({name: Output(o[0], tuple(o[1]), o[2]) for name, o in w[1].items()})
    if kind == "error":
        return ItemError(str(w[1]), int(w[2]))
    raise ValueError(f"unknown result kind {kind!r}")
