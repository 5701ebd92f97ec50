"""The placement benchmark's processes: one `batch-router up` per policy, the requests
it is sent, and finding (and watching) its worker processes for the kill run."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
from typing import Optional
from urllib.parse import urlsplit

from benchmarks.http_client import Connection
from benchmarks.payloads import payload
from benchmarks.servers import ROOT, spawn_router, stop
from benchmarks.windows import get_json


def worker_pids(parent: int) -> dict[str, int]:
    """The worker processes `batch-router up` started, by --name, read from /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # "pid (comm) state ppid ...": comm may hold spaces, so split after ")"
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except (OSError, IndexError, ValueError):
            continue
        if "--name" in argv and argv.index("--name") + 1 < len(argv):
            out[argv[argv.index("--name") + 1]] = int(entry)
    return out


def is_dead(pid: int) -> bool:
    """Gone, or a zombie its parent has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def git_dirty() -> Optional[bool]:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                             cwd=ROOT, capture_output=True, text=True, timeout=5)
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class Router:
    """One `batch-router up` for one policy, with its load's request and addresses."""

    def __init__(self, args: argparse.Namespace, policy: str, slowdown: list[float]) -> None:
        flags = ["--workers", str(len(slowdown)), "--threads", str(args.threads),
                 "--worker-slowdown", ",".join(f"{s:g}" for s in slowdown),
                 "--policy", policy, "--max-queue-delay", args.max_queue_delay]
        if args.window:
            flags += ["--window", str(args.window)]
        spawn = argparse.Namespace(model_path=args.model_path, model=args.model,
                                   spawn_args=shlex.join(flags) + " " + args.spawn_args)
        self.policy, self.slowdown = policy, slowdown
        self.proc, url = spawn_router(spawn)
        try:
            self.log = os.readlink(f"/proc/{self.proc.pid}/fd/1")  # servers.py's log file
        except OSError:
            self.log = None
        u = urlsplit(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        try:
            meta = asyncio.run(get_json(self.host, self.port, f"/v2/models/{args.model}"))
            self.path, self.headers, self.body, self.rows = payload(args, meta)
            if args.send_deadline:
                self.path, self.headers, self.body = with_timeout(self.path, self.headers, self.body, args.deadline)
        except BaseException:
            self.close()
            raise

    async def send(self, conn: Connection):
        return await conn.request("POST", self.path, self.headers, self.body)

    def close(self) -> None:
        stop(self.proc)


def with_timeout(path: str, headers: dict, body: bytes, seconds: float) -> tuple[str, dict, bytes]:
    """The request carrying the goodput deadline as its Triton ``timeout`` (µs): the
    router then answers 504 for a request already late instead of serving it late, and
    an overload sheds its backlog instead of making every later request late too."""
    us = int(seconds * 1e6)
    if "Inference-Header-Content-Length" not in headers:  # /v1/classify: a query argument
        return f"{path}?timeout={us}", headers, body
    n = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:n])
    header.setdefault("parameters", {})["timeout"] = us
    head = json.dumps(header).encode()
    return path, {**headers, "Inference-Header-Content-Length": str(len(head))}, head + body[n:]
