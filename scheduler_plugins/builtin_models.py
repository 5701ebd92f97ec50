"""The models batch-router builds itself: the default ResNet-50, and a one-node model
for measuring the router's own overhead. The scheduler serves the default when no model
is given, building it into the cache on first use.

A real ResNet-50 checkpoint would need a download (or torch) on every machine; the router
only needs a model with ResNet-50's shapes and cost, so we write one with random weights
using the ``onnx`` helper API. BatchNorm is already folded into the convolutions (as an
exported inference graph would have it), and the graph follows ResNet-50 v1.5: the
downsampling stride sits on the 3x3 conv of each stage's first bottleneck.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # onnxruntime>=1.17 loads IR <= 9; opset 17 needs IR >= 8
INPUT, OUTPUT = "input", "logits"
NUM_CLASSES = 1000
STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))  # (bottleneck width, blocks)
EXPANSION = 4
RESIDUAL_SCALE = 0.15  # shrinks each branch's last conv so activations stay O(1) without BN
DEFAULT_NAME = "resnet50-v1.5-random-seed0.onnx"
TRIVIAL_NAME = "trivial-reducemean.onnx"
WEIGHTS_KEY = "gpu_batch_router.weights"


class _Graph:
    """Collects nodes and initializers while the network is laid out."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def param(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def conv(self, x: str, name: str, cin: int, cout: int, k: int, stride: int = 1,
             relu: bool = True, scale: float = 1.0) -> str:
        """Conv (BN folded in: weight + bias), He-normal, optionally followed by Relu."""
        std = np.float32(scale * np.sqrt(2.0 / (cin * k * k)))
        w = self.rng.standard_normal((cout, cin, k, k), dtype=np.float32) * std
        b = self.rng.standard_normal(cout, dtype=np.float32) * np.float32(0.01)
        out = f"{name}_out"
        self.nodes.append(helper.make_node(
            "Conv", [x, self.param(f"{name}.weight", w), self.param(f"{name}.bias", b)],
            [out], name=name, kernel_shape=[k, k], strides=[stride, stride],
            pads=[k // 2] * 4))
        return self.op("Relu", [out], f"{name}_relu") if relu else out

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name


def _bottleneck(g: _Graph, x: str, name: str, cin: int, width: int, stride: int) -> str:
    cout = width * EXPANSION
    y = g.conv(x, f"{name}.conv1", cin, width, 1)
    y = g.conv(y, f"{name}.conv2", width, width, 3, stride)  # v1.5: stride on the 3x3
    y = g.conv(y, f"{name}.conv3", width, cout, 1, relu=False, scale=RESIDUAL_SCALE)
    if stride != 1 or cin != cout:
        x = g.conv(x, f"{name}.downsample", cin, cout, 1, stride, relu=False)
    return g.op("Relu", [g.op("Add", [y, x], f"{name}_add")], f"{name}_relu")


def _model(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="gpu-batch-router", doc_string=doc)
    model.ir_version = IR_VERSION
    return model


def _io(channels_out: int) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    return (helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 3, 224, 224]),
            helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", channels_out]))


def _save_atomic(model: onnx.ModelProto, path: Path) -> Path:
    """Write via a temp file in the same directory, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the cache from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def build_resnet50(path: Path, seed: int = 0) -> Path:
    """ResNet-50 v1.5 with deterministic random weights (25.5M params, ~98 MiB)."""
    g = _Graph(np.random.default_rng(seed))
    x = g.conv(INPUT, "conv1", 3, 64, 7, 2)
    x = g.op("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    cin = 64
    for stage, (width, blocks) in enumerate(STAGES, start=1):
        for block in range(blocks):
            stride = 2 if stage > 1 and block == 0 else 1
            x = _bottleneck(g, x, f"layer{stage}.{block}", cin, width, stride)
            cin = width * EXPANSION
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x], "avgpool")], "flatten", axis=1)
    # Scaled so logits for ImageNet-normalised images land around O(1..10).
    fc_w = g.rng.standard_normal((NUM_CLASSES, cin), dtype=np.float32) * np.float32(0.02)
    fc_b = np.zeros(NUM_CLASSES, dtype=np.float32)
    g.nodes.append(helper.make_node(
        "Gemm", [x, g.param("fc.weight", fc_w), g.param("fc.bias", fc_b)], [OUTPUT],
        name="fc", transB=1))
    inp, out = _io(NUM_CLASSES)
    graph = helper.make_graph(g.nodes, "resnet50_v1_5", [inp], [out], initializer=g.inits)
    note = f"random (seed={seed}): predictions are meaningless"
    model = _model(graph, f"ResNet-50 v1.5, weights {note}; for load and latency tests only")
    helper.set_model_props(model, {WEIGHTS_KEY: note})
    return _save_atomic(model, path)


def build_trivial(path: Path) -> Path:
    """One ReduceMean node: the router's own overhead, with almost no compute behind it."""
    inp, out = _io(3)
    node = helper.make_node("ReduceMean", [INPUT], [OUTPUT], name="mean",
                            axes=[2, 3], keepdims=0)  # axes is an attribute up to opset 17
    graph = helper.make_graph([node], "trivial_reducemean", [inp], [out])
    return _save_atomic(_model(graph, "Per-channel mean; for measuring router overhead"), path)


def default_model_path() -> Path:
    """Where the default model lives: the model cache of ``batch-router.worker.cache-dir``."""
    import dask.config

    from core.config import cache_dir, parse

    return cache_dir(parse(dask.config.get("batch-router", None))) / DEFAULT_NAME


def ensure_default_model() -> Path:
    """Build the default ResNet-50 into the cache unless it is already there."""
    path = default_model_path()
    return path if path.exists() else build_resnet50(path, seed=0)


def default_name(path: str | Path) -> str:
    """Like a Triton model repository: a model is named after its file, except ours."""
    return "resnet50" if Path(path).resolve() == default_model_path().resolve() else Path(path).stem


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scheduler_plugins.builtin_models",
                                     description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--ensure", action="store_true",
                       help="build the default model into the cache if missing; print its path")
    group.add_argument("--out", type=Path, help="build a model to this path")
    parser.add_argument("--trivial", action="store_true",
                        help="with --out: the one-node ReduceMean model instead of ResNet-50")
    parser.add_argument("--seed", type=int, default=0, help="with --out: weight seed")
    args = parser.parse_args(argv)
    if args.ensure:
        print(ensure_default_model())
    elif args.trivial:
        print(build_trivial(args.out))
    else:
        print(build_resnet50(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
