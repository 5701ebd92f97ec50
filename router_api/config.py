"""The ``batch-router`` namespace in Dask's config system.

Importing this module merges ``batch-router.yaml`` into ``dask.config`` as defaults, so
YAML files and ``DASK_BATCH_ROUTER__...`` environment variables override them as Dask
users expect.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dask.config
import yaml
from dask.utils import parse_bytes, parse_timedelta

_DEFAULTS = Path(__file__).with_name("batch-router.yaml")

with _DEFAULTS.open() as f:
    _defaults = yaml.safe_load(f)
dask.config.update_defaults(_defaults)


# Dask settings batch-router needs: the front end balances work itself, and late binding
# means a task never waits on a worker long enough to be worth stealing.
DASK_SETTINGS = {
    "distributed.scheduler.work-stealing": False,
    # A batch of 32 float32 images is ~19 MB; that is expected, not a mistake.
    "distributed.admin.large-graph-warning-threshold": "256MiB",
    # Dask keeps the last N messages of every stream (and events of every topic) for
    # debugging; at 1000 that is ~600 MB per worker stream of retained batches.
    "distributed.admin.low-level-log-length": 32,
}


def get(key: str, default: Any = None) -> Any:
    """Read ``batch-router.<key>``."""
    return dask.config.get(f"batch-router.{key}", default=default)


def seconds(key: str) -> float:
    """A duration setting in seconds (accepts "5ms", "2s", 0.1)."""
    value = get(key)
    return float(parse_timedelta(value, default="s") or 0.0)


def seconds_or_off(key: str) -> float | None:
    """A duration setting that may be switched off (``off``, ``false`` or null): None."""
    return None if get(key) in (None, False, "off") else seconds(key)


def nbytes(key: str) -> int:
    value = get(key)
    return int(parse_bytes(value) if isinstance(value, str) else value)


def placement_tuning():
    """The placement policy's knobs, the same for the front end and the scheduler plugin."""
    from scheduler_plugins.policies import Tuning

    return Tuning(
        throttle_penalty=float(get("placement.throttle-penalty")),
        memory_headroom=float(get("placement.memory-headroom")),
        error_window=seconds("placement.error-penalty-window"),
    )


def cache_dir() -> Path:
    """Where models are built and cached: $XDG_CACHE_HOME/gpu-batch-router by default."""
    configured = get("worker.cache-dir")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpu-batch-router"

# Over a tunnel (bore.pub, 100-500 ms round trips, Colab runtimes that vanish): notice a
# silent worker in about a minute, not Dask's default 5-10 (dask-internals §3). Stuck
# batches are moved sooner by the front end's own overdue check.
TUNNEL_SETTINGS = {
    "distributed.scheduler.worker-ttl": "60s",
    "distributed.comm.timeouts.connect": "60s",
}

