"""Which worker gets the next batch: pure functions over a snapshot of worker slots.

Late binding: a batch is bound only to a worker with room (fewer batches in flight than
its window); otherwise it stays in the front end's queue, where it can still go to
whichever worker frees up first.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class Slot:
    """The front end's view of one worker."""

    address: str
    name: str
    window: int
    info: dict = field(default_factory=dict)
    in_flight: int = 0
    batches: int = 0
    rows: int = 0

    @property
    def has_room(self) -> bool:
        return self.in_flight < self.window


def least_loaded(slots: list[Slot]) -> Slot | None:
    """The worker with room and the fewest batches in flight; ties go to the one that
    has served fewest batches, so idle workers share work instead of one taking all."""
    best = None
    for s in slots:
        if s.has_room and (best is None or (s.in_flight, s.batches) < (best.in_flight, best.batches)):
            best = s
    return best
