"""Dynamic batching with Triton's semantics, as pure logic with time passed in.

The dispatcher asks three questions of a :class:`BatchQueue`: which requests expired
(answered 504, never sent), whether a batch should go now to a free worker, and which
requests form it. Nothing here does I/O, so tests drive it with a fake clock.

- Priority levels count from 1 (highest). Within a level, arrival order.
- A request queued longer than ``starvation_limit`` is served next whatever its level,
  so a stream of high-priority work cannot starve the rest forever.
- ``max_queue_delay`` (Triton's ``max_queue_delay_microseconds``): how long the head of
  the queue may wait for more rows while a worker is free. 0 dispatches at once.
- The queue is bounded in requests; a full queue refuses at once (503).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

NEW, QUEUED, TAKEN, CANCELLED, EXPIRED = "new", "queued", "taken", "cancelled", "expired"


class QueueFull(Exception):
    """The bounded queue has no room; the caller answers 503 with Retry-After."""


@dataclass(eq=False)
class Pending:
    """One request waiting for a batch: what the queue orders it by."""

    rows: int
    priority: int
    arrival: float
    deadline: float | None = None
    state: str = NEW  # QUEUED once pushed
    seq: int = field(default=0, repr=False)


def resolve_priority(requested: int, levels: int, default_level: int) -> int:
    """Triton's rule: 0 means the default level; 1..levels otherwise."""
    if requested == 0:
        return default_level
    if not 1 <= requested <= levels:
        raise ValueError(f"priority {requested} is outside 1..{levels} (0 = default)")
    return requested


def resolve_timeout(requested_s: float, default_s: float) -> float | None:
    """Seconds a request may wait in the queue, or None for no limit.

    A request may shorten the default timeout but never lengthen it (Triton's
    ``allow_timeout_override``); with no default, any requested timeout applies.
    """
    if requested_s > 0 and default_s > 0:
        return min(requested_s, default_s)
    return (requested_s or default_s) or None


class BatchQueue:
    def __init__(
        self,
        max_batch_size: int,
        max_queue_size: int = 0,
        priority_levels: int = 1,
        max_queue_delay: float = 0.0,
        starvation_limit: float = 0.0,
    ) -> None:
        if max_batch_size < 1 or priority_levels < 1:
            raise ValueError("max_batch_size and priority_levels must be >= 1")
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.max_queue_delay = max_queue_delay
        self.starvation_limit = starvation_limit
        self._levels: list[deque[Pending]] = [deque() for _ in range(priority_levels)]
        self._deadlines: list[tuple[float, int, Pending]] = []
        self._seq = itertools.count()
        self.count = 0  # live (queued) requests
        self.rows = 0  # live rows
        self.depths = [0] * priority_levels  # live requests per level (the deques hold dead ones too)

    def __len__(self) -> int:
        return self.count

    def push(self, item: Pending) -> None:
        if self.max_queue_size and self.count >= self.max_queue_size:
            raise QueueFull(f"exceeds maximum queue size {self.max_queue_size}")
        if item.rows > self.max_batch_size:
            raise ValueError(f"{item.rows} rows exceed max_batch_size {self.max_batch_size}")
        item.seq = next(self._seq)
        self._admit(item, front=False)

    def cancel(self, item: Pending) -> bool:
        """Drop a queued request (its client went away). Removed lazily."""
        if item.state != QUEUED:
            return False
        self._retire(item, CANCELLED)
        return True

    def expire(self, now: float) -> list[Pending]:
        """Remove and return the requests whose deadline has passed."""
        expired = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, item = heapq.heappop(self._deadlines)
            if item.state == QUEUED:
                self._retire(item, EXPIRED)
                expired.append(item)
        return expired

    def ready(self, now: float) -> bool:
        """Should a batch go to a free worker now?"""
        if self.count == 0:
            return False
        if self.rows >= self.max_batch_size or self.max_queue_delay <= 0:
            return True
        oldest = self._oldest()
        return oldest is not None and now >= oldest.arrival + self.max_queue_delay

    def next_wakeup(self, now: float) -> float | None:
        """The earliest time something changes by itself: a deadline, or a delay ending."""
        times = []
        while self._deadlines and self._deadlines[0][2].state != QUEUED:
            heapq.heappop(self._deadlines)
        if self._deadlines:
            times.append(self._deadlines[0][0])
        if self.count and not self.ready(now):
            oldest = self._oldest()
            if oldest is not None:
                times.append(oldest.arrival + self.max_queue_delay)
        return min(times) if times else None

    def take(self, now: float, max_rows: int | None = None, skip: int = 0) -> list[Pending]:
        """Form one batch of at most ``max_batch_size`` rows, in serving order.

        ``max_rows`` caps it lower (the dispatcher's fair share per free worker slot);
        the first request always fits, so a batch is never empty while work waits.
        ``skip`` leaves about that many rows at the head, in place, for a worker that
        will finish them sooner; the batch comes from behind them.
        """
        held: list[Pending] = []
        while skip > 0 and (part := self._take(now, skip)):
            held += part
            skip -= sum(p.rows for p in part)
        batch = self._take(now, max_rows)
        for item in reversed(held):  # back where they were; their deadlines never left
            item.state = QUEUED
            self._levels[item.priority - 1].appendleft(item)
            self._count(item, +1)
        return batch

    def _take(self, now: float, max_rows: int | None) -> list[Pending]:
        limit = min(self.max_batch_size, max_rows or self.max_batch_size)
        batch: list[Pending] = []
        rows = 0
        while True:
            item = self._head(now)
            if item is None or rows + item.rows > (limit if batch else self.max_batch_size):
                break
            self._levels[item.priority - 1].popleft()
            self._retire(item, TAKEN)
            batch.append(item)
            rows += item.rows
        return batch

    def requeue(self, items: list[Pending]) -> None:
        """Put back requests whose worker died, ahead of their level, in their old order.

        They were admitted once, so the size bound does not apply again.
        """
        for item in reversed(items):
            self._admit(item, front=True)

    def drain(self) -> list[Pending]:
        """Remove and return everything still queued (shutdown)."""
        items = [i for level in self._levels for i in level if i.state == QUEUED]
        for item in items:
            self._retire(item, CANCELLED)
        return items

    # -- internals -----------------------------------------------------------------

    def _admit(self, item: Pending, front: bool) -> None:
        item.state = QUEUED
        level = self._levels[item.priority - 1]
        level.appendleft(item) if front else level.append(item)
        if item.deadline is not None:
            heapq.heappush(self._deadlines, (item.deadline, item.seq, item))
        self._count(item, +1)

    def _retire(self, item: Pending, state: str) -> None:
        item.state = state
        self._count(item, -1)

    def _count(self, item: Pending, sign: int) -> None:
        self.count += sign
        self.rows += sign * item.rows
        self.depths[item.priority - 1] += sign

    def _clean_heads(self) -> None:
        for level in self._levels:
            while level and level[0].state != QUEUED:
                level.popleft()

    def _oldest(self) -> Pending | None:
        self._clean_heads()
        heads = [level[0] for level in self._levels if level]
        return min(heads, key=lambda i: i.seq) if heads else None

    def _head(self, now: float) -> Pending | None:
        """The next request to serve: a starving one first, else by priority."""
        self._clean_heads()
        if self.starvation_limit > 0:
            oldest = self._oldest()
            if oldest is not None and now >= oldest.arrival + self.starvation_limit:
                return oldest
        for level in self._levels:
            if level:
                return level[0]
        return None
