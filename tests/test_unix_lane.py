"""The same-host lane over a Unix socket: framed pickles, replies matched by id in any
order, a broken connection failing exactly the batches on it, and a socket directory
nobody else can enter. (Live, every same-host test cluster sends its batches on it.)"""

from __future__ import annotations

import asyncio
import os
import pickle

import pytest

from core.frames import frame, lane_dir, read_frame
from core.protocol import BatchSpec
from router_api.unix_lane import Lane


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
        replies = await asyncio.gather(*(lane.call(spec(i)) for i in range(3)))
        assert [r["id"] for r in replies] == ["b-0", "b-1", "b-2"] and lane.in_flight == 0
        await lane.close()
        server.close()

    asyncio.run(main())


def test_a_broken_connection_fails_the_batches_on_it_and_the_next_call_reconnects(tmp_path):
    async def main():
        path = str(tmp_path / "w.sock")
        server = await worker(path, answer_after=1, then_close=True)
        lane = Lane(path, 1.0)
        assert (await lane.call(spec(0)))["id"] == "b-0"
        with pytest.raises(ConnectionResetError, match="closed|broke"):
            await lane.call(spec(1))
        assert (await lane.call(spec(2)))["id"] == "b-2"  # a new connection
        server.close()
        os.unlink(path)
        lane2 = Lane(path, 1.0)
        with pytest.raises(OSError):  # nobody listens: the link sends that worker tasks instead
            await lane2.call(spec(3))

    asyncio.run(main())


def test_the_socket_directory_is_this_users_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    d = lane_dir()
    assert d.stat().st_mode & 0o777 == 0o700 and d.stat().st_uid == os.getuid()
    os.chmod(d, 0o755)  # someone widened it: refused, and the worker falls back to the Dask listener
    with pytest.raises(OSError, match="not a private directory"):
        lane_dir()


def test_a_frame_is_its_length_then_its_bytes():
    assert frame(b"abc") == b"\x00\x00\x00\x03abc"
