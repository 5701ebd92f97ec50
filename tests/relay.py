"""A user-space TCP relay that behaves like bore from the outside: one public port that
forwards every connection to a local one, with optional one-way delay and jitter.

    python -m tests.relay --to 127.0.0.1:8786 [--listen 0] [--delay-ms 75] [--jitter-ms 10]

It prints ``listening at 127.0.0.1:PORT`` like bore does. The kernel here has no netem,
so latency is added in user space: every chunk is delivered ``delay`` after it arrived,
in order, in both directions.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, jitter: float) -> None:
    queue: asyncio.Queue = asyncio.Queue()

    async def deliver() -> None:
        last = 0.0
        while True:
            due, chunk = await queue.get()
            if chunk is None:
                break
            due = max(due, last)  # jitter never reorders bytes
            last = due
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            writer.write(chunk)
            await writer.drain()
        writer.close()

    sender = asyncio.ensure_future(deliver())
    try:
        while chunk := await reader.read(65536):
            queue.put_nowait((time.monotonic() + delay + random.uniform(0, jitter), chunk))
    except ConnectionError:
        pass
    queue.put_nowait((0.0, None))
    await sender


async def main(args: argparse.Namespace) -> None:
    host, port = args.to.rsplit(":", 1)
    delay, jitter = args.delay_ms / 1e3, args.jitter_ms / 1e3

    async def handle(r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await asyncio.open_connection(host, int(port))
        except OSError:
            w1.close()
            return
        await asyncio.gather(pipe(r1, w2, delay, jitter), pipe(r2, w1, delay, jitter), return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", args.listen)
    print(f"listening at 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--to", required=True)
    p.add_argument("--listen", type=int, default=0)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    try:
        asyncio.run(main(p.parse_args()))
    except KeyboardInterrupt:
        pass
