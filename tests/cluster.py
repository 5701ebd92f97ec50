"""A real batch-router for integration tests: `batch-router up` in a subprocess, real
scheduler and worker processes, real HTTP on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.servers import free_port  # one source of distinct ports, for tests and benchmarks

ROOT = Path(__file__).resolve().parent.parent




@dataclass
class Cluster:
    workers: int = 2
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    scheduler_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    log: Path | None = None
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def scheduler(self) -> str:
        return f"tcp://127.0.0.1:{self.scheduler_port}"

    def start(self, timeout: float = 180.0) -> "Cluster":
        self.start_process()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"batch-router up exited with {self.proc.returncode}; log: {self.log}")
            try:
                if len(self.get("/v1/workers")["workers"]) >= self.workers:
                    return self
            except (OSError, urllib.error.URLError, ValueError):
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"cluster not ready after {timeout}s; log: {self.log}")

    def start_process(self) -> subprocess.Popen:
        """``batch-router up`` started, not waited for."""
        cmd = [
            sys.executable, "-m", "router_api.cli", "up",
            "--workers", str(self.workers),
            "--port", str(self.port),
            "--scheduler-port", str(self.scheduler_port),
            "--dashboard-port", str(self.dashboard_port),
            *self.args,
        ]  # fmt: skip
        out = open(self.log, "w") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self.proc

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read() or b"null")

    def stats(self, model: str = "resnet50-uint8") -> dict:
        """Triton's statistics of one model name: by default the one /v1/classify feeds."""
        return self.get(f"/v2/models/{model}/stats")["model_stats"][0]

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def child_pids(pid: int, marker: str) -> list[int]:
    """The processes ``pid`` started whose command line contains ``marker``
    (``"router_api.cli worker"``, ``" serve "``)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            parent = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if parent == pid and marker in cmd:
            out.append(int(entry))
    return out
