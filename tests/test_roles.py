"""The split roles on loopback: `batch-router scheduler`, `worker` and `serve` as
separate processes, configured the Dask way (environment variables)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time

import psutil
import pytest

from tests.cluster import ROOT, free_port
from tests.conftest import ARTIFACTS, make_image
from tests.http import classify, request

pytestmark = pytest.mark.integration


def launch(*args: str, env: dict | None = None, log: str) -> subprocess.Popen:
    ARTIFACTS.mkdir(exist_ok=True)
    out = open(ARTIFACTS / log, "w")
    return subprocess.Popen(
        [sys.executable, "-m", "router_api.cli", *args], cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT
    )


def wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if request(url, "GET", "/v2/health/ready", timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(url)


def dask_scheduler(sport: int, dport: int, log: str) -> subprocess.Popen:
    """The plain `dask scheduler` CLI with batch-router's scheduler preload."""
    ARTIFACTS.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(sport),
           "--dashboard-address", f"127.0.0.1:{dport}", "--preload", "scheduler_plugins.preload"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(ARTIFACTS / log, "w"), stderr=subprocess.STDOUT)


def served_as_the_dashboard_sees_it(scheduler: str, timeout: float = 10.0) -> int:
    """Requests served, from the history the scheduler's dashboard pages draw."""
    from distributed import Client

    def served(dask_scheduler) -> int:
        import time

        return dask_scheduler.extensions["batch-router"].history.summary(time.time())["served"]

    with Client(scheduler, timeout=30) as client:
        deadline = time.monotonic() + timeout
        while (n := client.run_on_scheduler(served)) == 0 and time.monotonic() < deadline:
            time.sleep(0.25)
        return n


@pytest.mark.parametrize("scheduler_cli", ["batch-router", "dask-preload"])
def test_scheduler_worker_and_front_end_as_separate_processes(model_path, scheduler_cli):
    sport, dport, hport = free_port(), free_port(), free_port()
    if scheduler_cli == "batch-router":
        scheduler = launch("scheduler", "--port", str(sport), "--dashboard-port", str(dport), log="roles-scheduler.log")
    else:
        scheduler = dask_scheduler(sport, dport, log="roles-dask-scheduler.log")
    procs = [scheduler]
    try:
        procs.append(launch("worker", f"tcp://127.0.0.1:{sport}", "--name", "solo", "--threads", "1", log="roles-worker.log"))
        env = {"DASK_BATCH_ROUTER__MAX_BATCH_SIZE": "8"}  # Dask-style override, no flag
        procs.append(launch("serve", "--scheduler", f"tcp://127.0.0.1:{sport}", "--port", str(hport), env=env, log="roles-serve.log"))
        url = f"http://127.0.0.1:{hport}"
        wait_ready(url)
        assert request(url, "GET", "/v2/models/resnet50/config").json()["max_batch_size"] == 8
        r = classify(url, make_image(5))
        assert r.status == 200 and r.json()["worker"] == "solo"
        # The worker joined after the scheduler and runs exactly the scheduler's model.
        sha = request(url, "GET", "/v2/models/resnet50").json()["parameters"]["sha256"]
        assert [w["sha256"] for w in request(url, "GET", "/v1/workers").json()["workers"]] == [sha]
        # Nothing any of the three processes opened listens beyond loopback.
        for p in procs:
            for conn in psutil.Process(p.pid).net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    assert ipaddress.ip_address(conn.laddr.ip).is_loopback, (p.args, conn.laddr)
        dashboard = f"http://127.0.0.1:{dport}"
        assert request(dashboard, "GET", "/status").status == 200  # Dask dashboard
        # batch-router's pages are there too, whichever way the scheduler started...
        pages = request(url, "GET", "/v1/dashboard").json()["pages"]
        assert pages["overview"] == f"{dashboard}/gpu-router"
        for page in pages.values():
            assert request(dashboard, "GET", page.removeprefix(dashboard)).status == 200
        # ...and the front end's statistics reach them from its own process.
        assert served_as_the_dashboard_sees_it(f"tcp://127.0.0.1:{sport}") >= 1
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(30)


@pytest.mark.parametrize(
    "role",
    [
        ["scheduler", "--host", "0.0.0.0"],
        ["up", "--host", "0.0.0.0", "--workers", "0"],
        ["worker", "tcp://0.0.0.0:8786"],
    ],
)
def test_refuses_to_listen_beyond_loopback_without_tls(role):
    r = subprocess.run([sys.executable, "-m", "router_api.cli", *role], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "refusing a non-loopback address '0.0.0.0'" in r.stderr


@pytest.mark.integration
def test_a_worker_that_cannot_join_says_so_and_stops(tmp_path):
    """Nothing listens: it gives up after its join timeout with a clear message (not
    ten tries a second for ever), and it obeys SIGTERM meanwhile. A tls:// address
    without a token is refused at once, by name."""
    import signal

    dead = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "BATCH_ROUTER_JOIN_TIMEOUT": "3"}
    p = subprocess.run([sys.executable, "-m", "router_api.cli", "worker", dead], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert p.returncode != 0 and f"could not join {dead}: no answer in 3 s" in p.stderr
    p = subprocess.run([sys.executable, "-m", "router_api.cli", "worker", "tls://127.0.0.1:1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert p.returncode != 0 and "join token" in p.stderr and "Traceback" not in p.stderr
    waiting = subprocess.Popen([sys.executable, "-m", "router_api.cli", "worker", dead], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    waiting.send_signal(signal.SIGTERM)
    assert waiting.wait(15) is not None


@pytest.mark.integration
def test_the_front_end_survives_losing_its_scheduler(model_path):
    """Split roles, the scheduler SIGKILLed under load: every request is answered (a
    result or 503 with Retry-After; never a hang, never a 500), ready says 503 within
    2 s; a scheduler started again on the same port is found within 10 s, the dead
    worker is forgotten and the new one serves, with no restart of `serve`."""
    import signal
    import threading

    sport, dport, hport = free_port(), free_port(), free_port()
    address, url = f"tcp://127.0.0.1:{sport}", f"http://127.0.0.1:{hport}"
    procs = [launch("scheduler", "--port", str(sport), "--dashboard-port", str(dport), log="loss-scheduler-1.log")]
    try:
        procs.append(launch("worker", address, "--name", "before", "--threads", "1", log="loss-worker-1.log"))
        procs.append(launch("serve", "--scheduler", address, "--port", str(hport), log="loss-serve.log"))
        wait_ready(url)
        statuses: list[tuple[int, str]] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                try:
                    r = classify(url, make_image(6), timeout=15)
                    statuses.append((r.status, r.headers.get("retry-after", "")))
                except OSError as e:  # a hang or a dropped connection
                    statuses.append((0, repr(e)))

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(2)
        procs[0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        while request(url, "GET", "/v2/health/ready", timeout=2).status != 503:
            assert time.monotonic() - killed < 2.0, "ready still says yes 2 s after the scheduler died"
            time.sleep(0.05)
        time.sleep(3)
        lost = request(url, "POST", "/v1/classify", make_image(7), {"Content-Type": "image/jpeg"}, timeout=5)
        assert lost.status == 503 and lost.headers.get("retry-after") and "scheduler" in lost.json()["error"]
        stop.set()
        for t in threads:
            t.join(30)
        assert statuses and {s for s, _ in statuses} <= {200, 503}, sorted(set(statuses))
        assert all(ra for s, ra in statuses if s == 503)

        procs[0] = launch("scheduler", "--port", str(sport), "--dashboard-port", str(dport), log="loss-scheduler-2.log")
        back = time.monotonic()
        while (me := request(url, "GET", "/v1/workers", timeout=2).json())["frontend"]["scheduler"] != "connected":
            assert time.monotonic() - back < 10.0, "not reconnected 10 s after the scheduler was started again"
            time.sleep(0.1)
        assert me["workers"] == []  # the dead one forgotten
        procs.append(launch("worker", address, "--name", "after", "--threads", "1", log="loss-worker-2.log"))
        wait_ready(url)
        r = classify(url, make_image(8))
        assert r.status == 200 and r.json()["worker"] == "after"
        assert [w["name"] for w in request(url, "GET", "/v1/workers").json()["workers"]] == ["after"]
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(30)
