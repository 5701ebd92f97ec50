"""batch-router's settings: one default each (``batch-router.yaml``), one schema that
checks them, and typed access for the code that uses them.

Users set keys the Dask way, in ``~/.config/dask/*.yaml``, as ``DASK_BATCH_ROUTER__...``
environment variables, or with ``dask.config.set``; each room hands the resulting
``dask.config.get("batch-router")`` to :func:`parse` when it starts. A wrong key or a
wrong value stops that start with an error naming the key, instead of surfacing later
as a KeyError deep inside a worker. This module imports no Dask: the rooms do the
reading, so it is testable alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.buckets import check_buckets
from core.placement import POLICIES, Tuning

with Path(__file__).with_name("batch-router.yaml").open() as f:
    DEFAULTS: dict = yaml.safe_load(f)  # {"batch-router": {...}}, for dask.config.update_defaults

# Dask settings batch-router needs: the front end balances work itself, and late binding
# means a task never waits on a worker long enough to be worth stealing.
DASK_SETTINGS = {
    "distributed.scheduler.work-stealing": False,
    # A batch of 32 float32 images is ~19 MB; that is expected, not a mistake.
    "distributed.admin.large-graph-warning-threshold": "256MiB",
    # Dask keeps the last N messages of every stream (and events of every topic) for
    # debugging; at 1000 that is ~600 MB per worker stream of retained batches.
    "distributed.admin.low-level-log-length": 32,
    # Each burst of batches is a "computation" holding its TaskGroup: keep a few, not 100.
    "distributed.diagnostics.computations.max-history": 8,
}

# Over a tunnel (bore.pub, 100-500 ms round trips, Colab runtimes that vanish): notice a
# silent worker in about a minute, not Dask's default 5-10.
TUNNEL_SETTINGS = {
    "distributed.scheduler.worker-ttl": "60s",
    "distributed.comm.timeouts.connect": "60s",
}


PRECISIONS = ("fp32", "fp16")
CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")


class ConfigError(ValueError):
    """A setting that does not exist or does not fit its schema; the message names it."""


# -- value kinds: what a key accepts, and what the code gets ---------------------------

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zµ]*)\s*$")
_SECONDS = {
    "": 1.0, "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "ns": 1e-9, "nanoseconds": 1e-9, "us": 1e-6, "µs": 1e-6, "microseconds": 1e-6,
    "ms": 1e-3, "milliseconds": 1e-3, "m": 60.0, "min": 60.0, "minute": 60.0,
    "minutes": 60.0, "h": 3600.0, "hour": 3600.0, "hours": 3600.0, "d": 86400.0,
    "day": 86400.0, "days": 86400.0, "w": 604800.0, "week": 604800.0, "weeks": 604800.0,
}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*$")
_BYTES = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20,
          "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}  # fmt: skip


def seconds(value: Any) -> float:
    """A duration as Dask writes them ("500ms", "2s", "10m"; a bare number is seconds)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    m = _DURATION.match(str(value).lower()) if isinstance(value, str) else None
    if m is None or m.group(2) not in _SECONDS:
        raise ValueError(f"{value!r} is not a duration (e.g. 500ms, 2s, 10m)")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def nbytes(value: Any) -> int:
    """A size as Dask writes them ("64MiB", "1GB"; a bare number is bytes)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _SIZE.match(str(value).lower()) if isinstance(value, str) else None
    if m is None or m.group(2) not in _BYTES:
        raise ValueError(f"{value!r} is not a size (e.g. 64MiB, 1GB)")
    return int(float(m.group(1)) * _BYTES[m.group(2)])


@dataclass(frozen=True)
class Kind:
    """What one key accepts; ``parse`` returns the typed value or raises ValueError."""

    nullable: bool = False

    def parse(self, value: Any) -> Any:
        if value in (None, "") and self.nullable:
            return None
        return self.check(value)

    def check(self, value: Any) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Number(Kind):
    minimum: float = 0
    maximum: float | None = None
    integer: bool = False

    def check(self, value: Any) -> float | int:
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            raise ValueError(f"{value!r} is not {'an integer' if self.integer else 'a number'}")
        if value < self.minimum or (self.maximum is not None and value > self.maximum):
            raise ValueError(f"{value} is outside {self.minimum:g}..{'' if self.maximum is None else f'{self.maximum:g}'}")
        return value if self.integer else float(value)


def Int(minimum: int = 0, maximum: int | None = None) -> Number:  # noqa: N802 - reads as a kind
    return Number(minimum=minimum, maximum=maximum, integer=True)


@dataclass(frozen=True)
class Duration(Kind):
    """Seconds; with ``off``, also ``off``/``false``/null, which read as None."""

    off: bool = False

    def parse(self, value: Any) -> float | None:
        if self.off and value in (None, False, "off"):
            return None
        return seconds(value)


@dataclass(frozen=True)
class Size(Kind):
    def check(self, value: Any) -> int:
        return nbytes(value)


@dataclass(frozen=True)
class Choice(Kind):
    values: tuple[str, ...] = ()

    def check(self, value: Any) -> str:
        if value is False and "off" in self.values:  # YAML 1.1 reads a bare `off` as false
            return "off"
        if value not in self.values:
            raise ValueError(f"{value!r} is not one of {', '.join(self.values)}")
        return value


@dataclass(frozen=True)
class Text(Kind):
    def check(self, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{value!r} is not a non-empty string")
        return value


@dataclass(frozen=True)
class Device(Kind):
    """An NVML device: an index, or a GPU-/MIG- UUID."""

    def check(self, value: Any) -> int | str:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if isinstance(value, str) and value:
            return value
        raise ValueError(f"{value!r} is neither a device index nor a UUID")


@dataclass(frozen=True)
class IntList(Kind):
    def check(self, value: Any) -> tuple[int, ...]:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{value!r} is not a list of integers")
        return tuple(value)


@dataclass(frozen=True)
class Flag(Kind):
    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"{value!r} is not true or false")
        return value


def key(kind: Kind) -> Any:
    return field(metadata={"kind": kind})


def section(cls: type) -> Any:
    return field(metadata={"section": cls})


# -- the schema: one dataclass per section, fields named after their keys --------------


@dataclass(frozen=True)
class Placement:
    policy: str = key(Choice(values=POLICIES))
    overdue_factor: float = key(Number(minimum=1.0))
    overdue_min: float = key(Duration())
    hedge_factor: float = key(Number(minimum=1.0))
    hedge_min: float = key(Duration())
    hedge_budget: float = key(Number(maximum=1.0))
    probe_after: float | None = key(Duration(off=True))
    throttle_penalty: float = key(Number(minimum=0.01, maximum=1.0))
    memory_headroom: float = key(Number(maximum=0.99))
    error_penalty_window: float = key(Duration())


@dataclass(frozen=True)
class Http:
    host: str = key(Text())
    port: int = key(Int(maximum=65535))
    max_body_size: int = key(Size())
    top_k: int = key(Int(minimum=1))
    frontends: int = key(Int(minimum=1))
    idle_timeout: float = key(Duration())
    max_image_pixels: int = key(Int(minimum=1))
    auth_token: str | None = key(Text(nullable=True))
    max_request_pixels: int = key(Int(minimum=1))
    body_timeout: float = key(Duration())
    min_body_rate: int = key(Size())


@dataclass(frozen=True)
class Scheduler:
    host: str = key(Text())
    port: int = key(Int(maximum=65535))
    public_address: str | None = key(Text(nullable=True))
    bore_server: str = key(Text())
    dashboard_address: str = key(Text())


@dataclass(frozen=True)
class Grpc:
    port: int = key(Int(maximum=65535))
    acceptors: int = key(Int(minimum=1, maximum=64))


@dataclass(frozen=True)
class Repository:
    allow_load: bool = key(Flag())


@dataclass(frozen=True)
class Dashboard:
    interval: float = key(Duration())
    history: float = key(Duration())


@dataclass(frozen=True)
class Tls:
    dir: str | None = key(Text(nullable=True))


@dataclass(frozen=True)
class Batching:
    buckets: tuple[int, ...] | None = key(IntList(nullable=True))  # checked against max-batch-size by parse


@dataclass(frozen=True)
class Cuda:
    """ONNX Runtime CUDA execution provider options, named as ORT's documentation does."""

    cudnn_conv_algo_search: str = key(Choice(values=CONV_ALGO_SEARCH))
    cudnn_conv_use_max_workspace: bool = key(Flag())
    use_tf32: bool = key(Flag())
    prefer_nhwc: bool = key(Flag())
    arena_extend_strategy: str = key(Choice(values=("kNextPowerOfTwo", "kSameAsRequested")))
    gpu_mem_limit: int | None = key(Size(nullable=True))
    graphs: bool = key(Flag())  # enable_cuda_graph, one graph per bucket (gpu_graph_id)


@dataclass(frozen=True)
class Worker:
    count: int = key(Int())
    device: str = key(Choice(values=("auto", "cpu", "cuda")))
    intra_op_threads: int | None = key(Number(minimum=0, integer=True, nullable=True))  # 0 or null: cores / workers
    cache_dir: str | None = key(Text(nullable=True))
    gpu_metrics: str = key(Choice(values=("auto", "nvml", "simulated", "off")))
    gpu_index: int | str | None = key(Device(nullable=True))
    metrics_interval: float = key(Duration())
    slowdown: float = key(Number(minimum=1.0))
    batch_time: float = key(Duration())
    precision: str = key(Choice(values=PRECISIONS))
    io_binding: bool = key(Flag())
    warmup_cpu_max_rows: int = key(Int())
    cpu_affinity: tuple[int, ...] | None = key(IntList(nullable=True))
    gpu_decode: str = key(Choice(values=("auto", "off")))
    cuda: Cuda = section(Cuda)


@dataclass(frozen=True)
class Settings:
    """Every ``batch-router.*`` key, typed: durations in seconds, sizes in bytes."""

    model: str | None = key(Text(nullable=True))
    model_name: str | None = key(Text(nullable=True))
    model_repository: str | None = key(Text(nullable=True))
    repository: Repository = section(Repository)
    uint8_model: bool = key(Flag())
    labels: str | None = key(Text(nullable=True))
    max_batch_size: int = key(Int(minimum=1))
    max_queue_delay: float = key(Duration())
    max_queue_size: int = key(Int())
    max_queue_wait: float | None = key(Duration(off=True))
    window: int = key(Int(minimum=1))
    max_window: int = key(Int(minimum=1))
    priority_levels: int = key(Int(minimum=1))
    default_priority_level: int = key(Int(minimum=1))
    default_timeout: float = key(Duration())
    starvation_limit: float = key(Duration())
    retry_after: int = key(Int())
    batching: Batching = section(Batching)
    placement: Placement = section(Placement)
    http: Http = section(Http)
    grpc: Grpc = section(Grpc)
    scheduler: Scheduler = section(Scheduler)
    dashboard: Dashboard = section(Dashboard)
    tls: Tls = section(Tls)
    worker: Worker = section(Worker)
    batched_send_interval: float = key(Duration())
    compress_beyond: float | None = key(Duration(off=True))
    trace: bool = key(Flag())
    direct_lane: str = key(Choice(values=("same-host", "off")))
    shared_memory: int = key(Size())


def parse(tree: Mapping | None = None) -> Settings:
    """The defaults overlaid with ``tree`` (what ``dask.config.get("batch-router")``
    holds), checked against the schema. Raises ConfigError naming the first bad key."""
    merged = _merge(DEFAULTS["batch-router"], _canonical(tree or {}))
    settings = _build(Settings, merged, "batch-router")
    if settings.default_priority_level > settings.priority_levels:
        raise ConfigError(f"batch-router.default-priority-level: {settings.default_priority_level} "
                          f"exceeds priority-levels ({settings.priority_levels})")  # fmt: skip
    try:
        check_buckets(settings.batching.buckets, settings.max_batch_size)
    except ValueError as e:
        raise ConfigError(f"batch-router.batching.buckets: {e}") from None
    if settings.worker.precision == "fp16" and settings.worker.device == "cpu":
        raise ConfigError("batch-router.worker.precision: fp16 needs a CUDA device; ONNX Runtime's CPU provider "
                          "runs an fp16 model in fp32 (no faster, measured), so there fp16 only adds error: use fp32")
    if settings.model and settings.model_repository:
        raise ConfigError("batch-router.model-repository: serve one model file (model) or a repository, not both")
    if settings.worker.cuda.graphs and not settings.worker.io_binding:
        raise ConfigError("batch-router.worker.cuda.graphs: CUDA graphs replay fixed device buffers, so they need "
                          "worker.io-binding: true")
    return settings


def _canonical(tree: Mapping) -> dict:
    """Dask treats ``a_b`` and ``a-b`` as one key (environment variables give the first)."""
    return {str(k).replace("_", "-"): _canonical(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, Mapping) and isinstance(base.get(k), dict) else v
    return out


def _build(cls: type, tree: Any, where: str) -> Any:
    fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{where}: expected a mapping of settings, got {tree!r}")
    unknown = [k for k in tree if k not in fields]
    if unknown:
        near = difflib.get_close_matches(unknown[0], list(fields), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else f"; known keys: {', '.join(fields)}"
        raise ConfigError(f"{where}.{unknown[0]}: no such setting{hint}")
    values = {}
    for name, f in fields.items():
        value = tree.get(name)
        if "section" in f.metadata:
            values[f.name] = _build(f.metadata["section"], value, f"{where}.{name}")
            continue
        try:
            values[f.name] = f.metadata["kind"].parse(value)
        except ValueError as e:
            raise ConfigError(f"{where}.{name}: {e}") from None
    return cls(**values)


# -- what follows from settings ---------------------------------------------------------


def placement_tuning(settings: Settings) -> Tuning:
    """The placement policy's knobs, the same for the front end and the scheduler plugin."""
    p = settings.placement
    return Tuning(p.throttle_penalty, p.memory_headroom, p.error_penalty_window)



def buckets(settings: Settings) -> tuple[int, ...]:
    """The cluster's batch shapes (see ``core.buckets``)."""
    return check_buckets(settings.batching.buckets, settings.max_batch_size)


def cache_dir(settings: Settings) -> Path:
    """Where models are built and cached: $XDG_CACHE_HOME/gpu-batch-router by default."""
    if settings.worker.cache_dir:
        return Path(settings.worker.cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpu-batch-router"


def tls_dir(settings: Settings) -> Path:
    """The cluster CA and its certificates: $XDG_CONFIG_HOME/gpu-batch-router/tls by default."""
    if settings.tls.dir:
        return Path(settings.tls.dir).expanduser()
    return Path(os.environ.get("XDG_CONFIG_HOME", "~/.config")).expanduser() / "gpu-batch-router" / "tls"
