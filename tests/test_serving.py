"""The serving path end to end: real scheduler, 2 real worker processes, real HTTP.

Answers are checked against a direct ONNX Runtime session on the same model file.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as triton

from tests.conftest import make_image
from tests.http import classify, infer_binary, logits_of, request
from worker_setup.execute import top_k
from worker_setup.preprocess import ImageLayout, image_to_row

pytestmark = pytest.mark.integration
ATOL = 1e-3  # batched vs single-row conv kernels differ in float rounding only


def reference_top(session, image: bytes, k: int = 5):
    row = image_to_row(image, ImageLayout())[None]
    idx, prob = top_k(session.run(None, {"input": row})[0][0], k)
    return idx.tolist(), prob


def test_health_metadata_and_config(cluster):
    assert request(cluster.url, "GET", "/v2/health/live").status == 200
    assert request(cluster.url, "GET", "/v2/health/ready").status == 200
    assert request(cluster.url, "GET", "/v2/models/resnet50/ready").status == 200
    server = request(cluster.url, "GET", "/v2").json()
    assert {"binary_tensor_data", "statistics", "model_configuration", "schedule_policy"} <= set(server["extensions"])
    meta = request(cluster.url, "GET", "/v2/models/resnet50").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}]
    assert "meaningless" in json.dumps(meta["parameters"])  # random weights, said plainly
    config = request(cluster.url, "GET", "/v2/models/resnet50/config").json()
    assert config["max_batch_size"] == 32 and "dynamic_batching" in config
    assert config["input"][0]["dims"] == [3, 224, 224]


def test_workers_report_the_providers_onnx_runtime_really_uses(cluster):
    workers = cluster.get("/v1/workers")["workers"]
    assert len(workers) == 2
    for w in workers:
        assert w["device"] == "cpu" and w["providers"] == ["CPUExecutionProvider"]
        assert w["cuda_fallback"] is False
        assert w["route"] == "direct"  # on the front end's host: batches go straight to its listener
        assert w["decoder"] == {"name": "pillow", "device": "cpu", "threads": len(__import__("os").sched_getaffinity(0))}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infer_matches_onnx_runtime(cluster, session, binary):
    client = triton.InferenceServerClient(cluster.url.removeprefix("http://"))
    x = np.random.default_rng(1).standard_normal((3, 3, 224, 224)).astype(np.float32)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = triton.InferRequestedOutput("logits", binary_data=binary)
    result = client.infer("resnet50", [inp], outputs=[out], request_id="r-1")
    assert result.get_response()["id"] == "r-1"
    np.testing.assert_allclose(result.as_numpy("logits"), session.run(None, {"input": x})[0], atol=ATOL)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_classify_image_matches_onnx_runtime(cluster, session, fmt):
    image = make_image(7, fmt)
    r = classify(cluster.url, image, "?top_k=3", ctype=f"image/{fmt.lower()}")
    assert r.status == 200, r.body
    body = r.json()
    idx, prob = reference_top(session, image, 3)
    assert [p["index"] for p in body["predictions"]] == idx
    np.testing.assert_allclose([p["probability"] for p in body["predictions"]], prob, atol=1e-4)
    assert body["model"] == "resnet50" and body["worker"].startswith("local-") and body["batch_size"] >= 1
    assert all(isinstance(p["label"], str) and p["label"] for p in body["predictions"])


def test_classify_multipart_returns_one_result_per_image(cluster, session):
    images = [make_image(s) for s in (1, 2, 3)]
    boundary = "xyzzy"
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="img{i}"; filename="{i}.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode() + img + b"\r\n"
        for i, img in enumerate(images)
    )
    body = parts + f"--{boundary}--\r\n".encode()
    r = request(cluster.url, "POST", "/v1/classify", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status == 200, r.body
    results = r.json()["results"]
    assert [[p["index"] for p in res["predictions"]] for res in results] == [reference_top(session, i)[0] for i in images]


def test_concurrent_requests_batch_together_and_never_mix_rows(cluster, session):
    """Under concurrency every request gets exactly what it would get alone."""
    rng = np.random.default_rng(5)
    inputs = [rng.standard_normal((int(rng.integers(1, 4)), 3, 224, 224)).astype(np.float32) for _ in range(24)]
    before = cluster.stats("resnet50")
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda x: infer_binary(cluster.url, x), inputs))
    after = cluster.stats("resnet50")
    for x, r in zip(inputs, responses):
        assert r.status == 200, r.body
        np.testing.assert_allclose(logits_of(r, len(x)), session.run(None, {"input": x})[0], atol=ATOL)
    rows = after["inference_count"] - before["inference_count"]
    batches = after["execution_count"] - before["execution_count"]
    assert rows == sum(len(x) for x in inputs)
    assert batches < len(inputs), "requests queued behind busy workers should have been batched"


def test_bad_image_in_a_batch_fails_alone(cluster, session):
    good = [make_image(s) for s in range(10, 16)]
    bodies = good[:3] + [b"\xff\xd8\xff not really a jpeg"] + good[3:]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: classify(cluster.url, b), bodies))
    bad = responses.pop(3)
    assert bad.status == 400 and "cannot decode image" in bad.json()["error"]
    for image, r in zip(good, responses):
        assert r.status == 200
        assert [p["index"] for p in r.json()["predictions"]] == reference_top(session, image)[0]


def kserve(url: str, header: dict | str, binary: bytes = b"", model: str = "resnet50"):
    h = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    headers = {"Inference-Header-Content-Length": str(len(h))} if binary else {"Content-Type": "application/json"}
    return request(url, "POST", f"/v2/models/{model}/infer", h + binary, headers)


def one_input(shape=(1, 3, 224, 224), datatype="FP32", **params):
    return {"inputs": [{"name": "input", "shape": list(shape), "datatype": datatype, "parameters": params}]}


@pytest.mark.parametrize(
    "header, binary, message",
    [
        ("{not json", b"", "malformed JSON"),
        (one_input(shape=(1, 3, 224), binary_data_size=602112), bytes(602112), "shape"),
        (one_input(shape=(1, 3, 224, 225), binary_data_size=604800), bytes(604800), "shape"),
        (one_input(datatype="FP64", binary_data_size=1204224), bytes(1204224), "datatype"),
        (one_input(binary_data_size=602112), bytes(602111), "binary_data_size"),
        (one_input(shape=(40, 3, 224, 224), binary_data_size=40 * 602112), bytes(40 * 602112), "max_batch_size"),
    ],
    ids=["malformed-json", "wrong-rank", "wrong-dims", "wrong-dtype", "size-mismatch", "batch-too-big"],
)
def test_bad_infer_requests_get_400_in_protocol_format(cluster, header, binary, message):
    r = kserve(cluster.url, header, binary)
    assert r.status == 400
    assert message in r.json()["error"]


def test_unknown_model_and_endpoint_get_404(cluster):
    r = kserve(cluster.url, one_input(), model="nope")
    assert r.status == 404 and "unknown model" in r.json()["error"]
    assert request(cluster.url, "GET", "/v2/models/nope").status == 404
    assert request(cluster.url, "GET", "/v3/whatever").json()["error"].startswith("no such endpoint")


def test_bad_classify_parameters_get_400(cluster):
    assert classify(cluster.url, make_image(1), "?top_k=0").status == 400
    assert classify(cluster.url, make_image(1), "?top_k=x").status == 400
    assert classify(cluster.url, b"").status == 400
    r = classify(cluster.url, make_image(1), "?priority=9")
    assert r.status == 400 and "priority" in r.json()["error"]
