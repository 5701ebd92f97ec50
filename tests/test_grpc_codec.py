"""KServe v2 gRPC messages decoded by the same rules as REST bodies: what tritonclient
sends becomes the same request, and every mistake is a ProtocolError (INVALID_ARGUMENT)."""

from __future__ import annotations

import numpy as np
import pytest

from tritonclient.grpc import InferInput, InferRequestedOutput, service_pb2 as pb
from tritonclient.grpc._utils import _get_inference_request  # what tritonclient.grpc sends

from router_api import grpc_codec, kserve

INPUTS = [kserve.TensorSpec("x", "FP32", (-1, 3)), kserve.TensorSpec("n", "INT32", (-1, 2))]
OUTPUTS = [kserve.TensorSpec("y", "FP32", (-1, 3)), kserve.TensorSpec("z", "FP32", (-1, 1))]


def message(x: np.ndarray, n: np.ndarray, raw: bool = True, outputs: list[str] | None = None, **kwargs) -> pb.ModelInferRequest:
    a, b = InferInput("x", list(x.shape), "FP32"), InferInput("n", list(n.shape), "INT32")
    a.set_data_from_numpy(x)
    b.set_data_from_numpy(n)
    outs = [InferRequestedOutput(o) for o in outputs] if outputs else None
    msg = _get_inference_request(model_name="m", inputs=[a, b], model_version="", request_id=kwargs.get("request_id", ""),
                                 outputs=outs, sequence_id=0, sequence_start=False, sequence_end=False,
                                 priority=kwargs.get("priority", 0), timeout=kwargs.get("timeout"), parameters=None)  # fmt: skip
    if not raw:  # the same values as typed contents, as other clients send them
        del msg.raw_input_contents[:]
        msg.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
        msg.inputs[1].contents.int_contents.extend(n.ravel().tolist())
    return msg


@pytest.mark.parametrize("raw", [True, False], ids=["raw_input_contents", "typed contents"])
def test_what_tritonclient_sends_is_the_rest_paths_request(raw):
    x, n = np.arange(6, dtype=np.float32).reshape(2, 3), np.array([[1, 2], [3, 4]], np.int32)
    req = grpc_codec.infer_request(message(x, n, raw, request_id="r1", priority=2, timeout=5000), INPUTS, OUTPUTS, max_batch_size=8)
    assert (req.id, req.rows, req.priority, req.timeout_us) == ("r1", 2, 2, 5000)
    assert np.array_equal(np.frombuffer(req.inputs[0].data, np.float32).reshape(2, 3), x)
    assert np.array_equal(np.frombuffer(req.inputs[1].data, np.int32).reshape(2, 2), n)
    assert [o.name for o in req.outputs] == ["y", "z"]  # none asked: all


def test_a_message_as_bytes_gives_its_tensors_as_views_and_the_rest_parsed():
    """The server receives ModelInfer as bytes: the tensors are sliced out, not copied,
    and decode as the parsed message's own would."""
    x, n = np.arange(6, dtype=np.float32).reshape(2, 3), np.array([[1, 2], [3, 4]], np.int32)
    sent = message(x, n, request_id="r1", priority=2, outputs=["y"])
    sent.parameters["timeout"].int64_param = 5000
    data = sent.SerializeToString()
    msg, raw = grpc_codec.parse_infer(data)
    assert not msg.raw_input_contents and [bytes(r) for r in raw] == list(sent.raw_input_contents)
    assert all(isinstance(r, memoryview) and r.obj is data for r in raw)
    msg.raw_input_contents.extend(bytes(r) for r in raw)
    assert msg == sent  # nothing else lost or changed
    req = grpc_codec.infer_request(msg, INPUTS, OUTPUTS, max_batch_size=8, raw=raw)
    assert (req.id, req.priority, req.timeout_us, [o.name for o in req.outputs]) == ("r1", 2, 5000, ["y"])
    assert np.array_equal(np.frombuffer(req.inputs[1].data, np.int32).reshape(2, 2), n)


@pytest.mark.parametrize("data", [b"\x3a\x10abc", b"\x3a", b"\x0a\xff\xff", b"\x0b", b"\x09\x00", b"\x00\x00"],
                         ids=["tensor-past-end", "no-length", "varint-past-end", "group", "fixed64-past-end", "field-0"])  # fmt: skip
def test_malformed_bytes_are_a_protocol_error(data):
    with pytest.raises(kserve.ProtocolError, match="malformed ModelInferRequest"):
        grpc_codec.parse_infer(data)


def mangled(**change) -> pb.ModelInferRequest:
    msg = message(np.zeros((1, 3), np.float32), np.zeros((1, 2), np.int32))
    for key, value in change.items():
        value(msg)
    return msg


@pytest.mark.parametrize("change, says", [
    (dict(a=lambda m: setattr(m.inputs[0], "name", "q")), "unknown input"),
    (dict(a=lambda m: setattr(m.inputs[0], "datatype", "FP64")), "datatype"),
    (dict(a=lambda m: m.inputs[0].shape.append(1)), "rank"),
    (dict(a=lambda m: m.raw_input_contents.__setitem__(0, b"abc")), "raw bytes"),
    (dict(a=lambda m: m.raw_input_contents.pop()), "one for each input"),
    (dict(a=lambda m: m.inputs.pop(), b=lambda m: m.raw_input_contents.pop()), "missing input"),
    (dict(a=lambda m: m.outputs.add(name="nope")), "unknown output"),
    (dict(a=lambda m: m.parameters["priority"].CopyFrom(pb.InferParameter(string_param="x"))), "priority"),
    (dict(a=lambda m: m.inputs[0].shape.__setitem__(0, 99), b=lambda m: m.inputs[1].shape.__setitem__(0, 99)), "max_batch_size"),
], ids=["name", "datatype", "rank", "size", "raw-count", "missing", "output", "priority", "batch"])  # fmt: skip
def test_every_mistake_is_a_protocol_error(change, says):
    with pytest.raises(kserve.ProtocolError, match=says):
        grpc_codec.infer_request(mangled(**change), INPUTS, OUTPUTS, max_batch_size=8)


def test_a_response_carries_raw_little_endian_outputs():
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    r = grpc_codec.infer_response("m", "1", "r1", [(kserve.RequestedOutput("y", True), y)])
    assert (r.model_name, r.id, r.outputs[0].datatype, list(r.outputs[0].shape)) == ("m", "r1", "FP32", [2, 3])
    assert np.array_equal(np.frombuffer(r.raw_output_contents[0], "<f4").reshape(2, 3), y)


def test_metadata_config_and_statistics_are_the_rest_dicts_parsed():
    meta = kserve.model_metadata("m", "1", "onnxruntime_onnx", INPUTS, OUTPUTS) | {"parameters": {"sha256": "x"}}
    assert grpc_codec.model_metadata(meta).inputs[0].shape == [-1, 3]
    config = kserve.model_config("m", "onnxruntime_onnx", 8, INPUTS, OUTPUTS, {"preferred_batch_size": [4, 8], "max_queue_delay_microseconds": 0})
    c = grpc_codec.model_config(config).config
    assert (c.max_batch_size, list(c.dynamic_batching.preferred_batch_size), c.input[0].dims) == (8, [4, 8], [3])
