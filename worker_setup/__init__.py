"""What runs inside each Dask worker: model loading, preprocessing, batch execution.

``classify`` and ``infer`` are the Python API for Dask users (``client.submit``).
"""

from worker_setup.api import classify, classify_files, infer

__all__ = ["classify", "classify_files", "infer"]
