"""Queue bounds, deadlines, priorities, disconnects and body limits, on a deliberately
tight service: one worker, one row per batch, one batch in flight, six queued.

The worker is slowed 4x (each batch ~0.2-0.3 s) so that requests sent one after another
are still queued behind the first when the next arrives, however fast the host runs:
on a fast day, four unslowed batches finished before seven requests had been sent."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.cluster import Cluster
from tests.conftest import ARTIFACTS, make_image
from tests.http import classify, infer_binary

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tight(model_path):
    ARTIFACTS.mkdir(exist_ok=True)
    c = Cluster(
        workers=1,
        args=["--threads", "1", "--max-batch-size", "1", "--window", "1", "--max-queue-size", "6", "--worker-slowdown", "4"],
        env={"DASK_BATCH_ROUTER__HTTP__MAX_BODY_SIZE": "1MiB"},
        log=ARTIFACTS / "tight.log",
    ).start()
    yield c
    c.stop()


def in_background(fn, *args):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn(*args)))
    t.start()
    return t, out


def received(c: Cluster) -> int:
    return c.get("/v1/workers")["queue"]["received"]


def wait_received(c: Cluster, n: int, timeout=30):
    """Until the front end has queued n requests in all (so arrival order is known)."""
    deadline = time.monotonic() + timeout
    while received(c) < n:
        assert time.monotonic() < deadline, f"the front end never received {n} requests"
        time.sleep(0.002)


def wait_idle(c: Cluster, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(w["in_flight"] == 0 for w in c.get("/v1/workers")["workers"]):
            return
        time.sleep(0.05)


def test_body_over_the_limit_gets_413(tight):
    r = classify(tight.url, b"\xff" * (2 * 2**20))
    assert r.status == 413 and "limit" in r.json()["error"]
    assert classify(tight.url, make_image(1)).status == 200  # the service is fine


def test_full_queue_answers_503_at_once_with_retry_after(tight):
    images = [make_image(s) for s in range(12)]
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda i: classify(tight.url, i), images))
    statuses = [r.status for r in responses]
    assert statuses.count(200) >= 7  # one in flight plus six queued at least
    rejected = [r for r in responses if r.status == 503]
    assert rejected, statuses
    for r in rejected:
        assert "maximum queue size" in r.json()["error"] and r.headers["retry-after"] == "1"
    wait_idle(tight)


def test_deadline_passing_in_the_queue_gives_504_and_never_reaches_a_worker(tight):
    wait_idle(tight)
    before, timeouts = tight.stats(), tight.stats("resnet50")["rejected"].get("timeout", 0)
    start = received(tight)
    busy = [in_background(classify, tight.url, make_image(s)) for s in range(3)]
    wait_received(tight, start + 3)  # one running, two waiting ahead of the next request
    x = np.zeros((1, 3, 224, 224), np.float32)
    r = infer_binary(tight.url, x, params={"timeout": 20_000})  # 20 ms, in microseconds
    assert r.status == 504 and "timeout" in r.json()["error"]
    for t, out in busy:
        t.join()
        assert out["r"].status == 200
    after = tight.stats()
    assert after["inference_count"] - before["inference_count"] == 3  # the expired one never ran
    assert tight.stats("resnet50")["rejected"]["timeout"] - timeouts == 1  # counted under the name it was sent to


def test_higher_priority_is_served_before_earlier_lower_priority(tight):
    wait_idle(tight)
    done: dict[str, float] = {}

    def go(name, priority):
        r = classify(tight.url, make_image(3), f"?priority={priority}")
        assert r.status == 200
        done[name] = time.monotonic()

    def send(name, priority):
        t = threading.Thread(target=go, args=(name, priority))
        t.start()
        return t

    n = received(tight)
    threads = []
    # busy-1 runs; the queue (6 at most) holds busy-2..4, low-1, low-2, then high. The
    # busy ones outrank the lows, so high only has to arrive before all four are done.
    busy = [f"busy-{i}" for i in range(1, 5)]
    for name, priority in [*((b, 2) for b in busy), ("low-1", 3), ("low-2", 3), ("high", 1)]:
        threads.append(send(name, priority))
        n += 1
        wait_received(tight, n)  # arrive in exactly this order, while busy-1 runs
    for t in threads:
        t.join()
    assert done["high"] < min(done["low-1"], done["low-2"]), done
    assert max(done[b] for b in busy) < min(done["low-1"], done["low-2"]), done


def test_client_that_disconnects_before_dispatch_is_dropped(tight):
    wait_idle(tight)
    before, timeouts = tight.stats(), tight.stats("resnet50")["rejected"].get("timeout", 0)
    start = received(tight)
    busy = [in_background(classify, tight.url, make_image(s)) for s in range(3)]
    wait_received(tight, start + 3)
    image = make_image(99)
    s = socket.create_connection(("127.0.0.1", tight.port))
    s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n" + f"Content-Length: {len(image)}\r\n\r\n".encode() + image)
    wait_received(tight, start + 4)  # it is queued behind the busy ones...
    s.close()  # ...when its client goes away
    for t, out in busy:
        t.join()
        assert out["r"].status == 200
    wait_idle(tight)
    after = tight.stats()
    assert after["rejected"]["cancelled"] - before["rejected"].get("cancelled", 0) == 1
    assert after["inference_count"] - before["inference_count"] == 3


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_stopping_answers_queued_and_in_flight_requests_then_exits(model_path, how):
    """SIGTERM to `up`, or Ctrl-C in its terminal (SIGINT to the whole process group)."""
    c = Cluster(workers=1, args=["--threads", "1", "--max-batch-size", "1", "--window", "1"], log=ARTIFACTS / f"stop-{how}.log").start()
    try:
        start = received(c)
        pending = [in_background(classify, c.url, make_image(s)) for s in range(4)]
        wait_received(c, start + 4)  # one running, three queued
        if how == "sigterm":
            c.proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(c.proc.pid, signal.SIGINT)
        for t, out in pending:
            t.join()
            assert out["r"].status == 200
        assert c.proc.wait(60) == 0
    finally:
        c.stop()


def test_chunked_body_over_the_limit_gets_413_too(tight):
    def chunks():
        for _ in range(3):
            yield b"\xff" * 2**20  # 3 MiB in all, no Content-Length

    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", tight.port, timeout=30)
    conn.request("POST", "/v1/classify", body=chunks(), headers={"Content-Type": "image/jpeg"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and b"limit" in r.read()


def test_negative_timeout_or_priority_is_a_400(tight):
    assert classify(tight.url, make_image(1), "?timeout=-5").status == 400
    assert classify(tight.url, make_image(1), "?priority=-1").status == 400
