"""Going public: the address remote workers dial (given, or a bore tunnel started here),
the cluster CA that makes it mutual TLS only, and the join token to print."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from router_api import config
from router_api.tls import ClusterCA, make_token


def tls_dir() -> Path:
    configured = config.get("tls.dir")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CONFIG_HOME", "~/.config")).expanduser() / "gpu-batch-router" / "tls"


@dataclass
class Public:
    address: str  # HOST:PORT that remote workers dial
    ca: ClusterCA
    bore: subprocess.Popen | None = None

    @classmethod
    def open(cls, public_address: str, port: int, host: str, rotate_ca: bool = False) -> "Public":
        """``public_address`` "bore" starts ``bore local PORT`` and uses what it announces."""
        bore = None
        if public_address == "bore":
            from router_api.bore import start_bore

            bore, public_address = start_bore(port, config.get("scheduler.bore-server"))
            print(f"batch-router: bore tunnel {public_address} -> 127.0.0.1:{port}", flush=True)
        ca = ClusterCA.ensure(tls_dir(), hosts=[public_address.rsplit(":", 1)[0], host], rotate=rotate_ca)
        return cls(public_address, ca, bore)

    def token(self, address: str | None = None) -> str:
        return make_token(f"tls://{address or self.address}", self.ca.credentials("worker"))

    def announce(self) -> None:
        print(f"batch-router: workers join with `batch-router worker --join TOKEN`; "
              f"rotate the CA ({tls_dir()}) with --rotate-ca to revoke every token", flush=True)
        print(f"JOIN_TOKEN={self.token()}", flush=True)

    def close(self) -> None:
        if self.bore is not None:
            self.bore.terminate()
