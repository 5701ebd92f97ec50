"""The scheduler's side of load and unload, with a stand-in scheduler: which workers are
asked to load a model (those with room for it in GPU memory), and an unload that waits
for every front end to answer what it holds before the workers free the model."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from distributed.core import Status

from core.config import parse
from core.protocol import EXTENSION, MODELS_TOPIC
from scheduler_plugins.loading import Loader
from scheduler_plugins.registry import Registry, Served

GiB = 2**30


class FakeScheduler:
    def __init__(self, workers: dict[str, dict | None]) -> None:
        self.workers = {
            a: SimpleNamespace(address=a, status=Status.running, extra={EXTENSION: {"models": {}}},
                               metrics={EXTENSION: {"gpu": g}})  # fmt: skip
            for a, g in workers.items()
        }
        self.events: list[tuple[str, dict]] = []
        self.calls: list[tuple[str, str]] = []

    def log_event(self, topic: str, msg: dict) -> None:
        self.events.append((topic, msg))

    def rpc(self, address: str):
        scheduler = self

        class Worker:
            async def batch_router_load(self, name: str) -> dict:
                scheduler.calls.append(("load", address))
                return {"sha256": "abc", "gpu_bytes": GiB}

            async def batch_router_unload(self, name: str) -> dict:
                scheduler.calls.append(("unload", address))
                return {"name": name, "unloaded": True}

        return Worker()


def loader_with(workers: dict[str, dict | None], need: int = 2 * GiB) -> tuple[Loader, FakeScheduler]:
    registry = Registry(parse({}))
    file = SimpleNamespace(name="m", sha256="abc", path="/m.onnx", size=need // 3)
    registry.models["m"] = Served(file, {"name": "m", "version": "1", "memory_need": need, "sha256": "abc"})
    loader = Loader(registry, allow_load=True, headroom=0.1, publish=lambda: None)
    loader.scheduler = FakeScheduler(workers)
    return loader, loader.scheduler


def test_a_model_goes_only_to_workers_with_room_for_it():
    loader, scheduler = loader_with({
        "full": {"memory_total": 16 * GiB, "memory_used": 14 * GiB},
        "roomy": {"memory_total": 16 * GiB, "memory_used": 2 * GiB},
        "cpu": None,  # no GPU figures: nothing to run out of
    })  # fmt: skip
    chosen, refused = loader.candidates("m")
    assert sorted(chosen) == ["cpu", "roomy"]
    assert list(refused) == ["full"] and "needs 2048 MiB" in refused["full"]
    loaded = asyncio.run(loader._load_on_workers("m"))
    assert sorted(loaded) == ["cpu", "roomy"] and sorted(scheduler.calls) == [("load", "cpu"), ("load", "roomy")]
    assert loader.registry.models["m"].loaded == {"cpu", "roomy"}
    assert loader.registry.need("m") == GiB  # what a worker measured replaces the estimate


def test_a_worker_joining_later_is_told_the_measured_need_and_loads_only_what_fits():
    from worker_setup.preload import no_room

    loader, _ = loader_with({"roomy": {"memory_total": 16 * GiB, "memory_used": 2 * GiB}})
    asyncio.run(loader._load_on_workers("m"))
    info = loader.registry.ready()["m"]
    assert info["memory_need"] == GiB  # measured by the worker that loaded it, not the 2 GiB estimate

    def gpu(used: float) -> SimpleNamespace:
        return SimpleNamespace(sample=lambda: {"memory_total": 16 * GiB, "memory_used": int(used * GiB)})

    assert "needs 1024 MiB" in no_room(gpu(14), info, headroom=0.1)  # 0.4 GiB free after 10 % headroom
    assert no_room(gpu(12), info, headroom=0.1) is None
    assert no_room(None, info, headroom=0.1) is None  # no GPU figures (a CPU worker): it loads


def test_no_worker_with_room_is_a_clear_refusal():
    loader, _ = loader_with({"full": {"memory_total": 16 * GiB, "memory_used": 15 * GiB}})
    with pytest.raises(ValueError, match="no worker can load 'm': full needs 2048 MiB"):
        asyncio.run(loader._load_on_workers("m"))


def test_loading_is_refused_unless_allowed():
    loader, _ = loader_with({})
    loader.allow_load = False
    reply = asyncio.run(loader.load("m"))
    assert reply["status"] == "error" and reply["kind"] == "forbidden" and "allow-load" in reply["message"]


def add_other(loader: Loader) -> None:
    other = SimpleNamespace(name="n", sha256="def", path="/n.onnx", size=1)
    loader.registry.models["n"] = Served(other, {"name": "n", "version": "1", "memory_need": 1, "sha256": "def"})


def test_the_only_model_served_is_not_unloaded():
    loader, scheduler = loader_with({"w": None})
    reply = asyncio.run(loader.unload("m"))
    assert (reply["status"], reply["kind"]) == ("error", "invalid") and "only model served" in reply["message"]
    assert scheduler.events == [] and loader.registry.models["m"].state == "READY"


def test_unload_waits_for_every_front_end_to_drain_before_workers_free_the_model():
    loader, scheduler = loader_with({"w": None})
    add_other(loader)
    loader.registry.models["m"].loaded = {"w"}
    loader.frontends = {"fe1", "fe2"}

    async def main():
        unloading = asyncio.create_task(loader.unload("m"))
        await asyncio.sleep(0.05)
        assert [m["action"] for t, m in scheduler.events if t == MODELS_TOPIC] == ["unloading"]
        assert scheduler.calls == [] and loader.registry.models["m"].state == "UNLOADING"
        loader.drained("m", "fe1")
        await asyncio.sleep(0.05)
        assert scheduler.calls == []  # fe2 still holds requests for it
        loader.frontends.discard("fe2")  # ... until it leaves: nobody is left to wait for
        reply = await asyncio.wait_for(unloading, 5)
        return reply

    reply = asyncio.run(main())
    assert reply["status"] == "OK" and reply["workers"] == ["w"]
    assert scheduler.calls == [("unload", "w")]
    assert [m["action"] for t, m in scheduler.events if t == MODELS_TOPIC] == ["unloading", "unload"]
    assert "m" not in loader.registry.models and loader.registry.reasons["m"] == "unloaded"


def test_unloading_a_model_not_loaded_is_not_found():
    loader, _ = loader_with({})
    loader.registry.models["m"].state = "UNLOADING"
    reply = asyncio.run(loader.unload("m"))
    assert (reply["status"], reply["kind"]) == ("error", "not-found")
