"""``batch-router``: start the whole service, or one of its roles.

Flags override ``batch-router.*`` settings from Dask config (YAML, DASK_BATCH_ROUTER__*).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

import dask.config

from core.config import ConfigError, Settings, parse
from core.placement import POLICIES

# Flags that set a batch-router key, whatever the role; role-specific ones are below.
KEYS = {
    "max_batch_size": "max-batch-size",
    "max_queue_delay": "max-queue-delay",
    "max_queue_size": "max-queue-size",
    "window": "window",
    "device": "worker.device",
    "threads": "worker.intra-op-threads",
    "model_name": "model-name",
    "labels": "labels",
    "policy": "placement.policy",
    "gpu_metrics": "worker.gpu-metrics",
    "slowdown": "worker.slowdown",
    "workers": "worker.count",
    "public_address": "scheduler.public-address",
    "precision": "worker.precision",
    "buckets": "batching.buckets",
    "cuda_graphs": "worker.cuda.graphs",
    "trace": "trace",
}
ROLE_KEYS = {
    "up": {"host": "http.host", "port": "http.port", "grpc_port": "grpc.port", "scheduler_port": "scheduler.port",
           "frontends": "http.frontends"},
    "serve": {"host": "http.host", "port": "http.port", "grpc_port": "grpc.port", "frontends": "http.frontends"},
    "scheduler": {"host": "scheduler.host", "port": "scheduler.port"},
}


def settings_from(args: argparse.Namespace) -> Settings:
    """Dask config (YAML, DASK_BATCH_ROUTER__*) overridden by the flags given, checked:
    a bad key or value stops here, naming it. The flags go into Dask config too, so
    processes started from here (local workers) inherit them."""
    keys = {**KEYS, **ROLE_KEYS.get(args.role, {})}
    flags = {f"batch-router.{key}": getattr(args, attr) for attr, key in keys.items() if getattr(args, attr, None) is not None}
    if getattr(args, "model", None):
        flags["batch-router.model"] = str(Path(args.model).expanduser().resolve())
    if getattr(args, "model_repository", None):
        flags["batch-router.model-repository"] = str(Path(args.model_repository).expanduser().resolve())
    if getattr(args, "allow_load", False):
        flags["batch-router.repository.allow-load"] = True
    if getattr(args, "dashboard_port", None) is not None:
        host = dask.config.get("batch-router.scheduler.dashboard-address").rsplit(":", 1)[0]
        flags["batch-router.scheduler.dashboard-address"] = f"{host}:{args.dashboard_port}"
    dask.config.set(flags)
    try:
        return parse(dask.config.get("batch-router"))
    except ConfigError as e:
        raise SystemExit(f"batch-router: bad setting: {e}") from None


def repository(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repository", metavar="DIR",
                        help="serve every model of a Triton model repository: DIR/<name>/<version>/model.onnx [+ config.pbtxt]")
    parser.add_argument("--allow-load", action="store_true",
                        help="let callers load repository models (POST /v2/repository/models/<name>/load)")


def _sizes(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 1,8,32: {text!r}") from None


def _factors(text: str) -> list[float]:
    try:
        factors = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,4: {text!r}") from None
    if not factors or any(f < 1 for f in factors):
        raise argparse.ArgumentTypeError("slowdown factors must be >= 1")
    return factors


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="batch-router", description=__doc__)
    sub = p.add_subparsers(dest="role", required=True)

    def batching(sp):
        sp.add_argument("--max-batch-size", type=int, help="rows per batch (default 32)")
        sp.add_argument("--max-queue-delay", help="e.g. 0ms, 5ms (default 0)")
        sp.add_argument("--max-queue-size", type=int, help="queued requests before 503")
        sp.add_argument("--window", type=int, help="batches in flight per worker (default 2)")
        sp.add_argument("--model-name", help="name under /v2/models/ (default resnet50)")
        sp.add_argument("--labels", help="class names, one per line")
        sp.add_argument("--policy", choices=POLICIES, help="batch placement policy (default gpu-aware)")
        sp.add_argument("--buckets", type=_sizes, help="batch sizes batches are padded to, e.g. 1,8,32 (default powers of two)")
        sp.add_argument("--precision", choices=["fp32", "fp16"], help="what workers run (default fp32; fp16 needs CUDA)")
        sp.add_argument("--trace", action="store_const", const=True, default=None,
                        help="stamp each request's way through the service (GET /v1/trace)")  # fmt: skip

    def workers(sp):
        sp.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads per worker")
        sp.add_argument("--device", choices=["auto", "cpu", "cuda"], help="execution device (default auto)")
        sp.add_argument(
            "--gpu-metrics",
            choices=["auto", "nvml", "simulated", "off"],
            help="GPU metrics source (default auto: NVML when a GPU is visible; simulated is labelled as such)",
        )
        sp.add_argument("--cuda-graphs", action="store_const", const=True, default=None,
                        help="replay one CUDA graph per batch size (ONNX Runtime's enable_cuda_graph)")  # fmt: skip

    up = sub.add_parser("up", help="scheduler, dashboard, N local workers and the HTTP front end")
    up.add_argument("--workers", type=int, default=None, help="local worker processes (default 2)")
    up.add_argument("--host", default=None, help="HTTP host (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    up.add_argument("--grpc-port", type=int, default=None, help="KServe v2 gRPC port (default 8001; 0 = off)")
    up.add_argument("--scheduler-port", type=int, default=None, help="Dask scheduler port (default 8786)")
    up.add_argument("--frontends", type=int, default=None, help="HTTP front-end processes sharing the port (default 1)")
    up.add_argument("--dashboard-port", type=int, default=None, help="Dask dashboard port (default 8787)")
    up.add_argument("--model", help="ONNX image classifier (default: ResNet-50, random weights)")
    repository(up)
    up.add_argument(
        "--public-address",
        help="HOST:PORT remote workers dial (bore.pub:PORT), or 'bore' to start the tunnel: the scheduler port "
        "then speaks mutual TLS only and JOIN_TOKEN= is printed",
    )
    up.add_argument("--rotate-ca", action="store_true", help="new cluster CA: every earlier join token stops working")
    up.add_argument(
        "--worker-slowdown",
        type=_factors,
        default=None,
        help="benchmark knob: comma-separated factors, one per worker (1,4 makes the second worker 4x slower)",
    )
    batching(up)
    workers(up)

    s = sub.add_parser("scheduler", help="a Dask scheduler with the batch-router plugin")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--dashboard-port", type=int, default=None)
    s.add_argument("--model")
    s.add_argument("--model-name")
    repository(s)
    # The cluster's batch shapes and precision: its workers take them from here.
    s.add_argument("--max-batch-size", type=int, help="rows per batch (default 32)")
    s.add_argument("--buckets", type=_sizes, help="batch sizes batches are padded to, e.g. 1,8,32 (default powers of two)")
    s.add_argument("--precision", choices=["fp32", "fp16"], help="what the workers run (default fp32; fp16 needs CUDA)")
    s.add_argument(
        "--public-address",
        help="HOST:PORT workers dial (e.g. bore.pub:41234), or 'bore' to start `bore local` and use the "
        "address it announces: listen with mutual TLS only and print JOIN_TOKEN=",
    )
    s.add_argument("--rotate-ca", action="store_true", help="new cluster CA: every earlier join token stops working")

    w = sub.add_parser("worker", help="a Dask worker that loads the cluster's model")
    w.add_argument("scheduler_address", nargs="?", help="tcp://127.0.0.1:8786 (loopback; remote ones need --join)")
    w.add_argument("--join", metavar="TOKEN", default=os.environ.get("BATCH_ROUTER_JOIN_TOKEN"),
                   help="the scheduler's JOIN_TOKEN (or env BATCH_ROUTER_JOIN_TOKEN): address and TLS credentials")
    w.add_argument("--name", default=None)
    w.add_argument("--slowdown", type=float, default=None, help="benchmark knob: the ONNX Runtime session runs this many times slower")
    w.add_argument("--contact-address", default=None,
                   help="the address this worker advertises; behind NAT nothing need reach it (replies ride its own connection)")
    workers(w)

    f = sub.add_parser("serve", help="the HTTP front end, for a running scheduler")
    f.add_argument("--scheduler", required=True, help="e.g. tcp://127.0.0.1:8786")
    f.add_argument("--host", default=None)
    f.add_argument("--port", type=int, default=None)
    f.add_argument("--grpc-port", type=int, default=None, help="KServe v2 gRPC port (default 8001; 0 = off)")
    f.add_argument("--frontends", type=int, default=None, help="front-end processes sharing the port (default 1)")
    batching(f)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from router_api.launch import CPUS_ENV

    if args.role == "worker" and os.environ.get(CPUS_ENV):  # from `up` (worker.cpu-affinity), before any thread
        os.sched_setaffinity(0, {int(c) for c in os.environ[CPUS_ENV].split(",")})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.role == "up" and args.worker_slowdown and args.workers is None:
        args.workers = len(args.worker_slowdown)
    settings = settings_from(args)
    from router_api import launch

    if args.role == "up":
        slowdown = args.worker_slowdown or []
        if len(slowdown) > settings.worker.count:
            raise SystemExit(f"--worker-slowdown gives {len(slowdown)} factors for {settings.worker.count} workers")
        coro = launch.up(settings, slowdown, args.rotate_ca)
    elif args.role == "scheduler":
        coro = launch.run_scheduler(settings, args.rotate_ca)
    elif args.role == "worker":
        coro = launch.run_worker(args.scheduler_address, args.name, args.join, args.contact_address)
    else:
        coro = launch.serve(settings, args.scheduler)
    try:
        asyncio.run(coro)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
