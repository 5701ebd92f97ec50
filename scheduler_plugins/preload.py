"""Scheduler preload: ``dask scheduler --preload scheduler_plugins.preload``.

The model comes from ``batch-router.model`` (YAML or DASK_BATCH_ROUTER__MODEL); unset
means the default ResNet-50, built on first use.
"""

from __future__ import annotations

from router_api import config
from scheduler_plugins.dashboard import register
from scheduler_plugins.plugin import BatchRouterPlugin

# Dask imports a preload before it builds the dashboard: the pages must be known by then.
register()


def dask_setup(scheduler) -> None:
    import dask.config

    from worker_setup.resnet50 import ensure_default_model

    dask.config.set(config.DASK_SETTINGS)  # for the streams opened from here on

    path = config.get("model") or str(ensure_default_model())
    scheduler.add_plugin(BatchRouterPlugin(path))
