"""Placement against real worker processes: a slowed worker gets less, a stuck worker's
batches finish elsewhere, and a deadline holds even while a request is on a stuck
worker."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from tests.cluster import Cluster
from tests.conftest import ARTIFACTS, make_image
from tests.http import classify, request
from tests.test_serving import reference_top

pytestmark = pytest.mark.integration


def worker_pids(c: Cluster) -> dict[str, int]:
    """local-N name -> pid of that worker process."""
    out = {}
    for p in psutil.Process(c.proc.pid).children():
        cmd = p.cmdline()
        out[cmd[cmd.index("--name") + 1]] = p.pid
    return out


def by_name(c: Cluster) -> dict[str, dict]:
    return {w["name"]: w for w in c.get("/v1/workers")["workers"]}


def wait_until(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def test_slowed_worker_gets_a_smaller_share():
    ARTIFACTS.mkdir(exist_ok=True)
    c = Cluster(
        workers=2,
        args=["--threads", "1", "--worker-slowdown", "1,4", "--max-batch-size", "4"],
        log=ARTIFACTS / "placement-share.log",
    ).start()
    try:
        images = [make_image(s) for s in range(8)]
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda i: classify(c.url, images[i % 8]), range(96)))
        assert {r.status for r in responses} == {200}
        workers = by_name(c)
        fast, slow = workers["local-0"], workers["local-1"]
        queue = c.get("/v1/workers")["queue"]  # a hedged batch runs twice; a probe is one copied row
        assert 96 <= fast["rows"] + slow["rows"] <= 96 + 4 * queue["hedged"] + queue["probes"]
        assert fast["rows"] > 2 * slow["rows"], (fast["rows"], slow["rows"])
        # It knows why: measured service times and weights say local-1 is slower.
        assert fast["weight"] > slow["weight"]
        assert c.get("/v1/workers")["policy"] == "gpu-aware"
        assert fast["service_s"] and slow["service_s"]
        assert fast["gpu"] is None and fast["simulated"] is False  # no GPU here, and it says so
    finally:
        c.stop()


def test_stuck_worker_batches_finish_elsewhere_and_it_returns(session):
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / "placement-stuck.log"
    c = Cluster(
        workers=2,
        args=["--threads", "1", "--max-batch-size", "2"],
        env={"DASK_BATCH_ROUTER__PLACEMENT__OVERDUE_MIN": "1s"},
        log=log,
    ).start()
    pids = worker_pids(c)
    try:
        images = [make_image(s) for s in range(12)]
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(classify, c.url, image) for image in images]
            wait_until(lambda: by_name(c)["local-0"]["in_flight"], what="a batch on local-0")
            os.kill(pids["local-0"], signal.SIGSTOP)  # alive, connected, silent
            responses = [f.result() for f in futures]
        assert [r.status for r in responses] == [200] * 12
        for image, r in zip(images, responses):  # right answers, none twice, none mixed
            assert [p["index"] for p in r.json()["predictions"]] == reference_top(session, image)[0]
        assert by_name(c)["local-0"]["responsive"] is False
        assert "overdue" in log.read_text()
        os.kill(pids["local-0"], signal.SIGCONT)
        wait_until(lambda: by_name(c)["local-0"]["responsive"], what="local-0 to answer again")
    finally:
        os.kill(pids["local-0"], signal.SIGCONT)
        c.stop()


def test_deadline_holds_while_the_request_sits_on_a_stuck_worker():
    c = Cluster(
        workers=1,
        args=["--threads", "1"],
        env={"DASK_BATCH_ROUTER__PLACEMENT__OVERDUE_MIN": "60s"},  # only the deadline can answer
    ).start()
    pid = worker_pids(c)["local-0"]
    try:
        os.kill(pid, signal.SIGSTOP)
        # 1.5 s deadline; the client gives up after 20 s, far before the worker would
        # be declared overdue (60 s) or removed by Dask (minutes).
        r = request(c.url, "POST", "/v1/classify?timeout=1500000", make_image(1), {"Content-Type": "image/jpeg"}, timeout=20)
        assert r.status == 504
        assert "in flight" in r.json()["error"]
    finally:
        os.kill(pid, signal.SIGCONT)
        c.stop()


def test_python_api_tasks_are_placed_by_the_same_policy():
    """`client.map(infer, ...)` from a plain Dask client: once heartbeats have carried
    each worker's measured speed to the plugin, the 4x slower worker gets fewer tasks."""
    import numpy as np
    from distributed import Client, get_task_stream

    from worker_setup import infer

    c = Cluster(workers=2, args=["--threads", "1", "--worker-slowdown", "1,4"]).start()
    try:
        with Client(c.scheduler, timeout=30) as client:
            batch = np.zeros((1, 3, 224, 224), np.float32)
            addresses = {a: info["name"] for a, info in client.scheduler_info()["workers"].items()}
            # Warm-up: each worker measures its own speed and reports it by heartbeat.
            for name in addresses.values():
                client.submit(infer, batch, workers=[name], pure=False).result(timeout=60)
            wait_until(
                lambda: all(
                    (m or {}).get("stats", {}).get("service")
                    for m in client.run_on_scheduler(
                        lambda dask_scheduler: [ws.metrics.get("batch-router") for ws in dask_scheduler.workers.values()]
                    )
                ),
                what="service times in heartbeats",
            )
            time.sleep(1.0)  # one publish tick: the plugin's view takes them in
            with get_task_stream(client) as ts:
                client.gather(client.map(infer, [batch] * 20, pure=False))
            ran = [addresses[t["worker"]] for t in ts.data]
            assert ran.count("local-0") > 2 * ran.count("local-1"), ran
    finally:
        c.stop()


def test_slow_batch_is_hedged_to_another_worker_within_budget(session):
    """local-0 freezes (SIGSTOP) and is sent batches; well before it would be written off
    (overdue at 60 s here), copies go to local-1 and the clients get their answers."""
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / "placement-hedge.log"
    env = {
        "DASK_BATCH_ROUTER__PLACEMENT__OVERDUE_MIN": "60s",
        "DASK_BATCH_ROUTER__PLACEMENT__HEDGE_MIN": "300ms",
        "DASK_BATCH_ROUTER__PLACEMENT__HEDGE_BUDGET": "1.0",
    }
    c = Cluster(workers=2, args=["--threads", "1", "--max-batch-size", "2"], env=env, log=log).start()
    pids = worker_pids(c)
    try:
        os.kill(pids["local-0"], signal.SIGSTOP)  # it still looks idle and healthy: it gets batches
        images = [make_image(80 + s) for s in range(8)]
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(request, c.url, "POST", "/v1/classify", img, {"Content-Type": "image/jpeg"}, 20)
                       for img in images]  # fmt: skip
            responses = [f.result() for f in futures]
        assert [r.status for r in responses] == [200] * 8
        for image, r in zip(images, responses):
            assert [p["index"] for p in r.json()["predictions"]] == reference_top(session, image)[0]
        state = c.get("/v1/workers")
        assert state["queue"]["hedged"] >= 1
        assert by_name(c)["local-0"]["responsive"] is True  # hedged, not written off
        assert "hedging batch" in log.read_text()
    finally:
        os.kill(pids["local-0"], signal.SIGCONT)
        c.stop()
