"""Scheduler preload: ``dask scheduler --preload scheduler_plugins.preload``, and what
``batch-router up`` and ``batch-router scheduler`` use themselves.

The models come from ``batch-router.model-repository`` (a Triton model repository), or
the one file ``batch-router.model`` names (YAML, DASK_BATCH_ROUTER__MODEL or the
``--model`` flag); neither means the default ResNet-50, built into the cache on first use.
"""

from __future__ import annotations

import asyncio

import dask.config

from core.config import DASK_SETTINGS, parse
from scheduler_plugins.builtin_models import ensure_default_model
from scheduler_plugins.dashboard import register
from scheduler_plugins.plugin import BatchRouterPlugin

# Dask imports a preload in the Scheduler's constructor, before it builds the dashboard
# and its extensions: the pages must be known by then, and work stealing must be off.
register()
dask.config.set(DASK_SETTINGS)


async def dask_setup(scheduler) -> None:
    settings = parse(dask.config.get("batch-router", None))  # a bad setting stops the scheduler here
    path = None
    if settings.model_repository is None:
        path = settings.model or str(await asyncio.to_thread(ensure_default_model))
    scheduler.add_plugin(BatchRouterPlugin(path, settings))
