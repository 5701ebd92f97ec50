"""Preprocessing in the graph (issue 14, step 1): a classifier that takes uint8 NHWC
pixels computes what the CPU float path computes, on whatever device runs the model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from benchmarks.payloads import make_jpeg
from scheduler_plugins.builtin_models import build_trivial, ensure_default_model
from worker_setup.preprocess import decode, image_to_row
from worker_setup.preprocess_graph import PIXELS, with_preprocessing


def session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def resnet():
    path = str(ensure_default_model())
    merged = with_preprocessing(onnx.load(path))
    onnx.checker.check_model(merged)
    return session(path), session(merged), merged


def test_the_merged_model_takes_uint8_pixels_and_keeps_the_classifiers_outputs(resnet):
    _, _, merged = resnet
    (inp,) = merged.graph.input
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    assert (inp.name, inp.type.tensor_type.elem_type, dims) == (PIXELS, onnx.TensorProto.UINT8, ["N", 224, 224, 3])
    assert [o.name for o in merged.graph.output] == ["logits"]


def test_in_graph_preprocessing_equals_the_cpu_float_path(resnet):
    fp32, uint8, _ = resnet
    jpegs = [make_jpeg(seed=s) for s in range(4)]
    pixels = np.stack([np.asarray(decode(j, 224), dtype=np.uint8) for j in jpegs])
    rows = np.stack([image_to_row(j) for j in jpegs])
    delta = np.abs(uint8.run(None, {PIXELS: pixels})[0] - fp32.run(None, {"input": rows})[0]).max()
    print(f"max |dlogit| over {len(jpegs)} images: {delta:.2e}")
    assert delta <= 1e-3


def test_a_model_whose_input_is_not_a_float_image_is_refused(tmp_path):
    model = onnx.load(str(build_trivial(tmp_path / "t.onnx")))  # float32 [N, 3, 224, 224]: accepted
    assert with_preprocessing(model).graph.input[0].name == PIXELS
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.UINT8
    with pytest.raises(ValueError, match=r"expected a float32 \[N, 3, S, S\] image input"):
        with_preprocessing(model)
