"""Forgetting a worker's per-span metrics once their tasks are gone.

A Dask worker sums its fine-grained metrics per span for ever (``digests_total`` and
``digests_max``); each burst of batches is a new span, so a worker fed by tasks would
grow ~0.5 KB a batch without end. What the scheduler needs is sent with each
heartbeat from a separate, emptied dict, so dropping old spans' sums loses nothing
batch-router or the dashboard reads. Dask's cache of ``key_split`` (100,000 keys, each
batch's new) is cleared here too: ~20 MB that would only grow.
"""

from __future__ import annotations

from typing import Any

from dask.utils import key_split
from distributed.spans import CONTEXTS_WITH_SPAN_ID

PRUNE_EVERY_S = 10.0
KEY_CACHE = 1000  # keys whose key_split is worth keeping
DIGESTS = "batch-router-digests"  # the worker's periodic callback


def prune_digests(worker: Any) -> int:
    """Drop the sums of spans no task on this worker belongs to; how many went."""
    if key_split.cache_info().currsize > KEY_CACHE:
        key_split.cache_clear()
    live = {ts.span_id for ts in worker.state.tasks.values()}
    dropped = 0
    for digests in (worker.digests_total, worker.digests_max):
        old = [k for k in digests if isinstance(k, tuple) and len(k) > 1 and k[0] in CONTEXTS_WITH_SPAN_ID and k[1] not in live]
        for k in old:
            del digests[k]
        dropped += len(old)
    return dropped


def install(worker: Any) -> None:
    """Prune every few seconds, for as long as the worker lives (it stops the callback)."""
    from tornado.ioloop import PeriodicCallback

    worker.periodic_callbacks[DIGESTS] = PeriodicCallback(lambda: prune_digests(worker), 1e3 * PRUNE_EVERY_S)
