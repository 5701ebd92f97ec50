"""How long a worker takes for a batch of n rows, learned from the batches it ran.

GPUs are much faster per row at large batches and CPUs are not, so one rows/s figure
would misplace either; the curve keeps one estimate per bucket (``core.buckets``: the
sizes batches are padded to; powers of two unless a cluster sets its own) and reads a
batch's time at its bucket, since a padded batch costs what a full one does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.buckets import bucket_for


def bucket(rows: int, buckets: tuple[int, ...] = ()) -> int:
    """The bucket a batch of ``rows`` runs at: the power of two at or above it when no
    bucket set is known, so batches of 5..8 rows share one estimate."""
    return bucket_for(rows, buckets) if buckets else 1 << max(0, int(rows) - 1).bit_length()


@dataclass
class ServiceCurve:
    """EWMA seconds per batch, per batch-size bucket, trusted less as it ages.

    A worker that gets no batches is never re-measured, so a pessimistic estimate
    (taken under contention, or while it was throttled) would keep it idle for good.
    Past ``fresh_for`` seconds without a batch the estimate shrinks, halving its excess
    over ``floor`` every ``half_life``, until the worker looks worth a batch again; that
    batch's measurement then replaces the stale figure rather than averaging with it.
    The floor allows 4x optimism, enough to undo an estimate taken on a contended host;
    optimism only earns a probe (``GpuAware`` sizes batches by the measured curve).
    """

    alpha: float = 0.3
    fresh_for: float = 2.0
    half_life: float = 3.0
    floor: float = 0.25
    points: dict[int, float] = field(default_factory=dict)
    observed: set[int] = field(default_factory=set)  # buckets measured here, not adopted
    updated: float | None = None  # clock of the last observation
    buckets: tuple[int, ...] = ()  # the cluster's batch shapes, once known

    def confidence(self, now: float | None) -> float:
        if now is None or self.updated is None:
            return 1.0
        age = now - self.updated - self.fresh_for
        return 1.0 if age <= 0 else 0.5 ** (age / self.half_life)

    def observe(self, rows: int, seconds: float, now: float | None = None) -> None:
        if rows <= 0 or seconds < 0:
            return
        b = bucket(rows, self.buckets)
        self.observed.add(b)
        # Scale to the bucket's size so a 5-row batch informs the 8-row estimate (and a
        # batch run as several of the largest bucket, one of them).
        scaled = seconds * b / rows if rows != b else seconds
        alpha = 1 - (1 - self.alpha) * self.confidence(now)
        if now is not None:
            self.updated = now
        old = self.points.get(b)
        if old is None or old <= 0:
            self.points[b] = scaled
            return
        # A device that got slower (throttling, another tenant) is slower at every batch
        # size: move the sizes not run lately by the same relative step.
        step = 1 + alpha * (scaled / old - 1)
        for k in self.points:
            self.points[k] *= step

    def adopt(self, reported: dict) -> None:
        """Take a worker-reported curve (``{"8": seconds}``) for every size not measured
        here: a view fed only by reports (the scheduler plugin's) follows them, one that
        also sees replies (the front end's) keeps its own, fresher, measurements."""
        for key, value in (reported or {}).items():
            try:
                b, v = int(key), float(value)
            except (TypeError, ValueError):
                continue
            if b not in self.observed and v >= 0:
                self.points[b] = v

    @property
    def known(self) -> bool:
        return bool(self.points)

    def estimate(self, rows: int, now: float | None = None) -> float | None:
        """Seconds for a batch of ``rows``; None when nothing was measured yet.

        Between measured sizes: linear. Outside them: the nearest size's per-row time.
        Below the smallest that is optimistic on a GPU (fixed costs dominate small
        batches) and right on a CPU; optimism is what corrects itself, since a worker
        that looks fast gets work and is measured, while one that looks too slow never
        gets the batch that would prove otherwise.
        """
        if not self.points:
            return None
        if self.buckets:  # padded up: it costs its bucket; past the largest, several
            top = self.buckets[-1]
            if rows > top:  # run as several of the largest bucket and one for the rest
                rest = rows % top
                tail = (self.estimate(rest, now) or 0.0) if rest else 0.0
                return (rows // top) * (self.estimate(top, now) or 0.0) + tail
            rows = bucket_for(rows, self.buckets)
        trust = self.floor + (1 - self.floor) * self.confidence(now)
        sizes = sorted(self.points)
        if rows <= sizes[0]:
            return trust * self.points[sizes[0]] * rows / sizes[0]
        if rows >= sizes[-1]:
            return trust * self.points[sizes[-1]] * rows / sizes[-1]
        for lo, hi in zip(sizes, sizes[1:]):
            if lo <= rows <= hi:
                f = (rows - lo) / (hi - lo)
                return trust * (self.points[lo] + f * (self.points[hi] - self.points[lo]))
        return None  # unreachable

    def as_dict(self) -> dict[str, float]:
        return {str(b): round(t, 6) for b, t in sorted(self.points.items())}
