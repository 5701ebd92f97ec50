"""What a router worker holds once its model is loaded (``WorkerModel``), the counters
its heartbeat reports (``InferenceStats``), and how tasks find it (``current_model``)."""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from core.entries import UINT8
from core.host import clock_id, shm_namespace
from core.protocol import EXTENSION
from core.service_curve import ServiceCurve
from worker_setup.preprocess import ImageLayout, decoder_info
from worker_setup.session import ModelSession

if TYPE_CHECKING:
    from worker_setup.gpu_decode import GpuDecoder


class MissingEntry(RuntimeError):
    """A batch for a model name this worker does not serve: the cluster disagrees with it."""


class NoModelError(RuntimeError):
    """A batch-router task landed on a worker that was not started by batch-router."""


@dataclass
class InferenceStats:
    """Counters the scheduler sees through the worker's heartbeat metrics.

    Updated from Dask's task threads and read from the event loop (metrics) and the GPU
    sampler thread, hence one lock. Times are monotonic seconds, a slowed-down session's
    stretch included, so a stretched worker looks slow to everyone who reads them.
    """

    batches: int = 0
    rows: int = 0
    padded: int = 0  # rows of zeros run to fill batches up to their bucket
    errors: int = 0
    in_flight: int = 0
    rows_in_flight: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=64))  # (rows, seconds)
    service: ServiceCurve = field(default_factory=ServiceCurve)  # seconds per batch, by batch size
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    _busy: float = 0.0  # closed busy intervals
    _busy_since: float | None = None  # start of the open interval, while a batch runs
    _last_end: float | None = None  # when the latest batch finished
    _max_rows_in_flight: int = 0
    _memory_base: int | None = None  # GPU memory used at the first sample, after warm-up
    _memory_peak: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def started(self, rows: int = 0) -> None:
        """A batch of ``rows`` rows (as sent; some may fail to decode) starts running."""
        with self._lock:
            if self.in_flight == 0:
                self._busy_since = self.clock()
            self.in_flight += 1
            self.rows_in_flight += rows
            self._max_rows_in_flight = max(self._max_rows_in_flight, self.rows_in_flight)

    def finished(self, rows: int, seconds: float, errors: int, started_rows: int = 0, padded: int = 0) -> float:
        """The batch ``started(started_rows)`` announced ran ``rows`` rows, and ``padded``
        rows of padding, in ``seconds``: its cost is that of its bucket.

        Returns the time it added to the worker's timeline: two task threads overlap one
        batch's decoding with another's compute, so a batch that began while another
        ran costs only from that one's end. That, not its wall time, is the worker's
        capacity, and what its service curve learns."""
        with self._lock:
            end = self.clock()
            start = end - seconds
            added = end - max(start, self._last_end) if self._last_end is not None else seconds
            self._last_end = end if self._last_end is None else max(self._last_end, end)
            self.in_flight -= 1
            self.rows_in_flight -= started_rows
            if self.in_flight == 0 and self._busy_since is not None:
                self._busy += self.clock() - self._busy_since
                self._busy_since = None
            self.batches += 1
            self.rows += rows
            self.padded += padded
            self.errors += errors
            self.recent.append((rows, added))
            self.service.observe(rows + padded, added)
            return added

    def busy_seconds(self) -> float:
        """Wall time during which at least one batch was running, the open interval
        included: what a GPU's utilisation counter measures, so the simulated GPU uses it."""
        with self._lock:
            open_s = self.clock() - self._busy_since if self._busy_since is not None else 0.0
            return self._busy + open_s

    def current_rows(self) -> int:
        with self._lock:
            return self.rows_in_flight

    def observe_memory(self, used: int | None) -> None:
        """A GPU memory reading from the sampler. The first is the warm baseline."""
        if used is None:
            return
        with self._lock:
            if self._memory_base is None:
                self._memory_base = used
            self._memory_peak = used if self._memory_peak is None else max(self._memory_peak, used)

    def memory_per_row(self) -> int | None:
        """GPU bytes a row needs: peak growth over the warm baseline divided by the most
        rows ever in flight. Allocators keep what they grew to, so the peak reflects the
        largest load seen; concurrent batches make this an over- not an under-estimate."""
        with self._lock:
            if self._memory_base is None or self._memory_peak is None or self._max_rows_in_flight == 0:
                return None
            grown = self._memory_peak - self._memory_base
            return int(grown / self._max_rows_in_flight) if grown > 0 else None

    def snapshot(self) -> dict:
        per_row = self.memory_per_row()
        busy = self.busy_seconds()
        with self._lock:
            recent = list(self.recent)
            out = {
                "batches": self.batches,
                "rows": self.rows,
                "padded_rows": self.padded,
                "errors": self.errors,
                "in_flight": self.in_flight,
                "rows_in_flight": self.rows_in_flight,
                "busy_s": busy,
                "service": self.service.as_dict(),
            }
        seconds = sum(s for _, s in recent)
        out["rows_per_s"] = (sum(r for r, _ in recent) / seconds) if seconds else None
        out["memory_per_row"] = per_row
        return out


@dataclass
class WorkerModel:
    """The worker's sessions, with the metadata tasks need to use them."""

    session: ModelSession
    name: str
    sha256: str
    layout: ImageLayout | None  # None when the model's input is not an image
    loaded_at: float = field(default_factory=time.time)
    stats: InferenceStats = field(default_factory=InferenceStats)
    slowdown: float = 1.0  # benchmark knob: its session runs this many times slower (slow_device.py)
    gpu: dict | None = None  # static GPU info (source, index, name, uuid), None without a GPU source
    buckets: tuple[int, ...] = ()  # the batch sizes the session runs; () = never padded (no batch dimension)
    precision: str = "fp32"
    # The same classifier behind in-graph preprocessing (the ``-uint8`` entry): uint8
    # pixel items and decoded images run here. None when the cluster does not serve it.
    pixels: ModelSession | None = None
    gpu_decoder: "GpuDecoder | None" = None  # JPEGs decoded on the GPU (worker_setup.gpu_decode)
    gpu_decode_note: str = ""  # why not, when not
    # One batch on the device at a time; the task threads wait here, and the wait is
    # not counted as compute.
    device: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def describe(self) -> dict:
        """Startup information for the scheduler (msgpack-friendly)."""
        s = self.session
        return {
            "model": self.name,
            "sha256": self.sha256,
            "device": s.device,
            "providers": s.providers,
            "requested_providers": s.requested,
            "cuda_fallback": s.cuda_fallback,
            "threads": s.threads,
            "precision": self.precision,
            "buckets": list(self.buckets),
            **s.describe(),  # ORT's options as it reports them, and the warm-up table
            "uint8": {"warmup": [dict(w) for w in self.pixels.warmup]} if self.pixels is not None else None,
            "decoder": self.decoder(),  # what turns JPEGs into pixels
            "gpu": dict(self.gpu) if self.gpu is not None else None,
            "simulated": self.simulated,
            "slowdown": self.slowdown,
            "restarts": int(os.environ.get("BATCH_ROUTER_WORKER_RESTARTS", 0)),  # started again by `up` (router_api.supervisor)
            "clock": clock_id(),  # a front end with the same one shares this host: its clock, and the direct lane
            "shm": shm_namespace(),  # ... and with the same one, its shared-memory files (router_api.shm)
        }

    def summary(self) -> dict:
        """What the scheduler and front ends record of this model on this worker."""
        return {"sha256": self.sha256, "precision": self.precision, "buckets": list(self.buckets),
                "device": self.session.device, "uint8": self.pixels is not None, "loaded_at": self.loaded_at,
                "warmup": [dict(w) for w in getattr(self.session, "warmup", [])]}  # fmt: skip

    def decoder(self) -> dict | None:
        if self.layout is None:
            return None
        if self.gpu_decoder is not None:
            return self.gpu_decoder.describe()
        return {**decoder_info(), **({"gpu": self.gpu_decode_note} if self.gpu_decode_note else {})}

    def session_for(self, entry: str) -> ModelSession:
        """The session an item of ``entry`` ("" or "uint8") runs on."""
        if entry == UINT8:
            if self.pixels is None:
                raise MissingEntry("this worker does not serve the uint8 entry")
            return self.pixels
        return self.session

    @property
    def simulated(self) -> bool:
        return self.gpu is not None and self.gpu.get("source") == "simulated"


def current_model() -> WorkerModel:
    """The model of the worker running the current task."""
    from distributed import get_worker

    model = get_worker().extensions.get(EXTENSION)
    if model is None:
        raise NoModelError(
            "this Dask worker has no batch-router model: start it with "
            "`batch-router worker SCHEDULER` or `--preload worker_setup.preload`"
        )
    return model
