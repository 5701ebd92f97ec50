"""The Python API for Dask users: ordinary tasks on the router's own workers."""

from __future__ import annotations

import dask.bag as db
import numpy as np
import pytest
from distributed import Client

from tests.conftest import make_image
from worker_setup import classify, classify_files, infer
from worker_setup.execute import top_k
from worker_setup.preprocess import ImageLayout, image_to_row

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.scheduler, timeout=30) as c:
        yield c


def test_submit_classify_matches_onnx_runtime(client, session):
    images = [make_image(s) for s in (21, 22)]
    result = client.submit(classify, images, 3).result(timeout=60)
    for image, preds in zip(images, result):
        row = image_to_row(image, ImageLayout())[None]
        idx, _ = top_k(session.run(None, {"input": row})[0][0], 3)
        assert [p["index"] for p in preds] == idx.tolist()


def test_map_infer_over_batches_returns_logits(client, session):
    batches = [np.random.default_rng(s).standard_normal((2, 3, 224, 224)).astype(np.float32) for s in range(3)]
    results = client.gather(client.map(infer, batches))
    for x, logits in zip(batches, results):
        np.testing.assert_allclose(logits, session.run(None, {"input": x})[0], atol=1e-3)


def test_bag_of_image_files_classified_by_partition(client, tmp_path):
    paths = []
    for s in range(6):
        p = tmp_path / f"img{s}.jpg"
        p.write_bytes(make_image(30 + s))
        paths.append(str(p))
    out = db.from_sequence(paths, npartitions=3).map_partitions(classify_files, 2).compute()
    assert [o["path"] for o in out] == paths
    assert all(len(o["predictions"]) == 2 for o in out)


def test_api_tasks_never_land_on_a_worker_without_the_model(client, cluster):
    """A plain `dask worker` joins the cluster: the plugin keeps API tasks off it."""
    import subprocess
    import sys
    import time

    plain = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler, "--nthreads", "2", "--name", "plain", "--no-nanny"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "plain" not in {w["name"] for w in client.scheduler_info()["workers"].values()}:
            assert time.monotonic() < deadline, "plain worker did not join"
            time.sleep(0.2)
        plain_addr = next(a for a, w in client.scheduler_info()["workers"].items() if w["name"] == "plain")
        futures = [client.submit(classify, [make_image(s)], pure=False) for s in range(6)]
        client.gather(futures)
        where = client.who_has(futures)
        assert all(plain_addr not in holders for holders in where.values())
        assert len(cluster.get("/v1/workers")["workers"]) == 2  # the front end ignores it too
    finally:
        plain.terminate()
        plain.wait(30)
