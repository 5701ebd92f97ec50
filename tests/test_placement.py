"""Placement policies on synthetic worker snapshots: pure functions, no Dask.

Times are in seconds on a fake clock; "fast" runs a row in 10 ms, "slow" in 40 ms
(the 1:4 case of the placement benchmark).
"""

import heapq

import pytest

from core.placement import (
    POLICIES,
    DaskDefault,
    GpuAware,
    LeastLoaded,
    RoundRobin,
    SeedScore,
    Tuning,
    make_policy,
    rows_that_fit,
    share_out,
    seed_score,
    throttling,
    weights,
)
from core.service_curve import ServiceCurve, bucket
from core.worker_view import Flight, WorkerView

GiB = 1 << 30


def view(address: str, per_row: float | None, window: int = 2, **kw) -> WorkerView:
    v = WorkerView(address, address, window, **kw)
    if per_row is not None:
        for n in (1, 2, 4, 8, 16, 32):
            v.service.observe(n, per_row * n)
    return v


def send(v: WorkerView, rows: int, now: float, batch_id: str = "b") -> None:
    v.flights[f"{batch_id}-{len(v.flights)}"] = Flight(now, v.service.estimate(rows), rows)


def busy(v: WorkerView, batches: int) -> None:
    """``batches`` in flight on ``v``, of no expected duration."""
    for i in range(batches):
        v.flights[f"busy-{i}"] = Flight(0.0, 0.0)


# -- the service-time curve ----------------------------------------------------------


def test_batch_sizes_share_power_of_two_buckets():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 32, 33)] == [1, 2, 4, 4, 8, 8, 16, 32, 64]


def test_curve_interpolates_and_extrapolates_per_row():
    c = ServiceCurve()
    assert c.estimate(4) is None  # nothing measured: no guess
    c.observe(1, 0.010)
    c.observe(8, 0.020)  # GPU-like: 8 rows cost only twice one row
    assert c.estimate(1) == pytest.approx(0.010)
    assert c.estimate(4) == pytest.approx(0.010 + 3 / 7 * 0.010)
    assert c.estimate(16) == pytest.approx(0.040)  # past the largest: its per-row time


def test_unmeasured_small_sizes_are_guessed_optimistically():
    c = ServiceCurve()
    c.observe(8, 0.080)  # only ever ran full batches
    # 10 ms per row: a GPU would be slower than this at one row, and is measured as soon
    # as it gets one; a guess too slow would keep it idle and never be corrected.
    assert c.estimate(1) == pytest.approx(0.010)


def test_curve_follows_a_change_within_a_few_batches():
    c = ServiceCurve()
    for _ in range(5):
        c.observe(8, 0.020)
    for _ in range(6):
        c.observe(8, 0.080)  # throttled, or another tenant arrived
    assert c.estimate(8) > 0.070


def test_a_slowdown_seen_at_one_size_moves_every_size():
    c = ServiceCurve()
    c.observe(1, 0.010)
    c.observe(32, 0.100)
    for _ in range(8):
        c.observe(32, 0.200)  # twice as slow now, seen only at batch 32
    assert c.estimate(32) == pytest.approx(0.200, rel=0.05)
    assert c.estimate(1) == pytest.approx(0.020, rel=0.05)


def test_an_idle_workers_estimate_grows_optimistic_then_a_batch_resets_it():
    c = ServiceCurve(fresh_for=2.0, half_life=3.0, floor=0.25)  # not the defaults: easy numbers
    c.observe(1, 0.800, now=0.0)  # measured while the machine was contended
    assert c.estimate(1, now=1.0) == pytest.approx(0.800)  # fresh: trusted
    assert c.estimate(1, now=5.0) == pytest.approx(0.800 * (0.25 + 0.75 * 0.5))
    assert c.estimate(1, now=60.0) == pytest.approx(0.200, rel=0.01)  # never below the floor
    c.observe(1, 0.320, now=60.0)  # the batch that staleness earned it: believed at once
    assert c.estimate(1, now=60.0) == pytest.approx(0.320, rel=0.01)


def test_stale_slow_worker_is_given_a_batch_again_when_the_fast_one_is_busy():
    # The slow worker was measured at 640 ms under contention; it really takes 320.
    fast, slow = view("fast", 0.080), view("slow", 0.640)
    fast.service.updated = slow.service.updated = 0.0
    send(fast, 5, now=0.0)  # 400 ms ahead: 480 ms on the fast one beats a fresh 640
    assert GpuAware().place([fast, slow], 1, 32, now=0.0).view is fast
    fast.service.updated = 20.0  # the fast one keeps being measured; the slow one not
    fast.flights.clear()
    send(fast, 5, now=20.0)
    assert GpuAware().place([fast, slow], 1, 32, now=20.0).view is slow  # 640 ms, trusted less: ~360


def test_an_idle_workers_optimism_earns_a_probe_not_a_bigger_share():
    fast, slow = view("fast", 0.010, window=1), view("slow", 0.040)
    fast.service.updated, slow.service.updated = 60.0, 0.0  # slow idle for a minute
    send(fast, 10, now=60.0)  # fast is 100 ms busy and has no room; 8 rows queued
    # Aged to 4x optimism the slow worker looks as fast as the fast one, and finishing
    # the queue soonest would hand it all 8 rows: 320 ms of real work on it.
    assert share_out([0.0, 0.100], [0.010, 0.010], 8)[0] == [8, 0]
    p = GpuAware().place([fast, slow], 8, 32, now=60.0)
    assert p.view is slow and p.rows == 3  # what its measured 40 ms a row justifies
    slow.service.updated = 60.0
    assert GpuAware().place([fast, slow], 8, 32, now=60.0).rows == 3  # same when fresh


def test_partial_batches_inform_their_bucket_by_rows():
    c = ServiceCurve()
    c.observe(5, 0.050)  # 10 ms/row, stored as an 8-row batch
    assert c.estimate(8) == pytest.approx(0.080)


# -- gpu-aware ----------------------------------------------------------------------


def test_lone_request_goes_to_the_fast_worker():
    fast, slow = view("fast", 0.010), view("slow", 0.040)
    p = GpuAware().place([slow, fast], queued_rows=1, max_batch=32, now=0.0)
    assert p.view is fast and p.rows == 1


def test_slow_worker_takes_work_only_when_that_finishes_sooner():
    fast, slow = view("fast", 0.010, window=4), view("slow", 0.040)
    send(fast, 2, now=0.0)  # 20 ms of work ahead: 30 ms total beats the slow 40 ms
    assert GpuAware().place([fast, slow], 1, 32, now=0.0).view is fast
    send(fast, 4, now=0.0)  # 60 ms ahead now: the slow worker finishes first
    assert GpuAware().place([fast, slow], 1, 32, now=0.0).view is slow


def test_waits_for_a_busy_fast_worker_rather_than_run_late_on_a_slow_one():
    fast, slow = view("fast", 0.010, window=1), view("slow", 0.040)
    send(fast, 1, now=0.0)  # fast has no room, but frees up in 10 ms
    assert GpuAware().place([fast, slow], 1, 32, now=0.0) is None


def test_a_worker_past_its_expected_finish_looks_busier_not_free():
    v = view("v", 0.010)
    send(v, 10, now=0.0)  # expected done at 100 ms
    assert v.remaining(0.040) == pytest.approx(0.060)
    assert v.remaining(0.100) == pytest.approx(0.0)
    assert v.remaining(0.500) == pytest.approx(0.400)  # stalled: ever busier


def test_queue_is_shared_in_proportion_to_speed():
    fast, slow = view("fast", 0.010), view("slow", 0.040)
    p = GpuAware().place([fast, slow], queued_rows=10, max_batch=32, now=0.0)
    assert (p.view, p.rows) == (fast, 8)  # 80 % of the queue for 80 % of capacity


def test_weights_follow_measured_speed():
    w = weights([view("fast", 0.010), view("slow", 0.040)], rows=8, now=0.0, tuning=Tuning())
    assert w["fast"] == pytest.approx(0.8) and w["slow"] == pytest.approx(0.2)


def test_throttling_gpu_gets_less_weight():
    hot = {"temperature": 91, "temperature_slowdown": 90, "throttle_reasons": []}
    cool = {"temperature": 60, "temperature_slowdown": 90, "throttle_reasons": []}
    clocks = {"temperature": 60, "temperature_slowdown": 90, "throttle_reasons": ["hw_slowdown"]}
    assert throttling(hot) and throttling(clocks) and not throttling(cool) and not throttling(None)
    a, b = view("a", 0.010, gpu=cool), view("b", 0.010, gpu=hot)
    w = weights([a, b], 8, 0.0, Tuning(throttle_penalty=0.5))
    assert w["b"] == pytest.approx(w["a"] / 2)


def test_recent_errors_lower_weight_then_expire():
    a, b = view("a", 0.010), view("b", 0.010)
    b.errors.append(100.0)
    tuning = Tuning(error_window=30.0)
    assert weights([a, b], 8, 110.0, tuning)["b"] == pytest.approx(1 / 3)
    assert weights([a, b], 8, 200.0, tuning)["b"] == pytest.approx(1 / 2)


def test_no_batch_to_a_worker_without_the_gpu_memory_for_it():
    gpu = {"memory_total": 16 * GiB, "memory_used": int(15.5 * GiB)}
    full = view("full", 0.001, gpu=gpu, reported={"memory_per_row": 1 * GiB})
    roomy = view("roomy", 0.040)
    # Everything up to the 32 rows it already ran fits (its allocator holds that
    # memory); beyond, nothing does: 0.1 headroom leaves no free GiB.
    assert rows_that_fit(full, Tuning()) == 32
    full.gpu = {**gpu, "memory_used": 16 * GiB}
    full.service = ServiceCurve()
    assert rows_that_fit(full, Tuning()) == 0
    assert GpuAware().place([full, roomy], 4, 32, 0.0).view is roomy
    assert GpuAware().pick([full, roomy], 0.0) is roomy


def test_batch_is_cut_to_what_fits_in_free_memory():
    gpu = {"memory_total": 10 * GiB, "memory_used": 5 * GiB}
    v = view("v", None, gpu=gpu, reported={"memory_per_row": 1 * GiB})
    v.service.observe(2, 0.002)
    # 9 GiB usable - 5 used = 4 free rows, on top of the 2 it already ran.
    assert GpuAware().place([v], 32, 32, 0.0).rows == 6


def test_unresponsive_worker_gets_nothing():
    a, b = view("a", 0.010), view("b", 0.040)
    a.responsive = False
    assert GpuAware().place([a, b], 1, 32, 0.0).view is b
    assert LeastLoaded().place([a, b], 1, 32, 0.0).view is b
    assert RoundRobin().place([a, b], 1, 32, 0.0).view is b


def test_unmeasured_worker_is_tried_at_once():
    known, new = view("known", 0.010), view("new", None)
    send(known, 1, 0.0)
    assert GpuAware().place([known, new], 1, 32, 0.0).view is new


def test_shares_follow_capacity_under_saturation():
    """Event-driven run of the policy against workers that really take 10 and 40 ms a
    row: the fast one serves ~4/5 of the rows, and nothing waits on the slow one's
    queue while the fast one could have taken it."""
    speed = {"fast": 0.010, "slow": 0.040}
    views = {a: view(a, s) for a, s in speed.items()}
    policy, now, queued, served = GpuAware(), 0.0, 0, {"fast": 0, "slow": 0}
    events: list[tuple[float, str, str, int]] = []  # (done at, worker, batch, rows)
    free_at = {a: 0.0 for a in speed}
    ids = 0
    while now < 60.0:
        queued = 64  # saturated: the queue never runs dry
        while (p := policy.place(list(views.values()), queued, 8, now)) is not None:
            ids += 1
            v = p.view
            start = max(now, free_at[v.address])
            free_at[v.address] = start + speed[v.address] * p.rows
            v.flights[str(ids)] = Flight(now, v.service.estimate(p.rows), p.rows)
            heapq.heappush(events, (free_at[v.address], v.address, str(ids), p.rows))
            queued -= p.rows
        now, addr, bid, rows = heapq.heappop(events)
        v = views[addr]
        del v.flights[bid]
        served[addr] += rows
    share = served["fast"] / sum(served.values())
    assert 0.75 <= share <= 0.85


# -- the other policies ---------------------------------------------------------------


def test_round_robin_alternates_among_workers_with_room():
    a, b = view("a", 0.010), view("b", 0.040)
    rr = RoundRobin()
    picks = [rr.place([a, b], 1, 32, 0.0).view.address for _ in range(4)]
    assert picks == ["a", "b", "a", "b"]
    busy(b, b.window)
    assert rr.place([a, b], 1, 32, 0.0).view is a


def test_least_loaded_picks_fewest_in_flight_and_splits_the_queue():
    a, b = view("a", 0.010), view("b", 0.040)
    busy(a, 1)
    p = LeastLoaded().place([a, b], queued_rows=9, max_batch=32, now=0.0)
    assert p.view is b and p.rows == 3  # 9 rows over 3 free slots


def test_dask_default_only_caps_the_total_in_flight():
    views = [view("a", 0.01), view("b", 0.04)]
    d = DaskDefault()
    p = d.place(views, queued_rows=8, max_batch=32, now=0.0, unplaced=0)
    assert p.view is None and p.rows == 2
    assert d.place(views, queued_rows=8, max_batch=32, now=0.0, unplaced=4) is None


def test_seed_score_is_the_old_formula():
    gpu = {"memory_total": 16 * GiB, "memory_used": 4 * GiB, "utilization_gpu": 50, "temperature": 85}
    v = view("v", 0.020, gpu=gpu)
    busy(v, 2)
    v.batches, v.rows = 1, 1
    # 75 free% - 2/10 queue - 20 ms/10 - 50%/100*50 - 50 hot
    assert seed_score(v) == pytest.approx(75 - 0.2 - 2.0 - 25 - 50)


def test_seed_score_weighted_random_top_three_is_reproducible():
    views = [view(a, s) for a, s in (("a", 0.010), ("b", 0.020), ("c", 0.040), ("d", 0.080))]
    picks = [SeedScore().place(views, 1, 32, 0.0).view.address for _ in range(3)]
    assert picks == [SeedScore().place(views, 1, 32, 0.0).view.address for _ in range(3)]
    many = SeedScore()
    chosen = {many.place(views, 1, 32, 0.0).view.address for _ in range(200)}
    assert "d" not in chosen and chosen <= {"a", "b", "c"}


def test_policies_are_chosen_by_name():
    for name in ("gpu-aware", "round-robin", "least-loaded", "dask-default", "seed-score"):
        assert make_policy(name).name == name
    with pytest.raises(ValueError, match="unknown placement policy"):
        make_policy("fastest")


def test_share_out_gives_a_slow_worker_rows_only_when_it_helps():
    # One row: the earliest finisher (busy fast at 30 ms beats idle slow at 40 ms).
    assert share_out([0.020, 0.0], [0.010, 0.040], 1) == ([1, 0], [0, 1])
    # A long queue: both work, about 4:1, and finish together.
    (fast, slow), (fast_first, slow_first) = share_out([0.0, 0.0], [0.010, 0.040], 100)
    assert fast + slow == 100 and 75 <= fast <= 85
    # The oldest rows go to the fast worker: the slow one's start behind them.
    assert fast_first == 0 and slow_first > 0


def test_slow_worker_takes_rows_from_behind_those_the_busy_fast_one_will_finish_first():
    fast, slow = view("fast", 0.010, window=1), view("slow", 0.040)
    send(fast, 1, now=0.0)  # no room for 10 ms
    p = GpuAware().place([fast, slow], queued_rows=10, max_batch=32, now=0.0)
    # The head rows wait for the fast worker (done by ~40 ms); the slow one takes a
    # row from behind them, which it also finishes by ~40 ms.
    assert p.view is slow and p.skip >= 2 and p.rows >= 1


def test_every_policy_answers_the_same_interface():
    """The dispatcher asks every policy the same questions; none needs special handling."""
    for name in POLICIES:
        views = [view("a", 0.010), view("b", 0.040)]
        policy = make_policy(name)
        placement = policy.place(views, queued_rows=4, max_batch=8, now=0.0, unplaced=0)
        assert placement is not None and 1 <= placement.rows <= 8 and placement.skip >= 0, name
        assert placement.view in (*views, None)
        assert policy.pick(views, 0.0) in (*views, None)
        assert policy.probes_idle == (name == "gpu-aware")
