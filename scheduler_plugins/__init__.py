"""What runs inside the Dask scheduler: the model registry, the workers' live state,
placement of Python-API tasks, and batch-router's dashboard pages."""

import dask.config

from core.config import DEFAULTS

dask.config.update_defaults(DEFAULTS)
