"""Get the cluster's model onto this worker: from the local cache by SHA-256, else from
the scheduler in chunks, verified before use."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger("worker_setup.model_cache")


def cached_path(cache_dir: Path, sha256: str) -> Path:
    return cache_dir / "models" / f"{sha256}.onnx"


def verify(path: Path, sha256: str) -> bool:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**22), b""):
            h.update(block)
    return h.hexdigest() == sha256


async def ensure_model(scheduler_rpc, info: dict, cache_dir: Path) -> Path:
    """Return a verified local copy of the model described by ``info``.

    ``scheduler_rpc`` is the worker's rpc to the scheduler; the plugin serves
    ``batch_router_model_chunk``. The file is written to a temp name and renamed, so a
    crash or a concurrent worker never leaves a half-written model under the real name.
    """
    import asyncio

    path = cached_path(cache_dir, info["sha256"])
    if path.exists():
        if await asyncio.to_thread(verify, path, info["sha256"]):
            return path
        logger.warning("cached model %s is corrupt; fetching it again", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".fetch-", suffix=".onnx")
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            offset = 0
            while offset < info["size"]:
                chunk = await scheduler_rpc.batch_router_model_chunk(offset=offset, name=info["name"])
                if not chunk:
                    raise IOError(f"scheduler returned no data at offset {offset}")
                f.write(chunk)
                h.update(chunk)
                offset += len(chunk)
        if h.hexdigest() != info["sha256"]:
            raise IOError("model fetched from the scheduler does not match its SHA-256")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("fetched model %s (%d bytes) from the scheduler", info["sha256"][:12], info["size"])
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file + rename: a crashed or concurrent worker never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the cache from other users
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def derived_model(cache_dir: Path, source_sha256: str, kind: str, build: Callable[[], bytes]) -> tuple[Path, str, bool]:
    """Path and SHA-256 of a model a worker makes from a cached one (its fp16 twin, its
    uint8 entry), built once by ``build`` and cached beside it under its own hash; a
    small record file maps the source's hash to it. The third value: built just now."""
    record = cache_dir / "models" / f"{source_sha256}.{kind}"
    if record.exists():
        sha = record.read_text().strip()
        path = cached_path(cache_dir, sha)
        if sha and path.exists() and verify(path, sha):
            return path, sha, False
        logger.warning("cached %s model for %s is missing or corrupt; building it again", kind, source_sha256[:12])
    data = build()
    sha = hashlib.sha256(data).hexdigest()
    path = cached_path(cache_dir, sha)
    _write_atomic(path, data)
    _write_atomic(record, sha.encode())
    return path, sha, True
