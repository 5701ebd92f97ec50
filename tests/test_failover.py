"""A worker killed mid-batch: its batches go back to the queue and finish elsewhere."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from tests.cluster import Cluster
from tests.conftest import ARTIFACTS, make_image
from tests.http import classify
from tests.test_serving import reference_top

pytestmark = pytest.mark.integration


def test_killed_worker_loses_no_request(model_path, session):
    ARTIFACTS.mkdir(exist_ok=True)
    c = Cluster(workers=2, args=["--threads", "1", "--max-batch-size", "2"], log=ARTIFACTS / "failover.log").start()
    try:
        workers = psutil.Process(c.proc.pid).children()
        assert len(workers) == 2
        images = [make_image(s) for s in range(12)]
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(classify, c.url, image) for image in images]
            deadline = time.monotonic() + 30
            while not any(w["in_flight"] for w in c.get("/v1/workers")["workers"]):
                assert time.monotonic() < deadline
                time.sleep(0.005)
            os.kill(workers[0].pid, signal.SIGKILL)
            responses = [f.result() for f in futures]
        assert [r.status for r in responses] == [200] * 12
        assert len(c.get("/v1/workers")["workers"]) == 1
        for image, r in zip(images, responses):  # correct answers, none mixed up
            assert [p["index"] for p in r.json()["predictions"]] == reference_top(session, image)[0]
        assert "re-queueing" in (ARTIFACTS / "failover.log").read_text()
    finally:
        c.stop()
