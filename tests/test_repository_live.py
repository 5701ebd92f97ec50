"""Several models from a Triton model repository, against a live cluster with unmodified
tritonclient: each model answers with its own outputs, load and unload over HTTP and
gRPC, an unloaded model is 404 / NOT_FOUND, a file that fails validation is refused,
and unloading under load loses nothing that was accepted.

The repository: ``mean`` (the one-node model: each channel's mean), ``colours`` (an
NHWC uint8 classifier with a fixed batch of 1 and labels, from test_custom_model) and
``broken`` (not ONNX). Batches take at least 50 ms, so a queue builds under load."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from scheduler_plugins.builtin_models import build_trivial
from tests.cluster import Cluster, free_port
from tests.conftest import ARTIFACTS
from tests.http import infer_binary, logits_of, request
from tests.test_custom_model import W, build_nhwc_classifier

pytestmark = pytest.mark.integration


def add_model(repo, name: str, build, config: str | None = None, version: int = 1):
    (repo / name / str(version)).mkdir(parents=True, exist_ok=True)
    build(repo / name / str(version) / "model.onnx")
    if config is not None:
        (repo / name / "config.pbtxt").write_text(config)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repository")
    add_model(repo, "mean", build_trivial, 'max_batch_size: 8 dynamic_batching { preferred_batch_size: [4] }')
    add_model(repo, "colours", build_nhwc_classifier, 'output [{ name: "scores" label_filename: "labels.txt" }]')
    (repo / "colours" / "labels.txt").write_text("\n".join(f"colour-{i}" for i in range(10)) + "\n")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"this is not an ONNX model")
    grpc_port = free_port()
    env = {"DASK_BATCH_ROUTER__WORKER__BATCH_TIME": "50ms", "DASK_BATCH_ROUTER__GRPC__PORT": str(grpc_port)}
    c = Cluster(workers=1, args=["--threads", "1", "--model-repository", str(repo), "--allow-load"], env=env,
                log=ARTIFACTS / "repository.log").start()  # fmt: skip
    c.grpc, c.repo = f"127.0.0.1:{grpc_port}", repo
    yield c
    c.stop()


def mean_input(value: float, rows: int = 1) -> np.ndarray:
    x = np.full((rows, 3, 224, 224), value, np.float32)
    x[:, 1] += 1.0
    return x


def infer_mean(client, value: float) -> np.ndarray:
    inp = httpclient.InferInput("input", [1, 3, 224, 224], "FP32")
    inp.set_data_from_numpy(mean_input(value))
    return client.infer("mean", [inp]).as_numpy("logits")


def test_every_valid_model_is_served_each_with_its_own_config(repo):
    client = httpclient.InferenceServerClient(repo.url.removeprefix("http://"))
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["mean"]["state"] == index["colours"]["state"] == "READY"
    assert index["broken"]["state"] == "UNAVAILABLE" and "not a valid ONNX model" in index["broken"]["reason"]
    assert client.is_server_ready() and client.is_model_ready("mean") and client.is_model_ready("colours")
    assert client.get_model_config("mean")["max_batch_size"] == 8
    assert client.get_model_config("mean")["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    assert client.get_model_config("colours")["max_batch_size"] == 1  # its file's fixed batch dimension
    workers = repo.get("/v1/workers")
    (worker,) = workers["workers"]
    assert worker["models"] == ["colours", "mean"]  # the worker holds both, each warm
    queues = workers["models"]  # a batcher each, with its own bound
    assert (queues["mean"]["max_batch_size"], queues["colours"]["max_batch_size"]) == (8, 1)


def test_each_model_answers_with_its_own_outputs(repo):
    client = httpclient.InferenceServerClient(repo.url.removeprefix("http://"))
    np.testing.assert_allclose(infer_mean(client, 0.25), [[0.25, 1.25, 0.25]], atol=1e-5)
    pixels = np.random.default_rng(3).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    inp = httpclient.InferInput("image", [1, 32, 32, 3], "UINT8")
    inp.set_data_from_numpy(pixels)
    scores = client.infer("colours", [inp]).as_numpy("scores")
    np.testing.assert_allclose(scores, pixels.reshape(-1, 3).astype(np.float32).mean(axis=0)[None] @ W, rtol=1e-4)
    stats = {s["name"]: s for s in client.get_inference_statistics()["model_stats"]}
    assert stats["mean"]["inference_stats"]["success"]["count"] >= 1
    assert stats["colours"]["inference_stats"]["success"]["count"] >= 1


def test_a_file_that_fails_validation_is_refused_with_the_reason(repo):
    client = httpclient.InferenceServerClient(repo.url.removeprefix("http://"))
    with pytest.raises(InferenceServerException, match="not a valid ONNX model"):
        client.load_model("broken")
    with pytest.raises(InferenceServerException, match="no model 'nowhere'"):
        client.load_model("nowhere")
    r = request(repo.url, "POST", "/v2/repository/models/..%2F..%2Fetc/load")
    assert r.status in (400, 404) and "error" in r.json()


def test_unload_then_404_then_load_again_over_http(repo):
    client = httpclient.InferenceServerClient(repo.url.removeprefix("http://"))
    client.unload_model("mean")
    assert not client.is_model_ready("mean")
    r = infer_binary(repo.url, mean_input(0.5), model="mean")
    assert r.status == 404 and "mean" in r.json()["error"]
    assert request(repo.url, "GET", "/v2/models/mean").status == 404
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["mean"]["state"] == "UNAVAILABLE" and index["mean"]["reason"] == "unloaded"
    assert client.is_model_ready("colours")  # the other model is untouched
    client.load_model("mean")
    np.testing.assert_allclose(infer_mean(client, 0.5), [[0.5, 1.5, 0.5]], atol=1e-5)


def test_a_new_model_copied_into_the_repository_loads_over_grpc(repo):
    client = grpcclient.InferenceServerClient(repo.grpc)
    shutil.copytree(repo.repo / "mean", repo.repo / "mean2")
    names = {m.name: m.state for m in client.get_model_repository_index().models}
    assert names["mean2"] == "UNAVAILABLE"
    client.load_model("mean2")
    assert client.is_model_ready("mean2")
    inp = grpcclient.InferInput("input", [1, 3, 224, 224], "FP32")
    inp.set_data_from_numpy(mean_input(0.75))
    np.testing.assert_allclose(client.infer("mean2", [inp]).as_numpy("logits"), [[0.75, 1.75, 0.75]], atol=1e-5)
    client.unload_model("mean2")
    with pytest.raises(InferenceServerException) as e:
        client.infer("mean2", [inp])
    assert e.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as e:
        client.unload_model("mean2")
    assert e.value.status() == "StatusCode.NOT_FOUND"


def test_unloading_under_load_loses_nothing_that_was_accepted(repo):
    """Eight clients keep sending; the model is unloaded under them. Every request is
    answered: right (200) or refused at the door (404), never lost, failed or wrong."""
    client = httpclient.InferenceServerClient(repo.url.removeprefix("http://"))
    results: list[tuple[float, float, int, np.ndarray | None]] = []
    stop = threading.Event()

    def send(seed: int) -> None:
        i = 0
        while not stop.is_set():
            value = 4 * seed + (i % 32) / 8  # a mean float32 sums exactly; each client's values its own
            t0 = time.monotonic()
            r = infer_binary(repo.url, mean_input(value), model="mean")
            results.append((t0, value, r.status, logits_of(r, 1) if r.status == 200 else None))
            i += 1

    threads = [threading.Thread(target=send, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    began = time.monotonic()
    client.unload_model("mean")
    ended = time.monotonic()
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(60)
    statuses = [s for _, _, s, _ in results]
    assert set(statuses) <= {200, 404}, sorted(set(statuses))
    for _, value, status, logits in results:
        if status == 200:
            np.testing.assert_allclose(logits, [[value, value + 1, value]], atol=1e-6)
    assert statuses.count(200) >= 10 and statuses.count(404) >= 1
    assert all(s == 404 for t0, _, s, _ in results if t0 > ended)  # once unloaded, nothing more is accepted
    assert all(s == 200 for t0, _, s, _ in results if t0 < began - 0.5)
    import re

    drains = re.findall(r"model mean is being unloaded: answering its (\d+) queued requests and (\d+) batches", repo.log.read_text())
    assert int(drains[-1][0]) + int(drains[-1][1]) >= 1  # it had work to finish when the unload came, and finished it
    client.load_model("mean")  # back for the tests that follow


def test_loading_is_off_unless_allowed(cluster):
    """The default service: one model, index lists it, load is refused (403)."""
    client = httpclient.InferenceServerClient(cluster.url.removeprefix("http://"))
    assert [(m["name"], m["state"]) for m in client.get_model_repository_index()] == [("resnet50", "READY")]
    with pytest.raises(InferenceServerException, match="allow-load"):
        client.load_model("resnet50")
    r = request(cluster.url, "POST", "/v2/repository/models/resnet50/load")
    assert r.status == 403 and "allow-load" in r.json()["error"]
