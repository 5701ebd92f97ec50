"""What goes into the Dispatcher and what comes out of it.

Events say what happened (a request arrived, a worker joined, a reply came back, time
passed); actions say what the shell must do about it (send a batch, answer or fail a
request, release a Dask future). Every event carries the loop clock's ``now``: the
Dispatcher never reads a clock, so tests drive it with a fake one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.protocol import BatchReply, Item, Result
from core.worker_view import WorkerView
from router_api.batching import Pending


class Unavailable(Exception):
    """503: queue full, shutting down, or the scheduler cannot be reached."""


class ModelGone(LookupError):
    """404: the model is being unloaded (or was): its queue takes nothing new."""


class DeadlineExceeded(Exception):
    """504: the request's timeout passed before it was answered."""


@dataclass(eq=False)
class Request(Pending):
    """One request from arrival to answer. ``priority`` starts as the client asked
    (0 = default) and holds the resolved level once queued."""

    item: Item | None = None  # what travels; dropped once it never will
    packed: Item | None = None  # ``item`` compressed for far workers, made once
    waiter: Any = None  # the shell's handle on whoever waits (a future); opaque here
    timeout_s: float = 0.0  # as the client asked; 0 = the default
    model: str = ""  # the model name it came in for ("" = the cluster's model): whose statistics count it
    trace: dict | None = None  # core.trace's stamps, when tracing is on
    carriers: int = 0  # batches in flight that hold it and may still answer it
    # May a hedge or probe copy it? Not when its cost is its own input's (a large image):
    # a copy would only pay that cost twice, on a second worker.
    copyable: bool = True
    done: bool = False  # answered, failed or given up by its client
    dispatcher: Any = field(default=None, repr=False)  # its model's, in the shell: where a cancel goes


@dataclass(eq=False)
class Batch:
    id: str
    view: WorkerView | None  # None: sent unrestricted, Dask picks the worker
    requests: list[Request]
    items: list[Item]  # what the worker gets, compressed for far workers
    sent_at: float
    due: float = float("inf")  # past this the worker is presumed stuck
    hedge_at: float = float("inf")  # past this a copy may go to another worker
    hedged: bool = False  # a copy was sent, or this is one: never hedge twice
    alone: bool = False  # its worker had nothing else in flight: the round trip is clean
    probe: bool = False  # a copy that re-measures an idle worker: it carries nobody
    copy_of: Batch | None = field(default=None, repr=False)  # a hedge's or probe's original

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.requests)


# -- events ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    now: float


@dataclass(frozen=True)
class Arrived(Event):
    request: Request


@dataclass(frozen=True)
class Cancelled(Event):
    """The client went away."""

    request: Request


@dataclass(frozen=True)
class Wake(Event):
    """Requests arrived, or a queue timer fired: send what can go."""


@dataclass(frozen=True)
class Tick(Event):
    """The watchdog's beat (every 100 ms): hedges, stuck workers, in-flight deadlines."""


@dataclass(frozen=True)
class WorkerJoined(Event):
    info: dict  # the plugin's entry: address, name, sha256, device, providers...
    version: int = 0


@dataclass(frozen=True)
class WorkerLeft(Event):
    address: str
    version: int = 0


@dataclass(frozen=True)
class WorkersListed(Event):
    """The plugin's full list, to catch anything its events missed."""

    workers: dict[str, dict]
    version: int


@dataclass(frozen=True)
class MetricsDigest(Event):
    """Every worker's heartbeat metrics, as the plugin publishes them each interval."""

    workers: dict[str, dict]


@dataclass(frozen=True)
class Replied(Event):
    reply: BatchReply


@dataclass(frozen=True)
class Lost(Event):
    """A batch's task ended without a reply (Dask says why in ``reason``)."""

    batch_id: str
    reason: str


@dataclass(frozen=True)
class Unreachable(Event):
    """A batch sent straight to its worker lost the connection before a reply: nothing
    says whether it ran, so its requests go back to the queue."""

    batch_id: str
    reason: str


@dataclass(frozen=True)
class NotSent(Event):
    """Dask would not take a batch's task (the client lost the scheduler, say)."""

    batch_id: str
    reason: str


@dataclass(frozen=True)
class Closing(Event):
    """Stop taking requests; what is queued and in flight is still served."""


@dataclass(frozen=True)
class Abort(Event):
    """Shutdown cannot wait longer: everything left is answered 503."""


@dataclass(frozen=True)
class SchedulerLost(Event):
    """The Dask client lost its scheduler: no batch can be sent, nor its reply trusted."""

    reason: str


@dataclass(frozen=True)
class SchedulerBack(Event):
    """Connected again, to this scheduler or a new one: a worker listing follows."""


# -- actions ---------------------------------------------------------------------------


@dataclass
class Send:
    batch: Batch


@dataclass
class Hedge(Send):
    """A copy of a slow batch, to the worker that would finish it first."""


@dataclass
class Probe(Send):
    """A copy of one request, to re-measure an idle worker whose curve went stale."""


@dataclass
class Answer:
    """A request's result; also what its waiter receives."""

    request: Request
    result: Result
    worker: str  # display name of the worker that answered
    batch_rows: int  # rows in the batch that answered


@dataclass
class Fail:
    request: Request
    error: Exception


@dataclass
class Requeue:
    """Requests put back at the head of the queue (already done by the Dispatcher)."""

    requests: list[Request]
    reason: str


@dataclass
class Forget:
    """A batch left the ledger: its Dask future can go."""

    batch_id: str


Action = Send | Answer | Fail | Requeue | Forget
