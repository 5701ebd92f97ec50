"""The load over KServe v2 gRPC: the same closed and open loops as HTTP
(``benchmarks.httpload``), each client sending the same tensors as ModelInfer calls on
its own channel (``grpc``), or on one long ModelStreamInfer stream of its own
(``grpc-stream``: requests written as the loop sends them, answers matched by id).
Outcomes are reported as HTTP statuses would be (UNAVAILABLE as 503, and so on), so the
report and the rounds read the same for both protocols.

As the HTTP load sends one body built beforehand, this one sends one ModelInferRequest
serialized beforehand (grpc's identity serializer): on 2 shared cores, re-serializing
602 KB per call would measure the load generator, not the server. A stream's requests
each get their own id by appending the id field to those bytes (protobuf merges
concatenated messages: the last value of a field wins).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb

from benchmarks.http_client import Response

CODES = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
         grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.UNAUTHENTICATED: 401}  # fmt: skip
LIMIT = 256 * 1024 * 1024


def infer_message(model: str, headers: dict, body: bytes) -> pb.ModelInferRequest:
    """The HTTP load's request (a JSON header with binary inputs) as one gRPC message."""
    n = int(headers.get("Inference-Header-Content-Length", len(body)))
    head = json.loads(body[:n])
    msg = pb.ModelInferRequest(model_name=model)
    offset = n
    for t in head["inputs"]:
        msg.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        size = t["parameters"]["binary_data_size"]
        msg.raw_input_contents.append(body[offset : offset + size])
        offset += size
    for o in head.get("outputs", []):
        msg.outputs.add(name=o["name"])
    return msg


SERVICE = "/inference.GRPCInferenceService/"


class Client:
    """One load client's channel (its own connection: no shared subchannel), and its stream."""

    def __init__(self, target: str) -> None:
        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", LIMIT),
                   ("grpc.max_send_message_length", LIMIT)]  # fmt: skip
        self.channel = grpc.aio.insecure_channel(target, options=options)
        # Requests go as the bytes given; replies come back parsed (they are small).
        self.infer = self.channel.unary_unary(SERVICE + "ModelInfer", request_serializer=None,
                                              response_deserializer=pb.ModelInferResponse.FromString)  # fmt: skip
        self.open_stream = self.channel.stream_stream(SERVICE + "ModelStreamInfer", request_serializer=None,
                                                      response_deserializer=pb.ModelStreamInferResponse.FromString)  # fmt: skip
        self.stream: Any = None
        self.waiting: dict[str, asyncio.Future] = {}
        self.reader: asyncio.Task | None = None

    async def unary(self, request: bytes) -> Response:
        try:
            await self.infer(request)
            return 200, {}, b""
        except grpc.aio.AioRpcError as e:
            return CODES.get(e.code(), 500), {}, (e.details() or "").encode()

    async def streamed(self, request: bytes, rid: str) -> Response:
        if self.stream is None:
            self.stream = self.open_stream()
            self.reader = asyncio.ensure_future(self._read())
        done = self.waiting[rid] = asyncio.get_running_loop().create_future()
        await self.stream.write(request + pb.ModelInferRequest(id=rid).SerializeToString())
        return await done

    async def _read(self) -> None:
        try:
            async for answer in self.stream:
                waiter = self.waiting.pop(answer.infer_response.id, None)
                if waiter is not None and not waiter.done():
                    failed = answer.error_message
                    waiter.set_result((503 if "unavailable" in failed.lower() or "queue" in failed.lower() else 500, {},
                                       failed.encode()) if failed else (200, {}, b""))  # fmt: skip
        except grpc.aio.AioRpcError as e:
            for waiter in self.waiting.values():
                if not waiter.done():
                    waiter.set_result((CODES.get(e.code(), 500), {}, (e.details() or "").encode()))
            self.waiting.clear()
            self.stream = None

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        await self.channel.close()


def grpc_sender(target: str, model: str, headers: dict, body: bytes, stream: bool):
    """A ``send(conn)`` for httpload's loops: each loop client (its ``conn``) gets a gRPC
    client of its own on first use."""
    request = infer_message(model, headers, body).SerializeToString()
    clients: dict[int, Client] = {}
    ids = itertools.count()

    async def send(conn) -> Response:
        client = clients.get(id(conn))
        if client is None:
            client = clients[id(conn)] = Client(target)
        return await (client.streamed(request, f"r{next(ids)}") if stream else client.unary(request))

    async def close() -> None:
        await asyncio.gather(*(c.close() for c in clients.values()))

    send.close = close  # type: ignore[attr-defined]
    return send
