"""Tornado handlers: parse, validate, hand off to the cluster link, write. Nothing else.

Protocol encoding lives in ``kserve.py``; batching and placement in ``dispatcher.py``;
the router's status endpoints (workers, traces, metrics) in ``status_handlers.py``.
Every error is ``{"error": "..."}`` with the status Triton would use.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging

import numpy as np
from tornado import httputil, web

from core import image_header
from core.codec import pack_item
from core.protocol import ImageItem, ItemError, TensorItem
from router_api import json_child, kserve
from router_api.dispatch_events import Answer, DeadlineExceeded, Unavailable
from router_api.shm import MIN_SLAB

logger = logging.getLogger("router_api.handlers")

MAX_URL, MAX_HEADERS = 8 * 1024, 64 * 1024  # longer: 414, 431 (Tornado reads up to HEAD_READ, and drops beyond)
HEAD_READ = 1024 * 1024
COPY_MAX_PIXELS = 2_000_000  # larger images are never hedged or probed: their decode is their own cost
STALLED = 1.0  # seconds without a byte of a body already over the limit: answered 413 then
BODY_TICK, RATE_WINDOW = 1.0, 5.0  # seconds between checks of a body arriving; over which its rate is taken
DRAIN = 4  # bodies declared up to this many times the limit are read and dropped before the 413


def split_host(header: str) -> str:
    """The host of a Host header, without its port: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:80" -> "::1"."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def as_frame(data: bytes | memoryview) -> np.ndarray:
    """Wrap request bytes so Dask ships them as their own frame, never copied into a
    pickle: protocol 5 sends numpy buffers out of band, but not ``bytes``."""
    return np.frombuffer(data, dtype=np.uint8)


class JSONHandler(web.RequestHandler):
    def initialize(self, router) -> None:
        self.router = router

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")

    def write_json(self, obj, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(obj, allow_nan=False))  # never invalid JSON: non-finite numbers are strings

    def write_error(self, status_code: int, **kwargs) -> None:
        message = self._reason
        exc = kwargs.get("exc_info", (None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        self.finish(kserve.error_body(message))

    def fail(self, status: int, message: str, **headers) -> None:
        for k, v in headers.items():
            self.set_header(k.replace("_", "-"), str(v))
        self.set_status(status)
        self.finish(kserve.error_body(message))

    def prepare(self) -> None:
        self.admitted()

    def admitted(self) -> bool:
        """The URL and headers are of a sane size (else 414, 431), the Host header names
        this server (a DNS-rebinding page's does not: 403), and the bearer token is right
        where one is set (401)."""
        router = self.router
        if len(self.request.uri) > MAX_URL:
            self.fail(414, f"the URL is {len(self.request.uri)} bytes, over {MAX_URL}")
            return False
        if (head := sum(len(k) + len(v) + 4 for k, v in self.request.headers.get_all())) > MAX_HEADERS:
            self.fail(431, f"the headers are {head} bytes, over {MAX_HEADERS}")
            return False
        host = self.request.headers.get("Host")
        if host is not None and router.allowed_hosts is not None and split_host(host) not in router.allowed_hosts:
            self.fail(403, f"Host {host!r} is not this server's: it serves {sorted(router.allowed_hosts)} (http.host)")
            return False
        token = router.settings.http.auth_token
        if token and not self.request.path.startswith("/v2/health/"):
            given = self.request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                self.fail(401, "missing or wrong bearer token (http.auth-token)", WWW_Authenticate="Bearer")
                return False
        return True

    def check_model(self, name: str, version: str | None = None):
        """The model name's entry, or None after answering 404."""
        entry = self.router.entries.get(name)
        if entry is None or version not in (None, "", self.router.version):
            self.fail(404, f"unknown model: '{name}'" + (f" version {version}" if version else ""))
        return entry


class NotFound(JSONHandler):
    def prepare(self) -> None:
        if self.admitted():
            self.fail(404, f"no such endpoint: {self.request.method} {self.request.path}")


class Live(JSONHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain")
        self.finish()


def answer_ready(handler: JSONHandler) -> None:
    # Triton answers 400 when not ready (the KServe spec says "4xx means false"); with no
    # scheduler, 503 and when to ask again, as every request then gets.
    handler.set_header("Content-Type", "text/plain")
    d = handler.router.dispatcher
    if d.scheduler_lost is not None:
        handler.set_header("Retry-After", handler.router.retry_after)
        handler.set_status(503)
    else:
        handler.set_status(200 if d.ready else 400)
    handler.finish()


class Ready(JSONHandler):
    def get(self) -> None:
        answer_ready(self)


class ServerMetadata(JSONHandler):
    def get(self) -> None:
        self.write_json(self.router.server_metadata())


class ModelMetadata(JSONHandler):
    def get(self, name: str, version: str | None = None) -> None:
        if entry := self.check_model(name, version):
            self.write_json(self.router.model_metadata(entry))


class ModelReady(JSONHandler):
    def get(self, name: str, version: str | None = None) -> None:
        if self.check_model(name, version):
            answer_ready(self)


class ModelConfig(JSONHandler):
    def get(self, name: str, version: str | None = None) -> None:
        if entry := self.check_model(name, version):
            self.write_json(self.router.model_config(entry))


class ModelStatistics(JSONHandler):
    def get(self, name: str | None = None, version: str | None = None) -> None:
        stats = self.router.dispatcher.entry_stats
        if name is None:
            self.write_json({"model_stats": [s.as_triton() for s in stats.values()]})
        elif entry := self.check_model(name, version):
            self.write_json({"model_stats": [stats[entry.name].as_triton()]})


@web.stream_request_body
class BodyHandler(JSONHandler):
    """Reads the body itself so an oversized one gets a 413 in the protocol's format, and
    a tensor request's into shared memory when workers on this host can read it there."""

    shared = False  # may the body go into shared memory (router_api.shm)?
    # What prepare() sets, for a request that never reached it (a 405, say).
    slab = trace = body_timer = None
    gone = False
    body_size_then = 0
    pending: tuple | list = ()

    def prepare(self) -> None:
        if not self.admitted():
            return
        # core.trace: the request's stamps, when tracing is on; its first item carries them.
        self.trace = {"arrival": self.router.link.now} if self.router.traces is not None else None
        self.chunks: list[bytes] = []
        self.size = 0
        self.too_large = False
        self.pending: list = []
        self.limit = self.router.max_body_size
        declared = int(self.request.headers.get("Content-Length", 0) or 0)
        # Let Tornado drain an oversized body (up to DRAIN x the limit, chunked ones too) so
        # we can answer 413 in JSON instead of its own bare 400.
        self.request.connection.set_max_body_size(DRAIN * self.limit)
        if declared > DRAIN * self.limit:  # too much to drain: answer now, without reading a byte of it
            self.set_header("Connection", "close")
            return self.fail(413, f"request body exceeds the {self.limit} byte limit")
        if declared > self.limit:  # drained first, so that a client still sending reads the 413
            self.too_large = True
        # A body that never comes, or trickles in, gets an answer, not a silent close.
        self.body_started = self.body_checked = asyncio.get_running_loop().time()
        self.body_timer = asyncio.get_running_loop().call_later(BODY_TICK, self._body_check)
        self.slab = None
        self.gone = False  # the client went away
        pool = self.router.shm
        if self.shared and pool is not None and MIN_SLAB <= declared <= self.limit and self.router.link.shm_workers():
            self.slab = pool.take(declared)

    def _body_check(self) -> None:
        """Once a second while a body arrives: one already over the limit of which nothing
        came for STALLED seconds is answered 413; any other not complete within
        body-timeout, or arriving slower than min-body-rate, 408. Then the connection closes."""
        if self._finished:
            return
        http, now = self.router.settings.http, asyncio.get_running_loop().time()
        elapsed, window = now - self.body_started, now - self.body_checked
        why = None
        if self.too_large and self.size == 0 and elapsed >= STALLED:
            why = ""
        elif http.body_timeout and elapsed >= http.body_timeout:
            why = f"request body not received within {http.body_timeout:g} s (http.body-timeout)"
        elif http.min_body_rate and window >= RATE_WINDOW:
            if self.size - self.body_size_then < http.min_body_rate * window:
                why = f"request body arriving slower than {http.min_body_rate} bytes/s (http.min-body-rate)"
            self.body_checked, self.body_size_then = now, self.size
        if why is None:
            self.body_timer = asyncio.get_running_loop().call_later(BODY_TICK, self._body_check)
            return
        self.set_header("Connection", "close")
        if self.too_large:
            return self.fail(413, f"request body exceeds the {self.limit} byte limit")
        self.fail(408, why)

    def _stop_body_timer(self) -> None:
        if getattr(self, "body_timer", None) is not None:
            self.body_timer.cancel()
            self.body_timer = None

    def data_received(self, chunk: bytes) -> None:
        start = self.size
        self.size += len(chunk)
        if self.size > self.limit:
            self.too_large = True
        if self.too_large:
            return
        if self.slab is not None and self.size <= self.slab.size:
            self.slab.buf[start : self.size] = chunk  # the one copy of the body: no join
        elif self.slab is not None:  # longer than it said: Tornado should not let this through
            self.chunks, self.slab = [self.slab.buf[:start], chunk], self._give_back()
        else:
            self.chunks.append(chunk)

    @property
    def body(self) -> bytes | memoryview:
        if self.slab is not None:
            return memoryview(self.slab.buf)[: self.size]
        return self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)

    def _give_back(self) -> None:
        """The body's slab goes back to the pool once nobody waits on its request."""
        if self.slab is not None:
            self.router.shm.give_back(self.slab)
            self.slab = None

    def reject_large(self) -> bool:
        """The body is all here (every handler's first call): answer 413 if too large."""
        self._stop_body_timer()
        if self.too_large:
            self.fail(413, f"request body exceeds the {self.limit} byte limit")
        return self.too_large

    def on_connection_close(self) -> None:
        self._stop_body_timer()
        if not self._finished:  # counted as nginx does, not as the 200 it never got
            self.set_status(499, "Client Closed Request")
        self.gone = True
        for request in self.pending:
            self.router.link.cancel(request)
        self._give_back()

    def on_finish(self) -> None:
        self._stop_body_timer()
        self._give_back()
        if self.trace is not None and "received" in self.trace:  # answered by a worker
            self.trace["answered"] = self.router.link.now
            self.router.traces.append(self.trace)

    async def run(
        self, items: list, rows: int, priority: int = 0, timeout_us: int = 0, packed=None, model: str = "",
        copyable: list[bool] | None = None,
    ) -> list[Answer] | None:
        """Queue items (one per request row group) and wait for all of them.

        On failure writes the error in the protocol's format and returns None.
        """
        try:
            futures = []
            for i, item in enumerate(items):
                request, future = self.router.link.submit(item, rows, priority, timeout_us, packed if len(items) == 1 else None, model,
                                                          self.trace if not futures else None, copyable[i] if copyable else True)  # fmt: skip
                self.pending.append(request)
                futures.append(future)
            replies = await asyncio.gather(*futures, return_exceptions=True)
            for r in replies:
                if isinstance(r, BaseException):
                    raise r
            return list(replies)
        except ValueError as e:
            self.fail(400, str(e))
        except Unavailable as e:
            self.fail(503, str(e), Retry_After=self.router.retry_after)
        except DeadlineExceeded as e:
            self.fail(504, str(e))
        except asyncio.CancelledError:
            pass  # the client went away; nobody to answer
        except Exception as e:
            self.fail(500, str(e))
        self.on_connection_close()  # nobody waits for the rest of this request's items
        return None


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
            req = await json_child.parse_infer_request(self.body, header_length, entry.inputs, entry.outputs, router.max_batch_size)
        except kserve.ProtocolError as e:
            return self.fail(e.status, str(e))
        except json_child.ParserFailed as e:
            logger.error("%s", e)
            return self.fail(503, "could not parse the request right now", Retry_After=router.retry_after)
        if self.gone:  # its client left meanwhile (and its slab went back)
            return
        item = TensorItem(
            rows=req.rows,
            inputs={i.name: as_frame(i.data) for i in req.inputs},
            shapes={i.name: tuple(i.shape) for i in req.inputs},
            outputs=tuple(o.name for o in req.outputs),
            entry=entry.kind,
            shm=self.shm_refs(req.inputs),
        )
        packed = None
        if router.dispatcher.far_workers():  # zlib releases the GIL: off the event loop
            packed = await asyncio.to_thread(pack_item, item)
            if self.gone:  # its client left meanwhile (and its slab went back): nothing to send
                return
        replies = await self.run([item], req.rows, req.priority, req.timeout_us, packed, entry.name)
        if replies is None:
            return
        result = replies[0].result
        if isinstance(result, ItemError):
            return self.fail(result.status, result.message)
        outs = result.outputs  # views of the bytes the worker packed: no copy until the body
        arrays = [(o, np.frombuffer(outs[o.name].data, outs[o.name].dtype).reshape(outs[o.name].shape)) for o in req.outputs]
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
