"""Endpoints with a request body: read as it arrives, into shared memory when a worker
on this host can read it there; bounded in size (413, in JSON, even for a body never
sent), in time and in rate (408); queued with the cluster link and awaited."""

from __future__ import annotations

import asyncio

from tornado import web

from router_api.dispatch_events import Answer, DeadlineExceeded, ModelGone, Unavailable
from router_api.json_handler import JSONHandler
from router_api.shm import MIN_SLAB

STALLED = 1.0  # seconds without a byte of a body already over the limit: answered 413 then
BODY_TICK, RATE_WINDOW = 1.0, 5.0  # seconds between checks of a body arriving; over which its rate is taken
DRAIN = 4  # bodies declared up to this many times the limit are read and dropped before the 413


class BodyWatch:
    """The bodies being read, checked together once a second: one timer for all of them
    rather than one made and cancelled per request (most bodies are whole within a
    millisecond)."""

    def __init__(self) -> None:
        self.reading: set[BodyHandler] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, handler: BodyHandler) -> None:
        self.reading.add(handler)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(BODY_TICK, self._tick)

    def discard(self, handler: BodyHandler) -> None:
        self.reading.discard(handler)

    def _tick(self) -> None:
        self._timer = None
        for handler in list(self.reading):
            handler.body_check()
        if self.reading:
            self._timer = asyncio.get_running_loop().call_later(BODY_TICK, self._tick)


@web.stream_request_body
class BodyHandler(JSONHandler):
    """Reads the body itself so an oversized one gets a 413 in the protocol's format, and
    a tensor request's into shared memory when workers on this host can read it there."""

    shared = False  # may the body go into shared memory (router_api.shm)?
    # What prepare() sets, for a request that never reached it (a 405, say).
    slab = trace = None
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
        self.router.body_watch.add(self)
        self.slab = None
        self.gone = False  # the client went away
        pool = self.router.shm
        if self.shared and pool is not None and MIN_SLAB <= declared <= self.limit and self.router.link.shm_workers():
            self.slab = pool.take(declared)

    def body_check(self) -> None:
        """Once a second while a body arrives: one already over the limit of which nothing
        came for STALLED seconds is answered 413; any other not complete within
        body-timeout, or arriving slower than min-body-rate, 408. Then the connection closes."""
        if self._finished:
            return
        http, now = self.router.settings.http, asyncio.get_running_loop().time()
        elapsed, window = now - self.body_started, now - self.body_checked
        why = None
        if self.too_large and self.size == 0 and elapsed >= STALLED:
            why = "stalled"  # answered 413 below, as every body over the limit is
        elif http.body_timeout and elapsed >= http.body_timeout:
            why = f"request body not received within {http.body_timeout:g} s (http.body-timeout)"
        elif http.min_body_rate and window >= RATE_WINDOW:
            if self.size - self.body_size_then < http.min_body_rate * window:
                why = f"request body arriving slower than {http.min_body_rate} bytes/s (http.min-body-rate)"
            self.body_checked, self.body_size_then = now, self.size
        if why is None:
            return
        self.set_header("Connection", "close")
        if self.too_large:
            return self.fail(413, f"request body exceeds the {self.limit} byte limit")
        self.fail(408, why)

    def _stop_body_timer(self) -> None:
        self.router.body_watch.discard(self)

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
        self.router.keep_trace(self.trace)

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
            if len(futures) == 1:  # awaited itself: gather would answer a loop iteration later
                return [await futures[0]]
            replies = await asyncio.gather(*futures, return_exceptions=True)
            for r in replies:
                if isinstance(r, BaseException):
                    raise r
            return list(replies)
        except ModelGone as e:
            self.fail(404, str(e))
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
