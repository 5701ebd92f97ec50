"""What the load test sends: request bodies that are the same in every run and process.

The router, the bare server and raw_ort (in its own subprocess) must be handed the same
bytes, or their figures could not be compared, so the JPEG and the input tensor are built
here deterministically from a seed and both loadtest and raw_ort import them from here;
`payload()` picks the request for a --mode: a JPEG for /v1/classify, or a KServe v2 binary
tensor request for /v2/models/<name>/infer shaped from the model's metadata.
"""

from __future__ import annotations

import argparse
import io
import json
from typing import Any, Optional

import numpy as np

DTYPES = {"FP32": "float32", "FP16": "float16", "FP64": "float64", "UINT8": "uint8",
          "INT8": "int8", "INT32": "int32", "INT64": "int64"}


def make_jpeg(width: int = 320, height: int = 240, seed: int = 0, quality: int = 85) -> bytes:
    """A deterministic natural-ish photo (gradients, blobs, texture): ~20 KB like a real one,
    so decode cost and upload size resemble real traffic rather than a flat test card."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([90 + 80 * y / height, 130 + 60 * x / width, 200 - 70 * y / height], -1)
    img = Image.fromarray(sky.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(14):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(10, 70)
        fill = tuple(int(c) for c in rng.integers(20, 235, 3))
        draw.ellipse((cx - r, cy - r * 0.7, cx + r, cy + r * 0.7), fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(2))
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 9, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def random_tensor(shape: list[int], datatype: str, seed: int = 0) -> np.ndarray:
    """The fixed request tensor, same in router and raw runs."""
    rng, dtype = np.random.default_rng(seed), np.dtype(DTYPES.get(datatype, datatype))
    if dtype.kind in "iu":
        return rng.integers(0, 128, shape).astype(dtype)
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype)


def infer_request(meta: dict[str, Any], rows: int, seed: int = 0) -> tuple[dict, bytes]:
    """KServe v2 binary tensor extension: JSON header then the raw input bytes."""
    inp = meta["inputs"][0]
    shape = [rows if i == 0 and d in (-1, None) else (1 if d in (-1, None) else int(d))
             for i, d in enumerate(inp["shape"])]
    data = random_tensor(shape, inp["datatype"], seed).tobytes()
    outputs = [{"name": o["name"], "parameters": {"binary_data": True}}
               for o in meta.get("outputs", [])[:1]]
    header = json.dumps({"inputs": [{
        "name": inp["name"], "shape": shape, "datatype": inp["datatype"],
        "parameters": {"binary_data_size": len(data)}}], "outputs": outputs}).encode()
    headers = {"Inference-Header-Content-Length": str(len(header)),
               "Content-Type": "application/octet-stream"}
    return headers, header + data


def jpeg_size(text: str) -> tuple[int, int, int]:
    """"500x375" or "500x375q90" -> (width, height, quality); quality 85 unless given."""
    size, _, quality = text.partition("q")
    w, h = (int(v) for v in size.split("x"))
    return w, h, int(quality or 85)


def payload(args: argparse.Namespace, meta: Optional[dict]) -> tuple[str, dict, bytes, int]:
    if args.mode == "classify":
        w, h, q = jpeg_size(getattr(args, "jpeg_size", None) or "320x240")  # the placement benchmark has none
        jpeg = make_jpeg(w, h, seed=args.seed, quality=q)
        print(f"payload: {len(jpeg)} byte JPEG {w}x{h} q{q} -> POST /v1/classify", flush=True)
        return "/v1/classify", {"Content-Type": "image/jpeg"}, jpeg, 1
    if meta is None:
        raise SystemExit(f"cannot read model metadata GET /v2/models/{args.model}")
    headers, body = infer_request(meta, args.batch_rows, args.seed)
    print(f"payload: {len(body)} byte KServe binary request, {args.batch_rows} row(s)",
          flush=True)
    return f"/v2/models/{args.model}/infer", headers, body, args.batch_rows
