"""What a router worker holds once its model is loaded, and how tasks find it."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from worker_setup.preprocess import ImageLayout
from worker_setup.session import ModelSession

EXTENSION = "batch-router"


class NoModelError(RuntimeError):
    """A batch-router task landed on a worker that was not started by batch-router."""


@dataclass
class InferenceStats:
    """Counters the scheduler sees through the worker's heartbeat metrics."""

    batches: int = 0
    rows: int = 0
    errors: int = 0
    in_flight: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=64))  # (rows, seconds)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def finished(self, rows: int, seconds: float, errors: int) -> None:
        with self._lock:
            self.in_flight -= 1
            self.batches += 1
            self.rows += rows
            self.errors += errors
            self.recent.append((rows, seconds))

    def snapshot(self) -> dict:
        with self._lock:
            recent = list(self.recent)
        busy = sum(s for _, s in recent)
        return {
            "batches": self.batches,
            "rows": self.rows,
            "errors": self.errors,
            "in_flight": self.in_flight,
            "rows_per_s": (sum(r for r, _ in recent) / busy) if busy else None,
        }


@dataclass
class WorkerModel:
    """The worker's one session, with the metadata tasks need to use it."""

    session: ModelSession
    name: str
    sha256: str
    layout: ImageLayout | None  # None when the model's input is not an image
    loaded_at: float = field(default_factory=time.time)
    stats: InferenceStats = field(default_factory=InferenceStats)

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
        }


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
