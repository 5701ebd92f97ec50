"""Batch inference for Dask users: ordinary functions to run as Dask tasks.

    from distributed import Client
    from worker_setup import classify, infer

    client = Client("tcp://127.0.0.1:8786")          # the batch-router scheduler
    top5 = client.submit(classify, [open("cat.jpg", "rb").read()]).result()
    logits = client.submit(infer, batch).result()   # batch: N x 3 x 224 x 224 float32

Each call is one task and one ONNX Runtime run on the worker's already-loaded session,
so it composes with ``client.map``, ``dask.bag`` and ``map_partitions``. The scheduler
plugin keeps these tasks on workers that hold the model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence

import numpy as np

from worker_setup.execute import stretch, top_k
from worker_setup.labels import load_labels
from worker_setup.preprocess import image_to_row
from worker_setup.runtime import current_model

Image = bytes | str | os.PathLike


def _read(image: Image) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    with open(image, "rb") as f:
        return f.read()


def infer(batch: np.ndarray) -> np.ndarray:
    """Run the model on a ready batch (first input only); returns the first output.

    Counted like a front-end batch (service time, busy time, the slowdown knob), so
    placement sees the load that Dask users put on a worker too.
    """
    model = current_model()
    session = model.session
    t = session.inputs[0]
    batch = np.ascontiguousarray(batch, dtype=t.dtype)
    rows, t0 = len(batch), time.perf_counter()
    model.stats.started(rows)
    failed = 1
    try:
        out = session.run({t.name: batch})[0]
        failed = 0
        return out
    finally:
        stretch(model, t0)
        model.stats.finished(rows if not failed else 0, time.perf_counter() - t0, failed, rows)


def classify(images: Iterable[Image], top: int = 5, labels: str | None = None) -> list[list[dict]]:
    """Top-``top`` predictions for each image (bytes or a path), in input order.

    Accepts any iterable, so a ``dask.bag`` partition of paths works as it is:
    ``bag.map_partitions(classify)`` gives one prediction list per image.
    """
    model = current_model()
    if model.layout is None:
        raise ValueError("this model does not take images")
    data = [_read(i) for i in images]
    if not data:
        return []
    batch = np.stack([image_to_row(d, model.layout) for d in data])
    logits = infer(batch)
    names = load_labels(labels, logits.shape[-1])
    out = []
    for row in logits:
        idx, prob = top_k(row, top)
        out.append([{"label": names[i], "index": int(i), "probability": float(p)} for i, p in zip(idx, prob)])
    return out


def classify_files(paths: Sequence[str | os.PathLike], top: int = 5) -> list[dict]:
    """Like :func:`classify` but keeps each path next to its predictions."""
    return [{"path": str(p), "predictions": preds} for p, preds in zip(paths, classify(paths, top))]
