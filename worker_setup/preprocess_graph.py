"""Image preprocessing as ONNX nodes, merged ahead of a classifier: the ``-uint8`` entry.

A float32 NCHW row is 602 KB; the uint8 NHWC pixels a decoder produces are 150 KB. A
model that takes the pixels and does the cast, scaling, ImageNet normalisation and
transpose itself moves 4x fewer bytes and runs that arithmetic on the model's device.
The nodes compute exactly what ``worker_setup.preprocess.image_to_row`` does on the CPU
(``(pixels / 255 - mean) / std``, channels first), and ``onnx.compose.merge_models``
joins them to the classifier, so the classifier itself is untouched. Each worker builds
it from the model it runs (fp16 included: that keeps float32 inputs) and caches it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from core.entries import PIXELS
from worker_setup.model_cache import derived_model
from worker_setup.preprocess import MEAN, STD

logger = logging.getLogger("worker_setup.preprocess_graph")


def preprocessing_graph(size: int, output: str, batch: int | str = "N") -> onnx.GraphProto:
    """uint8 [N, size, size, 3] -> float32 [N, 3, size, size], normalised."""
    scale = numpy_helper.from_array((1 / (255.0 * STD)).astype(np.float32).reshape(1, 3, 1, 1), "pre_scale")
    shift = numpy_helper.from_array((MEAN / STD).astype(np.float32).reshape(1, 3, 1, 1), "pre_shift")
    nodes = [
        helper.make_node("Cast", [PIXELS], ["pre_float"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["pre_float"], ["pre_nchw"], perm=[0, 3, 1, 2]),
        # x / 255 / std - mean / std: one multiply and one subtract a value
        helper.make_node("Mul", ["pre_nchw", "pre_scale"], ["pre_scaled"]),
        helper.make_node("Sub", ["pre_scaled", "pre_shift"], [output]),
    ]
    graph = helper.make_graph(
        nodes,
        "image-preprocessing",
        [helper.make_tensor_value_info(PIXELS, TensorProto.UINT8, [batch, size, size, 3])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, 3, size, size])],
        [scale, shift],
    )
    return graph


def with_preprocessing(classifier: onnx.ModelProto) -> onnx.ModelProto:
    """The classifier behind the preprocessing nodes: input uint8 NHWC pixels, outputs
    unchanged. Its input must be float32 [N, 3, S, S]."""
    inp = classifier.graph.input[0]
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    if inp.type.tensor_type.elem_type != TensorProto.FLOAT or len(dims) != 4 or dims[1] != 3 or dims[2] != dims[3] or dims[2] <= 0:
        raise ValueError(f"{inp.name}: expected a float32 [N, 3, S, S] image input")
    pre_graph = preprocessing_graph(dims[2], "pre_out", dims[0] or "N")  # a fixed batch stays fixed
    opsets = {o.domain: o.version for o in classifier.opset_import}
    pre = helper.make_model(pre_graph, opset_imports=[helper.make_opsetid("", opsets.get("", 17))])
    pre.ir_version = classifier.ir_version
    # Node and tensor names start "pre_"; merge_models refuses any overlap with the classifier's.
    return compose.merge_models(pre, classifier, io_map=[("pre_out", inp.name)])


def ensure_uint8(path: Path, sha256: str, cache_dir: Path) -> Path:
    """The cached uint8 entry of the model at ``path`` (whose hash is ``sha256``),
    merged on first use."""
    start = time.perf_counter()

    def merge() -> bytes:
        return with_preprocessing(onnx.load(str(path))).SerializeToString(deterministic=True)

    out, sha, built = derived_model(cache_dir, sha256, "uint8", merge)
    if built:
        logger.info("merged preprocessing ahead of model %s: %s in %.1f s", sha256[:12], sha[:12], time.perf_counter() - start)
    return out
