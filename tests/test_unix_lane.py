"""The same-host lane over a Unix socket: framed pickles, replies matched by id in any
order, a broken connection failing exactly the batches on it, and a socket directory
nobody else can enter. (Live, every same-host test cluster sends its batches on it.)"""

from __future__ import annotations

import asyncio
import os
import pickle

import pytest

from core.frames import HEADER, frame, lane_dir, split_frames
from core.protocol import BatchSpec
from router_api.unix_lane import Lane


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """A worker's view of the next frame, read as a stream."""
    (n,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    return await reader.readexactly(n)


async def call(lane: Lane, s: BatchSpec) -> dict:
    """``lane.send``, awaited: the reply, or the OSError that lost it."""
    done = asyncio.get_running_loop().create_future()

    def settle(result: dict | OSError) -> None:
        if not done.done():
            done.set_exception(result) if isinstance(result, OSError) else done.set_result(result)

    lane.send(s, settle)
    return await done


def spec(i: int) -> BatchSpec:
    return BatchSpec(f"b-{i}", "topic", [], False, "m")


async def worker(path: str, answer_after: int, then_close: bool = False):
    """Answers the specs it reads, newest first, once ``answer_after`` have come."""

    async def serve(reader, writer):
        got = []
        while len(got) < answer_after:
            got.append(pickle.loads(await read_frame(reader)))
        for s in reversed(got):
            writer.write(frame(pickle.dumps({"id": s.id, "model": s.model})))
        if then_close:
            pickle.loads(await read_frame(reader))  # one more, never answered
            writer.close()

    return await asyncio.start_unix_server(serve, path)


def test_replies_find_their_batch_in_any_order(tmp_path):
    async def main():
        path = str(tmp_path / "w.sock")
        server = await worker(path, answer_after=3)
        lane = Lane(path, 1.0)
        replies = await asyncio.gather(*(call(lane, spec(i)) for i in range(3)))
        assert [r["id"] for r in replies] == ["b-0", "b-1", "b-2"] and lane.in_flight == 0
        await lane.close()
        server.close()

    asyncio.run(main())


def test_a_broken_connection_fails_the_batches_on_it_and_the_next_call_reconnects(tmp_path):
    async def main():
        path = str(tmp_path / "w.sock")
        server = await worker(path, answer_after=1, then_close=True)
        lane = Lane(path, 1.0)
        assert (await call(lane, spec(0)))["id"] == "b-0"
        with pytest.raises(ConnectionResetError, match="closed|broke"):
            await call(lane, spec(1))
        assert (await call(lane, spec(2)))["id"] == "b-2"  # a new connection
        server.close()
        os.unlink(path)
        lane2 = Lane(path, 1.0)
        with pytest.raises(OSError):  # nobody listens: the link sends that worker tasks instead
            await call(lane2, spec(3))

    asyncio.run(main())


def test_batches_sent_while_it_connects_share_one_connection(tmp_path):
    async def main():
        path = str(tmp_path / "w.sock")
        connections = []

        async def serve(reader, writer):
            connections.append(writer)
            while True:
                s = pickle.loads(await read_frame(reader))
                writer.write(frame(pickle.dumps({"id": s.id})))

        server = await asyncio.start_unix_server(serve, path)
        lane = Lane(path, 1.0)
        replies = await asyncio.gather(*(call(lane, spec(i)) for i in range(5)))  # all sent before it connected
        assert sorted(r["id"] for r in replies) == [f"b-{i}" for i in range(5)] and len(connections) == 1
        await lane.close()
        server.close()

    asyncio.run(main())


def test_a_reply_that_is_not_one_fails_the_batches_on_that_connection_only(tmp_path):
    async def main():
        path = str(tmp_path / "w.sock")

        async def serve(reader, writer):
            s = pickle.loads(await read_frame(reader))
            if s.id == "b-0":
                pickle.loads(await read_frame(reader))  # b-1 is on this connection too
                writer.write(frame(b"not a pickle"))
            else:
                writer.write(frame(pickle.dumps({"id": s.id})))

        server = await asyncio.start_unix_server(serve, path)
        lane = Lane(path, 1.0)
        outcomes = await asyncio.gather(call(lane, spec(0)), call(lane, spec(1)), return_exceptions=True)
        assert all(isinstance(o, ConnectionResetError) and "bad reply" in str(o) for o in outcomes)
        assert (await call(lane, spec(2)))["id"] == "b-2" and lane.in_flight == 0  # a new connection
        await lane.close()
        server.close()

    asyncio.run(main())


def test_a_reply_handler_that_raises_does_not_break_the_lane(tmp_path, caplog):
    async def main():
        path = str(tmp_path / "w.sock")
        server = await worker(path, answer_after=2)
        lane = Lane(path, 1.0)
        got = asyncio.get_running_loop().create_future()

        def broken(reply):
            raise RuntimeError("a bug in handling this reply")

        lane.send(spec(0), broken)
        lane.send(spec(1), got.set_result)
        assert (await got)["id"] == "b-1"  # answered after b-0's handler raised
        await lane.close()
        server.close()

    asyncio.run(main())
    assert "handling a lane reply failed" in caplog.text


def test_whole_frames_are_taken_from_the_buffer_and_a_partial_one_stays():
    buffer = bytearray(frame(b"one") + frame(b"two") + frame(b"three")[:5])
    assert split_frames(buffer) == [b"one", b"two"] and buffer == frame(b"three")[:5]
    buffer += frame(b"three")[5:]
    assert split_frames(buffer) == [b"three"] and buffer == bytearray()


def test_the_socket_directory_is_this_users_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    d = lane_dir()
    assert d.stat().st_mode & 0o777 == 0o700 and d.stat().st_uid == os.getuid()
    os.chmod(d, 0o755)  # someone widened it: refused, and the worker falls back to the Dask listener
    with pytest.raises(OSError, match="not a private directory"):
        lane_dir()


def test_a_frame_is_its_length_then_its_bytes():
    assert frame(b"abc") == b"\x00\x00\x00\x03abc"


class Shelf:
    """A worker's shelf with no model: every batch is answered (its items fail there)."""

    accepted = 0

    def accept(self) -> None:
        self.accepted += 1

    def reply_leaves(self) -> int:
        self.accepted -= 1
        return self.accepted

    def get(self, model: str):
        raise LookupError(f"no model {model!r} here")


def test_the_workers_end_answers_each_batch_and_drops_a_connection_that_sends_garbage(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from worker_setup.unix_lane import UnixLane

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))

    async def main():
        pool = ThreadPoolExecutor(2)
        lane = UnixLane(SimpleNamespace(address="tcp://w:1"), Shelf(), pool)
        path = await lane.start()
        reader, writer = await asyncio.open_unix_connection(path)
        other_reader, other_writer = await asyncio.open_unix_connection(path)
        writer.write(frame(pickle.dumps(spec(0))))
        reply = pickle.loads(await read_frame(reader))
        assert (reply["id"], reply["worker"], reply["load"]) == ("b-0", "tcp://w:1", 0)
        writer.write(frame(b"garbage"))
        assert await reader.read() == b""  # that connection is closed...
        other_writer.write(frame(pickle.dumps(spec(1))))
        assert pickle.loads(await read_frame(other_reader))["id"] == "b-1"  # ...and only that one
        other_writer.close()
        lane.close()
        pool.shutdown()
        assert not os.path.exists(path)

    asyncio.run(main())
