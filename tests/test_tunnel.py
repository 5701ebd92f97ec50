"""Workers behind a tunnel: a bore-like relay with latency between them and the
scheduler, mutual TLS through it, an outage, and a worker killed mid-batch."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import psutil
import pytest

from tests.cluster import ROOT, free_port
from tests.conftest import ARTIFACTS, make_image
from tests.http import request
from tests.test_roles import wait_ready
from tests.test_serving import reference_top
from tests.test_tls import join_token, launch

pytestmark = pytest.mark.integration


def classify(url: str, image: bytes, query: str = "", timeout: float = 120):
    return request(url, "POST", "/v1/classify" + query, image, {"Content-Type": "image/jpeg"}, timeout=timeout)


@contextmanager
def tunnelled_cluster(tmp_path, workers: list[str], delay_ms: int = 20, worker_args: tuple[str, ...] = ()):
    """Scheduler (mutual TLS) <- relay (delay each way) <- workers joined by token;
    the front end talks to the scheduler directly, as on the laptop."""
    sport, dport, hport, rport = free_port(), free_port(), free_port(), free_port()
    env = {"DASK_BATCH_ROUTER__TLS__DIR": str(tmp_path / "tls")}
    ARTIFACTS.mkdir(exist_ok=True)
    relay = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.relay", "--to", f"127.0.0.1:{sport}", "--listen", str(rport),
         "--delay-ms", str(delay_ms), "--drop-seconds", "10"],
        cwd=ROOT, stdout=open(ARTIFACTS / "tunnel-relay.log", "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    procs = [relay]
    try:
        procs.append(launch("scheduler", "--port", str(sport), "--dashboard-port", str(dport),
                            "--public-address", f"127.0.0.1:{rport}", log="tunnel-scheduler.log", env=env))  # fmt: skip
        token = join_token("tunnel-scheduler.log")
        for name in workers:
            procs.append(launch("worker", "--join", token, "--name", name, "--threads", "1", *worker_args,
                                log=f"tunnel-{name}.log", env={}))  # fmt: skip
        procs.append(launch("serve", "--scheduler", f"tls://127.0.0.1:{sport}", "--port", str(hport), log="tunnel-serve.log", env=env))
        url = f"http://127.0.0.1:{hport}"
        wait_ready(url, timeout=180)
        deadline = time.monotonic() + 120
        while len(names(url)) < len(workers):
            assert time.monotonic() < deadline, "workers did not all join through the relay"
            time.sleep(0.25)
        yield url, relay, {p.pid: p for p in procs}
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def names(url: str) -> list[str]:
    return [w["name"] for w in request(url, "GET", "/v1/workers").json()["workers"]]


def worker_pid(name: str) -> int:
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "worker" in cmd and "--name" in cmd and cmd[cmd.index("--name") + 1] == name:
            return p.pid
    raise LookupError(name)


def test_tunnel_outage_loses_nothing_and_the_worker_rejoins(model_path, session, tmp_path):
    with tunnelled_cluster(tmp_path, ["far"]) as (url, relay, _):
        images = [make_image(40 + i) for i in range(6)]
        with ThreadPoolExecutor(6) as pool:
            # 60 s deadlines: long enough to outlive the 10 s outage and the rejoin.
            futures = [pool.submit(classify, url, img, "?timeout=60000000") for img in images]
            time.sleep(0.5)
            relay.send_signal(signal.SIGUSR1)  # the tunnel goes down for 10 s
            responses = [f.result() for f in futures]
        for image, r in zip(images, responses):
            assert r.status in (200, 503, 504), r.body
            if r.status == 200:  # answered once, correctly, never mixed up
                assert [p["index"] for p in r.json()["predictions"]] == reference_top(session, image)[0]
        assert sum(r.status == 200 for r in responses) >= 1
        deadline = time.monotonic() + 90
        while names(url) != ["far"]:
            assert time.monotonic() < deadline, "the worker did not rejoin after the outage"
            time.sleep(0.5)
        assert classify(url, make_image(50)).status == 200
        assert "rejoining" in (ARTIFACTS / "tunnel-far.log").read_text()
        assert "outage" in (ARTIFACTS / "tunnel-relay.log").read_text()


def test_worker_killed_mid_batch_behind_the_tunnel(model_path, session, tmp_path):
    with tunnelled_cluster(tmp_path, ["far-a", "far-b"]) as (url, _, _):
        images = [make_image(60 + i) for i in range(10)]
        with ThreadPoolExecutor(10) as pool:
            futures = [pool.submit(classify, url, img) for img in images]
            deadline = time.monotonic() + 30
            while not any(w["in_flight"] and w["name"] == "far-a" for w in request(url, "GET", "/v1/workers").json()["workers"]):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            os.kill(worker_pid("far-a"), signal.SIGKILL)
            responses = [f.result() for f in futures]
        assert [r.status for r in responses] == [200] * 10
        for image, r in zip(images, responses):
            assert [p["index"] for p in r.json()["predictions"]] == reference_top(session, image)[0]
        assert re.search(r"far-a|re-queueing", (ARTIFACTS / "tunnel-serve.log").read_text())


def test_worker_nothing_can_reach_still_serves(model_path, session, tmp_path):
    """Behind NAT: the worker advertises an address where nothing listens. Batches go
    out on the connection it opened and replies come back on it, so requests flow."""
    dead_end = f"tls://127.0.0.1:{free_port()}"
    with tunnelled_cluster(tmp_path, ["natted"], worker_args=("--contact-address", dead_end)) as (url, _, _):
        workers = request(url, "GET", "/v1/workers").json()["workers"]
        assert [w["address"] for w in workers] == [dead_end]
        images = [make_image(70 + i) for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda img: classify(url, img, timeout=60), images))
        assert [r.status for r in responses] == [200] * 4
        for image, r in zip(images, responses):
            assert [p["index"] for p in r.json()["predictions"]] == reference_top(session, image)[0]
