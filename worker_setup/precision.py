"""fp16 copies of the cluster's fp32 model, and a check of what the halving costs.

The scheduler ships one fp32 model to every worker; a worker serving ``precision: fp16``
converts it locally, once, and caches the result beside it by its own SHA-256, so the
wire format and the scheduler's model store stay fp32-only.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from worker_setup.model_cache import derived_model

logger = logging.getLogger("worker_setup.precision")

PRECISION_KEY, SOURCE_KEY = "precision", "converted_from"
# Normalisation of torchvision's ImageNet preprocessing: what real clients send.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
MISSING_CONVERTER = (
    "precision fp16 needs onnxconverter-common (pip install onnxconverter-common); on the GPU "
    "machine stage it with ../shared/device/stage-wheels.sh onnxconverter-common==1.16.0")

Run = Callable[[np.ndarray], np.ndarray]


def ensure_fp16(fp32_path: Path, fp32_sha256: str, cache_dir: Path) -> tuple[Path, str]:
    """Path and SHA-256 of the fp16 twin of a cached fp32 model, converting it if needed.

    Inputs and outputs stay float32 (``keep_io_types``), so clients, codecs and batching
    are unchanged; only the weights and the arithmetic inside are halved.
    """
    start = time.perf_counter()
    clamped: list = []

    def convert() -> bytes:
        try:
            from onnxconverter_common import float16
        except ImportError as e:
            raise RuntimeError(MISSING_CONVERTER) from e
        with warnings.catch_warnings(record=True) as caught:  # one warning per tiny weight
            warnings.simplefilter("always")
            model = float16.convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
        clamped.extend(caught)
        props = {p.key: p.value for p in model.metadata_props}
        props.update({PRECISION_KEY: "fp16", SOURCE_KEY: fp32_sha256})
        del model.metadata_props[:]
        onnx.helper.set_model_props(model, props)
        return model.SerializeToString(deterministic=True)

    path, sha16, built = derived_model(cache_dir, fp32_sha256, "fp16", convert)
    if built:
        logger.info("converted model %s to fp16 %s in %.1f s (%d values clamped to fp16 range)",
                    fp32_sha256[:12], sha16[:12], time.perf_counter() - start, len(clamped))
    return path, sha16


def model_precision(path: Path) -> str:
    """'fp16' for a model ``ensure_fp16`` wrote, else 'fp32'; reads no external weights."""
    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    return props.get(PRECISION_KEY, "fp32")


def reference_images(shape: tuple[int, ...], n: int = 16, seed: int = 0) -> np.ndarray:
    """n ImageNet-normalised images: coloured gradients, blobs and stripes, a little noise.

    White noise alone averages out in the pooling and gives near-identical logits for
    every image, which would make a top-k comparison say little.
    """
    c, h, w = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, h, dtype=np.float32),
                         np.linspace(0, 1, w, dtype=np.float32), indexing="ij")
    out = np.empty((n, c, h, w), dtype=np.float32)
    for i in range(n):
        tint = rng.uniform(0, 1, (c, 1, 1))  # per-channel strength: structures have colour
        a, b = rng.uniform(-1, 1, 2)
        img = rng.uniform(0, 1, (c, 1, 1)) + 0.5 * tint * (a * (xx - 0.5) + b * (yy - 0.5))
        for _ in range(rng.integers(1, 5)):  # gaussian blobs
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)
            img = img + rng.uniform(-0.8, 0.8, (c, 1, 1)) * blob
        freq, angle = np.exp(rng.uniform(np.log(2), np.log(60))), rng.uniform(0, np.pi)
        wave = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
        if rng.random() < 0.5:
            wave = np.sign(wave)  # hard edges as well as smooth ones
        img = img + rng.uniform(0, 0.5, (c, 1, 1)) * wave + rng.normal(0, 0.03, (c, h, w))
        out[i] = np.clip(img, 0, 1)
    if c == len(IMAGENET_MEAN):
        out = (out - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
    return out.astype(np.float32)


def compare_precision(reference_run: Run, candidate_run: Run, images: np.ndarray) -> dict:
    """How far a candidate's logits stray from the reference's on the same images.

    Top-k agreement matters more than raw logit error: it is what a client would see.
    """
    ref = np.asarray(reference_run(images), dtype=np.float64)
    cand = np.asarray(candidate_run(images), dtype=np.float64)
    diff = np.abs(ref - cand)
    top5_ref = np.argsort(-ref, axis=1, kind="stable")[:, :5]
    top5_cand = np.argsort(-cand, axis=1, kind="stable")[:, :5]
    overlap = [len(set(r) & set(c)) / 5 for r, c in zip(top5_ref, top5_cand)]
    return {
        "images": len(images),
        "max_abs_logit_diff": round(float(diff.max()), 6),
        "mean_abs_logit_diff": round(float(diff.mean()), 6),
        "top1_agreement": round(float(np.mean(top5_ref[:, 0] == top5_cand[:, 0])), 6),
        "top5_agreement": round(float(np.mean(overlap)), 6),
    }
