"""A request carried by two batches at once (a hedged copy) is answered and counted
once, whichever batch answers, fails or loses its worker. The Dispatcher runs here on a
stand-in Dask client: no cluster, only its bookkeeping."""

from __future__ import annotations

import asyncio

import msgpack

from router_api.dispatch import Dispatcher
from scheduler_plugins.policies import WorkerView


class Future:
    status = "pending"

    def release(self) -> None:
        pass


class Client:
    id = "client-1"

    def __init__(self) -> None:
        self.submitted: list[tuple[str, list[str]]] = []

    def submit(self, fn, spec, key, pure, **where):
        self.submitted.append((key, where.get("workers")))
        return Future()


def reply(d: Dispatcher, batch) -> None:
    timings = {"rows": batch.rows, "input_ns": 1, "infer_ns": 1_000, "output_ns": 1, "service_s": 0.001}
    blob = msgpack.packb({"timings": timings, "worker": batch.view.address, "results": [{"ok": 1}] * len(batch.items)})
    d._on_reply((0, {"id": batch.id, "blob": blob, "worker": batch.view.address}))


async def hedged(timeout_us: int = 0):
    """One request on worker X, and its hedged copy on worker Y."""
    d = Dispatcher(Client(), {"name": "m", "sha256": "x", "inputs": [{"shape": [-1, 3]}]})
    d.hedge_budget = 1.0
    for a in ("X", "Y"):
        d.views[a] = WorkerView(a, a, 2, {"sha256": "x"})
    _, future = d.submit({"x": 1}, rows=1, timeout_us=timeout_us)
    d._pump()
    first = next(iter(d.in_flight.values()))
    first.hedge_at = 0.0
    d._hedge(d.loop.time())
    copy = next(b for b in d.in_flight.values() if b is not first)
    return d, future, first, copy


def test_a_worker_lost_under_a_hedged_request_does_not_queue_it_again():
    async def go():
        d, future, first, copy = await hedged(timeout_us=300_000)
        d.views[copy.view.address].window = 0  # the copy's worker takes nothing new meanwhile
        d._remove_view(first.view.address)
        assert len(d.queue) == 0  # the copy still carries it
        reply(d, copy)
        assert future.result().worker == copy.view.address
        await asyncio.sleep(0.35)  # past its deadline: nothing left to expire
        d._pump()
        await d.close(timeout=0.1)
        assert d.stats.durations["success"][0] == 1 and d.stats.durations["fail"][0] == 0
        assert dict(d.stats.rejected) == {}

    asyncio.run(go())


def test_when_both_copies_are_lost_the_request_is_queued_again():
    async def go():
        d, future, first, copy = await hedged()
        for v in d.views.values():
            v.window = 0
        d._remove_view(first.view.address)
        d._remove_view(copy.view.address)
        assert len(d.queue) == 1 and not future.done()
        await d.close(timeout=0.1)
        assert isinstance(future.exception(), Exception) and d.stats.rejected["unavailable"] == 1

    asyncio.run(go())


def test_a_failed_first_try_leaves_the_request_to_its_copy():
    async def go():
        d, future, first, copy = await hedged()
        first.future.status = "error"  # the task died without replying
        d._reap_failed()
        assert not future.done()
        reply(d, copy)
        assert future.result().worker == copy.view.address
        assert (d.stats.durations["success"][0], d.stats.durations["fail"][0]) == (1, 0)
        reply(d, first)  # a late answer from the first try changes nothing
        assert d.stats.durations["success"][0] == 1 and d.stats.execution_count == 1
        await d.close(timeout=0.1)

    asyncio.run(go())
