"""Batch inference for Dask users: functions to run as Dask tasks on the router's workers.

    from distributed import Client
    from worker_setup import classify, infer

    client = Client("tcp://127.0.0.1:8786")            # the batch-router scheduler
    top5 = client.submit(classify, ["cat.jpg"]).result()
    logits = client.submit(infer, batch).result()     # batch: N x 3 x 224 x 224 float32

Each call is one task and one ONNX Runtime run on the worker's already-loaded session,
so it composes with ``client.map``, ``dask.bag`` and ``map_partitions``. The scheduler
plugin keeps these tasks on workers that hold the model.

Images are bytes or paths. A path is read by the worker, relative to the directory the
client was in when it sent the task (the function carries that directory with it), so a
relative path means the same file on a worker of the same machine; a remote worker
(Colab, say) has its own files: send it bytes.

Nothing heavy is imported here: the scheduler unpickles these functions when a task
arrives, and must not load onnxruntime or Pillow for it.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Image = bytes | str | os.PathLike

_CLIENT_CWD: contextvars.ContextVar[str | None] = contextvars.ContextVar("client_cwd", default=None)


class ApiFunction:
    """A Python-API function as Dask ships it: pickled with the client's working
    directory, taken when the client pickles it, and named for Dask by its public name
    (the scheduler plugin places tasks by that prefix)."""

    def __init__(self, impl: Callable, name: str, cwd: str | None = None) -> None:
        self.impl, self.__name__, self.cwd = impl, name, cwd
        self.__doc__ = impl.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        token = _CLIENT_CWD.set(self.cwd)
        try:
            return self.impl(*args, **kwargs)
        finally:
            _CLIENT_CWD.reset(token)

    def __reduce__(self) -> tuple:
        return (ApiFunction, (self.impl, self.__name__, self.cwd or os.getcwd()))

    def __dask_tokenize__(self) -> tuple:
        return (self.__name__, self.cwd or os.getcwd())  # same files, same key

    def __repr__(self) -> str:
        return f"<batch-router {self.__name__}>"


def _read(image: Image) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    path = Path(image)
    if not path.is_absolute() and _CLIENT_CWD.get():
        path = Path(_CLIENT_CWD.get()) / path
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file on this worker (paths are read by the worker; "
                                "send bytes to a worker on another machine)") from None  # fmt: skip


def _run(session, batch: np.ndarray) -> np.ndarray:
    """One run of ``session`` (first input, first output), counted like a front-end
    batch (service time, busy time), so placement sees the load that Dask users put on
    a worker too."""
    import time

    from worker_setup.worker_model import current_model

    model = current_model()
    t = session.inputs[0]
    batch = np.ascontiguousarray(batch, dtype=t.dtype)
    rows, t0 = len(batch), time.perf_counter()
    model.stats.started(rows)
    failed = 1
    try:
        with model.device:
            out = session.run({t.name: batch})[0]
        failed = 0
        return out
    finally:
        model.stats.finished(rows if not failed else 0, time.perf_counter() - t0, failed, rows)


def _infer(batch: np.ndarray) -> np.ndarray:
    """Run the model on a ready batch (first input only); returns the first output."""
    from worker_setup.worker_model import current_model

    return _run(current_model().session, batch)


def _classify(images: Iterable[Image], top: int = 5, labels: str | None = None) -> list[list[dict]]:
    """Top-``top`` predictions for each image (bytes or a path), in input order.

    Accepts any iterable, so a ``dask.bag`` partition of paths works as it is:
    ``bag.map_partitions(classify)`` gives one prediction list per image. Images go to
    the uint8 entry where the worker has one, as ``/v1/classify``'s do.
    """
    from core.labels import load_labels
    from worker_setup.execute import top_k
    from worker_setup.preprocess import image_pixels, image_to_row
    from worker_setup.worker_model import current_model

    model = current_model()
    if model.layout is None:
        raise ValueError("this model does not take images")
    data = [_read(i) for i in images]
    if not data:
        return []
    if model.pixels is not None:
        logits = _run(model.pixels, np.stack([image_pixels(d, model.layout.size) for d in data]))
    else:
        logits = _run(model.session, np.stack([image_to_row(d, model.layout) for d in data]))
    names = load_labels(labels, logits.shape[-1])
    out = []
    for row in logits:
        idx, prob = top_k(row, top)
        out.append([{"label": names[i], "index": int(i), "probability": float(p)} for i, p in zip(idx, prob)])
    return out


def _classify_files(paths: Sequence[str | os.PathLike], top: int = 5) -> list[dict]:
    """Like :func:`classify` but keeps each path next to its predictions."""
    paths = list(paths)
    return [{"path": str(p), "predictions": preds} for p, preds in zip(paths, _classify(paths, top))]


infer = ApiFunction(_infer, "infer")
classify = ApiFunction(_classify, "classify")
classify_files = ApiFunction(_classify_files, "classify_files")
