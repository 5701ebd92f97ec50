"""A bare Tornado server with the router's HTTP surface and no model behind it.

Driven by the same load generator with the same settings as the router, its req/s is the
HTTP ceiling of one Tornado process on this machine; router req/s divided by it is the
router's own overhead. Infer and classify read the whole body and answer a constant.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path
from typing import Any, Optional

import tornado.httpserver
import tornado.netutil
import tornado.web

DEFAULT_METADATA: dict[str, Any] = {
    "name": "resnet50", "versions": ["1"], "platform": "onnxruntime_onnx",
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}],
}
INFER_REPLY = json.dumps({"model_name": "bare", "outputs": [
    {"name": "logits", "datatype": "FP32", "shape": [1, 1], "data": [0.0]}]}).encode()
CLASSIFY_REPLY = json.dumps({"label": "tench", "index": 0, "score": 1.0}).encode()


class _Handler(tornado.web.RequestHandler):
    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")

    def compute_etag(self) -> None:  # no hashing of constant bodies on the hot path
        return None


class Ready(_Handler):
    def get(self) -> None:
        self.set_status(200)  # empty body, as Triton answers


class Metadata(_Handler):
    def initialize(self, metadata: dict[str, Any]) -> None:
        self.body = json.dumps(metadata).encode()

    def get(self, model: str) -> None:
        self.write(self.body)


class Stats(_Handler):
    def get(self, model: str) -> None:
        self.set_status(404)  # no batching here: loadtest prints mean batch "n/a"
        self.write(b'{"error": "no statistics on the bare server"}')


class Infer(_Handler):
    def post(self, model: str) -> None:
        _ = self.request.body  # already read in full by Tornado, as the router's would be
        if self.request.headers.get("Inference-Header-Content-Length") is not None:
            self.set_header("Inference-Header-Content-Length", str(len(INFER_REPLY)))
        self.write(INFER_REPLY)


class Classify(_Handler):
    def post(self) -> None:
        self.write(CLASSIFY_REPLY)


def make_app(metadata: Optional[dict[str, Any]] = None) -> tornado.web.Application:
    meta = metadata or DEFAULT_METADATA
    return tornado.web.Application([
        (r"/v2/health/(?:ready|live)", Ready),
        (r"/v2/models/([^/]+)/stats", Stats),
        (r"/v2/models/([^/]+)/infer", Infer),
        (r"/v2/models/([^/]+)(?:/versions/[^/]+)?", Metadata, {"metadata": meta}),
        (r"/v1/classify", Classify),
    ], log_function=lambda handler: None)  # no access log: it would cost the ceiling


def load_metadata(arg: Optional[str]) -> Optional[dict[str, Any]]:
    """--metadata is inline JSON or a path to a JSON file."""
    if not arg:
        return None
    return json.loads(arg if arg.lstrip().startswith("{") else Path(arg).read_text())


async def serve_grpc(port: int, address: str):
    """KServe v2 gRPC's ModelInfer on grpc.aio in this loop, answering a constant: the
    gRPC ceiling of one Python process, as the Tornado server is HTTP's. It listens as
    the router does by default (``router_api.grpc_listen``: several servers on the
    port, generic handlers, large socket reads): the two differ only in what a call does."""
    from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc

    from core.config import parse
    from router_api.grpc_listen import start_grpc

    reply = pb.ModelInferResponse(model_name="bare", outputs=[pb.ModelInferResponse.InferOutputTensor(
        name="logits", datatype="FP32", shape=[1, 1])], raw_output_contents=[b"\0\0\0\0"])  # fmt: skip

    class Bare(service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request, context):
            return reply

    servers = await start_grpc(Bare(), address, port, 1 << 30, parse().grpc.acceptors)
    print(f"bare_server gRPC on {address}:{servers.port}", flush=True)
    return servers


async def serve(port: int, address: str, metadata: Optional[dict[str, Any]], grpc_port: int | None = None) -> None:
    sockets = tornado.netutil.bind_sockets(port, address)
    server = tornado.httpserver.HTTPServer(make_app(metadata), max_body_size=1 << 30)
    server.add_sockets(sockets)
    grpc_server = await serve_grpc(grpc_port, address) if grpc_port is not None else None
    # The chosen port on stdout lets a parent process use --port 0.
    print(f"bare_server listening on {address}:{sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.stop()
    if grpc_server is not None:
        await grpc_server.stop(None)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bare_server",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--metadata", help="model metadata: inline JSON or a JSON file path")
    parser.add_argument("--grpc-port", type=int, help="also KServe v2 gRPC's ModelInfer here (0 picks a free port)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.address, load_metadata(args.metadata), args.grpc_port))


if __name__ == "__main__":
    main()
