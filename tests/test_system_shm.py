"""Triton's system shared-memory regions, as tritonclient.utils.shared_memory makes them:
registered, read and written by region and offset, and every bad reference a
ProtocolError (400), never a read outside the region or a crash."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import tritonclient.utils.shared_memory as shm

from router_api.kserve import ProtocolError
from router_api.system_shm import Registry


@pytest.fixture
def region():
    key = f"/br-test-{uuid.uuid4().hex[:8]}"
    handle = shm.create_shared_memory_region("client-side", key, 64)
    shm.set_shared_memory_region(handle, [np.arange(16, dtype=np.float32)])
    yield key
    shm.destroy_shared_memory_region(handle)
    assert not os.path.exists(f"/dev/shm{key}")


def test_a_region_is_read_and_written_by_offset(region):
    r = Registry()
    r.register("in", region, offset=16, byte_size=48)
    assert np.frombuffer(r.read("in", 0, 8), np.float32).tolist() == [4.0, 5.0]
    r.write("in", 8, np.array([-1.0], np.float32).tobytes())
    assert np.frombuffer(open(f"/dev/shm{region}", "rb").read()[24:28], np.float32)[0] == -1.0
    assert r.status() == [{"name": "in", "key": region, "offset": 16, "byte_size": 48}]
    r.unregister("in")
    assert r.status() == []


@pytest.mark.parametrize("call, says", [
    (lambda r, key: r.register("in", key, 0, 8), "already registered"),
    (lambda r, key: r.register("x", "../../etc/passwd", 0, 8), "not a POSIX"),
    (lambda r, key: r.register("x", "/no-such-region-here", 0, 8), "cannot open"),
    (lambda r, key: r.register("x", key, 60, 8), "fewer than"),
    (lambda r, key: r.register("x", key, -1, 8), "non-negative"),
    (lambda r, key: r.read("in", 60, 8), "outside"),
    (lambda r, key: r.read("in", -4, 4), "outside"),
    (lambda r, key: r.read("nope", 0, 4), "no shared memory region"),
    (lambda r, key: r.write("in", 62, b"1234"), "outside"),
])  # fmt: skip
def test_bad_references_are_protocol_errors(region, call, says):
    r = Registry()
    r.register("in", region, 0, 64)
    with pytest.raises(ProtocolError, match=says):
        call(r, region)
    r.close()


def test_a_region_truncated_after_registering_is_refused_not_a_sigbus(region):
    r = Registry()
    r.register("in", region, 0, 64)
    os.truncate(f"/dev/shm{region}", 16)
    with pytest.raises(ProtocolError, match="fewer than"):
        r.read("in", 0, 64)
    assert len(r.read("in", 0, 16)) == 16
    r.close()


# -- against a live cluster, with tritonclient unmodified -----------------------------

from contextlib import contextmanager  # noqa: E402

from tests.test_grpc import MODEL, image, slow  # noqa: E402,F401  (the one-node model's cluster)


@contextmanager
def client_regions(x: np.ndarray, out_bytes: int):
    """A client's input region holding ``x`` and an empty output region, as
    tritonclient.utils.shared_memory makes them; gone from /dev/shm afterwards."""
    keys = [f"/br-in-{uuid.uuid4().hex[:6]}", f"/br-out-{uuid.uuid4().hex[:6]}"]
    h_in, h_out = shm.create_shared_memory_region("in", keys[0], x.nbytes), shm.create_shared_memory_region("out", keys[1], out_bytes)
    try:
        shm.set_shared_memory_region(h_in, [x])
        yield keys, h_out
    finally:
        shm.destroy_shared_memory_region(h_in)
        shm.destroy_shared_memory_region(h_out)
    assert not any(os.path.exists(f"/dev/shm{k}") for k in keys)


@pytest.mark.integration
def test_http_inputs_and_outputs_by_region_give_the_bodys_answer(slow):  # noqa: F811
    import tritonclient.http as httpclient

    from tests.http import infer_binary, logits_of

    client = httpclient.InferenceServerClient(slow.url.removeprefix("http://"))
    x = image(0.75)
    with client_regions(x, 12) as (keys, h_out):
        client.register_system_shared_memory("in", keys[0], x.nbytes)
        client.register_system_shared_memory("out", keys[1], 12)
        assert {r["name"] for r in client.get_system_shared_memory_status()} == {"in", "out"}
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_shared_memory("in", x.nbytes)
        out = httpclient.InferRequestedOutput("logits", binary_data=True)
        out.set_shared_memory("out", 12)
        client.infer(MODEL, [inp], outputs=[out])
        got = shm.get_contents_as_numpy(h_out, np.float32, [1, 3])
        assert np.array_equal(got, logits_of(infer_binary(slow.url, x), 1))  # as if the tensor came in the body
        inp.set_shared_memory("in", x.nbytes, offset=8)  # past the region's end: refused
        with pytest.raises(httpclient.InferenceServerException, match="outside region"):
            client.infer(MODEL, [inp], outputs=[out])
        client.unregister_system_shared_memory()
        assert client.get_system_shared_memory_status() == []
        fds = os.listdir(f"/proc/{slow.proc.pid}/fd")
        assert not any(keys[0][1:] in os.readlink(f"/proc/{slow.proc.pid}/fd/{fd}") for fd in fds if os.path.exists(f"/proc/{slow.proc.pid}/fd/{fd}"))


@pytest.mark.integration
def test_grpc_inputs_and_outputs_by_region_match_http(slow):  # noqa: F811
    import tritonclient.grpc as grpcclient

    from tests.http import infer_binary, logits_of

    client = grpcclient.InferenceServerClient(slow.grpc)
    x = image(0.6)
    with client_regions(x, 12) as (keys, h_out):
        client.register_system_shared_memory("gin", keys[0], x.nbytes)
        client.register_system_shared_memory("gout", keys[1], 12)
        assert set(client.get_system_shared_memory_status().regions) == {"gin", "gout"}
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_shared_memory("gin", x.nbytes)
        out = grpcclient.InferRequestedOutput("logits")
        out.set_shared_memory("gout", 12)
        client.infer(MODEL, [inp], outputs=[out])
        assert np.array_equal(shm.get_contents_as_numpy(h_out, np.float32, [1, 3]), logits_of(infer_binary(slow.url, x), 1))
        inp.set_shared_memory("nope", x.nbytes)
        with pytest.raises(grpcclient.InferenceServerException) as e:
            client.infer(MODEL, [inp], outputs=[out])
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "no shared memory region" in e.value.message()
        client.unregister_system_shared_memory()
        assert len(client.get_system_shared_memory_status().regions) == 0
