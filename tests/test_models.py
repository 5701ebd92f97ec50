"""The models the router serves are built locally: what they look like and how they behave."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from scheduler_plugins.builtin_models import WEIGHTS_KEY, build_resnet50, build_trivial

REPO = Path(__file__).resolve().parents[1]
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)


def normalised_images(n: int, seed: int = 0) -> np.ndarray:
    """Random RGB images in [0, 1], normalised with ImageNet mean/std as clients send them."""
    pixels = np.random.default_rng(seed).random((n, 3, 224, 224), dtype=np.float32)
    return (pixels - MEAN) / STD


def cpu_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ResNet-50 (seed 0) for the whole module: building takes a couple of seconds."""
    return build_resnet50(tmp_path_factory.mktemp("models") / "resnet50.onnx", seed=0)


@pytest.fixture(scope="module")
def resnet50_graph(resnet50: Path) -> onnx.GraphProto:
    return onnx.load(str(resnet50)).graph


def test_resnet50_has_the_imagenet_interface_with_a_symbolic_batch(resnet50: Path) -> None:
    session = cpu_session(resnet50)
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape) == ("input", "tensor(float)", ["N", 3, 224, 224])
    assert (out.name, out.type, out.shape) == ("logits", "tensor(float)", ["N", 1000])


def test_resnet50_gives_finite_image_dependent_logits(resnet50: Path) -> None:
    (logits,) = cpu_session(resnet50).run(None, {"input": normalised_images(2)})
    assert logits.shape == (2, 1000) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    assert 0.1 < np.abs(logits).max() < 100, "weights are scaled to keep logits O(1..10)"
    assert not np.allclose(logits[0], logits[1]), "different images, different logits"


def test_resnet50_says_its_weights_are_random(resnet50: Path) -> None:
    model = onnx.load(str(resnet50), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    assert props[WEIGHTS_KEY] == "random (seed=0): predictions are meaningless"
    assert "random" in model.doc_string
    assert model.opset_import[0].version == 17 and model.ir_version in (8, 9)


def test_resnet50_build_is_deterministic_per_seed(resnet50: Path, tmp_path: Path) -> None:
    again = build_resnet50(tmp_path / "again.onnx", seed=0)
    other = build_resnet50(tmp_path / "other.onnx", seed=1)
    assert again.read_bytes() == resnet50.read_bytes()
    assert other.read_bytes() != resnet50.read_bytes()
    assert not list(tmp_path.glob("*.tmp")), "atomic writes leave no temp files behind"


def test_resnet50_has_resnet50s_parameter_count(resnet50: Path, resnet50_graph: onnx.GraphProto) -> None:
    # 25.56M with BatchNorm; folding BN into conv bias leaves 25.53M.
    params = sum(int(np.prod(t.dims)) for t in resnet50_graph.initializer)
    assert params == pytest.approx(25.5e6, abs=0.1e6)
    assert resnet50.stat().st_size == pytest.approx(98 * 2**20, rel=0.02)


def test_resnet50_is_v1_5_with_batchnorm_folded(resnet50_graph: onnx.GraphProto) -> None:
    ops = {node.op_type for node in resnet50_graph.node}
    assert ops == {"Conv", "Relu", "MaxPool", "Add", "GlobalAveragePool", "Flatten", "Gemm"}

    shapes = {t.name: tuple(t.dims) for t in resnet50_graph.initializer}
    first_block_of_stage2 = {}
    for node in resnet50_graph.node:
        if node.op_type == "Conv" and node.name.startswith("layer2.0."):
            assert len(node.input) == 3, "folded BN leaves a bias on every conv"
            strides = next(a.ints for a in node.attribute if a.name == "strides")
            first_block_of_stage2[node.name] = (shapes[node.input[1]][2:], list(strides))
    # v1.5 downsamples on the 3x3 conv, not the first 1x1 (v1).
    assert first_block_of_stage2["layer2.0.conv1"] == ((1, 1), [1, 1])
    assert first_block_of_stage2["layer2.0.conv2"] == ((3, 3), [2, 2])


def test_trivial_model_is_one_reducemean_returning_channel_means(tmp_path: Path) -> None:
    path = build_trivial(tmp_path / "trivial.onnx")
    assert [node.op_type for node in onnx.load(str(path)).graph.node] == ["ReduceMean"]
    images = normalised_images(3)
    (out,) = cpu_session(path).run(None, {"input": images})
    assert out.shape == (3, 3)
    np.testing.assert_allclose(out, images.mean(axis=(2, 3)), rtol=1e-4, atol=1e-5)


def test_ensure_builds_once_then_reuses_the_cached_file(tmp_path: Path) -> None:
    env = {**os.environ, "DASK_BATCH_ROUTER__WORKER__CACHE_DIR": str(tmp_path)}

    def ensure() -> str:
        cmd = [sys.executable, "-m", "scheduler_plugins.builtin_models", "--ensure"]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              check=True, timeout=120)
        return done.stdout.strip()

    expected = tmp_path / "resnet50-v1.5-random-seed0.onnx"
    assert ensure() == str(expected) and expected.exists()
    os.utime(expected, (1_000_000_000, 1_000_000_000))  # an mtime a rebuild would change
    assert ensure() == str(expected)
    assert expected.stat().st_mtime == 1_000_000_000
