"""The processes batch-router runs: scheduler, workers, front end, or all on one machine.

The scheduler gets batch-router's plugin and pages from ``scheduler_plugins.preload``,
and each worker its model from ``worker_setup.preload``: Dask imports both by name, so
the front end never imports either room. ``up`` puts the HTTP front end in the
scheduler's own process and event loop, with its Dask client connected over
``inproc://``: a batch reaches a worker and back with no TCP hop on the front end's side.
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
from functools import partial
from urllib.parse import urlsplit

import dask.config
from distributed import Client, Scheduler, Worker
from distributed.utils_comm import retry

from core.config import DASK_SETTINGS, TUNNEL_SETTINGS, Settings, tls_dir
from core.heap import freeze_startup_heap
from core.protocol import EXTENSION
from router_api.remote_access import RemoteAccess
from router_api.supervisor import Supervisor

logger = logging.getLogger("batch-router")

SCHEDULER_PRELOAD = "scheduler_plugins.preload"
WORKER_PRELOAD = "worker_setup.preload"


# Two task threads: while one batch runs on the device, the next one decodes and
# stacks, so a GPU does not idle between batches (the session itself runs one at a time).
TASK_THREADS = 2

JOIN_ATTEMPTS = 8  # a round of attempts to join: 0, 1, 3, 7, 15, then 30 s apart
SHORT_SESSION = 60.0  # a joined worker dropped sooner than this counts as a failed join
JOIN_TIMEOUT = float(os.environ.get("BATCH_ROUTER_JOIN_TIMEOUT", 120))  # seconds to reach and register with a scheduler
FRONTEND_CHILD = "BATCH_ROUTER_FRONTEND_CHILD"  # set in the front ends `up` and `serve` start
RECONNECT_TIMEOUT = 3.0  # seconds each try to reach a (lost) scheduler may take
FIRST_CONNECT = 8  # tries at start: about 30 s for a scheduler still starting
CPUS_ENV = "BATCH_ROUTER_WORKER_CPUS"  # the cores a worker `up` starts may use (worker.cpu-affinity)
RESTARTS_ENV = "BATCH_ROUTER_WORKER_RESTARTS"  # how many times `up` has started this worker again


class JoinFailed(OSError):
    """A worker could not join its scheduler, or joined without its model."""


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
    """Until SIGINT or SIGTERM; for a front end `up` or `serve` started, also until that
    parent is gone (killed, it could not stop us: we would hold the port, serving 503s)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watch = asyncio.ensure_future(_orphaned(stop)) if os.environ.get(FRONTEND_CHILD) else None
    await stop.wait()
    if watch is not None:
        watch.cancel()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)


async def _orphaned(stop: asyncio.Event) -> None:
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    logger.warning("the process that started this front end is gone; stopping")
    stop.set()


def open_remote_access(settings: Settings, port: int, host: str, rotate_ca: bool) -> RemoteAccess | None:
    address = settings.scheduler.public_address
    if not address:
        return None
    return RemoteAccess.open(address, port, host, tls_dir(settings), settings.scheduler.bore_server, rotate_ca)


async def serve_until_signal(client: Client, settings: Settings, connect=None) -> None:
    """Run the HTTP front end until SIGINT/SIGTERM, then answer everything queued and in
    flight before closing connections."""
    from router_api.app import start_front_end

    host, port = settings.http.host, settings.http.port
    router, server = await start_front_end(client, settings, connect)
    freeze_startup_heap("front end")
    print(f"batch-router: serving http://{host}:{port}/v2/models/{router.model_name}", flush=True)
    await wait_for_signal()
    logger.info("shutting down: answering queued and in-flight requests")
    server.stop()
    if router.grpc is not None:  # new calls refused; those running finish with the queue below
        grpc_done = asyncio.ensure_future(router.grpc.stop(grace=30.0))
    await router.link.close()
    router.close()
    await server.close_all_connections()
    if router.grpc is not None:
        await grpc_done


def spawn_worker(
    address: str, name: str, threads: int, slowdown: float | None = None, token: str | None = None,
    cpus: tuple[int, ...] | None = None, restarts: int = 0,
) -> subprocess.Popen:
    """A local worker process; with ``token`` it joins a TLS scheduler (the token goes by
    environment, never on a command line other users can read). It inherits this
    process's Dask config, batch-router's settings included; with ``cpus``, it runs on
    those cores only (it pins itself before it starts a thread; they all inherit them)."""
    env = dict(os.environ, DASK_INTERNAL_INHERIT_CONFIG=dask.config.serialize(dask.config.global_config))
    cmd = [sys.executable, "-m", "router_api.cli", "worker", "--name", name]
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
    if cpus:  # the worker pins itself first thing, before it starts any thread
        env[CPUS_ENV] = ",".join(map(str, cpus))
    env[RESTARTS_ENV] = str(restarts)
    return subprocess.Popen(cmd, env=env, start_new_session=True)


def spawn_frontends(scheduler: str, settings: Settings) -> list[subprocess.Popen]:
    """The other ``http.frontends - 1`` front ends: ``serve`` processes on the same port,
    for the same scheduler, each with its own Dask client and batcher. They inherit this
    process's settings (so they listen with SO_REUSEPORT too)."""
    if settings.http.frontends <= 1 or os.environ.get(FRONTEND_CHILD):
        return []
    env = dict(os.environ, DASK_INTERNAL_INHERIT_CONFIG=dask.config.serialize(dask.config.global_config), **{FRONTEND_CHILD: "1"})
    cmd = [sys.executable, "-m", "router_api.cli", "serve", "--scheduler", scheduler]
    return [subprocess.Popen(cmd, env=env, start_new_session=True) for _ in range(settings.http.frontends - 1)]


def stop_processes(procs: list[subprocess.Popen], timeout: float = 15.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("process %d did not stop in %.0fs; killing it", p.pid, timeout)
            p.kill()
            p.wait()


async def up(settings: Settings, slowdown: list[float] | None = None, rotate_ca: bool = False) -> None:
    """Everything on one machine: scheduler + dashboard + front end here, N workers as
    processes; ``slowdown[i]`` (a benchmark knob) stretches worker i's batches. With a
    public address the scheduler's port speaks mutual TLS only and a join token is
    printed for remote workers; the front end still talks to it in-process."""
    slowdown = list(slowdown or [])
    dashboard = settings.scheduler.dashboard_address
    refuse_public_plaintext(settings.http.host, "HTTP front end")
    refuse_public_plaintext(dashboard.rsplit(":", 1)[0], "Dask dashboard")
    workers, port = settings.worker.count, settings.scheduler.port
    cores = len(settings.worker.cpu_affinity) if settings.worker.cpu_affinity else os.cpu_count() or 1
    threads = settings.worker.intra_op_threads or max(1, cores // max(1, workers))
    public = open_remote_access(settings, port, "127.0.0.1", rotate_ca)
    with dask.config.set({**DASK_SETTINGS, **(TUNNEL_SETTINGS if public else {})}):
        try:
            async with Scheduler(
                host=[None, "127.0.0.1"],
                protocol=["inproc", "tls" if public else "tcp"],
                port=[None, port],
                security=public.ca.security("scheduler") if public else None,
                dashboard=True,
                dashboard_address=dashboard,
                preload=[SCHEDULER_PRELOAD],
            ) as scheduler:
                inproc, local = scheduler.listeners[0].contact_address, scheduler.listeners[1].contact_address
                local_token = public.token(local.split("://", 1)[1]) if public else None
                supervisor = Supervisor(
                    lambda i, restarts: spawn_worker(local, f"local-{i}", threads, slowdown[i] if i < len(slowdown) else None,
                                                     local_token, settings.worker.cpu_affinity, restarts),
                    workers,
                )  # fmt: skip
                watching = asyncio.ensure_future(supervisor.watch())
                frontends = spawn_frontends(local, settings)
                try:
                    security = public.ca.security("client") if public else None
                    async with Client(inproc, asynchronous=True, security=security) as client:
                        print(f"batch-router: scheduler {local}, dashboard http://{dashboard}/gpu-router", flush=True)
                        if public:
                            public.announce()
                        await serve_until_signal(client, settings)
                finally:
                    watching.cancel()  # stopping: nobody comes back
                    await asyncio.to_thread(stop_processes, frontends)  # they drain their queues first
                    await asyncio.to_thread(stop_processes, supervisor.procs)
        finally:
            if public:
                public.close()


async def run_scheduler(settings: Settings, rotate_ca: bool = False) -> None:
    """A scheduler for this machine only (plain TCP on loopback), or, with a public
    address, one that speaks only mutual TLS and prints a worker join token."""
    host, port, dashboard = settings.scheduler.host, settings.scheduler.port, settings.scheduler.dashboard_address
    refuse_public_plaintext(dashboard.rsplit(":", 1)[0], "Dask dashboard")
    public = open_remote_access(settings, port, host, rotate_ca)
    if public is None:
        refuse_public_plaintext(host, "Dask scheduler")
    with dask.config.set({**DASK_SETTINGS, **(TUNNEL_SETTINGS if public else {})}):
        try:
            async with Scheduler(
                host=host,
                port=port,
                protocol="tls" if public else "tcp",
                security=public.ca.security("scheduler") if public else None,
                dashboard=True,
                dashboard_address=dashboard,
                preload=[SCHEDULER_PRELOAD],
            ) as scheduler:
                print(f"batch-router: scheduler {scheduler.address}, dashboard http://{dashboard}/gpu-router", flush=True)
                if public:
                    public.announce()
                freeze_startup_heap("scheduler")
                await wait_for_signal()
        finally:
            if public:
                public.close()


async def serve(settings: Settings, scheduler_address: str) -> None:
    """The front end for a running scheduler; a tls:// one is reached with this
    machine's client certificate from the cluster CA."""
    refuse_public_plaintext(settings.http.host, "HTTP front end")
    security = None
    if scheduler_address.startswith("tls://"):
        from router_api.tls import ClusterCA

        ca_dir = tls_dir(settings)
        if not (ca_dir / "ca.pem").exists():
            raise SystemExit(f"no cluster CA in {ca_dir}: start `batch-router scheduler --public-address ...` first")
        security = ClusterCA(ca_dir).security("client")
    frontends = spawn_frontends(scheduler_address, settings)
    # Clients that try for a few seconds each: Dask's own reconnection then gives up soon
    # after a scheduler is lost (it backs off to seconds between tries), and the front end
    # tries a fresh one every half second until the scheduler is back.
    connect = partial(Client, scheduler_address, asynchronous=True, security=security, timeout=RECONNECT_TIMEOUT)
    try:
        with dask.config.set(DASK_SETTINGS):
            try:
                client = await retry(connect, count=FIRST_CONNECT, delay_min=0.5, delay_max=1.0,
                                     retry_on_exceptions=(OSError, asyncio.TimeoutError), operation=f"connecting to {scheduler_address}")  # fmt: skip
            except (OSError, asyncio.TimeoutError) as e:
                raise SystemExit(f"batch-router serve: no scheduler answers at {scheduler_address}: {e}") from None
            try:
                await serve_until_signal(client, settings, connect)
            finally:
                await client.close()
    finally:
        await asyncio.to_thread(stop_processes, frontends)


async def serve_worker(address: str, name: str | None, security, contact: str | None, least: float = 0.0) -> None:
    """One Worker, from joining until it closes (it does when it loses its scheduler). A
    session shorter than ``least`` seconds counts as a failed join, so that a scheduler
    that keeps dropping the worker is backed off from, not hammered."""
    joined = asyncio.get_running_loop().time()
    worker = Worker(
        address,
        nthreads=TASK_THREADS,
        name=name,
        preload=[WORKER_PRELOAD],
        host="127.0.0.1",
        protocol="tls" if security else "tcp",
        security=security,
        contact_address=contact,
        dashboard_address="127.0.0.1:0",
    )
    try:  # Dask would wait for an absent scheduler forever, ten tries a second
        await asyncio.wait_for(worker.start(), JOIN_TIMEOUT)
    except (Exception, asyncio.TimeoutError) as e:  # could not reach or register with the scheduler
        await worker.close(reason="could not join")
        said = f"no answer in {JOIN_TIMEOUT:.0f} s" if isinstance(e, asyncio.TimeoutError) else str(e)
        raise JoinFailed(f"could not join {address}: {said}") from e
    try:
        if EXTENSION not in worker.extensions:  # Dask starts it even when the preload failed
            raise JoinFailed("the worker started without its model (the preload failed; see above)")
        await worker.finished()
    finally:
        await worker.close()
    if (lasted := asyncio.get_running_loop().time() - joined) < least:
        raise JoinFailed(f"lost the scheduler at {address} {lasted:.0f} s after joining it; rejoining with back-off")


async def run_worker(address: str | None, name: str | None, token: str | None = None, contact: str | None = None) -> None:
    """A worker that only dials out: its own listener stays on loopback (task RPCs run
    pickled code), and its replies ride the connection it opened.

    Dask workers do not reconnect: a worker that loses its scheduler closes. Joined
    with a token (a remote scheduler, through a tunnel that drops), this rejoins with a
    fresh Worker until it is told to stop, backing off with distributed's ``retry``.
    """
    security = None
    if token:
        from router_api.tls import read_token, security_for

        address, creds = read_token(token)
        security = security_for("worker", creds)
        dask.config.set(TUNNEL_SETTINGS)
    elif address and address.startswith("tls://"):
        raise SystemExit("a tls:// scheduler takes workers by join token: batch-router worker --join TOKEN")
    elif address:
        refuse_public_plaintext(urlsplit(address).hostname or "", "Dask scheduler connection")
    else:
        raise SystemExit("give the scheduler's address (loopback) or --join TOKEN")
    dask.config.set(DASK_SETTINGS)
    if token:
        join = partial(retry, partial(serve_worker, address, name, security, contact, SHORT_SESSION), count=JOIN_ATTEMPTS,
                       delay_min=1.0, delay_max=30.0, retry_on_exceptions=(JoinFailed,), operation=f"joining {address}")  # fmt: skip
        work = asyncio.ensure_future(rejoin_forever(join, address))
    else:
        work = asyncio.ensure_future(serve_worker(address, name, security, contact))
    stop = asyncio.ensure_future(wait_for_signal())
    try:
        await asyncio.wait([stop, work], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        work.cancel()  # a live Worker closes itself on the way out
        try:
            await work
        except asyncio.CancelledError:
            pass
        except JoinFailed as e:
            raise SystemExit(f"batch-router worker: {e}") from None


async def rejoin_forever(join, address: str) -> None:
    """A round of attempts at a time, each with its back-off; between rounds, the longest
    wait. A worker that served a while rejoins at once when it is dropped."""
    while True:
        try:
            await join()
            logger.warning("lost the scheduler at %s; rejoining", address)
        except JoinFailed as e:
            logger.warning("%s; trying again in 30 s", e)
            await asyncio.sleep(30.0)
