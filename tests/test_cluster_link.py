"""The Dispatcher's shell on a stand-in Dask client: what a handler sees when it submits."""

from __future__ import annotations

import asyncio
import pickle

import pytest

from core.config import parse
from router_api.cluster_link import ClusterLink
from router_api.dispatch_events import Unavailable, WorkerJoined, WorkerLeft

MODEL = {"name": "m", "sha256": "x", "inputs": [{"shape": [-1, 3]}]}


class Future:
    status = "pending"

    def release(self) -> None:
        pass


class Client:
    id = "client-1"

    def __init__(self) -> None:
        self.submitted: list[str] = []

    def submit(self, fn, spec, key, pure, **where):
        self.submitted.append(key)
        return Future()


def test_a_refused_part_of_a_request_raises_at_once_and_counts_once():
    """A multi-image request against a full queue is answered 503 at its first refused
    image, without waiting for the images queued before it (the handler then cancels
    those)."""

    async def go():
        link = ClusterLink(Client(), parse({"max-queue-size": 2, "window": 1}), {"m": MODEL})
        link.loop = asyncio.get_running_loop()
        link.handle(WorkerJoined(link.now, {"address": "A", "name": "A", "sha256": "x"}))
        queued = [link.submit(f"image {i}", rows=1) for i in range(2)]
        with pytest.raises(Unavailable, match="maximum queue size"):
            link.submit("image 2", rows=1)
        assert link.dispatcher.stats.rejected["queue_full"] == 1
        for request, future in queued:
            link.cancel(request)
            assert future.cancelled()

    asyncio.run(go())


def test_a_worker_on_this_host_gets_batches_directly_and_tasks_once_that_fails():
    """Same host (same boot id): the batch goes over a connection to the worker, not
    through the scheduler. A broken connection queues the request again, unanswered,
    and that worker gets Dask tasks from then on; nothing is lost."""
    from distributed.comm import CommClosedError

    from core.protocol import BatchReply, Tensors, Timings

    class Broken:
        def __init__(self, calls: list) -> None:
            self.calls = calls

        async def batch_router_run(self, spec):
            self.calls.append(pickle.loads(spec).id)  # pickled by the link: nothing in it travels out of band
            raise CommClosedError("Stream is closed")

    class Pool:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def __call__(self, address):
            assert address == "tcp://127.0.0.1:9"  # the worker's listener, not the address it advertises
            return Broken(self.calls)

    async def go():
        client = Client()
        link = ClusterLink(client, parse({"window": 1}), {"m": MODEL})
        link.loop, link.pool = asyncio.get_running_loop(), Pool()
        assert link.clock, "a Linux host has a boot id"
        here = {"address": "A", "name": "A", "sha256": "x", "clock": link.clock, "direct_address": "tcp://127.0.0.1:9"}
        link.handle(WorkerJoined(link.now, here))
        view = link.dispatcher.views["A"]
        assert link.route(view) == "direct"
        request, future = link.submit("tensor", rows=1)
        for _ in range(5):
            await asyncio.sleep(0)  # the wake, the direct call, its failure, the requeue
        assert len(link.pool.calls) == 1 and set(link.unreachable) == {"A"} and link.route(view) == "task"
        assert len(client.submitted) == 1 and not future.done()  # queued again, now as a task
        link._on_reply((None, BatchReply(client.submitted[0], "A", [Tensors({})], Timings(rows=1)).to_wire()))
        assert (await future).worker == "A"
        elsewhere = {**here, "address": "B", "name": "B", "clock": "another-host"}
        link.handle(WorkerJoined(link.now, elsewhere))
        assert link.route(link.dispatcher.views["B"]) == "task"  # another host: its listener may not be reachable

    asyncio.run(go())


def test_tensors_go_by_shared_memory_only_to_a_worker_that_sees_it():
    """Containers on one host share a kernel (and a clock) but not /dev/shm: a worker
    that reports another shared-memory mount gets the tensor's bytes, directly still."""
    import numpy as np

    from core.protocol import ShmRef, TensorItem

    from core.protocol import BatchReply, Tensors, Timings

    class Recording:
        def __init__(self) -> None:
            self.items: list = []

        def __call__(self, address):
            return self

        async def batch_router_run(self, spec):
            spec = pickle.loads(spec) if isinstance(spec, bytes) else spec.data  # the link's pickle, or Dask's
            self.items.append(spec.items[0])
            return BatchReply(spec.id, "w", [Tensors({})], Timings(rows=1)).to_wire()

    async def go():
        link = ClusterLink(Client(), parse({"window": 1}), {"m": MODEL})
        link.loop, link.pool = asyncio.get_running_loop(), Recording()
        assert link.shm, "a Linux host has /dev/shm"
        data = np.zeros(12, np.uint8)
        item = TensorItem(rows=1, inputs={"x": data}, shapes={"x": (1, 3)}, outputs=("y",), shm={"x": ShmRef("/dev/shm/s", 0, 12)})
        for name, shm in (("same", link.shm), ("container", link.shm + "-other")):
            info = {"address": name, "name": name, "sha256": "x", "clock": link.clock, "direct_address": "tcp://127.0.0.1:9", "shm": shm}
            link.handle(WorkerJoined(link.now, info, 1))
            assert link.route(link.dispatcher.views[name]) == "direct"
            link.submit(item, rows=1)
            for _ in range(5):
                await asyncio.sleep(0)
            link.handle(WorkerLeft(link.now, name, 2))
        same, container = link.pool.items
        assert same.shm and same.inputs == {}  # references: it maps the slab
        assert container.shm is None and container.inputs["x"] is data  # the bytes, still straight to it

    asyncio.run(go())


def test_a_batch_for_the_direct_lane_is_pickled_here_unless_tensors_travel_with_it():
    """Tensors in shared memory: the spec is a few hundred bytes, pickled by the link
    (cheaper than Dask's serialization); tensor bytes in it: Dask's, out of band."""
    import numpy as np
    from distributed.protocol.serialize import Serialize

    from core.protocol import BatchSpec, ShmRef, TensorItem
    from router_api.link_lanes import lane_payload

    shared = TensorItem(rows=1, inputs={}, shapes={"x": (1, 3)}, outputs=("y",), shm={"x": ShmRef("/dev/shm/s", 0, 12)})
    spec = BatchSpec("b-1", "topic", [shared], False, "m")
    payload = lane_payload(spec)
    assert isinstance(payload, bytes) and len(payload) < 1000 and pickle.loads(payload) == spec
    carried = TensorItem(rows=1, inputs={"x": np.zeros(1 << 16, np.uint8)}, shapes={"x": (1, 1 << 16)}, outputs=("y",))
    assert isinstance(lane_payload(BatchSpec("b-2", "topic", [carried], False, "m")), Serialize)


def test_a_lane_goes_with_its_worker():
    """A worker that left (or came back under a new socket) leaves no connection behind."""

    async def go():
        link = ClusterLink(Client(), parse({"window": 1}), {"m": MODEL})
        link.loop = asyncio.get_running_loop()
        for name in ("A", "B"):
            info = {"address": name, "name": name, "sha256": "x", "clock": link.clock, "direct_address": "tcp://127.0.0.1:9",
                    "shm": link.shm, "lane": f"/nowhere/{name}.sock"}  # fmt: skip
            link.handle(WorkerJoined(link.now, info, 1))
            assert link._lane(link.dispatcher.views[name]) is not None
        link.handle(WorkerLeft(link.now, "A", 2))
        link._prune_lanes()
        assert list(link.lanes) == ["/nowhere/B.sock"]

    asyncio.run(go())
