"""A model the cluster serves, as the scheduler holds it: file, hash, metadata.

The scheduler is the single source of truth: workers ask it which models to run (by
SHA-256), fetch the bytes from it in chunks if their cache lacks them, and front ends
read input/output metadata from it. Batches never carry a model.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

from core.protocol import TensorInfo

CHUNK = 8 * 2**20  # bytes per fetch: small enough for slow tunnels, big enough for loopback


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**22), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelFile:
    path: str
    name: str
    sha256: str
    size: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    metadata: dict

    @classmethod
    def open(cls, path: str | Path, name: str, check: bool = False) -> "ModelFile":
        """Read metadata from the file itself: never assume names, shapes or dtypes.
        ``check``: ONNX's checker too, so a file that would fail on every worker is
        refused once, here, with ONNX's reason (a model loaded at run time)."""
        import onnx
        from onnx.helper import tensor_dtype_to_np_dtype

        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        try:
            proto = onnx.load(str(path), load_external_data=False)
            if check:
                onnx.checker.check_model(proto)
        except Exception as e:  # protobuf's DecodeError, onnx's ValidationError
            raise ValueError(f"{path} is not a valid ONNX model: {type(e).__name__}: {str(e).strip()[:500]}") from None
        if not proto.graph.input or not proto.graph.output:
            raise ValueError(f"{path}: the graph has no inputs or no outputs")
        initializers = {i.name for i in proto.graph.initializer}

        def info(values) -> tuple[TensorInfo, ...]:
            out = []
            for v in values:
                if v.name in initializers:
                    continue
                t = v.type.tensor_type
                dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in t.shape.dim)
                out.append(TensorInfo(v.name, str(tensor_dtype_to_np_dtype(t.elem_type)), dims))
            return tuple(out)

        return cls(
            path=str(path),
            name=name,
            sha256=sha256_file(path),
            size=path.stat().st_size,
            inputs=info(proto.graph.input),
            outputs=info(proto.graph.output),
            metadata={p.key: p.value for p in proto.metadata_props},
        )

    def describe(self) -> dict:
        """What workers and front ends are told (msgpack-friendly, no local path)."""
        d = asdict(self)
        d.pop("path")
        d["inputs"] = [asdict(t) | {"shape": list(t.shape)} for t in self.inputs]
        d["outputs"] = [asdict(t) | {"shape": list(t.shape)} for t in self.outputs]
        d["chunk"] = CHUNK
        return d

    def read_chunk(self, offset: int, length: int = CHUNK) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(min(length, CHUNK))
