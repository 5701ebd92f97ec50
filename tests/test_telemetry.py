"""Front-end telemetry: fixed-bucket histograms whose quantiles survive merging and
differencing, and the snapshot the dashboard and /metrics read."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from core.histogram import BOUNDS, Histogram, difference, quantile
from core.worker_view import Flight, WorkerView
from router_api.batching import BatchQueue, Pending
from router_api.telemetry import Telemetry
from router_api.triton_stats import ModelStats


def test_quantiles_from_buckets_are_close_to_the_exact_ones():
    rng = np.random.default_rng(0)
    values = rng.lognormal(mean=np.log(0.02), sigma=0.6, size=20_000)  # ~20 ms, a long tail
    h = Histogram()
    for v in values:
        h.observe(float(v))
    for q in (0.5, 0.95, 0.99):
        exact = float(np.quantile(values, q))
        assert quantile(h.counts, q) == pytest.approx(exact, rel=0.08)
    assert h.sum == pytest.approx(values.sum())


def test_quantile_of_nothing_is_none_and_beyond_the_last_bound_is_the_last_bound():
    assert quantile([0] * (len(BOUNDS) + 1), 0.5) is None
    h = Histogram()
    h.observe(10_000.0)
    assert quantile(h.counts, 0.99) == BOUNDS[-1]


def test_an_interval_is_the_difference_of_two_cumulative_snapshots():
    h = Histogram()
    for _ in range(100):
        h.observe(0.001)
    before = h.snapshot()["counts"]
    for _ in range(100):
        h.observe(0.1)
    recent = difference(h.snapshot()["counts"], before)
    assert sum(recent) == 100
    assert quantile(recent, 0.5) == pytest.approx(0.1, rel=0.3)  # the old fast ones are gone


def test_a_restarted_counter_starts_again_from_zero():
    assert difference([1, 0, 2], [3, 0, 0]) == [1, 0, 2]
    assert difference([4, 1], None) == [4, 1]


def test_a_request_is_split_into_queue_transfer_and_compute():
    t = Telemetry()
    t.request_served(total_s=0.050, queue_s=0.010, round_trip_s=0.040, compute_s=0.030)
    assert {p: round(h.sum, 6) for p, h in t.latency.items()} == {
        "request": 0.05, "queue": 0.01, "transfer": 0.01, "compute": 0.03,
    }  # fmt: skip


def fake_dispatcher():
    stats = ModelStats("resnet50")
    queue = BatchQueue(max_batch_size=8, priority_levels=3)
    fast = WorkerView("tcp://a", "gpu-a", batches=10, rows=40)
    fast.flights = {"b1": Flight(0.0, 0.1, 2), "b2": Flight(0.0, 0.1, 4)}
    return SimpleNamespace(name="resnet50", stats=stats, entry_stats={stats.name: stats}, queue=queue, views={fast.address: fast},
                           hedges=1, batches={}, draining=False, weights=lambda now=0.0: {"tcp://a": 1.0})  # fmt: skip


def test_the_snapshot_is_cumulative_and_small():
    d = fake_dispatcher()
    d.queue.push(Pending(rows=1, priority=1, arrival=0.0))
    d.queue.push(Pending(rows=2, priority=3, arrival=0.0))
    d.stats.batch_done(4, 4, 1, 1000, 2000, 3000)
    d.stats.request_done(True, 5000, 100)
    d.stats.rejected["queue_full"] += 2
    t = Telemetry()
    t.responses[200] += 1
    t.responses[503] += 2
    s = t.snapshot(d)
    assert s["queue"] == {"levels": [1, 0, 1], "max_batch_size": 8}
    assert (s["success"], s["rows"], s["batches"], s["batch_sizes"]) == (1, 4, 1, {"4": 1})
    assert s["responses"] == {"200": 1, "503": 2} and s["rejected"] == {"queue_full": 2}
    assert s["workers"]["tcp://a"] == {
        "name": "gpu-a", "in_flight": 2, "weight": 1.0, "responsive": True, "rows": 40,
    }  # fmt: skip
    assert set(s["latency"]) == {"request", "queue", "transfer", "compute"}


def shape(obj):
    """The snapshot's structure without its numbers: keys and list lengths."""
    if isinstance(obj, dict):
        return {k: shape(v) for k, v in obj.items() if k != "time"}
    if isinstance(obj, list):
        return len(obj)
    return type(obj).__name__


def test_the_snapshot_grows_with_workers_never_with_requests():
    """What reaches the scheduler every half second, and what it does with it, is
    O(workers + buckets) whatever the request rate."""
    d, t = fake_dispatcher(), Telemetry()
    t.request_served(0.01, 0.001, 0.005, 0.004)
    few = shape(t.snapshot(d))
    for i in range(10_000):
        t.request_served(0.001 * (i % 500), 0.001, 0.005, 0.004)
    assert shape(t.snapshot(d)) == few
