"""How the front end keeps its view of each worker current: from every reply (service
time, liveness, errors) and from the scheduler plugin's periodic digest of heartbeat
metrics (GPU state, the worker's own counters)."""

from __future__ import annotations

import logging
import math

from scheduler_plugins.policies import Tuning, WorkerView, weights

logger = logging.getLogger("router_api.dispatch")

LINK_HORIZON = 10.0  # seconds a low overhead sample stands for the path (BBR's min-RTT window)


def learn_from_reply(
    view: WorkerView, rows: int, timings: dict, failed: bool, round_trip: float, alone: bool, now: float
) -> None:
    """A reply proves the worker alive and says how long the batch really took; the
    rest of a round trip with nothing queued ahead of it is per-batch overhead."""
    view.responsive = True
    view.batches += 1
    view.rows += rows
    if failed:
        view.errors.append(now)
    service = timings.get("service_s")
    if service is None and "started" in timings:
        service = timings["finished"] - timings["started"]
    if service is None or not timings.get("rows"):
        return
    view.service.observe(timings["rows"], service, now)
    if alone:
        extra = max(0.0, round_trip - service)
        view.overhead = extra if not view.overhead else view.overhead + 0.3 * (extra - view.overhead)
        observe_link(view, extra, now)


def observe_link(view: WorkerView, extra: float, now: float) -> None:
    """The path's own cost is the least overhead seen lately. The mean also holds time
    spent queued in busy processes, and sizing windows or compressing by it feeds back:
    on a saturated 2-core host it read 38 ms for loopback workers, grew their windows to
    the cap and zlib-sampled every tensor request. The newest sample always counts, so
    a path that got slower shows one horizon after it is next measured; under steady
    load a worker is seldom alone, and its link keeps the last clean measurement (at
    most the last 64) until then."""
    samples = view.link_samples
    samples.append((now, extra))
    while samples[0][0] < now - LINK_HORIZON:
        samples.popleft()
    view.link = min(x for _, x in samples)


def adaptive_window(view: WorkerView, least: int, most: int, rows: int) -> int:
    """Batches to keep in flight so the worker never idles waiting for the next one:
    one running, as many as the path's round trip lasts (shared/research/dask-latency.md
    §6: ~9 at 150 ms of tunnel and 20 ms batches), and one spare for jitter when the
    trip outlasts a batch. On loopback that is ``least``."""
    service = view.service.estimate(max(1, rows))
    if not service or view.link <= 0:
        return least
    spare = 1 if view.link >= service else 0
    return max(least, min(most, 1 + math.ceil(view.link / service) + spare))


def apply_state(views: dict[str, WorkerView], msg: dict) -> None:
    """The plugin's digest: ``{"workers": {address: ws.metrics["batch-router"]}}``."""
    for address, state in msg.get("workers", {}).items():
        view = views.get(address)
        if view is None:
            continue
        view.gpu = state.get("gpu")
        view.simulated = bool(state.get("simulated"))
        view.metrics_error = state.get("error") or "; ".join(state.get("errors") or ()) or None
        stats = state.get("stats") or {}
        if not view.responsive and stats.get("batches", 0) > view.reported.get("batches", 0):
            view.responsive = True  # it finished something since: not stuck after all
            logger.info("worker %s answers again", address)
        view.reported = stats
        view.service.merge(stats.get("service") or {})


def current_weights(views: list[WorkerView], max_batch: int, now: float, tuning: Tuning) -> dict[str, float]:
    """Each worker's share of capacity at the mean batch size served so far (display)."""
    served = sum(v.rows for v in views) / max(1, sum(v.batches for v in views))
    return weights(views, max(1, min(max_batch, round(served))), now, tuning)
