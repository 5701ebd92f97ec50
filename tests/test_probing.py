"""An idle worker whose speed estimate has gone stale is re-measured with a copy of a
request sent elsewhere, never by making a request wait on it. The Dispatcher runs on a
stand-in Dask client (tests/test_dispatch_copies.py): only its bookkeeping."""

from __future__ import annotations

import asyncio

import msgpack

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
    probed = measured("probed", 0.4, at=90.0)
    probed.probed_at = 99.0  # its probe failed and measured nothing: not again at once
    assert due_for_probe([stale, fresh, unmeasured, busy, stuck, probed], now, fresh_for=2.0) == [stale]


async def cluster() -> tuple[Dispatcher, WorkerView, WorkerView]:
    """A fast worker measured just now and a 4x slower one idle for a minute."""
    d = Dispatcher(Client(), MODEL)
    now = d.loop.time()
    fast, slow = measured("fast", 0.1, at=now), measured("slow", 0.4, at=now - 60)
    d.views = {"fast": fast, "slow": slow}
    return d, fast, slow


def one_request(d: Dispatcher, fast: WorkerView, slow: WorkerView):
    """Queue one request and pump: its future, then the batches on fast and on slow."""
    _, future = d.submit({"x": 1}, rows=1)
    d._pump()
    on = [[b for b in d.in_flight.values() if b.view is v] for v in (fast, slow)]
    return future, *on


def test_a_stale_idle_worker_gets_a_copy_and_the_request_waits_for_neither():
    async def go():
        d, fast, slow = await cluster()
        future, (first,), (probe,) = one_request(d, fast, slow)
        assert d.probes == 1
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


def failed(d: Dispatcher, batch) -> None:
    """The worker's reply when the batch failed there (run_batch's error path)."""
    blob = msgpack.packb({"timings": {}, "worker": batch.view.address, "results": [{"error": "boom", "status": 500}]})
    d._on_reply((0, {"id": batch.id, "blob": blob, "worker": batch.view.address}))


def test_a_failing_probe_answers_nobody_and_is_not_repeated_at_once():
    async def go():
        d, fast, slow = await cluster()
        future, (first,), (probe,) = one_request(d, fast, slow)
        failed(d, probe)  # back first, with an error: the first try is still running
        assert not future.done()
        reply(d, first)
        assert future.result().worker == "fast" and "error" not in future.result().result
        d.submit({"x": 2}, rows=1)
        d._pump()  # slow's curve is as stale as before, but it was probed just now
        assert d.probes == 1 and d.sent == 2  # and probes are not batches sent
        await d.close(timeout=0.1)

    asyncio.run(go())


def test_a_failed_hedge_leaves_the_request_to_its_first_try():
    async def go():
        from tests.test_dispatch_copies import hedged

        d, future, first, copy = await hedged()
        failed(d, copy)
        assert not future.done()
        reply(d, first)
        assert "error" not in future.result().result
        await d.close(timeout=0.1)

    asyncio.run(go())


def test_no_probe_once_shutting_down():
    async def go():
        d, fast, slow = await cluster()
        d.submit({"x": 1}, rows=1)
        d.closing = True
        d._pump()
        assert d.probes == 0
        for batch in list(d.in_flight.values()):
            reply(d, batch)
        await d.close(timeout=0.1)

    asyncio.run(go())


def test_a_probed_worker_that_dies_leaves_the_request_to_its_first_batch():
    async def go():
        d, fast, slow = await cluster()
        future, _, _ = one_request(d, fast, slow)
        d._remove_view("slow")
        assert len(d.queue) == 0 and not future.done()  # the first batch still carries it
        (first,) = d.in_flight.values()
        reply(d, first)
        assert future.result().worker == "fast"
        await d.close(timeout=0.1)

    asyncio.run(go())


def test_when_the_first_tries_worker_dies_the_request_is_queued_again_despite_a_probe():
    async def go():
        d, fast, slow = await cluster()
        future, _, (probe,) = one_request(d, fast, slow)
        slow.window = 0  # the queue must not go straight back out to it
        fast.window = 0
        d._remove_view("fast")
        assert len(d.queue) == 1  # a probe carries nobody: it is queued again at once
        reply(d, probe)  # the probe's answer still serves it, should it come first
        assert future.result().worker == "slow"
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
