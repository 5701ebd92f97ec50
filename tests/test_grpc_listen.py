"""How the gRPC service listens: several grpc.aio servers share one port, every one of
them answers, and a port some other program listens on is refused, never shared."""

from __future__ import annotations

import asyncio
import socket

import grpc
import psutil
import pytest
from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc

from router_api.grpc_listen import port_taken, start_grpc
from tests.cluster import free_port

LIVE = "/inference.GRPCInferenceService/ServerLive"


class Live(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.calls = 0

    async def ServerLive(self, request, context):
        self.calls += 1
        return pb.ServerLiveResponse(live=True)


def listeners(port: int) -> int:
    return sum(1 for c in psutil.Process().net_connections("tcp") if c.laddr.port == port and c.status == psutil.CONN_LISTEN)


async def live_on_own_connections(port: int, n: int) -> list[bool]:
    """``n`` calls, each on a connection of its own (the kernel picks a server for each)."""
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(n)]  # fmt: skip
    try:
        calls = [c.unary_unary(LIVE, request_serializer=pb.ServerLiveRequest.SerializeToString,
                               response_deserializer=pb.ServerLiveResponse.FromString) for c in channels]  # fmt: skip
        return [r.live for r in await asyncio.gather(*(call(pb.ServerLiveRequest(), timeout=10) for call in calls))]
    finally:
        await asyncio.gather(*(c.close() for c in channels))


def test_acceptors_share_the_port_and_every_connection_is_answered():
    async def main():
        port, service = free_port(), Live()
        servers = await start_grpc(service, "127.0.0.1", port, 1 << 20, acceptors=3)
        try:
            assert listeners(port) == 3
            assert await live_on_own_connections(port, 24) == [True] * 24
            assert service.calls == 24
        finally:
            await servers.stop(None)
        assert listeners(port) == 0

    asyncio.run(main())


def test_port_0_is_one_free_port_for_all_of_them():
    async def main():
        servers = await start_grpc(Live(), "127.0.0.1", 0, 1 << 20, acceptors=3)
        try:
            assert servers.port > 0 and listeners(servers.port) == 3
            assert await live_on_own_connections(servers.port, 6) == [True] * 6
        finally:
            await servers.stop(None)

    asyncio.run(main())


def test_a_port_another_program_listens_on_is_refused():
    async def main():
        port = free_port()
        with socket.socket() as other:
            other.bind(("127.0.0.1", port))
            other.listen()
            assert port_taken("127.0.0.1", port)
            with pytest.raises(OSError, match="in use"):
                await start_grpc(Live(), "127.0.0.1", port, 1 << 20, acceptors=2)
        # ... and so is one where another gRPC server listens with SO_REUSEPORT (grpc's default)
        port = free_port()
        other = grpc.aio.server()
        other.add_insecure_port(f"127.0.0.1:{port}")
        await other.start()
        try:
            with pytest.raises(OSError, match="in use"):
                await start_grpc(Live(), "127.0.0.1", port, 1 << 20, acceptors=2)
        finally:
            await other.stop(None)
        assert not port_taken("127.0.0.1", port)

    asyncio.run(main())


def test_front_ends_that_share_the_port_join_it():
    """``http.frontends`` > 1: each front end process listens on the same port."""

    async def main():
        port = free_port()
        first = await start_grpc(Live(), "127.0.0.1", port, 1 << 20, acceptors=2)
        second = await start_grpc(Live(), "127.0.0.1", port, 1 << 20, acceptors=2, shared=True)
        try:
            assert listeners(port) == 4
            assert await live_on_own_connections(port, 8) == [True] * 8
        finally:
            await asyncio.gather(first.stop(None), second.stop(None))

    asyncio.run(main())
