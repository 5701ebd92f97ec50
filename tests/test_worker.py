"""Worker-side logic without Dask: sessions, preprocessing, per-item batch execution."""

from __future__ import annotations

import asyncio
import hashlib
import logging

import msgpack
import numpy as np
import pytest

from core.protocol import BatchReply, ImageItem, Output, TensorItem, Tensors
from scheduler_plugins.builtin_models import build_trivial
from tests.conftest import make_image
from worker_setup.execute import execute_items, top_k
from worker_setup.model_cache import cached_path, ensure_model
from worker_setup.preload import image_layout
from worker_setup.preprocess import ImageError, ImageLayout, image_to_row
from worker_setup.worker_model import WorkerModel
from worker_setup.session import ModelSession


def as_array(data: bytes) -> np.ndarray:
    return np.frombuffer(data, np.uint8)


def tensor_item(x: np.ndarray) -> TensorItem:
    return TensorItem(rows=len(x), inputs={"input": as_array(x.tobytes())}, shapes={"input": x.shape}, outputs=("logits",))


@pytest.fixture(scope="module")
def trivial(tmp_path_factory):
    """One-node model: per-channel mean of an N x 3 x 224 x 224 input."""
    path = build_trivial(tmp_path_factory.mktemp("m") / "trivial.onnx")
    session = ModelSession.load(str(path), device="cpu", threads=1)
    return WorkerModel(session=session, name="trivial", sha256="x", layout=image_layout(session))


def test_session_reports_the_providers_onnx_runtime_uses(trivial):
    s = trivial.session
    assert s.providers == ["CPUExecutionProvider"] and s.device == "cpu" and not s.cuda_fallback
    assert [t.name for t in s.inputs] == ["input"] and s.inputs[0].shape == (-1, 3, 224, 224)


def test_cuda_requested_but_running_on_cpu_is_an_error_not_silence(tmp_path, caplog):
    path = build_trivial(tmp_path / "t.onnx")
    with caplog.at_level(logging.ERROR, logger="worker_setup.session"), pytest.warns(UserWarning, match="not in available provider"):
        s = ModelSession.load(str(path), device="cuda", threads=1)
    assert s.device == "cpu" and s.cuda_fallback
    assert s.requested[0] == "CUDAExecutionProvider"
    assert any("CUDA WAS REQUESTED BUT ONNX RUNTIME IS RUNNING ON CPU" in r.message for r in caplog.records)


def test_image_layout_is_read_from_the_model_input():
    assert ImageLayout.from_shape((-1, 3, 224, 224), "float32").layout == "NCHW"
    nhwc = ImageLayout.from_shape((-1, 299, 299, 3), "uint8")
    assert (nhwc.layout, nhwc.size) == ("NHWC", 299)
    with pytest.raises(ValueError):
        ImageLayout.from_shape((-1, 1000), "float32")


def test_preprocessing_is_resize_crop_and_imagenet_normalisation():
    row = image_to_row(make_image(1, size=(500, 300)), ImageLayout())
    assert row.shape == (3, 224, 224) and row.dtype == np.float32
    assert -2.2 < row.min() < row.max() < 2.7  # (x/255 - mean) / std
    raw = image_to_row(make_image(1, "PNG"), ImageLayout(layout="NHWC", dtype="uint8"))
    assert raw.shape == (224, 224, 3) and raw.dtype == np.uint8


def test_the_lookup_table_gives_exactly_the_normalisation_formula():
    from worker_setup.preprocess import MEAN, STD, decode

    data = make_image(3, size=(320, 240))
    pixels = np.asarray(decode(data, 224), dtype=np.uint8)
    formula = ((pixels.astype(np.float32) * (1 / 255.0) - MEAN) / STD).transpose(2, 0, 1)
    row = image_to_row(data, ImageLayout())
    assert row.flags["C_CONTIGUOUS"] and np.array_equal(row, formula)
    nhwc = image_to_row(data, ImageLayout(layout="NHWC"))  # the other layout keeps the formula itself
    assert np.array_equal(nhwc, formula.transpose(1, 2, 0))


def test_undecodable_bytes_raise_image_error():
    with pytest.raises(ImageError, match="cannot decode image"):
        image_to_row(b"GIF89a but not really", ImageLayout())


def test_top_k_is_sorted_softmax():
    idx, prob = top_k(np.array([1.0, 3.0, 2.0, 0.0], np.float32), 3)
    assert idx.tolist() == [1, 2, 0]
    e = np.exp([3.0, 2.0, 1.0]) / np.exp([1.0, 3.0, 2.0, 0.0]).sum()
    np.testing.assert_allclose(prob, e, rtol=1e-6)


def test_a_batch_gives_each_item_exactly_its_rows_and_bad_items_fail_alone(trivial):
    x = np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32)
    items = [
        tensor_item(x[:2]),
        ImageItem(as_array(b"not an image"), top_k=2),
        ImageItem(as_array(make_image(4)), top_k=2),
        tensor_item(x[2:]),
    ]
    results, timings = execute_items(trivial, items)
    assert timings.rows == 4  # the bad image took no row
    first = results[0].outputs["logits"]
    np.testing.assert_allclose(np.frombuffer(first.data, first.dtype).reshape(first.shape), x[:2].mean(axis=(2, 3)), atol=1e-6)
    assert "cannot decode image" in results[1].message and results[1].status == 400
    expected = image_to_row(make_image(4), trivial.layout).mean(axis=(1, 2))
    assert results[2].indices == top_k(expected, 2)[0].tolist()
    last = results[3].outputs["logits"]
    np.testing.assert_allclose(np.frombuffer(last.data, np.float32), x[2:].mean(axis=(2, 3)).ravel(), atol=1e-6)


def test_a_reply_survives_the_wire_with_each_tensor_packed_once(trivial):
    """The reply travels as a Dask event, plain msgpack that Dask checks before sending;
    each output is packed once, by the reply: its bytes for an event, or, on the direct
    lane, a frame of its own (Dask's ``to_serialize``), not packed by us at all."""
    from distributed.protocol import to_serialize
    from distributed.protocol.serialize import Serialize, _is_dumpable

    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    results, timings = execute_items(trivial, [tensor_item(x), ImageItem(as_array(make_image(2)), top_k=3)])
    assert isinstance(results[0].outputs["logits"].data, np.ndarray)  # a view of the batch's outputs until the reply
    reply = BatchReply("b-1", "tcp://w", results, timings)
    assert _is_dumpable(reply.to_wire())
    small = reply.to_wire(to_serialize)["results"][0][1]["logits"][2]
    assert isinstance(small, bytes)  # 24 bytes: a copy costs less than a frame
    big = np.zeros((64, 1000), np.float32)
    large = BatchReply("b-2", "tcp://w", [Tensors({"logits": Output("<f4", big.shape, big)})], timings)
    framed = large.to_wire(to_serialize)["results"][0][1]["logits"][2]
    assert isinstance(framed, Serialize) and framed.data is big  # 256 KB: sent as it is
    back = BatchReply.from_wire(msgpack.unpackb(msgpack.packb(reply.to_wire())))
    assert back.timings == timings and back.results[1] == results[1]
    out = back.results[0].outputs["logits"]
    assert bytes(out.data) == bytes(results[0].outputs["logits"].data) and out.shape == (2, 3)
    with pytest.raises(ValueError, match="malformed batch reply"):
        BatchReply.from_wire({"id": "b-1", "results": [["nonsense"]]})


class FakeScheduler:
    """Serves model chunks the way the scheduler plugin's RPC does."""

    def __init__(self, data: bytes, chunk: int = 1000):
        self.data, self.chunk, self.calls = data, chunk, 0

    async def batch_router_model_chunk(self, offset: int, name: str) -> bytes:
        assert name == "m"  # the model whose chunks these are
        self.calls += 1
        return self.data[offset : offset + self.chunk]


def test_model_is_fetched_in_chunks_verified_and_cached(tmp_path):
    data = bytes(range(256)) * 20
    info = {"name": "m", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    rpc = FakeScheduler(data)
    path = asyncio.run(ensure_model(rpc, info, tmp_path))
    assert path == cached_path(tmp_path, info["sha256"]) and path.read_bytes() == data
    assert rpc.calls == 6
    asyncio.run(ensure_model(rpc, info, tmp_path))
    assert rpc.calls == 6  # cached: not fetched again


def test_corrupt_cache_is_fetched_again_and_a_wrong_download_is_refused(tmp_path):
    data = b"model bytes" * 100
    info = {"name": "m", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    cached_path(tmp_path, info["sha256"]).parent.mkdir(parents=True)
    cached_path(tmp_path, info["sha256"]).write_bytes(b"corrupt")
    assert asyncio.run(ensure_model(FakeScheduler(data), info, tmp_path)).read_bytes() == data
    other = {"name": "m", "sha256": "0" * 64, "size": len(data)}
    with pytest.raises(IOError, match="does not match"):
        asyncio.run(ensure_model(FakeScheduler(data), other, tmp_path))
    assert not cached_path(tmp_path, "0" * 64).exists()
    assert not list((tmp_path / "models").glob(".fetch-*"))  # no half-written files left


def test_a_decompression_bomb_fails_alone_as_a_client_error(trivial, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 320x240 image is now a "bomb"
    results, _ = execute_items(trivial, [ImageItem(as_array(make_image(1)), top_k=1)])
    assert results[0].status == 413 and "too large" in results[0].message  # too large: 413, as at the door


def test_rows_of_different_shapes_run_as_separate_groups(tmp_path):
    """A model with variable spatial dims: requests of different sizes share a batch
    task but not a tensor, and each still gets exactly its rows."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["logits"], axes=[2, 3], keepdims=0)],
        "var",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
    )
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model_proto.ir_version = 8
    onnx.save(model_proto, str(tmp_path / "var.onnx"))
    session = ModelSession.load(str(tmp_path / "var.onnx"), device="cpu", threads=1)
    model = WorkerModel(session=session, name="var", sha256="x", layout=None)
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(s).astype(np.float32) for s in [(1, 3, 8, 8), (2, 3, 5, 7), (1, 3, 8, 8)]]
    results, timings = execute_items(model, [tensor_item(x) for x in xs])
    assert timings.rows == 4
    for x, r in zip(xs, results):
        out = r.outputs["logits"]
        np.testing.assert_allclose(np.frombuffer(out.data, np.float32).reshape(out.shape), x.mean(axis=(2, 3)), atol=1e-6)
