"""The ``-uint8`` model name: uint8 NHWC pixels in, ImageNet normalisation in the graph
on the worker's device, the classifier's outputs out. ``/v1/classify`` feeds it.

Unit tests run the worker's execute path on real ONNX Runtime sessions; the live ones
go through the default cluster (real scheduler, 2 worker processes, HTTP, tritonclient)
and compare against a direct session on the float path."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as triton

from core.entries import PIXELS, UINT8, uint8_entry
from core.protocol import ImageItem, ItemError, TensorItem
from scheduler_plugins.builtin_models import build_trivial
from tests.conftest import make_image
from tests.http import classify, infer_binary, logits_of, request
from worker_setup.execute import execute_items
from worker_setup.preload import image_layout
from worker_setup.preprocess import image_pixels, image_to_row
from worker_setup.preprocess_graph import ensure_uint8
from worker_setup.session import ModelSession
from worker_setup.worker_model import WorkerModel

ATOL = 1e-3  # the bound on |Δlogit| between the uint8 and the float32 path


# -- which models get the entry (pure) ---------------------------------------------------


def info(inputs: list[dict]) -> dict:
    return {"name": "m", "inputs": inputs, "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 10]}]}


def test_a_float_nchw_image_classifier_gets_a_uint8_twin_that_takes_nhwc_pixels():
    entry = uint8_entry(info([{"name": "x", "dtype": "float32", "shape": [-1, 3, 160, 160]}]))
    assert entry == {"name": "m-uint8", "inputs": [{"name": PIXELS, "dtype": "uint8", "shape": [-1, 160, 160, 3]}],
                     "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 10]}]}  # fmt: skip


@pytest.mark.parametrize("inputs", [
    [{"name": "x", "dtype": "float32", "shape": [-1, 224, 224, 3]}],  # NHWC already
    [{"name": "x", "dtype": "uint8", "shape": [-1, 3, 224, 224]}],  # not float
    [{"name": "x", "dtype": "float32", "shape": [-1, 3, -1, -1]}],  # size unknown
    [{"name": "x", "dtype": "float32", "shape": [-1, 10]}],  # not an image
    [{"name": "a", "dtype": "float32", "shape": [-1, 3, 8, 8]}, {"name": "b", "dtype": "float32", "shape": [-1, 3, 8, 8]}],
], ids=["nhwc", "uint8", "dynamic", "vector", "two-inputs"])  # fmt: skip
def test_other_models_are_served_under_their_own_name_only(inputs):
    assert uint8_entry(info(inputs)) is None


# -- on the worker: real ONNX Runtime, both sessions -----------------------------------------


@pytest.fixture(scope="module")
def trivial(tmp_path_factory) -> WorkerModel:
    """The one-node per-channel mean, served both ways, as a worker preload builds it."""
    tmp = tmp_path_factory.mktemp("u8")
    path = build_trivial(tmp / "trivial.onnx")
    upath = ensure_uint8(path, "trivial-sha", tmp / "cache")
    assert ensure_uint8(path, "trivial-sha", tmp / "cache") == upath  # built once, then cached
    float_session = ModelSession.load(str(path), device="cpu", threads=1, io_binding=True)
    pixels = ModelSession.load(str(upath), device="cpu", threads=1, io_binding=True)
    return WorkerModel(session=float_session, name="t", sha256="x", layout=image_layout(float_session), buckets=(1, 2, 4, 8),
                       pixels=pixels)  # fmt: skip


def tensor_item(x: np.ndarray, name: str, entry: str = "") -> TensorItem:
    return TensorItem(rows=len(x), inputs={name: np.frombuffer(x.tobytes(), np.uint8)}, shapes={name: x.shape},
                      outputs=("logits",), entry=entry)  # fmt: skip


def means(result) -> np.ndarray:
    out = result.outputs["logits"]
    return np.frombuffer(out.data, np.float32).reshape(out.shape)


def test_one_batch_may_carry_both_entries_and_each_item_gets_its_own_rows(trivial):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    floats = np.stack([image_to_row(make_image(s)) for s in (1, 2)])
    items = [tensor_item(pixels[:2], PIXELS, UINT8), tensor_item(floats, "input"), tensor_item(pixels[2:], PIXELS, UINT8),
             ImageItem(np.frombuffer(make_image(9), np.uint8), top_k=2)]  # fmt: skip
    results, timings = execute_items(trivial, items)
    normalised = (pixels / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]  # what the graph must compute
    np.testing.assert_allclose(means(results[0]), normalised[:2].mean(axis=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(means(results[1]), floats.mean(axis=(2, 3)), atol=1e-5)
    np.testing.assert_allclose(means(results[2]), normalised[2:].mean(axis=(1, 2)), atol=1e-5)
    assert len(results[3].indices) == 2  # an image runs as pixels on the uint8 session
    assert timings.rows == 6


def test_pixels_of_the_wrong_size_fail_their_own_item_only(trivial):
    good = np.zeros((1, 224, 224, 3), np.uint8)
    bad = TensorItem(rows=1, inputs={PIXELS: np.zeros(10, np.uint8)}, shapes={PIXELS: (1, 224, 224, 3)}, outputs=("logits",), entry=UINT8)
    results, _ = execute_items(trivial, [bad, tensor_item(good, PIXELS, UINT8)])
    assert isinstance(results[0], ItemError) and results[0].status == 400
    assert means(results[1]).shape == (1, 3)


# -- through the service -------------------------------------------------------------------


def test_metadata_says_exactly_what_each_name_takes(cluster):
    meta = request(cluster.url, "GET", "/v2/models/resnet50-uint8").json()
    assert meta["name"] == "resnet50-uint8"
    assert meta["inputs"] == [{"name": "pixels", "datatype": "UINT8", "shape": [-1, 224, 224, 3]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}]
    assert meta["parameters"]["classifier"] == "resnet50" and "mean and std" in meta["parameters"]["preprocessing"]
    config = request(cluster.url, "GET", "/v2/models/resnet50-uint8/config").json()
    assert config["input"] == [{"name": "pixels", "data_type": "TYPE_UINT8", "dims": [224, 224, 3]}]
    assert request(cluster.url, "GET", "/v2/models/resnet50-uint8/ready").status == 200
    float_meta = request(cluster.url, "GET", "/v2/models/resnet50").json()  # the float32 path stays as it was
    assert float_meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]}]


def test_tritonclient_sends_uint8_pixels_and_gets_the_float_paths_logits(cluster, session):
    images = [make_image(s, size=(500, 375)) for s in range(4)]
    pixels = np.stack([image_pixels(i) for i in images])
    client = triton.InferenceServerClient(cluster.url.removeprefix("http://"))
    inp = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels, binary_data=True)
    result = client.infer("resnet50-uint8", [inp], outputs=[triton.InferRequestedOutput("logits", binary_data=True)])
    assert result.get_response()["model_name"] == "resnet50-uint8"
    reference = session.run(None, {"input": np.stack([image_to_row(i) for i in images])})[0]
    delta = np.abs(result.as_numpy("logits") - reference).max()
    print(f"max |dlogit|, uint8 entry vs the float32 path, 4 images: {delta:.2e}")
    assert delta <= ATOL


def test_float_and_uint8_requests_at_once_each_get_their_own_answers(cluster, session):
    images = [make_image(s) for s in range(8)]
    rows = np.stack([image_to_row(i) for i in images])
    reference = session.run(None, {"input": rows})[0]

    def uint8_call(i: int) -> np.ndarray:
        px = image_pixels(images[i])[None]
        header = json.dumps({"inputs": [{"name": "pixels", "shape": list(px.shape), "datatype": "UINT8",
                                         "parameters": {"binary_data_size": px.nbytes}}],
                             "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()  # fmt: skip
        r = request(cluster.url, "POST", "/v2/models/resnet50-uint8/infer", header + px.tobytes(),
                    {"Inference-Header-Content-Length": str(len(header))})  # fmt: skip
        assert r.status == 200, r.body
        return logits_of(r, 1)[0]

    def float_call(i: int) -> np.ndarray:
        r = infer_binary(cluster.url, rows[i : i + 1])
        assert r.status == 200, r.body
        return logits_of(r, 1)[0]

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda k: (uint8_call if k % 2 else float_call)(k // 2), range(16)))
    for k, logits in enumerate(got):
        np.testing.assert_allclose(logits, reference[k // 2], atol=ATOL)


def test_a_float_tensor_sent_to_the_uint8_name_gets_a_clear_400(cluster):
    x = np.zeros((1, 224, 224, 3), np.float32)
    header = json.dumps({"inputs": [{"name": "pixels", "shape": [1, 224, 224, 3], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()  # fmt: skip
    r = request(cluster.url, "POST", "/v2/models/resnet50-uint8/infer", header + x.tobytes(),
                {"Inference-Header-Content-Length": str(len(header))})  # fmt: skip
    assert r.status == 400 and r.json() == {"error": "input 'pixels': datatype 'FP32' does not match model datatype UINT8"}
    assert request(cluster.url, "GET", "/v2/models/resnet50-uint16").status == 404


def test_classify_runs_on_the_uint8_entry_and_is_counted_under_its_name(cluster, session):
    def successes(name: str) -> int:
        stats = request(cluster.url, "GET", f"/v2/models/{name}/stats").json()["model_stats"]
        return stats[0]["inference_stats"]["success"]["count"]

    before, before_float = successes("resnet50-uint8"), successes("resnet50")
    image = make_image(5)
    r = classify(cluster.url, image, "?top_k=3")
    assert r.status == 200, r.body
    row = image_to_row(image)[None]
    logits = session.run(None, {"input": row})[0][0]
    assert [p["index"] for p in r.json()["predictions"]] == np.argsort(-logits)[:3].tolist()
    assert successes("resnet50-uint8") == before + 1 and successes("resnet50") == before_float
    names = [s["name"] for s in request(cluster.url, "GET", "/v2/models/stats").json()["model_stats"]]
    assert names == ["resnet50", "resnet50-uint8"]
    for w in cluster.get("/v1/workers")["workers"]:  # each worker warmed its uint8 session before it joined
        assert [row["bucket"] for row in w["uint8"]["warmup"]] == [row["bucket"] for row in w["warmup"]]
