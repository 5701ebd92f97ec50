"""Startup objects are frozen out of CPython's full collections, in every process.

A full collection walks every tracked object holding the GIL; unfrozen, the front end's
took ~85 ms and a worker's ~40 ms, stalling every request in flight
(``benchmarks/probes/gc_pause.py``).
"""

from __future__ import annotations

import gc

import pytest
from distributed import Client

from core.heap import freeze_startup_heap


def test_freeze_moves_what_exists_now_and_nothing_made_later():
    before = gc.get_freeze_count()
    try:
        frozen = freeze_startup_heap("test")
        assert frozen == gc.get_freeze_count() > before
        later = [[i] for i in range(1000)]  # tracked containers made after the freeze
        assert gc.get_freeze_count() == frozen
        assert any(later[0] is o for o in gc.get_objects())  # still seen by collections
    finally:
        gc.unfreeze()


@pytest.mark.integration
def test_front_end_and_workers_run_with_their_startup_heap_frozen(cluster):
    with Client(cluster.scheduler, timeout=30) as client:
        workers = client.run(gc.get_freeze_count)
        front_end = client.run_on_scheduler(gc.get_freeze_count)
    assert len(workers) == 2
    # Tens of thousands of objects each: Dask, Tornado and (in the front end) Bokeh.
    assert all(n > 10_000 for n in workers.values()), workers
    assert front_end > 10_000
