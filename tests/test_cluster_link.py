"""The Dispatcher's shell on a stand-in Dask client: what a handler sees when it submits."""

from __future__ import annotations

import asyncio

import pytest

from core.config import parse
from router_api.cluster_link import ClusterLink
from router_api.dispatch_events import Unavailable, WorkerJoined

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
        link = ClusterLink(Client(), parse({"max-queue-size": 2, "window": 1}), MODEL)
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
