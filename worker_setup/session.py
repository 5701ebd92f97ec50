"""One ONNX Runtime session per worker, and the truth about which device runs it.

ONNX Runtime never raises when CUDA cannot load: it quietly runs on CPU. The old system
ran like that for days. So the providers ORT actually uses are read back from the
session, reported to the scheduler, and a CUDA request that ended on CPU is logged as an
error every time the session is created.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from core.protocol import TensorInfo

logger = logging.getLogger("worker_setup.session")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def requested_providers(device: str) -> list[str]:
    """Providers to ask for: "cpu", "cuda", or "auto" (CUDA when this ORT build has it)."""
    if device == "cpu":
        return [CPU]
    if device == "cuda" or (device == "auto" and CUDA in ort.get_available_providers()):
        return [CUDA, CPU]
    if device != "auto":
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda")
    return [CPU]


_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


def _tensors(args) -> tuple[TensorInfo, ...]:
    out = []
    for a in args:
        if a.type not in _ORT_DTYPES:
            raise ValueError(f"{a.name}: unsupported tensor type {a.type}")
        shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in a.shape)
        out.append(TensorInfo(a.name, _ORT_DTYPES[a.type], shape))
    return tuple(out)


@dataclass
class ModelSession:
    """A loaded, warmed-up session plus what it really runs on."""

    session: ort.InferenceSession
    requested: list[str]
    providers: list[str]
    threads: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def device(self) -> str:
        return "cuda" if self.providers and self.providers[0] == CUDA else "cpu"

    @property
    def cuda_fallback(self) -> bool:
        return CUDA in self.requested and self.device != "cuda"

    @classmethod
    def load(cls, path: str, device: str = "auto", threads: int = 0) -> "ModelSession":
        requested = requested_providers(device)
        if CUDA in requested and hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
            except Exception as e:  # reported below as a fallback, never swallowed silently
                logger.error("onnxruntime.preload_dlls() failed: %s", e)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or max(1, os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(path, sess_options=opts, providers=requested)
        self = cls(
            session=session,
            requested=requested,
            providers=list(session.get_providers()),
            threads=opts.intra_op_num_threads,
            inputs=_tensors(session.get_inputs()),
            outputs=_tensors(session.get_outputs()),
        )
        if self.cuda_fallback:
            logger.error(
                "CUDA WAS REQUESTED BUT ONNX RUNTIME IS RUNNING ON CPU (providers=%s, "
                "available=%s). Install onnxruntime-gpu matching your CUDA, and uninstall "
                "the CPU 'onnxruntime' package. This worker reports device=cpu.",
                self.providers,
                ort.get_available_providers(),
            )
        else:
            logger.info("model %s on %s (providers %s, %d threads)", path, self.device, self.providers, self.threads)
        self.warm_up()
        return self

    def warm_up(self) -> None:
        """The first run allocates and (on CUDA) picks kernels: keep that off the request path."""
        feeds = {
            t.name: np.zeros((1,) + tuple(d if d > 0 else 1 for d in t.shape[1:]), dtype=t.dtype)
            for t in self.inputs
        }
        t0 = time.perf_counter()
        self.run(feeds)
        logger.info("warm-up batch took %.1f ms", 1e3 * (time.perf_counter() - t0))

    def run(self, feeds: dict[str, np.ndarray], names: list[str] | None = None) -> list[np.ndarray]:
        with self._lock:
            return self.session.run(names, feeds)
