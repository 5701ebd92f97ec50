"""KServe v2 gRPC against a live cluster, with tritonclient.grpc unmodified: the same
answers as HTTP, streams, metadata, every error code, and a cancelled call.

The cluster serves the one-node model (its output is each channel's mean, so every
answer can be checked), one row per batch, 200 ms a batch on one worker: slow enough to
hold a queue, fill it, and let a timeout pass in it."""

from __future__ import annotations

import queue
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from scheduler_plugins.builtin_models import build_trivial
from tests.cluster import Cluster, free_port
from tests.conftest import ARTIFACTS
from tests.http import infer_binary, logits_of

pytestmark = pytest.mark.integration
MODEL = "resnet50"


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    model = build_trivial(tmp_path_factory.mktemp("grpc") / "trivial.onnx")
    grpc_port = free_port()
    env = {"DASK_BATCH_ROUTER__WORKER__BATCH_TIME": "200ms", "DASK_BATCH_ROUTER__MAX_QUEUE_SIZE": "3",
           "DASK_BATCH_ROUTER__HTTP__MAX_BODY_SIZE": "1MiB", "DASK_BATCH_ROUTER__GRPC__PORT": str(grpc_port)}  # fmt: skip
    c = Cluster(workers=1, args=["--threads", "1", "--model", str(model), "--model-name", MODEL, "--max-batch-size", "1",
                                 "--window", "1"], env={**env, "DASK_BATCH_ROUTER__MAX_WINDOW": "1"}, log=ARTIFACTS / "grpc.log").start()  # fmt: skip
    c.grpc = f"127.0.0.1:{grpc_port}"
    yield c
    c.stop()


def image(value: float) -> np.ndarray:
    x = np.full((1, 3, 224, 224), value, np.float32)
    x[0, 1] += 1.0
    return x


def request_of(x: np.ndarray) -> list:
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def code_of(e: InferenceServerException) -> str:
    return e.status()


def test_infer_answers_as_http_does(slow):
    client = grpcclient.InferenceServerClient(slow.grpc)
    x = image(0.25)
    got = client.infer(MODEL, request_of(x), request_id="r-1")
    assert got.get_response().id == "r-1"
    logits = got.as_numpy("logits")
    np.testing.assert_allclose(logits, x.mean(axis=(2, 3)), atol=1e-4)
    r = infer_binary(slow.url, x)
    assert r.status == 200 and np.array_equal(logits_of(r, 1), logits)


def test_metadata_config_statistics_and_health(slow):
    client = grpcclient.InferenceServerClient(slow.grpc)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert client.get_server_metadata().name == "gpu-batch-router"
    meta = client.get_model_metadata(MODEL)
    assert (meta.inputs[0].name, meta.inputs[0].datatype, list(meta.inputs[0].shape)) == ("input", "FP32", [-1, 3, 224, 224])
    config = client.get_model_config(MODEL).config
    assert config.max_batch_size == 1 and config.dynamic_batching.default_queue_policy.max_queue_size == 3
    client.infer(MODEL, request_of(image(0.5)))
    stats = client.get_inference_statistics(MODEL).model_stats[0]
    assert stats.name == MODEL and stats.inference_stats.success.count >= 1
    assert {s.name for s in client.get_inference_statistics().model_stats} == {MODEL, f"{MODEL}-uint8"}


def test_a_stream_answers_many_requests_in_flight_each_with_its_id(slow):
    client = grpcclient.InferenceServerClient(slow.grpc)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    values = {f"s-{i}": 0.1 * i for i in range(3)}
    for rid, v in values.items():
        client.async_stream_infer(MODEL, request_of(image(v)), request_id=rid)
    got = {}
    for _ in values:
        result, error = answers.get(timeout=30)
        assert error is None, error
        got[result.get_response().id] = result.as_numpy("logits")
    client.stop_stream()
    assert set(got) == set(values)
    for rid, v in values.items():
        np.testing.assert_allclose(got[rid], image(v).mean(axis=(2, 3)), atol=1e-4)  # float32 sums of 50,176 values


@pytest.mark.parametrize("what, code", [
    ("bad shape", "StatusCode.INVALID_ARGUMENT"),
    ("unknown model", "StatusCode.NOT_FOUND"),
    ("too large", "StatusCode.RESOURCE_EXHAUSTED"),
])  # fmt: skip
def test_mistakes_get_the_protocols_codes(slow, what, code):
    client = grpcclient.InferenceServerClient(slow.grpc)
    inputs = {"bad shape": request_of(np.zeros((1, 3, 224, 223), np.float32)), "unknown model": request_of(image(0)),
              "too large": request_of(np.zeros((2, 3, 224, 224), np.float32))}[what]  # fmt: skip
    with pytest.raises(InferenceServerException) as e:
        client.infer("nope" if what == "unknown model" else MODEL, inputs)
    assert code_of(e.value) == code, e.value


def test_a_full_queue_is_unavailable_and_a_passed_timeout_is_deadline_exceeded(slow):
    client = grpcclient.InferenceServerClient(slow.grpc)
    results: queue.Queue = queue.Queue()
    for i in range(8):  # one batch at a time, 200 ms each: three may wait, the rest are refused
        client.async_infer(MODEL, request_of(image(i)), callback=lambda result, error: results.put(error))
    errors = [results.get(timeout=30) for _ in range(8)]
    assert {code_of(e) for e in errors if e is not None} == {"StatusCode.UNAVAILABLE"}
    assert sum(e is None for e in errors) >= 2
    client.async_infer(MODEL, request_of(image(1)), callback=lambda result, error: None)  # holds the worker 200 ms
    with pytest.raises(InferenceServerException) as e:
        client.infer(MODEL, request_of(image(2)), timeout=1000)  # 1 ms, in the queue
    assert code_of(e.value) == "StatusCode.DEADLINE_EXCEEDED"


def test_a_cancelled_call_leaves_the_queue(slow):
    client = grpcclient.InferenceServerClient(slow.grpc)
    time.sleep(0.5)  # what earlier tests left on the worker is done
    before = client.get_inference_statistics(MODEL).model_stats[0]
    client.async_infer(MODEL, request_of(image(3)), callback=lambda result, error: None)  # on the worker for 200 ms
    call = client.async_infer(MODEL, request_of(image(4)), callback=lambda result, error: None)  # queued behind it
    time.sleep(0.05)
    call.cancel()
    time.sleep(1.0)
    after = client.get_inference_statistics(MODEL).model_stats[0]
    assert after.inference_stats.success.count - before.inference_stats.success.count == 1  # the cancelled one never ran
    assert slow.stats(MODEL)["rejected"].get("cancelled", 0) >= 1


@pytest.mark.parametrize("protocol", ["grpc", "grpc-stream", "http-shm"])
def test_the_load_test_speaks_grpc_and_shared_memory_beside_http(slow, tmp_path, protocol):
    import json

    from benchmarks import loadtest

    out = tmp_path / "grpc.json"
    rc = loadtest.main(["--url", slow.url, "--grpc-target", slow.grpc, "--mode", "infer", "--model", MODEL, "--protocol", protocol,
                        "--concurrency", "2", "--duration", "1s", "--warmup", "0.2s", "--baseline-http", "--quiet",
                        "--json", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert rc == 0 and result["router"]["ok"] >= 2 and result["baseline_http"]["ok"] >= 2
    assert result["router"]["error_count"] == 0 and result["router"]["mean_batch"] == 1.0
    assert result["ratios"]["router_over_http_req"] > 0
