import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.cluster import Cluster
from scheduler_plugins.builtin_models import ensure_default_model

ARTIFACTS = Path(__file__).parent / "artifacts"

# Services the tests start listen for gRPC only where a test asks (--grpc-port): several
# run at once, and the default port (8001) is one.
os.environ.setdefault("DASK_BATCH_ROUTER__GRPC__PORT", "0")

# The `browser` fixture (headless Chromium) for the dashboard's browser tests.
pytest_plugins = ["tests.browser"]


@pytest.fixture(scope="session")
def model_path() -> Path:
    return ensure_default_model()


@pytest.fixture(scope="session")
def session(model_path):
    """A direct ONNX Runtime session on the same file: the reference answers."""
    import onnxruntime as ort

    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def cluster(model_path):
    """The default service: scheduler + 2 worker processes + HTTP front end."""
    ARTIFACTS.mkdir(exist_ok=True)
    c = Cluster(workers=2, args=["--threads", "1"], log=ARTIFACTS / "cluster.log").start()
    yield c
    c.stop()


def make_image(seed: int, fmt: str = "JPEG", size=(320, 240)) -> bytes:
    """A deterministic, natural-ish picture: smooth gradients plus noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    base = np.stack([np.sin(6 * x + seed), np.cos(4 * y + seed / 2), x * y], axis=-1)
    pixels = ((base * 0.5 + 0.5) * 200 + rng.normal(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()
