"""What placement knows about one worker, and how that knowledge stays current: from
every reply (service time, liveness, errors, the path's overhead) and from the
scheduler plugin's digest of heartbeat metrics (GPU state, the worker's own counters).

The front end and the scheduler plugin keep views by the same rules; the front end
also learns from replies, which the plugin never sees.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field

from core.service_curve import ServiceCurve

logger = logging.getLogger("core.worker_view")

LINK_HORIZON = 10.0  # seconds a low overhead sample stands for the path (BBR's min-RTT window)


@dataclass
class Flight:
    """One batch on a worker: when it left, how long it should take, how many rows."""

    sent_at: float
    expected: float
    rows: int = 1


@dataclass(eq=False)
class WorkerView:
    """Everything placement knows about one worker: live GPU sample, measured service
    times, and what is in flight on it right now (``flights``, the only record of it)."""

    address: str
    name: str = ""
    window: int = 2
    info: dict = field(default_factory=dict)  # startup information (device, providers...)
    flights: dict[str, Flight] = field(default_factory=dict)  # batch id -> flight
    batches: int = 0
    rows: int = 0
    service: ServiceCurve = field(default_factory=ServiceCurve)
    overhead: float = 0.0  # EWMA seconds a batch spends outside compute: hops, transfer
    link: float = 0.0  # least such overhead seen lately: the path itself, without queues
    link_samples: deque = field(default_factory=lambda: deque(maxlen=64))  # (time, seconds)
    gpu: dict | None = None  # latest metrics sample, None without a GPU
    simulated: bool = False
    metrics_error: str | None = None
    reported: dict = field(default_factory=dict)  # the worker's own stats snapshot
    errors: deque = field(default_factory=lambda: deque(maxlen=64))  # times of failed batches
    responsive: bool = True
    weight: float = 0.0  # share of capacity, for display; set by ``placement.weights``
    probed_at: float = float("-inf")  # clock of the last probe copy sent to it
    # Front ends sharing its window (http.frontends), and the batches the others have on
    # it as its latest reply said (None: no reply yet; each is assumed to fill its share).
    frontends: int = 1
    foreign: int | None = None
    # Whether its replies' load counts every batch it holds: true for batches sent to it
    # directly; Dask tasks queued on it are invisible until they start.
    reports_load: bool = True

    @property
    def in_flight(self) -> int:
        return len(self.flights)

    @property
    def rows_in_flight(self) -> int:
        return sum(f.rows for f in self.flights.values())

    @property
    def share(self) -> int:
        """This front end's part of the window, which it may always fill."""
        return max(1, -(-self.window // self.frontends))

    @property
    def load(self) -> int:
        """Batches on it from every front end, as far as this one knows."""
        others = self.foreign if self.foreign is not None else (self.frontends - 1) * self.share
        return len(self.flights) + others

    @property
    def has_room(self) -> bool:
        """Room in its window, shared with the other front ends: this one's share always,
        and beyond it what the others leave free by the worker's latest figure. (A share
        is never blocked by a figure that could be stale: replies are the only news.)"""
        own = len(self.flights)
        if not self.reports_load:  # its figure would undercount: this front end's share only
            return own < self.share
        return own < self.window and (own < self.share or self.load < self.window)

    def remaining(self, now: float) -> float:
        """Expected seconds until the batches already sent to it are done: a worker runs
        its batches one after another, the oldest since about when it was sent. Work
        that overran its estimate is guessed to need as long again as it overran: a
        stalled worker looks busier by the second, never free."""
        if not self.flights:
            return 0.0
        first = min(f.sent_at for f in self.flights.values())
        left = sum(f.expected for f in self.flights.values()) - (now - first)
        return left if left >= 0 else -left


def learn_from_reply(
    view: WorkerView, sent: int, ran: int, service_s: float | None, failed: bool, round_trip: float, alone: bool, now: float,
    padded: int = 0,
) -> None:
    """A reply proves the worker alive and says how long the batch (``sent`` rows, of
    which ``ran`` decoded and ran beside ``padded`` rows of padding) really took; the
    rest of a round trip with nothing queued ahead of it is per-batch overhead."""
    view.responsive = True
    view.batches += 1
    view.rows += sent
    if failed:
        view.errors.append(now)
    if service_s is None or not ran:
        return
    view.service.observe(ran + padded, service_s, now)
    if alone:
        extra = max(0.0, round_trip - service_s)
        view.overhead = extra if not view.overhead else view.overhead + 0.3 * (extra - view.overhead)
        observe_link(view, extra, now)


def observe_link(view: WorkerView, extra: float, now: float) -> None:
    """The path's own cost is the least overhead seen lately. The mean also holds time
    spent queued in busy processes, and sizing windows or compressing by it feeds back
    (on a saturated host loopback workers would look far). The newest sample always
    counts, so a path that got slower shows one horizon after it is next measured;
    under steady load a worker is seldom alone, and its link keeps the last clean
    measurement until then."""
    samples = view.link_samples
    samples.append((now, extra))
    while samples[0][0] < now - LINK_HORIZON:
        samples.popleft()
    view.link = min(x for _, x in samples)


def adaptive_window(view: WorkerView, least: int, most: int, rows: int) -> int:
    """Batches to keep in flight so the worker never idles waiting for the next one:
    one running, as many as the path's round trip lasts (about 9 for 150 ms of tunnel
    and 20 ms batches), and one spare for jitter when the trip outlasts a batch. On
    loopback that is ``least``."""
    service = view.service.estimate(max(1, rows))
    if not service or view.link <= 0:
        return least
    spare = 1 if view.link >= service else 0
    return max(least, min(most, 1 + math.ceil(view.link / service) + spare))


def apply_metrics(view: WorkerView, state: dict) -> None:
    """One worker's heartbeat metrics (``ws.metrics["batch-router"]``, as the plugin's
    digest carries them): GPU state, errors, and the worker's own service curve for the
    sizes this view has not measured itself."""
    view.gpu = state.get("gpu")
    view.simulated = bool(state.get("simulated"))
    view.metrics_error = state.get("error") or "; ".join(state.get("errors") or ()) or None
    stats = state.get("stats") or {}
    if not view.responsive and stats.get("batches", 0) > view.reported.get("batches", 0):
        view.responsive = True  # it finished something since: not stuck after all
        logger.info("worker %s answers again", view.address)
    view.reported = stats
    view.service.adopt(stats.get("service") or {})
