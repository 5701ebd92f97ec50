"""Start ``bore local PORT --to SERVER`` and learn the public address it was given.

bore (github.com/ekzhang/bore) prints ``listening at bore.pub:41234`` once the tunnel
is up; workers anywhere then dial that address, and bore forwards to our loopback port.
The tunnel carries only TLS: the scheduler never listens in plaintext when public.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
import time

logger = logging.getLogger("router_api.bore")

LISTENING = re.compile(r"listening at ([\w.-]+:\d+)")


class BoreError(RuntimeError):
    pass


def start_bore(local_port: int, server: str = "bore.pub", timeout: float = 30.0) -> tuple[subprocess.Popen, str]:
    """The running bore client and the public HOST:PORT it announced."""
    exe = shutil.which("bore")
    if exe is None:
        raise BoreError(
            "bore is not on PATH: install it (cargo install bore-cli, or a release binary from "
            "github.com/ekzhang/bore) or give --public-address HOST:PORT of a tunnel you run yourself"
        )
    proc = subprocess.Popen(
        [exe, "local", str(local_port), "--to", server], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:  # keep draining bore's output for as long as it runs
        for line in proc.stdout:  # type: ignore[union-attr]
            m = LISTENING.search(line)
            if m and not found:
                found.append(m.group(1))
                ready.set()
            logger.info("bore: %s", line.rstrip())
        ready.set()

    threading.Thread(target=read, name="bore-output", daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            proc.kill()
            raise BoreError(f"bore did not announce a public address within {timeout:.0f} s")
    if not found:
        raise BoreError(f"bore exited ({proc.poll()}) without a public address: is {server} reachable?")
    return proc, found[0]
