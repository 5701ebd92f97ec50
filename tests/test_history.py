"""The scheduler-side history the dashboard draws: rates and percentiles from the
difference of two cumulative snapshots, across front ends, at O(workers) per update."""

from __future__ import annotations

import pytest

from scheduler_plugins.history import STALE_AFTER, History
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


def test_percentiles_cover_the_last_interval_only():
    h = History()
    h.add_frontend("fe", frontend(0.0, request_s=(1.0,) * 100), now=0.0)  # slow, long ago
    h.add_frontend("fe", frontend(1.0, request_s=(1.0,) * 100 + (0.005,) * 10), now=1.0)
    assert h.queue[-1]["request_p99_ms"] == pytest.approx(5, rel=0.2)


def test_front_ends_add_up_and_a_silent_one_is_forgotten():
    h = History()
    for key in ("a", "b"):
        h.add_frontend(key, frontend(0.0, levels=[1, 0, 0]), now=0.0)
        h.add_frontend(key, frontend(1.0, rows=10, levels=[2, 1, 0]), now=1.0)
    assert h.queue[-1]["rows_per_s"] == pytest.approx(20) and h.queue[-1]["queue_levels"] == [4, 2, 0]
    h.add_frontend("a", frontend(2.0 + STALE_AFTER, rows=10), now=2.0 + STALE_AFTER)
    assert set(h.frontends) == {"a"} and h.summary()["frontends"] == 1


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


def test_the_history_is_bounded():
    h = History(keep=10)
    for i in range(100):
        h.add_workers(float(i), {})
    assert len(h.gpu) == 10


def test_cards_say_what_each_worker_is_and_the_worst_thing_about_it():
    h = History()
    h.add_workers(0.0, {
        "tcp://ok": worker("ok", sample=gpu()),
        "tcp://hot": worker("hot", sample=gpu(throttle=["hw_thermal_slowdown"])),
        "tcp://cpu": worker("cpu", device="cpu"),
        "tcp://sim": worker("sim", sample=gpu(source="simulated"), simulated=True),
        "tcp://stuck": worker("stuck", sample=gpu()),
    })  # fmt: skip
    h.add_frontend("fe", frontend(0.0, workers={"tcp://stuck": fe_worker("stuck", responsive=False)}), now=0.0)
    cards = {c["name"]: c for c in h.cards()}
    assert {n: c["health"] for n, c in cards.items()} == {
        "ok": "ok", "hot": "throttling", "cpu": "ok", "sim": "ok", "stuck": "unresponsive"}  # fmt: skip
    assert cards["cpu"]["gpu"] is False and "utilization" not in cards["cpu"]
    assert cards["sim"]["simulated"] is True and cards["ok"]["simulated"] is False
    assert cards["ok"]["utilization"] == 50 and cards["ok"]["providers"][0] == "CUDAExecutionProvider"


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
    s = h.summary()
    assert (s["served"], s["503"], s["504"]) == (12, 5, 2)
    assert h.batch_sizes() == {1: 3, 4: 3}


@pytest.mark.parametrize("broken", [
    {},
    {"time": "now"},
    {**frontend(1.0), "queue": {"levels": ["x"], "rows": 0}},
    {**frontend(1.0), "latency": {"request": {"counts": [1, 2]}}},
    {**frontend(1.0), "workers": {"tcp://a": {"name": "a"}}},
])  # fmt: skip
def test_a_malformed_snapshot_is_refused_and_breaks_nothing(broken):
    h = History()
    h.add_frontend("good", frontend(0.0, rows=0), now=0.0)
    with pytest.raises(ValueError):
        h.add_frontend("bad", broken, now=0.5)
    h.add_frontend("good", frontend(1.0, rows=10), now=1.0)
    assert set(h.frontends) == {"good"} and h.queue[-1]["rows_per_s"] == pytest.approx(10)
    assert h.summary()["frontends"] == 1
