"""Request bodies in shared memory for workers on the front end's host (router_api.shm).

The pool: slabs by size class, reused, bounded, and removed with their front end (or
by the next one, if it died). Live: every slab goes back after every reply, error,
timeout and disconnect, and the answers are those of the bytes sent."""

from __future__ import annotations

import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from core.protocol import ShmRef
from router_api.shm import MIN_SLAB, PREFIX, ShmPool, pid_namespace, sweep_stale
from tests.cluster import Cluster
from tests.conftest import ARTIFACTS, make_image
from tests.http import classify, infer_binary, logits_of, request
from worker_setup import shm_reader


def test_slabs_come_in_size_classes_are_reused_and_the_pool_is_bounded(tmp_path):
    pool = ShmPool(4 * MIN_SLAB, tmp_path)
    a = pool.take(100_000)  # -> 128 KiB
    assert a.size == 2 * MIN_SLAB and os.stat(a.path).st_size == a.size and oct(os.stat(a.path).st_mode)[-3:] == "600"
    b = pool.take(10)  # small bodies still get the smallest class
    assert b.size == MIN_SLAB
    assert pool.take(MIN_SLAB + 1) is None  # 128 + 64 + 128 KiB would pass the bound
    pool.give_back(a)
    assert pool.take(120_000) is a  # the same slab again: no new file, no new mapping
    pool.give_back(a)
    pool.give_back(a)  # twice is harmless
    assert pool.stats() == {"slabs_in_use": 1, "bytes_in_use": MIN_SLAB, "bytes": 3 * MIN_SLAB}
    pool.close()
    assert list(tmp_path.iterdir()) == []


def test_a_reference_names_where_the_bytes_lie_and_the_worker_reads_them_there(tmp_path):
    pool = ShmPool(MIN_SLAB, tmp_path)
    slab = pool.take(1000)
    x = np.arange(100, dtype=np.float32)
    slab.buf[200:600] = x.tobytes()
    ref = slab.ref(memoryview(slab.buf)[200:600])
    assert ref == ShmRef(slab.path, 200, 400)
    np.testing.assert_array_equal(shm_reader.read(ref).view(np.float32), x)
    assert slab.ref(memoryview(b"elsewhere")) is None  # a JSON request's tensor is not in the slab
    with pytest.raises(shm_reader.ShmUnreadable, match="past the end"):
        shm_reader.read(ShmRef(slab.path, MIN_SLAB - 10, 100))
    pool.close()


def test_a_clients_region_is_read_by_the_worker_and_a_truncated_one_is_an_error_not_a_crash(tmp_path):
    """Inputs a client left in its own region go to a worker on this host by reference;
    the client may cut the region short meanwhile: the worker reads (never maps) it, so
    that is a ValueError for that request (a 400), not a SIGBUS for the worker."""
    region = tmp_path / "client-region"
    data = np.arange(64, dtype=np.uint8)
    region.write_bytes(b"\0" * 16 + data.tobytes())
    ref = ShmRef(str(region), 16, 64, client=True)
    assert np.array_equal(shm_reader.read(ref), data)
    os.truncate(region, 40)
    with pytest.raises(ValueError, match="holds 24 of the 64 bytes"):
        shm_reader.read(ref)
    region.unlink()
    with pytest.raises(ValueError, match="cannot be read"):
        shm_reader.read(ref)


def test_slabs_of_a_front_end_that_died_are_removed_by_the_next(tmp_path):
    ns = pid_namespace()
    dead = tmp_path / f"{PREFIX}{ns}-999999999-abcd-1"  # no such pid here
    alive = tmp_path / f"{PREFIX}{ns}-{os.getppid()}-abcd-1"
    elsewhere = tmp_path / f"{PREFIX}{ns + 1}-999999999-abcd-1"  # another container's pids: not ours to judge
    other = tmp_path / "unrelated"
    for f in (dead, alive, elsewhere, other):
        f.write_bytes(b"x")
    sweep_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, elsewhere.name, other.name])


# -- live ------------------------------------------------------------------------------------


def slabs_on_disk(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"{PREFIX}{pid_namespace()}-{pid}-")]


def shm(c: Cluster) -> dict:
    return c.get("/v1/workers")["shared_memory"]


def wait_until(check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.integration
def test_every_slab_goes_back_after_replies_errors_timeouts_and_disconnects(model_path, session):
    c = Cluster(workers=1, args=["--threads", "1", "--max-batch-size", "1", "--window", "1", "--worker-slowdown", "4"],
                log=ARTIFACTS / "shm.log").start()  # fmt: skip
    try:
        assert c.get("/v1/workers")["workers"][0]["route"] == "direct"
        rng = np.random.default_rng(7)
        xs = [rng.standard_normal((1, 3, 224, 224)).astype(np.float32) for _ in range(4)]
        with ThreadPoolExecutor(4) as pool:  # replies: each answer is that of its own bytes
            replies = list(pool.map(lambda x: infer_binary(c.url, x), xs))
        for x, r in zip(xs, replies):
            assert r.status == 200, r.body
            np.testing.assert_allclose(logits_of(r, 1), session.run(None, {"input": x})[0], atol=1e-3)
        assert shm(c)["bytes"] > 0, "the bodies went through shared memory"

        header = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 224, 224], "datatype": "FP32",
                                         "parameters": {"binary_data_size": 12}}]}).encode()  # fmt: skip
        bad = request(c.url, "POST", "/v2/models/resnet50/infer", header + bytes(602112),
                      {"Inference-Header-Content-Length": str(len(header))})  # fmt: skip
        assert bad.status == 400  # an error before anything was queued

        with ThreadPoolExecutor(4) as pool:  # a timeout: queued behind slow batches
            busy = [pool.submit(classify, c.url, make_image(s)) for s in range(3)]
            time.sleep(0.3)
            late = infer_binary(c.url, xs[0], params={"timeout": 20_000})
            assert late.status == 504 and all(f.result().status == 200 for f in busy)

        body = xs[0].tobytes()  # a client that goes away while its request is queued
        head = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 224, 224], "datatype": "FP32",
                                       "parameters": {"binary_data_size": len(body)}}]}).encode()  # fmt: skip
        with ThreadPoolExecutor(3) as pool:
            busy = [pool.submit(classify, c.url, make_image(s)) for s in range(3)]
            time.sleep(0.3)
            s = socket.create_connection(("127.0.0.1", c.port))
            s.sendall(b"POST /v2/models/resnet50/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nInference-Header-Content-Length: "
                      + str(len(head)).encode() + f"\r\nContent-Length: {len(head) + len(body)}\r\n\r\n".encode() + head + body)  # fmt: skip
            time.sleep(0.2)
            s.close()
            assert all(f.result().status == 200 for f in busy)

        wait_until(lambda: shm(c)["slabs_in_use"] == 0)  # nothing held once nothing waits
        assert c.get("/v1/workers")["workers"][0]["route"] == "direct"  # every batch went straight there
        pid = c.proc.pid
        stats = shm(c)
        assert len(slabs_on_disk(pid)) * MIN_SLAB <= stats["bytes"]  # every file is one of the pool's
    finally:
        c.stop()
    assert slabs_on_disk(pid) == []  # removed with their front end


def test_a_full_shared_memory_folder_means_bodies_in_memory_not_a_crash(tmp_path, monkeypatch):
    """A container's /dev/shm is often 64 MB: a slab that cannot be reserved is refused
    (the body is read into memory as before), never mapped to die on a write later."""
    pool = ShmPool(8 * MIN_SLAB, tmp_path)

    def no_room(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    assert pool.take(100_000) is None and pool.full and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert pool.take(100_000) is not None  # room again: slabs again
    pool.close()
