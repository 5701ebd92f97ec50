"""The placement benchmark: its figures and targets on synthetic data, and one short run.

The pure pieces (goodput, per-worker shares, the batch-latency bound, lost requests, the
kill run's throughput bins and recovery time, medians over rounds, the targets) are driven
directly; the smoke run starts three real routers with the trivial model (about 45 s).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import placement as pl
from benchmarks import placement_figures as fig
from benchmarks import placement_routers as routers


def snap(*workers: tuple[str, int, int], curve: dict | None = None) -> dict:
    return {"policy": "x", "workers": [
        {"address": f"tcp://{name}", "name": name, "rows": rows, "batches": batches,
         "service_s": curve or {}, "weight": 0.5} for name, rows, batches in workers]}


def test_goodput_counts_answers_within_the_deadline_per_window_second() -> None:
    lat = [0.1, 0.5, 1.99, 2.0, 2.01, 7.0]
    assert fig.goodput(lat, 2.0, 2.0) == 2.0  # 4 in time over 2 s
    assert fig.goodput([], 2.0, 10.0) == 0.0 and fig.goodput(lat, 2.0, 0.0) == 0.0


def test_send_deadline_puts_the_goodput_deadline_in_each_request_as_its_timeout() -> None:
    path, headers, body = routers.with_timeout("/v1/classify", {"Content-Type": "image/jpeg"}, b"jpeg", 2.0)
    assert (path, body) == ("/v1/classify?timeout=2000000", b"jpeg")
    head = json.dumps({"inputs": [{"name": "x", "parameters": {"binary_data_size": 4}}]}).encode()
    kserve = {"Inference-Header-Content-Length": str(len(head))}
    path, headers, body = routers.with_timeout("/v2/models/m/infer", kserve, head + b"DATA", 0.5)
    n = int(headers["Inference-Header-Content-Length"])
    assert json.loads(body[:n])["parameters"] == {"timeout": 500000} and body[n:] == b"DATA"


def test_worker_deltas_shares_sum_to_one_and_handle_joins_and_deaths() -> None:
    before = snap(("local-0", 100, 50), ("local-1", 10, 10), ("local-2", 5, 5))
    after = snap(("local-0", 400, 150), ("local-1", 110, 60), ("local-3", 50, 25),
                 curve={"1": 0.01})
    d = fig.worker_deltas(before, after)
    assert set(d) == {"local-0", "local-1", "local-3"}  # local-2 died: its rows unknown
    assert [d[n]["rows"] for n in sorted(d)] == [300, 100, 50]
    assert d["local-0"]["share"] == pytest.approx(300 / 450, abs=1e-4)
    assert sum(w["share"] for w in d.values()) == pytest.approx(1.0, abs=1e-3)
    assert d["local-0"]["mean_batch"] == 3.0 and d["local-1"]["mean_batch"] == 2.0
    assert d["local-3"]["service_s"] == {"1": 0.01}
    idle = fig.worker_deltas(before, before)
    assert idle["local-0"]["share"] is None and idle["local-0"]["mean_batch"] is None
    assert fig.worker_deltas(None, None) == {}


def test_curve_estimate_interpolates_like_the_service_curve() -> None:
    c = {"1": 0.010, "4": 0.025, "8": 0.040}
    assert fig.curve_estimate({}, 3) is None
    assert fig.curve_estimate(c, 0.5) == 0.010 and fig.curve_estimate(c, 1) == 0.010
    assert fig.curve_estimate(c, 2.5) == pytest.approx(0.0175)
    assert fig.curve_estimate(c, 6) == pytest.approx(0.0325)
    assert fig.curve_estimate(c, 16) == pytest.approx(0.080)  # above: per-row time of 8


def test_latency_bound_uses_the_mean_batch_it_ran_and_says_how() -> None:
    delta = {"rows": 250, "batches": 100, "service_s": {"2": 0.020, "4": 0.030}}
    b = fig.latency_bound("local-0", delta, max_queue_delay_s=0.005)
    assert b["mean_batch"] == 2.5 and b["batch_latency_ms"] == pytest.approx(22.5)
    assert b["bound_ms"] == pytest.approx(1.5 * (22.5 + 5))
    assert "local-0 ran 250 rows in 100 batches" in b["how"] and "41.2 ms" in b["how"]
    assert fig.latency_bound("local-0", None, 0)["bound_ms"] is None
    assert fig.latency_bound("local-0", {"rows": 3, "batches": 3, "service_s": {}},
                            0)["bound_ms"] is None


def test_lost_requests_are_5xx_and_unanswered_not_4xx() -> None:
    out = fig.lost_requests({"200": 90, "503": 2, "500": 1, "400": 4, "unfinished": 3,
                            "ServerDisconnected": 1, "TimeoutError": 2})
    assert out["lost"] == 9 and out["rejected_4xx"] == 4
    assert out["lost_by_kind"] == {"503": 2, "500": 1, "unfinished": 3,
                                   "ServerDisconnected": 1, "TimeoutError": 2}
    assert fig.lost_requests({"200": 5}) == {"lost": 0, "lost_by_kind": {}, "rejected_4xx": 0}


def _steady(rate: float, t0: float, t1: float) -> list[float]:
    n = round((t1 - t0) * rate)
    return [t0 + (i + 0.5) / rate for i in range(n)]


def test_bins_are_aligned_on_the_kill_and_cover_whole_bins_only() -> None:
    done = _steady(10, 100.0, 110.0)
    bins = fig.throughput_bins(done, t_kill=104.2, start=100.0, end=110.0)
    assert bins[0][0] == pytest.approx(-4.0) and bins[-1][0] == pytest.approx(5.0)
    assert all(r == pytest.approx(10.0) for _, r in bins[1:-1])
    assert [t for t, _ in bins].count(0.0) == 1


def test_recovery_time_after_a_dip_and_without_one() -> None:
    # 20 req/s, nothing for 1.5 s after the kill, then a backlog burst, then 12 req/s.
    done = _steady(20, 0, 10) + _steady(40, 11.5, 12.0) + _steady(12, 12.0, 20)
    bins = fig.throughput_bins(done, t_kill=10.0, start=0.0, end=20.0)
    assert fig.recovery_time(bins, threshold=10.0) == pytest.approx(1.5)
    assert fig.recovery_time(bins, threshold=10.0, sustain=1) == pytest.approx(1.5)
    assert fig.recovery_time(bins, threshold=30.0) is None  # a burst alone is not "back"
    lucky = [(-0.5, 20.0), (0.0, 0.0), (0.5, 12.0), (1.0, 2.0), (1.5, 11.0), (2.0, 10.0)]
    assert fig.recovery_time(lucky, 10.0) == 1.5  # one bin back is not "back"
    flat = fig.throughput_bins(_steady(20, 0, 20), 10.0, 0.0, 20.0)
    assert fig.recovery_time(flat, 18.0) == 0.0
    assert fig.survivor_fraction([1, 1, 4], 0) == pytest.approx(1.25 / 2.25)
    assert fig.survivor_fraction([1, 4], 1) == pytest.approx(0.8)


def window(policy: str, load: float, p99: float, good: float, share0: float,
           errors: dict | None = None, bound: float | None = None) -> dict:
    return {"policy": policy, "load": load, "offered_req_per_s": load * 20,
            "completed_req_per_s": good, "goodput_req_per_s": good,
            "goodput_over_capacity": good / 20, "goodput_over_offered": good / (load * 20),
            "mean_batch": 2.0, "latency_ms": {"p50": p99 / 3, "p95": p99 / 2, "p99": p99,
                                              "max": p99 * 2},
            "errors": errors or {},
            "workers": {"local-0": {"share": share0}, "local-1": {"share": 1 - share0}},
            "latency_bound": {"bound_ms": bound, "how": f"bound {bound}"}}


def test_median_summary_over_rounds() -> None:
    ws = [window("gpu-aware", 0.7, 100, 14, 0.8, {"503": 1}, 90),
          window("gpu-aware", 0.7, 300, 13, 0.7, {"503": 2, "504": 1}, 110),
          window("gpu-aware", 0.7, 200, 12, 0.9, None, None)]
    s = fig.median_summary(ws)
    assert s["rounds"] == 3 and s["latency_ms"]["p99"] == 200
    assert s["goodput_req_per_s"] == 13 and s["share"] == {"local-0": 0.8, "local-1": 0.2}
    assert s["errors"] == {"503": 3, "504": 1}
    assert s["latency_bound_ms"] == 100  # median of the rounds that had one
    assert s["latency_bound_how"] == ["bound 90", "bound 110", "bound None"]


def summary_of(*ws: dict) -> dict:
    out: dict = {}
    for w in ws:
        out.setdefault(w["policy"], {})[fig.load_key(w["load"])] = fig.median_summary([w])
    return out


def test_targets_met_not_met_and_not_measured() -> None:
    s = summary_of(window("gpu-aware", 0.70, 40, 14.0, 0.8, bound=45.0),
                   window("gpu-aware", 0.95, 100, 19.2, 0.8),
                   window("round-robin", 0.70, 400, 14.0, 0.5),
                   window("round-robin", 0.95, 150, 15.0, 0.5))
    t = {x["target"]: x for x in fig.check_targets(s, capacity=20.0)}
    assert len(t) == 6
    good = t["gpu-aware goodput at 95 % load >= 0.95 x aggregate capacity"]
    assert good["measured"] == pytest.approx(0.96) and good["met"] is True
    p99 = next(x for k, x in t.items() if k.startswith("gpu-aware p99 at 70 %"))
    assert (p99["measured"], p99["threshold"], p99["met"]) == (40, 45.0, True)
    assert p99["how"] == "bound 45.0"
    rr70 = t["gpu-aware p99 >= 2x better than round-robin at 70% load"]
    rr95 = t["gpu-aware p99 >= 2x better than round-robin at 95% load"]
    assert (rr70["measured"], rr70["met"]) == (10.0, True)
    assert (rr95["measured"], rr95["met"]) == (1.5, False)
    seed = t["gpu-aware p99 >= 2x better than seed-score at 70% load"]
    assert seed["measured"] is None and seed["met"] is None
    missing = fig.check_targets({}, None)
    assert all(x["met"] is None for x in missing)


def test_kill_target() -> None:
    k = {"recovery_s": 1.5, "bin_s": 0.5, "threshold_req_per_s": 9.0, "rate": 12.0,
         "capacity": {"req_per_s": 20.0}, "survivor_fraction": 0.5556, "lost": 0}
    assert fig.kill_target(k)["met"] is True
    assert fig.kill_target({**k, "recovery_s": 6.0})["met"] is False
    assert fig.kill_target({**k, "recovery_s": None})["met"] is None


def test_worker_pids_finds_children_by_name_and_sees_them_die() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                              "--name", "local-7"])
    try:
        deadline = time.monotonic() + 5
        while routers.worker_pids(__import__("os").getpid()).get("local-7") != child.pid:
            assert time.monotonic() < deadline, "child not found in /proc"
            time.sleep(0.05)
        assert not routers.is_dead(child.pid)
        child.kill()
        deadline = time.monotonic() + 5
        while not routers.is_dead(child.pid):  # a zombie until we reap it: counts as dead
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
    assert routers.is_dead(child.pid)


def test_cli_defaults_quick_and_validation() -> None:
    a = pl.parse_args([])
    assert a.policies == list(pl.POLICIES) and a.slowdown == [1.0, 4.0]
    assert (a.duration, a.capacity_duration, a.deadline, a.kill_at) == (30.0, 10.0, 2.0, 8.0)
    assert a.kill_run and a.max_queue_delay_s == 0 and a.json.name == "placement.json"
    q = pl.parse_args(["--quick", "--duration", "5s"])
    assert q.policies == ["gpu-aware", "round-robin"] and q.duration == 5.0
    assert q.capacity_duration == 2.0 and q.kill_at == pytest.approx(1.6)
    assert not pl.parse_args(["--no-kill-run"]).kill_run
    assert pl.parse_args(["--json", "", "--plot", ""]).plot is None
    assert pl.parse_args(["--max-queue-delay", "5ms"]).max_queue_delay_s == 0.005
    for bad in (["--policies", "gpu-aware,fastest"], ["--slowdown", "1"],
                ["--slowdown", "1,0.5"], ["--slowdown", "1,1,1,1,1"], ["--kill-at", "30s"]):
        with pytest.raises(SystemExit):
            pl.parse_args(bad)


def test_plot_from_a_synthetic_record(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from benchmarks.plot import plot_placement

    s = summary_of(window("gpu-aware", 0.70, 40, 14.0, 0.8),
                   window("round-robin", 0.95, 150, 15.0, 0.5))
    kill = {"kill_at_s": 2.0, "bins": [{"t": -1.0, "req_per_s": 10}, {"t": -0.5,
            "req_per_s": 12}, {"t": 0.0, "req_per_s": 2}, {"t": 0.5, "req_per_s": 9}],
            "bin_s": 0.5, "killed": "local-0", "rate": 11.0, "threshold_req_per_s": 6.0,
            "recovery_s": 0.5, "lost": 0, "slowdown": [1, 1, 4]}
    out = tmp_path / "sub" / "p.png"
    assert plot_placement({"summary": s, "capacity": {"req_per_s": 20.0},
                           "kill_run": kill, "machine": {}}, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trivial_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scheduler_plugins.builtin_models import build_trivial

    return build_trivial(tmp_path_factory.mktemp("models") / "trivial.onnx")


@pytest.mark.integration
def test_quick_run_end_to_end(trivial_model: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "placement.json", tmp_path / "placement.png"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.placement", "--quick", "--model-path",
         str(trivial_model), "--quiet", "--json", str(out), "--plot", str(png)],
        cwd=routers.ROOT, capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["failures"] == [] and r["machine"]["git_commit"]
    assert r["capacity"]["req_per_s"] > 0 and r["capacity"]["policy"] == "gpu-aware"
    assert set(r["summary"]) == {"gpu-aware", "round-robin"}
    for policy, loads in r["summary"].items():
        assert set(loads) == {"0.70", "0.95"}
    assert len(r["windows"]) == 4
    rates = {w["load"]: set() for w in r["windows"]}
    for w in r["windows"]:
        rates[w["load"]].add(w["rate"])  # every policy faced the same offered load
        assert w["ok"] > 0 and w["goodput_req_per_s"] > 0 and w["latency_ms"]["p99"] > 0
        assert set(w["workers"]) == {"local-0", "local-1"}
        assert sum(x["share"] for x in w["workers"].values()) == pytest.approx(1.0, abs=0.01)
        assert w["goodput_req_per_s"] <= w["offered_req_per_s"] + 1e-9
    assert all(len(v) == 1 for v in rates.values())
    assert r["windows"][0]["latency_bound"]["worker"] == "local-0"
    k = r["kill_run"]
    assert k["slowdown"] == [1.0, 1.0, 4.0] and k["killed"] == "local-0"
    assert k["pid_dead_after"] is True
    assert k["lost"] == 0 and k["sent_whole_run"] > 0, k["lost_by_kind"]
    assert "local-0" in k["workers_before_kill"]
    assert set(k["workers_after_kill"]) == {"local-1", "local-2"}
    assert k["bins"] and k["recovery_s"] is not None
    targets = {t["target"]: t for t in r["targets"]}
    assert len(targets) == 7
    assert all(t["met"] is None for n, t in targets.items() if "seed-score" in n)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "targets:" in proc.stdout and "kill run:" in proc.stdout
    print(f"quick placement run: {elapsed:.1f} s")
