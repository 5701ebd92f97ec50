"""The models a worker holds, by name, and what they share: one device (one batch on it
at a time, whichever model) and one count of the batches front ends have given it.

Each model keeps its own statistics and service curve (a front end places each model's
batches by that model's cost here); the GPU, its busy time and memory are the worker's.
A model being unloaded leaves the shelf at once, and its sessions go when the last batch
still running on them ends (they are referenced, not closed).
"""

from __future__ import annotations

import threading

from worker_setup.worker_model import NoModelError, WorkerModel

SHELF = "batch-router-shelf"  # the worker extension that holds it


class MissingModel(KeyError):
    """A batch for a model this worker does not hold (unloaded meanwhile)."""

    def __str__(self) -> str:
        return str(self.args[0])


class Shelf:
    def __init__(self) -> None:
        self.models: dict[str, WorkerModel] = {}
        self.device = threading.Lock()  # given to every model: one batch on the device at a time
        self.accepted = self.peak_accepted = 0
        self._lock = threading.Lock()

    def add(self, model: WorkerModel) -> None:
        model.device = self.device
        self.models[model.name] = model

    def remove(self, name: str) -> WorkerModel | None:
        return self.models.pop(name, None)

    def get(self, name: str = "") -> WorkerModel:
        """The model a batch names ("" = the first: the one the Python API runs)."""
        if not name:
            if not self.models:
                raise NoModelError("this worker holds no model")
            return next(iter(self.models.values()))
        model = self.models.get(name)
        if model is None:
            raise MissingModel(f"this worker does not hold model {name!r} (unloaded?)")
        return model

    # -- the worker's load, whatever the model ------------------------------------------

    def accept(self) -> None:
        """A router batch arrived (direct, or its task began)."""
        with self._lock:
            self.accepted += 1
            self.peak_accepted = max(self.peak_accepted, self.accepted)

    def reply_leaves(self) -> int:
        """Its reply leaves: the batches still here, which the reply reports, so that each
        front end sees what the others (and the other models) have in flight here."""
        with self._lock:
            self.accepted -= 1
            return self.accepted

    def busy_seconds(self) -> float:
        return sum(m.stats.busy_seconds() for m in list(self.models.values()))

    def current_rows(self) -> int:
        return sum(m.stats.current_rows() for m in list(self.models.values()))

    def observe_memory(self, used: int | None) -> None:
        for m in list(self.models.values()):
            m.stats.observe_memory(used)

    def describe(self) -> dict[str, dict]:
        """What the scheduler records of each model here (msgpack-friendly)."""
        return {name: m.summary() for name, m in self.models.items()}

    def snapshots(self) -> dict[str, dict]:
        """Each model's statistics, for the heartbeat."""
        out = {}
        for name, m in list(self.models.items()):
            out[name] = {**m.stats.snapshot(), "peak_accepted": self.peak_accepted}
        return out
