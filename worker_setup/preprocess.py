"""Image bytes -> model input rows, done on the worker so only the compressed image travels.

ImageNet evaluation preprocessing: resize the shorter side to 256/224 of the crop size,
centre-crop, scale to [0, 1], normalise with ImageNet's mean and std, in the layout and
dtype the model file declares.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# Every normalised value a pixel can take, per channel: one table lookup a pixel,
# written straight into the channel-first row, instead of four passes over the image.
NORMALISED = ((np.arange(256, dtype=np.float32)[None, :] * (1 / 255.0) - MEAN[:, None]) / STD[:, None]).astype(np.float32)


@functools.cache
def decode_threads() -> int:
    """JPEG decoding runs on a pool as large as the cores this worker may use (taskset
    and cgroups included): Pillow releases the GIL, and a GPU needs every core's images."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def decoder_info() -> dict:
    """What decodes this worker's images, for /v1/workers."""
    return {"name": "pillow", "device": "cpu", "threads": decode_threads()}


class ImageError(ValueError):
    """The bytes are not an image Pillow can decode."""

    status = 400


class ImageTooLarge(ImageError):
    """More pixels than ``batch-router.http.max-image-pixels``: refused before decoding."""

    status = 413


MAX_PIXELS = [50_000_000]  # set from the settings by the worker preload


@dataclass(frozen=True)
class ImageLayout:
    """How one image row must look for this model: read from the model's input."""

    layout: str = "NCHW"  # or "NHWC"
    size: int = 224
    dtype: str = "float32"  # "uint8" inputs get raw pixels, no normalisation

    @classmethod
    def from_shape(cls, shape: tuple[int, ...], dtype: str) -> "ImageLayout":
        """Infer layout from a 4-D input shape such as (-1, 3, 224, 224) or (-1, 224, 224, 3)."""
        if len(shape) != 4:
            raise ValueError(f"image models need a 4-D input, got shape {shape}")
        if shape[1] == 3:
            layout, size = "NCHW", shape[2]
        elif shape[3] == 3:
            layout, size = "NHWC", shape[1]
        else:
            raise ValueError(f"cannot tell the channel axis of input shape {shape}")
        return cls(layout=layout, size=size if size and size > 0 else 224, dtype=dtype)


def decode(data: bytes | np.ndarray, size: int) -> Image.Image:
    """Decode and resize so the shorter side is size*256/224, then centre-crop size x size."""
    try:
        img = Image.open(io.BytesIO(memoryview(data)))  # reads the header only
        if img.size[0] * img.size[1] > MAX_PIXELS[0]:
            raise ImageTooLarge(f"image is {img.size[0]}x{img.size[1]} = {img.size[0] * img.size[1]} pixels, over the "
                                f"{MAX_PIXELS[0]} limit (http.max-image-pixels)")  # fmt: skip
        resize_to = round(size * 256 / 224)
        # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale: much cheaper for big photos.
        img.draft("RGB", (resize_to, resize_to))
        img = img.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"image too large: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot decode image: {e}") from None
    # Only the crop is resized (Pillow's box): the same pixels as resizing the whole image
    # and cropping, without making the whole (a 1x50000 strip would be 256x12.8M).
    nw, nh, left, top = resize_box(*img.size, size)
    sx, sy = img.size[0] / nw, img.size[1] / nh
    return img.resize((size, size), Image.BILINEAR, box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))


def resize_box(w: int, h: int, size: int) -> tuple[int, int, int, int]:
    """The resize (short side to 256/224 of ``size``) and the centre crop's corner, for
    an image of w x h: shared by the CPU and GPU decoders."""
    scale = round(size * 256 / 224) / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def image_pixels(data: bytes | np.ndarray, size: int = 224) -> np.ndarray:
    """One image -> uint8 RGB pixels [size, size, 3]: what the ``-uint8`` entry takes."""
    return np.asarray(decode(data, size), dtype=np.uint8)


def image_to_row(data: bytes | np.ndarray, layout: ImageLayout = ImageLayout()) -> np.ndarray:
    """One image -> one input row (without the batch dimension)."""
    pixels = image_pixels(data, layout.size)  # H, W, 3
    if layout.dtype == "float32" and layout.layout == "NCHW":
        row = np.empty((3,) + pixels.shape[:2], dtype=np.float32)
        for c in range(3):
            np.take(NORMALISED[c], pixels[..., c], out=row[c])
        return row
    if layout.dtype == "uint8":
        row = pixels
    else:
        row = (pixels.astype(np.float32) * (1 / 255.0) - MEAN) / STD
        row = row.astype(layout.dtype, copy=False)
    if layout.layout == "NCHW":
        row = row.transpose(2, 0, 1)
    return np.ascontiguousarray(row)
