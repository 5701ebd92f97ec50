"""A front end's statistics snapshot as the scheduler takes it in: checked field by field and rebuilt from what was checked, so one bad sender cannot
break the dashboard for the others; and the rates between two of them."""

from __future__ import annotations

import math
from typing import Any

from core.histogram import BOUNDS, PHASES, difference


def count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"not a count: {value!r}")
    return int(value)


def finite(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"not a number: {value!r}")
    return float(value)


def clean(s: dict) -> dict:
    """The snapshot with only the fields the dashboard reads, each of the right type;
    ValueError for anything else."""
    try:
        latency = {}
        for phase in PHASES:
            counts = [count(n) for n in s["latency"][phase]["counts"]]
            if len(counts) != len(BOUNDS) + 1:
                raise ValueError(f"{phase} histogram has {len(counts)} buckets, not {len(BOUNDS) + 1}")
            latency[phase] = counts
        return {
            "time": finite(s["time"]),
            "clock": finite(s["clock"]),
            "levels": [count(n) for n in s["queue"]["levels"]],
            "success": count(s["success"]),
            "failure": count(s["failure"]),
            "rows": count(s["rows"]),
            "batches": count(s["batches"]),
            "responses": {str(int(code)): count(n) for code, n in s["responses"].items()},
            "batch_sizes": {int(size): count(n) for size, n in s["batch_sizes"].items() if int(size) >= 1},
            "latency": latency,
            "workers": {
                str(address): {
                    "name": str(w["name"]),
                    "in_flight": count(w["in_flight"]),
                    "weight": finite(w["weight"]),
                    "responsive": bool(w["responsive"]),
                    "rows": count(w["rows"]),
                }
                for address, w in s["workers"].items()
            },
            "models": {  # each model's own line (absent from older front ends)
                str(name): {k: count(m[k]) for k in MODEL_COUNTS} | {"draining": bool(m.get("draining"))}
                for name, m in (s.get("models") or {}).items()
            },
        }
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"not a batch-router front-end snapshot: {type(e).__name__}: {e}") from None


MODEL_COUNTS = ("queued", "in_flight", "success", "failure", "rows", "batches", "workers")


def _delta(new: int, old: int) -> int:
    return new - old if new >= old else new  # a counter that went down restarted


def interval(new: dict, old: dict) -> dict | None:
    """Rates and latency counts between two clean snapshots of one front end, timed on
    its monotonic clock; None when no time passed."""
    dt = new["clock"] - old["clock"]
    if dt <= 0:
        return None
    codes = set(new["responses"]) | set(old["responses"])
    return {
        "requests_per_s": (_delta(new["success"], old["success"]) + _delta(new["failure"], old["failure"])) / dt,
        "rows_per_s": _delta(new["rows"], old["rows"]) / dt,
        "batches_per_s": _delta(new["batches"], old["batches"]) / dt,
        "status_per_s": {c: _delta(new["responses"].get(c, 0), old["responses"].get(c, 0)) / dt for c in codes},
        "latency": {p: difference(new["latency"][p], old["latency"][p]) for p in PHASES},
        "workers": {
            a: _delta(w["rows"], old["workers"].get(a, {}).get("rows", 0)) / dt for a, w in new["workers"].items()
        },
    }
