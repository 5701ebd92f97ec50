"""The models a cluster serves, by name: one ``--model`` file, or a Triton model
repository's models (``--model-repository``). Held by the scheduler plugin; what it
tells workers and front ends about each model is ``info(name)``.

Triton's states: a model is READY (served), UNLOADING (its queues are draining), or
UNAVAILABLE (in the repository, not served: never loaded, unloaded, or failed, with
the reason). Loading is the plugin's job (it asks workers); this module only keeps
the books and reads files.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from core.buckets import check_buckets
from core.config import Settings
from core.entries import uint8_entry
from core.repository import ModelSpec, RepositoryError, memory_need, read_model, scan
from scheduler_plugins.model_store import ModelFile

logger = logging.getLogger("scheduler_plugins.registry")

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"


@dataclass
class Served:
    file: ModelFile
    info: dict  # what workers and front ends are told
    state: str = READY
    measured: int = 0  # most GPU bytes a worker reported it took, once loaded
    loaded: set[str] = field(default_factory=set)  # workers that hold it


def describe(file: ModelFile, spec: ModelSpec | None, settings: Settings) -> dict:
    """A model's info: its file's metadata, and the batching its config or the cluster
    sets. Workers build sessions from it; front ends a batcher each."""
    default_buckets = settings.batching.buckets
    if spec is None:
        most, buckets = settings.max_batch_size, check_buckets(default_buckets, settings.max_batch_size)
    else:
        most, buckets = spec.batch_limits(settings.max_batch_size, default_buckets)
    precision = (spec.precision if spec else None) or settings.worker.precision
    labels = None
    if spec is not None and spec.labels:
        labels = [line.strip() for line in Path(spec.labels).read_text().splitlines() if line.strip()]
    # max_batch_size only where the model's config sets it: else each front end's own setting caps its batches.
    info = {**file.describe(), "buckets": list(buckets), "precision": precision,
            "max_batch_size": spec.max_batch_size if spec else None,
            "max_queue_delay": spec.max_queue_delay if spec else None, "labels": labels,
            "version": spec.version if spec else "1", "memory_need": memory_need(file.size, precision)}  # fmt: skip
    info["uint8"] = uint8_entry(info) if settings.uint8_model else None
    return info


class Registry:
    def __init__(self, settings: Settings, model_path: str | None = None, model_name: str | None = None) -> None:
        self.settings = settings
        self.root = settings.model_repository
        self.model_path, self.model_name = model_path, model_name
        self.models: dict[str, Served] = {}
        self.reasons: dict[str, str] = {}  # name -> why it is not served
        self.version = 0  # bumped whenever the set of READY models changes

    async def start(self) -> None:
        """``--model``: that one file; a repository: every model in it that validates
        (Triton's default control mode loads them all); the rest are UNAVAILABLE, with
        their reason in the index. No model at all stops the scheduler."""
        if self.root is None:
            file = await asyncio.to_thread(ModelFile.open, self.model_path, self.model_name)
            self.add(file, None)
            return
        for name, spec in (await asyncio.to_thread(scan, self.root)).items():
            if isinstance(spec, RepositoryError):
                self.reasons[name] = str(spec)
                logger.error("model %s is not served: %s", name, spec)
                continue
            try:
                self.add(await asyncio.to_thread(ModelFile.open, spec.path, name, True), spec)
            except (OSError, ValueError) as e:
                self.reasons[name] = str(e)
                logger.error("model %s is not served: %s", name, e)
        if not self.models:
            raise RuntimeError(f"no model in the repository {self.root} can be served: {self.reasons or 'it is empty'}")

    async def read(self, name: str) -> tuple[ModelFile, ModelSpec]:
        """A model's file and config as they are on disk now, validated. Raises
        RepositoryError (or ValueError) with the reason."""
        if self.root is None:
            raise RepositoryError("this server has no model repository (start it with --model-repository DIR)")
        spec = await asyncio.to_thread(read_model, self.root, name)
        try:
            file = await asyncio.to_thread(ModelFile.open, spec.path, name, True)
        except FileNotFoundError as e:
            raise RepositoryError(str(e)) from None
        return file, spec

    def add(self, file: ModelFile, spec: ModelSpec | None) -> Served:
        served = self.models[file.name] = Served(file, describe(file, spec, self.settings))
        self.reasons.pop(file.name, None)
        self.version += 1
        logger.info("model %s (version %s, sha256 %s…) is READY", file.name, served.info["version"], file.sha256[:12])
        return served

    def remove(self, name: str, reason: str = "unloaded") -> None:
        if self.models.pop(name, None) is not None:
            self.version += 1
        self.reasons[name] = reason

    @property
    def default(self) -> str:
        """The first model: what the Python API (``client.submit(classify, ...)``) runs."""
        return next(iter(self.models))

    def get(self, name: str | None) -> Served:
        """A model held, READY or on its way in or out (workers fetch it while it loads)."""
        served = self.models.get(name or self.default) if self.models else None
        if served is None:
            raise KeyError(f"model {name!r} is not loaded")
        return served

    def ready(self) -> dict[str, dict]:
        """READY models' info, each with the GPU memory a worker needs for it (measured
        once a worker loaded it): a worker joining later loads only what fits."""
        return {n: {**s.info, "memory_need": self.need(n)} for n, s in self.models.items() if s.state == READY}

    def need(self, name: str) -> int:
        """GPU bytes a worker must have free for it: measured once some worker loaded it."""
        s = self.models[name]
        return s.measured or s.info["memory_need"]

    def on_disk(self) -> set[str]:
        """The model directories in the repository now (file I/O: call it off the loop)."""
        if self.root is None:
            return set()
        try:
            return set(scan(self.root))
        except RepositoryError as e:
            logger.warning("%s", e)
            return set()

    def index(self, on_disk: set[str]) -> list[dict]:
        """Triton's repository index: every model in the repository (or the one file), its
        version, state and, when not READY, why."""
        out = [{"name": n, "version": s.info["version"], "state": s.state, "reason": ""} for n, s in self.models.items()]
        names = set(self.models) | on_disk
        for name in sorted(names - set(self.models)):
            out.append({"name": name, "version": "", "state": UNAVAILABLE, "reason": self.reasons.get(name, "not loaded")})
        return out
