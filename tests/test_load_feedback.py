"""The load test's live feedback: per-second bins of a window, the progress lines while
it runs, the dashboard line, and the report drawn at the end.

Servers bind 127.0.0.1 on free ports only. Whole runs last about a second each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web

from benchmarks import load_report, loadtest, servers
from benchmarks.httpload import closed_loop, open_loop
from benchmarks.report import dashboard_line
from benchmarks.timeline import bins, drain, sample
from tests.test_loadtest import Ok, _serve


def test_bins_drain_and_sample_on_known_numbers() -> None:
    times = [0.1, 0.5, 0.9, 1.2, 1.7, 2.5, 3.2, 3.4]
    lat = [0.010, 0.020, 0.030, 0.040, 0.100, 0.050, 0.2, 0.3]
    errs = [None, None, "503", None, "TimeoutError", None, None, "unfinished"]
    assert bins(times, lat, errs, window_s=3.0, rows=2) == [
        {"t": 0.0, "req_per_s": 2.0, "img_per_s": 4.0, "ok": 2, "p50_ms": 15.0,
         "p99_ms": 19.9, "errors": {"503": 1}},
        {"t": 1.0, "req_per_s": 1.0, "img_per_s": 2.0, "ok": 1, "p50_ms": 40.0,
         "p99_ms": 40.0, "errors": {"TimeoutError": 1}},  # an error's latency is not counted
        {"t": 2.0, "req_per_s": 1.0, "img_per_s": 2.0, "ok": 1, "p50_ms": 50.0,
         "p99_ms": 50.0, "errors": {}}]
    assert drain(times, lat, errs, window_s=3.0) == {
        "s": 0.4, "ok": 1, "p50_ms": 200.0, "p99_ms": 200.0, "errors": {"unfinished": 1}}
    # a window that is not whole bins: the last bin's rate is over its 0.2 s; 0.5 s bins
    short = bins(times, lat, errs, window_s=2.2, bin_s=0.5)
    assert [b["t"] for b in short] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert [b["req_per_s"] for b in short] == [2.0, 2.0, 2.0, 0.0, 0.0]
    assert short[3]["errors"] == {"TimeoutError": 1} and short[3]["p50_ms"] is None
    assert bins([2.1], [0.01], [None], window_s=2.2)[2]["req_per_s"] == 5.0
    assert bins([], [], [], window_s=2.0)[1] == {
        "t": 1.0, "req_per_s": 0.0, "img_per_s": 0.0, "ok": 0, "p50_ms": None,
        "p99_ms": None, "errors": {}}
    assert drain([], [], [], 2.0) == {"s": 0.0, "ok": 0, "p50_ms": None, "p99_ms": None,
                                      "errors": {}}
    assert sample(times, lat, errs, max_points=3) == {  # every 2nd of the 5 successes
        "every": 2, "t": [0.1, 1.2, 3.2], "latency_ms": [10.0, 40.0, 200.0]}


_LINE = re.compile(r"\[ *([\d.]+)s/[\d.]+s +(warmup|run|drain)\] done +(\d+) \| "
                   r"last ([\d.]+)s: +([\d.]+) req/s +([\d.]+) img/s  "
                   r"p50 ([\d.]+ ms|n/a)  p99 ([\d.]+ ms|n/a) \| errors (\d+)(.*)")


def _progress_lines(capsys: pytest.CaptureFixture) -> list[re.Match]:
    """The progress lines on stderr so far (a 503 also gets Tornado's access log there)."""
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("[")]
    found = [_LINE.fullmatch(x) for x in lines]
    assert lines and all(found), lines
    return found  # type: ignore[return-value]


def test_progress_lines_throughput_percentiles_and_error_kinds(
        capsys: pytest.CaptureFixture) -> None:
    async def go() -> None:
        server, port = _serve()

        def send(path: str):
            return lambda conn: conn.request("POST", path, {}, b"x")

        ok = await closed_loop("127.0.0.1", port, send("/ok"), 2, 0.2, 0.4, rows=3,
                               progress_every=0.1)
        lines = _progress_lines(capsys)
        assert lines[0].group(2) == "warmup"
        run = [m for m in lines if m.group(2) == "run"]  # a line a 0.1 s in a 0.4 s window
        assert len(run) >= 2 and max(float(m.group(5)) for m in run) > 100  # req/s
        assert all(float(m.group(6)) == pytest.approx(3 * float(m.group(5)), abs=0.2)
                   for m in run)  # img/s: 3 rows a request
        assert all(m.group(7).endswith(" ms") and m.group(8).endswith(" ms") for m in run)
        # (no last line for a drain too short to measure: the count may lag by its requests)
        assert ok.done - 4 <= int(lines[-1].group(3)) <= ok.done and lines[-1].group(9) == "0"
        # the trace: the window and its drain; its successes in the window are throughput's
        tl = bins(ok.trace.t, ok.trace.latency, ok.trace.error, 0.4, 0.1)
        assert sum(b["ok"] for b in tl) == pytest.approx(ok.completed_ok, abs=1)
        assert min(ok.trace.t) >= 0 and ok.trace.dropped == 0

        bad = await open_loop("127.0.0.1", port, send("/status/503"), 200, 0.0, 0.25,
                              progress_every=0.1)
        last = _progress_lines(capsys)[-1]
        assert last.group(10) == f" (503: {bad.failed})"
        assert last.group(5) == "0.0" and last.group(7) == "n/a"
        server.stop()

    asyncio.run(go())


def test_dashboard_line_from_the_server_or_fallback() -> None:
    pages = {"overview": "http://h:1/gpu-router", "gpu-metrics": "http://h:1/g",
             "batch-queues": "http://h:1/q"}
    assert dashboard_line({"dashboard": "http://h:1", "pages": pages}) == \
        "dashboard: http://h:1/gpu-router (GPU metrics: http://h:1/g, batch queues: http://h:1/q)"
    assert dashboard_line({"dashboard": "http://h:1"}) == "dashboard: http://h:1"
    for junk in (None, [], {"pages": 5}, {"dashboard": 3}):
        assert dashboard_line(junk) == "dashboard: not reported by the server"
    assert dashboard_line(None, "http://127.0.0.1:5") == ("dashboard: not reported by the "
                                                          "server; the spawned router's Dask "
                                                          "dashboard: http://127.0.0.1:5")
    proc: Any = SimpleNamespace(args=["batch-router", "up", "--dashboard-port", "41",
                                      "--port", "7", "--dashboard-port=42"])
    assert servers.spawned_dashboard(proc) == "http://127.0.0.1:42"  # --spawn-args wins
    assert servers.spawned_dashboard(SimpleNamespace(args=["x"])) is None  # type: ignore


DASHBOARD = {"dashboard": "http://127.0.0.1:8787",
             "pages": {"overview": "http://127.0.0.1:8787/gpu-router",
                       "gpu-metrics": "http://127.0.0.1:8787/individual-gpu-metrics",
                       "batch-queues": "http://127.0.0.1:8787/individual-batch-queues"}}


class Dashboard(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write(DASHBOARD)


@contextlib.contextmanager
def _router_stand_in() -> Iterator[str]:
    """A server answering /v1/classify and /v1/dashboard on its own thread and loop, since
    loadtest.main runs loops of its own."""
    ready, box = threading.Event(), {}

    async def serve() -> None:
        app = tornado.web.Application([(r"/v1/classify", Ok), (r"/v1/dashboard", Dashboard)])
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets(sockets)
        box.update(port=sockets[0].getsockname()[1], loop=asyncio.get_running_loop(),
                   done=asyncio.Event())
        ready.set()
        await box["done"].wait()
        server.stop()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield f"http://127.0.0.1:{box['port']}"
    finally:
        box["loop"].call_soon_threadsafe(box["done"].set)
        thread.join(10)


def test_run_prints_dashboard_and_progress_then_draws_the_report(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    png, out = tmp_path / "figs" / "report.png", tmp_path / "run.json"
    with _router_stand_in() as url:
        rc = loadtest.main(["--url", url, "--duration", "1s", "--warmup", "0.2s",
                            "--concurrency", "2", "--json", str(out), "--report", str(png)])
    assert rc == 0
    printed = capsys.readouterr()
    pages = DASHBOARD["pages"]
    assert f"dashboard: {pages['overview']} (GPU metrics: {pages['gpu-metrics']}, " \
        f"batch queues: {pages['batch-queues']})\n" in printed.out
    assert f"wrote {png}\n" in printed.out
    progress = [_LINE.fullmatch(line) for line in printed.err.splitlines()]
    assert progress and all(progress), printed.err
    assert float(progress[0].group(5)) > 10  # req/s
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    r = json.loads(out.read_text())
    assert r["dashboard"] == DASHBOARD
    tl = r["router"]["timeline"]
    assert (tl["bin_s"], tl["window_s"], tl["rows_per_request"]) == (1.0, 1.0, 1)
    assert tl["bins"][0]["ok"] == pytest.approx(r["router"]["completed_ok"], abs=1)
    assert tl["bins"][0]["p50_ms"] > 0 and tl["drain"]["s"] < 0.5
    assert len(tl["sample"]["t"]) == tl["requests"] // tl["sample"]["every"] + \
        (tl["requests"] % tl["sample"]["every"] > 0)


def test_report_without_matplotlib_keeps_the_json(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    args = loadtest.parse_args(["--json", str(tmp_path / "run.json"), "--report"])
    assert args.report == Path("loadtest-report.png")  # bare --report: the current folder
    args.report = tmp_path / "report.png"
    tl = {"bin_s": 1.0, "window_s": 1.0, "rows_per_request": 1, "requests": 1, "dropped": 0,
          "bins": bins([0.5], [0.01], [None], 1.0), "drain": drain([], [], [], 1.0),
          "sample": sample([0.5], [0.01], [None])}
    assert loadtest.finish(args, {"router": {"ok": 1, "timeline": tl}}) == 1
    assert json.loads((tmp_path / "run.json").read_text())["router"]["timeline"] == tl
    assert not args.report.exists()
    assert "report not written to" in capsys.readouterr().err
    assert load_report.segments({"router": {"ok": 0}}) == []
