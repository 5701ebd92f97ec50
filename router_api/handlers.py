"""Tornado handlers: parse, validate, hand off to the cluster link, write. Nothing else.

Protocol encoding lives in ``kserve.py``; batching and placement in ``dispatcher.py``;
the router's status endpoints (workers, traces, metrics) in ``status_handlers.py``; what
every request passes first in ``json_handler.py``, and reading a body in ``body_handler.py``.
Every error is ``{"error": "..."}`` with the status Triton would use.
"""

from __future__ import annotations

import asyncio
import logging

from tornado import httputil

from core import image_header
from core.codec import pack_item
from core.protocol import ImageItem, ItemError
from router_api import json_child, kserve
from router_api.body_handler import BodyHandler
from router_api.json_handler import JSONHandler
from router_api.tensors import as_frame, into_slab, output_arrays, tensor_item

logger = logging.getLogger("router_api.handlers")

COPY_MAX_PIXELS = 2_000_000  # larger images are never hedged or probed: their decode is their own cost


class NotFound(JSONHandler):
    def prepare(self) -> None:
        if self.admitted():
            self.fail(404, f"no such endpoint: {self.request.method} {self.request.path}")


class Live(JSONHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain")
        self.finish()


def answer_ready(handler: JSONHandler, ready: bool) -> None:
    # Triton answers 400 when not ready (the KServe spec says "4xx means false"); with no
    # scheduler, 503 and when to ask again, as every request then gets.
    handler.set_header("Content-Type", "text/plain")
    d = handler.router.dispatcher
    if d.scheduler_lost is not None:
        handler.set_header("Retry-After", handler.router.retry_after)
        handler.set_status(503)
    else:
        handler.set_status(200 if ready else 400)
    handler.finish()


class Ready(JSONHandler):
    def get(self) -> None:  # Triton's strict readiness: every model served is ready
        answer_ready(self, all(d.ready for d in self.router.dispatchers))


class ServerMetadata(JSONHandler):
    def get(self) -> None:
        self.write_json(self.router.server_metadata())


class ModelMetadata(JSONHandler):
    def get(self, name: str, version: str | None = None) -> None:
        if entry := self.check_model(name, version):
            self.write_json(self.router.model_metadata(entry))


class ModelReady(JSONHandler):
    def get(self, name: str, version: str | None = None) -> None:
        if entry := self.check_model(name, version):
            answer_ready(self, entry.dispatcher.ready and not entry.dispatcher.draining)


class ModelConfig(JSONHandler):
    def get(self, name: str, version: str | None = None) -> None:
        if entry := self.check_model(name, version):
            self.write_json(self.router.model_config(entry))


class ModelStatistics(JSONHandler):
    def get(self, name: str | None = None, version: str | None = None) -> None:
        stats = self.router.stats()
        if name is None:
            self.write_json({"model_stats": [s.as_triton() for s in stats.values()]})
        elif entry := self.check_model(name, version):
            self.write_json({"model_stats": [stats[entry.name].as_triton()]})


class Infer(BodyHandler):
    shared = True

    async def post(self, name: str, version: str | None = None) -> None:
        if self.reject_large() or not (entry := self.check_model(name, version)):
            return
        router = self.router
        header = self.request.headers.get("Inference-Header-Content-Length")
        try:
            header_length = int(header) if header is not None else None
        except ValueError:
            return self.fail(400, f"bad Inference-Header-Content-Length: {header!r}")
        try:  # large JSON in a child process: json.loads would hold the event loop for seconds
            req = await json_child.parse_infer_request(self.body, header_length, entry.inputs, entry.outputs, entry.max_batch_size)
        except kserve.ProtocolError as e:
            return self.fail(e.status, str(e))
        except json_child.ParserFailed as e:
            logger.error("%s", e)
            return self.fail(503, "could not parse the request right now", Retry_After=router.retry_after)
        if self.gone:  # its client left meanwhile (and its slab went back)
            return
        same_host = router.link.shm_workers()
        try:  # inputs given by region and offset: workers on this host read them there
            refs = router.system_shm.resolve(req, refer=same_host)
        except kserve.ProtocolError as e:
            return self.fail(e.status, str(e))
        refs = refs or self.shm_refs(req.inputs)
        if refs is None and self.slab is None and same_host:  # JSON numbers, say
            self.slab, refs = into_slab(router.shm, req.inputs)  # given back when the response is finished
        item = tensor_item(req, entry.kind, refs)
        packed = None
        if entry.dispatcher.far_workers():  # zlib releases the GIL: off the event loop
            packed = await asyncio.to_thread(pack_item, item)
            if self.gone:  # its client left meanwhile (and its slab went back): nothing to send
                return
        replies = await self.run([item], req.rows, req.priority, req.timeout_us, packed, entry.name)
        if replies is None:
            return
        result = replies[0].result
        if isinstance(result, ItemError):
            return self.fail(result.status, result.message)
        arrays = output_arrays(req, result.outputs)
        try:
            router.system_shm.write_outputs(arrays)  # outputs asked for in a region
        except kserve.ProtocolError as e:
            return self.fail(e.status, str(e))
        body, header_length = kserve.encode_infer_response(entry.name, router.version, req.id, arrays)
        if header_length is not None:
            self.set_header("Inference-Header-Content-Length", str(header_length))
            self.set_header("Content-Type", "application/octet-stream")
        self.finish(body)

    def shm_refs(self, inputs: list) -> dict | None:
        """Where each input lies in the body's slab, when they all do (JSON tensors do not)."""
        if self.slab is None:
            return None
        refs = {i.name: self.slab.ref(memoryview(i.data)) for i in inputs}
        return None if None in refs.values() else refs


class Classify(BodyHandler):
    """POST /v1/classify: one image as the body, or several as multipart/form-data."""

    def pixel_budget(self, sizes: list[tuple[int, int] | None]) -> str | None:
        """Why these images are too large to decode, from their headers' sizes; None if
        not. Formats other than JPEG and PNG are checked by the worker, before it decodes."""
        http, total = self.router.settings.http, 0
        for i, wh in enumerate(sizes):
            if wh is None:
                continue
            total += (pixels := wh[0] * wh[1])
            if pixels > http.max_image_pixels:
                which = f"image {i}" if len(sizes) > 1 else "the image"
                return f"{which} is {wh[0]}x{wh[1]} = {pixels} pixels, over the {http.max_image_pixels} limit (http.max-image-pixels)"
        if total > http.max_request_pixels:
            return f"the images hold {total} pixels together, over the {http.max_request_pixels} limit (http.max-request-pixels)"
        return None

    async def post(self) -> None:
        if self.reject_large():
            return
        ctype = self.request.headers.get("Content-Type", "")
        try:
            top_k = int(self.get_query_argument("top_k", str(min(self.router.top_k, self.router.num_classes))))
        except ValueError:
            return self.fail(400, "top_k must be an integer")
        if not 1 <= top_k <= self.router.num_classes:
            return self.fail(400, f"top_k must be in 1..{self.router.num_classes}")
        if ctype.startswith("multipart/form-data"):
            if "boundary=" not in ctype:
                return self.fail(400, "multipart/form-data needs a boundary")
            most = self.router.max_batch_size  # each part's header names it: counted before Tornado splits them
            if (count := self.body.count(b"Content-Disposition")) > most:
                return self.fail(400, f"a multipart body holds at most {most} images (max_batch_size), got {count} parts")
            files: dict = {}
            try:
                httputil.parse_body_arguments(ctype, self.body, {}, files, self.request.headers)
            except Exception as e:  # Tornado raises on some malformed bodies and logs others
                return self.fail(400, f"malformed multipart/form-data: {e}")
            images = [f["body"] for parts in files.values() for f in parts]
            if not images:
                return self.fail(400, "multipart body holds no files")
        elif not self.body:
            return self.fail(400, "empty body: send an image (image/jpeg or image/png)")
        else:
            images = [self.body]
        sizes = [image_header.dimensions(img) for img in images]
        if (refused := self.pixel_budget(sizes)) is not None:
            return self.fail(413, refused)
        try:
            priority = int(self.get_query_argument("priority", "0") or 0)
            timeout_us = int(self.get_query_argument("timeout", "0") or 0)
            if not (0 <= priority <= kserve.MAX_UINT and 0 <= timeout_us <= kserve.MAX_UINT):
                raise ValueError
        except ValueError:
            return self.fail(400, "priority and timeout must be non-negative integers")
        items = [ImageItem(as_frame(img), top_k) for img in images]
        # Never hedged or probed: an image whose decode is its own cost (large, or of a size unknown here).
        copyable = [wh is not None and wh[0] * wh[1] <= COPY_MAX_PIXELS for wh in sizes]
        replies = await self.run(items, 1, priority, timeout_us, model=self.router.images, copyable=copyable)
        if replies is None:
            return
        failed = [(i, r.result) for i, r in enumerate(replies) if isinstance(r.result, ItemError)]
        if failed:
            status = max(res.status for _, res in failed)  # a server fault wins
            message = "; ".join(f"image {i}: {res.message}" for i, res in failed) if len(images) > 1 else failed[0][1].message
            return self.fail(status, message)
        results = [self.router.predictions(r) for r in replies]
        self.write_json(results[0] if len(images) == 1 else {"results": results})
