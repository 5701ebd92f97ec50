"""The load generator's HTTP/1.1 client: keep-alive connections, and a pool of them for
open loops.

The load generator shares the 2 cores with the server it measures, so it must cost far
less than the server does: no per-request object churn beyond a coroutine, request
heads written once with the body in one ``writelines``. aiohttp costs 1.6-3.9x its CPU
per request and httpx 8-57x (``python -m benchmarks.probes.http_client_cost``, in
benchmarks/RESULTS.md), CPU taken from the server being measured.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Optional

Response = tuple[int, dict[str, str], bytes]
class ServerDisconnected(ConnectionError):
    """The server closed the connection before a complete response arrived."""


class Connection:
    """One keep-alive HTTP/1.1 connection that reconnects when the server drops it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.connects = 0  # how many TCP connections this object opened (tests check reuse)
        self._reader: Optional[asyncio.StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self.connects += 1

    def close(self) -> None:
        """Drop the socket; the next request opens a fresh one."""
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def request(self, method: str, path: str, headers: Optional[dict[str, str]] = None,
                      body: bytes = b"") -> Response:
        """Send one request; return (status, lower-cased headers, body)."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        reused = self._writer is not None
        try:
            try:
                return await self._exchange(method, head, body)
            except (ServerDisconnected, ConnectionResetError, BrokenPipeError) as e:
                # An idle keep-alive socket the server already closed fails before any byte
                # of a response arrives: retrying once on a fresh socket is what clients do.
                if not reused or getattr(e, "partial", False):
                    raise
                self.close()
            return await self._exchange(method, head, body)
        except BaseException:
            self.close()  # state unknown (error, timeout, cancel): never reuse this socket
            raise

    async def _exchange(self, method: str, head: bytes, body: bytes) -> Response:
        if self._writer is None:
            await self._connect()
        reader, writer = self._reader, self._writer
        assert reader is not None and writer is not None
        writer.writelines((head, body) if body else (head,))
        await writer.drain()
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            err = ServerDisconnected("connection closed before the response")
            err.partial = bool(e.partial)  # type: ignore[attr-defined]
            raise err from None
        status, headers = _parse_head(raw)
        try:
            body_out, reusable = await _read_body(reader, method, status, headers)
        except asyncio.IncompleteReadError:
            err = ServerDisconnected("connection closed inside the response body")
            err.partial = True  # type: ignore[attr-defined]
            raise err from None
        if not reusable or headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body_out


def _parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    text = raw.decode("latin-1").split("\r\n")
    parts = text[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError(f"bad status line {text[0]!r}")
    headers: dict[str, str] = {}
    for line in text[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    return int(parts[1]), headers


async def _read_body(reader: asyncio.StreamReader, method: str, status: int,
                     headers: dict[str, str]) -> tuple[bytes, bool]:
    """(body, socket reusable): by Content-Length, by chunks, or up to EOF."""
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return b"", True
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                return b"".join(chunks), True
            chunks.append((await reader.readexactly(size + 2))[:-2])
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"])), True
    return await reader.read(), False


class Pool:
    """Idle keep-alive connections for the open loop; opens more, up to a cap, when busy.
    Waiters beyond the cap are served first come, first served."""

    def __init__(self, host: str, port: int, cap: int = 256) -> None:
        self.host, self.port, self.cap = host, port, cap
        self.idle: list[Connection] = []
        self.opened = 0
        self._waiters: deque[asyncio.Future] = deque()

    async def acquire(self) -> Connection:
        if self.idle:
            return self.idle.pop()
        if self.opened < self.cap:
            self.opened += 1
            return Connection(self.host, self.port)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return await fut

    def release(self, conn: Connection) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        self.idle.append(conn)

    def close(self) -> None:
        for c in self.idle:
            c.close()


