"""The processes a load test measures: the spawned router and the baselines.

--spawn starts `batch-router up` on free ports; the baselines are the bare Tornado server
and raw ONNX Runtime, either a one-shot `raw_ort` run or `raw_ort --serve` driven over its
stdin window by window for --rounds. Each runs in its own process and session, so it has
its own threads and memory, a terminal Ctrl-C reaches only loadtest, and loadtest alone
decides when each stops; starting, readiness checks and stopping all live here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from core.entries import SUFFIX
from benchmarks.windows import get

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BATCH_SIZES = "1,8,32"


_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now and never handed out before by this process: the kernel may
    offer a port it just offered, and two roles of one cluster must not get the same."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def _wait_ready(proc: subprocess.Popen, url: str, timeout: float, what: str) -> None:
    u, deadline = urlsplit(url), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode} before it was ready")
        ready = f"{u.path.rstrip('/')}/v2/health/ready"
        if asyncio.run(get(u.hostname or "127.0.0.1", u.port or 80, ready))[0] == 200:
            return
        time.sleep(0.5)
    stop(proc)
    raise SystemExit(f"{what} not ready at {url}/v2/health/ready within {timeout:.0f} s")


def stop(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGINT (a clean shutdown, as Ctrl-C would), then SIGKILL if it will not go."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def spawn_router(args: argparse.Namespace, root: Path = ROOT) -> tuple[subprocess.Popen, str]:
    """``batch-router up`` from the source tree ``root`` (this one unless comparing)."""
    port = free_port()
    # `python -m` from this tree, never a console script: that would run whichever copy
    # is installed, and there is none where the package is only on PYTHONPATH.
    grpc_port = free_port() if getattr(args, "protocol", "http").startswith("grpc") else 0
    if grpc_port:
        args.grpc_target = f"127.0.0.1:{grpc_port}"
    cmd = [sys.executable, "-m", "router_api.cli", "up", "--port", str(port), "--grpc-port", str(grpc_port),
           "--dashboard-port", str(free_port()), "--scheduler-port", str(free_port())]
    if args.model_path:
        cmd += ["--model", str(args.model_path)]
    # The name the load is sent to; a -uint8 name is the router's second name for the model.
    cmd += ["--model-name", args.model.removesuffix(SUFFIX)]
    cmd += shlex.split(args.spawn_args)
    # Its log goes to a file, so the progress bar and summary stay readable.
    log = tempfile.NamedTemporaryFile("w", prefix="batch-router-", suffix=".log", delete=False)
    print(f"spawning: {shlex.join(cmd)}\n  log: {log.name}", flush=True)
    # Own session: a terminal Ctrl-C reaches only us; we then stop the router ourselves.
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, 120, "batch-router")
    except SystemExit:
        print("".join(Path(log.name).read_text().splitlines(True)[-20:]), file=sys.stderr)
        raise
    return proc, url


def spawned_flag(proc: subprocess.Popen, flag: str) -> Optional[str]:
    """The value a spawned process was started with for ``flag`` (its last one, as
    --spawn-args may repeat it), in either ``--flag V`` or ``--flag=V`` form."""
    value = None
    cmd = [str(a) for a in proc.args] if isinstance(proc.args, (list, tuple)) else []
    for i, a in enumerate(cmd):
        if a == flag and i + 1 < len(cmd):
            value = cmd[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def spawned_dashboard(proc: subprocess.Popen) -> Optional[str]:
    """The Dask dashboard a spawned router was started with, for when the router itself
    does not report one."""
    port = spawned_flag(proc, "--dashboard-port")
    return f"http://127.0.0.1:{port}" if port else None


def spawn_bare(meta: Optional[dict]) -> tuple[subprocess.Popen, str, Optional[str]]:
    cmd = [sys.executable, "-m", "benchmarks.bare_server", "--port", "0"]
    meta_file = None
    if meta:
        fd, meta_file = tempfile.mkstemp(prefix="bare-meta-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f)
        cmd += ["--metadata", meta_file]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    line = proc.stdout.readline() if proc.stdout else ""  # "... listening on 127.0.0.1:P"
    m = re.search(r":(\d+)\s*$", line)
    if not m:
        stop(proc)
        raise SystemExit(f"bare_server did not start: {line!r}")
    url = f"http://127.0.0.1:{m.group(1)}"
    _wait_ready(proc, url, 30, "bare_server")
    return proc, url, meta_file


def _model_path(args: argparse.Namespace) -> Path:
    """The file raw ONNX Runtime runs: the model's, or for a ``-uint8`` name the same
    graph a worker builds for it (preprocessing merged ahead), so both take one payload."""
    from scheduler_plugins.builtin_models import ensure_default_model

    path = args.model_path if args.model_path is not None else ensure_default_model()
    if not args.model.endswith(SUFFIX):
        return path
    import dask.config

    from core.config import cache_dir, parse
    from scheduler_plugins.model_store import sha256_file
    from worker_setup.preprocess_graph import ensure_uint8

    return ensure_uint8(Path(path), sha256_file(path), cache_dir(parse(dask.config.get("batch-router", None))))


def _raw_env(args: argparse.Namespace) -> dict:
    """raw_ort decodes the load test's own JPEG: its size goes down by environment."""
    return {**os.environ, "BATCH_ROUTER_BENCH_JPEG": getattr(args, "jpeg_size", None) or "320x240"}


def run_raw(args: argparse.Namespace, duration: float) -> dict:
    """raw_ort in a subprocess: its own threads and memory, nothing shared with us."""
    cmd = [sys.executable, "-m", "benchmarks.raw_ort", "--model-path", str(_model_path(args)),
           "--mode", args.mode, "--threads", str(args.baseline_threads),
           "--duration", f"{duration}s", "--seed", str(args.seed)]
    if args.baseline_batch_sizes != DEFAULT_BATCH_SIZES:
        cmd += ["--batch-sizes", args.baseline_batch_sizes]
    print("baseline:", shlex.join(cmd), flush=True)
    out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True, env=_raw_env(args)).stdout
    lines = out.strip().splitlines()
    print("\n".join(lines[:-1]), flush=True)
    return json.loads(lines[-1])


class RawServer:
    """`raw_ort --serve` in a subprocess: the session is loaded once, then each window()
    runs one measurement there while we wait (so nothing else runs beside it)."""

    def __init__(self, args: argparse.Namespace, batch_sizes: list[int]) -> None:
        cmd = [sys.executable, "-m", "benchmarks.raw_ort", "--serve",
               "--model-path", str(_model_path(args)), "--mode", args.mode,
               "--threads", str(args.baseline_threads), "--duration", f"{args.duration}s",
               "--batch-sizes", ",".join(map(str, batch_sizes)), "--seed", str(args.seed)]
        print("baseline:", shlex.join(cmd), flush=True)
        # Own session: a terminal Ctrl-C reaches only us; close() ends it.
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, env=_raw_env(args),
                                     stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            self.info = self._answer()
        except BaseException:
            self.close()
            raise

    def _answer(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.lstrip().startswith("{"):
                out = json.loads(line)
                if "error" in out:
                    raise SystemExit(f"raw_ort: {out['error']}")
                return out
        raise SystemExit(f"raw_ort exited with code {self.proc.wait()}")

    def window(self, duration: float, batch_sizes: list[int]) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"duration": duration,
                                          "batch_sizes": batch_sizes}) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        """EOF on its stdin ends it; killed if it does not go."""
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
