"""Forgetting what Dask remembers of every burst of batches.

Each time the scheduler runs out of batch-router tasks, their TaskGroup is forgotten,
and the next batch starts a new one, attached to a new default span. Spans, and the
TaskGroups in them, are never dropped (dask/distributed#7977): ~4 KB a burst, for ever,
and a burst can be a single batch. This drops the default spans whose TaskGroups the
scheduler has forgotten, a while after they finished; a worker's late heartbeat
metrics for one are dropped (Dask would raise a KeyError in the heartbeat). Spans a
user opened with ``distributed.span`` are left alone.

Dask also caches ``key_split`` of the last 100,000 task keys, and every batch's key is
new: ~20 MB of RSS that only grows in the first 100,000 batches, cleared here too.
"""

from __future__ import annotations

import os
import time
from typing import Any

from dask.utils import key_split

DEFAULT = ("default",)
KEEP_S = float(os.environ.get("BATCH_ROUTER_SPAN_KEEP_S", 30))  # a finished span is kept this long
KEY_CACHE = 1000  # keys whose key_split is worth keeping
PRUNE_EVERY_S = min(10.0, max(0.5, KEEP_S / 2))


def tolerate_pruned(scheduler: Any) -> None:
    """Heartbeat metrics for a span already pruned are dropped, not a KeyError."""
    ext = scheduler.extensions.get("spans")
    if ext is None:
        return
    heartbeat = ext.heartbeat

    def beat(ws: Any, data: dict) -> None:
        heartbeat(ws, {k: v for k, v in data.items() if k[1] in ext.spans})

    ext.heartbeat = beat


def forget(scheduler: Any) -> int:
    """What the periodic callback runs: spans, then the key cache."""
    if key_split.cache_info().currsize > KEY_CACHE:
        key_split.cache_clear()
    return prune_spans(scheduler)


def prune_spans(scheduler: Any, keep_s: float = KEEP_S, now: float | None = None) -> int:
    """Drop finished default spans with no live TaskGroup; how many went."""
    ext = scheduler.extensions.get("spans")
    if ext is None:
        return 0
    now = time.time() if now is None else now
    live = {id(tg) for tg in scheduler.task_groups.values()}
    spans = ext.spans_search_by_name.get(DEFAULT, [])
    # The newest default span is the one Dask would reuse: never that one.
    gone = [s for s in spans[:-1] if not s.children and s.done and not any(id(tg) in live for tg in s.groups)
            and (s.stop or s.enqueued) < now - keep_s]  # fmt: skip
    if not gone:
        return 0
    ids = {s.id for s in gone}
    for s in gone:
        del ext.spans[s.id]
    ext.spans_search_by_name[DEFAULT] = [s for s in spans if s.id not in ids]
    for tag in DEFAULT:
        ext.spans_search_by_tag[tag] = [s for s in ext.spans_search_by_tag[tag] if s.id not in ids]
    ext.root_spans[:] = [s for s in ext.root_spans if s.id not in ids]
    return len(gone)
