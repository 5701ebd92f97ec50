"""Large JSON request bodies, parsed in a child process.

``json.loads`` holds the GIL from start to end: a 60 MB tensor in JSON stalls the
event loop, health checks included, for seconds, whether or not it runs on a thread.
Above ``OFF_LOOP`` bytes the body goes to a short-lived ``python -m
router_api.json_child`` instead, which parses and validates it exactly as the loop
would (``kserve.parse_infer_request``) and sends back the tensors' bytes; its memory
(~9x the body, in Python floats) goes with it. ``CHILDREN`` at a time; more wait.
"""

from __future__ import annotations

import asyncio
import pickle
import sys

from router_api import kserve

OFF_LOOP = 512 * 1024  # bytes of JSON that take longer than ~10 ms to parse
CHILDREN = 2
_slots: asyncio.Semaphore | None = None


class ParserFailed(RuntimeError):
    """The child died (out of memory, say): the server's fault, answered 503."""


async def parse_infer_request(body: bytes | memoryview, header_length: int | None, inputs: list, outputs: list,
                              max_batch_size: int) -> kserve.InferRequest:  # fmt: skip
    """``kserve.parse_infer_request``, on the loop for small JSON, in a child above ``OFF_LOOP``."""
    json_size = len(body) if header_length is None else header_length
    if json_size < OFF_LOOP:
        return kserve.parse_infer_request(body, header_length, inputs, outputs, max_batch_size)
    global _slots
    _slots = _slots or asyncio.Semaphore(CHILDREN)
    job = pickle.dumps((header_length, inputs, outputs, max_batch_size))
    async with _slots:
        child = await asyncio.create_subprocess_exec(sys.executable, "-m", "router_api.json_child", stdin=asyncio.subprocess.PIPE,
                                                     stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)  # fmt: skip
        try:
            out, err, _, _ = await asyncio.gather(child.stdout.read(), child.stderr.read(), _send(child, job, body), child.wait())
        except BaseException:  # the client left, or the pipe broke: the child goes too
            if child.returncode is None:
                child.kill()
            raise
    if child.returncode != 0 or not out:
        raise ParserFailed(f"the JSON parser process failed ({child.returncode}): {err.decode(errors='replace')[-500:]}")
    result = pickle.loads(out)
    if isinstance(result, tuple):  # (message, status) of a ProtocolError
        raise kserve.ProtocolError(*result)
    return result


async def _send(child: asyncio.subprocess.Process, job: bytes, body: bytes | memoryview) -> None:
    """The job's description, then the body itself, a piece at a time (no copy of it)."""
    child.stdin.write(len(job).to_bytes(8, "little") + job)
    view = memoryview(body)
    for start in range(0, len(view), 1 << 20):
        child.stdin.write(view[start : start + (1 << 20)])
        await child.stdin.drain()
    child.stdin.close()


def _detached(req: kserve.InferRequest) -> kserve.InferRequest:
    """Binary inputs are views of the body; the reply carries their bytes instead."""
    for i, x in enumerate(req.inputs):
        if isinstance(x.data, memoryview):
            req.inputs[i] = kserve.InferInput(x.name, x.datatype, x.shape, bytes(x.data))
    return req


def main() -> None:
    data = sys.stdin.buffer.read()
    n = int.from_bytes(data[:8], "little")
    header_length, inputs, outputs, max_batch_size = pickle.loads(data[8 : 8 + n])
    body = memoryview(data)[8 + n :]
    try:
        result = _detached(kserve.parse_infer_request(body, header_length, inputs, outputs, max_batch_size))
    except kserve.ProtocolError as e:
        result = (e.message, e.status)
    sys.stdout.buffer.write(pickle.dumps(result, protocol=5))


if __name__ == "__main__":
    main()
