"""batch-router's pages in the Dask dashboard: ``/gpu-router`` (overview, in the top
navigation), ``/individual-gpu-metrics`` and ``/individual-batch-queues`` (in "More…").

Bokeh applications are wired up when the Scheduler is constructed, so ``register()``
must run before that: importing ``scheduler_plugins.preload`` calls it, and Dask imports
a scheduler's preloads in its constructor, before it builds the dashboard.
"""

from __future__ import annotations

OVERVIEW = "gpu-router"
ROUTES = ("/gpu-router", "/individual-gpu-metrics", "/individual-batch-queues")


def register() -> None:
    """Add the pages to Dask's dashboard; idempotent."""
    from distributed.dashboard.scheduler import applications

    from scheduler_plugins.dashboard.batch_queues import batch_queues_doc
    from scheduler_plugins.dashboard.gpu_metrics import gpu_metrics_doc
    from scheduler_plugins.dashboard.overview import overview_doc

    for route, doc in zip(ROUTES, (overview_doc, gpu_metrics_doc, batch_queues_doc)):
        applications.setdefault(route, doc)


def add_to_navigation(scheduler) -> None:
    """Put the overview in the dashboard's top bar beside Status, Workers... Pages
    named ``individual-*`` are in the "More…" menu by themselves. The top bar is a
    memoized dict inside distributed, a private detail: a change there costs only
    the link."""
    try:
        from distributed.dashboard.scheduler import template_variables

        pages = template_variables(scheduler)["pages"]
        if OVERVIEW not in pages:
            pages.insert(pages.index("workers") + 1 if "workers" in pages else len(pages), OVERVIEW)
    except Exception:  # noqa: BLE001 - navigation is a convenience
        import logging

        logging.getLogger(__name__).warning("could not add %s to the dashboard navigation", OVERVIEW, exc_info=True)
