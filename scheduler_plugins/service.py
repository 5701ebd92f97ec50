"""How long a worker takes for a batch of n rows, learned from the batches it ran.

GPUs are much faster per row at large batches and CPUs are not, so one rows/s figure
would misplace either; the curve keeps one estimate per power-of-two batch size and
interpolates between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def bucket(rows: int) -> int:
    """The power of two at or above ``rows``: batches of 5..8 rows share one estimate."""
    return 1 << max(0, int(rows) - 1).bit_length()


@dataclass
class ServiceCurve:
    """EWMA seconds per batch, per batch-size bucket."""

    alpha: float = 0.3
    points: dict[int, float] = field(default_factory=dict)

    def observe(self, rows: int, seconds: float) -> None:
        if rows <= 0 or seconds < 0:
            return
        b = bucket(rows)
        # Scale to the bucket's size so a 5-row batch informs the 8-row estimate.
        scaled = seconds * b / rows if rows < b else seconds
        old = self.points.get(b)
        if old is None or old <= 0:
            self.points[b] = scaled
            return
        # A device that got slower (throttling, another tenant) is slower at every batch
        # size: move the sizes not run lately by the same relative step.
        step = 1 + self.alpha * (scaled / old - 1)
        for k in self.points:
            self.points[k] *= step

    def merge(self, reported: dict) -> None:
        """Adopt a worker-reported curve (``{"8": seconds}``) for sizes not yet seen here."""
        for key, value in (reported or {}).items():
            try:
                b, v = int(key), float(value)
            except (TypeError, ValueError):
                continue
            self.points.setdefault(b, v)

    @property
    def known(self) -> bool:
        return bool(self.points)

    def estimate(self, rows: int) -> float | None:
        """Seconds for a batch of ``rows``; None when nothing was measured yet.

        Between measured sizes: linear. Above the largest: the largest's per-row time
        (pessimistic on a GPU, right on a CPU). Below the smallest: the smallest's time
        (a smaller batch is rarely slower).
        """
        if not self.points:
            return None
        sizes = sorted(self.points)
        if rows <= sizes[0]:
            return self.points[sizes[0]]
        if rows >= sizes[-1]:
            return self.points[sizes[-1]] * rows / sizes[-1]
        for lo, hi in zip(sizes, sizes[1:]):
            if lo <= rows <= hi:
                f = (rows - lo) / (hi - lo)
                return self.points[lo] + f * (self.points[hi] - self.points[lo])
        return None  # unreachable

    def rows_per_second(self, rows: int) -> float | None:
        t = self.estimate(rows)
        return rows / t if t else None

    def as_dict(self) -> dict[str, float]:
        return {str(b): round(t, 6) for b, t in sorted(self.points.items())}
