"""The front end's statistics reach the scheduler's dashboard: a snapshot every
``dashboard.interval`` by a plugin RPC, whether the front end shares the scheduler's
process (``up``) or runs apart from it (``serve``)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from router_api import config

if TYPE_CHECKING:
    from router_api.dispatch import Dispatcher

logger = logging.getLogger("router_api.reporting")


async def report_loop(dispatcher: Dispatcher) -> None:
    """Send the telemetry snapshot until the dispatcher closes. A scheduler that cannot
    take it (unreachable for a moment, or without the plugin) costs a warning, never a
    request."""
    interval = config.seconds("dashboard.interval")
    if interval <= 0:
        return
    failing = False
    while not dispatcher.closing:
        await asyncio.sleep(interval)
        try:
            snapshot = dispatcher.telemetry.snapshot(dispatcher)
            reply = await dispatcher.client.scheduler.batch_router_frontend(frontend=dispatcher.client.id, stats=snapshot)
            if reply.get("status") != "OK":
                raise ValueError(reply.get("message"))
            if failing:
                logger.info("dashboard statistics reach the scheduler again")
            failing = False
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not failing:
                logger.warning("could not send statistics to the dashboard: %s", e)
            failing = True
