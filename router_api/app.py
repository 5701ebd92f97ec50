"""The HTTP front end: a Tornado application over one Dispatcher.

``start_front_end`` works the same whether the Dask client is in the scheduler's own
process (``batch-router up``) or connected over TCP (``batch-router serve``).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import numpy as np
from tornado import httpserver, web

from core.config import Settings
from core.entries import PREPROCESSING, UINT8
from core.labels import load_labels
from router_api import kserve
from router_api.body_handler import BodyWatch
from router_api.cluster_link import ClusterLink
from router_api.dispatch_events import Answer
from router_api.dispatcher import Dispatcher
from router_api.shm import ShmPool
from router_api.json_handler import HEAD_READ
from router_api.handlers import (
    Classify,
    Infer,
    Live,
    ModelConfig,
    ModelMetadata,
    ModelReady,
    ModelStatistics,
    NotFound,
    Ready,
    ServerMetadata,
)
from router_api.repository import RepositoryIndex, RepositoryModel
from router_api.shm_handlers import ShmRegister, ShmStatus, ShmUnregister
from router_api.status_handlers import Dashboard, Metrics, Trace, Workers
from router_api.system_shm import Registry

logger = logging.getLogger("router_api.app")

EXTENSIONS = ["binary_tensor_data", "model_configuration", "model_repository", "schedule_policy", "statistics",
              "system_shared_memory"]  # fmt: skip
TRACES_KEPT = 1000
RANDOM_WEIGHTS_NOTE = "random (seed=0): predictions are meaningless"


def tensor_specs(tensors: list[dict]) -> list[kserve.TensorSpec]:
    return [kserve.TensorSpec(t["name"], kserve.datatype_of(np.dtype(t["dtype"])), tuple(t["shape"])) for t in tensors]


@dataclass(frozen=True)
class Entry:
    """One model name the service answers to (``core.entries``): a model's own, or its
    ``-uint8`` twin, both queued on that model's dispatcher."""

    name: str
    kind: str  # "": the model file as it is; "uint8": behind in-graph preprocessing
    inputs: list[kserve.TensorSpec]
    outputs: list[kserve.TensorSpec]
    model: dict  # the model's info, from the scheduler
    dispatcher: Dispatcher

    @property
    def max_batch_size(self) -> int:
        return self.dispatcher.queue.max_batch_size


class Router:
    """What the handlers read: the models' names and metadata, settings, and the link to
    the cluster. ``entries`` follows the models the cluster serves as they load and unload."""

    version = "1"

    def __init__(self, link: ClusterLink, settings: Settings) -> None:
        self.link = link
        self.settings = settings
        # Bound to loopback: only loopback names may appear in Host (a DNS-rebinding page's
        # would not); bound beyond it, any (use http.auth-token there).
        host = settings.http.host
        loopback = {"localhost", "127.0.0.1", "::1"}
        self.allowed_hosts: set[str] | None = loopback | {host} if host in loopback or host.startswith("127.") else None
        self.max_body_size = settings.http.max_body_size
        self.retry_after = settings.retry_after
        self.top_k = settings.http.top_k
        self.entries: dict[str, Entry] = {}
        self.labels_of: dict[str, list[str]] = {}  # model name -> class names
        self.refresh()
        first = self.link.dispatcher.model
        # /v1/classify and the Python API serve the first model; images go to its uint8
        # entry where there is one: workers normalise them in the graph.
        self.model, self.model_name = first, first["name"]
        self.images = first["uint8"]["name"] if first.get("uint8") else self.model_name
        self.max_batch_size = self.link.dispatcher.queue.max_batch_size
        self.num_classes = max(1, self.entries[self.model_name].outputs[0].shape[-1])
        self.labels = self.labels_of[self.model_name]
        self.dashboard: str | None = None  # the Dask dashboard's base URL, when known
        self.grpc = None  # the gRPC server (router_api.grpc_server), when grpc.port is set
        self.traces: deque | None = deque(maxlen=TRACES_KEPT) if settings.trace else None  # core.trace, when on
        self.body_watch = BodyWatch()  # request bodies still arriving, checked for time and rate
        # Tensor request bodies for workers on this host, in shared memory (router_api.shm).
        self.shm = ShmPool(settings.shared_memory) if settings.shared_memory and link.direct else None
        self.system_shm = Registry()  # clients' regions (Triton's system shared-memory extension)
        link.on_models = self.refresh

    @property
    def dispatcher(self) -> Dispatcher:
        return self.link.dispatcher

    def keep_trace(self, trace: dict | None) -> None:
        """A request's trace, once answered: kept for /v1/trace if a worker answered it."""
        if trace is not None and "received" in trace:
            trace["answered"] = self.link.now
            self.traces.append(trace)

    @property
    def dispatchers(self) -> list[Dispatcher]:
        return list(self.link.dispatchers.values())

    def refresh(self) -> None:
        """The names served now: each model's, and its ``-uint8`` twin's."""
        entries = {}
        first = next(iter(self.link.dispatchers), None)
        for name, d in self.link.dispatchers.items():
            m = d.model
            outputs = tensor_specs(m["outputs"])
            entries[name] = Entry(name, "", tensor_specs(m["inputs"]), outputs, m, d)
            if u := m.get("uint8"):
                entries[u["name"]] = Entry(u["name"], UINT8, tensor_specs(u["inputs"]), tensor_specs(u["outputs"]), m, d)
            if name not in self.labels_of:
                width = max(1, outputs[0].shape[-1]) if outputs else 1
                self.labels_of[name] = m.get("labels") or load_labels(self.settings.labels if name == first else None, width)
        self.entries = entries

    def close(self) -> None:
        if self.shm is not None:
            self.shm.close()
        self.system_shm.close()

    def server_metadata(self) -> dict:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("gpu-batch-router")
        except PackageNotFoundError:  # run from a source tree (e.g. the GPU machine's PYTHONPATH)
            v = "0+source"
        return kserve.server_metadata("gpu-batch-router", v, EXTENSIONS)

    def model_metadata(self, entry: Entry) -> dict:
        m = entry.model
        meta = kserve.model_metadata(entry.name, self.version, "onnx_onnxv1", entry.inputs, entry.outputs)
        meta["parameters"] = {"sha256": m["sha256"], **m.get("metadata", {}), "precision": m.get("precision", "fp32")}
        if entry.kind == UINT8:
            meta["parameters"].update({"preprocessing": PREPROCESSING, "classifier": m["name"]})
        return meta

    def model_config(self, entry: Entry) -> dict:
        d = entry.dispatcher
        q = d.queue
        batching = {
            # Triton's preferred sizes, enforced: every batch is padded up to one of them.
            "preferred_batch_size": list(d.buckets),
            "max_queue_delay_microseconds": int(q.max_queue_delay * 1e6),
            "priority_levels": d.levels,
            "default_priority_level": d.default_level,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": int(d.default_timeout * 1e6),
                "allow_timeout_override": True,
                "max_queue_size": q.max_queue_size,
            },
        }
        return kserve.model_config(entry.name, "onnxruntime_onnx", q.max_batch_size, entry.inputs, entry.outputs, batching)

    def stats(self) -> dict:
        """Triton's statistics of every name served, by name."""
        return {name: s for d in self.dispatchers for name, s in d.entry_stats.items()}

    def workers(self) -> list[dict]:
        """One entry per worker: what it is, what it is doing, and how placement sees it.
        Startup info and metrics carry no secrets (no tokens, no keys)."""
        d = self.dispatcher
        views: dict = {}
        for x in self.dispatchers:  # a worker once, whichever models it holds; its load summed
            for v in x.views.values():
                views.setdefault(v.address, []).append(v)
        # options: ONNX Runtime's CUDA provider options as the session reports them, and
        # io_binding; warmup: each bucket's first and steady run, timed before it joined; uint8:
        # the uint8 entry's session (its warm-up), None when the cluster serves none.
        keys = ("device", "providers", "requested_providers", "cuda_fallback", "threads", "sha256", "precision", "buckets",
                "options", "cuda_graphs", "warmup", "uint8", "decoder", "restarts")  # fmt: skip
        now = self.link.now
        shares = d.weights(now)
        out = []
        for vs in views.values():
            v = vs[0]
            out.append({
                "address": v.address,
                "name": v.name,
                **{k: v.info.get(k) for k in keys},
                "gpu": v.gpu,
                "simulated": v.simulated,
                "route": self.link.route(v),  # "direct" (same host, its own listener) or "task" (through Dask)
                "weight": round(shares.get(v.address, 0.0), 4),
                "responsive": v.responsive,
                "window": v.window,
                "in_flight": sum(x.in_flight for x in vs),
                "rows_in_flight": sum(x.rows_in_flight for x in vs),
                "batches": sum(x.batches for x in vs),
                "rows": sum(x.rows for x in vs),
                "models": sorted(v.info.get("models") or {}),
                "padded_rows": v.reported.get("padded_rows"),
                "peak_batches": v.reported.get("peak_accepted"),  # most router batches it held at once, all front ends
                "service_s": v.service.as_dict(),
                "overhead_s": round(v.overhead, 6),
                "link_s": round(v.link, 6),
                "recent_errors": sum(1 for t in v.errors if now - t <= d.tuning.error_window),
                "metrics_error": v.metrics_error,
            })
        return out

    def predictions(self, answer: Answer) -> dict:
        top = answer.result
        return {
            "model": self.model_name,
            "predictions": [
                {"label": self.labels[i], "index": i, "probability": kserve.json_number(p)}
                for i, p in zip(top.indices, top.probabilities)
            ],
            "worker": answer.worker,
            "batch_size": answer.batch_rows,
        }


class App(web.Application):
    """Counts every response by status for the dashboard and ``/metrics`` (Tornado
    calls ``log_request`` once per finished request)."""

    def __init__(self, router: Router, handlers: list, **settings) -> None:
        super().__init__(handlers, **settings)
        self.telemetry = router.dispatcher.telemetry

    def log_request(self, handler: web.RequestHandler) -> None:
        self.telemetry.responses[handler.get_status()] += 1
        super().log_request(handler)


def make_app(router: Router) -> web.Application:
    args = {"router": router}
    model = r"/v2/models/([^/]+)(?:/versions/([^/]+))?"
    return App(
        router,
        [
            (r"/v2/health/live", Live, args),
            (r"/v2/health/ready", Ready, args),
            (r"/v2/?", ServerMetadata, args),
            (r"/v2/models/stats", ModelStatistics, args),
            (model + r"/?", ModelMetadata, args),
            (model + r"/ready", ModelReady, args),
            (model + r"/config", ModelConfig, args),
            (model + r"/stats", ModelStatistics, args),
            (model + r"/infer", Infer, args),
            (r"/v1/classify", Classify, args),
            (r"/v2/repository/index", RepositoryIndex, args),
            (r"/v2/repository/models/([^/]+)/(load|unload)", RepositoryModel, args),
            (r"/v2/systemsharedmemory(?:/region/([^/]+))?/status", ShmStatus, args),
            (r"/v2/systemsharedmemory/region/([^/]+)/register", ShmRegister, args),
            (r"/v2/systemsharedmemory(?:/region/([^/]+))?/unregister", ShmUnregister, args),
            (r"/v1/workers", Workers, args),
            (r"/v1/trace", Trace, args),
            (r"/v1/dashboard", Dashboard, args),
            (r"/metrics", Metrics, args),
        ],
        default_handler_class=NotFound,
        default_handler_args=args,
    )


BARE_400 = b"HTTP/1.1 400 Bad Request\r\n\r\n"
JSON_400 = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body := kserve.error_body("malformed HTTP request (request line, headers or chunked framing)")), body))  # fmt: skip


class ProtocolServer(httpserver.HTTPServer):
    """Tornado answers what it cannot parse (a garbage request line, a bad chunk size)
    with a bare 400 before any handler runs; this one writes it in the protocol's format."""

    def handle_stream(self, stream, address) -> None:
        write = stream.write

        def write_json_400(data, *args, **kwargs):
            if len(data) == len(BARE_400) and data == BARE_400:
                data = JSON_400
            return write(data, *args, **kwargs)

        stream.write = write_json_400
        super().handle_stream(stream, address)


async def start_front_end(client, settings: Settings, connect=None) -> tuple[Router, httpserver.HTTPServer]:
    """Link a Dispatcher to the cluster behind ``client`` and listen for HTTP; ``connect``
    makes a new client for the same scheduler, should it be lost (``ClusterLink``)."""
    listing = await client.scheduler.batch_router_models()
    link = ClusterLink(client, settings, listing["models"], connect)
    await link.start()
    router = Router(link, settings)
    try:
        router.dashboard = await client.scheduler.batch_router_dashboard()
    except Exception as e:  # an older plugin: the service runs, without the link
        logger.warning("the scheduler did not say where its dashboard is: %s", e)
    http = settings.http
    # Tornado's body timeout closes without a word: the handlers' own (408, 413) come first.
    server = ProtocolServer(make_app(router), max_body_size=router.max_body_size, max_header_size=HEAD_READ,
                                   idle_connection_timeout=http.idle_timeout or None, body_timeout=http.body_timeout + 5 if http.body_timeout else None)  # fmt: skip
    host, port = settings.http.host, settings.http.port
    # Several front ends share the port: the kernel spreads connections among them.
    server.listen(port, address=host, reuse_port=settings.http.frontends > 1)
    logger.info("HTTP front end on http://%s:%d (models %s)", host, port, ", ".join(link.dispatchers))
    if settings.grpc.port:
        from router_api.grpc_listen import start_grpc
        from router_api.grpc_server import InferenceService

        router.grpc = await start_grpc(InferenceService(router), host, settings.grpc.port, router.max_body_size,
                                       settings.grpc.acceptors, shared=settings.http.frontends > 1)  # fmt: skip
    return router, server
