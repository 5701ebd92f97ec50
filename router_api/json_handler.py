"""The base of every endpoint: errors in the protocol's format (``{"error": ...}``), and
the checks every request passes first (sizes of its URL and headers, its Host, the
bearer token)."""

from __future__ import annotations

import hmac
import json

from tornado import web

from router_api import kserve

MAX_URL, MAX_HEADERS = 8 * 1024, 64 * 1024  # longer: 414, 431 (Tornado reads up to HEAD_READ, and drops beyond)
HEAD_READ = 1024 * 1024


def split_host(header: str) -> str:
    """The host of a Host header, without its port: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:80" -> "::1"."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


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
            return None
        return entry
