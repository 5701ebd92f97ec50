"""The Dask task that runs one batch: decode, stack, run once, cut per request, reply.

A batch mixes requests from many clients, so everything is per item: an undecodable
image fails its own item and never the others, and each item gets exactly its rows back.
The reply goes on the worker's own stream to the scheduler (``log_event``), so it never
needs a connection *to* the worker: that is what makes workers behind NAT work.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from core.codec import unpack_input
from core.protocol import BatchReply, BatchSpec, ImageItem, Item, ItemError, Output, Result, Tensors, Timings, TopK
from worker_setup.preprocess import ImageError, image_to_row
from worker_setup.worker_model import WorkerModel, current_model

logger = logging.getLogger("worker_setup.execute")


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and softmax probabilities of the k largest logits of one row."""
    z = logits.astype(np.float64, copy=False).ravel()
    p = np.exp(z - z.max())
    p /= p.sum()
    k = min(k, p.size)
    idx = np.argpartition(-p, k - 1)[:k]
    idx = idx[np.argsort(-p[idx], kind="stable")]
    return idx.astype(np.int64), p[idx].astype(np.float32)


def _item_inputs(model: WorkerModel, item: Item) -> dict[str, np.ndarray]:
    """One request's input rows, keyed by input name."""
    inputs = model.session.inputs
    if isinstance(item, ImageItem):
        if model.layout is None:
            raise ImageError("this model does not take images")
        return {inputs[0].name: image_to_row(item.data, model.layout)[None]}
    return {t.name: np.frombuffer(unpack_input(item, t.name), dtype=t.dtype).reshape(item.shapes[t.name]) for t in inputs}


def execute_items(model: WorkerModel, items: list[Item]) -> tuple[list[Result], Timings]:
    """Run one batch; returns a result per item, and timings.

    Items whose rows have different shapes (models with variable dims) run as separate
    groups, so one odd request never breaks the stacking of the others.
    """
    t0 = time.perf_counter_ns()
    results: list[Result | None] = [None] * len(items)
    groups: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = {}
    for i, item in enumerate(items):
        try:
            feeds = _item_inputs(model, item)
        except ImageError as e:
            results[i] = ItemError(str(e), 400)
            continue
        except Exception as e:  # a malformed item fails alone, whatever went wrong
            results[i] = ItemError(f"bad input: {e}", 400)
            continue
        key = tuple((name, arr.shape[1:]) for name, arr in feeds.items())
        groups.setdefault(key, []).append((i, feeds))
    t1 = time.perf_counter_ns()
    infer_ns, rows = 0, 0
    names = [t.name for t in model.session.outputs]
    for members in groups.values():
        feeds = {
            name: np.concatenate([f[name] for _, f in members]) if len(members) > 1 else members[0][1][name]
            for name in members[0][1]
        }
        t = time.perf_counter_ns()
        try:
            outputs = dict(zip(names, model.session.run(feeds, names)))
        except Exception as e:  # this group fails, visibly; other groups still run
            logger.exception("inference failed")
            for i, _ in members:
                results[i] = ItemError(f"inference failed: {e}", 500)
            continue
        infer_ns += time.perf_counter_ns() - t
        start = 0
        for i, f in members:
            n = len(next(iter(f.values())))
            results[i] = _cut(items[i], outputs, start, n)
            start += n
        rows += start
    t3 = time.perf_counter_ns()
    return results, Timings(rows=rows, input_ns=t1 - t0, infer_ns=infer_ns, output_ns=t3 - t1 - infer_ns)  # type: ignore[return-value]


def _cut(item: Item, outputs: dict[str, np.ndarray], start: int, n: int) -> Result:
    """This item's rows of every output: top-k for images, raw tensors otherwise, as
    their bytes: the one time an output is packed on its way to the client."""
    if isinstance(item, ImageItem):
        idx, prob = top_k(next(iter(outputs.values()))[start], item.top_k)
        return TopK(idx.tolist(), prob.tolist())
    out = {}
    for name in item.outputs or outputs:
        rows = outputs[name][start : start + n]
        out[name] = Output(rows.dtype.str, rows.shape, rows.tobytes())
    return Tensors(out)


def run_batch(spec: BatchSpec) -> int:
    """The task: one per batch. Replies on ``spec.topic``; returns only a row count."""
    from distributed import get_worker

    worker = get_worker()
    t0 = time.perf_counter()
    try:
        model = current_model()
    except Exception as e:
        results, timings = [ItemError(str(e), 500)] * len(spec.items), Timings()
    else:
        planned = sum(item.rows for item in spec.items)  # rows in flight rise as the batch starts
        model.stats.started(planned)
        try:
            results, timings = execute_items(model, spec.items)
        except Exception as e:  # an ORT failure fails this batch's items, visibly
            logger.exception("batch %s failed", spec.id)
            results, timings = [ItemError(f"inference failed on {worker.address}: {e}", 500)] * len(spec.items), Timings()
        errors = sum(1 for r in results if isinstance(r, ItemError))
        model.stats.finished(timings.rows, time.perf_counter() - t0, errors, planned)
    # The time this batch held the worker: the front end learns each worker's service
    # time from it without waiting for a heartbeat.
    timings.service_s = time.perf_counter() - t0
    worker.log_event(spec.topic, BatchReply(spec.id, worker.address, results, timings).to_wire())
    return timings.rows
