"""Several front ends on one port (``--frontends``): the kernel spreads connections
among them, each batches on its own, and they share each worker's window through the
load its replies report. Killing one loses only the requests it held."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from scheduler_plugins.builtin_models import build_trivial
from tests.cluster import Cluster, child_pids
from tests.conftest import ARTIFACTS
from tests.http import infer_binary, logits_of, request

pytestmark = pytest.mark.integration
WINDOW = 4


def frontend_pids(c: Cluster) -> set[int]:
    """Which front ends answer: each new connection may land on any of them."""
    return {request(c.url, "GET", "/v1/workers").json()["frontend"]["pid"] for _ in range(40)}


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    model = build_trivial(tmp_path_factory.mktemp("fe") / "trivial.onnx")
    env = {"DASK_BATCH_ROUTER__WORKER__BATCH_TIME": "40ms", "DASK_BATCH_ROUTER__MAX_WINDOW": str(WINDOW)}
    c = Cluster(workers=1, args=["--threads", "1", "--frontends", "2", "--model", str(model), "--model-name", "resnet50",
                                 "--max-batch-size", "1", "--window", str(WINDOW)],
                env=env, log=ARTIFACTS / "frontends.log").start()  # fmt: skip
    yield c
    c.stop()


def send_all(c: Cluster, xs: list[np.ndarray]) -> list:
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda x: infer_binary(c.url, x), xs))


def test_two_front_ends_answer_every_request_once_and_share_the_workers_window(two):
    pids = frontend_pids(two)
    assert len(pids) == 2 and two.proc.pid in pids  # `up` itself, and the one it started
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, 3, 224, 224)).astype(np.float32) for _ in range(96)]
    replies = send_all(two, xs)
    for x, r in zip(xs, replies):
        assert r.status == 200, r.body
        np.testing.assert_allclose(logits_of(r, 1), x.mean(axis=(2, 3)), atol=1e-5)  # its own rows, once
    time.sleep(1.5)  # the worker's next heartbeat carries its peak
    (worker,) = two.get("/v1/workers")["workers"]
    print(f"most batches on the worker at once: {worker['peak_batches']} (window {WINDOW}, 2 front ends)")
    # Each front end alone would fill the window: 2 x 4 = 8 at once. Shared, the worker
    # holds about one window (a reply's figure can be a batch stale).
    assert worker["peak_batches"] is not None and worker["peak_batches"] <= WINDOW + 1, worker["peak_batches"]


def test_killing_one_front_end_loses_nothing_the_other_holds(two):
    (child,) = child_pids(two.proc.pid, " serve ")
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((1, 3, 224, 224)).astype(np.float32) for _ in range(64)]
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(infer_binary, two.url, x) for x in xs]
        time.sleep(0.3)
        os.kill(child, signal.SIGKILL)  # mid-load: its connections drop
        outcomes = []
        for x, f in zip(xs, futures):
            try:
                r = f.result()
            except OSError:  # a connection the killed front end held
                outcomes.append("dropped")
                continue
            assert r.status == 200, r.body
            np.testing.assert_allclose(logits_of(r, 1), x.mean(axis=(2, 3)), atol=1e-5)
            outcomes.append("ok")
    assert outcomes.count("ok") >= 1
    assert frontend_pids(two) == {two.proc.pid}  # the survivor takes every new connection
    replies = send_all(two, xs[:16])
    assert all(r.status == 200 for r in replies)
