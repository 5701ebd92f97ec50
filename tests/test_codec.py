"""Tensor compression for far workers: only where it pays, and always exact."""

import numpy as np
import pytest

from benchmarks.payloads import make_jpeg
from core.codec import pack_item, pays, unpack_input
from core.protocol import ImageItem, TensorItem
from worker_setup.preprocess import ImageLayout, image_to_row


def tensor_item(x: np.ndarray) -> TensorItem:
    return TensorItem(rows=1, inputs={"input": np.frombuffer(x.tobytes(), np.uint8)}, shapes={"input": x.shape},
                      outputs=("logits",))  # fmt: skip


def test_image_derived_tensor_shrinks_and_comes_back_exactly():
    x = image_to_row(make_jpeg(), ImageLayout())[None].astype(np.float32)  # 602 KB
    item = tensor_item(x)
    packed = pack_item(item)
    assert packed.codecs == {"input": "zlib"}
    assert packed.inputs["input"].nbytes < 0.5 * x.nbytes
    back = np.frombuffer(unpack_input(packed, "input"), np.float32).reshape(x.shape)
    assert np.array_equal(back, x)
    assert item.codecs == {}  # the original stays raw for near workers


def test_random_tensor_is_sent_as_it_is():
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    assert not pays(x)
    item = tensor_item(x)
    assert pack_item(item) is item


def test_small_tensors_and_images_are_left_alone():
    assert not pays(np.zeros(1000, np.uint8))
    image = ImageItem(np.frombuffer(make_jpeg(), np.uint8), top_k=5)
    assert pack_item(image) is image


def test_unknown_codec_is_an_error():
    with pytest.raises(ValueError, match="unknown codec"):
        unpack_input(TensorItem(1, {"x": np.frombuffer(b"abc", np.uint8)}, {"x": (3,)}, ("y",), {"x": "brotli"}), "x")
