"""The Dispatcher's rules, driven by events on a fake clock: no Dask, no event loop.

Each test feeds events (a request arrives, a worker joins, a reply comes back, time
passes) and checks the actions that come out (send, hedge, probe, answer, fail, requeue).
"""

from __future__ import annotations

import pytest

from core.config import parse
from core.protocol import BatchReply, ItemError, Tensors, Timings
from core.worker_view import Flight, WorkerView
from router_api.dispatch_events import (
    Abort,
    Answer,
    Arrived,
    Batch,
    Cancelled,
    Closing,
    DeadlineExceeded,
    Fail,
    Forget,
    Hedge,
    Lost,
    MetricsDigest,
    NotSent,
    Probe,
    Replied,
    Request,
    Requeue,
    SchedulerBack,
    SchedulerLost,
    Send,
    Tick,
    Unavailable,
    Unreachable,
    Wake,
    WorkerJoined,
    WorkerLeft,
    WorkersListed,
)
from router_api.dispatcher import Dispatcher
from router_api.watchdog import due_for_probe

MODEL = {"name": "m", "sha256": "x", "inputs": [{"shape": [-1, 3]}]}


def dispatcher(*workers: str, **settings) -> Dispatcher:
    """A Dispatcher with ``settings`` (batch-router keys, placement ones under
    ``placement``) and ``workers`` joined at t=0."""
    d = Dispatcher(parse(settings), MODEL)
    for address in workers:
        d.handle(WorkerJoined(0.0, {"address": address, "name": address, "sha256": "x"}))
    return d


def arrive(d: Dispatcher, now: float, rows: int = 1, priority: int = 0, timeout_s: float = 0.0) -> tuple[Request, list]:
    r = Request(rows, priority, now, item=f"item@{now}", timeout_s=timeout_s)
    return r, d.handle(Arrived(now, r))


def sent(actions: list, kind: type = Send) -> list[Batch]:
    return [a.batch for a in actions if isinstance(a, kind)]


def answered(actions: list) -> dict[Request, Answer]:
    return {a.request: a for a in actions if isinstance(a, Answer)}


def failed(actions: list) -> dict[Request, Exception]:
    return {a.request: a.error for a in actions if isinstance(a, Fail)}


def reply(d: Dispatcher, batch: Batch, now: float, service_s: float = 0.01, error: ItemError | None = None) -> list:
    results = [error or Tensors({}) for _ in batch.requests]
    timings = Timings(rows=0 if error else batch.rows, infer_ns=1_000, service_s=service_s)
    return d.handle(Replied(now, BatchReply(batch.id, batch.view.address, results, timings)))


def measured(d: Dispatcher, address: str, per_row: float, at: float) -> WorkerView:
    v = d.views[address]
    v.service.observe(1, per_row, now=at)
    return v


# -- batching and placement ------------------------------------------------------------


def test_a_lone_request_leaves_at_once_and_the_queue_grows_while_workers_are_full():
    d = dispatcher("A", window=1)
    r1, _ = arrive(d, 0.0)
    (first,) = sent(d.handle(Wake(0.0)))
    assert first.requests == [r1] and first.view is d.views["A"]
    rs = [arrive(d, 0.001)[0] for _ in range(3)]
    assert sent(d.handle(Wake(0.001))) == []  # A is at its window: they wait, together
    actions = reply(d, first, 0.02)
    assert answered(actions)[r1].worker == "A"
    (second,) = sent(actions)
    assert second.requests == rs  # one batch of three, sent as the slot freed


def test_the_ledger_is_the_only_count_of_work_in_flight():
    d = dispatcher("A", "B", window=2, placement={"policy": "least-loaded"})
    for i in range(3):
        arrive(d, 0.0)
        d.handle(Wake(0.0))
    assert sum(v.in_flight for v in d.views.values()) == len(d.batches) == 3
    batch = next(iter(d.batches.values()))
    actions = reply(d, batch, 0.01)
    assert Forget(batch.id) in actions and batch.id not in batch.view.flights
    assert sum(v.in_flight for v in d.views.values()) == len(d.batches) == 2


def test_refusals_say_why_at_once():
    d = dispatcher("A", max_queue_size=1, window=1)
    r, actions = arrive(d, 0.0, priority=9)
    assert isinstance(failed(actions)[r], ValueError)  # 400: no such priority level
    arrive(d, 0.0)
    r, actions = arrive(d, 0.0)
    assert isinstance(failed(actions)[r], Unavailable) and d.stats.rejected["queue_full"] == 1
    d.handle(Cancelled(0.0, r))  # its client goes away: the queue keeps what it holds
    assert len(d.queue) == 1
    d.handle(Closing(0.0))
    r, actions = arrive(d, 0.0)
    assert "shutting down" in str(failed(actions)[r]) and not d.ready


def test_a_request_that_would_wait_past_max_queue_wait_is_refused_at_the_door():
    """A worker measured at 0.1 s a row serves 10 rows a second: with 1 s allowed, about
    ten requests may wait; the next gets 503 at once, and once the queue drains, the
    door opens again. Unmeasured, nobody knows the wait: everything is admitted."""
    d = dispatcher("A", window=1, max_batch_size=4, max_queue_wait="1s")
    assert all(not failed(arrive(d, 0.0)[1]) for _ in range(30))  # no measurement yet
    d = dispatcher("A", window=1, max_batch_size=4, max_queue_wait="1s")
    measured(d, "A", per_row=0.1, at=0.0)
    outcomes = [failed(arrive(d, 0.0)[1]) for _ in range(20)]
    admitted = sum(1 for f in outcomes if not f)
    assert 9 <= admitted <= 11, admitted
    refused = [e for f in outcomes for e in f.values()]
    assert refused and all(isinstance(e, Unavailable) and "max-queue-wait" in str(e) for e in refused)
    assert d.stats.rejected["queue_full"] == len(refused)
    batches = sent(d.handle(Wake(0.0)))
    while batches:  # served, and the queue drains
        batches = sent(reply(d, batches[0], 0.1, service_s=0.4))
    assert not failed(arrive(d, 1.0)[1])


def test_a_request_that_times_out_in_the_queue_is_never_sent():
    d = dispatcher("A", window=1)
    arrive(d, 0.0)
    d.handle(Wake(0.0))  # A is busy from here on
    r, _ = arrive(d, 0.0, timeout_s=0.2)
    assert d.next_wakeup(0.0) == pytest.approx(0.2)
    actions = d.handle(Wake(0.2))
    assert isinstance(failed(actions)[r], DeadlineExceeded) and sent(actions) == []


def test_a_cancelled_request_is_dropped_from_the_queue():
    d = dispatcher("A", window=1)
    arrive(d, 0.0)
    d.handle(Wake(0.0))
    r, _ = arrive(d, 0.0)
    d.handle(Cancelled(0.01, r))
    assert len(d.queue) == 0 and r.item is None and d.stats.rejected["cancelled"] == 1


def test_dask_default_sends_unrestricted_batches_up_to_the_total_window():
    d = dispatcher("A", "B", window=1, placement={"policy": "dask-default"})
    for _ in range(3):
        arrive(d, 0.0)
        d.handle(Wake(0.0))
    assert [b.view for b in d.batches.values()] == [None, None]  # Dask picks; two slots in all
    assert len(d.queue) == 1


# -- replies, failures, workers coming and going ---------------------------------------


def test_a_worker_that_leaves_has_its_batches_queued_again():
    d = dispatcher("A", "B", window=1)
    r, _ = arrive(d, 0.0)
    (batch,) = sent(d.handle(Wake(0.0)))
    d.views["B"].window = 0  # B takes nothing new meanwhile
    actions = d.handle(WorkerLeft(0.1, batch.view.address))
    assert Requeue([r], f"worker {batch.view.address} left") in actions and len(d.queue) == 1


def test_a_task_that_died_without_a_reply_fails_its_requests():
    d = dispatcher("A")
    r, _ = arrive(d, 0.0)
    (batch,) = sent(d.handle(Wake(0.0)))
    actions = d.handle(Lost(0.5, batch.id, "error"))
    assert str(failed(actions)[r]) == "batch failed on A: error" and d.stats.durations["fail"][0] == 1


def test_a_batch_dask_would_not_take_is_answered_503():
    d = dispatcher("A")
    r, _ = arrive(d, 0.0)
    (batch,) = sent(d.handle(Wake(0.0)))
    actions = d.handle(NotSent(0.0, batch.id, "scheduler gone"))
    assert isinstance(failed(actions)[r], Unavailable) and d.sent == 0 and not d.batches


def test_shutdown_answers_whatever_is_left_503():
    d = dispatcher("A", window=1)
    r1, _ = arrive(d, 0.0)
    d.handle(Wake(0.0))
    r2, _ = arrive(d, 0.0)
    d.handle(Closing(1.0))
    errors = failed(d.handle(Abort(30.0)))
    assert set(errors) == {r1, r2} and all(isinstance(e, Unavailable) for e in errors.values())


def test_losing_the_scheduler_answers_everything_503_and_forgets_the_workers():
    d = dispatcher("A", window=1)
    d.handle(WorkerJoined(0.0, {"address": "A", "name": "A", "sha256": "x"}, version=7))
    r1, _ = arrive(d, 0.0)
    (batch,) = sent(d.handle(Wake(0.0)))
    r2, _ = arrive(d, 0.0)
    errors = failed(d.handle(SchedulerLost(1.0, "client connecting")))
    assert set(errors) == {r1, r2} and all(isinstance(e, Unavailable) and "scheduler" in str(e) for e in errors.values())
    assert d.views == {} and not d.ready and d.idle
    r3, actions = arrive(d, 2.0)  # refused at once while it is gone
    assert isinstance(failed(actions)[r3], Unavailable)
    assert answered(reply(d, batch, 2.5)) == {}  # the old worker's late reply answers nobody again
    # A new scheduler counts its worker events from zero: its first listing is applied.
    d.handle(WorkersListed(3.0, {"B": {"address": "B", "name": "B", "sha256": "x"}}, version=1))
    d.handle(SchedulerBack(3.0))
    assert set(d.views) == {"B"} and d.ready
    r4, _ = arrive(d, 3.0)
    assert [b.view.address for b in sent(d.handle(Wake(3.0)))] == ["B"]


def test_membership_ignores_other_models_and_lists_older_than_the_events_applied():
    d = dispatcher()
    d.handle(WorkerJoined(0.0, {"address": "A", "name": "A", "sha256": "x"}, version=3))
    d.handle(WorkerJoined(0.0, {"address": "Z", "name": "Z", "sha256": "another model"}, version=4))
    assert set(d.views) == {"A"}
    d.handle(WorkersListed(0.0, {}, version=2))  # taken before A joined: ignored
    assert set(d.views) == {"A"}
    d.handle(WorkersListed(0.0, {}, version=5))
    assert d.views == {}


def test_the_plugins_digest_brings_gpu_state():
    d = dispatcher("A")
    d.handle(MetricsDigest(0.0, {"A": {"gpu": {"utilization_gpu": 40}, "stats": {"service": {"8": 0.1}}}, "gone": {}}))
    assert d.views["A"].gpu == {"utilization_gpu": 40} and d.views["A"].service.estimate(8) == pytest.approx(0.1)


# -- the watchdog ----------------------------------------------------------------------


def test_a_stuck_worker_gets_no_new_batches_and_its_work_moves():
    d = dispatcher("A", "B", window=1, placement={"overdue-min": "1s", "hedge-budget": 0})
    r, _ = arrive(d, 0.0)
    (batch,) = sent(d.handle(Wake(0.0)))
    stuck = batch.view
    actions = d.handle(Tick(1.5))  # past overdue-min with nothing expected to take that long
    (again,) = sent(actions)
    assert not stuck.responsive and again.view is not stuck and again.requests == [r]
    assert answered(reply(d, again, 1.6))[r].worker == again.view.address
    assert answered(reply(d, batch, 2.0)) == {} and stuck.responsive  # late, and alive after all


def test_a_deadline_that_passes_in_flight_is_answered_504_at_once():
    d = dispatcher("A")
    r, _ = arrive(d, 0.0, timeout_s=0.3)
    (batch,) = sent(d.handle(Wake(0.0)))
    assert failed(d.handle(Tick(0.2))) == {}
    assert isinstance(failed(d.handle(Tick(0.3)))[r], DeadlineExceeded)
    assert answered(reply(d, batch, 0.4)) == {}  # its answer comes too late: nobody gets it


def hedged(**settings) -> tuple[Dispatcher, Request, Batch, Batch]:
    """One request on worker A, and its hedged copy on worker B."""
    placement = {"hedge-budget": 1.0, "hedge-min": 0, **settings.pop("placement", {})}
    d = dispatcher("A", "B", placement=placement, **settings)
    r, _ = arrive(d, 0.0, timeout_s=settings.get("timeout_s", 0.0))
    (first,) = sent(d.handle(Wake(0.0)))
    (copy,) = sent(d.handle(Tick(0.01)), Hedge)
    return d, r, first, copy


def test_a_slow_batch_is_hedged_to_the_other_worker_within_budget():
    d, r, first, copy = hedged()
    assert copy.requests == [r] and copy.view is not first.view and d.hedges == 1
    assert sent(d.handle(Tick(0.02))) == []  # never twice


def test_a_request_whose_cost_is_its_own_input_is_never_copied():
    """A large image is slow because of itself: a hedge or a probe would pay its decode
    again on another worker (and copy a bomb there). Only the others in its batch go."""
    d = dispatcher("A", "B", placement={"hedge-budget": 1.0, "hedge-min": 0})
    big, _ = arrive(d, 0.0)
    big.copyable = False
    small, _ = arrive(d, 0.0)
    d.handle(Wake(0.0))
    (copy,) = sent(d.handle(Tick(0.01)), Hedge)
    assert copy.requests == [small]
    d = fast_and_stale()
    r, _ = arrive(d, 60.0)
    r.copyable = False
    assert sent(d.handle(Wake(60.0)), Probe) == []


def test_a_hedge_dask_would_not_take_can_be_tried_again():
    d, r, first, copy = hedged()
    assert failed(d.handle(NotSent(0.01, copy.id, "scheduler gone"))) == {}  # the first try still runs
    assert not r.done and d.hedges == 0 and not first.hedged
    (again,) = sent(d.handle(Tick(0.02)), Hedge)
    assert again.requests == [r]


def test_no_hedge_beyond_the_budget():
    d = dispatcher("A", "B", placement={"hedge-budget": 0.5, "hedge-min": 0})
    arrive(d, 0.0)
    d.handle(Wake(0.0))
    assert sent(d.handle(Tick(0.01))) == []  # one copy for one batch would be 100 %


def test_a_worker_lost_under_a_hedged_request_does_not_queue_it_again():
    d, r, first, copy = hedged()
    d.views[copy.view.address].window = 0  # the copy's worker takes nothing new meanwhile
    d.handle(WorkerLeft(0.02, first.view.address))
    assert len(d.queue) == 0  # the copy still carries it
    assert answered(reply(d, copy, 0.03))[r].worker == copy.view.address
    d.handle(Wake(0.35))
    d.handle(Abort(0.4))
    assert d.stats.durations["success"][0] == 1 and d.stats.durations["fail"][0] == 0
    assert dict(d.stats.rejected) == {}


def test_when_both_copies_are_lost_the_request_is_queued_again():
    d, r, first, copy = hedged()
    for v in d.views.values():
        v.window = 0
    d.handle(WorkerLeft(0.02, first.view.address))
    d.handle(WorkerLeft(0.02, copy.view.address))
    assert len(d.queue) == 1 and not r.done
    assert isinstance(failed(d.handle(Abort(0.1)))[r], Unavailable) and d.stats.rejected["unavailable"] == 1


def test_a_failed_first_try_leaves_the_request_to_its_copy():
    d, r, first, copy = hedged()
    assert failed(d.handle(Lost(0.02, first.id, "error"))) == {}
    assert answered(reply(d, copy, 0.03))[r].worker == copy.view.address
    assert (d.stats.durations["success"][0], d.stats.durations["fail"][0]) == (1, 0)
    reply(d, first, 0.04)  # a late answer from the first try changes nothing
    assert d.stats.durations["success"][0] == 1 and d.stats.execution_count == 1


def test_a_failed_hedge_leaves_the_request_to_its_first_try():
    d, r, first, copy = hedged()
    assert answered(reply(d, copy, 0.02, error=ItemError("boom", 500))) == {}
    assert isinstance(answered(reply(d, first, 0.03))[r].result, Tensors)


# -- probing idle workers --------------------------------------------------------------


def test_only_idle_measured_workers_with_a_stale_curve_are_due():
    now = 100.0
    views = {a: WorkerView(a) for a in ("stale", "fresh", "new", "busy", "stuck", "probed")}
    for address, at in (("stale", 90.0), ("fresh", 99.5), ("busy", 90.0), ("stuck", 90.0), ("probed", 90.0)):
        views[address].service.observe(1, 0.4, now=at)
    views["busy"].flights["b"] = Flight(99.0, 0.4)
    views["stuck"].responsive = False
    views["probed"].probed_at = 99.0  # its probe failed and measured nothing: not again at once
    assert due_for_probe(list(views.values()), now, fresh_for=2.0) == [views["stale"]]


def fast_and_stale(**settings) -> Dispatcher:
    """A fast worker measured just now and a 4x slower one idle for a minute."""
    d = dispatcher("fast", "slow", **settings)
    measured(d, "fast", 0.1, at=60.0)
    measured(d, "slow", 0.4, at=0.0)
    return d


def one_request(d: Dispatcher, now: float = 60.0) -> tuple[Request, Batch, Batch]:
    r, _ = arrive(d, now)
    actions = d.handle(Wake(now))
    (first,), (probe,) = sent(actions, Send)[:1], sent(actions, Probe)
    return r, first, probe


def test_a_stale_idle_worker_gets_a_copy_and_the_request_waits_for_neither():
    d = fast_and_stale()
    r, first, probe = one_request(d)
    assert first.view.address == "fast" and probe.view.address == "slow" and probe.requests == [r]
    assert d.probes == 1 and d.sent == 1  # a probe is not a batch sent
    assert answered(reply(d, first, 60.1))[r].worker == "fast"
    assert answered(reply(d, probe, 60.5, service_s=0.4)) == {}  # answers nobody, but re-measures
    assert d.views["slow"].service.updated == 60.5 and d.views["slow"].batches == 1
    assert d.stats.durations["success"][0] == 1 and d.stats.execution_count == 1
    arrive(d, 60.6)
    assert sent(d.handle(Wake(60.6)), Probe) == []  # measured just now


def test_a_failing_probe_answers_nobody_and_is_not_repeated_at_once():
    d = fast_and_stale()
    r, first, probe = one_request(d)
    assert answered(reply(d, probe, 60.1, error=ItemError("boom", 500))) == {}  # the first try still runs
    assert isinstance(answered(reply(d, first, 60.2))[r].result, Tensors)
    arrive(d, 60.3)
    assert sent(d.handle(Wake(60.3)), Probe) == []  # as stale as before, but probed just now


def test_no_probe_once_shutting_down():
    d = fast_and_stale()
    arrive(d, 60.0)
    d.handle(Closing(60.0))
    assert sent(d.handle(Wake(60.0)), Probe) == []


def test_a_probed_worker_that_dies_leaves_the_request_to_its_first_batch():
    d = fast_and_stale()
    r, first, probe = one_request(d)
    d.handle(WorkerLeft(60.1, "slow"))
    assert len(d.queue) == 0 and not r.done
    assert answered(reply(d, first, 60.2))[r].worker == "fast"


def test_when_the_first_tries_worker_dies_the_request_is_queued_again_despite_a_probe():
    d = fast_and_stale()
    r, first, probe = one_request(d)
    d.views["slow"].window = d.views["fast"].window = 0  # the queue must not go straight back out
    d.handle(WorkerLeft(60.1, "fast"))
    assert len(d.queue) == 1  # a probe carries nobody: queued again at once
    assert answered(reply(d, probe, 60.5))[r].worker == "slow"  # the probe's answer still serves it
    assert len(d.queue) == 0  # and it need not go out again


def test_a_lost_probe_never_fails_a_request_that_is_queued_again():
    d = fast_and_stale()
    r, first, probe = one_request(d)
    d.views["slow"].window = d.views["fast"].window = 0
    d.handle(WorkerLeft(60.1, "fast"))
    assert failed(d.handle(Lost(60.2, probe.id, "error"))) == {} and not r.done and len(d.queue) == 1


@pytest.mark.parametrize("settings, probes", [({}, 1), ({"placement": {"policy": "round-robin"}}, 0),
                                              ({"placement": {"probe-after": "off"}}, 0)])  # fmt: skip
def test_only_gpu_aware_probes_and_off_means_never(settings, probes):
    d = fast_and_stale(**settings)
    arrive(d, 60.0)
    d.handle(Wake(60.0))
    assert d.probes == probes


def test_a_direct_batch_whose_connection_broke_goes_back_to_the_queue_unanswered():
    """Nothing says whether it ran, so its requests are neither failed nor lost: they
    leave again, on the next worker with room."""
    d = dispatcher("A", "B", window=1)
    r, _ = arrive(d, 0.0)
    (first,) = sent(d.handle(Wake(0.0)))
    actions = d.handle(Unreachable(0.1, first.id, "CommClosedError: Stream is closed"))
    assert not failed(actions) and [a.requests for a in actions if isinstance(a, Requeue)] == [[r]]
    assert Forget(first.id) in actions and first.id not in d.batches
    (again,) = sent(actions)
    assert again.requests == [r] and again.id != first.id
    assert answered(reply(d, again, 0.2))[r].worker == again.view.address
    assert d.handle(Unreachable(0.3, first.id, "late")) == []  # nothing left of it to act on


def test_a_worker_window_is_shared_with_other_front_ends_as_its_replies_report():
    """Two front ends, a window of 2: each may always fill its share (1); beyond it, what
    the worker's latest reply says the others leave free. Before any reply the others
    are presumed to fill their shares."""
    d = dispatcher("A", window=2, **{"max-window": 2, "http": {"frontends": 2}})
    view = d.views["A"]
    results, timings = [Tensors({})], Timings(rows=1, infer_ns=1_000, service_s=0.01)

    def replied(now: float, batch: Batch, load: int) -> list:
        return d.handle(Replied(now, BatchReply(batch.id, "A", results, timings, load=load)))

    arrive(d, 0.0)
    (b1,) = sent(d.handle(Wake(0.0)))
    arrive(d, 0.01)
    assert sent(d.handle(Wake(0.01))) == []  # its share is full; the other's is presumed taken
    (b2,) = sent(replied(0.02, b1, load=0))  # the other front end has nothing there
    arrive(d, 0.03)
    (b3,) = sent(d.handle(Wake(0.03)))  # so its share is free to use
    assert view.load == 2 and list(view.flights) == [b2.id, b3.id]
    assert sent(replied(0.04, b2, load=2)) == []  # b3, and one of the other's
    assert view.foreign == 1
    arrive(d, 0.05)
    assert sent(d.handle(Wake(0.05))) == []  # a full window between them
    (b4,) = sent(replied(0.06, b3, load=2))  # the other now has two: this one keeps its share
    assert view.foreign == 2 and list(view.flights) == [b4.id]
