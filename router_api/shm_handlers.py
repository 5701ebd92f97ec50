"""Triton's system shared-memory endpoints: register, unregister and list regions
(``router_api.system_shm``). CUDA shared memory is not offered: workers are elsewhere."""

from __future__ import annotations

import json

from router_api.json_handler import JSONHandler
from router_api.kserve import ProtocolError


class ShmStatus(JSONHandler):
    """GET /v2/systemsharedmemory[/region/<name>]/status"""

    def get(self, name: str | None = None) -> None:
        try:
            self.write_json(self.router.system_shm.status(name))
        except ProtocolError as e:
            self.fail(e.status, e.message)


class ShmRegister(JSONHandler):
    """POST /v2/systemsharedmemory/region/<name>/register {"key", "offset", "byte_size"}"""

    def post(self, name: str) -> None:
        try:
            body = json.loads(self.request.body or b"null")
        except ValueError as e:
            return self.fail(400, f"malformed JSON: {e}")
        try:
            if not isinstance(body, dict):
                raise ProtocolError("the body must be a JSON object with key, offset and byte_size")
            self.router.system_shm.register(name, body.get("key"), body.get("offset", 0), body.get("byte_size"))
        except ProtocolError as e:
            return self.fail(e.status, e.message)
        self.finish()


class ShmUnregister(JSONHandler):
    """POST /v2/systemsharedmemory[/region/<name>]/unregister: one region, or all."""

    def post(self, name: str | None = None) -> None:
        self.router.system_shm.unregister(name)
        self.finish()
