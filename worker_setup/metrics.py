"""The worker's live metrics: what ``ws.metrics["batch-router"]`` holds on the scheduler.

Dask calls metric callables on the worker's event loop at every heartbeat, and swallows
their exceptions without a word (``worker.py``: "TODO: log error once"). So:

- GPU reads happen on a daemon thread (``GpuSampler``) that caches the latest sample;
  the metric only copies cached state and never touches NVML.
- The metric is wrapped (``guarded``): if building it raises, the error is logged once
  and the scheduler receives ``{"error": ...}`` instead of a metric that silently vanished.
- Sampler failures are kept as recent error strings that travel in the metric itself.

Schema (msgpack-friendly)::

    {"gpu": dict | None,        # latest sample (worker_setup.gpu), None without a GPU
     "simulated": bool,         # True when "gpu" comes from the simulated source
     "stats": dict,             # InferenceStats.snapshot()
     "slowdown": float,         # benchmark knob this worker runs with
     "errors": list[str]}       # recent sampler/metric errors, oldest first
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from worker_setup.gpu import GpuSource

if TYPE_CHECKING:
    from worker_setup.shelf import Shelf

logger = logging.getLogger("worker_setup.metrics")

Metric = Callable[[Any], dict]


class ErrorLog:
    """Recent distinct error strings; each is logged (at ERROR) the first time only, so
    a failure repeating every sampling interval neither floods the log nor hides. An
    error not seen again for ``window`` seconds is over: it leaves ``recent()``."""

    def __init__(self, keep: int = 8, window: float = 60.0) -> None:
        self._recent: dict[str, float] = {}  # message -> last seen (monotonic), oldest first
        self._logged: set[str] = set()
        self._lock = threading.Lock()
        self.keep, self.window = keep, window

    def add(self, message: str) -> None:
        with self._lock:
            first = message not in self._logged
            if first and len(self._logged) < 1024:
                self._logged.add(message)
            self._recent.pop(message, None)
            self._recent[message] = time.monotonic()
            while len(self._recent) > self.keep:
                del self._recent[next(iter(self._recent))]
        if first:
            logger.error("%s", message)

    def recent(self) -> list[str]:
        cutoff = time.monotonic() - self.window
        with self._lock:
            return [m for m, seen in self._recent.items() if seen >= cutoff]


class GpuSampler:
    """Reads a GPU source every ``interval`` seconds on a daemon thread and keeps the
    latest sample. A sample older than ``stale_after`` (a wedged driver call, say) is
    reported as no sample plus an error, rather than as the current state."""

    def __init__(
        self,
        source: GpuSource,
        interval: float,
        errors: ErrorLog | None = None,
        on_sample: Callable[[dict], None] | None = None,
        stale_after: float | None = None,
    ) -> None:
        self.source, self.interval = source, max(0.01, interval)
        self.errors = errors or ErrorLog()
        self.on_sample = on_sample
        self.stale_after = stale_after if stale_after is not None else max(10 * self.interval, 5.0)
        self._latest: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample_once(self) -> dict | None:
        """One read, on the calling thread. Errors are recorded, never raised."""
        try:
            sample = self.source.sample()
        except Exception as e:
            self.errors.add(f"gpu sample failed: {type(e).__name__}: {e}")
            return None
        self._latest = sample
        if sample is not None and self.on_sample is not None:
            try:
                self.on_sample(sample)
            except Exception as e:
                self.errors.add(f"gpu sample handler failed: {type(e).__name__}: {e}")
        return sample

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="batch-router-gpu-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self.sample_once()
        finally:
            self._close_source()

    def _close_source(self) -> None:
        try:
            self.source.close()
        except Exception as e:
            logger.warning("closing the GPU source failed: %s", e)

    def latest(self) -> dict | None:
        sample = self._latest
        if sample is None:
            return None
        age = time.time() - sample.get("sampled_at", 0)
        if age > self.stale_after:
            self.errors.add(f"gpu sample stale: the sampler has not produced one for over {self.stale_after:g}s")
            return None
        return sample

    def close(self, timeout: float | None = None) -> None:
        """Stop sampling. Returns at once unless ``timeout`` is given: Dask calls this
        on its event loop when the worker closes, and the thread closes the source itself."""
        self._stop.set()
        if self._thread is None:
            self._close_source()
        elif timeout is not None:
            self._thread.join(timeout)


def guarded(build: Metric, errors: ErrorLog) -> Metric:
    """``build`` as a Dask metric that cannot vanish: an exception becomes
    ``{"error": ...}`` (logged once) instead of being swallowed by the worker."""

    def metric(worker: Any = None) -> dict:
        try:
            return build(worker)
        except Exception as e:
            message = f"batch-router metric failed: {type(e).__name__}: {e}"
            errors.add(message)
            return {"error": message}

    return metric


def worker_metric(shelf: Shelf, sampler: GpuSampler | None, errors: ErrorLog) -> Metric:
    """The ``worker.metrics["batch-router"]`` callable: cached state only, no I/O.
    ``models``: each model's statistics; ``stats``: the first's (what one-model pages read)."""

    def build(worker: Any = None) -> dict:
        models = shelf.snapshots()
        first = next(iter(shelf.models.values()), None)
        return {
            "gpu": sampler.latest() if sampler is not None else None,
            "simulated": sampler is not None and sampler.source.info.get("source") == "simulated",
            "stats": next(iter(models.values()), {}),
            "models": models,
            "slowdown": first.slowdown if first is not None else 1.0,
            "errors": errors.recent(),
        }

    return guarded(build, errors)
