"""A user-space TCP relay that behaves like bore from the outside: one public port that
forwards every connection to a local one, with optional one-way delay, jitter, a
bandwidth cap, and outages.

    python -m benchmarks.relay --to 127.0.0.1:8786 [--listen 0] [--delay-ms 75] [--jitter-ms 10]
                          [--rate-kbps 2000] [--drop-seconds 10]

It prints ``listening at 127.0.0.1:PORT`` like bore does. The kernel here has no netem,
so latency is added in user space: every chunk is delivered ``delay`` after it arrived,
in order, in both directions. SIGUSR1 is an outage: every open connection is cut and
new ones are refused for ``--drop-seconds``, as when a tunnel goes down. SIGUSR2 prints
the bytes carried so far each way (``bytes to-local=N from-local=M``): what crossed the
"link". The tests and benchmarks/tunnel.py use it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import time


COUNTS = {"to-local": 0, "from-local": 0}


async def pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, jitter: float, rate: float, direction: str
) -> None:
    queue: asyncio.Queue = asyncio.Queue()

    async def deliver() -> None:
        last = free_at = 0.0
        while True:
            due, chunk = await queue.get()
            if chunk is None:
                break
            if rate:  # the link is busy sending earlier bytes until free_at
                free_at = max(free_at, due - delay) + len(chunk) / rate
                due = max(due, free_at + delay)
            due = max(due, last)  # jitter never reorders bytes
            last = due
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            writer.write(chunk)
            await writer.drain()
        writer.close()

    sender = asyncio.ensure_future(deliver())
    try:
        while chunk := await reader.read(65536):
            COUNTS[direction] += len(chunk)
            queue.put_nowait((time.monotonic() + delay + random.uniform(0, jitter), chunk))
    except ConnectionError:
        pass
    queue.put_nowait((0.0, None))
    await sender


async def main(args: argparse.Namespace) -> None:
    host, port = args.to.rsplit(":", 1)
    delay, jitter, rate = args.delay_ms / 1e3, args.jitter_ms / 1e3, args.rate_kbps * 125.0
    open_writers: set[asyncio.StreamWriter] = set()
    down_until = 0.0

    def outage() -> None:
        nonlocal down_until
        down_until = time.monotonic() + args.drop_seconds
        print(f"outage: cutting {len(open_writers)} connections, refusing new ones for {args.drop_seconds:g} s", flush=True)
        for w in list(open_writers):
            w.transport.abort()

    async def handle(r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        if time.monotonic() < down_until:
            w1.transport.abort()
            return
        try:
            r2, w2 = await asyncio.open_connection(host, int(port))
        except OSError:
            w1.close()
            return
        open_writers.update((w1, w2))
        try:
            await asyncio.gather(pipe(r1, w2, delay, jitter, rate, "to-local"), pipe(r2, w1, delay, jitter, rate, "from-local"), return_exceptions=True)
        finally:
            open_writers.difference_update((w1, w2))

    def counts() -> None:
        print(f"bytes to-local={COUNTS['to-local']} from-local={COUNTS['from-local']}", flush=True)

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, outage)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, counts)
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
    p.add_argument("--rate-kbps", type=float, default=0.0, help="bandwidth cap per direction per connection (0 = none)")
    p.add_argument("--drop-seconds", type=float, default=10.0, help="how long an outage (SIGUSR1) lasts")
    try:
        asyncio.run(main(p.parse_args()))
    except KeyboardInterrupt:
        pass
