"""The load generator: HTTP client, statistics, schedulers, and whole loadtest runs.

Servers bind 127.0.0.1 on free ports only. Whole runs last about a second each.
"""

from __future__ import annotations

import asyncio
import json
import statistics
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web

from benchmarks import loadtest, payloads, servers, windows
from benchmarks.http_client import Connection, Pool
from benchmarks.httpload import (closed_loop, open_loop, percentile,
                                 poisson_arrivals, summarize)
from benchmarks.rounds import round_figures, summarize_rounds


class _CountingServer(tornado.httpserver.HTTPServer):
    """Counts accepted TCP connections, to prove keep-alive reuse."""

    accepted = 0

    def handle_stream(self, stream: Any, address: Any) -> None:
        type(self).accepted += 1
        super().handle_stream(stream, address)


class _Stats:
    inference = 0
    execution = 0


class Ok(tornado.web.RequestHandler):
    def post(self) -> None:
        _Stats.inference += 1  # every second request closes a "batch of 2"
        _Stats.execution += _Stats.inference % 2
        self.write({"len": len(self.request.body)})

    def get(self) -> None:
        self.write(b"hello")


class Chunked(tornado.web.RequestHandler):
    async def get(self) -> None:
        for part in (b"abc", b"defgh", b"i" * 5000):
            self.write(part)
            await self.flush()  # no Content-Length: Tornado sends chunks


class Close(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Connection", "close")
        self.write(b"bye")


class Status(tornado.web.RequestHandler):
    def post(self, code: str) -> None:
        self.set_status(int(code))


class Slow(tornado.web.RequestHandler):
    async def post(self) -> None:
        await asyncio.sleep(5)


class StatsH(tornado.web.RequestHandler):
    def get(self, model: str) -> None:
        self.write({"model_stats": [{"name": model, "inference_count": _Stats.inference,
                                     "execution_count": _Stats.execution}]})


def _serve(**kw: Any) -> tuple[_CountingServer, int]:
    """Start the test server on the running loop; returns it and its port."""
    app = tornado.web.Application([
        (r"/ok", Ok), (r"/chunked", Chunked), (r"/close", Close), (r"/status/(\d+)", Status),
        (r"/slow", Slow), (r"/v2/models/([^/]+)/stats", StatsH)])
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = _CountingServer(app, **kw)
    server.add_sockets(sockets)
    _CountingServer.accepted = 0
    return server, sockets[0].getsockname()[1]


def test_keepalive_reuses_one_connection() -> None:
    async def go() -> None:
        server, port = _serve()
        conn = Connection("127.0.0.1", port)
        for i in range(20):
            status, headers, body = await conn.request("POST", "/ok", {}, b"x" * i)
            assert status == 200 and json.loads(body) == {"len": i}
        assert headers["content-type"].startswith("application/json")
        assert conn.connects == 1 and _CountingServer.accepted == 1
        conn.close()
        server.stop()

    asyncio.run(go())


def test_chunked_response_and_connection_close() -> None:
    async def go() -> None:
        server, port = _serve()
        conn = Connection("127.0.0.1", port)
        status, headers, body = await conn.request("GET", "/chunked")
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        assert body == b"abcdefgh" + b"i" * 5000
        assert (await conn.request("GET", "/close"))[2] == b"bye"
        assert (await conn.request("GET", "/ok"))[2] == b"hello"  # on a new socket
        assert conn.connects == 2 and _CountingServer.accepted == 2
        conn.close()
        server.stop()

    asyncio.run(go())


def test_reconnects_after_server_closes_idle_connection() -> None:
    async def go() -> None:
        server, port = _serve(idle_connection_timeout=0.1)
        conn = Connection("127.0.0.1", port)
        assert (await conn.request("GET", "/ok"))[0] == 200
        await asyncio.sleep(0.4)  # the server has closed our idle socket by now
        assert (await conn.request("POST", "/ok", {}, b"abc"))[0] == 200
        assert conn.connects == 2 and _CountingServer.accepted == 2
        conn.close()
        server.stop()

    asyncio.run(go())


def test_percentile_and_summary_on_known_numbers() -> None:
    xs = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    for q in (0, 50, 95, 99, 100):
        assert percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    s = summarize(xs[::-1], {"503": 2, "ConnectionResetError": 1}, completed_ok=50,
                  duration_s=2.0, rows_per_request=4)
    assert s["latency_ms"] == {"p50": 50.5, "p95": 95.05, "p99": 99.01, "max": 100.0,
                               "mean": 50.5}
    assert s["req_per_s"] == 25.0 and s["img_per_s"] == 100.0
    assert s["ok"] == 100 and s["error_count"] == 3
    assert summarize([], {}, 0, 1.0)["latency_ms"]["p50"] is None


def test_poisson_arrivals_mean_gap_and_seed() -> None:
    gen = poisson_arrivals(200.0, seed=1)
    times = [next(gen) for _ in range(20000)]
    gaps = np.diff([0.0] + times)
    assert gaps.min() > 0
    assert gaps.mean() == pytest.approx(1 / 200, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(1 / 200, rel=0.05)  # exponential: sd=mean
    again = poisson_arrivals(200.0, seed=1)
    assert [next(again) for _ in range(5)] == times[:5]


def test_parse_duration() -> None:
    assert [loadtest.parse_duration(t) for t in ("30s", "2m", "500ms", "1.5")] == \
        [30, 120, 0.5, 1.5]
    with pytest.raises(Exception):
        loadtest.parse_duration("soon")


def test_pool_caps_connections_and_serves_waiters_in_order() -> None:
    async def go() -> None:
        pool = Pool("127.0.0.1", 1, cap=2)
        a, b = await pool.acquire(), await pool.acquire()
        waiter = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0.01)
        assert not waiter.done() and pool.opened == 2
        pool.release(a)
        assert await waiter is a

    asyncio.run(go())


def test_error_kinds_unfinished_and_mean_batch() -> None:
    async def go() -> None:
        server, port = _serve()
        url = f"http://127.0.0.1:{port}"

        def send(path: str):
            return lambda conn: conn.request("POST", path, {}, b"x")

        rec = await closed_loop("127.0.0.1", port, send("/status/503"), 2, 0.0, 0.3,
                                progress=False)
        assert set(rec.errors) == {"503"} and not rec.latencies
        rec = await closed_loop("127.0.0.1", port, send("/slow"), 3, 0.0, 0.2,
                                drain_cap=0.2, progress=False)
        assert dict(rec.errors) == {"unfinished": 3}
        rec = await open_loop("127.0.0.1", port, send("/slow"), 50, 0.0, 0.2,
                              timeout=0.1, progress=False)
        assert set(rec.errors) == {"TimeoutError"}
        rec = await open_loop("127.0.0.1", port, send("/slow"), 100, 0.0, 0.3,
                              max_connections=2, drain_cap=0.2, progress=False)
        assert rec.errors["unfinished"] > 10 and set(rec.errors) == {"unfinished"}
        refused = await closed_loop("127.0.0.1", servers.free_port(), send("/ok"), 1, 0.0,
                                    0.1, progress=False)
        assert set(refused.errors) == {"ConnectionRefusedError"}
        args = loadtest.parse_args(["--url", url, "--duration", "0.5s", "--warmup", "0.1s",
                                    "--concurrency", "4", "--quiet"])
        out = await windows.run_load(url, args, "/ok", {}, b"img", 1)
        assert out["errors"] == {} and out["ok"] > 10
        assert out["mean_batch"] == pytest.approx(2.0, abs=0.2)
        server.stop()

    asyncio.run(go())


def test_payloads_are_deterministic() -> None:
    jpeg = payloads.make_jpeg()
    assert jpeg[:2] == b"\xff\xd8" and 12_000 < len(jpeg) < 30_000
    assert jpeg == payloads.make_jpeg()
    meta = {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [-1, 8, 8, 3]}],
            "outputs": [{"name": "y"}]}
    headers, body = payloads.infer_request(meta, rows=2)
    n = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:n])
    assert head["inputs"][0]["shape"] == [2, 8, 8, 3]
    assert head["inputs"][0]["parameters"]["binary_data_size"] == len(body) - n == 384
    assert head["outputs"] == [{"name": "y", "parameters": {"binary_data": True}}]


@pytest.fixture(scope="module")
def bare_url():
    proc, url, _ = servers.spawn_bare(None)
    yield url
    servers.stop(proc)


@pytest.fixture(scope="module")
def trivial_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scheduler_plugins.builtin_models import build_trivial

    return build_trivial(tmp_path_factory.mktemp("models") / "trivial.onnx")


def test_end_to_end_classify_open_loop(bare_url: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "deep" / "run.json"
    rc = loadtest.main(["--url", bare_url, "--duration", "1s", "--warmup", "0.2s",
                        "--rate", "200", "--quiet", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    assert "dashboard: not reported by the server\n" in printed.out  # bare: no /v1/dashboard
    assert printed.err == ""  # --quiet: no progress lines
    r = json.loads(out.read_text())
    assert r["payload"]["path"] == "/v1/classify" and r["config"]["rate"] == 200
    assert r["router"]["errors"] == {} and r["router"]["mean_batch"] is None
    assert 120 < r["router"]["req_per_s"] < 280
    assert r["router"]["latency_ms"]["p50"] > 0 and r["machine"]["cpu_count"]
    assert r["dashboard"] is None and len(r["router"]["timeline"]["bins"]) == 1


def test_end_to_end_infer_with_both_baselines(bare_url: str, trivial_model: Path,
                                              tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    rc = loadtest.main(["--url", bare_url, "--mode", "infer", "--duration", "1s",
                        "--warmup", "0.2s", "--concurrency", "4", "--batch-rows", "2",
                        "--baseline", "--baseline-bare", "--baseline-duration", "0.2s",
                        "--model-path", str(trivial_model), "--quiet", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    router, bare, raw = r["router"], r["baseline_bare"], r["baseline_raw"]
    assert r["payload"]["rows"] == 2 and r["payload"]["bytes"] > 2 * 602112
    assert router["ok"] > 10 and router["img_per_s"] == pytest.approx(2 * router["req_per_s"])
    assert bare["ok"] > 10 and bare["errors"] == {}
    assert [t["batch"] for t in raw["throughput"]] == [1, 8, 32]
    assert raw["latency_b1_ms"]["p50"] > 0
    ratios = r["ratios"]
    assert ratios["router_over_bare_req"] > 0 and ratios["throughput_router_over_raw"] > 0
    assert isinstance(ratios["latency_p50_delta_ms"], float)


def test_rounds_summary_is_median_of_per_round_ratios() -> None:
    def router(img: float, p50: Optional[float]) -> dict:
        return {"img_per_s": img, "req_per_s": img, "latency_ms": {"p50": p50}}

    def raw(best: float, p50: float) -> dict:
        return {"best_rows_per_s": best, "best_batch": 1, "latency_b1_ms": {"p50": p50}}

    # Machine speed drifts between rounds; the per-round ratio does not, the pooled one would.
    rounds = [round_figures(router(30.0, 35.0), raw(31.0 * 1.0, 32.0)),
              round_figures(router(20.0, 52.0), raw(25.0, 48.0)),
              round_figures(router(27.0, 40.0), raw(30.0, 37.5)),
              round_figures(router(10.0, None), raw(20.0, 30.0))]
    assert [r["throughput_router_over_raw"] for r in rounds] == \
        [pytest.approx(30 / 31, abs=1e-4), 0.8, 0.9, 0.5]
    assert [r["latency_p50_delta_ms"] for r in rounds] == [3.0, 4.0, 2.5, None]
    s = summarize_rounds(rounds)
    assert s["throughput_router_over_raw"]["median"] == pytest.approx((0.8 + 0.9) / 2)
    assert (s["throughput_router_over_raw"]["min"], s["throughput_router_over_raw"]["max"]) \
        == (0.5, pytest.approx(30 / 31, abs=1e-4))
    assert s["latency_p50_delta_ms"] == {"median": 3.0, "min": 2.5, "max": 4.0, "n": 3}
    assert s["raw_p50_ms"]["median"] == pytest.approx((32 + 37.5) / 2)
    assert "router_over_bare_req" not in s

    bare = {"req_per_s": 40.0, "latency_ms": {"p50": 1.5}}
    f = round_figures(router(20.0, 2.0), bare=bare)
    assert f["router_over_bare_req"] == 0.5 and f["latency_p50_delta_vs_bare_ms"] == 0.5
    assert "throughput_router_over_raw" not in f


def test_raw_ort_serve_loads_once_and_measures_per_request(trivial_model: Path) -> None:
    import io

    from benchmarks import raw_ort

    stdin = io.StringIO('{"duration": 0.05, "batch_sizes": [1]}\n\n{"batch_sizes": "x"}\n')
    stdout = io.StringIO()
    raw_ort.serve(str(trivial_model), "infer", 1, 0.05, [1, 4], stdin=stdin, stdout=stdout)
    ready, one, default, bad = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert ready["ready"] and ready["input_shape"][1:] == [3, 224, 224]
    assert [t["batch"] for t in one["throughput"]] == [1] and one["latency_batch"] == 1
    assert one["best_rows_per_s"] > 0 and one["latency_b1_ms"]["p50"] > 0
    assert [t["batch"] for t in default["throughput"]] == [1, 4]
    assert "error" in bad


def test_rounds_alternate_router_and_baselines(bare_url: str, trivial_model: Path,
                                               tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rounds.json"
    rc = loadtest.main(["--url", bare_url, "--mode", "infer", "--duration", "0.5s",
                        "--warmup", "0.1s", "--concurrency", "2", "--rounds", "2",
                        "--baseline", "--baseline-bare", "--baseline-batch-sizes", "1,4",
                        "--baseline-threads", "1", "--model-path", str(trivial_model),
                        "--quiet", "--json", str(out), "--report", str(tmp_path / "r.svg")])
    assert rc == 0
    assert (tmp_path / "r.svg").read_bytes().count(b"round 2") == 1  # windows side by side
    printed = capsys.readouterr().out
    assert "--serve" in printed and "gets no traffic (idles)" in printed
    assert "round 1/2:" in printed and "round 2/2:" in printed and "pooled over 2" in printed
    assert "quote these medians" in printed
    r = json.loads(out.read_text())
    assert [x["round"] for x in r["rounds"]] == [1, 2]
    for x in r["rounds"]:
        assert x["router"]["ok"] > 5 and x["bare"]["ok"] > 5 and x["bare"]["errors"] == {}
        assert [t["batch"] for t in x["raw"]["throughput"]] == [1, 4]
        assert x["raw"]["duration_per_batch_s"] == 0.5
        assert x["throughput_router_over_raw"] > 0 and x["router_over_bare_req"] > 0
        assert isinstance(x["latency_p50_delta_ms"], float)
        assert set(x["other_cpu_cores"]) == {"router", "bare", "raw"}
        assert 0 <= x["router_idle_cpu_cores"]["raw"] < 0.5  # nothing sent to it meanwhile
        assert x["router"]["timeline"]["window_s"] == 0.5
    # the pooled router figures hold every sample of both windows
    assert r["router"]["ok"] == sum(x["router"]["ok"] for x in r["rounds"])
    assert r["router"]["duration_s"] == 1.0
    s = r["rounds_summary"]
    for key in ("throughput_router_over_raw", "latency_p50_delta_ms", "router_over_bare_req"):
        vals = [x[key] for x in r["rounds"]]
        assert s[key]["median"] == pytest.approx(statistics.median(vals), abs=1e-3)
        assert r["ratios"][key] == s[key]["median"]
        assert (s[key]["min"], s[key]["max"]) == (min(vals), max(vals))
    assert r["raw_session"]["ready"] and r["config"]["rounds"] == 2
