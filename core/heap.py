"""Keep CPython's full garbage collections from stalling every request in flight.

Once Dask's scheduler, its Bokeh dashboard and Tornado are up, the front end's process
tracks ~160k objects, and a worker's ~80k. A full (generation 2) collection walks every
one of them while holding the GIL: on the development VM that stopped the front end's
event loop for ~85 ms, and a worker's for 30-40 ms, every several seconds under load
(it was the maximum latency of every concurrency-1 run). Nearly all of those objects live
as long as the process, so once startup is done they are frozen into CPython's
permanent generation, and later collections walk only what came since
(``python -m benchmarks.probes.gc_pause`` measures both, side by side).
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger("core.heap")


def freeze_startup_heap(what: str) -> int:
    """Collect once, then freeze what survived; returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info("%s: %d startup objects frozen out of the garbage collector's way", what, frozen)
    return frozen
