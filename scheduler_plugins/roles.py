"""A join token's certificate can run a worker, and nothing else.

The token a Colab notebook holds carries the cluster's *worker* certificate. Dask's
mutual TLS proves a peer belongs to the cluster, not what it may do: with that
certificate as a client, a notebook could submit tasks or ``run_on_scheduler`` and read
the laptop's files. So on a TLS scheduler every handler but the few a worker needs
refuses a peer whose certificate names the worker role; the front end's and admin
client's certificates (``batch-router client``) never leave the scheduler's host.
Plaintext peers can only be local (the scheduler refuses a public address without TLS).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

WORKER_ROLE = "batch-router worker"  # router_api.tls issues role certificates as "batch-router <role>"
# What a worker asks of its scheduler: to join, to beat, to leave, to find its
# dependencies, to declare resources, and the cluster's models.
WORKER_OPS = frozenset({"register-worker", "heartbeat_worker", "unregister", "who_has", "set_resources",
                        "batch_router_model", "batch_router_models", "batch_router_model_chunk", "close"})  # fmt: skip


def peer_role(comm: Any) -> str | None:
    """The common name of the peer's certificate, or None without one."""
    cert = (getattr(comm, "extra_info", None) or {}).get("peercert") if comm is not None else None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def refuse_workers(scheduler) -> None:
    """Wrap every scheduler handler a worker does not need so that it refuses worker
    certificates. Call once all handlers are registered (the plugin's own included)."""
    for op, handler in list(scheduler.handlers.items()):
        if op not in WORKER_OPS and not getattr(handler, "refuses_workers", False):
            scheduler.handlers[op] = _guarded(op, handler)


def _guarded(op: str, handler: Callable) -> Callable:
    params = list(inspect.signature(handler).parameters)
    takes_comm = bool(params) and params[0] == "comm"

    async def guarded(comm, **kwargs):
        if peer_role(comm) == WORKER_ROLE:
            raise PermissionError(f"a worker certificate may only run a worker, not {op!r}")
        result = handler(comm, **kwargs) if takes_comm else handler(**kwargs)
        return await result if inspect.isawaitable(result) else result

    guarded.__name__ = getattr(handler, "__name__", op)
    guarded.refuses_workers = True  # type: ignore[attr-defined]
    return guarded
