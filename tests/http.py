"""Small blocking HTTP helpers for tests (one connection per call; threads for concurrency)."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np


@dataclass
class Response:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


def request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60) -> Response:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def classify(url: str, image: bytes, query: str = "", ctype: str = "image/jpeg", timeout: float = 60) -> Response:
    return request(url, "POST", "/v1/classify" + query, image, {"Content-Type": ctype}, timeout)


def infer_binary(url: str, x: np.ndarray, params: dict | None = None, model: str = "resnet50") -> Response:
    """A KServe binary-extension request for one FP32 input, asking for binary logits."""
    header = {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }
    if params:
        header["parameters"] = params
    h = json.dumps(header).encode()
    return request(
        url, "POST", f"/v2/models/{model}/infer", h + x.astype(np.float32).tobytes(),
        {"Inference-Header-Content-Length": str(len(h)), "Content-Type": "application/octet-stream"},
    )  # fmt: skip


def logits_of(r: Response, rows: int) -> np.ndarray:
    n = int(r.headers["inference-header-content-length"])
    return np.frombuffer(r.body[n:], dtype=np.float32).reshape(rows, -1)
