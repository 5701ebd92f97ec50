"""The load test's figure: latency and throughput over time, drawn from its JSON record.

Panels sharing the time axis: latency (sampled single requests as dots, p50 and p99 per
bin), throughput (img/s per bin against the window's mean), and errors per bin by kind when
there were any; the drain after the window is shaded. With --rounds the router windows are
drawn one after another. It reads only the record (timeline.py's bins and sample), so a
figure can be redrawn later. matplotlib (Agg) is the optional `bench` extra
(pip install -e '.[bench]'); without it no figure is drawn and the run says so.

    python -m benchmarks.load_report run.json [out.png]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional


def segments(record: dict) -> list[tuple[str, dict]]:
    """The router windows to draw, labelled: the single window, or each round's."""
    if record.get("rounds"):
        return [(f"round {r['round']}", r["router"]["timeline"]) for r in record["rounds"]
                if r.get("router", {}).get("timeline")]
    tl = (record.get("router") or {}).get("timeline")
    return [("", tl)] if tl else []


def title(record: dict) -> str:
    """Three lines: what was run, its headline figures, and on which machine."""
    c, r, m = record.get("config", {}), record.get("router", {}), record.get("machine", {})
    loop = f"open loop {c['rate']:g} req/s" if c.get("rate") else \
        f"closed loop {c.get('concurrency')} conn"
    rows = f" x {c.get('batch_rows')} rows" if c.get("mode") == "infer" else ""
    rounds = f", {c['rounds']} rounds (router windows only)" if c.get("rounds", 1) > 1 else ""
    lat = {k: "n/a" if v is None else f"{v:.1f} ms"
           for k, v in r.get("latency_ms", {}).items()}
    return (f"{record.get('url')} {c.get('mode')}{rows}, {loop}, "
            f"{c.get('duration', 0):g} s{rounds}\n"
            f"{r.get('img_per_s', 0):.1f} img/s, p50 {lat.get('p50')}, p99 {lat.get('p99')}, "
            f"{r.get('error_count', 0)} errors\n"
            f"{m.get('platform')}, {m.get('cpu_count')} cores, Python {m.get('python')}, "
            f"commit {str(m.get('git_commit'))[:10]}")


def _nan(xs: list[Optional[float]]) -> list[float]:
    return [math.nan if x is None else x for x in xs]


def _segment(axes: Any, tl: dict, x0: float, label: str, colors: dict[str, Any],
             dots: str) -> float:
    """One window's series from x0 on; returns where the next window starts."""
    b, w, win = tl["bins"], tl["bin_s"], tl["window_s"]
    end = x0 + win + tl["drain"]["s"]
    edges = [x0 + x["t"] for x in b] + [x0 + win]
    s = tl["sample"]
    axes[0].scatter([x0 + t for t in s["t"]], s["latency_ms"], s=5, lw=0, alpha=0.35,
                    color="tab:grey", label=dots)
    axes[0].stairs(_nan([x["p50_ms"] for x in b]), edges, baseline=None, lw=2,
                   color="tab:blue", label="p50 per bin")
    axes[0].stairs(_nan([x["p99_ms"] for x in b]), edges, baseline=None, lw=2,
                   color="tab:red", label="p99 per bin")
    axes[1].stairs([x["img_per_s"] for x in b], edges, fill=True, alpha=0.6,
                   color="tab:green", label=f"img/s per {w:g} s bin")
    if len(axes) > 2:
        bottom = [0] * len(b)
        for kind, color in colors.items():
            ys = [x["errors"].get(kind, 0) for x in b]
            if any(ys):
                axes[2].bar(edges[:-1], ys, [r - l for l, r in zip(edges, edges[1:])],
                            bottom=bottom, align="edge", color=color, label=kind)
                bottom = [a + y for a, y in zip(bottom, ys)]
        if tl["drain"]["errors"]:  # e.g. "unfinished": all counted as the drain cap ran out
            text = ", ".join(f"{k} {v}" for k, v in tl["drain"]["errors"].items())
            axes[2].annotate(f"in the drain: {text}", (x0 + win, 0.95),
                             xycoords=("data", "axes fraction"), ha="right", va="top",
                             fontsize="small", color="tab:red")
    if end > x0 + win:
        for i, ax in enumerate(axes):
            ax.axvspan(x0 + win, end, color="0.92", zorder=0,
                       label="drain (after the window)" if i == 0 else "_nolegend_")
    if label:
        for ax in axes:
            ax.axvline(x0, color="0.5", lw=0.8)
        axes[0].annotate(label, (x0, 1), xycoords=("data", "axes fraction"),
                         xytext=(3, -12), textcoords="offset points", fontsize="small")
    return end


def draw(record: dict, path: Path) -> None:
    """Write the figure (format from the suffix: png, svg, pdf); needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    segs = segments(record)
    kinds = sorted({k for _, tl in segs for x in tl["bins"] + [tl["drain"]]
                    for k in x["errors"]})
    colors = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(kinds)}
    n = 3 if kinds else 2
    fig, axes = plt.subplots(n, 1, figsize=(13, 2.8 * n + 1.6), sharex=True, squeeze=False)
    axes = axes[:, 0]
    every = {tl["sample"]["every"] for _, tl in segs}
    dots = "single requests" + ("" if every == {1} else
                                f" (1 in {every.pop()})" if len(every) == 1 else " (sampled)")
    x0 = 0.0
    for label, tl in segs:
        x0 = _segment(axes, tl, x0, label, colors, dots)
    _decorate(axes, record, segs)
    fig.suptitle(title(record), fontsize="medium")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _decorate(axes: Any, record: dict, segs: list[tuple[str, dict]]) -> None:
    """Axis labels, scales and legends; latency goes log when its tail dwarfs its median."""
    tl = segs[0][1]
    p50s = [x["p50_ms"] for _, t in segs for x in t["bins"] if x["p50_ms"]]
    tops = [x["p99_ms"] for _, t in segs for x in t["bins"] if x["p99_ms"]]
    tops += [y for _, t in segs for y in t["sample"]["latency_ms"]]
    if p50s and tops and max(tops) > 20 * min(p50s):
        axes[0].set_yscale("log")
    else:
        axes[0].set_ylim(bottom=0)
    axes[0].set_ylabel("latency (ms)")
    rows = tl.get("rows_per_request", 1)
    axes[1].set_ylabel("img/s" + (f" (req/s x {rows})" if rows > 1 else ""))
    mean = (record.get("router") or {}).get("img_per_s")
    if mean is not None:
        axes[1].axhline(mean, ls="--", color="k", lw=1, label=f"mean {mean:.1f} img/s")
    axes[1].set_ylim(bottom=0)
    if len(axes) > 2:
        axes[2].set_ylabel("errors per bin")
    axes[-1].set_xlabel("seconds since the window start" if len(segs) == 1 else
                        "seconds of router windows, one after another")
    for ax in axes:  # legends beside the panels, never over the data; one entry per label
        ax.grid(alpha=0.3)
        handles = {label: h for h, label in zip(*ax.get_legend_handles_labels())}
        ax.legend(handles.values(), handles.keys(), fontsize="small", loc="upper left",
                  bbox_to_anchor=(1.005, 1.0), markerscale=2)


def write_report(record: dict, path: Path) -> bool:
    """Draw the figure, or say on stderr why not (matplotlib missing, nothing measured, a
    path it cannot write) and return False: the measurement is not lost for it."""
    if not segments(record):
        print(f"report not written to {path}: the record has no timeline", file=sys.stderr)
        return False
    try:
        draw(record, path)
    except ImportError:
        print(f"report not written to {path}: matplotlib is not installed "
              "(pip install -e '.[bench]')", file=sys.stderr)
        return False
    except (OSError, ValueError) as e:  # e.g. an unknown suffix or a read-only folder
        print(f"report not written to {path}: {e}", file=sys.stderr)
        return False
    print(f"wrote {path}")
    return True


if __name__ == "__main__":
    src = Path(sys.argv[1])
    ok = write_report(json.loads(src.read_text()),
                      Path(sys.argv[2]) if len(sys.argv) > 2 else src.with_suffix(".png"))
    sys.exit(0 if ok else 1)
