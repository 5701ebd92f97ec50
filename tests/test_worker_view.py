"""A worker's view, kept current from replies and the plugin's digests: the same rules
for the front end and the scheduler plugin."""

import pytest

from core.worker_view import LINK_HORIZON, Flight, WorkerView, adaptive_window, apply_metrics, learn_from_reply


def reply(v: WorkerView, rows: int, service_s: float | None, round_trip: float, alone: bool, now: float, failed=False):
    learn_from_reply(v, rows, rows, service_s, failed, round_trip=round_trip, alone=alone, now=now)


def test_reply_teaches_service_time_and_overhead():
    v = WorkerView("w")
    reply(v, 4, 0.040, round_trip=0.050, alone=True, now=1.0)
    assert v.service.estimate(4) == pytest.approx(0.040)
    assert v.overhead == pytest.approx(0.010)  # the first sample is taken as it is
    # Queued behind another batch: the wait is not overhead.
    reply(v, 4, 0.040, round_trip=0.500, alone=False, now=2.0)
    assert v.overhead == pytest.approx(0.010)
    reply(v, 4, 0.040, round_trip=0.070, alone=True, now=3.0)
    assert v.overhead == pytest.approx(0.010 + 0.3 * 0.020)
    assert (v.batches, v.rows) == (3, 12)


def test_the_link_is_the_least_overhead_seen_lately_not_the_mean():
    v = WorkerView("w")
    for i, extra in enumerate((0.004, 0.040, 0.038, 0.045)):  # busy processes queue some trips
        reply(v, 1, 0.010, round_trip=0.010 + extra, alone=True, now=float(i))
    assert v.link == pytest.approx(0.004)
    assert v.overhead > 0.020  # the mean holds the queueing
    # A path that really got slower shows once the old low sample ages out.
    later = 3.0 + LINK_HORIZON + 0.5
    reply(v, 1, 0.010, round_trip=0.160, alone=True, now=later)
    assert v.link == pytest.approx(0.150)
    # Samples queued behind other batches never count.
    reply(v, 1, 0.010, round_trip=0.011, alone=False, now=later + 1)
    assert v.link == pytest.approx(0.150)


def test_failed_batch_is_remembered_and_a_reply_revives_a_stuck_worker():
    v = WorkerView("w", responsive=False)
    reply(v, 1, None, round_trip=0.1, alone=True, now=5.0, failed=True)
    assert v.responsive and list(v.errors) == [5.0]


def test_rows_that_failed_to_decode_do_not_count_as_service_time():
    v = WorkerView("w")
    learn_from_reply(v, 4, 0, 0.003, False, round_trip=0.004, alone=True, now=1.0)  # 4 sent, none ran
    assert (v.batches, v.rows) == (1, 4) and not v.service.known


def test_digest_brings_gpu_state_and_revives_a_worker_that_finished_work():
    v = WorkerView("w", responsive=False, reported={"batches": 3})
    gpu = {"source": "simulated", "utilization_gpu": 40.0}
    apply_metrics(v, {"gpu": gpu, "simulated": True, "stats": {"batches": 3, "service": {"8": 0.1}}})
    assert v.gpu == gpu and v.simulated and not v.responsive  # nothing finished since
    assert v.service.estimate(8) == pytest.approx(0.1)
    apply_metrics(v, {"gpu": gpu, "stats": {"batches": 4}})
    assert v.responsive


def test_reported_curves_are_followed_where_this_view_has_not_measured_itself():
    plugin, front = WorkerView("w"), WorkerView("w")
    reply(front, 8, 0.050, round_trip=0.06, alone=True, now=1.0)  # the front end measured 8 rows
    for v in (plugin, front):
        apply_metrics(v, {"stats": {"service": {"8": 0.080, "16": 0.150}}})
        apply_metrics(v, {"stats": {"service": {"8": 0.090, "16": 0.160}}})  # the worker's curve moved
    assert plugin.service.points == {8: pytest.approx(0.090), 16: pytest.approx(0.160)}  # reports only: follows them
    assert front.service.points == {8: pytest.approx(0.050), 16: pytest.approx(0.160)}  # keeps its own measurement


def test_a_failing_metric_shows_instead_of_vanishing():
    v = WorkerView("w")
    apply_metrics(v, {"error": "batch-router metric failed: KeyError: 'x'"})
    assert "KeyError" in v.metrics_error
    apply_metrics(v, {"gpu": None, "errors": ["gpu sample failed: NVMLError"], "stats": {}})
    assert "NVMLError" in v.metrics_error


def test_in_flight_work_is_the_flights_themselves():
    v = WorkerView("w", window=2)
    v.flights["a"] = Flight(sent_at=0.0, expected=0.1, rows=3)
    v.flights["b"] = Flight(sent_at=0.0, expected=0.1, rows=5)
    assert (v.in_flight, v.rows_in_flight, v.has_room) == (2, 8, False)
    assert v.remaining(now=0.05) == pytest.approx(0.15)
    del v.flights["a"]
    assert (v.in_flight, v.rows_in_flight, v.has_room) == (1, 5, True)


def test_window_grows_with_the_round_trip_so_a_far_worker_never_idles():
    near, far = WorkerView("near"), WorkerView("far")
    for v, link in ((near, 0.003), (far, 0.150)):
        v.service.observe(8, 0.020)
        v.link = link
    assert adaptive_window(near, 2, 32, 8) == 2  # loopback: the configured window
    assert adaptive_window(far, 2, 32, 8) == 10  # 1 running + 150 ms / 20 ms in transit + 1 spare
    assert adaptive_window(far, 2, 6, 8) == 6  # capped
    assert adaptive_window(WorkerView("new"), 2, 32, 8) == 2  # nothing measured yet
    near.overhead = 0.040  # queued in busy processes: the mean rises, the window does not
    assert adaptive_window(near, 2, 32, 8) == 2
