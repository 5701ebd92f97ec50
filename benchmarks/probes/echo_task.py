"""The probe's task: optionally idle like a model would compute, then reply at once on
the worker's own stream, stamped."""

import time


def echo(spec: dict) -> int:
    from distributed import get_worker

    start = time.time()
    if spec.get("idle"):
        time.sleep(spec["idle"])  # every process sleeps meanwhile, as while a model runs
    get_worker().log_event(spec["topic"], {"id": spec["id"], "t": start, "idle": time.time() - start})
    return 0
