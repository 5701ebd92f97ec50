"""Worker preload: ``dask worker SCHEDULER --preload worker_setup.preload``.

Runs before the worker registers, so a worker the scheduler sees already has the
cluster's model loaded and warm, and its startup information says which device and
providers really run it.
"""

from __future__ import annotations

import asyncio
import logging

from router_api import config
from worker_setup.model_cache import ensure_model
from worker_setup.preprocess import ImageLayout
from worker_setup.runtime import EXTENSION, WorkerModel
from worker_setup.session import ModelSession

logger = logging.getLogger("worker_setup.preload")


def image_layout(session: ModelSession) -> ImageLayout | None:
    """How images become rows for this model, or None if its input is not an image."""
    if len(session.inputs) != 1:
        return None
    t = session.inputs[0]
    try:
        return ImageLayout.from_shape(t.shape, t.dtype)
    except ValueError:
        return None


async def dask_setup(worker) -> None:
    # Dask's worker->scheduler stream waits 2 ms to coalesce; replies should not.
    worker.batched_stream.interval = config.seconds("batched-send-interval")
    try:
        info = await worker.scheduler.batch_router_model()
    except Exception as e:
        raise RuntimeError(
            f"the scheduler at {worker.scheduler.address} does not run the batch-router "
            f"plugin ({e}); start it with `batch-router scheduler`"
        ) from e
    path = await ensure_model(worker.scheduler, info, config.cache_dir())
    session = await asyncio.to_thread(
        ModelSession.load, str(path), config.get("worker.device"), int(config.get("worker.intra-op-threads") or 0)
    )
    model = WorkerModel(session=session, name=info["name"], sha256=info["sha256"], layout=image_layout(session))
    worker.extensions[EXTENSION] = model
    worker.startup_information[EXTENSION] = lambda w: model.describe()
    worker.metrics[EXTENSION] = lambda w: model.stats.snapshot()
    logger.info("batch-router worker ready: %s", model.describe())
