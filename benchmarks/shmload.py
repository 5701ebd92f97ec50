"""The load with tensors in system shared memory (Triton's extension): each loop client
makes its own input and output regions on first use (as ``tritonclient.utils.
shared_memory`` does), registers them over HTTP, fills the input once, and from then on
sends only a small JSON header naming them: no tensor bytes cross the socket.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import tritonclient.utils.shared_memory as shm

from router_api.kserve import DTYPES

from benchmarks.http_client import Connection, Response


def _outputs_bytes(meta_outputs: list[dict], rows: int) -> list[tuple[str, int]]:
    sizes = []
    for o in meta_outputs:
        n = rows * int(np.prod([d for d in o["shape"][1:]]))
        sizes.append((o["name"], n * DTYPES[o["datatype"]].itemsize))
    return sizes


def shm_sender(host: str, port: int, base: str, model: str, headers: dict, body: bytes, meta_outputs: list[dict]):
    """A ``send(conn)`` for httpload's loops; ``close()`` unregisters and destroys every region."""
    n = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:n])
    (tensor,) = head["inputs"]
    data = body[n:]
    rows = tensor["shape"][0]
    clients: dict[int, tuple[bytes, list]] = {}
    path = f"{base}/v2/models/{model}/infer"

    async def setup(conn) -> tuple[bytes, list]:
        tag = uuid.uuid4().hex[:8]
        handles, request = [], {"inputs": [], "outputs": []}
        key = f"/br-load-{tag}-in"
        h = shm.create_shared_memory_region(f"in-{tag}", key, len(data))
        shm.set_shared_memory_region(h, [np.frombuffer(data, np.uint8)])
        handles.append((f"in-{tag}", h))
        await _register(conn, f"in-{tag}", key, len(data))
        request["inputs"].append({"name": tensor["name"], "shape": tensor["shape"], "datatype": tensor["datatype"],
                                  "parameters": {"shared_memory_region": f"in-{tag}", "shared_memory_byte_size": len(data)}})  # fmt: skip
        for name, size in _outputs_bytes(meta_outputs, rows):
            region, key = f"out-{name}-{tag}", f"/br-load-{tag}-{name}"
            handles.append((region, shm.create_shared_memory_region(region, key, size)))
            await _register(conn, region, key, size)
            request["outputs"].append({"name": name, "parameters": {"shared_memory_region": region, "shared_memory_byte_size": size}})
        return json.dumps(request).encode(), handles

    async def _register(conn, region: str, key: str, size: int) -> None:
        status, _, reply = await conn.request("POST", f"{base}/v2/systemsharedmemory/region/{region}/register",
                                              {"Content-Type": "application/json"},
                                              json.dumps({"key": key, "offset": 0, "byte_size": size}).encode())  # fmt: skip
        if status != 200:
            raise RuntimeError(f"could not register {region}: {status} {reply[:200]!r}")

    async def send(conn) -> Response:
        client = clients.get(id(conn))
        if client is None:
            client = clients[id(conn)] = await setup(conn)
        return await conn.request("POST", path, {"Content-Type": "application/json"}, client[0])

    async def close() -> None:
        conn = Connection(host, port)
        try:
            for _, handles in clients.values():
                for region, h in handles:
                    await conn.request("POST", f"{base}/v2/systemsharedmemory/region/{region}/unregister")
                    shm.destroy_shared_memory_region(h)
        finally:
            conn.close()

    send.close = close  # type: ignore[attr-defined]
    return send
