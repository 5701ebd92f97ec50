"""An idle worker whose speed estimate has gone stale is re-measured with a copy of a
request sent elsewhere, never by making a request wait on it. The Dispatcher runs on a
stand-in Dask client (tests/test_dispatch_copies.py): only its bookkeeping."""

from __future__ import annotations

import asyncio

from router_api.dispatch import Dispatcher
from router_api.probing import due_for_probe
from scheduler_plugins.policies import WorkerView
from tests.test_dispatch_copies import Client, reply

MODEL = {"name": "m", "sha256": "x", "inputs": [{"shape": [-1, 3]}]}


def measured(address: str, per_row: float, at: float) -> WorkerView:
    v = WorkerView(address, address, 2, {"sha256": "x"})
    v.service.observe(1, per_row, now=at)
    return v


def test_only_idle_measured_workers_with_a_stale_curve_are_due():
    now = 100.0
    stale, fresh, unmeasured = measured("stale", 0.4, at=90.0), measured("fresh", 0.4, at=99.5), WorkerView("new")
    busy, stuck = measured("busy", 0.4, at=90.0), measured("stuck", 0.4, at=90.0)
    busy.flights["b"] = (99.0, 0.4)
    stuck.responsive = False
    assert due_for_probe([stale, fresh, unmeasured, busy, stuck], now, fresh_for=2.0) == [stale]


async def cluster() -> tuple[Dispatcher, WorkerView, WorkerView]:
    """A fast worker measured just now and a 4x slower one idle for a minute."""
    d = Dispatcher(Client(), MODEL)
    now = d.loop.time()
    fast, slow = measured("fast", 0.1, at=now), measured("slow", 0.4, at=now - 60)
    d.views = {"fast": fast, "slow": slow}
    return d, fast, slow


def test_a_stale_idle_worker_gets_a_copy_and_the_request_waits_for_neither():
    async def go():
        d, fast, slow = await cluster()
        _, future = d.submit({"x": 1}, rows=1)
        d._pump()
        assert d.probes == 1
        (first,) = [b for b in d.in_flight.values() if b.view is fast]
        (probe,) = [b for b in d.in_flight.values() if b.view is slow]
        assert probe.items == first.items and probe.hedged
        reply(d, first)  # the fast worker answers: the request is done
        assert future.result().worker == "fast"
        before = slow.service.updated
        reply(d, probe)  # the probe's late reply answers nobody, but re-measures slow
        assert slow.service.updated > before and slow.batches == 1
        assert d.stats.durations["success"][0] == 1 and d.stats.execution_count == 1
        # Measured again just now: no further probe for the next request.
        d.submit({"x": 2}, rows=1)
        d._pump()
        assert d.probes == 1
        await d.close(timeout=0.1)

    asyncio.run(go())


def test_a_probed_worker_that_dies_leaves_the_request_to_its_first_batch():
    async def go():
        d, fast, slow = await cluster()
        _, future = d.submit({"x": 1}, rows=1)
        d._pump()
        d._remove_view("slow")
        assert len(d.queue) == 0 and not future.done()  # the first batch still carries it
        (first,) = d.in_flight.values()
        reply(d, first)
        assert future.result().worker == "fast"
        await d.close(timeout=0.1)

    asyncio.run(go())


def test_other_policies_and_off_never_probe(monkeypatch):
    import dask

    async def go(settings):
        with dask.config.set(settings):
            d, fast, slow = await cluster()
        d.submit({"x": 1}, rows=1)
        d._pump()
        n = d.probes
        await d.close(timeout=0.1)
        return n

    assert asyncio.run(go({"batch-router.placement.policy": "round-robin"})) == 0
    assert asyncio.run(go({"batch-router.placement.probe-after": "off"})) == 0
    assert asyncio.run(go({})) == 1
