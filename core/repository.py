"""A Triton model repository, read: ``DIR/<name>/<version>/model.onnx`` and an optional
``config.pbtxt`` (or the same ModelConfig as ``config.yaml``) per model.

The config is Triton's own ``ModelConfig`` message (the generated class that ships in
``tritonclient.grpc``), parsed by protobuf's text format or, for YAML, its JSON mapping:
a Triton user's file reads the same here, and a misspelt field is an error naming it,
not a silently ignored line. Of it, this server uses what a batching ONNX classifier
needs; the rest is accepted and ignored (listed in ``IGNORED``, said in the index).

Pure: no ONNX, no Dask. The scheduler validates the file itself when it loads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from core.buckets import check_buckets

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")  # also a URL path segment, never ".."
CONFIGS = ("config.pbtxt", "config.yaml", "config.yml")
PLATFORMS = ("", "onnxruntime_onnx", "onnxruntime")  # platform or backend, when given
PRECISIONS = ("fp32", "fp16")
IGNORED = ("instance_group", "optimization", "input", "ensemble_scheduling", "sequence_batching")


class RepositoryError(ValueError):
    """A model the repository cannot serve; the message says which file and why."""


@dataclass(frozen=True)
class ModelSpec:
    """One model as the repository describes it; None fields take the cluster's settings."""

    name: str
    version: str
    path: str  # the version's model file
    max_batch_size: int | None = None
    buckets: tuple[int, ...] | None = None  # dynamic_batching.preferred_batch_size
    max_queue_delay: float | None = None  # seconds
    precision: str | None = None  # parameters { key: "precision" }
    labels: str | None = None  # an output's label_filename, beside config.pbtxt

    def batch_limits(self, default_max: int, default_buckets: tuple[int, ...] | None) -> tuple[int, tuple[int, ...]]:
        """The model's largest batch and its buckets, the cluster's where it sets none.
        The cluster's buckets apply only when they fit the model's largest batch."""
        most = self.max_batch_size or default_max
        if self.buckets is not None:
            return most, self.buckets
        fits = default_buckets is not None and default_buckets[-1] == most
        return most, check_buckets(default_buckets if fits else None, most)


def check_name(name: str) -> str:
    if not NAME.match(name) or name in (".", ".."):
        raise RepositoryError(f"{name!r} is not a model name (letters, digits, '_', '.', '-'; at most 128)")
    return name


def read_config(model_dir: Path) -> model_config_pb2.ModelConfig:
    """The model's ModelConfig (empty when it has no config file)."""
    found = [model_dir / c for c in CONFIGS if (model_dir / c).is_file()]
    if len(found) > 1:
        raise RepositoryError(f"{model_dir}: more than one config ({', '.join(p.name for p in found)}): keep one")
    config = model_config_pb2.ModelConfig()
    if not found:
        return config
    path = found[0]
    try:
        text = path.read_text()
        if path.suffix == ".pbtxt":
            text_format.Parse(text, config)
        else:
            json_format.ParseDict(yaml.safe_load(text) or {}, config)
    except (text_format.ParseError, json_format.ParseError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise RepositoryError(f"{path}: {e}") from None
    return config


def pick_version(model_dir: Path, config: model_config_pb2.ModelConfig, filename: str) -> str:
    """Triton's version policy: the latest version by default, or the one ``specific``
    names (this server serves one version of a model at a time: the highest asked for)."""
    versions = sorted((int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and (p / filename).is_file()))
    if not versions:
        raise RepositoryError(f"{model_dir}: no version directory holds {filename} (expected {model_dir.name}/1/{filename})")
    policy = config.version_policy.WhichOneof("policy_choice")
    if policy == "specific":
        wanted = [v for v in versions if v in set(config.version_policy.specific.versions)]
        if not wanted:
            raise RepositoryError(f"{model_dir}: version_policy asks for {list(config.version_policy.specific.versions)}, "
                                  f"the repository holds {versions}")  # fmt: skip
        return str(wanted[-1])
    return str(versions[-1])


def spec_from(name: str, model_dir: Path, config: model_config_pb2.ModelConfig) -> ModelSpec:
    if config.name and config.name != name:
        raise RepositoryError(f"{model_dir}: config names the model {config.name!r}, its directory {name!r} (Triton requires them equal)")
    for kind in (config.platform, config.backend):
        if kind not in PLATFORMS:
            raise RepositoryError(f"{model_dir}: platform/backend {kind!r}: this server runs ONNX models (onnxruntime_onnx)")
    filename = config.default_model_filename or "model.onnx"
    version = pick_version(model_dir, config, filename)
    most = config.max_batch_size or None
    buckets = None
    delay = None
    if config.HasField("dynamic_batching"):
        db = config.dynamic_batching
        if db.preferred_batch_size:  # our buckets: every batch is padded to one, the largest batch among them
            most = most or max(db.preferred_batch_size)
            if max(db.preferred_batch_size) > most or min(db.preferred_batch_size) < 1:
                raise RepositoryError(f"{model_dir}: dynamic_batching.preferred_batch_size {list(db.preferred_batch_size)} "
                                      f"must lie in 1..max_batch_size ({most})")  # fmt: skip
            buckets = check_buckets(sorted({*db.preferred_batch_size, most}), most)
        if db.max_queue_delay_microseconds:
            delay = db.max_queue_delay_microseconds / 1e6
    precision = config.parameters["precision"].string_value if "precision" in config.parameters else None
    if precision is not None and precision not in PRECISIONS:
        raise RepositoryError(f"{model_dir}: parameters precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    labels = next((o.label_filename for o in config.output if o.label_filename), None)
    if labels is not None:
        if "/" in labels or labels.startswith("."):
            raise RepositoryError(f"{model_dir}: label_filename {labels!r} must name a file beside the config")
        if not (model_dir / labels).is_file():
            raise RepositoryError(f"{model_dir}: label_filename {labels!r} does not exist")
        labels = str(model_dir / labels)
    return ModelSpec(name, version, str(model_dir / version / filename), most, buckets, delay, precision, labels)


def read_model(root: str | Path, name: str) -> ModelSpec:
    """One model's spec, read now (so a changed config or a new version is seen at load)."""
    check_name(name)
    model_dir = Path(root) / name
    if not model_dir.is_dir():
        raise RepositoryError(f"no model {name!r} in the repository {root}")
    return spec_from(name, model_dir, read_config(model_dir))


def scan(root: str | Path) -> dict[str, ModelSpec | RepositoryError]:
    """Every model directory under ``root``: its spec, or why it cannot be served."""
    root = Path(root)
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} is not a directory")
    out: dict[str, ModelSpec | RepositoryError] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            out[d.name] = read_model(root, d.name)
        except RepositoryError as e:
            out[d.name] = e
    return out


def memory_need(file_bytes: int, precision: str) -> int:
    """GPU bytes to reserve for a model before it has been measured: its weights (half in
    fp16), twice over for ONNX Runtime's arena and the convolution workspace. A worker
    reports the measured growth once loaded, and that replaces this guess."""
    weights = file_bytes // 2 if precision == "fp16" else file_bytes
    return 3 * weights


def room_for(gpu: dict | None, need: int, headroom: float) -> str | None:
    """Why a worker with this GPU sample cannot take a model needing ``need`` bytes; None
    if it can. A worker without GPU memory figures (a CPU worker) always can."""
    if not gpu or not gpu.get("memory_total") or gpu.get("memory_used") is None:
        return None
    free = gpu["memory_total"] * (1 - headroom) - gpu["memory_used"]
    if free >= need:
        return None
    return f"needs {need / 2**20:.0f} MiB of GPU memory, {max(0.0, free) / 2**20:.0f} MiB free (after {headroom:.0%} headroom)"
