"""Worker preload: ``dask worker SCHEDULER --preload worker_setup.preload``.

Runs before the worker registers, so a worker the scheduler sees already has the
cluster's model loaded and warm, and its startup information says which device and
providers really run it.
"""

from __future__ import annotations

import asyncio
import logging

from router_api import config
from router_api.heap import freeze_startup_heap
from worker_setup.gpu import open_source
from worker_setup.metrics import ErrorLog, GpuSampler, worker_metric
from worker_setup.model_cache import ensure_model
from worker_setup.preprocess import ImageLayout
from worker_setup.runtime import EXTENSION, WorkerModel
from worker_setup.session import ModelSession

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


async def model_info(worker, patience: float = 600.0) -> dict:
    """The cluster's model, from the scheduler plugin. Through a tunnel the scheduler may
    be unreachable for a while (an outage, a restart): keep trying, since Dask logs a
    failed preload and starts the worker anyway, without a model."""
    from distributed.comm.core import CommClosedError

    loop = asyncio.get_running_loop()
    deadline, delay = loop.time() + patience, 0.5
    while True:
        try:
            return await worker.scheduler.batch_router_model()
        except (OSError, CommClosedError) as e:
            if loop.time() > deadline:
                raise RuntimeError(f"cannot reach the scheduler at {worker.scheduler.address}: {e}") from e
            logger.warning("scheduler at %s unreachable (%s); retrying in %.1f s", worker.scheduler.address, e, delay)
            await asyncio.sleep(delay)
            delay = min(10.0, delay * 2)
        except Exception as e:
            raise RuntimeError(
                f"the scheduler at {worker.scheduler.address} does not run the batch-router "
                f"plugin ({e!r}); start it with `batch-router scheduler`"
            ) from e


async def dask_setup(worker) -> None:
    # Dask's worker->scheduler stream waits 2 ms to coalesce; replies should not.
    worker.batched_stream.interval = config.seconds("batched-send-interval")
    info = await model_info(worker)
    path = await ensure_model(worker.scheduler, info, config.cache_dir())
    session = await asyncio.to_thread(
        ModelSession.load, str(path), config.get("worker.device"), int(config.get("worker.intra-op-threads") or 0)
    )
    slowdown = float(config.get("worker.slowdown") or 1)
    if slowdown < 1:
        raise ValueError(f"batch-router.worker.slowdown must be >= 1, got {slowdown}")
    model = WorkerModel(
        session=session, name=info["name"], sha256=info["sha256"], layout=image_layout(session), slowdown=slowdown,
        batch_time=config.seconds("worker.batch-time")
    )
    worker.extensions[EXTENSION] = model
    await start_metrics(worker, model)
    worker.startup_information[EXTENSION] = lambda w: model.describe()
    logger.info("batch-router worker ready: %s", model.describe())
    freeze_startup_heap("worker")


async def start_metrics(worker, model: WorkerModel) -> None:
    """Open the GPU source the config asks for, take a first sample before the worker
    registers (so registration already carries one), then sample on a thread. NVML
    calls, opening included, stay off the event loop."""
    errors = ErrorLog()
    source = await asyncio.to_thread(
        open_source,
        config.get("worker.gpu-metrics"),
        config.get("worker.gpu-index"),
        model.stats.busy_seconds,
        model.stats.current_rows,
    )
    sampler = None
    if source is not None:
        model.gpu = dict(source.info)
        sampler = GpuSampler(
            source,
            config.seconds("worker.metrics-interval"),
            errors,
            on_sample=lambda s: model.stats.observe_memory(s.get("memory_used")),
        )
        await asyncio.to_thread(sampler.sample_once)
        sampler.start()
        # Worker.close() calls close() on every extension: the sampler stops with the worker.
        worker.extensions[SAMPLER_EXTENSION] = sampler
        if model.simulated:
            logger.warning("GPU metrics are SIMULATED from this worker's busy time: %s", source.info["name"])
    worker.metrics[EXTENSION] = worker_metric(model, sampler, errors)
