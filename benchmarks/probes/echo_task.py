"""The probe's task: reply at once on the worker's own stream, stamped."""

import time


def echo(spec: dict) -> int:
    from distributed import get_worker

    get_worker().log_event(spec["topic"], {"id": spec["id"], "t": time.time()})
    return 0
