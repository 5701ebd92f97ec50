"""The processes batch-router runs: scheduler, workers, front end, or all on one machine.

``up`` puts the HTTP front end in the scheduler's own process and event loop, with its
Dask client connected over ``inproc://``: a batch reaches a worker and back with no
TCP hop on the front end's side (shared/research/dask-latency.md §3).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import dask.config
from distributed import Client, Scheduler, Worker

from router_api import config
from router_api.config import DASK_SETTINGS, TUNNEL_SETTINGS
from router_api.heap import freeze_startup_heap
from router_api.public import Public, tls_dir
from scheduler_plugins.dashboard import register as register_pages
from scheduler_plugins.plugin import BatchRouterPlugin

logger = logging.getLogger("batch-router")

def model_path(path: str | None) -> str:
    path = path or config.get("model")
    if path:
        return str(Path(path).expanduser().resolve())
    from worker_setup.resnet50 import ensure_default_model

    return str(ensure_default_model())


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def refuse_public_plaintext(host: str, what: str) -> None:
    """A Dask scheduler reachable without mutual TLS is remote code execution."""
    if not is_loopback(host):
        raise SystemExit(
            f"refusing a non-loopback address {host!r} for the {what} without TLS: anyone "
            "who can connect could run code on this machine. Use 127.0.0.1."
        )


async def wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)


async def serve_until_signal(client: Client, host: str, port: int) -> None:
    """Run the HTTP front end until SIGINT/SIGTERM, then answer everything queued and in
    flight before closing connections."""
    from router_api.app import start_front_end

    router, server = await start_front_end(client, host, port)
    freeze_startup_heap("front end")
    print(f"batch-router: serving http://{host}:{port}/v2/models/{router.model_name}", flush=True)
    await wait_for_signal()
    logger.info("shutting down: answering queued and in-flight requests")
    server.stop()
    await router.dispatcher.close()
    await server.close_all_connections()


def spawn_worker(
    address: str, name: str, threads: int, device: str, slowdown: float | None = None, token: str | None = None
) -> subprocess.Popen:
    """A local worker process; with ``token`` it joins a TLS scheduler (the token goes by
    environment, never on a command line other users can read)."""
    env = dict(os.environ, DASK_INTERNAL_INHERIT_CONFIG=dask.config.serialize(dask.config.global_config))
    cmd = [sys.executable, "-m", "router_api.cli", "worker", "--name", name, "--device", device]
    if token:
        env["BATCH_ROUTER_JOIN_TOKEN"] = token
    else:
        cmd.insert(4, address)
    if threads:
        cmd += ["--threads", str(threads)]
    if slowdown is not None:
        cmd += ["--slowdown", str(slowdown)]
    # Own session: a terminal's Ctrl-C reaches only `up`, which then drains the queue and
    # stops the workers itself. Orphaned workers exit when their scheduler goes away.
    return subprocess.Popen(cmd, env=env, start_new_session=True)


def stop_processes(procs: list[subprocess.Popen], timeout: float = 15.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("worker %d did not stop in %.0fs; killing it", p.pid, timeout)
            p.kill()
            p.wait()


async def up(
    model: str | None,
    workers: int,
    host: str,
    port: int,
    scheduler_port: int,
    dashboard: str,
    threads: int,
    device: str,
    slowdown: list[float] | None = None,
    public_address: str | None = None,
    rotate_ca: bool = False,
) -> None:
    """Everything on one machine: scheduler + dashboard + front end here, N workers as
    processes; ``slowdown[i]`` (a benchmark knob) stretches worker i's batches. With a
    public address the scheduler's port speaks mutual TLS only and a join token is
    printed for remote workers; the front end still talks to it in-process."""
    slowdown = list(slowdown or [])
    refuse_public_plaintext(host, "HTTP front end")
    refuse_public_plaintext(dashboard.rsplit(":", 1)[0], "Dask dashboard")
    path = model_path(model)
    threads = threads or int(config.get("worker.intra-op-threads") or 0) or max(1, (os.cpu_count() or 1) // max(1, workers))
    public = Public.open(public_address, scheduler_port, "127.0.0.1", rotate_ca) if public_address else None
    register_pages()
    with dask.config.set({**DASK_SETTINGS, **(TUNNEL_SETTINGS if public else {})}):
        try:
            async with Scheduler(
                host=[None, "127.0.0.1"],
                protocol=["inproc", "tls" if public else "tcp"],
                port=[None, scheduler_port],
                security=public.ca.security("scheduler") if public else None,
                dashboard=True,
                dashboard_address=dashboard,
                plugins=[BatchRouterPlugin(path)],
            ) as scheduler:
                inproc, local = scheduler.listeners[0].contact_address, scheduler.listeners[1].contact_address
                local_token = public.token(local.split("://", 1)[1]) if public else None
                procs = [
                    spawn_worker(local, f"local-{i}", threads, device, slowdown[i] if i < len(slowdown) else None, local_token)
                    for i in range(workers)
                ]
                try:
                    security = public.ca.security("client") if public else None
                    async with Client(inproc, asynchronous=True, security=security) as client:
                        print(f"batch-router: scheduler {local}, dashboard http://{dashboard}/gpu-router", flush=True)
                        if public:
                            public.announce()
                        await serve_until_signal(client, host, port)
                finally:
                    await asyncio.to_thread(stop_processes, procs)
        finally:
            if public:
                public.close()


async def run_scheduler(
    model: str | None, host: str, port: int, dashboard: str, public_address: str | None = None, rotate_ca: bool = False
) -> None:
    """A scheduler for this machine only (plain TCP on loopback), or, with a public
    address, one that speaks only mutual TLS and prints a worker join token."""
    refuse_public_plaintext(dashboard.rsplit(":", 1)[0], "Dask dashboard")
    public = Public.open(public_address, port, host, rotate_ca) if public_address else None
    if public is None:
        refuse_public_plaintext(host, "Dask scheduler")
    register_pages()
    with dask.config.set({**DASK_SETTINGS, **(TUNNEL_SETTINGS if public else {})}):
        try:
            async with Scheduler(
                host=host,
                port=port,
                protocol="tls" if public else "tcp",
                security=public.ca.security("scheduler") if public else None,
                dashboard=True,
                dashboard_address=dashboard,
                plugins=[BatchRouterPlugin(model_path(model))],
            ) as scheduler:
                print(f"batch-router: scheduler {scheduler.address}, dashboard http://{dashboard}/gpu-router", flush=True)
                if public:
                    public.announce()
                freeze_startup_heap("scheduler")
                await wait_for_signal()
        finally:
            if public:
                public.close()


async def run_worker(address: str | None, name: str | None, token: str | None = None, contact: str | None = None) -> None:
    """A worker that only dials out: its own listener stays on loopback (task RPCs run
    pickled code), and its replies ride the connection it opened.

    Dask workers do not reconnect: a worker that loses its scheduler closes. Joined
    with a token (a remote scheduler, through a tunnel that drops), this rejoins with
    a fresh Worker until it is told to stop.
    """
    from urllib.parse import urlsplit

    security = None
    if token:
        from router_api.tls import read_token, security_for

        address, creds = read_token(token)
        security = security_for("worker", creds)
        dask.config.set(TUNNEL_SETTINGS)
    elif address:
        refuse_public_plaintext(urlsplit(address).hostname or "", "Dask scheduler connection")
    else:
        raise SystemExit("give the scheduler's address (loopback) or --join TOKEN")
    dask.config.set(DASK_SETTINGS)
    stop = asyncio.ensure_future(wait_for_signal())
    backoff = 1.0
    try:
        while True:
            started = asyncio.get_running_loop().time()
            try:
                async with Worker(
                    address,
                    nthreads=1,
                    name=name,
                    preload=["worker_setup.preload"],
                    host="127.0.0.1",
                    protocol="tls" if security else "tcp",
                    security=security,
                    contact_address=contact,
                    dashboard_address="127.0.0.1:0",
                ) as worker:
                    if "batch-router" not in worker.extensions:  # Dask starts it even when the preload failed
                        logger.error("worker started without its model (the preload failed; see above); restarting it")
                        await worker.close()
                        if not token:
                            raise SystemExit(1)
                    else:
                        done = asyncio.ensure_future(worker.finished())
                        await asyncio.wait([stop, done], return_when=asyncio.FIRST_COMPLETED)
                        if stop.done():
                            await worker.close()
                            return
            except Exception as e:  # could not reach or register with the scheduler
                if not token:
                    raise
                logger.warning("worker could not join %s: %s", address, e)
            if not token or stop.done():
                return
            if asyncio.get_running_loop().time() - started > 60:
                backoff = 1.0  # it ran a while: a fresh drop, start small again
            logger.warning("lost the scheduler at %s; rejoining in %.0f s", address, backoff)
            await asyncio.wait([stop], timeout=backoff)
            if stop.done():
                return
            backoff = min(30.0, backoff * 2)
    finally:
        stop.cancel()


async def serve(scheduler_address: str, host: str, port: int) -> None:
    """The front end for a running scheduler; a tls:// one is reached with this
    machine's client certificate from the cluster CA."""
    refuse_public_plaintext(host, "HTTP front end")
    security = None
    if scheduler_address.startswith("tls://"):
        from router_api.tls import ClusterCA

        if not (tls_dir() / "ca.pem").exists():
            raise SystemExit(f"no cluster CA in {tls_dir()}: start `batch-router scheduler --public-address ...` first")
        security = ClusterCA(tls_dir()).security("client")
    with dask.config.set(DASK_SETTINGS):
        async with Client(scheduler_address, asynchronous=True, security=security) as client:
            await serve_until_signal(client, host, port)
