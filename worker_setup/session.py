"""One ONNX Runtime session per worker, and the truth about which device runs it.

ONNX Runtime never raises when CUDA cannot load: it quietly runs on CPU. The old system
ran like that for days. So the providers ORT actually uses are read back from the
session, reported to the scheduler, and a CUDA request that ended on CPU is logged as an
error every time the session is created.

Batches arrive padded to a bucket (``core.buckets``), so the session sees a few shapes.
With IOBinding each bucket has its own input and output buffers on the session's
device, made once: a batch is copied in once and its outputs read once, and with CUDA
graphs on, each bucket's graph (``gpu_graph_id``) replays over the same addresses.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from core.config import Cuda
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


def cuda_provider_options(cuda: Cuda | None) -> dict[str, str]:
    """Our settings under ONNX Runtime's own option names (strings, as ORT takes them)."""
    if cuda is None:
        return {}
    opts = {
        "cudnn_conv_algo_search": cuda.cudnn_conv_algo_search,
        "cudnn_conv_use_max_workspace": str(int(cuda.cudnn_conv_use_max_workspace)),
        "use_tf32": str(int(cuda.use_tf32)),
        "prefer_nhwc": str(int(cuda.prefer_nhwc)),
        "arena_extend_strategy": cuda.arena_extend_strategy,
        "enable_cuda_graph": str(int(cuda.graphs)),
    }
    if cuda.gpu_mem_limit:
        opts["gpu_mem_limit"] = str(cuda.gpu_mem_limit)
    return opts


@dataclass
class Bound:
    """One bucket's buffers on the session's device, bound once and reused."""

    binding: ort.IOBinding
    inputs: dict[str, ort.OrtValue]
    outputs: list[ort.OrtValue] | None  # None: a dynamic output shape, ORT allocates each run
    run_options: ort.RunOptions | None


@dataclass
class ModelSession:
    """A loaded session plus what it really runs on, and how."""

    session: ort.InferenceSession
    requested: list[str]
    providers: list[str]
    threads: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    io_binding: bool = False
    cuda_graphs: bool = False
    options: dict = field(default_factory=dict)  # what /v1/workers shows: ORT's names and values
    warmup: list[dict] = field(default_factory=list)  # per bucket: first and steady run times
    _bound: dict[int, Bound] = field(default_factory=dict, repr=False)
    _output_names: list[str] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # On CUDA every run goes through one thread: ONNX Runtime keeps captured CUDA graphs
    # (and cuDNN/cuBLAS handles and their workspaces) per calling thread, so a graph the
    # warm-up captured would be captured again by each of Dask's task threads, on requests.
    _device_thread: ThreadPoolExecutor | None = field(default=None, repr=False)

    @property
    def device(self) -> str:
        return "cuda" if self.providers and self.providers[0] == CUDA else "cpu"

    @property
    def cuda_fallback(self) -> bool:
        return CUDA in self.requested and self.device != "cuda"

    @classmethod
    def load(
        cls, path: str, device: str = "auto", threads: int = 0, cuda: Cuda | None = None, io_binding: bool = False,
        one_thread: bool | None = None,
    ) -> "ModelSession":
        """``one_thread``: every run on one thread of its own (default: on CUDA)."""
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
        cuda_opts = cuda_provider_options(cuda)
        providers: list = [(CUDA, cuda_opts) if p == CUDA else p for p in requested]
        session = ort.InferenceSession(path, sess_options=opts, providers=providers)
        used = list(session.get_providers())
        inputs = _tensors(session.get_inputs())
        if io_binding and not all(t.shape and min(t.shape[1:], default=1) > 0 for t in inputs):
            # Buffers are made per batch size; other dimensions must be fixed to make them.
            logger.info("io-binding off: an input has no batch dimension or another dimension unknown")
            io_binding = False
        self = cls(
            session=session,
            requested=requested,
            providers=used,
            threads=opts.intra_op_num_threads,
            inputs=inputs,
            outputs=_tensors(session.get_outputs()),
            io_binding=io_binding,
        )
        self._output_names = [t.name for t in self.outputs]
        if one_thread or (one_thread is None and self.device == "cuda"):
            self._device_thread = ThreadPoolExecutor(1, thread_name_prefix="batch-router-device")
        if self.device == "cuda":
            # What ORT reports it runs with, not what we asked: the two differ if it ignored one.
            self.options = dict(session.get_provider_options().get(CUDA, {}))
            self.cuda_graphs = self.options.get("enable_cuda_graph") == "1"
        if self.cuda_graphs and not (io_binding and all(min(t.shape[1:], default=1) > 0 for t in self.outputs)):
            raise ValueError("CUDA graphs need io-binding and every shape fixed but for the batch dimension")
        self.options["io_binding"] = io_binding
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
        return self

    def warm_up(self, buckets: tuple[int, ...], cpu_max_rows: int = 0, runner=None) -> list[dict]:
        """Run every bucket before the worker says it is ready: on CUDA the first run at
        a shape searches convolution algorithms (and captures a CUDA graph), which must
        never land on a request. A CPU has no such search, so it warms only buckets up
        to ``cpu_max_rows`` (the rest are listed as skipped). ``buckets`` empty: the
        model has no batch dimension, and one run at its own shape warms it. ``runner``:
        what runs them (a wrapper of this session), so its times are what batches see."""
        runner = runner or self
        table = []
        for rows in buckets or (None,):
            if self.device == "cpu" and rows is not None and rows > max(cpu_max_rows, buckets[0]):
                table.append({"bucket": rows, "skipped": "cpu"})
                continue
            feeds = {t.name: np.zeros(_shape(t, rows), dtype=t.dtype) for t in self.inputs}
            runs = []
            # CUDA graphs: ORT runs a shape normally before it captures, then replays.
            for _ in range(4 if self.cuda_graphs else 2 if self.device == "cuda" else 1):
                t0 = time.perf_counter()
                runner.run(feeds)
                runs.append(1e3 * (time.perf_counter() - t0))
            table.append({"bucket": rows, "first_ms": round(runs[0], 2), "steady_ms": round(runs[-1], 2)})
        self.warmup = table
        return table

    def run(self, feeds: dict[str, np.ndarray], names: list[str] | None = None) -> list[np.ndarray]:
        """One batch, all outputs (or ``names``), as numpy arrays the caller owns."""
        if self._device_thread is not None:
            return self._device_thread.submit(self._run, feeds, names).result()
        return self._run(feeds, names)

    def _run(self, feeds: dict[str, np.ndarray], names: list[str] | None) -> list[np.ndarray]:
        with self._lock:
            if not self.io_binding:
                return self.session.run(names, feeds)
            bound = self._bind(len(next(iter(feeds.values()))))
            for name, value in feeds.items():
                bound.inputs[name].update_inplace(np.ascontiguousarray(value))
            if self.device == "cuda":  # a copy from pageable memory may return before it lands
                bound.binding.synchronize_inputs()
            self.session.run_with_iobinding(bound.binding, bound.run_options)
            values = bound.outputs if bound.outputs is not None else bound.binding.get_outputs()
            # A CPU OrtValue's numpy() is a view of the buffer the next batch overwrites.
            arrays = [v.numpy().copy() if self.device == "cpu" else v.numpy() for v in values]
        if names is None or names == self._output_names:
            return arrays
        return [arrays[self._output_names.index(n)] for n in names]

    def _bind(self, rows: int) -> Bound:
        """This bucket's buffers, made on first use (the warm-up's run)."""
        if rows in self._bound:
            return self._bound[rows]
        device = "cuda" if self.device == "cuda" else "cpu"
        binding = self.session.io_binding()
        inputs = {}
        for t in self.inputs:
            value = ort.OrtValue.ortvalue_from_shape_and_type(_shape(t, rows), np.dtype(t.dtype), device, 0)
            binding.bind_ortvalue_input(t.name, value)
            inputs[t.name] = value
        outputs: list[ort.OrtValue] | None = []
        for t in self.outputs:
            if min(t.shape[1:], default=1) <= 0:  # unknown until run: ORT allocates it
                binding.bind_output(t.name, device)
                outputs = None
                continue
            value = ort.OrtValue.ortvalue_from_shape_and_type(_shape(t, rows), np.dtype(t.dtype), device, 0)
            binding.bind_ortvalue_output(t.name, value)
            if outputs is not None:
                outputs.append(value)
        run_options = None
        if self.cuda_graphs:
            run_options = ort.RunOptions()
            run_options.add_run_config_entry("gpu_graph_id", str(len(self._bound) + 1))
        self._bound[rows] = bound = Bound(binding, inputs, outputs, run_options)
        return bound

    def describe(self) -> dict:
        return {"options": dict(self.options), "cuda_graphs": self.cuda_graphs, "warmup": [dict(w) for w in self.warmup]}


def _shape(t: TensorInfo, rows: int | None) -> tuple[int, ...]:
    """A concrete shape: ``rows`` for the batch dimension, 1 for other unknown ones."""
    dims = tuple(d if d > 0 else 1 for d in t.shape)
    return dims if rows is None or not dims else (rows,) + dims[1:]
