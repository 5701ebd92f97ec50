"""The one prepared check for a GPU machine: every GPU mode, side by side with raw ONNX
Runtime run with the same options, in one run of under 6 minutes on an H100/H200.

Modes (``--device cuda``): fp32 at batch 32 and 128, fp16, CUDA graphs on (off is the
fp32 mode), uint8 pixels with fp16 at batch 256 (``resnet50-uint8``), each one router worker, closed loop with at least 4x the batch's rows in
flight; on the batch-32 router also c=1 (router p50 minus raw batch-1 p50) and the tail
at 70 % of the measured load (p99 <= 2 x p50 once warm); then ``/v1/classify`` with the
load test's JPEG (CPU decode on the workers), and the path's own ceiling (a one-node
model at the same request size). For each: raw img/s, router img/s, the
ratio, GPU utilisation under load, the ``/metrics`` split (queue, transfer, compute) and
the workers' warm-up tables. fp16's accuracy against fp32 is measured on fixed images.
A mode that fails is reported as FAILED in the summary and the exit code is 1.

    PYTHONPATH=/tmp/site:. python3 -m benchmarks.gpu_check --out "$OUT"
    .venv/bin/python -m benchmarks.gpu_check --device cpu --quick --out /tmp/gpu-check  # rehearsal

fp16 needs onnxconverter-common there, and GPU JPEG decoding nvImageCodec (CUDA 13 on that
machine); stage them with ``../shared/device/stage-wheels.sh onnxconverter-common==1.16.0
nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43``. Without nvImageCodec the
classify parts decode with Pillow, and the summary says so.
On a CPU (``--quick``) fp16 is refused by design: the rehearsal checks that refusal and
measures fp16's accuracy on ONNX Runtime's CPU provider instead; CUDA graphs are asked
for, and the session reports it has none.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import dask.config

from benchmarks.gpu_measure import (GpuSampler, fp16_accuracy, input_ms_per_row, model_stats, open_session, raw_throughput, scrape,
                                    split)  # fmt: skip
from benchmarks.report import trace_line
from benchmarks.servers import ROOT, _wait_ready, free_port, stop
from core.config import cache_dir, parse


@dataclass(frozen=True)
class Mode:
    name: str
    batch: int
    precision: str = "fp32"
    graphs: bool = False
    c1: bool = False  # also the c=1 latency and the 70 % tail on this router
    uint8: bool = False  # the -uint8 model name: uint8 NHWC pixels in, normalised in the graph


def modes(quick: bool) -> list[Mode]:
    small, large = (4, 8) if quick else (32, 128)
    # uint8 + fp16 at 256 is issue 14's 7,000 img/s target (raw measured 7,634 on an H200);
    # a CPU has no fp16, so the rehearsal runs the uint8 entry in fp32.
    uint8 = Mode("uint8-fp32-b8", 8, uint8=True) if quick else Mode("uint8-fp16-b256", 256, "fp16", uint8=True)
    return [Mode(f"fp32-b{small}", small, c1=True), Mode(f"fp32-b{large}", large), Mode(f"fp16-b{large}", large, "fp16"),
            Mode(f"fp32-b{small}-graphs", small, graphs=True), uint8]  # fmt: skip


class Router:
    """``python -m router_api.cli up`` (never a console script: PYTHONPATH installs)."""

    def __init__(self, out: Path, name: str, device: str, args: list[str], gpu_metrics: str, uint8: bool = True,
                 env: dict | None = None) -> None:  # fmt: skip
        self.port = free_port()
        # A mode that sends no pixels spares its worker the uint8 session's load and warm-up.
        self.env = {**os.environ, "DASK_BATCH_ROUTER__UINT8_MODEL": "true" if uint8 else "false", **(env or {})}
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = out / f"router-{name}.log"
        self.cmd = [sys.executable, "-m", "router_api.cli", "up", "--device", device, "--port", str(self.port), "--grpc-port", "0",
                    "--scheduler-port", str(free_port()), "--dashboard-port", str(free_port()),
                    "--gpu-metrics", gpu_metrics, *args]  # fmt: skip

    def __enter__(self) -> "Router":
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env)
        try:
            _wait_ready(self.proc, self.url, 300, "router")
        except SystemExit as e:
            self.__exit__()
            raise RuntimeError(f"{e}; last lines of {self.log_path}:\n{tail(self.log_path)}") from None
        return self

    def __exit__(self, *exc) -> None:
        stop(self.proc)
        self.log.close()

    def workers(self) -> list[dict]:
        import urllib.request

        return json.load(urllib.request.urlopen(self.url + "/v1/workers", timeout=10))["workers"]


def tail(path: Path, n: int = 15) -> str:
    return "".join(path.read_text(errors="replace").splitlines(True)[-n:])


JPEG = "500x375q95"  # the issue's typical photo: ~94 KB of the load test's synthetic scene


def load_cmd(url: str, result: Path, mode: str, seconds: float, clients: int = 0, rows: int = 1, rate: float = 0.0,
             model: str = "resnet50") -> list[str]:  # fmt: skip
    cmd = [sys.executable, "-m", "benchmarks.loadtest", "--url", url, "--mode", mode, "--duration", f"{seconds}s",
           "--model", model, "--quiet", "--json", str(result)]  # fmt: skip
    cmd += ["--batch-rows", str(rows)] if mode == "infer" else ["--jpeg-size", JPEG]
    cmd += ["--rate", str(rate), "--max-connections", "256"] if rate else ["--concurrency", str(clients)]
    return cmd


def load(url: str, out: Path, mode: str, seconds: float, clients: int = 0, rows: int = 1, rate: float = 0.0,
         model: str = "resnet50") -> dict:
    """One load window from ``benchmarks.loadtest``: closed loop, or open at ``rate``."""
    result = out / f"load-{time.monotonic_ns()}.json"
    subprocess.run(load_cmd(url, result, mode, seconds, clients, rows, rate, model), cwd=ROOT, check=True)
    return json.loads(result.read_text())["router"]


def load_parallel(url: str, out: Path, generators: int, seconds: float, clients: int, model: str) -> dict:
    """Several load generators at once (one Python process tops out near 1-2k req/s):
    batch-1 infer requests, the rates summed."""
    results = [out / f"load-{time.monotonic_ns()}-{i}.json" for i in range(generators)]
    procs = [subprocess.Popen(load_cmd(url, r, "infer", seconds, clients, 1, model=model), cwd=ROOT) for r in results]
    if any(p.wait() != 0 for p in procs):
        raise RuntimeError("a load generator failed")
    runs = [json.loads(r.read_text())["router"] for r in results]
    return {"req_per_s": round(sum(r["req_per_s"] for r in runs), 1), "errors": sum(r["error_count"] for r in runs),
            "p50_ms": [r["latency_ms"]["p50"] for r in runs], "generators": generators, "clients_each": clients}  # fmt: skip


def check_device(workers: list[dict], device: str) -> None:
    """Loud, never silent: a CUDA check whose workers run on CPU measured nothing."""
    for w in workers:
        if w.get("device") != device or w.get("cuda_fallback"):
            raise RuntimeError(f"worker {w['name']} runs on {w.get('device')} (providers {w.get('providers')}), not {device}")


def run_mode(m: Mode, path: str, args, settings, out: Path) -> dict:
    """Raw ORT with the router's options, then the router under saturating load."""
    found: dict = {"mode": asdict(m)}
    if m.precision == "fp16":
        path, found["accuracy"] = fp16_model(path, args.device, settings)
    if m.uint8:  # the graph a worker builds for the -uint8 name, from the model it runs
        from worker_setup.preprocess_graph import ensure_uint8

        path = str(ensure_uint8(Path(path), hashlib.sha256(Path(path).read_bytes()).hexdigest(), cache_dir(settings)))
    session = open_session(path, args.device, settings, m.graphs)
    found["raw"] = raw_throughput(session, m.batch, args.raw_s)
    raw_b1 = raw_throughput(session, 1, args.raw_s) if m.c1 else None
    del session  # frees the GPU memory before the router's worker takes its own
    rows = min(32, m.batch)
    clients = max(2, math.ceil(4 * m.batch / rows))  # >= 4x the bucket's rows in flight
    flags = ["--workers", "1", "--max-batch-size", str(m.batch), "--precision", m.precision]
    if args.device == "cpu" and m.precision == "fp16":
        found["router"] = refused(out, m, flags)
        return found
    flags += ["--cuda-graphs"] if m.graphs else []
    flags += ["--trace"] if m.c1 else []  # c=1's hops; a few dict writes a request under load
    with Router(out, m.name, args.device, flags, args.gpu_metrics, m.uint8) as r:
        workers = r.workers()
        check_device(workers, args.device)
        found["worker"] = {k: workers[0].get(k) for k in ("device", "providers", "precision", "buckets", "options", "cuda_graphs", "warmup")}
        gpu = GpuSampler(r.url)
        gpu.start()
        time.sleep(2)
        gpu.phase = "load"
        before = scrape(r.url)
        found["router"] = load(r.url, out, "infer", args.load_s, clients=clients, rows=rows,
                               model="resnet50-uint8" if m.uint8 else "resnet50")  # fmt: skip
        found["split"] = split(before, scrape(r.url))
        found["gpu"] = gpu.stop()
        found["clients"], found["rows_per_request"] = clients, rows
        if m.c1:  # each recorded on its own: a failure here keeps the throughput figures
            for key, measure in (("c1", lambda: c1_latency(r.url, out, args, raw_b1)),
                                 ("tail_70", lambda: tail_at(r.url, out, args, 0.7 * found["router"]["req_per_s"], rows))):
                try:
                    found[key] = measure()
                except Exception:
                    found[key] = {"error": traceback.format_exc()}
                    print(f"!!! {m.name} {key} FAILED", file=sys.stderr, flush=True)
    img_s = found["router"].get("img_per_s")
    found["ratio"] = round(img_s / found["raw"]["img_per_s"], 3) if img_s else None
    return found


def fp16_model(path: str, device: str, settings) -> tuple[str, dict]:
    """The fp16 model as workers make it, and its accuracy against fp32 (on this device;
    on a CPU, ONNX Runtime runs it in fp32 arithmetic, so the figure is the weights' loss)."""
    from worker_setup.precision import ensure_fp16

    sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    path16, _ = ensure_fp16(Path(path), sha, cache_dir(settings))
    # The reference is full fp32: TF32 convolutions would put their own error into the figure.
    fp32 = open_session(path, device, settings, False, tf32=False)
    fp16 = open_session(str(path16), device, settings, False)
    return str(path16), fp16_accuracy(fp32, fp16)


def refused(out: Path, m: Mode, flags: list[str]) -> dict:
    """On a CPU, fp16 must be refused at startup with the setting's name."""
    cmd = [sys.executable, "-m", "router_api.cli", "up", "--device", "cpu", "--port", str(free_port()), "--grpc-port", "0", *flags]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    said = (p.stderr + p.stdout).strip().splitlines()
    if p.returncode == 0 or not any("precision: fp16 needs a CUDA device" in line for line in said):
        raise RuntimeError(f"fp16 on CPU was not refused as designed (exit {p.returncode}): {said[-3:]}")
    return {"refused": said[-1], "img_per_s": None}


def c1_latency(url: str, out: Path, args, raw_b1: dict) -> dict:
    """One client, one row: router p50 minus raw batch-1 p50 (issue 14's <= 2 ms), and
    where the time went, hop by hop (the router runs with --trace)."""
    import urllib.request

    r = load(url, out, "infer", args.c1_s, clients=1, rows=1)
    p50 = r["latency_ms"]["p50"]
    found = {"router_p50_ms": p50, "raw_b1_p50_ms": raw_b1["ms_p50"], "delta_ms": round(p50 - raw_b1["ms_p50"], 3)}
    trace = json.load(urllib.request.urlopen(f"{url}/v1/trace?last={max(1, r['ok'] // 2)}", timeout=10))
    found["trace"] = {k: trace.get(k) for k in ("count", "total_ms", "hops_ms")}
    return found


def tail_at(url: str, out: Path, args, rate: float, rows: int) -> dict:
    """Open loop at 70 % of the closed loop's rate: once warm, no request waits on a
    shape search, so p99 <= 2 x p50."""
    r = load(url, out, "infer", args.load_s, rows=rows, rate=max(1.0, round(rate, 1)))
    lat = r["latency_ms"]
    return {"rate": rate, "p50_ms": lat["p50"], "p99_ms": lat["p99"], "p99_over_p50": round(lat["p99"] / lat["p50"], 2),
            "img_per_s": r["img_per_s"], "errors": r["error_count"]}  # fmt: skip


def classify(args, out: Path, cores: str | None = None) -> dict:
    """/v1/classify with 500x375 JPEGs (~94 KB), on the uint8 entry; with ``cores``, one
    worker pinned to them (a Colab VM has two). The split's compute_input is decoding."""
    workers = "1" if cores or args.device == "cpu" else "2"
    env = {"DASK_BATCH_ROUTER__WORKER__CPU_AFFINITY": f"[{cores}]"} if cores else None
    name = f"classify-cores-{cores.replace(',', '-')}" if cores else "classify"
    with Router(out, name, args.device, ["--workers", workers, "--max-batch-size", "32"], args.gpu_metrics, env=env) as r:
        found = r.workers()
        check_device(found, args.device)
        gpu = GpuSampler(r.url)
        gpu.start()
        gpu.phase = "load"
        before, stats = scrape(r.url), model_stats(r.url)
        router = load(r.url, out, "classify", args.load_s, clients=args.classify_clients)
        s = split(before, scrape(r.url))
        return {"workers": int(workers), "clients": args.classify_clients, "router": router, "split": s, "gpu": gpu.stop(),
                "decoder": found[0].get("decoder"), "cores": cores, "jpeg": JPEG,
                "decode_ms_per_image": input_ms_per_row(stats, model_stats(r.url))}  # fmt: skip


def frontends(args, out: Path) -> dict:
    """Batch-1 uint8 requests to the one-node model through several front ends sharing
    the port: what the front ends carry when the device costs nothing."""
    from scheduler_plugins.builtin_models import build_trivial

    model = build_trivial(out / "trivial.onnx")
    n = 2 if args.quick else 8
    flags = ["--workers", "2", "--max-batch-size", "32", "--model", str(model), "--frontends", str(n)]
    with Router(out, "frontends", "cpu", flags, "off") as r:
        found = load_parallel(r.url, out, 2 if args.quick else 4, args.load_s, 16 if args.quick else 64, "trivial-uint8")
        return {"frontends": n, **found}


def path_ceiling(args, out: Path) -> dict:
    """What the path alone carries (HTTP, the front end, Dask, the worker's decode and
    reply) at the fp32 modes' request size: the one-node model on a CPU worker, whose
    compute is next to nothing. A router mode far below this is held back by its device
    or its worker; one near it, by the path (issue 14's uint8 wire cuts its bytes 4x)."""
    from scheduler_plugins.builtin_models import build_trivial

    model = build_trivial(out / "trivial.onnx")
    with Router(out, "path", "cpu", ["--workers", "1", "--max-batch-size", "32", "--model", str(model)], "off", False) as r:
        before = scrape(r.url)
        router = load(r.url, out, "infer", args.load_s, clients=4, rows=32, model="trivial")
        return {"router": router, "split": split(before, scrape(r.url)),
                "mb_per_s": round(router["img_per_s"] * 3 * 224 * 224 * 4 / 1e6, 1)}  # fmt: skip


def summary(report: dict) -> list[str]:
    lines = [f"{'mode':<22}{'raw img/s':>11}{'router':>10}{'ratio':>8}{'GPU %':>9}{'queue ms':>10}{'wait':>9}{'transfer':>10}{'compute':>10}  note"]
    for name, f in report["modes"].items():
        if "error" in f:
            lines.append(f"{name:<22}  FAILED: {f['error'].splitlines()[-1][:110]}")
            continue
        s, g = f.get("split") or {}, ((f.get("gpu") or {}).get("utilization_gpu") or {}).get("load")
        if g is not None and "simulated" in (f.get("gpu") or {}).get("source", []):
            g = f"{g}sim"  # a simulated GPU's figure, labelled wherever it shows
        acc = f.get("accuracy")
        note = (f"max|dlogit| {acc['max_abs_logit_diff']}, top1 {acc['top1_agreement']}, top5 {acc['top5_agreement']}; " if acc else "")
        note += "refused on CPU, as designed" if f.get("router", {}).get("refused") else ""
        lines.append(f"{name:<22}{f['raw']['img_per_s']:>11}{str(f['router'].get('img_per_s')):>10}{str(f.get('ratio')):>8}"
                     f"{str(g):>9}{str(s.get('queue_ms')):>10}{str(s.get('device_wait_ms')):>9}{str(s.get('transfer_ms')):>10}{str(s.get('compute_ms')):>10}  {note}")  # fmt: skip
    for key, target in (("classify", 3000), ("classify-2-cores", 1500)):
        if (c := report.get(key)) is None:
            continue
        if "error" in c:
            lines.append(f"{key}: FAILED: {c['error'].splitlines()[-1][:110]}")
            continue
        lines.append(f"{key}: {c['router']['img_per_s']} img/s ({c['workers']} workers, {c['clients']} clients, {c.get('jpeg')}, "
                     f"decoder {c.get('decoder')}; decode+stack {c.get('decode_ms_per_image')} ms an image; target >= {target} on the GPU decoder)")  # fmt: skip
    if (f := report.get("frontends")) is not None:
        lines.append(f"front ends: {f['req_per_s']} batch-1 uint8 req/s through {f['frontends']} front ends, errors {f['errors']} (target >= 5000 on 16 cores)"
                     if "error" not in f else f"front ends: FAILED: {f['error'].splitlines()[-1][:110]}")  # fmt: skip
    if (pc := report.get("path")) is not None:
        lines.append(f"path ceiling (one-node model, 32-row fp32 requests): {pc['router']['img_per_s']} img/s, {pc['mb_per_s']} MB/s"
                     if "error" not in pc else f"path ceiling: FAILED: {pc['error'].splitlines()[-1][:110]}")  # fmt: skip
    first = next(iter(report["modes"].values()), {})
    if "c1" in first:
        c1, tail70 = first["c1"], first["tail_70"]
        lines.append(f"c=1: router p50 - raw batch-1 p50 = {c1['delta_ms']} ms (target <= 2 ms)" if "error" not in c1 else "c=1: FAILED")
        s = first.get("split") or {}
        if s.get("compute_ms"):
            lines.append(f"transfer / compute at batch {first['mode'].get('batch')}: {round(s['transfer_ms'] / s['compute_ms'], 3)} (target <= 0.25)")
        if (c1.get("trace") or {}).get("count"):
            lines.append("c=1 " + trace_line(c1["trace"]))
        lines.append(f"70 % load: p99/p50 = {tail70['p99_over_p50']} (target <= 2)" if "error" not in tail70 else "70 % load: FAILED")
    for name, f in report["modes"].items():
        warm = (f.get("worker") or {}).get("warmup")
        if warm:
            lines.append(f"warm-up {name}: " + ", ".join(
                f"{w['bucket']}: {w['first_ms']} -> {w['steady_ms']} ms" if "steady_ms" in w else f"{w['bucket']}: skipped ({w['skipped']})"
                for w in warm))  # fmt: skip
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check")))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="short windows, batches 4 and 8 (a CPU rehearsal)")
    p.add_argument("--gpu-metrics", default="auto", help="auto (NVML); 'simulated' only to rehearse on a CPU")
    p.add_argument("--only", default="", help="comma-separated parts to run (e.g. fp32-b32,classify,path): a rerun")
    args = p.parse_args()
    only = set(filter(None, args.only.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    args.raw_s, args.load_s, args.c1_s = (2.0, 4.0, 2.0) if args.quick else (5.0, 12.0, 5.0)
    args.classify_clients = 8 if args.quick else 64
    from scheduler_plugins.builtin_models import ensure_default_model

    import onnxruntime as ort

    settings = parse(dask.config.get("batch-router", None))
    report: dict = {"ort_version": ort.__version__, "available_providers": ort.get_available_providers(), "device": args.device,
                    "nvidia_smi": subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
                    if args.device == "cuda" and shutil.which("nvidia-smi") else None,
                    "modes": {}}  # fmt: skip
    path = str(ensure_default_model())
    failed = False
    for m in modes(args.quick):
        if only and m.name not in only:
            continue
        print(f"--- {m.name}", flush=True)
        try:
            report["modes"][m.name] = run_mode(m, path, args, settings, args.out)
        except Exception as e:  # loud, and the others still run
            failed = True
            report["modes"][m.name] = {"mode": asdict(m), "error": traceback.format_exc()}
            print(f"!!! MODE {m.name} FAILED: {e}", file=sys.stderr, flush=True)
        (args.out / "gpu-check.json").write_text(json.dumps(report, indent=1))
    parts = (("classify", classify), ("classify-2-cores", lambda a, o: classify(a, o, "0,1")), ("frontends", frontends),
             ("path", path_ceiling))  # fmt: skip
    for name, check in parts:
        if only and name not in only:
            continue
        print(f"--- {name}", flush=True)
        try:
            report[name] = check(args, args.out)
        except Exception as e:
            failed = True
            report[name] = {"error": traceback.format_exc()}
            print(f"!!! {name.upper()} FAILED: {e}", file=sys.stderr, flush=True)
        (args.out / "gpu-check.json").write_text(json.dumps(report, indent=1))
    report["summary"] = summary(report)
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=1))
    print("\n".join(report["summary"]), flush=True)
    if failed:
        print("!!! SOME MODES FAILED: see above and gpu-check.json", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
