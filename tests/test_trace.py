"""Per-request traces (``batch-router.trace``): each traced request's stamps, from the
front end's arrival to its answer, are ordered and their hops add up to the whole; a
worker on another host has its stamps placed on the front end's clock; off, nothing is
stamped. The live test runs a real cluster with ``--trace``."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from core.trace import HOPS, STAMPS, align, complete, hops, summary
from tests.cluster import Cluster, free_port
from tests.conftest import ARTIFACTS
from tests.conftest import make_image
from tests.http import classify, infer_binary, request


def front_end_stamps(arrival: float = 100.0) -> dict:
    return {"arrival": arrival, "queued": arrival + 0.001, "bound": arrival + 0.002, "received": arrival + 0.030}


def test_a_worker_sharing_the_clock_keeps_its_stamps_and_the_hops_add_up():
    trace = front_end_stamps()
    align(trace, [100.004, 100.005, 100.025, 100.026], same_clock=True)
    trace["answered"] = 100.031
    assert complete(trace) and trace["clock"] == "shared"
    h = hops(trace)
    assert list(h) == list(HOPS)
    assert h["to_worker"] == pytest.approx(2.0) and h["compute"] == pytest.approx(20.0) and h["to_front_end"] == pytest.approx(4.0)
    assert sum(h.values()) == pytest.approx(1e3 * (trace["answered"] - trace["arrival"]))


def test_a_worker_with_its_own_clock_is_centred_in_the_round_trip():
    trace = front_end_stamps()
    align(trace, [5000.0, 5000.001, 5000.021, 5000.022], same_clock=False)  # another host: another epoch
    trace["answered"] = 100.031
    h = hops(trace)
    assert trace["clock"] == "estimated"
    assert h["to_worker"] == pytest.approx(h["to_front_end"]) == pytest.approx(3.0)  # (28 - 22) / 2 each way
    assert h["compute"] == pytest.approx(20.0)
    assert [trace[s] for s in STAMPS] == sorted(trace[s] for s in STAMPS)


def test_the_summary_skips_traces_that_never_got_an_answer():
    done = front_end_stamps()
    align(done, [100.004, 100.005, 100.025, 100.026], True)
    done["answered"] = 100.031
    assert summary([done, front_end_stamps()])["count"] == 1
    assert summary([])["count"] == 0


# -- live --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def traced(model_path):
    ARTIFACTS.mkdir(exist_ok=True)
    grpc_port = free_port()
    c = Cluster(workers=1, args=["--threads", "1", "--trace"], env={"DASK_BATCH_ROUTER__GRPC__PORT": str(grpc_port)},
                log=ARTIFACTS / "trace.log").start()  # fmt: skip
    c.grpc = f"127.0.0.1:{grpc_port}"
    yield c
    c.stop()


@pytest.mark.integration
def test_every_answered_request_is_traced_in_order_and_adds_up(traced):
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    seen = []  # what the client measured, around the server's stamps
    for _ in range(3):
        t0 = time.perf_counter()
        assert infer_binary(traced.url, x).status == 200
        seen.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert classify(traced.url, make_image(3)).status == 200
        seen.append(time.perf_counter() - t0)
    assert classify(traced.url, b"not an image").status == 400  # answered by the worker, with an error: traced too
    t0 = time.perf_counter()
    x_in = grpcclient.InferInput("input", list(x.shape), "FP32")
    x_in.set_data_from_numpy(x)
    grpcclient.InferenceServerClient(traced.grpc).infer("resnet50", [x_in])  # gRPC's requests are traced as REST's
    seen.append(time.perf_counter() - t0)
    out = traced.get("/v1/trace")
    assert out["enabled"] and out["stamps"] == list(STAMPS) and out["count"] == 8
    for t in out["latest"]:
        assert t["clock"] == "shared"  # one host: the worker's stamps are read as they are
        assert all(ms >= 0 for ms in t["hops_ms"].values()), t  # ordered: no hop runs backwards
    whole, parts = out["total_ms"]["mean"], sum(h["mean"] for h in out["hops_ms"].values())
    assert parts == pytest.approx(whole, abs=0.01)  # the hops add up to the whole...
    assert whole <= 1e3 * sum(seen) / len(seen)  # ...which lies within what the client saw (one more answered a 400)
    assert out["hops_ms"]["compute"]["p50"] > 0


@pytest.mark.integration
def test_tracing_is_off_unless_asked_for(cluster):
    assert request(cluster.url, "GET", "/v1/trace").json() == {"enabled": False, "count": 0}
