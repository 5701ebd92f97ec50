"""The same model straight in ONNX Runtime: the ceiling the router is measured against.

Run by loadtest in a subprocess after the router run, so it has the cores to itself.
For --mode classify every row is preprocessed exactly as the server does it (JPEG decode,
resize, crop, normalise), because that work is part of what the router is asked to do.
Prints readable lines, then one JSON object as stdout's last line.

With --serve it loads the session once and then measures on request, so loadtest can
alternate router and raw windows (--rounds) without paying model loading each time. The
protocol is one JSON object per line: first a "ready" line (providers, input shape), then
for each line read on stdin, e.g. {"duration": 5, "batch_sizes": [1]} (both optional; an
empty line uses the command-line values), one line with that window's figures, the same
object a plain run prints last. Idle between requests (blocked on stdin); exits at EOF.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Optional

import numpy as np

from benchmarks.httpload import percentile
from benchmarks.loadtest import parse_duration
from benchmarks.payloads import jpeg_size, make_jpeg, random_tensor

ORT_TYPES = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
             "tensor(uint8)": "UINT8", "tensor(int8)": "INT8", "tensor(int32)": "INT32",
             "tensor(int64)": "INT64"}


def open_session(model_path: str, threads: int, providers: Optional[list[str]] = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    available = ort.get_available_providers()
    wanted = providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ort.InferenceSession(model_path, opts,
                                providers=[p for p in wanted if p in available])


def batch_maker(session: Any, mode: str, seed: int) -> tuple[Callable[[int], np.ndarray], list]:
    """make(b) -> an input batch of b rows; for classify it decodes b JPEGs each call."""
    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else -1 for d in inp.shape]
    datatype = ORT_TYPES.get(inp.type, "FP32")
    if mode == "classify":
        from worker_setup.preprocess import ImageLayout, image_to_row

        w, h, q = jpeg_size(os.environ.get("BATCH_ROUTER_BENCH_JPEG", "320x240"))  # the load test's, passed down
        jpeg = make_jpeg(w, h, seed=seed, quality=q)
        layout = ImageLayout.from_shape(tuple(shape), np.dtype(
            {"FP32": "float32", "FP16": "float16", "UINT8": "uint8"}[datatype]).name)
        return (lambda b: np.stack([image_to_row(jpeg, layout) for _ in range(b)])), shape
    row = random_tensor([1] + [d if d > 0 else 1 for d in shape[1:]], datatype, seed)
    cache: dict[int, np.ndarray] = {}  # infer rows arrive ready-made: build each size once

    def make(b: int) -> np.ndarray:
        if b not in cache:
            cache[b] = np.ascontiguousarray(np.repeat(row, b, 0))
        return cache[b]
    return make, shape


def measure(session: Any, make: Callable[[int], np.ndarray], batch: int,
            duration: float, min_runs: int = 5) -> dict:
    """Run back to back for `duration`; per-run latencies and rows/s, building included."""
    name = session.get_inputs()[0].name
    for _ in range(2):  # first runs allocate arenas and pick kernels
        session.run(None, {name: make(batch)})
    lat: list[float] = []
    start = time.perf_counter()
    while len(lat) < min_runs or time.perf_counter() - start < duration:
        t = time.perf_counter()
        session.run(None, {name: make(batch)})
        lat.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    xs = sorted(lat)
    return {"batch": batch, "runs": len(xs), "rows_per_s": round(batch * len(xs) / elapsed, 2),
            "ms_p50": round(percentile(xs, 50) * 1e3, 3),
            "ms_p99": round(percentile(xs, 99) * 1e3, 3),
            "ms_mean": round(sum(xs) / len(xs) * 1e3, 3)}


def window(session: Any, make: Callable[[int], np.ndarray], shape: list,
           duration: float, batch_sizes: list[int]) -> dict:
    """One measurement window: each batch size for `duration`, batch-1 latency, best rows/s."""
    if shape[0] > 0:  # a fixed batch dimension allows that batch size only
        batch_sizes = [shape[0]]
    # Batch 1 run back to back is both the latency figure and the batch-1 throughput.
    results = [measure(session, make, b, duration) for b in sorted(set(batch_sizes))]
    b1 = next((r for r in results if r["batch"] == 1), results[0])
    best = max(results, key=lambda r: r["rows_per_s"])
    return {"latency_b1_ms": {"p50": b1["ms_p50"], "p99": b1["ms_p99"], "n": b1["runs"]},
            "latency_batch": b1["batch"], "duration_per_batch_s": duration,
            "throughput": results, "best_rows_per_s": best["rows_per_s"],
            "best_batch": best["batch"]}


def run(model_path: str, mode: str, threads: int, duration: float,
        batch_sizes: list[int], seed: int = 0) -> dict:
    session = open_session(model_path, threads)
    make, shape = batch_maker(session, mode, seed)
    out = window(session, make, shape, duration, batch_sizes)
    for k in ("latency_batch", "duration_per_batch_s"):  # serve mode's extras
        out.pop(k)
    return {"model_path": model_path, "mode": mode, "threads": threads,
            "providers": session.get_providers(), "input_shape": shape, **out}


def serve(model_path: str, mode: str, threads: int, duration: float,
          batch_sizes: list[int], seed: int = 0, stdin: Any = None, stdout: Any = None) -> None:
    """Load once, then one measurement window per stdin line (see the module docstring)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    session = open_session(model_path, threads)
    make, shape = batch_maker(session, mode, seed)
    info = {"model_path": model_path, "mode": mode, "threads": threads,
            "providers": session.get_providers(), "input_shape": shape}
    stdout.write(json.dumps({"ready": True, **info}) + "\n")
    stdout.flush()
    for line in stdin:
        try:
            req = json.loads(line) if line.strip() else {}
            out = window(session, make, shape, float(req.get("duration", duration)),
                         [int(b) for b in req.get("batch_sizes", batch_sizes)])
            out = {**info, **out}
        except Exception as e:  # noqa: BLE001 - answered, so the caller is never left waiting
            out = {"error": f"{type(e).__name__}: {e}"}
        stdout.write(json.dumps(out) + "\n")
        stdout.flush()


def describe(out: dict) -> list[str]:
    """The readable lines for one result (what a plain run prints before its JSON)."""
    lat = out["latency_b1_ms"]
    lines = [f"  batch-{out.get('latency_batch', 1)} latency  p50 {lat['p50']:.2f} ms  "
             f"p99 {lat['p99']:.2f} ms ({lat['n']} runs)"]
    for r in out["throughput"]:
        lines.append(f"  batch {r['batch']:3d}  {r['rows_per_s']:8.1f} img/s  "
                     f"({r['ms_p50']:.2f} ms per batch)")
    return lines


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.raw_ort",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--mode", choices=("classify", "infer"), default="classify")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--duration", type=parse_duration, default=10.0, help="per batch size")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve", action="store_true",
                   help="load once, then one window per stdin line, JSON lines out")
    args = p.parse_args(argv)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.serve:
        serve(args.model_path, args.mode, args.threads, args.duration, sizes, args.seed)
        return
    out = run(args.model_path, args.mode, args.threads, args.duration, sizes, args.seed)
    print(f"raw onnxruntime ({', '.join(out['providers'])}, {args.threads} threads, "
          f"{args.mode}{' incl. preprocessing' if args.mode == 'classify' else ''})")
    print("\n".join(describe(out)))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
