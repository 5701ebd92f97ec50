"""The batch queue's rules, driven with a fake clock: no Dask, no I/O."""

from dataclasses import dataclass
from typing import Any

import pytest

from router_api.batching import (
    CANCELLED,
    EXPIRED,
    TAKEN,
    BatchQueue,
    Pending,
    QueueFull,
    resolve_priority,
    resolve_timeout,
)


@dataclass(eq=False)
class Named(Pending):
    name: Any = None


def req(rows=1, priority=1, arrival=0.0, deadline=None, name=None):
    return Named(rows=rows, priority=priority, arrival=arrival, deadline=deadline, name=name)


def names(batch):
    return [p.name for p in batch]


def test_lone_request_is_ready_at_once_with_zero_delay():
    q = BatchQueue(max_batch_size=32)
    q.push(req(name="a"))
    assert q.ready(now=0.0)
    assert names(q.take(now=0.0)) == ["a"]
    assert len(q) == 0 and q.rows == 0


def test_queue_grows_into_one_batch_up_to_max_rows():
    q = BatchQueue(max_batch_size=4)
    for i in range(6):
        q.push(req(name=i))
    assert names(q.take(0.0)) == [0, 1, 2, 3]
    assert names(q.take(0.0)) == [4, 5]


def test_multi_row_request_that_does_not_fit_waits_for_the_next_batch():
    q = BatchQueue(max_batch_size=4)
    q.push(req(rows=3, name="three"))
    q.push(req(rows=2, name="two"))
    assert names(q.take(0.0)) == ["three"]
    assert names(q.take(0.0)) == ["two"]


def test_request_larger_than_max_batch_is_refused():
    q = BatchQueue(max_batch_size=4)
    with pytest.raises(ValueError, match="exceed max_batch_size"):
        q.push(req(rows=5))


def test_max_queue_delay_holds_a_partial_batch_until_it_expires():
    q = BatchQueue(max_batch_size=4, max_queue_delay=0.005)
    q.push(req(arrival=1.0))
    assert not q.ready(now=1.001)
    assert q.next_wakeup(now=1.001) == pytest.approx(1.005)
    assert q.ready(now=1.005)


def test_max_queue_delay_does_not_hold_a_full_batch():
    q = BatchQueue(max_batch_size=2, max_queue_delay=10.0)
    q.push(req(arrival=0.0))
    q.push(req(arrival=0.0))
    assert q.ready(now=0.0)


def test_higher_priority_is_served_first_then_arrival_order():
    q = BatchQueue(max_batch_size=2, priority_levels=3)
    q.push(req(priority=3, name="low"))
    q.push(req(priority=2, name="mid-1"))
    q.push(req(priority=1, name="high"))
    q.push(req(priority=2, name="mid-2"))
    assert names(q.take(0.0)) == ["high", "mid-1"]
    assert names(q.take(0.0)) == ["mid-2", "low"]


def test_starvation_limit_serves_an_old_low_priority_request_next():
    q = BatchQueue(max_batch_size=1, priority_levels=2, starvation_limit=1.0)
    q.push(req(priority=2, arrival=0.0, name="old-low"))
    q.push(req(priority=1, arrival=0.5, name="new-high"))
    assert names(q.take(now=0.9)) == ["new-high"]  # not starving yet
    q.push(req(priority=1, arrival=0.95, name="newer-high"))
    assert names(q.take(now=1.0)) == ["old-low"]  # waited the limit: goes first


def test_full_queue_refuses_at_once():
    q = BatchQueue(max_batch_size=8, max_queue_size=2)
    q.push(req())
    q.push(req())
    with pytest.raises(QueueFull, match="maximum queue size 2"):
        q.push(req())


def test_expired_requests_are_removed_and_never_batched():
    q = BatchQueue(max_batch_size=8)
    a, b, c = req(deadline=1.0, name="a"), req(deadline=3.0, name="b"), req(name="c")
    for p in (a, b, c):
        q.push(p)
    assert q.next_wakeup(now=0.0) == 1.0
    assert names(q.expire(now=2.0)) == ["a"]
    assert a.state == EXPIRED
    assert names(q.take(2.0)) == ["b", "c"]
    assert q.expire(now=10.0) == []  # b was taken: it does not expire later


def test_a_request_the_queue_refused_cannot_be_cancelled_out_of_it():
    q = BatchQueue(max_batch_size=4, max_queue_size=1)
    q.push(req(name="in"))
    refused = req(name="refused")
    with pytest.raises(QueueFull):
        q.push(refused)
    assert not q.cancel(refused) and len(q) == 1 and q.rows == 1


def test_cancelled_request_is_dropped_from_its_batch():
    q = BatchQueue(max_batch_size=8)
    a, b = req(name="a"), req(name="b")
    q.push(a)
    q.push(b)
    assert q.cancel(a)
    assert a.state == CANCELLED and len(q) == 1
    assert names(q.take(0.0)) == ["b"]
    assert not q.cancel(b)  # already taken: too late to cancel
    assert b.state == TAKEN


def test_requeued_requests_go_back_ahead_of_newer_ones_in_their_order():
    q = BatchQueue(max_batch_size=2, max_queue_size=2)
    q.push(req(name="a"))
    q.push(req(name="b"))
    lost = q.take(0.0)
    q.push(req(name="c"))
    q.push(req(name="d"))
    q.requeue(lost)  # admitted before: the size bound does not apply again
    assert len(q) == 4
    assert names(q.take(0.0)) == ["a", "b"]
    assert names(q.take(0.0)) == ["c", "d"]


def test_drain_returns_everything_still_queued():
    q = BatchQueue(max_batch_size=8)
    for i in range(3):
        q.push(req(name=i))
    q.cancel(q._levels[0][1])
    assert names(q.drain()) == [0, 2]
    assert len(q) == 0


@pytest.mark.parametrize("requested, expected", [(0, 2), (1, 1), (3, 3)])
def test_priority_zero_means_the_default_level(requested, expected):
    assert resolve_priority(requested, levels=3, default_level=2) == expected


def test_priority_outside_the_levels_is_an_error():
    with pytest.raises(ValueError, match="outside 1..3"):
        resolve_priority(4, levels=3, default_level=2)


@pytest.mark.parametrize(
    "requested, default, expected",
    [(0, 0, None), (0.5, 0, 0.5), (0, 2.0, 2.0), (0.5, 2.0, 0.5), (5.0, 2.0, 2.0)],
)
def test_a_request_may_shorten_but_not_lengthen_the_default_timeout(requested, default, expected):
    assert resolve_timeout(requested, default) == expected


def test_take_can_be_capped_to_share_work_but_never_returns_nothing():
    q = BatchQueue(max_batch_size=32)
    for i in range(16):
        q.push(req(name=i))
    assert names(q.take(0.0, max_rows=4)) == [0, 1, 2, 3]
    q2 = BatchQueue(max_batch_size=32)
    q2.push(req(rows=6, name="big"))
    q2.push(req(name="small"))
    assert names(q2.take(0.0, max_rows=2)) == ["big"]  # over the share, still served


def test_take_can_leave_the_head_for_a_faster_worker():
    """A slow worker's batch comes from behind the rows a faster one will finish first;
    those stay at the head, in order, and still expire on time."""
    q = BatchQueue(max_batch_size=8, priority_levels=2)
    a, b = req(name="a", deadline=5.0), req(name="b", priority=2)
    c, d = req(name="c", priority=2), req(name="d", priority=2)
    for p in (b, a, c, d):
        q.push(p)
    assert names(q.take(0.0, max_rows=1, skip=2)) == ["c"]  # serving order: a, b, c, d
    assert len(q) == 3 and q.rows == 3
    assert names(q.expire(now=6.0)) == ["a"]
    assert names(q.take(6.0)) == ["b", "d"]


def test_skipping_everything_takes_nothing():
    q = BatchQueue(max_batch_size=8)
    q.push(req(name="a"))
    assert q.take(0.0, skip=1) == []
    assert names(q.take(0.0)) == ["a"]


def test_depth_per_priority_counts_live_requests_only():
    """The dashboard's queue depth: cancelled, expired and taken requests leave their
    level at once, though the queue drops them from its deques lazily."""
    q = BatchQueue(max_batch_size=8, priority_levels=3)
    a, b, c, d = req(name="a"), req(name="b", priority=2, deadline=1.0), req(name="c", priority=3), req(name="d", priority=3)
    for p in (a, b, c, d):
        q.push(p)
    assert q.depths == [1, 1, 2]
    q.cancel(c)
    q.expire(now=2.0)
    assert q.depths == [1, 0, 1]
    taken = q.take(2.0, max_rows=1, skip=1)  # d, from behind a
    assert names(taken) == ["d"] and q.depths == [1, 0, 0]
    q.requeue(taken)
    assert q.depths == [1, 0, 1] and q.depths == [sum(1 for p in (a, d) if p.priority == i + 1) for i in range(3)]
