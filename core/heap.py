"""Keep CPython's full garbage collections from stalling every request in flight.

Once Dask, its dashboard and Tornado are up, a process tracks some 100k objects that
live as long as it does, and a full collection walks them all holding the GIL: tens of
milliseconds during which no request moves. Frozen into CPython's permanent generation
once startup is done, they are never walked again (measured in ``benchmarks/RESULTS.md``,
"Full garbage collections").
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
