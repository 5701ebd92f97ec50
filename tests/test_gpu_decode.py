"""JPEG decoding on the GPU (worker_setup.gpu_decode), as far as a CPU can check it.

The resize-and-crop graph the GPU path runs is checked here on ONNX Runtime's CPU
provider against Pillow, which stays the reference. nvImageCodec itself needs a GPU:
``python -m benchmarks.gpu_check`` runs it (and each worker's start-up self-test checks
it against Pillow before using it). What the batch path does with the GPU decoder's
answers (pixels, or None for what it could not decode, or a failure of the whole call)
is checked with a stand-in decoder, labelled as such."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from core.entries import PIXELS, UINT8
from core.protocol import ImageItem, ItemError
from tests.test_uint8_entry import trivial  # noqa: F401  (the worker's two sessions, on CPU)
from worker_setup.execute import decode_all
from worker_setup.gpu_decode import GpuDecoder, box_feeds, resize_crop_graph
from worker_setup.preprocess import image_pixels


def photo(w: int, h: int, seed: int = 0) -> bytes:
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / 19.0 + c) * np.cos(yy / 13.0 - c) for c in range(3)], -1)
    pixels = np.clip(base + np.random.default_rng(seed).normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("w,h", [(500, 375), (375, 500), (500, 333), (300, 225), (256, 256)])
def test_the_resize_and_crop_graph_matches_pillow_within_one_level(w, h):
    """Pillow decodes the full picture; the graph resizes and crops it as the GPU path
    would (here on ORT's CPU provider); Pillow's own path is the reference."""
    session = ort.InferenceSession(resize_crop_graph(224).SerializeToString(), providers=["CPUExecutionProvider"])
    data = photo(w, h)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    out = session.run(None, {"x": full[None], **box_feeds(w, h, 224)})[0][0]
    diff = np.abs(out.astype(int) - image_pixels(data, 224).astype(int))
    assert out.shape == (224, 224, 3) and diff.max() <= 1 and (diff > 0).mean() < 0.05, (diff.max(), (diff > 0).mean())


def nvimgcodec_installed() -> bool:
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(nvimgcodec_installed(), reason="nvImageCodec is installed: gpu_check measures it on a GPU")
def test_without_nvimagecodec_the_worker_says_why_and_keeps_pillow():
    decoder, why = GpuDecoder.open(224)
    assert decoder is None and ("not installed" in why or "could not start" in why)


class StandInGpuDecoder:
    """Stands in for nvImageCodec (no GPU here): decodes with Pillow, and like
    nvImageCodec answers None for what it cannot decode."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.calls = fail, 0

    def decode(self, blobs):
        self.calls += 1
        if self.fail:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        out = []
        for b in blobs:
            try:
                out.append(image_pixels(b, 224))
            except ValueError:
                out.append(None)
        return out


@pytest.mark.parametrize("fail", [False, True], ids=["decodes", "the call fails"])
def test_a_batch_decodes_in_one_gpu_call_and_pillow_answers_for_the_rest(trivial, fail):  # noqa: F811
    good, broken = photo(500, 375), b"\xff\xd8 not a jpeg"
    items = [ImageItem(np.frombuffer(good, np.uint8), 5), ImageItem(np.frombuffer(broken, np.uint8), 5)]
    trivial.gpu_decoder = stand_in = StandInGpuDecoder(fail)
    try:
        out = decode_all(trivial, items)
    finally:
        trivial.gpu_decoder = None
    assert stand_in.calls == 1  # both images in one call, whatever it answered
    entry, feeds = out[0]
    assert entry == UINT8 and feeds[PIXELS].shape == (1, 224, 224, 3)
    np.testing.assert_array_equal(feeds[PIXELS][0], image_pixels(good, 224))
    assert isinstance(out[1], ItemError) and out[1].status == 400 and "cannot decode image" in out[1].message
