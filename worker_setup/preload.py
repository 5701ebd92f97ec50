"""Worker preload: ``dask worker SCHEDULER --preload worker_setup.preload``.

Runs before the worker registers, so a worker the scheduler sees already has the
cluster's model loaded and warm, and its startup information says which device and
providers really run it.
"""

from __future__ import annotations

import asyncio
import logging

import dask.config
from distributed.utils_comm import retry

from core.buckets import default_buckets, model_buckets
from core.config import Settings, cache_dir, parse
from core.service_curve import ServiceCurve
from core.heap import freeze_startup_heap
from core.protocol import EXTENSION
from core.repository import room_for
from worker_setup import digests, direct_lane, preprocess
from worker_setup.gpu import open_source
from worker_setup.metrics import ErrorLog, GpuSampler, worker_metric
from worker_setup.model_cache import ensure_model
from worker_setup.precision import ensure_fp16
from worker_setup.preprocess_graph import ensure_uint8
from worker_setup.preprocess import ImageLayout, decode_threads
from worker_setup.shelf import SHELF, Shelf
from worker_setup.unix_lane import EXTENSION as LANE_EXTENSION, UnixLane
from worker_setup.worker_model import WorkerModel
from worker_setup.session import ModelSession
from worker_setup.slow_device import SlowDevice

logger = logging.getLogger("worker_setup.preload")

SAMPLER_EXTENSION = "batch-router-gpu"  # has close() and no heartbeat(): no scheduler half needed


def image_layout(session: ModelSession) -> ImageLayout | None:
    """How images become rows for this model, or None if its input is not an image."""
    if len(session.inputs) != 1:
        return None
    t = session.inputs[0]
    try:
        return ImageLayout.from_shape(t.shape, t.dtype)
    except ValueError:
        return None


async def models_info(worker) -> dict:
    """The cluster's models, from the scheduler plugin. The scheduler may be unreachable
    for a while (a tunnel's outage, a restart): back off and try again for about ten
    minutes, since Dask starts a worker whose preload failed, without a model."""
    try:
        return await retry(worker.scheduler.batch_router_models, count=24, delay_min=0.5, delay_max=30.0,
                           retry_on_exceptions=(OSError,), operation="fetch the cluster's models")  # fmt: skip
    except OSError as e:
        raise RuntimeError(f"cannot reach the scheduler at {worker.scheduler.address}: {e}") from e
    except Exception as e:
        raise RuntimeError(
            f"the scheduler at {worker.scheduler.address} does not run the batch-router "
            f"plugin ({e!r}); start it with `batch-router scheduler`"
        ) from e


async def dask_setup(worker) -> None:
    settings = parse(dask.config.get("batch-router", None))  # a bad setting stops the worker here
    preprocess.MAX_PIXELS[0] = settings.http.max_image_pixels
    # Dask's worker->scheduler stream waits 2 ms to coalesce; replies should not.
    worker.batched_stream.interval = settings.batched_send_interval
    listing = await models_info(worker)
    shelf = Shelf()
    source = await asyncio.to_thread(
        open_source, settings.worker.gpu_metrics, settings.worker.gpu_index, shelf.busy_seconds, shelf.current_rows
    )
    for info in listing["models"].values():
        # The first model always (a worker serves at least one); the others where they fit.
        if shelf.models and (why := await asyncio.to_thread(no_room, source, info, settings.placement.memory_headroom)):
            logger.warning("not loading model %s on this worker: %s", info["name"], why)
            continue
        shelf.add(await build_model(worker, info, settings))
    model = shelf.get()  # the first: what the Python API runs, and the startup information's
    worker.extensions[EXTENSION] = model
    worker.extensions[SHELF] = shelf
    lane = UnixLane(worker, shelf, direct_lane.install(worker, shelf, worker.state.nthreads))
    if await lane.start():
        worker.extensions[LANE_EXTENSION] = lane  # closed with the worker: its socket goes
    await start_metrics(worker, shelf, settings, source)
    install_loading(worker, shelf, settings)
    worker.startup_information[EXTENSION] = lambda w: {**model.describe(), "models": shelf.describe(),
                                                       "direct_address": direct_lane.address(w), "lane": lane.path}  # fmt: skip
    logger.info("batch-router worker ready: %s", model.describe())
    freeze_startup_heap("worker")


async def build_model(worker, info: dict, settings: Settings) -> WorkerModel:
    """One model, fetched, built (its fp16 and uint8 twins too) and warm: a model a front
    end sees on a worker never pays its first run's cost on a request."""
    path = await ensure_model(worker.scheduler, info, cache_dir(settings))
    w = settings.worker
    precision = info.get("precision", "fp32")  # the cluster's, from its scheduler
    sha = info["sha256"]
    if precision == "fp16":
        path, sha = await asyncio.to_thread(ensure_fp16, path, sha, cache_dir(settings))
    session = await asyncio.to_thread(ModelSession.load, str(path), w.device, w.intra_op_threads or 0, w.cuda, w.io_binding)
    if precision == "fp16" and session.device != "cuda":
        raise RuntimeError(f"model {info['name']} is served in fp16, which needs CUDA, but ONNX Runtime runs this "
                           f"worker on {session.device} (providers {session.providers})")  # fmt: skip
    pixels = None
    if info.get("uint8"):  # the scheduler serves the -uint8 entry: this worker builds its graph
        upath = await asyncio.to_thread(ensure_uint8, path, sha, cache_dir(settings))
        pixels = await asyncio.to_thread(ModelSession.load, str(upath), w.device, w.intra_op_threads or 0, w.cuda, w.io_binding)
    most = info.get("max_batch_size") or settings.max_batch_size
    shapes = model_buckets(batch_dimension(session), tuple(info.get("buckets") or default_buckets(most)))
    model = WorkerModel(session=session, name=info["name"], sha256=info["sha256"], layout=image_layout(session),
                        buckets=shapes, precision=precision, pixels=pixels)  # fmt: skip
    if pixels is not None and session.device == "cuda" and w.gpu_decode == "auto":
        from worker_setup.gpu_decode import GpuDecoder

        model.gpu_decoder, model.gpu_decode_note = await asyncio.to_thread(GpuDecoder.open, model.layout.size)
        if model.gpu_decoder is None:
            logger.warning("JPEGs decode on the CPU (Pillow, %d threads): %s", decode_threads(), model.gpu_decode_note)
    if w.slowdown > 1 or w.batch_time > 0:
        model.session, model.slowdown = SlowDevice(session, w.slowdown, w.batch_time), w.slowdown
        if pixels is not None:
            model.pixels = SlowDevice(pixels, w.slowdown, w.batch_time)
        logger.warning("benchmark knob: this worker's session runs %gx slower, at least %g s a run", w.slowdown, w.batch_time)
    # Every bucket runs before the worker registers: the scheduler, and so every front
    # end's /v2/health/ready, sees only warm workers, and their curves start measured.
    table = await asyncio.to_thread(session.warm_up, shapes, w.warmup_cpu_max_rows, model.session)
    if pixels is not None:
        utable = await asyncio.to_thread(pixels.warm_up, shapes, w.warmup_cpu_max_rows, model.pixels)
        logger.info("warm-up of %s's uint8 entry: %s", model.name, warmup_line(utable))
    seed_curve(model.stats.service, table, shapes)
    logger.info("warm-up of %s on %s (%s): %s", model.name, session.device, precision, warmup_line(table))
    return model


def install_loading(worker, shelf: Shelf, settings: Settings) -> None:
    """The scheduler's calls to load and unload a model here (Triton's repository
    extension). One load at a time: two would compete for the device's memory."""
    lock = asyncio.Lock()

    async def batch_router_load(name: str) -> dict:
        async with lock:
            if name in shelf.models:
                shelf.remove(name)  # a new file under the same name: the scheduler unloaded the old one
            before = await asyncio.to_thread(memory_used, worker, True)
            info = await worker.scheduler.batch_router_model(name=name)
            model = await build_model(worker, info, settings)
            after = await asyncio.to_thread(memory_used, worker, True)
            sampler = worker.extensions.get(SAMPLER_EXTENSION)
            model.gpu = dict(sampler.source.info) if sampler is not None else None
            shelf.add(model)
            return {**model.summary(), "gpu_bytes": after - before if before is not None and after is not None else None}

    async def batch_router_unload(name: str) -> dict:
        model = shelf.remove(name)
        if model is not None and worker.extensions.get(EXTENSION) is model and shelf.models:
            worker.extensions[EXTENSION] = shelf.get()  # the Python API runs the next model
        logger.info("model %s unloaded%s", name, "" if model is not None else " (it was not here)")
        return {"name": name, "unloaded": model is not None}

    worker.handlers["batch_router_load"] = batch_router_load
    worker.handlers["batch_router_unload"] = batch_router_unload


def memory_used(worker, fresh: bool = False) -> int | None:
    """GPU memory used now, from the worker's sampler; None without one."""
    sampler = worker.extensions.get(SAMPLER_EXTENSION)
    if sampler is None:
        return None
    if fresh:
        sampler.sample_once()
    return (sampler.latest() or {}).get("memory_used")


def seed_curve(curve: ServiceCurve, table: list[dict], shapes: tuple[int, ...]) -> None:
    """The warm-up's steady times start the worker's service curve, so placement knows
    every warmed bucket's cost before the first batch. A model without a batch
    dimension has no buckets, and its one warm-up run no size to file it under."""
    curve.buckets = shapes
    for row in table:
        if "steady_ms" in row and row["bucket"] is not None:
            curve.points[row["bucket"]] = row["steady_ms"] / 1e3


def batch_dimension(session: ModelSession) -> int | None:
    """The first input's batch dimension: -1 if dynamic, N if fixed, None if it has none."""
    shape = session.inputs[0].shape if session.inputs else ()
    return shape[0] if shape else None


def warmup_line(table: list[dict]) -> str:
    """The warm-up table as one log line: ``8: 120.3 -> 2.7 ms`` per bucket."""
    parts = []
    for row in table:
        if "skipped" in row:
            parts.append(f"{row['bucket']}: not warmed on cpu")
        else:
            parts.append(f"{row['bucket']}: {row['first_ms']:.1f} -> {row['steady_ms']:.1f} ms")
    return ", ".join(parts)


def no_room(source, info: dict, headroom: float) -> str | None:
    """Why this worker's GPU, as sampled now, has no room for the model; None if it has
    (or has no GPU figures). The scheduler asks the same of a load (``room_for``)."""
    return room_for(source.sample() if source is not None else None, int(info.get("memory_need") or 0), headroom)


async def start_metrics(worker, shelf: Shelf, settings: Settings, source) -> None:
    """Take a first sample from the GPU source the config asked for before the worker
    registers (so registration already carries one), then sample on a thread. NVML
    calls, opening included, stay off the event loop."""
    errors = ErrorLog()
    sampler = None
    if source is not None:
        for model in shelf.models.values():
            model.gpu = dict(source.info)
        sampler = GpuSampler(
            source,
            settings.worker.metrics_interval,
            errors,
            on_sample=lambda s: shelf.observe_memory(s.get("memory_used")),
        )
        await asyncio.to_thread(sampler.sample_once)
        sampler.start()
        # Worker.close() calls close() on every extension: the sampler stops with the worker.
        worker.extensions[SAMPLER_EXTENSION] = sampler
        if source.info.get("source") == "simulated":
            logger.warning("GPU metrics are SIMULATED from this worker's busy time: %s", source.info["name"])
    worker.metrics[EXTENSION] = worker_metric(shelf, sampler, errors)
    digests.install(worker)  # Dask's per-span sums, one per burst of batches, for ever: pruned
