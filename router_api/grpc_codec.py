"""KServe v2 gRPC messages <-> what the HTTP path already speaks (``kserve.py``).

Pure functions over the generated messages that ship with ``tritonclient.grpc`` (never
hand-written ones): a ``ModelInferRequest`` becomes the same ``kserve.InferRequest`` a
REST body does, checked by the same rules (``ProtocolError`` -> INVALID_ARGUMENT), and
metadata, config and statistics are the REST endpoints' dicts parsed into their
messages, so the two protocols cannot disagree.

Inference requests arrive as their bytes (``parse_infer``): the tensors in
``raw_input_contents`` are sliced out of the message as views, the rest is parsed by
the generated class. Letting protobuf parse them costs two copies of every tensor (into
its arena, then out as ``bytes``), a third of the front end's memory traffic per call.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tritonclient.grpc import model_config_pb2, service_pb2 as pb

from router_api import kserve
from router_api.kserve import MAX_UINT, ProtocolError

# The typed ``contents`` field each datatype travels in; FP16 has none (raw only).
TYPED = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
         "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
         "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}  # fmt: skip


def _param(params: Any, key: str) -> int:
    """A non-negative integer request parameter (priority, timeout); 0 when absent."""
    if key not in params:
        return 0
    p = params[key]
    which = p.WhichOneof("parameter_choice")
    value = getattr(p, which) if which in ("int64_param", "uint64_param") else None
    if value is None or not 0 <= value <= MAX_UINT:
        raise ProtocolError(f"parameter '{key}' must be a non-negative integer")
    return value


def _shm(params: Any, where: str) -> kserve.ShmTensor | None:
    """The shared_memory_* parameters, as REST's are read (``kserve.shm_tensor``)."""
    if not params:
        return None
    plain = {k: getattr(p, p.WhichOneof("parameter_choice")) for k, p in params.items()
             if k.startswith("shared_memory_") and p.WhichOneof("parameter_choice")}  # fmt: skip
    return kserve.shm_tensor(plain, where)


def _typed(spec: kserve.TensorSpec, t: Any, shape: tuple[int, ...]) -> bytes:
    where = f"input '{spec.name}'"
    field = TYPED.get(spec.datatype)
    if field is None:
        raise ProtocolError(f"{where}: {spec.datatype} has no typed contents; send it in raw_input_contents")
    values = getattr(t.contents, field)
    if len(values) != math.prod(shape):
        raise ProtocolError(f"{where}: {len(values)} values in contents, shape {list(shape)} needs {math.prod(shape)}")
    dtype = kserve.DTYPES[spec.datatype]
    arr = np.asarray(values, dtype=np.float64 if dtype.kind == "f" else None)
    if dtype.kind in "iu" and arr.size:
        info = np.iinfo(dtype)
        if not info.min <= int(arr.min()) <= int(arr.max()) <= info.max:
            raise ProtocolError(f"{where}: values out of range for {spec.datatype}")
    return arr.astype(dtype).tobytes()


RAW_FIELD = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number
LENGTH_DELIMITED = 2
FIXED = {1: 8, 5: 4}  # wire types of fixed width: 64 and 32 bits


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ProtocolError("malformed ModelInferRequest: a varint runs past the message")
        b = data[at]
        value |= (b & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if b < 0x80:
            return value, at


def parse_infer(data: bytes) -> tuple[pb.ModelInferRequest, list[memoryview]]:
    """A serialized ModelInferRequest as its message without ``raw_input_contents`` and
    those entries as views of ``data``, in order. Only the top level is walked: every
    field but that one goes to the generated parser as it came."""
    view, rest, raw, at = memoryview(data), bytearray(), [], 0
    while at < len(data):
        start = at
        key, at = _varint(data, at)
        field, wire = key >> 3, key & 7
        if wire == LENGTH_DELIMITED:
            size, at = _varint(data, at)
            if field == RAW_FIELD and at + size <= len(data):
                raw.append(view[at : at + size])
                at += size
                continue
            at += size
        elif wire == 0:
            _, at = _varint(data, at)
        elif wire in FIXED:
            at += FIXED[wire]
        else:
            raise ProtocolError(f"malformed ModelInferRequest: wire type {wire} at byte {start}")
        if at > len(data):
            raise ProtocolError("malformed ModelInferRequest: a field runs past the message")
        rest += view[start:at]
    try:
        return pb.ModelInferRequest.FromString(bytes(rest)), raw
    except DecodeError as e:
        raise ProtocolError(f"malformed ModelInferRequest: {e}") from None


def infer_request(msg: pb.ModelInferRequest, inputs: list[kserve.TensorSpec], outputs: list[kserve.TensorSpec],
                  max_batch_size: int, raw: list | None = None) -> kserve.InferRequest:  # fmt: skip
    """Decode and fully validate one request; raises ProtocolError. Raw inputs stay the
    message's own bytes (no copy); ``raw``: those ``parse_infer`` took out of it."""
    specs = {s.name: s for s in inputs}
    raw = list(msg.raw_input_contents) if raw is None else list(raw)
    by_region = {t.name: _shm(t.parameters, f"input '{t.name}'") for t in msg.inputs}
    if raw and len(raw) != sum(1 for r in by_region.values() if r is None):
        raise ProtocolError(f"raw_input_contents holds {len(raw)} entries: one for each input not in shared memory, or none")
    decoded: list[kserve.InferInput] = []
    for t in msg.inputs:
        spec = specs.get(t.name)
        if spec is None:
            raise ProtocolError(f"unknown input '{t.name}', model inputs are {sorted(specs)}")
        if any(d.name == t.name for d in decoded):
            raise ProtocolError(f"input '{t.name}' is given more than once")
        if t.datatype != spec.datatype:
            raise ProtocolError(f"input '{t.name}': datatype {t.datatype!r} does not match model datatype {spec.datatype}")
        shape = kserve.check_shape(spec, list(t.shape), max_batch_size)
        expected = math.prod(shape) * kserve.DTYPES[spec.datatype].itemsize
        if (shm := by_region[t.name]) is not None:  # read from the region by the server, once checked
            if t.HasField("contents") or shm.byte_size != expected:
                raise ProtocolError(f"input '{t.name}': a shared-memory input takes no contents, and "
                                    f"shared_memory_byte_size {shm.byte_size} must be {expected} (shape {list(shape)})")  # fmt: skip
            data = shm
        elif raw:
            if t.HasField("contents"):
                raise ProtocolError(f"input '{t.name}': contents and raw_input_contents both given")
            data = raw.pop(0)
            if len(data) != expected:
                raise ProtocolError(f"input '{t.name}': {len(data)} raw bytes, shape {list(shape)} of {spec.datatype} needs {expected}")
        else:
            data = _typed(spec, t, shape)
        decoded.append(kserve.InferInput(t.name, spec.datatype, shape, data))
    if missing := [n for n in specs if all(d.name != n for d in decoded)]:
        raise ProtocolError(f"missing input(s) {missing}")
    rows = {d.shape[0] for d in decoded}
    if len(rows) > 1:
        raise ProtocolError(f"inputs disagree on the batch size: {sorted(rows)}")
    known = {o.name for o in outputs}
    asked = [(o.name, _shm(o.parameters, f"output '{o.name}'")) for o in msg.outputs] or [(o.name, None) for o in outputs]
    if unknown := [n for n, _ in asked if n not in known]:
        raise ProtocolError(f"unknown output(s) {unknown}, model outputs are {sorted(known)}")
    if len({n for n, _ in asked}) != len(asked):
        raise ProtocolError("an output is requested more than once")
    return kserve.InferRequest(id=msg.id or None, inputs=decoded, outputs=[kserve.RequestedOutput(n, True, shm) for n, shm in asked],
                               rows=rows.pop(), priority=_param(msg.parameters, "priority"),
                               timeout_us=_param(msg.parameters, "timeout"), parameters={})  # fmt: skip


def infer_response(model: str, version: str, request_id: str | None, arrays: list[tuple[Any, np.ndarray]]) -> pb.ModelInferResponse:
    """Outputs as raw_output_contents, little-endian, as tritonclient reads them."""
    r = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id or "")
    for o, arr in arrays:
        out = r.outputs.add(name=o.name, datatype=kserve.datatype_of(arr.dtype), shape=list(arr.shape))
        if o.shm is not None:  # already in its region: named here, and an empty entry keeps the others' places
            out.parameters["shared_memory_region"].string_param = o.shm.region
            out.parameters["shared_memory_byte_size"].int64_param = arr.nbytes
            r.raw_output_contents.append(b"")
        else:
            r.raw_output_contents.append(np.ascontiguousarray(arr, arr.dtype.newbyteorder("<")).tobytes())
    return r


def server_metadata(meta: dict) -> pb.ServerMetadataResponse:
    return json_format.ParseDict(meta, pb.ServerMetadataResponse(), ignore_unknown_fields=True)


def model_metadata(meta: dict) -> pb.ModelMetadataResponse:
    return json_format.ParseDict(meta, pb.ModelMetadataResponse(), ignore_unknown_fields=True)


def model_config(config: dict) -> pb.ModelConfigResponse:
    return pb.ModelConfigResponse(config=json_format.ParseDict(config, model_config_pb2.ModelConfig(), ignore_unknown_fields=True))


def model_statistics(stats: dict) -> pb.ModelStatisticsResponse:
    return json_format.ParseDict(stats, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)
