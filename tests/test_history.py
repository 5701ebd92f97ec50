"""The scheduler-side history the dashboard draws: rates and percentiles from the
difference of two cumulative snapshots, across front ends, at O(workers) per update."""

from __future__ import annotations

import math

import pytest

from scheduler_plugins.history import History
from tests.fixtures_dashboard import fe_worker, frontend, gpu, worker


def test_one_snapshot_gives_no_rates_yet_the_second_does():
    h = History()
    h.add_frontend("fe", frontend(100.0), now=0.0)
    assert not h.queue
    h.add_frontend("fe", frontend(100.5, success=20, rows=40, batches=10, responses={200: 18, 503: 2},
                                  request_s=(0.01,) * 20), now=0.5)  # fmt: skip
    row = h.queue[-1]
    assert row["requests_per_s"] == pytest.approx(40) and row["rows_per_s"] == pytest.approx(80)
    assert row["batches_per_s"] == pytest.approx(20) and row["503_per_s"] == pytest.approx(4)
    assert row["request_p50_ms"] == pytest.approx(10, rel=0.2)


def test_rates_use_the_front_ends_own_clock_rows_the_schedulers():
    """Two machines' wall clocks disagree; rates come from the sender's monotonic clock
    and rows are stamped on arrival, so both pages share the scheduler's time axis."""
    h = History()
    h.add_frontend("fe", {**frontend(5_000.0), "clock": 10.0}, now=100.0)
    h.add_frontend("fe", {**frontend(4_000.0, rows=30), "clock": 12.0}, now=102.0)  # its wall clock stepped back
    assert h.queue[-1]["rows_per_s"] == pytest.approx(15) and h.queue[-1]["time"] == 102.0


def test_a_repeated_snapshot_adds_no_row():
    h = History()
    h.add_frontend("fe", frontend(0.0), now=0.0)
    h.add_frontend("fe", frontend(1.0, rows=10), now=1.0)
    h.add_frontend("fe", frontend(1.0, rows=10), now=1.2)
    assert len(h.queue) == 1


def test_percentiles_cover_the_last_interval_only():
    h = History()
    h.add_frontend("fe", frontend(0.0, request_s=(1.0,) * 100), now=0.0)  # slow, long ago
    h.add_frontend("fe", frontend(1.0, request_s=(1.0,) * 100 + (0.005,) * 10), now=1.0)
    assert h.queue[-1]["request_p99_ms"] == pytest.approx(5, rel=0.2)


def test_front_ends_add_up():
    h = History()
    for key in ("a", "b"):
        h.add_frontend(key, frontend(0.0, levels=[1, 0, 0]), now=0.0)
        h.add_frontend(key, frontend(1.0, rows=10, levels=[2, 1, 0]), now=1.0)
    assert h.queue[-1]["rows_per_s"] == pytest.approx(20) and h.queue[-1]["queue_levels"] == [4, 2, 0]
    assert h.summary(now=1.0)["queue"] == 6


def test_a_silent_front_end_is_forgotten_even_with_no_other_reporting():
    h = History(stale_after=5.0)
    h.add_frontend("fe", frontend(0.0, levels=[3, 0, 0], workers={"tcp://a": fe_worker("a", in_flight=2)}), now=0.0)
    h.add_frontend("fe", frontend(1.0, rows=500, levels=[3, 0, 0], workers={"tcp://a": fe_worker("a", in_flight=2)}), now=1.0)
    assert h.summary(now=2.0)["rows_per_s"] == pytest.approx(500)
    h.add_workers(7.0, {"tcp://a": worker("a")})  # the plugin's tick, an age later
    s = h.summary(now=7.0)
    assert (s["frontends"], s["queue"], s["rows_per_s"], s["p50_ms"]) == (0, 0, None, None)
    assert h.cards()[0]["in_flight"] is None  # no front end's word on it any more


def test_a_restarted_front_end_does_not_make_rates_negative():
    h = History()
    h.add_frontend("fe", frontend(0.0, rows=1000), now=0.0)
    h.add_frontend("fe", frontend(1.0, rows=5), now=1.0)
    assert h.queue[-1]["rows_per_s"] == pytest.approx(5)


def test_workers_rows_carry_in_flight_and_served_rows_per_worker():
    h = History()
    h.add_frontend("fe", frontend(0.0, workers={"tcp://a": fe_worker("a", rows=0)}), now=0.0)
    h.add_frontend("fe", frontend(2.0, workers={"tcp://a": fe_worker("a", rows=30, in_flight=2, weight=0.8)}), now=2.0)
    assert h.queue[-1]["workers"]["tcp://a"] == {"name": "a", "in_flight": 2, "weight": 0.8, "rows_per_s": 15.0}


def test_since_returns_only_what_a_page_has_not_drawn():
    h = History()
    for i in range(5):
        h.add_workers(float(i), {})
    seqs = [r["seq"] for r in h.gpu]
    assert [r["seq"] for r in History.since(h.gpu, seqs[2])] == seqs[3:]
    assert History.since(h.gpu, seqs[-1]) == []


def test_the_history_keeps_a_time_span():
    h = History(keep_s=10.0)
    for i in range(100):
        h.add_workers(float(i), {})
    assert [r["time"] for r in h.gpu] == [float(t) for t in range(89, 100)]


def test_cards_say_what_each_worker_is_and_the_worst_thing_about_it():
    h = History()
    h.add_workers(0.0, {
        "tcp://ok": worker("ok", sample=gpu()),
        "tcp://hot": worker("hot", sample=gpu(throttle=["hw_thermal_slowdown"])),
        "tcp://cpu": worker("cpu", device="cpu"),
        "tcp://sim": worker("sim", device="cpu", sample=gpu(source="simulated"), simulated=True),
        "tcp://stuck": worker("stuck", sample=gpu()),
        "tcp://blind": worker("blind", errors=["nvml: GPU is lost"]),  # CUDA, but no sample
    })  # fmt: skip
    h.add_frontend("fe", frontend(0.0, workers={"tcp://stuck": fe_worker("stuck", responsive=False)}), now=0.0)
    cards = {c["name"]: c for c in h.cards()}
    assert {n: c["health"] for n, c in cards.items()} == {
        "blind": "no GPU sample", "cpu": "ok", "hot": "throttling", "ok": "ok", "sim": "ok", "stuck": "unresponsive"}  # fmt: skip
    assert cards["cpu"]["gpu"] is False and cards["cpu"]["missing"] is None  # CPU only: nothing missing
    assert cards["blind"]["gpu"] is False and cards["blind"]["missing"] == "nvml: GPU is lost"  # never passed off as CPU
    assert cards["sim"]["simulated"] is True and cards["ok"]["simulated"] is False
    assert not any(c["unmetered"] for c in cards.values() if not c["gpu"])
    assert cards["ok"]["utilization"] == 50 and cards["ok"]["providers"][0] == "CUDAExecutionProvider"


def test_cards_fall_back_on_the_plugins_view_of_placement():
    h = History()
    w = worker("new", sample=gpu())
    w["placement"] = {"weight": 0.25, "in_flight": 1}
    h.add_workers(0.0, {"tcp://new": w})
    assert (h.cards()[0]["weight"], h.cards()[0]["in_flight"]) == (0.25, 1)


def test_a_cuda_fallback_is_the_loudest_health():
    h = History()
    w = worker("colab", sample=gpu())
    w["info"]["cuda_fallback"] = True
    h.add_workers(0.0, {"tcp://c": w})
    assert h.cards()[0]["health"] == "CUDA fell back to CPU"


def test_summary_and_batch_sizes_add_up_across_front_ends():
    h = History()
    h.add_frontend("a", frontend(0.0, success=5, responses={503: 1, 504: 2}, batch_sizes={1: 3, 4: 1}), now=0.0)
    h.add_frontend("b", frontend(0.0, success=7, responses={503: 4}, batch_sizes={4: 2}), now=0.0)
    s = h.summary(now=0.0)
    assert (s["served"], s["503"], s["504"]) == (12, 5, 2)
    assert h.batch_sizes() == {1: 3, 4: 3}


def nested(**changes) -> dict:
    s = frontend(1.0, workers={"tcp://a": fe_worker("a")})
    for path, value in changes.items():
        d = s
        *parents, leaf = path.split("__")
        for p in parents:
            d = d[p]
        d[leaf] = value
    return s


@pytest.mark.parametrize("broken", [
    {},
    {**frontend(1.0), "time": "now"},
    {**frontend(1.0), "clock": math.nan},
    nested(queue__levels=["x"]),
    nested(latency__request={"counts": [1, 2]}),
    nested(workers={"tcp://a": {"name": "a"}}),
    nested(workers={"tcp://a": {**fe_worker("a"), "in_flight": None}}),
    nested(workers={"tcp://a": {**fe_worker("a"), "weight": math.inf}}),
    nested(success=-1),
    nested(responses={"200": None}),
], ids=lambda b: str(b)[:40])  # fmt: skip
def test_a_malformed_snapshot_is_refused_and_breaks_nothing(broken):
    h = History()
    h.add_frontend("good", frontend(0.0, rows=0, workers={"tcp://a": fe_worker("a")}), now=0.0)
    with pytest.raises(ValueError):
        h.add_frontend("bad", broken, now=0.5)
    h.add_frontend("good", frontend(1.0, rows=10, workers={"tcp://a": fe_worker("a")}), now=1.0)
    assert set(h.frontends) == {"good"} and h.queue[-1]["rows_per_s"] == pytest.approx(10)
    assert h.summary(now=1.0)["frontends"] == 1 and len(h.cards()) == 0


def test_a_cuda_worker_with_gpu_metrics_off_is_neither_cpu_only_nor_in_trouble():
    h = History()
    w = worker("quiet", device="cuda")
    w["info"]["gpu"] = None  # worker.gpu-metrics: off
    h.add_workers(0.0, {"tcp://q": w})
    card = h.cards()[0]
    assert (card["gpu"], card["unmetered"], card["missing"], card["health"]) == (False, True, None, "ok")


def test_a_front_end_is_forgotten_when_another_reports():
    h = History(stale_after=5.0)
    h.add_frontend("gone", frontend(0.0, levels=[4, 0, 0]), now=0.0)
    h.add_frontend("live", frontend(6.0), now=6.0)
    h.add_frontend("live", frontend(7.0, rows=7), now=7.0)
    assert set(h.frontends) == {"live"} and h.queue[-1]["queue_levels"] == [0, 0, 0]


def test_a_repeated_snapshot_keeps_its_rates_in_the_others_rows():
    h = History()
    for key in ("a", "b"):
        h.add_frontend(key, frontend(0.0), now=0.0)
        h.add_frontend(key, frontend(1.0, rows=10), now=1.0)
    h.add_frontend("a", frontend(1.0, rows=10), now=1.5)  # the same snapshot again
    h.add_frontend("b", frontend(2.0, rows=20), now=2.0)
    assert h.queue[-1]["rows_per_s"] == pytest.approx(20)  # a's 10/s still counted
