"""A worker serving fp16 converts the cluster's fp32 ResNet-50 once, caches it by SHA-256,
keeps the wire format (float32 in and out), and agrees with fp32 on what it predicts."""

import hashlib
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from scheduler_plugins.builtin_models import ensure_default_model
from worker_setup import precision
from worker_setup.model_cache import cached_path
from worker_setup.precision import (compare_precision, ensure_fp16, model_precision,
                                    reference_images)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fp32():
    path = ensure_default_model()
    return path, _sha(path)


@pytest.fixture(scope="module")
def fp16(fp32, tmp_path_factory):
    """The conversion, run once for the module into a private cache."""
    cache = tmp_path_factory.mktemp("cache")
    path, sha16 = ensure_fp16(fp32[0], fp32[1], cache)
    return path, sha16, cache


def _io(model: onnx.ModelProto) -> list[tuple]:
    def shape(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    return [(v.name, v.type.tensor_type.elem_type, shape(v))
            for v in [*model.graph.input, *model.graph.output]]


def _run(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda batch: sess.run(None, {sess.get_inputs()[0].name: batch})[0]


def test_fp16_model_is_valid_and_keeps_the_float32_interface(fp32, fp16):
    onnx.checker.check_model(str(fp16[0]))
    before, after = onnx.load(str(fp32[0])), onnx.load(str(fp16[0]))
    assert _io(after) == _io(before)
    assert {t for _, t, _ in _io(after)} == {onnx.TensorProto.FLOAT}


def test_fp16_weights_are_half_precision(fp16):
    types = [t.data_type for t in onnx.load(str(fp16[0])).graph.initializer]
    assert types.count(onnx.TensorProto.FLOAT16) > 0.9 * len(types)


def test_cached_under_its_own_sha_with_provenance_in_metadata(fp32, fp16):
    path, sha16, cache = fp16
    assert path == cached_path(cache, sha16) and _sha(path) == sha16
    assert (cache / "models" / f"{fp32[1]}.fp16").read_text() == sha16
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["precision"] == "fp16" and props["converted_from"] == fp32[1]
    assert model_precision(path) == "fp16"
    assert model_precision(fp32[0]) == "fp32"


def test_second_call_reuses_the_cache(fp32, fp16, monkeypatch):
    path, sha16, cache = fp16
    mtime = path.stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("converted again although the fp16 model was cached")

    from onnxconverter_common import float16
    monkeypatch.setattr(float16, "convert_float_to_float16", refuse)
    assert ensure_fp16(fp32[0], fp32[1], cache) == (path, sha16)
    assert path.stat().st_mtime_ns == mtime


def test_corrupt_cache_is_rebuilt_with_identical_bytes(fp32, fp16, tmp_path):
    """Also the determinism check: a rebuild lands on the same SHA as the first build."""
    path, sha16, cache = fp16
    good = path.read_bytes()
    broken = tmp_path / "cache"
    (broken / "models").mkdir(parents=True)
    (broken / "models" / f"{fp32[1]}.fp16").write_text(sha16)
    cached_path(broken, sha16).write_bytes(good[: len(good) // 2])
    rebuilt, sha = ensure_fp16(fp32[0], fp32[1], broken)
    assert sha == sha16 and rebuilt.read_bytes() == good
    assert not [p.name for p in (broken / "models").iterdir() if p.name.startswith(".")]


def test_fp16_agrees_with_fp32_on_cpu(fp32, fp16):
    """ORT's CPU provider casts around the fp16 ops it lacks, so any worker can check this."""
    images = reference_images((3, 224, 224))
    logits = _run(fp32[0])(images)
    report = compare_precision(lambda x: logits, _run(fp16[0]), images)
    print("\nfp16 vs fp32 on", report)
    assert report["images"] == 16
    assert 0 < report["max_abs_logit_diff"] < float("inf")
    assert report["top1_agreement"] >= 0.9
    assert report["top5_agreement"] >= 0.8
    # The random-weight model puts one class first for almost any image, so top-1 says
    # little; its top-5 and logits do vary between images, and fp16 must stay well inside.
    assert len({frozenset(np.argsort(-row)[:5]) for row in logits}) >= 8
    assert report["max_abs_logit_diff"] < 0.05 * np.abs(logits - logits.mean(0)).max()


def test_reference_images_are_deterministic_normalised_and_distinct():
    a, b = reference_images((3, 32, 32), n=4), reference_images((3, 32, 32), n=4)
    assert a.dtype == np.float32 and a.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(a, b)
    assert -2.2 <= a.min() < 0 < a.max() <= 2.7
    assert not np.allclose(a[0], a[1])
    assert not np.array_equal(a, reference_images((3, 32, 32), n=4, seed=1))


def test_identical_runs_compare_as_equal():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 10)).astype(np.float32)
    same = compare_precision(lambda x: logits, lambda x: logits.copy(), np.zeros((6, 3, 4, 4)))
    assert same == {"images": 6, "max_abs_logit_diff": 0.0, "mean_abs_logit_diff": 0.0,
                    "top1_agreement": 1.0, "top5_agreement": 1.0}
    swapped = logits.copy()
    swapped[0, np.argmax(logits[0])] = logits[0].min() - 1  # image 0's winner drops to last
    diff = compare_precision(lambda x: logits, lambda x: swapped, np.zeros((6, 3, 4, 4)))
    assert diff["top1_agreement"] == round(5 / 6, 6) and diff["max_abs_logit_diff"] > 0
    assert diff["top5_agreement"] == round((5 + 4 / 5) / 6, 6)  # the sixth moved up into it


def test_missing_converter_says_how_to_install_it(fp32, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxconverter_common", None)
    with pytest.raises(RuntimeError, match="pip install onnxconverter-common"):
        ensure_fp16(fp32[0], fp32[1], tmp_path)
    assert precision.MISSING_CONVERTER.endswith("onnxconverter-common==1.16.0")
