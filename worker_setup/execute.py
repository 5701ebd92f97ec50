"""Running one batch: decode, stack, pad to its bucket, run, cut per request, reply; as
a Dask task (``run_batch``), or straight from a front end on the same host
(``worker_setup.direct_lane``).

A batch mixes requests from many clients, so everything is per item: an undecodable
image fails its own item and never the others, and each item gets exactly its rows back.
The reply goes on the worker's own stream to the scheduler (``log_event``), so it never
needs a connection *to* the worker: that is what makes workers behind NAT work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from core.buckets import Chunk, chunks
from core.codec import unpack_input
from core.protocol import BatchReply, BatchSpec, ImageItem, Item, ItemError, Output, Result, Tensors, Timings, TopK
from core.entries import PIXELS, UINT8
from worker_setup import shm_reader
from worker_setup.shm_reader import ShmUnreadable
from worker_setup.preprocess import ImageError, decode_threads, image_pixels, image_to_row
from worker_setup.shelf import SHELF
from worker_setup.worker_model import MissingEntry, WorkerModel, current_model

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


def _item_inputs(model: WorkerModel, item: Item) -> tuple[str, dict[str, np.ndarray]]:
    """Which entry one request runs on, and its input rows keyed by input name. An
    image becomes uint8 pixels for the uint8 entry where the worker has one (its
    normalisation then runs in the graph), else a normalised row of the model's own."""
    if isinstance(item, ImageItem):
        if model.layout is None:
            raise ImageError("this model does not take images")
        if model.pixels is not None:
            return UINT8, {PIXELS: image_pixels(item.data, model.layout.size)[None]}
        return "", {model.session.inputs[0].name: image_to_row(item.data, model.layout)[None]}
    inputs = model.session_for(item.entry).inputs
    if item.shm:  # from a front end on this host: its shared memory, not the message
        return item.entry, {t.name: shm_reader.read(item.shm[t.name]).view(t.dtype).reshape(item.shapes[t.name]) for t in inputs}
    return item.entry, {t.name: np.frombuffer(unpack_input(item, t.name), dtype=t.dtype).reshape(item.shapes[t.name]) for t in inputs}


def _decode(model: WorkerModel, item: Item) -> tuple[str, dict[str, np.ndarray]] | ItemError:
    try:
        return _item_inputs(model, item)
    except ImageError as e:
        return ItemError(str(e), e.status)
    except (ShmUnreadable, MissingEntry) as e:  # this worker's fault, whatever the request
        return ItemError(str(e), 500)
    except Exception as e:  # a malformed item fails alone, whatever went wrong
        return ItemError(f"bad input: {e}", 400)


_decoders: ThreadPoolExecutor | None = None
_decoders_made = threading.Lock()  # two task threads may ask for the pool at once


def decode_all(model: WorkerModel, items: list[Item]) -> list[tuple[str, dict[str, np.ndarray]] | ItemError]:
    """Every item's rows. JPEG decoding and resizing release the GIL, so a batch of
    images decodes on as many threads as the worker has cores: at GPU rates one thread
    could not keep up."""
    global _decoders
    images = [i for i, item in enumerate(items) if isinstance(item, ImageItem)]
    if images and model.gpu_decoder is not None and model.pixels is not None:
        return _decode_on_gpu(model, items, images)
    if len(images) < 2 or decode_threads() < 2:
        return [_decode(model, item) for item in items]
    with _decoders_made:
        if _decoders is None:
            _decoders = ThreadPoolExecutor(decode_threads(), thread_name_prefix="batch-router-decode")
    return list(_decoders.map(lambda item: _decode(model, item), items))


def _decode_on_gpu(model: WorkerModel, items: list[Item], images: list[int]) -> list[tuple[str, dict[str, np.ndarray]] | ItemError]:
    """The batch's JPEGs in one GPU call; what it cannot decode goes to Pillow, which
    fails a broken image with its own clear error, as on a CPU worker."""
    try:
        pixels = model.gpu_decoder.decode([items[i].data for i in images])
    except Exception:  # the GPU path failed as a whole: this batch decodes on the CPU, loudly
        logger.exception("GPU decoding failed; decoding this batch with Pillow")
        pixels = [None] * len(images)
    decoded = dict(zip(images, pixels))
    out: list[tuple[str, dict[str, np.ndarray]] | ItemError] = []
    for i, item in enumerate(items):
        rows = decoded.get(i)
        out.append((UINT8, {PIXELS: rows[None]}) if rows is not None else _decode(model, item))
    return out


def stack(rows: list[np.ndarray], size: int) -> np.ndarray:
    """``rows`` stacked, then zeros up to ``size`` rows, written once."""
    n = sum(len(r) for r in rows)
    if n == size and len(rows) == 1:
        return rows[0]
    out = np.empty((size,) + rows[0].shape[1:], dtype=rows[0].dtype)
    np.concatenate(rows, out=out[:n])
    out[n:] = 0
    return out


def run_padded(
    model: WorkerModel, session, parts: list[dict[str, np.ndarray]], names: list[str]
) -> tuple[dict[str, np.ndarray], int, Timings]:
    """Run the stacked ``parts`` on ``session`` (one of ``model``'s) at bucket shapes only: outputs of the real rows, rows
    of padding run, and the time spent stacking (``input_ns``), holding the device
    (``infer_ns``) and waiting for it (``wait_ns``).
    Padding rows are zeros and are cut off before anyone sees them; a batch larger
    than the largest bucket runs as several."""
    first = next(iter(parts[0]))
    n = sum(len(p[first]) for p in parts)
    plan = chunks(n, model.buckets) if model.buckets else [Chunk(0, n, n)]
    whole = None if len(plan) == 1 else {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    pieces: list[list[np.ndarray]] = []
    spent = Timings()
    for c in plan:
        t = time.perf_counter_ns()
        if whole is None:
            feeds = {name: stack([p[name] for p in parts], c.bucket) for name in parts[0]}
        else:
            feeds = {name: stack([rows[c.start : c.start + c.rows]], c.bucket) for name, rows in whole.items()}
        t1 = time.perf_counter_ns()
        with model.device:
            t2 = time.perf_counter_ns()
            spent.compute_start = spent.compute_start or time.monotonic()
            outputs = session.run(feeds, names)
            t3 = time.perf_counter_ns()
            spent.compute_end = time.monotonic()
        spent.input_ns += t1 - t
        spent.wait_ns += t2 - t1
        spent.infer_ns += t3 - t2
        pieces.append([out[: c.rows] for out in outputs])
    padded = sum(c.bucket - c.rows for c in plan)
    if len(pieces) == 1:
        return dict(zip(names, pieces[0])), padded, spent
    return {name: np.concatenate([p[i] for p in pieces]) for i, name in enumerate(names)}, padded, spent


def execute_items(model: WorkerModel, items: list[Item]) -> tuple[list[Result], Timings]:
    """Run one batch; returns a result per item, and timings.

    Items for different entries (float and uint8), or whose rows have different shapes
    (models with variable dims), run as separate groups, so one odd request never
    breaks the stacking of the others.
    """
    t0 = time.perf_counter_ns()
    results: list[Result | None] = [None] * len(items)
    groups: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = {}
    for i, decoded in enumerate(decode_all(model, items)):
        if isinstance(decoded, ItemError):
            results[i] = decoded
            continue
        entry, feeds = decoded
        key = (entry, *((name, arr.shape[1:]) for name, arr in feeds.items()))
        groups.setdefault(key, []).append((i, feeds))
    t1 = time.perf_counter_ns()
    timings = Timings(input_ns=t1 - t0)
    for key, members in groups.items():
        session = model.session_for(key[0])
        names = [t.name for t in session.outputs]
        try:
            outputs, pad, spent = run_padded(model, session, [f for _, f in members], names)
        except Exception as e:  # this group fails, visibly; other groups still run
            logger.exception("inference failed")
            for i, _ in members:
                results[i] = ItemError(f"inference failed: {e}", 500)
            continue
        timings.input_ns += spent.input_ns
        timings.infer_ns += spent.infer_ns
        timings.wait_ns += spent.wait_ns
        timings.compute_start = timings.compute_start or spent.compute_start
        timings.compute_end = spent.compute_end
        t = time.perf_counter_ns()
        start = 0
        for i, f in members:
            n = len(next(iter(f.values())))
            results[i] = _cut(items[i], outputs, start, n)
            start += n
        timings.output_ns += time.perf_counter_ns() - t
        timings.rows += start
        timings.padded += pad
    # Triton's three compute phases; waiting for the device (another batch on it) is none of them.
    return results, timings  # type: ignore[return-value]


def _cut(item: Item, outputs: dict[str, np.ndarray], start: int, n: int) -> Result:
    """This item's rows of every output: top-k for images, raw tensors otherwise, as
    views of the batch's outputs; the reply packs them, once or not at all."""
    if isinstance(item, ImageItem):
        idx, prob = top_k(next(iter(outputs.values()))[start], item.top_k)
        return TopK(idx.tolist(), prob.tolist())
    out = {}
    for name in item.outputs or outputs:
        rows = outputs[name][start : start + n]
        out[name] = Output(rows.dtype.str, rows.shape, np.ascontiguousarray(rows))  # packed once, by the reply
    return Tensors(out)


def run_spec(address: str, spec: BatchSpec, find_model: Callable[[], WorkerModel] = current_model) -> BatchReply:
    """One batch, whichever way it came: a result for every item, never an exception."""
    t0, started = time.perf_counter(), time.monotonic()
    try:
        model = find_model()
    except Exception as e:
        results, timings = [ItemError(str(e), 500)] * len(spec.items), Timings()
    else:
        planned = sum(item.rows for item in spec.items)  # rows in flight rise as the batch starts
        model.stats.started(planned)
        try:
            results, timings = execute_items(model, spec.items)
        except Exception as e:  # an ORT failure fails this batch's items, visibly
            logger.exception("batch %s failed", spec.id)
            results, timings = [ItemError(f"inference failed on {address}: {e}", 500)] * len(spec.items), Timings()
        errors = sum(1 for r in results if isinstance(r, ItemError))
        # The time this batch held the worker: the front end learns each worker's
        # service time from it without waiting for a heartbeat.
        timings.service_s = model.stats.finished(timings.rows, time.perf_counter() - t0, errors, planned, timings.padded)
    if spec.trace:  # core.trace's worker stamps; a batch that never ran has none
        timings.stamps = [started, timings.compute_start or started, timings.compute_end or started, time.monotonic()]
    return BatchReply(spec.id, address, results, timings)


def run_batch(spec: BatchSpec) -> int:
    """The task: one per batch. Replies on ``spec.topic``; returns only a row count."""
    from distributed import get_worker

    worker = get_worker()
    shelf = worker.extensions.get(SHELF)
    if shelf is None:
        reply = run_spec(worker.address, spec)  # not a router worker: NoModelError, as a reply
    else:
        shelf.accept()
        reply = run_spec(worker.address, spec, lambda: shelf.get(spec.model))
        reply.load = shelf.reply_leaves()
    worker.log_event(spec.topic, reply.to_wire())
    return reply.timings.rows
