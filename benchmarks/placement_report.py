"""What the placement benchmark prints: one line per window, the per-policy table,
the targets and the kill run."""

from __future__ import annotations

from typing import Any


def _f(x: Any, fmt: str = "{:.1f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _shares(share: dict) -> str:
    return " ".join(f"{n} {_f(v, '{:.2f}')}" for n, v in sorted(share.items()))


def _share_of(workers: dict) -> dict:
    return {n: d["share"] for n, d in workers.items()}


def window_line(w: dict) -> str:
    lat = w["latency_ms"]
    errs = ", ".join(f"{k} x{v}" for k, v in w["errors"].items()) or "none"
    return (f"  {w['policy']} {w['load']:.0%}: offered {w['offered_req_per_s']:.2f} req/s, "
            f"done {w['completed_req_per_s']:.2f}, goodput {w['goodput_req_per_s']:.2f} "
            f"({_f(w['goodput_over_capacity'], '{:.3f}')} C), p50 {_f(lat['p50'])} p95 "
            f"{_f(lat['p95'])} p99 {_f(lat['p99'])} max {_f(lat['max'])} ms, errors {errs}, "
            f"shares {_shares(_share_of(w['workers']))}, mean batch "
            f"{_f(w['mean_batch'], '{:.2f}')}")


def print_table(summary: dict[str, dict[str, dict]], capacity: float, rounds: int) -> None:
    cols = ("policy", "load", "offered/s", "done/s", "goodput/s", "good/C", "p50 ms",
            "p99 ms", "errors", "batch", "share per worker")
    rows = []
    for policy, loads in summary.items():
        for key, s in loads.items():
            lat = s["latency_ms"]
            rows.append((policy, f"{float(key):.0%}", _f(s["offered_req_per_s"], "{:.2f}"),
                         _f(s["completed_req_per_s"], "{:.2f}"),
                         _f(s["goodput_req_per_s"], "{:.2f}"),
                         _f(s["goodput_over_capacity"], "{:.3f}"), _f(lat["p50"]),
                         _f(lat["p99"]), str(sum(s["errors"].values())),
                         _f(s["mean_batch"], "{:.2f}"), _shares(s["share"])))
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
              for i, c in enumerate(cols)]
    print(f"\naggregate capacity C = {capacity:.2f} req/s; "
          f"{'medians over ' + str(rounds) + ' rounds' if rounds > 1 else 'one round'}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def print_targets(targets: list[dict]) -> None:
    print("\ntargets:")
    for t in targets:
        status = {True: "met", False: "NOT MET", None: "not measured"}[t["met"]]
        print(f"  [{status}] {t['target']}: {_f(t['measured'], '{:g}')} {t['unit']} "
              f"(needs {t['op']} {_f(t['threshold'], '{:g}')})\n      {t['how']}")


def kill_lines(k: dict) -> str:
    rec = k["recovery_s"]
    return (f"kill run: offered {k['rate']:.2f} req/s ({k['load']:.0%} of "
            f"{k['capacity']['req_per_s']:.2f}), killed {k['killed']} (pid {k['pid']}, dead "
            f"after: {k['pid_dead_after']}) at {k['kill_at_s']:.1f} s\n"
            f"  in the window: sent {k['sent']}, ok {k['ok']}, errors {k['errors'] or 'none'}"
            f", p99 {_f(k['latency_ms']['p99'])} ms; whole run (warm-up, drain): sent "
            f"{k['sent_whole_run']}, lost {k['lost']} {k['lost_by_kind'] or ''}, 4xx "
            f"{k['rejected_4xx']}\n"
            f"  shares before the kill {_shares(_share_of(k['workers_before_kill']))}; after "
            f"{_shares(_share_of(k['workers_after_kill']))}\n"
            f"  throughput before the kill {_f(k['pre_kill_req_per_s'], '{:.2f}')} req/s; "
            f"survivors' expected {k['expected_req_per_s']:.2f} req/s (min(offered, C x "
            f"{k['survivor_fraction']:.3f})), 90 % = {k['threshold_req_per_s']:.2f}\n"
            f"  back to >= 90 % (a {k['bin_s']:g} s bin, and its mean with the next) after: "
            f"{'never, within the window' if rec is None else f'{rec:.1f} s'} "
            f"(target <= 5 s: {'met' if rec is not None and rec <= 5 else 'NOT MET'})")
