"""`up`'s workers come back when they die (issue 15): at once after a long life, after a
doubling back-off while they keep dying young; live, a SIGKILLed worker is replaced and
serves again, and ``/v1/workers`` counts the restart."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from router_api.supervisor import MAX_BACKOFF, YOUNG, Supervisor
from scheduler_plugins.builtin_models import build_trivial
from tests.cluster import Cluster, child_pids
from tests.conftest import ARTIFACTS
from tests.http import infer_binary


class Proc:
    def __init__(self) -> None:
        self.returncode = None

    def poll(self):
        return self.returncode


def test_a_worker_that_dies_is_started_again_and_one_that_keeps_dying_waits_longer(monkeypatch):
    started: list[tuple[int, int]] = []

    def spawn(i: int, restarts: int) -> Proc:
        started.append((i, restarts))
        return Proc()

    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    s = Supervisor(spawn, 2)
    assert started == [(0, 0), (1, 0)]
    clock[0] += YOUNG + 100  # worker 1 lived long, then died: straight back
    s.procs[1].returncode = -9
    s.check(clock[0])
    assert started[-1] == (1, 1)
    for n in range(2, 9):  # now it dies young, again and again: waits 2, 4, ... at most MAX_BACKOFF
        s.procs[1].returncode = 1
        s.check(clock[0])
        assert started[-1] == (1, n - 1)  # not yet
        clock[0] += min(MAX_BACKOFF, 2.0 ** (n - 1))
        s.check(clock[0])
        assert started[-1] == (1, n)
    assert s.restarts == [0, 8] and s.procs[0].poll() is None


@pytest.mark.integration
def test_a_killed_worker_is_replaced_and_serves_again(tmp_path):
    model = build_trivial(tmp_path / "trivial.onnx")
    c = Cluster(workers=2, args=["--threads", "1", "--model", str(model), "--model-name", "resnet50"], log=ARTIFACTS / "supervisor.log").start()
    try:
        victim = child_pids(c.proc.pid, "router_api.cli worker")[0]
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        while True:
            ws = c.get("/v1/workers")["workers"]
            if len(ws) == 2 and any(w["restarts"] == 1 for w in ws):
                break
            assert time.monotonic() - t0 < 60, ws
            time.sleep(0.2)
        print(f"replaced and registered in {time.monotonic() - t0:.1f} s")
        assert victim not in child_pids(c.proc.pid, "router_api.cli worker") and len(child_pids(c.proc.pid, "router_api.cli worker")) == 2
        x = np.zeros((1, 3, 224, 224), np.float32)
        assert all(infer_binary(c.url, x).status == 200 for _ in range(8))
    finally:
        c.stop()
