"""benchmarks/faults.py's own arithmetic: what counts as recovered, lost and wrong."""

from __future__ import annotations

from benchmarks.faults import Record, summary


def steady(record: Record, start: float, end: float, per_s: int, status: int = 200) -> None:
    for k in range(int((end - start) * per_s)):
        record.rows.append((start + k / per_s, status, 0.01, status == 200))


def test_recovery_is_when_successes_stay_at_ninety_percent_of_the_baseline():
    r = Record(t0=0.0)
    steady(r, 0, 10, 100)  # baseline
    steady(r, 10, 13, 100, status=503)  # the fault
    steady(r, 13, 14, 50)  # half speed: not yet
    steady(r, 14, 30, 100)
    assert r.rate(0, 10) == 100
    assert r.recovery(10.0, 100, 30.0) == 4.0
    assert r.recovery(10.0, 100, 12.0) is None  # never, within the run


def test_the_summary_counts_each_kind_of_ending_once():
    r = Record(t0=0.0)
    r.rows += [(0.1, 200, 0.01, True), (0.2, 200, 0.02, False), (0.3, 0, 30.0, False), (0.4, 503, 0.001, False),
               (0.5, 500, 0.01, False), (0.6, 400, 0.01, False)]  # fmt: skip
    s = summary(r, twice=0, recovery=None)
    assert (s["sent"], s["answered"], s["ok"], s["lost"], s["wrong"]) == (6, 5, 2, 1, 1)
    assert (s["refused_503"], s["other_5xx"], s["other_4xx"]) == (1, 1, 1)
