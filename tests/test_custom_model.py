"""`--model PATH` serves any ONNX image classifier: names, shapes, layout and dtype come
from the file. Here: NHWC uint8 input named "image" with a fixed batch of 1, 10 classes
named "scores"."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.cluster import Cluster
from tests.conftest import ARTIFACTS, make_image
from tests.http import classify, request
from worker_setup.preprocess import ImageLayout, image_to_row

pytestmark = pytest.mark.integration
W = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)


def build_nhwc_classifier(path):
    """image (1,32,32,3) uint8 -> mean colour per channel -> linear -> scores (1,10)."""
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["f"], ["m"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["m", "W"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "nhwc",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [1, 32, 32, 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(W, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    d = tmp_path_factory.mktemp("custom")
    build_nhwc_classifier(d / "colours.onnx")
    (d / "labels.txt").write_text("\n".join(f"colour-{i}" for i in range(10)) + "\n")
    c = Cluster(workers=1, args=["--model", str(d / "colours.onnx"), "--labels", str(d / "labels.txt")], log=ARTIFACTS / "custom.log")
    ARTIFACTS.mkdir(exist_ok=True)
    yield c.start()
    c.stop()


def test_metadata_comes_from_the_model_file(custom):
    meta = request(custom.url, "GET", "/v2/models/colours").json()
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 3]}]
    assert meta["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [1, 10]}]
    assert request(custom.url, "GET", "/v2/models/colours/config").json()["max_batch_size"] == 1
    assert request(custom.url, "GET", "/v2/models/resnet50").status == 404


def test_images_are_preprocessed_into_the_models_layout(custom):
    image = make_image(9)
    r = classify(custom.url, image, "?top_k=10")
    assert r.status == 200, r.body
    row = image_to_row(image, ImageLayout(layout="NHWC", size=32, dtype="uint8"))
    scores = row.reshape(-1, 3).astype(np.float32).mean(axis=0) @ W
    expected = np.argsort(-scores)
    preds = r.json()["predictions"]
    assert [p["index"] for p in preds] == expected.tolist()
    assert [p["label"] for p in preds] == [f"colour-{i}" for i in expected]


def test_a_fixed_batch_dimension_caps_every_batch(custom):
    """Concurrent requests would batch together; this model only takes one row a run."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda s: classify(custom.url, make_image(s)), range(8)))
    assert [r.status for r in responses] == [200] * 8
    assert all(r.json()["batch_size"] == 1 for r in responses)
    # Its one bucket is its batch dimension: warmed, and the only shape it is run at.
    (worker,) = custom.get("/v1/workers")["workers"]
    assert worker["buckets"] == [1] and [w["bucket"] for w in worker["warmup"]] == [1]
    config = request(custom.url, "GET", "/v2/models/colours/config").json()
    assert config["dynamic_batching"]["preferred_batch_size"] == [1]
