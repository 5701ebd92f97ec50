"""Joining a Google Colab GPU to a batch-router cluster (see colab/worker.ipynb)."""
