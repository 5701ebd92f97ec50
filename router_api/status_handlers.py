"""The router's own status endpoints: its workers, request traces, Prometheus metrics,
and where its dashboard is. The inference protocol's handlers are ``handlers.py``."""

from __future__ import annotations

import os

from core import trace
from router_api import prometheus
from router_api.json_handler import JSONHandler
from router_api.telemetry import model_row


class Workers(JSONHandler):
    """GET /v1/workers: the front end's live view of every model worker (no secrets)."""

    def get(self) -> None:
        d = self.router.dispatcher
        queue = {"requests": len(d.queue), "rows": d.queue.rows, "received": d.received, "batches_sent": d.sent,
                 "hedged": d.hedges, "probes": d.probes}  # fmt: skip
        shm = self.router.shm.stats() if self.router.shm is not None else None  # request bodies in shared memory
        me = {"pid": os.getpid(), "client": self.router.link.client.id,  # which of several front ends answered
              "scheduler": "lost" if d.scheduler_lost is not None else "connected"}  # fmt: skip
        models = {x.name: model_row(x) for x in self.router.dispatchers}  # each model's own queue and counts
        self.write_json({"policy": d.policy.name, "frontend": me, "workers": self.router.workers(), "queue": queue, "models": models,
                         "shared_memory": shm})  # fmt: skip


class Trace(JSONHandler):
    """GET /v1/trace[?last=N]: where requests' time went, hop by hop (``batch-router.trace``):
    a summary of the last traced requests (up to 1,000, or N), and the latest few in full."""

    def get(self) -> None:
        traces = self.router.traces
        if traces is None:
            return self.write_json({"enabled": False, "count": 0})
        try:
            last = int(self.get_query_argument("last", "0"))  # only the last N answered: one window's
        except ValueError:
            return self.fail(400, "last must be an integer")
        recent = list(traces)[-last:] if last > 0 else list(traces)
        start = lambda t: t["arrival"]  # noqa: E731
        latest = [{"hops_ms": trace.hops(t), "clock": t.get("clock")} for t in sorted(recent, key=start)[-10:] if trace.complete(t)]
        self.write_json({"enabled": True, "stamps": list(trace.STAMPS), **trace.summary(recent), "latest": latest})


class Metrics(JSONHandler):
    """GET /metrics: Prometheus's text format, Triton's names (router_api/prometheus.py);
    errors (a POST, say) in the protocol's JSON like every other endpoint."""

    def get(self) -> None:
        r = self.router
        snapshot = r.link.telemetry.snapshot(list(r.link.dispatchers.values()), r.link.now)
        self.set_header("Content-Type", prometheus.CONTENT_TYPE)
        self.finish(prometheus.render(snapshot, list(r.stats().values()), r.workers(), r.version))


class Dashboard(JSONHandler):
    """GET /v1/dashboard: where this service's dashboard pages are."""

    def get(self) -> None:
        base = self.router.dashboard
        if base is None:
            return self.fail(404, "the scheduler did not report a dashboard")
        pages = {"overview": "gpu-router", "gpu-metrics": "individual-gpu-metrics", "batch-queues": "individual-batch-queues"}
        self.write_json({"dashboard": base, "pages": {k: f"{base}/{v}" for k, v in pages.items()}})
