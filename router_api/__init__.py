"""The front end: HTTP (KServe v2 with Triton's extensions), the dispatcher that batches
and places requests, and the ``batch-router`` command that starts every role."""

import dask.config

from core.config import DEFAULTS

dask.config.update_defaults(DEFAULTS)
