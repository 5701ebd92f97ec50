"""JPEG decoding on the GPU: NVIDIA nvImageCodec decodes, ONNX Runtime resizes and crops.

A CPU decodes a 500x375 JPEG to 224x224 in 1-3 ms a core, so Colab's two vCPUs cap a T4
far below its fp16 rate. On a CUDA worker with nvImageCodec installed (the ``gpu``
extra), a batch's JPEGs are decoded on the GPU in one call (nvJPEG, with its hardware
decoder where the GPU has one) and each is resized and centre-cropped there by a small
ONNX graph (``Resize`` with antialiasing, as Pillow's bilinear reduction does), bound to
the decoded image's device memory. Only the 224x224 pixels come back to the host, where
the batch is stacked as before.

Pillow stays the reference: at start-up the worker decodes a test picture both ways
and uses the GPU only if they agree (``SELF_TEST_MAX``); anything nvImageCodec cannot
decode (a corrupt file, a PNG) goes to Pillow, which answers as it always has. Without
nvImageCodec, or on a CPU worker, the decoder is Pillow on a pool of the worker's cores,
and ``/v1/workers`` says which one runs and why.
"""

from __future__ import annotations

import io
import logging
import threading

import numpy as np
import onnx
from onnx import TensorProto, helper

from worker_setup.preprocess import image_pixels, resize_box

logger = logging.getLogger("worker_setup.gpu_decode")

# Largest per-pixel difference from Pillow that the self-test accepts: the resize
# matches Pillow's within 1 (measured on ORT's CPU provider); JPEG decoders may round
# their IDCT and upsampling differently by a few levels.
SELF_TEST_MAX, SELF_TEST_MEAN = 6, 1.0


MAX_ASPECT = 8  # longer strips go to Pillow, which resizes only the crop (preprocess.decode)


def resize_crop_graph(size: int) -> onnx.ModelProto:
    """uint8 [1, H, W, 3] -> uint8 [1, size, size, 3]: resized to ``sizes`` (antialiased
    linear, half-pixel, as Pillow's BILINEAR), then cropped to [starts, ends) in H, W."""
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.UINT8, [1, "h", "w", 3]),
        helper.make_tensor_value_info("sizes", TensorProto.INT64, [4]),
        helper.make_tensor_value_info("starts", TensorProto.INT64, [2]),
        helper.make_tensor_value_info("ends", TensorProto.INT64, [2]),
    ]
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    nodes = [
        helper.make_node("Transpose", ["x"], ["nchw"], perm=[0, 3, 1, 2]),  # CUDA's antialiased resize wants NCHW
        helper.make_node("Resize", ["nchw", "", "", "sizes"], ["resized"], mode="linear", antialias=1, exclude_outside=1,
                         coordinate_transformation_mode="half_pixel"),  # fmt: skip
        helper.make_node("Slice", ["resized", "starts", "ends", "axes"], ["cropped"]),
        helper.make_node("Transpose", ["cropped"], ["y"], perm=[0, 2, 3, 1]),
    ]
    output = helper.make_tensor_value_info("y", TensorProto.UINT8, [1, size, size, 3])
    graph = helper.make_graph(nodes, "resize-crop", inputs, [output], initializer=[axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def box_feeds(w: int, h: int, size: int) -> dict[str, np.ndarray]:
    """The graph's size and crop inputs for one w x h image (``preprocess.resize_box``)."""
    nw, nh, left, top = resize_box(w, h, size)
    return {"sizes": np.array([1, 3, nh, nw], np.int64), "starts": np.array([top, left], np.int64),
            "ends": np.array([top + size, left + size], np.int64)}  # fmt: skip


class GpuDecoder:
    """One per worker; the task threads take turns (one decode call a batch)."""

    def __init__(self, decoder, params, session, size: int, version: str) -> None:
        self.decoder, self.params, self.session, self.size, self.version = decoder, params, session, size, version
        self._lock = threading.Lock()

    @classmethod
    def open(cls, size: int, device_id: int = 0) -> tuple["GpuDecoder | None", str]:
        """The GPU decoder, or None and why not (never an exception: Pillow remains)."""
        try:
            from nvidia import nvimgcodec
        except ImportError:
            return None, "nvImageCodec is not installed (pip install 'gpu-batch-router[gpu]')"
        try:
            import onnxruntime as ort

            # fancy_upsampling: chroma upsampled as libjpeg (Pillow) does it, not nearest.
            decoder = nvimgcodec.Decoder(device_id=device_id, options=":fancy_upsampling=1")
            params = nvimgcodec.DecodeParams(apply_exif_orientation=False)  # Pillow's path does not rotate either
            session = ort.InferenceSession(resize_crop_graph(size).SerializeToString(),
                                           providers=[("CUDAExecutionProvider", {"device_id": str(device_id)})])  # fmt: skip
            if session.get_providers()[0] != "CUDAExecutionProvider":
                return None, f"ONNX Runtime cannot resize on CUDA here (providers {session.get_providers()})"
            self = cls(decoder, params, session, size, getattr(nvimgcodec, "__version__", "?"))
            ok, why = self.self_test()
        except Exception as e:  # no usable GPU, a missing nvjpeg, an ORT without Resize-18 on CUDA
            return None, f"nvImageCodec could not start: {type(e).__name__}: {e}"
        if not ok:
            logger.error("GPU JPEG decoding disagrees with Pillow (%s): decoding on the CPU instead", why)
            return None, f"disagrees with Pillow: {why}"
        logger.info("JPEG decoding on the GPU (nvImageCodec %s): %s", self.version, why)
        return self, why

    def decode(self, blobs: list[bytes | np.ndarray]) -> list[np.ndarray | None]:
        """uint8 [size, size, 3] pixels for each blob, or None where nvImageCodec could
        not decode it (the caller asks Pillow, which says what is wrong with it)."""
        with self._lock:
            images = self.decoder.decode(list(blobs), params=self.params)  # bytes and uint8 arrays both go as they are
            out: list[np.ndarray | None] = []
            synced = False
            for img in images:
                if not self._usable(img):  # Pillow decides: it decodes, or says what is wrong
                    out.append(None)
                    continue
                h, w = img.shape[0], img.shape[1]
                binding = self.session.io_binding()
                binding.bind_input("x", "cuda", 0, np.uint8, [1, h, w, 3], img.__cuda_array_interface__["data"][0])
                for name, value in box_feeds(w, h, self.size).items():
                    binding.bind_cpu_input(name, value)
                binding.bind_output("y", "cpu")
                if not synced:  # ORT's stream does not wait for the decoder's: once a batch
                    binding.synchronize_inputs()
                    synced = True
                self.session.run_with_iobinding(binding)
                out.append(binding.copy_outputs_to_cpu()[0][0])
            del images  # the device images may go once every run that read them is done
        return out

    @staticmethod
    def _usable(img) -> bool:
        """Contiguous HWC RGB within Pillow's size limit, not a strip; anything else goes to Pillow
        (a decompression bomb gets Pillow's own 400 there, as on a CPU worker)."""
        from PIL import Image

        if img is None or len(img.shape) != 3 or img.shape[2] != 3:
            return False
        if img.__cuda_array_interface__.get("strides") is not None:
            return False
        h, w = img.shape[0], img.shape[1]
        if max(h, w) > MAX_ASPECT * min(h, w):  # resized whole, a 1x60000 strip would be 256x15M on the GPU
            return False
        return Image.MAX_IMAGE_PIXELS is None or h * w <= Image.MAX_IMAGE_PIXELS

    def self_test(self) -> tuple[bool, str]:
        """Decode a test picture both ways: the GPU path is used only if it agrees."""
        from PIL import Image

        yy, xx = np.mgrid[0:375, 0:500]
        picture = np.stack([128 + 100 * np.sin(xx / 19.0 + c) * np.cos(yy / 13.0 - c) for c in range(3)], -1)
        noise = np.random.default_rng(0).normal(0, 20, picture.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(picture + noise, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        (gpu,) = self.decode([buf.getvalue()])
        if gpu is None:
            return False, "nvImageCodec returned nothing for a baseline JPEG"
        diff = np.abs(gpu.astype(int) - image_pixels(buf.getvalue(), self.size).astype(int))
        said = f"max |d| {diff.max()}, mean {diff.mean():.3f} against Pillow on a 500x375 JPEG"
        return bool(diff.max() <= SELF_TEST_MAX and diff.mean() <= SELF_TEST_MEAN), said

    def describe(self) -> dict:
        return {"name": "nvimgcodec", "device": "cuda", "version": self.version, "fallback": "pillow (undecodable by nvImageCodec)"}
