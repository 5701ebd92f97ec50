"""Fuzzing the parsers a client reaches: whatever arrives, the answer is the protocol's
(a result, or a 4xx with ``{"error"}``), never a 5xx, an exception that escapes, or a
traceback in the log. First the pure parsers, many examples; then the live service."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from core import image_header
from router_api import kserve
from tests.conftest import make_image
from tests.http import request
from worker_setup import preprocess

INPUTS = [kserve.TensorSpec("x", "FP32", (-1, 3)), kserve.TensorSpec("y", "INT64", (-1, 2))]
OUTPUTS = [kserve.TensorSpec("out", "FP32", (-1, 3))]
DATATYPES = ["FP32", "INT64", "UINT8", "FP16", "BOOL", "BYTES", "fp32", ""]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=40)  # fmt: skip
numbers = st.one_of(st.integers(-300, 300), st.floats(allow_nan=False, width=32))
shapes = st.one_of(st.lists(st.integers(-2, 9), max_size=4), st.lists(st.sampled_from([0, 2**31, 2**62, -(2**62)]), max_size=3), json_values)


@st.composite
def tensor_entries(draw) -> dict:
    entry = {"name": draw(st.sampled_from(["x", "y", "z"])), "datatype": draw(st.sampled_from(DATATYPES)), "shape": draw(shapes)}
    which = draw(st.sampled_from(["data", "nested", "binary", "both", "neither", "junk"]))
    if which in ("data", "both"):
        entry["data"] = draw(st.lists(numbers, max_size=30))
    if which == "nested":
        entry["data"] = draw(st.lists(st.lists(numbers, min_size=0, max_size=4), max_size=8))
    if which in ("binary", "both"):
        entry["parameters"] = {"binary_data_size": draw(st.one_of(st.integers(-8, 64), json_values))}
    if which == "junk":
        entry.update(draw(st.dictionaries(st.sampled_from(["data", "parameters", "shape"]), json_values, max_size=3)))
    return entry


@st.composite
def infer_bodies(draw) -> tuple[bytes, int | None]:
    """A request body and its Inference-Header-Content-Length: structured, or not."""
    if draw(st.booleans()):
        raw = draw(st.binary(max_size=300))
        return raw, draw(st.one_of(st.none(), st.integers(-5, len(raw) + 5)))
    req: dict = {"inputs": draw(st.one_of(st.lists(tensor_entries(), max_size=3), json_values))}
    if draw(st.booleans()):
        req["parameters"] = draw(st.dictionaries(st.sampled_from(["priority", "timeout", "binary_data_output", "x"]), json_values, max_size=3))
    if draw(st.booleans()):
        req["outputs"] = draw(st.one_of(st.lists(st.fixed_dictionaries({"name": st.sampled_from(["out", "nope"])}), max_size=2), json_values))
    if draw(st.booleans()):
        req["id"] = draw(json_values)
    head = json.dumps(req).encode()
    if draw(st.booleans()):
        return head, None
    tail = draw(st.binary(max_size=64))
    return head + tail, draw(st.one_of(st.just(len(head)), st.integers(-3, len(head) + len(tail) + 3)))


@settings(max_examples=1500, deadline=None)
@given(infer_bodies())
def test_the_kserve_parser_answers_anything_with_a_result_or_a_protocol_error(case):
    body, header_length = case
    try:
        req = kserve.parse_infer_request(body, header_length, INPUTS, OUTPUTS, max_batch_size=8)
    except kserve.ProtocolError as e:
        assert 400 <= e.status < 500 and e.message
        return
    assert 1 <= req.rows <= 8 and {i.name for i in req.inputs} == {"x", "y"}


def _image(fmt: str, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, fmt)
    return buf.getvalue()


SEEDS = [make_image(1), _image("PNG", (40, 30)), _image("GIF", (20, 20)), _image("JPEG", (1, 300))]


@st.composite
def damaged_images(draw) -> bytes:
    """Real images with bytes flipped, cut, or spliced; or noise behind a real header."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.booleans()):
        data = data[:24] + bytearray(draw(st.binary(max_size=200)))
    return bytes(data)


@settings(max_examples=600, deadline=None)
@given(st.one_of(damaged_images(), st.binary(max_size=100)))
def test_image_headers_and_decoding_fail_only_as_a_bad_image(data):
    """The front end's header reader never raises; the worker's decoder raises only
    ImageError (a 400, or 413 for ImageTooLarge) whatever the bytes."""
    wh = image_header.dimensions(data)
    assert wh is None or (len(wh) == 2 and all(isinstance(n, int) and n >= 0 for n in wh))
    try:
        pixels = preprocess.image_pixels(data)
    except preprocess.ImageError:
        return
    assert pixels.shape == (224, 224, 3)


# -- the live service ----------------------------------------------------------------

INFER = "/v2/models/resnet50/infer"


@st.composite
def http_requests(draw) -> tuple[str, str, bytes, dict]:
    kind = draw(st.sampled_from(["infer", "classify", "multipart", "other"]))
    query = draw(st.sampled_from(["", "?timeout=", "?priority=9", "?top_k=0", "?top_k=x", "?timeout=" + "9" * 40, "?priority=-1"]))
    if kind == "infer":
        body, n = draw(infer_bodies())
        headers = {} if n is None else {"Inference-Header-Content-Length": str(n)}
        return "POST", INFER, body, headers
    if kind == "classify":
        ctype = draw(st.sampled_from(["image/jpeg", "image/png", "application/octet-stream", "", "text/plain"]))
        return "POST", "/v1/classify" + query, draw(st.one_of(damaged_images(), st.binary(max_size=64))), {"Content-Type": ctype}
    if kind == "multipart":
        boundary = draw(st.sampled_from(["b", "", "x" * 80]))
        parts = draw(st.lists(st.one_of(damaged_images(), st.binary(max_size=32)), max_size=3))
        body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"; filename="{i}"\r\n\r\n'.encode() + p + b"\r\n"
                        for i, p in enumerate(parts)) + draw(st.sampled_from([f"--{boundary}--\r\n".encode(), b"", b"--"]))  # fmt: skip
        return "POST", "/v1/classify" + query, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "POST"]))
    path = draw(st.sampled_from(["/v2/models/resnet50", "/v2/models/nope/infer", "/v2/models/resnet50/versions/7/infer",
                                 "/v2/models/resnet50/stats", "/v1/workers", "/v1/trace?last=x", "/v2/health/ready", "/%00"]))  # fmt: skip
    return method, path, draw(st.binary(max_size=32)), {}


@pytest.fixture(scope="module")
def log_start(cluster) -> int:
    """Where the service's log stood before this module's live requests."""
    return cluster.log.stat().st_size if cluster.log else 0


@pytest.mark.integration
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=http_requests())
def test_the_live_service_answers_every_request_in_the_protocol(cluster, log_start, case):
    method, path, body, headers = case
    r = request(cluster.url, method, path, body if method in ("POST", "PUT", "PATCH") else None, headers, timeout=60)
    assert r.status < 500, (r.status, r.body[:300])
    if r.status >= 400 and not (path == "/v2/health/ready" and r.status == 400):  # not ready: Triton's bare 400
        assert json.loads(r.body)["error"]


@pytest.mark.integration
def test_the_fuzzing_left_no_traceback_in_the_log(cluster, log_start):
    """Run after the live fuzz test (same module, in order): nothing it sent was logged
    as an uncaught error by any process of the service."""
    log = cluster.log.read_bytes()[log_start:].decode(errors="replace") if cluster.log else ""
    assert "Traceback" not in log, log[log.index("Traceback") - 500 : log.index("Traceback") + 1500]
