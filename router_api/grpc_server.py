"""KServe v2 gRPC: Triton's ``inference.GRPCInferenceService`` on grpc.aio, in the front
end's own event loop, behind the same dispatcher (batcher, placement, statistics) as
HTTP. Messages are the generated ones in ``tritonclient.grpc``; decoding and checks are
``grpc_codec``'s, the same rules as REST.

Errors keep the protocol's meaning as status codes: INVALID_ARGUMENT (bad input),
NOT_FOUND (unknown model), UNAVAILABLE (queue full, no scheduler, shutting down),
DEADLINE_EXCEEDED (the request's timeout), RESOURCE_EXHAUSTED (over the message size
limit: grpc's own check). A cancelled call drops its queued request, as a dropped HTTP
connection does.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator

import grpc
from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc

from core.codec import pack_item
from core.protocol import ItemError
from router_api import grpc_codec, repository
from router_api.dispatch_events import DeadlineExceeded, ModelGone, Unavailable
from router_api.kserve import ProtocolError
from router_api.tensors import into_slab, output_arrays, tensor_item

logger = logging.getLogger("router_api.grpc_server")


class Refused(Exception):
    """A call answered with a status code, not a response."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


# What the dispatcher refuses or fails a request with, as the protocol's codes.
REFUSALS = ((ModelGone, grpc.StatusCode.NOT_FOUND), (Unavailable, grpc.StatusCode.UNAVAILABLE),
            (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED), (ValueError, grpc.StatusCode.INVALID_ARGUMENT))  # fmt: skip


def status_of(http_status: int) -> grpc.StatusCode:
    """A worker's per-item error (HTTP-style) as the gRPC code with its meaning."""
    if http_status == 413:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if http_status in (403, 404):
        return grpc.StatusCode.PERMISSION_DENIED if http_status == 403 else grpc.StatusCode.NOT_FOUND
    if 400 <= http_status < 500:
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.UNAVAILABLE if http_status == 503 else grpc.StatusCode.INTERNAL


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, router) -> None:
        self.router = router
        token = router.settings.http.auth_token
        self.bearer = f"Bearer {token}".encode() if token else None

    # -- the checks every call passes -------------------------------------------------

    def _admit(self, context: grpc.aio.ServicerContext) -> None:
        """The bearer token (http.auth-token), in the call's ``authorization`` metadata."""
        if self.bearer is None:
            return
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not hmac.compare_digest(str(given).encode(), self.bearer):
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (http.auth-token)")

    def _entry(self, name: str, version: str):
        entry = self.router.entries.get(name)
        if entry is None or version not in ("", self.router.version):
            raise Refused(grpc.StatusCode.NOT_FOUND, f"unknown model: '{name}'" + (f" version {version}" if version else ""))
        return entry

    async def _answer(self, context, make):
        try:
            self._admit(context)
            return make()
        except Refused as e:
            await context.abort(e.code, e.message)

    # -- health, metadata, configuration, statistics --------------------------------

    async def ServerLive(self, request, context):
        return await self._answer(context, lambda: pb.ServerLiveResponse(live=True))

    async def ServerReady(self, request, context):
        return await self._answer(context, lambda: pb.ServerReadyResponse(ready=all(d.ready for d in self.router.dispatchers)))

    async def ModelReady(self, request, context):
        def make():
            d = self._entry(request.name, request.version).dispatcher
            return pb.ModelReadyResponse(ready=d.ready and not d.draining)

        return await self._answer(context, make)

    async def ServerMetadata(self, request, context):
        return await self._answer(context, lambda: grpc_codec.server_metadata(self.router.server_metadata()))

    async def ModelMetadata(self, request, context):
        return await self._answer(context, lambda: grpc_codec.model_metadata(
            self.router.model_metadata(self._entry(request.name, request.version))))  # fmt: skip

    async def ModelConfig(self, request, context):
        return await self._answer(context, lambda: grpc_codec.model_config(
            self.router.model_config(self._entry(request.name, request.version))))  # fmt: skip

    async def ModelStatistics(self, request, context):
        def make():
            stats = self.router.stats()
            if not request.name:
                return grpc_codec.model_statistics({"model_stats": [s.as_triton() for s in stats.values()]})
            return grpc_codec.model_statistics({"model_stats": [stats[self._entry(request.name, request.version).name].as_triton()]})

        return await self._answer(context, make)

    # -- model repository (router_api.repository) ------------------------------------------

    async def _repository(self, context, call):
        try:
            self._admit(context)
            return await call()
        except Refused as e:
            await context.abort(e.code, e.message)
        except repository.RepositoryFailed as e:
            await context.abort(status_of(e.status), e.message)

    async def RepositoryIndex(self, request, context):
        async def call():
            rows = await repository.index(self.router, request.ready)
            return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])

        return await self._repository(context, call)

    async def RepositoryModelLoad(self, request, context):
        async def call():
            await repository.load(self.router, request.model_name, dict(request.parameters))
            return pb.RepositoryModelLoadResponse()

        return await self._repository(context, call)

    async def RepositoryModelUnload(self, request, context):
        async def call():
            await repository.unload(self.router, request.model_name, dict(request.parameters))
            return pb.RepositoryModelUnloadResponse()

        return await self._repository(context, call)

    # -- system shared memory (router_api.system_shm) ----------------------------------

    async def SystemSharedMemoryStatus(self, request, context):
        def make():
            regions = self._shm(lambda r: r.status(request.name or None))
            reply = pb.SystemSharedMemoryStatusResponse()
            for r in regions:
                reply.regions[r["name"]].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(**r))
            return reply

        return await self._answer(context, make)

    async def SystemSharedMemoryRegister(self, request, context):
        def make():
            self._shm(lambda r: r.register(request.name, request.key, request.offset, request.byte_size))
            return pb.SystemSharedMemoryRegisterResponse()

        return await self._answer(context, make)

    async def SystemSharedMemoryUnregister(self, request, context):
        def make():
            self.router.system_shm.unregister(request.name or None)
            return pb.SystemSharedMemoryUnregisterResponse()

        return await self._answer(context, make)

    def _shm(self, use):
        try:
            return use(self.router.system_shm)
        except ProtocolError as e:
            raise Refused(grpc.StatusCode.NOT_FOUND if e.status == 404 else grpc.StatusCode.INVALID_ARGUMENT, e.message) from None

    # -- inference ----------------------------------------------------------------------

    async def ModelInfer(self, request: bytes, context):
        try:
            self._admit(context)
            return await self._infer(*self._parse(request))
        except Refused as e:
            await context.abort(e.code, e.message)

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Many requests in flight on one stream, each answered as it finishes, with its
        id; an error answers its own request (``error_message``) and the stream goes on."""
        try:
            self._admit(context)
        except Refused as e:
            await context.abort(e.code, e.message)
        answers: asyncio.Queue = asyncio.Queue()
        calls: set[asyncio.Task] = set()

        async def one(data: bytes) -> None:
            rid = ""
            try:
                msg, raw = self._parse(data)
                rid = msg.id
                answers.put_nowait(pb.ModelStreamInferResponse(infer_response=await self._infer(msg, raw)))
            except Refused as e:
                answers.put_nowait(pb.ModelStreamInferResponse(error_message=e.message,
                                                               infer_response=pb.ModelInferResponse(id=rid)))  # fmt: skip

        async def read() -> None:
            async for data in request_iterator:
                call = asyncio.create_task(one(data))
                calls.add(call)
                call.add_done_callback(calls.discard)
            while calls:
                await asyncio.gather(*calls, return_exceptions=True)
            answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
        finally:  # the client cancelled, or the stream ended: nothing is left running
            for task in [reader, *calls]:
                task.cancel()

    @staticmethod
    def _parse(data: bytes) -> tuple[pb.ModelInferRequest, list[memoryview]]:
        try:
            return grpc_codec.parse_infer(data)
        except ProtocolError as e:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, e.message) from None

    async def _infer(self, msg: pb.ModelInferRequest, raw: list[memoryview]) -> pb.ModelInferResponse:
        router = self.router
        trace = {"arrival": router.link.now} if router.traces is not None else None  # core.trace, when on
        entry = self._entry(msg.model_name, msg.model_version)
        same_host = router.link.shm_workers()
        try:
            req = grpc_codec.infer_request(msg, entry.inputs, entry.outputs, entry.max_batch_size, raw)
            refs = router.system_shm.resolve(req, refer=same_host)  # inputs given by region: read there by workers here
        except ProtocolError as e:
            raise Refused(status_of(e.status), e.message) from None
        slab = None
        if refs is None and same_host:
            slab, refs = into_slab(router.shm, req.inputs)
        try:
            reply = await self._run(msg, req, entry, tensor_item(req, entry.kind, refs), trace)
            router.keep_trace(trace)
            return reply
        finally:
            if slab is not None:  # answered, failed or cancelled: nobody reads it any more
                router.shm.give_back(slab)

    async def _run(self, msg, req, entry, item, trace: dict | None = None) -> pb.ModelInferResponse:
        router = self.router
        packed = await asyncio.to_thread(pack_item, item) if entry.dispatcher.far_workers() else None
        link, request = router.link, None
        try:  # refused at once (submit raises) or answered with an error: the same codes
            request, future = link.submit(item, req.rows, req.priority, req.timeout_us, packed, entry.name, trace)
            answer = await future
        except asyncio.CancelledError:  # the call was cancelled: its request leaves the queue
            if request is not None:
                link.cancel(request)
            raise
        except Exception as e:
            code = next((c for kind, c in REFUSALS if isinstance(e, kind)), grpc.StatusCode.INTERNAL)
            raise Refused(code, str(e)) from None
        if isinstance(answer.result, ItemError):
            raise Refused(status_of(answer.result.status), answer.result.message)
        arrays = output_arrays(req, answer.result.outputs)
        self._shm(lambda r: r.write_outputs(arrays))  # outputs asked for in a region
        return grpc_codec.infer_response(entry.name, router.version, req.id, arrays)
