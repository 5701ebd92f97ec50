"""Mutual TLS for a scheduler on the internet: the cluster CA, the join token, and real
processes that connect with it, or are refused without it."""

from __future__ import annotations

import asyncio
import os
import re
import stat
import subprocess
import sys
import time

import pytest
from distributed import Client

from router_api.tls import ClusterCA, TokenError, make_token, read_token, security_for
from tests.cluster import ROOT, free_port
from tests.conftest import ARTIFACTS, make_image
from tests.http import classify
from tests.test_roles import wait_ready


def test_token_carries_the_address_and_a_workers_credentials_only(tmp_path):
    ca = ClusterCA.ensure(tmp_path / "tls", hosts=["bore.pub"])
    token = make_token("tls://bore.pub:41234", ca.credentials("worker"))
    assert token.startswith("brt1.") and "\n" not in token
    address, creds = read_token(token)
    assert address == "tls://bore.pub:41234"
    assert creds == ca.credentials("worker")
    for secret in ("ca.key", "scheduler.key", "client.key"):
        assert (tmp_path / "tls" / secret).read_text() not in (creds.key, creds.cert, creds.ca)


def test_private_keys_are_readable_by_their_owner_only(tmp_path):
    ClusterCA.ensure(tmp_path / "tls")
    for name in ("ca.key", "scheduler.key", "worker.key", "client.key"):
        assert stat.S_IMODE(os.stat(tmp_path / "tls" / name).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "tls").st_mode) == 0o700


def test_rotation_makes_a_new_ca_and_keeps_it_otherwise(tmp_path):
    first = ClusterCA.ensure(tmp_path / "tls").credentials("worker")
    assert ClusterCA.ensure(tmp_path / "tls").credentials("worker") == first
    assert ClusterCA.ensure(tmp_path / "tls", rotate=True).credentials("worker").ca != first.ca


@pytest.mark.parametrize("bad", ["", "hello", "brt1.", "brt1.!!!!", "brt1.eJzLSM3JyQcABiwCFQ"])
def test_damaged_tokens_say_so(bad):
    with pytest.raises(TokenError, match="token"):
        read_token(bad)


def test_tokens_need_a_tls_address(tmp_path):
    with pytest.raises(ValueError, match="tls://"):
        make_token("tcp://bore.pub:1", ClusterCA.ensure(tmp_path / "tls").credentials("worker"))


# -- real processes ---------------------------------------------------------------------


def launch(*args: str, log: str, env: dict) -> subprocess.Popen:
    ARTIFACTS.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "router_api.cli", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=open(ARTIFACTS / log, "w"),
        stderr=subprocess.STDOUT,
    )


def join_token(log: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"^JOIN_TOKEN=(\S+)$", (ARTIFACTS / log).read_text(), re.M)
        if m:
            return m.group(1)
        time.sleep(0.2)
    raise TimeoutError("no JOIN_TOKEN= line")


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        p.terminate()
    for p in procs:
        p.wait(30)


def refused(address: str, security=None) -> bool:
    async def attempt() -> bool:
        try:
            async with Client(address, asynchronous=True, timeout=3, security=security):
                return False
        except Exception:
            return True

    return asyncio.run(attempt())


def asks_for_the_model(address: str, security) -> str:
    """What a worker asks first: "answered", or "refused" (the TLS handshake failed)."""

    async def attempt() -> str:
        from distributed.core import rpc

        try:
            async with rpc(address, timeout=5, connection_args=security.get_connection_args("worker")) as s:
                await s.batch_router_model()
                return "answered"
        except Exception:
            return "refused"

    return asyncio.run(attempt())


@pytest.mark.integration
def test_worker_joins_with_the_token_and_nothing_else_gets_in(model_path, tmp_path):
    sport, dport, hport = free_port(), free_port(), free_port()
    env = {"DASK_BATCH_ROUTER__TLS__DIR": str(tmp_path / "tls")}
    procs = [
        launch("scheduler", "--port", str(sport), "--dashboard-port", str(dport),
               "--public-address", f"127.0.0.1:{sport}", log="tls-scheduler.log", env=env)  # fmt: skip
    ]
    try:
        token = join_token("tls-scheduler.log")
        # The worker gets nothing but the token: no address, no files.
        procs.append(launch("worker", "--join", token, "--name", "remote", "--threads", "1", log="tls-worker.log",
                            env={"DASK_BATCH_ROUTER__TLS__DIR": str(tmp_path / "elsewhere")}))  # fmt: skip
        procs.append(launch("serve", "--scheduler", f"tls://127.0.0.1:{sport}", "--port", str(hport), log="tls-serve.log", env=env))
        url = f"http://127.0.0.1:{hport}"
        wait_ready(url)
        r = classify(url, make_image(3))
        assert r.status == 200 and r.json()["worker"] == "remote"

        assert refused(f"tcp://127.0.0.1:{sport}")  # plaintext: refused
        other = ClusterCA.ensure(tmp_path / "other-ca")  # a certificate from another CA: refused
        assert refused(f"tls://127.0.0.1:{sport}", other.security("client"))

        # The token's own credentials: they joined a worker, and can do nothing else.
        _, creds = read_token(token)
        as_client = security_for("client", creds)
        assert refused(f"tls://127.0.0.1:{sport}", as_client)  # no client: no tasks, no run_on_scheduler

        async def run_on_scheduler() -> str:
            from distributed.core import rpc

            async with rpc(f"tls://127.0.0.1:{sport}", connection_args=as_client.get_connection_args("client")) as s:
                try:
                    await s.run_function(function=dumps(os.getcwd))
                except Exception as e:
                    return str(e)
            return "ran"

        from distributed.protocol.pickle import dumps

        said = asyncio.run(run_on_scheduler())
        assert "worker certificate" in said, said
        assert "ran" != said
        r = classify(url, make_image(4))  # the worker it joined still serves
        assert r.status == 200
    finally:
        stop_all(procs)


@pytest.mark.integration
def test_rotating_the_ca_revokes_old_tokens(model_path, tmp_path):
    sport, dport = free_port(), free_port()
    env = {"DASK_BATCH_ROUTER__TLS__DIR": str(tmp_path / "tls")}
    args = ["scheduler", "--port", str(sport), "--dashboard-port", str(dport), "--public-address", f"127.0.0.1:{sport}"]
    first = launch(*args, log="tls-rotate-1.log", env=env)
    try:
        old = join_token("tls-rotate-1.log")
    finally:
        first.terminate()
        first.wait(30)
    second = launch(*args, "--rotate-ca", log="tls-rotate-2.log", env=env)
    try:
        new = join_token("tls-rotate-2.log")
        assert new != old
        _, old_creds = read_token(old)
        _, new_creds = read_token(new)
        from router_api.tls import security_for

        assert asks_for_the_model(f"tls://127.0.0.1:{sport}", security_for("worker", old_creds)) == "refused"
        assert asks_for_the_model(f"tls://127.0.0.1:{sport}", security_for("worker", new_creds)) == "answered"
    finally:
        second.terminate()
        second.wait(30)


@pytest.mark.integration
def test_public_address_through_a_bore_tunnel_that_adds_latency(model_path, tmp_path):
    """`--public-address bore` starts bore (a stand-in relay here, 40 ms each way),
    prints a token for the tunnel's address, and a worker joins through it."""
    sport, dport, hport = free_port(), free_port(), free_port()
    env = {
        "DASK_BATCH_ROUTER__TLS__DIR": str(tmp_path / "tls"),
        "PATH": f"{ROOT / 'tests' / 'fakebin'}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "RELAY_DELAY_MS": "40",
    }
    procs = [launch("scheduler", "--port", str(sport), "--dashboard-port", str(dport), "--public-address", "bore",
                    log="tls-bore-scheduler.log", env=env)]  # fmt: skip
    try:
        token = join_token("tls-bore-scheduler.log")
        address, _ = read_token(token)
        assert address.startswith("tls://127.0.0.1:") and not address.endswith(f":{sport}")  # the tunnel's port
        procs.append(launch("worker", "--join", token, "--name", "far", "--threads", "1", log="tls-bore-worker.log", env={}))
        procs.append(launch("serve", "--scheduler", f"tls://127.0.0.1:{sport}", "--port", str(hport), log="tls-bore-serve.log", env=env))
        url = f"http://127.0.0.1:{hport}"
        wait_ready(url, timeout=180)
        r = classify(url, make_image(4))
        assert r.status == 200 and r.json()["worker"] == "far"
    finally:
        stop_all(procs)


@pytest.mark.integration
def test_up_goes_public_in_one_command(model_path, tmp_path):
    """`batch-router up --public-address`: local workers and the front end as usual,
    the scheduler port mutual-TLS only, and a token a remote worker joins with."""
    from tests.cluster import Cluster

    rport = free_port()
    c = Cluster(workers=1, args=["--threads", "1", "--public-address", f"127.0.0.1:{rport}"],
                env={"DASK_BATCH_ROUTER__TLS__DIR": str(tmp_path / "tls")}, log=ARTIFACTS / "tls-up.log")  # fmt: skip
    relay = None
    remote = None
    try:
        c.start()
        token = join_token("tls-up.log")
        relay = subprocess.Popen([sys.executable, "-m", "benchmarks.relay", "--to", f"127.0.0.1:{c.scheduler_port}",
                                  "--listen", str(rport)], cwd=ROOT, stdout=subprocess.DEVNULL)  # fmt: skip
        remote = launch("worker", "--join", token, "--name", "remote", "--threads", "1", log="tls-up-remote.log", env={})
        deadline = time.monotonic() + 120
        while len(c.get("/v1/workers")["workers"]) < 2:
            assert time.monotonic() < deadline, "the remote worker did not join"
            time.sleep(0.25)
        assert {w["name"] for w in c.get("/v1/workers")["workers"]} == {"local-0", "remote"}
        assert classify(c.url, make_image(5)).status == 200
        assert refused(f"tcp://127.0.0.1:{c.scheduler_port}")
    finally:
        for p in (remote, relay):
            if p is not None:
                p.terminate()
                p.wait(30)
        c.stop()
