"""The dashboard pages' Bokeh components, fed synthetic scheduler and front-end state:
what each data source holds is what the browser draws."""

from __future__ import annotations

import math

import pytest

from scheduler_plugins.dashboard import ROUTES, register
from scheduler_plugins.dashboard.batch_queues import BatchQueues
from scheduler_plugins.dashboard.gpu_metrics import GpuMetrics
from scheduler_plugins.dashboard.overview import Overview
from scheduler_plugins.history import History
from tests.fixtures_dashboard import fe_model, fe_worker, frontend, gpu, worker


@pytest.fixture
def history() -> History:
    """Two front-end snapshots and two ticks over a T4, a simulated GPU and a laptop CPU."""
    h = History()
    fleet = lambda util, hot: {  # noqa: E731
        "tcp://t4": worker("t4", sample=gpu(util=util, throttle=["hw_slowdown"] if hot else None)),
        "tcp://sim": worker("sim", sample=gpu(util=30, source="simulated"), simulated=True),
        "tcp://cpu": worker("cpu", device="cpu", restarts=2),
    }
    h.add_workers(100.0, fleet(40, False))
    h.add_workers(100.5, fleet(90, True))
    ws = lambda rows: {"tcp://t4": fe_worker("t4", rows=rows, in_flight=2, weight=0.7),  # noqa: E731
                       "tcp://cpu": fe_worker("cpu", rows=rows // 3, in_flight=1, weight=0.3)}
    h.add_frontend("fe", frontend(100.0, workers=ws(0)), now=100.0)
    h.add_frontend("fe", frontend(101.0, success=40, rows=40, batches=8, responses={200: 38, 503: 1, 504: 1},
                                  levels=[0, 5, 1], workers=ws(30), request_s=(0.02,) * 40, batch_sizes={4: 5, 8: 3}),
                   now=101.0)  # fmt: skip
    return h


def test_overview_cards_headline_and_timeline(history):
    o = Overview(history, clock=lambda: 101.0)
    o.update()
    cards = dict(zip(o.cards.data["name"], o.cards.data["body"]))
    assert list(cards) == ["cpu", "sim", "t4"]
    assert "no GPU: CPU only" in cards["cpu"] and "restarted 2x" in cards["cpu"]
    assert "restarted" not in cards["t4"]
    assert "GPU SIMULATED" in cards["sim"]
    assert "Tesla T4: 90 % busy" in cards["t4"] and "health: throttling" in cards["t4"]
    assert "weight 0.70 · in flight 2" in cards["t4"]
    tiles = dict(zip(o.tiles.data["label"], o.tiles.data["value"]))
    assert tiles["queued requests"] == "6" and tiles["503 (refused)"] == "1" and tiles["504 (timeout)"] == "1"
    assert tiles["img/s"] == "40.0" and float(tiles["p50 ms"]) == pytest.approx(20, rel=0.2)
    assert o.timeline.data["rows_per_s"] == [40.0]


def test_overview_streams_only_new_rows(history):
    o = Overview(history, clock=lambda: 102.0)
    o.update()
    o.update()
    assert len(o.timeline.data["time"]) == 1
    history.add_frontend("fe", frontend(102.0, success=80, rows=80, batches=16), now=102.0)
    o.update()
    assert o.timeline.data["rows_per_s"] == [40.0, 40.0]


def test_gpu_page_draws_real_and_simulated_gpus_never_a_cpu(history):
    g = GpuMetrics(history)
    g.update()
    assert set(g.sources) == {"tcp://t4", "tcp://sim"}
    t4 = g.sources["tcp://t4"].data
    assert t4["utilization"] == [40, 90] and t4["memory_total_gib"] == [15.0, 15.0]
    assert math.isnan(t4["utilization_throttled"][0]) and t4["utilization_throttled"][1] == 90  # red dot while throttling
    assert g.sources["tcp://sim"].name == "gpu:sim"
    labels = {item.label.value for item in g.figures["utilization"].legend.items}
    assert labels == {"t4", "sim (simulated)", "throttling"}
    assert "cpu</b>: CPU only" in g.note.text and "SIMULATED GPU" in g.note.text


def test_gpu_page_adds_a_worker_that_joins_later(history):
    g = GpuMetrics(history)
    g.update()
    history.add_workers(101.0, {"tcp://new": worker("new", sample=gpu(util=10))})
    g.update()
    assert g.sources["tcp://new"].data["utilization"] == [10]
    assert len(g.sources["tcp://t4"].data["time"]) == 2  # nothing new for it: nothing streamed


def test_batch_queue_page(history):
    b = BatchQueues(history, levels=3)
    b.update()
    t = b.timeline.data
    assert (t["level_1"], t["level_2"], t["level_3"]) == ([0], [5], [1])
    assert t["batches_per_s"] == [8.0] and t["503_per_s"] == [1.0] and t["504_per_s"] == [1.0]
    assert t["request_p99_ms"][0] == pytest.approx(20, rel=0.2) and math.isnan(t["compute_p50_ms"][0])
    assert b.sizes.data == {"size": [4, 8], "count": [5, 3]}
    share = b.share.data
    assert share["worker"] == ["cpu", "t4"] and share["weight"] == [0.3, 0.7]
    assert share["share"] == pytest.approx([10 / 40, 30 / 40])
    assert {s.name for s in b.in_flight.values()} == {"inflight:t4", "inflight:cpu"}
    assert b.in_flight["tcp://t4"].data["in_flight"] == [2]


def test_batch_queue_page_has_a_row_per_model_summed_over_front_ends():
    h = History()
    for fe, (a, b) in {"fe1": (3, 10), "fe2": (1, 5)}.items():
        h.add_frontend(fe, frontend(100.0, models={"mean": fe_model(a, b), "colours": fe_model(0, 2, draining=fe == "fe2")}), now=100.0)
    page = BatchQueues(h, levels=3)
    page.update()
    m = page.models.data
    assert m["model"] == ["colours", "mean"]
    assert m["queued"] == [0, 4] and m["success"] == [4, 15]
    assert m["state"] == ["UNLOADING", "READY"]  # one front end draining it is enough to say so


def test_pages_are_registered_for_the_dashboard():
    from distributed.dashboard.scheduler import applications

    register()
    assert set(ROUTES) <= set(applications)


def test_an_open_page_keeps_no_more_than_the_history_does():
    h = History(keep_s=10.0)
    o = Overview(h, clock=lambda: 0.0)
    b = BatchQueues(h, levels=3)
    h.add_frontend("fe", frontend(0.0), now=0.0)
    for t in range(1, 100):
        h.add_frontend("fe", frontend(float(t), rows=t), now=float(t))
        o.update()
        b.update()
    assert len(h.queue) == 11
    assert len(o.timeline.data["time"]) == len(b.timeline.data["time"]) == 11
