"""Where and how the gRPC service listens: several grpc.aio servers on one port.

A grpc.aio server takes its calls one at a time: its accept loop awaits each new call
before it asks grpc for the next. Under load, calls then reached the front end one loop
iteration apart and each left alone, in a batch of one; HTTP requests, read from several
sockets an iteration, share batches of 2-3. ``grpc.acceptors`` servers share the port
(``SO_REUSEPORT``: the kernel spreads client connections among them), all in this event
loop, so that many calls are taken at a time: with 4, batches under 16 clients grew from
1.1 to 1.5-1.9 rows.

Each server has the generated handlers as generic ones only. Registered methods (what
the generated ``add_..._to_server`` also asks for) make grpc.aio's accept loop wait on
one future per method (14 here) for every call it takes (grpc PR #43461 describes it).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

import grpc
from tritonclient.grpc import service_pb2_grpc

logger = logging.getLogger("router_api.grpc_listen")

# Reads of 1 MiB at a time, never under 64 KiB: grpc's default starts at 8 KiB and a 602 KB
# tensor then takes dozens of reads; a bare server flipped between ~750 and ~1,500 calls/s
# from run to run with it, and stayed at ~1,500 with these.
READS = [("grpc.experimental.tcp_read_chunk_size", 1 << 20), ("grpc.experimental.tcp_min_read_chunk_size", 1 << 16),
         ("grpc.experimental.tcp_max_read_chunk_size", 1 << 22)]  # fmt: skip


class _Handlers:
    """Stands in for a server to take the generated registration's method handlers."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers


def add_service(service, server: grpc.aio.Server) -> None:
    """The generated handlers, except that inference requests reach their handlers as
    bytes (``grpc_codec.parse_infer`` takes their tensors out without copying), all
    registered as generic ones (see the module's note)."""
    taken = _Handlers()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service, taken)
    handlers = dict(taken.handlers)
    for name in ("ModelInfer", "ModelStreamInfer"):
        handlers[name] = handlers[name]._replace(request_deserializer=None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(taken.service, handlers),))


def port_taken(host: str, port: int) -> bool:
    """Whether anything listens on ``host:port`` now. The servers share their port with
    each other, so they would also share it with another program listening there (gRPC
    servers set SO_REUSEPORT by default): a plain bind fails on any listener."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: closed connections do not count
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            raise
    return False


class Acceptors:
    """The servers sharing one port, stopped together."""

    def __init__(self, servers: list[grpc.aio.Server], port: int) -> None:
        self.servers, self.port = servers, port

    async def stop(self, grace: float | None) -> None:
        await asyncio.gather(*(s.stop(grace) for s in self.servers))


async def start_grpc(service, host: str, port: int, max_message: int, acceptors: int = 1,
                     shared: bool = False) -> Acceptors:  # fmt: skip
    """Listen on ``host:port`` (0: a free port, the first server's) with ``acceptors``
    servers of ``service``; messages above ``max_message`` are refused by grpc itself
    (RESOURCE_EXHAUSTED). With ``shared``, other front ends (``http.frontends``) listen
    there too, the same way."""
    if port and not shared and port_taken(host, port):
        raise OSError(errno.EADDRINUSE, f"cannot listen for gRPC on {host}:{port}: the port is in use")
    options = [("grpc.max_receive_message_length", max_message), ("grpc.max_send_message_length", max_message),
               ("grpc.so_reuseport", 1), *READS]  # fmt: skip
    servers: list[grpc.aio.Server] = []
    try:
        for _ in range(acceptors):
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            server = grpc.aio.server(options=options)
            add_service(service, server)
            port = server.add_insecure_port(address)
            if port == 0:
                raise OSError(f"cannot listen for gRPC on {address}")
            await server.start()
            servers.append(server)
    except BaseException:
        await asyncio.gather(*(s.stop(None) for s in servers))
        raise
    logger.info("gRPC front end on %s:%d (%d acceptors)", host, port, acceptors)
    return Acceptors(servers, port)
