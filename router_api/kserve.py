"""KServe v2 / Open Inference Protocol REST encoding, Triton flavour.

Pure functions over bytes and dicts, with no I/O and no web framework, so the HTTP
handlers and a later gRPC front end share one set of validation rules. Covers JSON
tensors and Triton's binary tensor data extension. BYTES tensors are not supported:
the served models take and return numeric tensors only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np


MAX_UINT = 2**63 - 1  # integer parameters (priority, timeout) are int64 in the protocol


class ProtocolError(Exception):
    """A client error; ``status`` is the HTTP status to answer with (400 unless told)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the model file declares it (-1 = variable dim)."""
    name: str
    datatype: str
    shape: tuple[int, ...]


# Explicit little-endian dtypes: the wire format is little-endian whatever the host is.
DTYPES: dict[str, np.dtype] = {name: np.dtype(code) for name, code in [
    ("BOOL", "?"), ("UINT8", "u1"), ("UINT16", "<u2"), ("UINT32", "<u4"), ("UINT64", "<u8"),
    ("INT8", "i1"), ("INT16", "<i2"), ("INT32", "<i4"), ("INT64", "<i8"),
    ("FP16", "<f2"), ("FP32", "<f4"), ("FP64", "<f8")]}
_BY_DTYPE = {(d.kind, d.itemsize): name for name, d in DTYPES.items()}


def datatype_of(dtype: np.dtype) -> str:
    """KServe datatype name of a numpy dtype, ignoring byte order."""
    dtype = np.dtype(dtype)
    try:
        return _BY_DTYPE[(dtype.kind, dtype.itemsize)]
    except KeyError:
        raise ValueError(f"no KServe datatype for numpy dtype {dtype}") from None


@dataclass
class InferInput:
    """One decoded input: ``data`` is little-endian row-major, ready for np.frombuffer.

    Binary inputs are views into the request body (no copy): a 32-image request is 19 MB.
    """
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes | memoryview | ShmTensor  # ShmTensor: until the handler reads its region


@dataclass(frozen=True)
class ShmTensor:
    """A tensor in a registered system shared-memory region (Triton's extension)."""
    region: str
    offset: int
    byte_size: int


def shm_tensor(params: dict, where: str) -> ShmTensor | None:
    """The shared_memory_* parameters of an input or output, or None without them."""
    region = params.get("shared_memory_region")
    if region is None:
        return None
    size, offset = params.get("shared_memory_byte_size"), params.get("shared_memory_offset", 0)
    if not isinstance(region, str) or type(size) is not int or size <= 0 or type(offset) is not int or offset < 0:
        raise ProtocolError(f"{where}: shared_memory_region must be a name, shared_memory_byte_size a positive integer "
                            "and shared_memory_offset a non-negative one")  # fmt: skip
    return ShmTensor(region, offset, size)


@dataclass
class RequestedOutput:
    name: str
    binary: bool
    shm: ShmTensor | None = None  # written into this region instead of the body


@dataclass
class InferRequest:
    """A validated request; ``outputs`` is already resolved against the model."""
    id: str | None
    inputs: list[InferInput]
    outputs: list[RequestedOutput]
    rows: int
    priority: int
    timeout_us: int
    parameters: dict


def _field(obj: dict, key: str, default: Any, kind: str, where: str) -> Any:
    """obj[key] or default, of the JSON ``kind`` named; ``type(v) is int`` keeps true/false out."""
    value = obj.get(key, default)
    ok = {"an object": isinstance(value, dict), "a boolean": isinstance(value, bool),
          "a list": isinstance(value, list),
          "a non-negative integer": type(value) is int and 0 <= value <= MAX_UINT}[kind]
    if not ok:
        raise ProtocolError(f"{where}: '{key}' must be {kind}, got {value!r}")
    return value


def _named(entries: list, field: str) -> list[tuple[str, dict]]:
    if not all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries):
        raise ProtocolError(f"each entry of '{field}' must be an object with a string 'name'")
    return [(e["name"], e) for e in entries]


def check_shape(spec: TensorSpec, shape: Any, max_batch_size: int) -> tuple[int, ...]:
    """Check a request shape against the model's; the first dim is the batch dim."""
    where = f"input '{spec.name}'"
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise ProtocolError(f"{where}: 'shape' must be a list of integers")
    if len(shape) != len(spec.shape):
        raise ProtocolError(f"{where}: shape {shape} has rank {len(shape)}, model has {list(spec.shape)}")
    if any(d < 0 for d in shape):
        raise ProtocolError(f"{where}: shape {shape} has a negative dimension")
    for i, (got, want) in enumerate(zip(shape[1:], spec.shape[1:]), start=1):
        if want != -1 and got != want:
            raise ProtocolError(f"{where}: shape {shape} differs from model {list(spec.shape)} at dim {i}")
    if shape[0] < 1:
        raise ProtocolError(f"{where}: batch size must be at least 1, got {shape[0]}")
    if shape[0] > max_batch_size:
        raise ProtocolError(f"{where}: batch size {shape[0]} exceeds max_batch_size "
                            f"{max_batch_size}")
    return tuple(shape)


def _json_data(spec: TensorSpec, shape: tuple[int, ...], data: Any) -> bytes:
    """Convert a nested or flat JSON ``data`` list into wire bytes, strictly."""
    where = f"input '{spec.name}'"
    if not isinstance(data, list):
        raise ProtocolError(f"{where}: 'data' must be a list")
    try:
        arr = np.array(data)
    except ValueError as exc:  # ragged nesting
        raise ProtocolError(f"{where}: 'data' is not a regular nested list: {exc}") from None
    dtype = DTYPES[spec.datatype]
    allowed = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[dtype.kind]
    if arr.size and arr.dtype.kind not in allowed:
        raise ProtocolError(f"{where}: 'data' holds values that are not valid {spec.datatype}")
    if arr.size != math.prod(shape):
        raise ProtocolError(f"{where}: 'data' has {arr.size} elements, shape {list(shape)} "
                            f"needs {math.prod(shape)}")
    info = np.iinfo(dtype) if dtype.kind in "iu" else None
    if info and arr.size and not info.min <= arr.min() <= arr.max() <= info.max:
        raise ProtocolError(f"{where}: 'data' values out of range for {spec.datatype}")
    return arr.astype(dtype, copy=False).tobytes()


def _raw_binary_request(body: bytes | memoryview, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> InferRequest:
    """Header length 0: the body is one input's bytes, batch 1, all outputs binary."""
    if len(inputs) != 1 or any(d < 0 for d in inputs[0].shape[1:]):
        raise ProtocolError("a raw binary request (Inference-Header-Content-Length: 0) needs a "
                            "single-input model whose input has no variable dims besides the batch")
    spec = inputs[0]
    shape = (1, *spec.shape[1:])
    expected = math.prod(shape) * DTYPES[spec.datatype].itemsize
    if len(body) != expected:
        raise ProtocolError(f"raw binary request: body is {len(body)} bytes, shape {list(shape)} "
                            f"needs {expected}")
    return InferRequest(id=None, inputs=[InferInput(spec.name, spec.datatype, shape, body)],
                        outputs=[RequestedOutput(o.name, True) for o in outputs],
                        rows=1, priority=0, timeout_us=0, parameters={})


def _resolve_outputs(req: dict, outputs: list[TensorSpec], binary_default: bool) -> list[RequestedOutput]:
    """Apply the request's output selection; none listed means every model output."""
    if "outputs" not in req:
        return [RequestedOutput(o.name, binary_default) for o in outputs]
    listed = _field(req, "outputs", None, "a list", "request")
    known = {o.name for o in outputs}
    resolved: list[RequestedOutput] = []
    for name, entry in _named(listed, "outputs"):
        where = f"output '{name}'"
        if name not in known:
            raise ProtocolError(f"unknown output '{name}', model outputs are {sorted(known)}")
        if any(r.name == name for r in resolved):
            raise ProtocolError(f"{where} is requested more than once")
        params = _field(entry, "parameters", {}, "an object", where)
        if "classification" in params:
            raise ProtocolError(f"{where}: the classification extension is not supported")
        binary = _field(params, "binary_data", binary_default, "a boolean", where)
        resolved.append(RequestedOutput(name, binary, shm_tensor(params, where)))
    return resolved


def parse_infer_request(body: bytes | memoryview, header_length: int | None, inputs: list[TensorSpec],
                        outputs: list[TensorSpec], max_batch_size: int) -> InferRequest:
    """Decode and fully validate one inference request; raises ProtocolError(400).

    Binary tensors come back as views into ``body``, not copies.
    """
    if header_length is not None and not 0 <= header_length <= len(body):
        raise ProtocolError(f"Inference-Header-Content-Length {header_length} is outside the "
                            f"{len(body)}-byte body")
    if header_length == 0:
        return _raw_binary_request(body, inputs, outputs)
    split = len(body) if header_length is None else header_length
    head = body[:split]
    try:
        req = json.loads(head if isinstance(head, bytes) else bytes(head))  # a body in shared memory is a view
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ProtocolError(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("malformed JSON: nested too deeply") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise ProtocolError("request must be a JSON object with an 'inputs' list")
    if not isinstance(request_id := req.get("id"), (str, type(None))):
        raise ProtocolError("'id' must be a string")
    params = _field(req, "parameters", {}, "an object", "request")
    priority = _field(params, "priority", 0, "a non-negative integer", "request")
    timeout_us = _field(params, "timeout", 0, "a non-negative integer", "request")
    binary_default = _field(params, "binary_data_output", False, "a boolean", "request")

    specs = {s.name: s for s in inputs}
    sent: dict[str, dict] = {}
    for name, entry in _named(req["inputs"], "inputs"):
        if name not in specs:
            raise ProtocolError(f"unknown input '{name}', model inputs are {sorted(specs)}")
        if name in sent:
            raise ProtocolError(f"input '{name}' is given more than once")
        sent[name] = entry
    if missing := [n for n in specs if n not in sent]:
        raise ProtocolError(f"missing input(s) {missing}")

    binary = memoryview(body)[split:]
    binary_size = len(binary)
    offset = 0
    decoded: list[InferInput] = []
    for name, entry in sent.items():  # binary parts follow the order of the JSON list
        spec = specs[name]
        where = f"input '{name}'"
        if entry.get("datatype") != spec.datatype:
            raise ProtocolError(f"{where}: datatype {entry.get('datatype')!r} does not match model "
                                f"datatype {spec.datatype}")
        shape = check_shape(spec, entry.get("shape"), max_batch_size)
        tensor_params = _field(entry, "parameters", {}, "an object", where)
        size = tensor_params.get("binary_data_size")
        shm = shm_tensor(tensor_params, where)
        if shm is not None:  # in a registered region: the handler reads it from there
            expected = math.prod(shape) * DTYPES[spec.datatype].itemsize
            if size is not None or "data" in entry or shm.byte_size != expected:
                raise ProtocolError(f"{where}: a shared-memory input takes neither data nor binary_data_size, and "
                                    f"shared_memory_byte_size {shm.byte_size} must be {expected} (shape {list(shape)})")  # fmt: skip
            data = shm
        elif size is not None and "data" not in entry:
            expected = math.prod(shape) * DTYPES[spec.datatype].itemsize
            if type(size) is not int or size != expected:
                raise ProtocolError(f"{where}: binary_data_size {size!r} does not match shape "
                                    f"{list(shape)} of {spec.datatype} ({expected} bytes)")
            if offset + size > binary_size:
                raise ProtocolError(f"{where}: binary_data_size {size} does not match the "
                                    f"{binary_size - offset} binary bytes left in the body")
            data = binary[offset:offset + size]
            offset += size
        elif size is None and "data" in entry:
            data = _json_data(spec, shape, entry["data"])
        else:
            raise ProtocolError(f"{where}: needs exactly one of 'data' and binary_data_size")
        decoded.append(InferInput(name, spec.datatype, shape, data))
    if offset != binary_size:
        raise ProtocolError(f"binary_data_size total {offset} does not match the {binary_size} "
                            "binary bytes after the JSON header")
    rows = {i.shape[0] for i in decoded}
    if len(rows) > 1:
        raise ProtocolError(f"inputs disagree on the batch size: {sorted(rows)}")
    return InferRequest(id=request_id, inputs=decoded, outputs=_resolve_outputs(req, outputs, binary_default),
                        rows=rows.pop(), priority=priority, timeout_us=timeout_us, parameters=params)


def encode_infer_response(model_name: str, model_version: str, request_id: str | None,
                          outputs: list[tuple[RequestedOutput, np.ndarray]]) -> tuple[bytes, int | None]:
    """Encode a response; returns (body, Inference-Header-Content-Length or None). Binary
    outputs are copied once, into the body."""
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        header["id"] = request_id
    tensors, blobs = [], []
    for requested, arr in outputs:
        datatype = datatype_of(arr.dtype)
        tensor: dict[str, Any] = {"name": requested.name, "datatype": datatype, "shape": list(arr.shape)}
        if requested.shm is not None:  # already written into its region
            tensor["parameters"] = {"shared_memory_region": requested.shm.region, "shared_memory_byte_size": arr.nbytes}
        elif requested.binary:  # a view where the array already is little-endian and contiguous
            raw = np.ascontiguousarray(arr, dtype=DTYPES[datatype])
            tensor["parameters"] = {"binary_data_size": raw.nbytes}
            blobs.append(memoryview(raw).cast("B"))
        else:
            tensor["data"] = json_values(arr)
        tensors.append(tensor)
    header["outputs"] = tensors
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return (b"".join([head, *blobs]), len(head)) if blobs else (head, None)


NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def json_number(x: float) -> float | str:
    """A float as JSON can hold it: NaN and the infinities become the strings "NaN",
    "Infinity" and "-Infinity", as proto3's JSON mapping (KServe's gRPC gateway) writes them."""
    return x if math.isfinite(x) else "NaN" if x != x else NON_FINITE[x]


def json_values(arr: np.ndarray) -> list:
    """A tensor's values, flat, for a JSON ``data`` list (float16/32 become Python floats)."""
    values = arr.ravel().tolist()
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        values = [json_number(v) for v in values]
    return values


def error_body(message: str) -> bytes:
    """The protocol's error object, ``{"error": message}``."""
    return json.dumps({"error": message}).encode()


def server_metadata(name: str, version: str, extensions: list[str]) -> dict:
    return {"name": name, "version": version, "extensions": list(extensions)}


def _tensor_md(specs: list[TensorSpec]) -> list[dict]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]


def model_metadata(name: str, version: str, platform: str,
                   inputs: list[TensorSpec], outputs: list[TensorSpec]) -> dict:
    """Metadata shapes keep the batch dim (-1): perf_analyzer strips it itself."""
    return {"name": name, "versions": [version], "platform": platform,
            "inputs": _tensor_md(inputs), "outputs": _tensor_md(outputs)}


def _config_tensors(specs: list[TensorSpec]) -> list[dict]:
    return [{"name": s.name, "data_type": f"TYPE_{s.datatype}", "dims": list(s.shape[1:])} for s in specs]


def model_config(name: str, platform: str, max_batch_size: int, inputs: list[TensorSpec],
                 outputs: list[TensorSpec], dynamic_batching: dict) -> dict:
    """Triton-style config (TYPE_* names, dims without the batch dim), as perf_analyzer reads it.

    Triton platform names are "<backend>_<format>", e.g. onnxruntime_onnx, tensorrt_plan.
    """
    return {"name": name, "platform": platform, "backend": platform.split("_")[0],
            "max_batch_size": max_batch_size, "input": _config_tensors(inputs),
            "output": _config_tensors(outputs), "dynamic_batching": dict(dynamic_batching)}
