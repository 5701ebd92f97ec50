"""What runs inside each Dask worker: model loading, preprocessing, batch execution,
GPU metrics.

``classify`` and ``infer`` are the Python API for Dask users (``client.submit``).
"""

import dask.config

from core.config import DEFAULTS
from worker_setup.api import classify, classify_files, infer

dask.config.update_defaults(DEFAULTS)

__all__ = ["classify", "classify_files", "infer"]
