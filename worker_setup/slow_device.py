"""A benchmark knob: a session that behaves like a slower device.

The placement benchmark needs workers of unequal speed on one host. This wrapper makes
every run take ``slowdown`` times as long as it really did, and at least ``batch_time``,
by sleeping rather than spinning, so a slow worker takes no CPU from the others. The
worker preload wraps the session only when ``worker.slowdown`` or ``worker.batch-time``
asks for it: the request path itself never checks for the knob.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


class SlowDevice:
    """The stretch is part of the run: the worker calls it holding its device
    (``WorkerModel.device``), so a second task thread waits through the sleep too."""

    def __init__(self, session: Any, slowdown: float = 1.0, batch_time: float = 0.0) -> None:
        self.session, self.slowdown, self.batch_time = session, slowdown, batch_time

    def __getattr__(self, name: str) -> Any:  # inputs, outputs, providers, device...
        return getattr(self.session, name)

    def run(self, feeds: dict[str, np.ndarray], names: list[str] | None = None) -> list[np.ndarray]:
        t0 = time.perf_counter()
        out = self.session.run(feeds, names)
        took = time.perf_counter() - t0
        time.sleep(max(0.0, (self.slowdown - 1) * took, self.batch_time - took))
        return out
