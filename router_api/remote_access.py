"""Letting remote workers in: the address they dial (given, or a bore tunnel started
here), the cluster CA that makes that port mutual TLS only, and the join token to print."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from router_api.tls import ClusterCA, make_token


@dataclass
class RemoteAccess:
    address: str  # HOST:PORT that remote workers dial
    ca: ClusterCA
    bore: subprocess.Popen | None = None

    @classmethod
    def open(cls, public_address: str, port: int, host: str, ca_dir: Path, bore_server: str,
             rotate_ca: bool = False) -> RemoteAccess:  # fmt: skip
        """``public_address`` "bore" starts ``bore local PORT`` and uses what it announces."""
        bore = None
        if public_address == "bore":
            from router_api.bore import start_bore

            bore, public_address = start_bore(port, bore_server)
            print(f"batch-router: bore tunnel {public_address} -> 127.0.0.1:{port}", flush=True)
        ca = ClusterCA.ensure(ca_dir, hosts=[public_address.rsplit(":", 1)[0], host], rotate=rotate_ca)
        return cls(public_address, ca, bore)

    def token(self, address: str | None = None) -> str:
        return make_token(f"tls://{address or self.address}", self.ca.credentials("worker"))

    def announce(self) -> None:
        print(f"batch-router: workers join with `batch-router worker --join TOKEN`; "
              f"rotate the CA ({self.ca.directory}) with --rotate-ca to revoke every token", flush=True)
        print(f"JOIN_TOKEN={self.token()}", flush=True)

    def close(self) -> None:
        if self.bore is not None:
            self.bore.terminate()
