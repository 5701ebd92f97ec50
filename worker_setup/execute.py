"""The Dask task that runs one batch: decode, stack, run once, cut per request, reply.

A batch mixes requests from many clients, so everything is per item: an undecodable
image fails its own item and never the others, and each item gets exactly its rows back.
The reply goes on the worker's own stream to the scheduler (``log_event``), so it never
needs a connection *to* the worker: that is what makes workers behind NAT work.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgpack
import numpy as np

from router_api.codec import unpack_input
from worker_setup.preprocess import ImageError, image_to_row
from worker_setup.runtime import WorkerModel, current_model

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


def _item_inputs(model: WorkerModel, item: dict) -> dict[str, np.ndarray]:
    """One request's input rows, keyed by input name."""
    inputs = model.session.inputs
    if item["kind"] == "image":
        if model.layout is None:
            raise ImageError("this model does not take images")
        return {inputs[0].name: image_to_row(item["data"], model.layout)[None]}
    out = {}
    for t in inputs:
        shape = tuple(item["shapes"][t.name])
        out[t.name] = np.frombuffer(unpack_input(item, t.name), dtype=t.dtype).reshape(shape)
    return out


def execute_items(model: WorkerModel, items: list[dict]) -> tuple[list[dict], dict]:
    """Run one batch; returns a result per item and timings in ns.

    Items whose rows have different shapes (models with variable dims) run as separate
    groups, so one odd request never breaks the stacking of the others. An error result
    carries ``status``: 400 when the request caused it, 500 when the worker did.
    """
    t0 = time.perf_counter_ns()
    results: list[dict[str, Any] | None] = [None] * len(items)
    groups: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = {}
    for i, item in enumerate(items):
        try:
            feeds = _item_inputs(model, item)
        except ImageError as e:
            results[i] = {"error": str(e), "status": 400}
            continue
        except Exception as e:  # a malformed item fails alone, whatever went wrong
            results[i] = {"error": f"bad input: {e}", "status": 400}
            continue
        key = tuple((name, arr.shape[1:]) for name, arr in feeds.items())
        groups.setdefault(key, []).append((i, feeds))
    t1 = time.perf_counter_ns()
    infer_ns = 0
    for members in groups.values():
        names = [t.name for t in model.session.outputs]
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
                results[i] = {"error": f"inference failed: {e}", "status": 500}
            continue
        infer_ns += time.perf_counter_ns() - t
        start = 0
        for i, f in members:
            n = len(next(iter(f.values())))
            results[i] = _cut(items[i], outputs, start, n)
            start += n
    t3 = time.perf_counter_ns()
    rows = sum(len(next(iter(f.values()))) for members in groups.values() for _, f in members)
    timings = {"input_ns": t1 - t0, "infer_ns": infer_ns, "output_ns": t3 - t1 - infer_ns, "rows": rows}
    return results, timings  # type: ignore[return-value]


def _cut(item: dict, outputs: dict[str, np.ndarray], start: int, n: int) -> dict:
    """This item's rows of every output: top-k for images, raw tensors otherwise."""
    if item["kind"] == "image":
        first = next(iter(outputs.values()))
        idx, prob = top_k(first[start], item.get("top_k", 5))
        return {"index": idx.tobytes(), "prob": prob.tobytes()}
    out = {}
    for name in item.get("outputs") or outputs:
        rows = np.ascontiguousarray(outputs[name][start : start + n])
        out[name] = {"dtype": rows.dtype.str, "shape": list(rows.shape), "data": rows.tobytes()}
    return {"outputs": out}


def pack_reply(batch_id: str, worker: str, results: list[dict], timings: dict) -> bytes:
    return msgpack.packb({"id": batch_id, "worker": worker, "results": results, "timings": timings}, use_bin_type=True)


def planned_rows(items: list[dict]) -> int:
    """Rows a batch will occupy, as sent (an image is one row); counted before decoding
    so rows in flight (and the simulated GPU's memory) rise when the batch starts."""
    n = 0
    for item in items:
        rows = item.get("rows", 1)
        n += rows if isinstance(rows, int) and rows > 0 else 1
    return n


def stretch(model: WorkerModel, t0: float) -> None:
    """The ``slowdown`` benchmark knob: a batch whose real work took t seconds sleeps
    (slowdown - 1) * t more, so this worker behaves like a device that many times slower.
    Sleeping, not spinning: it must not steal CPU from the other workers on the host."""
    if model.slowdown > 1:
        time.sleep((model.slowdown - 1) * (time.perf_counter() - t0))
    if model.batch_time > 0:  # a device of fixed speed: the tunnel benchmark's setting
        time.sleep(max(0.0, model.batch_time - (time.perf_counter() - t0)))


def run_batch(spec: dict) -> int:
    """The task: one per batch. Replies on ``spec["topic"]``; returns only a row count."""
    from distributed import get_worker

    worker = get_worker()
    items = spec["items"]
    t0 = time.perf_counter()
    started = time.time()
    try:
        model = current_model()
    except Exception as e:
        results, timings, model = [{"error": str(e), "status": 500}] * len(items), {}, None
    else:
        planned = planned_rows(items)
        model.stats.started(planned)
        try:
            results, timings = execute_items(model, items)
        except Exception as e:  # an ORT failure fails this batch's items, visibly
            logger.exception("batch %s failed", spec["id"])
            results = [{"error": f"inference failed on {worker.address}: {e}", "status": 500}] * len(items)
            timings = {}
        stretch(model, t0)
        errors = sum(1 for r in results if "error" in r)
        model.stats.finished(timings.get("rows", 0), time.perf_counter() - t0, errors, planned)
    # The true time this batch held the worker, slowdown included: the front end learns
    # each worker's service time from it without waiting for a heartbeat.
    timings["service_s"] = time.perf_counter() - t0
    # Wall-clock stamps let the front end split latency into transfer and compute.
    timings["started"], timings["finished"] = started, time.time()
    worker.log_event(spec["topic"], {"id": spec["id"], "worker": worker.address, "blob": pack_reply(spec["id"], worker.address, results, timings)})
    return timings.get("rows", 0)
