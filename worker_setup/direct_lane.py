"""Batches straight from a front end on the same host: one connection, one hop each way.

A Dask task crosses the scheduler twice (front end -> scheduler -> worker, and the
reply worker -> scheduler -> front end) and costs the scheduler a task's bookkeeping;
on one host the front end can reach the worker's own listener instead. The worker
answers ``batch_router_run`` on that connection with the same reply a task would
publish (``run_spec``), on threads of its own, so Dask's task threads stay free for the
Python API. Workers elsewhere (behind NAT, through a tunnel) keep the task route, which
needs no connection to them.
"""

from __future__ import annotations

import asyncio
import pickle
from concurrent.futures import ThreadPoolExecutor

from distributed.protocol import to_serialize

from core.protocol import DIRECT_OP, BatchSpec
from worker_setup.execute import run_spec
from worker_setup.shelf import Shelf


def address(worker) -> str | None:
    """Where a front end on this host reaches the worker: its listener itself, not the
    address it advertises (a tunnel's or a NAT's, maybe unreachable from here)."""
    try:
        return worker.listener.contact_address
    except Exception:  # not listening on a network transport
        return None


def install(worker, shelf: Shelf, threads: int) -> ThreadPoolExecutor:
    """Answer direct batches on ``threads`` threads: as many as the worker's task threads,
    so one batch decodes while another holds the device, as tasks do. Returns the
    threads, for the Unix-socket lane (``unix_lane``) to share."""
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="batch-router-direct")

    async def batch_router_run(spec: BatchSpec | bytes) -> dict:  # Dask's Server logs handlers by __name__
        if isinstance(spec, bytes):  # pickled by the front end (router_api.link_lanes.lane_payload)
            spec = pickle.loads(spec)
        shelf.accept()  # waiting for a thread counts: it is this worker's load
        try:
            reply = await asyncio.get_running_loop().run_in_executor(pool, run_spec, worker.address, spec, lambda: shelf.get(spec.model))
        finally:
            load = shelf.reply_leaves()
        reply.load = load
        return reply.to_wire(to_serialize)  # output tensors as frames of their own: no copy here

    worker.handlers[DIRECT_OP] = batch_router_run
    return pool
