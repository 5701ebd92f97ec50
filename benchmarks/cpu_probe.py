"""Who else used the CPU during a window, so that unfair rounds can be spotted.

On a shared machine a neighbour's load can slow one window of a round and not the other,
which skews that round's ratio. CpuProbe samples system-wide and per-process CPU times
(with psutil, which is optional: without it every figure is None) so that each window
reports the cores kept busy by processes this run did not start, plus hypervisor steal,
and what the idle router cost while a baseline was being measured.
"""

from __future__ import annotations

import time
from typing import Optional


class CpuProbe:
    """Cores kept busy, during a window, by processes that are not ours (this one and its
    descendants: router, workers, raw_ort, bare server) or stolen by the hypervisor. On a
    shared machine a round where this differs between its windows was not a fair race."""

    def __init__(self) -> None:
        try:
            import psutil
        except ImportError:  # figures are then None
            psutil = None
        self.ps = psutil
        self.me = psutil.Process() if psutil else None

    def sample(self) -> Optional[tuple]:
        if self.ps is None:
            return None
        t = self.ps.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        ours: dict[int, float] = {}
        for proc in [self.me] + self.me.children(recursive=True):
            try:
                c = proc.cpu_times()
                ours[proc.pid] = c.user + c.system
            except (self.ps.NoSuchProcess, self.ps.AccessDenied, self.ps.ZombieProcess):
                pass
        return time.monotonic(), busy, getattr(t, "steal", 0.0), ours

    @staticmethod
    def others(a: Optional[tuple], b: Optional[tuple]) -> Optional[float]:
        """Cores used by others between samples a and b (ours: per process, so one that
        started in between counts whole and one that ended is simply missing)."""
        if a is None or b is None or b[0] <= a[0]:
            return None
        ours = sum(v - a[3].get(pid, 0.0) for pid, v in b[3].items())
        return round(max(0.0, (b[1] - a[1]) - ours + (b[2] - a[2])) / (b[0] - a[0]), 2)

    def ours_except(self, a: Optional[tuple], b: Optional[tuple],
                    exclude: set[int]) -> Optional[float]:
        """Cores used by our processes other than `exclude` and this one: what the idle
        router (and its workers) cost while a baseline was measured."""
        if a is None or b is None or b[0] <= a[0] or self.me is None:
            return None
        skip = exclude | {self.me.pid}
        used = sum(v - a[3].get(pid, 0.0) for pid, v in b[3].items() if pid not in skip)
        return round(max(0.0, used) / (b[0] - a[0]), 3)
