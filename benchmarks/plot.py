"""The placement benchmark's PNG, drawn from its JSON record with matplotlib (Agg).

Three panels: p99 per policy at each load (log scale), goodput / capacity per policy at
each load, and the kill run's completions per 0.5 s bin with the kill, the offered rate
and the 90 % recovery threshold marked. matplotlib is the optional `bench` extra
(pip install -e '.[bench]'); without it the plot is skipped with a message.

    python -m benchmarks.plot benchmarks/results/placement.json [out.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot_placement(record: dict, path: Path) -> bool:
    """Write the PNG; False (and a message) if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot", flush=True)
        return False
    summary = record.get("summary") or {}
    policies = list(summary)
    loads = sorted({k for v in summary.values() for k in v}, key=float)
    kill = record.get("kill_run")
    fig, axes = plt.subplots(1, 3 if kill else 2, figsize=(16 if kill else 11, 4.5))
    width = 0.8 / max(1, len(loads))
    for ax, what in zip(axes, ("p99", "goodput")):
        for j, key in enumerate(loads):
            ys = []
            for p in policies:
                s = summary[p].get(key, {})
                ys.append(s.get("latency_ms", {}).get("p99") if what == "p99"
                          else s.get("goodput_over_capacity"))
            xs = [i + (j - (len(loads) - 1) / 2) * width for i in range(len(policies))]
            ax.bar(xs, [y or 0 for y in ys], width, label=f"{float(key):.0%} load")
        ax.set_xticks(range(len(policies)), policies, rotation=20)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("p99 latency (ms)")
    axes[0].set_yscale("log")
    axes[0].set_title("p99 latency per policy")
    cap = (record.get("capacity") or {}).get("req_per_s")
    axes[1].set_ylabel("goodput / capacity")
    axes[1].set_title(f"goodput (answers within the deadline), C = "
                      f"{cap if cap is None else round(cap, 1)} req/s")
    for key in loads:
        axes[1].axhline(float(key), ls=":", lw=0.8, color="grey")
    if kill:
        ax = axes[2]
        t0 = kill["kill_at_s"]  # bins are relative to the kill; plot from window start
        edges = [b["t"] + t0 for b in kill["bins"]]
        if edges:
            edges.append(edges[-1] + kill["bin_s"])
            ax.stairs([b["req_per_s"] for b in kill["bins"]], edges, baseline=None,
                      label="completed")
        ax.set_ylim(bottom=0)
        ax.axvline(t0, color="red", label=f"SIGKILL {kill['killed']}")
        ax.axhline(kill["rate"], ls="--", color="grey", label="offered")
        ax.axhline(kill["threshold_req_per_s"], ls=":", color="orange",
                   label="90 % of survivors' expected")
        if kill.get("recovery_s") is not None:
            ax.axvspan(t0, t0 + kill["recovery_s"], color="red", alpha=0.1,
                       label=f"recovery {kill['recovery_s']:.1f} s")
        ax.set_xlabel("seconds into the window")
        ax.set_ylabel(f"req/s per {kill['bin_s']:g} s bin")
        ax.set_title(f"kill run: {kill['lost']} lost, workers {kill['slowdown']}")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    m = record.get("machine", {})
    fig.suptitle(f"placement benchmark, commit {str(m.get('git_commit'))[:10]}"
                 f"{' (dirty tree)' if m.get('git_dirty') else ''}, {m.get('cpu_count')} cores")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
    return True


if __name__ == "__main__":
    src = Path(sys.argv[1])
    plot_placement(json.loads(src.read_text()),
                   Path(sys.argv[2]) if len(sys.argv) > 2 else src.with_suffix(".png"))
