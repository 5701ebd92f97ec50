"""How the router reads KServe v2 inference requests and writes responses.

The model here is a small fake: input "input" FP32 [-1,3,4,4], output "logits"
FP32 [-1,10], max_batch_size 32. tritonclient.http serves as an independent
client: its encoder produces requests we must parse, and its decoder must read
the responses we write.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient

from router_api.kserve import (
    DTYPES, InferRequest, ProtocolError, RequestedOutput, TensorSpec, datatype_of,
    encode_infer_response, error_body, model_config, model_metadata,
    parse_infer_request, server_metadata,
)

INPUTS = [TensorSpec("input", "FP32", (-1, 3, 4, 4))]
OUTPUTS = [TensorSpec("logits", "FP32", (-1, 10))]
MAX_BATCH = 32


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 4, 4), dtype=np.float32)


def parse(body: bytes | dict, header_length: int | None = None,
          inputs: list[TensorSpec] = INPUTS, outputs: list[TensorSpec] = OUTPUTS) -> InferRequest:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return parse_infer_request(body, header_length, inputs, outputs, MAX_BATCH)


def as_array(request: InferRequest, i: int = 0) -> np.ndarray:
    inp = request.inputs[i]
    return np.frombuffer(inp.data, dtype=DTYPES[inp.datatype]).reshape(inp.shape)


def json_request(x: np.ndarray, flat: bool = False, **extra) -> dict:
    data = x.ravel().tolist() if flat else x.tolist()
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": data}],
            **extra}


def binary_request(header: dict, *blobs: bytes) -> tuple[bytes, int]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), len(head)


def binary_input(x: np.ndarray, size: int | None = None) -> dict:
    return {"name": "input", "datatype": "FP32", "shape": list(x.shape),
            "parameters": {"binary_data_size": x.nbytes if size is None else size}}


def rejects(body: bytes | dict, match: str, header_length: int | None = None, **kw) -> ProtocolError:
    with pytest.raises(ProtocolError, match=match) as info:
        parse(body, header_length, **kw)
    assert info.value.status == 400
    return info.value


# --- JSON requests --------------------------------------------------------------------

@pytest.mark.parametrize("flat", [False, True], ids=["nested", "flat"])
def test_json_data_nested_or_flat_decodes_to_the_same_array(flat):
    x = images(2)
    req = parse(json_request(x, flat=flat, id="r1"))
    assert req.id == "r1" and req.rows == 2
    assert req.inputs[0].shape == (2, 3, 4, 4)
    np.testing.assert_array_equal(as_array(req), x)
    assert (req.priority, req.timeout_us, req.parameters) == (0, 0, {})


def test_integer_json_data_is_converted_to_the_model_dtype():
    req = parse({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 4, 4],
                             "data": list(range(48))}]})
    np.testing.assert_array_equal(as_array(req).ravel(), np.arange(48, dtype=np.float32))


def test_priority_timeout_and_parameters_are_read_from_the_request():
    req = parse(json_request(images(1), parameters={"priority": 2, "timeout": 5000, "x": "y"}))
    assert (req.priority, req.timeout_us) == (2, 5000)
    assert req.parameters == {"priority": 2, "timeout": 5000, "x": "y"}


# --- binary requests ------------------------------------------------------------------

def test_binary_input_follows_the_json_header():
    x = images(3)
    body, n = binary_request({"id": "b", "inputs": [binary_input(x)]}, x.tobytes())
    req = parse(body, n)
    assert req.rows == 3 and req.id == "b"
    np.testing.assert_array_equal(as_array(req), x)


def test_binary_parts_are_taken_in_the_order_the_json_lists_the_inputs():
    specs = [TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "INT64", (-1, 3))]
    a = np.array([[1.5, 2.5]], dtype=np.float32)
    b = np.array([[7, 8, 9]], dtype=np.int64)
    header = {"inputs": [
        {"name": "b", "datatype": "INT64", "shape": [1, 3], "parameters": {"binary_data_size": 24}},
        {"name": "a", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}}]}
    body, n = binary_request(header, b.tobytes(), a.tobytes())
    req = parse(body, n, inputs=specs)
    got = {i.name: np.frombuffer(i.data, DTYPES[i.datatype]).reshape(i.shape) for i in req.inputs}
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)


def test_binary_and_json_inputs_can_be_mixed():
    specs = [TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "UINT8", (-1, 2))]
    header = {"inputs": [
        {"name": "a", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}},
        {"name": "b", "datatype": "UINT8", "shape": [1, 2], "data": [3, 255]}]}
    body, n = binary_request(header, np.array([1, 2], np.float32).tobytes())
    req = parse(body, n, inputs=specs)
    assert req.inputs[1].data == bytes([3, 255])


def test_raw_binary_body_is_one_image_with_all_outputs_binary():
    x = images(1)
    req = parse(x.tobytes(), header_length=0)
    assert req.rows == 1 and req.id is None
    np.testing.assert_array_equal(as_array(req), x)
    assert req.outputs == [RequestedOutput("logits", True)]


def test_raw_binary_needs_a_single_input_model():
    specs = [TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "FP32", (-1, 2))]
    rejects(b"\0" * 16, "single-input", header_length=0, inputs=specs)


def test_raw_binary_needs_fixed_non_batch_dims():
    rejects(b"\0" * 16, "no variable dims", header_length=0, inputs=[TensorSpec("a", "FP32", (-1, -1))])


def test_raw_binary_body_must_be_exactly_one_image():
    rejects(images(2).tobytes(), "needs 192", header_length=0)


# --- output selection -----------------------------------------------------------------

TWO_OUTPUTS = [TensorSpec("logits", "FP32", (-1, 10)), TensorSpec("probs", "FP32", (-1, 10))]


@pytest.mark.parametrize("params, binary", [({}, False), ({"binary_data_output": True}, True)])
def test_no_outputs_listed_means_all_outputs(params, binary):
    req = parse(json_request(images(1), parameters=params), outputs=TWO_OUTPUTS)
    assert req.outputs == [RequestedOutput("logits", binary), RequestedOutput("probs", binary)]


def test_listed_outputs_are_returned_in_the_order_asked_with_their_binary_flag():
    body = json_request(images(1), outputs=[
        {"name": "probs"}, {"name": "logits", "parameters": {"binary_data": True}}])
    assert parse(body, outputs=TWO_OUTPUTS).outputs == [
        RequestedOutput("probs", False), RequestedOutput("logits", True)]


def test_an_output_can_override_binary_data_output():
    body = json_request(images(1), parameters={"binary_data_output": True}, outputs=[
        {"name": "probs"}, {"name": "logits", "parameters": {"binary_data": False}}])
    assert parse(body, outputs=TWO_OUTPUTS).outputs == [
        RequestedOutput("probs", True), RequestedOutput("logits", False)]


# --- every client error is a 400 naming what is wrong ---------------------------------

def test_protocol_error_carries_a_status():
    assert ProtocolError("x").status == 400
    assert ProtocolError("no such model", 404).status == 404


@pytest.mark.parametrize("header_length", [-1, 10_000])
def test_header_length_outside_the_body(header_length):
    rejects(json.dumps(json_request(images(1))).encode(), "outside the", header_length)


@pytest.mark.parametrize("body, match", [
    (b"{not json", "malformed JSON"),
    (b"\xff\xfe", "malformed JSON"),
    (b"[1, 2]", "'inputs' list"),
    (b'{"inputs": {}}', "'inputs' list"),
    (b'{"id": 5, "inputs": []}', "'id' must be a string"),
])
def test_malformed_request(body, match):
    rejects(body, match)


def mutate(**changes) -> dict:
    """A one-image JSON request with fields of its only input replaced (None deletes)."""
    body = json_request(images(1))
    for key, value in changes.items():
        if value is None:
            del body["inputs"][0][key]
        else:
            body["inputs"][0][key] = value
    return body


@pytest.mark.parametrize("body, match", [
    ({"inputs": []}, r"missing input\(s\) \['input'\]"),
    ({"inputs": json_request(images(1))["inputs"] * 2}, "'input' is given more than once"),
    ({"inputs": json_request(images(1))["inputs"] + [{"name": "extra"}]}, "unknown input 'extra'"),
    ({"inputs": [{"datatype": "FP32"}]}, "string 'name'"),
    (mutate(datatype="FP16"), "input 'input': datatype 'FP16' does not match model datatype FP32"),
    (mutate(shape=[1, 3, 4]), "rank 3"),
    (mutate(shape=[1, 3, 4, 5]), "at dim 3"),
    (mutate(shape=[1, 3, -4, 4]), "negative dimension"),
    (mutate(shape=[0, 3, 4, 4], data=[]), "batch size must be at least 1"),
    (mutate(shape="1,3,4,4"), "list of integers"),
    (mutate(shape=[1, 3, 4, 4.0]), "list of integers"),
    (mutate(data=None), "needs exactly one of 'data' and binary_data_size"),
    (mutate(data=[1.0] * 47), "has 47 elements, shape \\[1, 3, 4, 4\\] needs 48"),
    (mutate(data=["a"] * 48), "not valid FP32"),
    (mutate(data=[None] * 48), "not valid FP32"),
    (mutate(data=[True] * 48), "not valid FP32"),
    (mutate(data=[[1.0], [1.0, 2.0]]), "not a regular nested list"),
    (mutate(data=1.0), "'data' must be a list"),
    (mutate(parameters=[]), "'parameters' must be an object"),
])
def test_bad_input(body, match):
    rejects(body, match)


def test_batch_size_above_max_batch_size():
    rejects(json_request(images(40)), "batch size 40 exceeds max_batch_size 32")


def test_inputs_must_share_the_batch_size():
    specs = [TensorSpec("a", "FP32", (-1, 1)), TensorSpec("b", "FP32", (-1, 1))]
    body = {"inputs": [{"name": "a", "datatype": "FP32", "shape": [1, 1], "data": [1]},
                       {"name": "b", "datatype": "FP32", "shape": [2, 1], "data": [1, 2]}]}
    rejects(body, r"disagree on the batch size: \[1, 2\]", inputs=specs)


@pytest.mark.parametrize("data, match", [
    ([1.5, 2], "not valid INT64"),
    ([2**63, 0], "not valid INT64|out of range"),  # numpy cannot hold it as int64 either way
])
def test_integer_inputs_reject_floats_and_overflow(data, match):
    rejects({"inputs": [{"name": "a", "datatype": "INT64", "shape": [1, 2], "data": data}]},
            match, inputs=[TensorSpec("a", "INT64", (-1, 2))])


def test_uint8_json_values_must_fit():
    rejects({"inputs": [{"name": "a", "datatype": "UINT8", "shape": [1, 1], "data": [256]}]},
            "out of range for UINT8", inputs=[TensorSpec("a", "UINT8", (-1, 1))])


@pytest.mark.parametrize("size_delta, extra_bytes, match", [
    (-4, 0, "binary_data_size 188 does not match shape"),        # size disagrees with the shape
    (0, 4, "total 192 does not match the 196 binary bytes"),      # bytes left over
    (0, -4, "does not match the 188 binary bytes left"),          # body too short
])
def test_binary_sizes_must_match_exactly(size_delta, extra_bytes, match):
    x = images(1)
    blob = x.tobytes() + b"\0" * max(extra_bytes, 0)
    blob = blob[:len(blob) + extra_bytes] if extra_bytes < 0 else blob
    body, n = binary_request({"inputs": [binary_input(x, x.nbytes + size_delta)]}, blob)
    rejects(body, match, n)


def test_binary_data_size_without_a_binary_part():
    rejects({"inputs": [binary_input(images(1))]}, "does not match the 0 binary bytes")


def test_binary_data_size_must_be_an_integer():
    body, n = binary_request({"inputs": [binary_input(images(1), "192")]}, images(1).tobytes())
    rejects(body, "binary_data_size '192' does not match", n)


def test_data_and_binary_data_size_together():
    x = images(1)
    header = {"inputs": [dict(binary_input(x), data=x.ravel().tolist())]}
    body, n = binary_request(header, x.tobytes())
    rejects(body, "needs exactly one of 'data' and binary_data_size", n)


def test_bytes_after_a_json_only_header():
    x = images(1)
    body, n = binary_request(json_request(x), b"junk")
    rejects(body, "does not match the 4 binary bytes", n)


@pytest.mark.parametrize("outputs, match", [
    ([{"name": "nope"}], "unknown output 'nope'"),
    ([{"name": "logits"}, {"name": "logits"}], "requested more than once"),
    ({"name": "logits"}, "'outputs' must be a list"),
    ([{"name": "logits", "parameters": {"binary_data": "yes"}}], "'binary_data' must be a boolean"),
    ([{"name": "logits", "parameters": {"classification": 3}}], "classification"),
])
def test_bad_outputs(outputs, match):
    rejects(json_request(images(1), outputs=outputs), match)


@pytest.mark.parametrize("params, match", [
    ({"priority": -1}, "'priority' must be a non-negative integer"),
    ({"priority": True}, "'priority' must be a non-negative integer"),
    ({"priority": 1.5}, "'priority' must be a non-negative integer"),
    ({"timeout": -5}, "'timeout' must be a non-negative integer"),
    ({"timeout": "100"}, "'timeout' must be a non-negative integer"),
    ({"binary_data_output": 1}, "'binary_data_output' must be a boolean"),
])
def test_bad_request_parameters(params, match):
    rejects(json_request(images(1), parameters=params), match)


def test_request_parameters_must_be_an_object():
    rejects(json_request(images(1), parameters=[1]), "'parameters' must be an object")


# --- responses ------------------------------------------------------------------------

LOGITS = np.linspace(-1, 1, 20, dtype=np.float32).reshape(2, 10)


def test_json_response_has_flat_row_major_data():
    body, n = encode_infer_response("resnet50", "1", "r1", [(RequestedOutput("logits", False), LOGITS)])
    assert n is None
    doc = json.loads(body)
    assert doc == {"model_name": "resnet50", "model_version": "1", "id": "r1", "outputs": [
        {"name": "logits", "datatype": "FP32", "shape": [2, 10], "data": LOGITS.ravel().tolist()}]}
    assert np.array(doc["outputs"][0]["data"], np.float32).tobytes() == LOGITS.tobytes()


def test_response_omits_id_when_the_request_had_none():
    body, _ = encode_infer_response("m", "1", None, [(RequestedOutput("logits", False), LOGITS)])
    assert "id" not in json.loads(body)


def test_binary_response_appends_raw_bytes_after_the_header():
    probs = np.ones((2, 10), np.float16)
    body, n = encode_infer_response("m", "1", None, [
        (RequestedOutput("logits", True), LOGITS), (RequestedOutput("probs", False), probs),
        (RequestedOutput("raw", True), LOGITS[:, ::2])])  # non-contiguous view
    header = json.loads(body[:n])
    assert [o.get("parameters") for o in header["outputs"]] == [
        {"binary_data_size": 80}, None, {"binary_data_size": 40}]
    assert header["outputs"][1]["data"] == [1.0] * 20
    assert body[n:] == LOGITS.tobytes() + np.ascontiguousarray(LOGITS[:, ::2]).tobytes()


def test_big_endian_outputs_go_out_little_endian():
    body, n = encode_infer_response("m", "1", None, [(RequestedOutput("o", True), LOGITS.astype(">f4"))])
    assert body[n:] == LOGITS.tobytes()


def test_datatype_names_round_trip_through_numpy():
    for name, dtype in DTYPES.items():
        assert datatype_of(dtype) == name
    assert datatype_of(np.dtype(">f4")) == "FP32"
    with pytest.raises(ValueError):
        datatype_of(np.dtype(object))


# --- tritonclient as an independent client --------------------------------------------

def triton_request(x: np.ndarray, binary_in: bool, binary_out: bool | None, **kw):
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    outputs = (None if binary_out is None
               else [httpclient.InferRequestedOutput("logits", binary_data=binary_out)])
    return httpclient.InferenceServerClient.generate_request_body([inp], outputs=outputs, **kw)


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False, None], ids=["binary-out", "json-out", "default-out"])
def test_tritonclient_requests_parse_exactly(binary_in, binary_out):
    x = images(2, seed=7)
    body, json_size = triton_request(x, binary_in, binary_out, request_id="tc-1",
                                     priority=3, timeout=1000)
    assert (json_size is not None) == binary_in
    req = parse(body, json_size)
    np.testing.assert_array_equal(as_array(req), x)
    assert (req.id, req.rows, req.priority, req.timeout_us) == ("tc-1", 2, 3, 1000)
    # tritonclient asks for binary_data_output when it lists no outputs
    assert req.outputs == [RequestedOutput("logits", True if binary_out is None else binary_out)]


def test_tritonclient_custom_parameters_pass_through():
    body, n = triton_request(images(1), True, True, parameters={"tenant": "a"})
    assert parse(body, n).parameters == {"tenant": "a"}


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_reads_our_responses(binary):
    body, n = encode_infer_response("resnet50", "1", "tc-2",
                                    [(RequestedOutput("logits", binary), LOGITS)])
    result = httpclient.InferenceServerClient.parse_response_body(body, header_length=n)
    np.testing.assert_array_equal(result.as_numpy("logits"), LOGITS)
    assert result.get_response()["id"] == "tc-2"


def test_full_round_trip_through_tritonclient():
    x = images(4, seed=3)
    body, n = triton_request(x, True, True)
    req = parse(body, n)
    logits = as_array(req).reshape(4, -1)[:, :10] * 2  # stand-in for the model
    out, hn = encode_infer_response("m", "1", req.id, [(o, logits) for o in req.outputs])
    result = httpclient.InferenceServerClient.parse_response_body(out, header_length=hn)
    np.testing.assert_array_equal(result.as_numpy("logits"), x.reshape(4, -1)[:, :10] * 2)


# --- metadata and config --------------------------------------------------------------

def test_error_body_is_the_protocol_error_object():
    assert json.loads(error_body('bad "thing"')) == {"error": 'bad "thing"'}


def test_server_metadata():
    assert server_metadata("batch-router", "0.1.0", ["binary_tensor_data"]) == {
        "name": "batch-router", "version": "0.1.0", "extensions": ["binary_tensor_data"]}


def test_model_metadata_keeps_the_batch_dim():
    assert model_metadata("m", "1", "onnxruntime_onnx", INPUTS, OUTPUTS) == {
        "name": "m", "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 4, 4]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]}


def test_model_config_is_triton_style_without_the_batch_dim():
    config = model_config("m", "onnxruntime_onnx", 32, INPUTS, OUTPUTS,
                          {"max_queue_delay_microseconds": 2000})
    assert config == {
        "name": "m", "platform": "onnxruntime_onnx", "backend": "onnxruntime", "max_batch_size": 32,
        "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [3, 4, 4]}],
        "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [10]}],
        "dynamic_batching": {"max_queue_delay_microseconds": 2000}}
    metadata = model_metadata("m", "1", "onnxruntime_onnx", INPUTS, OUTPUTS)
    assert [t["name"] for t in config["input"]] == [t["name"] for t in metadata["inputs"]]
    assert [t["name"] for t in config["output"]] == [t["name"] for t in metadata["outputs"]]
