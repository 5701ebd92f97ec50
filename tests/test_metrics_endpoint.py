"""GET /metrics on the running service: parsed by prometheus_client, and telling the
same story as Triton's statistics endpoint."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_image
from tests.http import classify, request

pytestmark = pytest.mark.integration


def scrape(url: str) -> dict[str, list]:
    r = request(url, "GET", "/metrics")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(r.body.decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def total(samples: dict, name: str, **labels) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_agree_with_the_statistics_endpoint(cluster):
    for seed in range(3):
        assert classify(cluster.url, make_image(seed)).status == 200
    assert request(cluster.url, "GET", "/no/such/page").status == 404
    m, both = scrape(cluster.url), cluster.get("/v2/models/stats")["model_stats"]
    for stats in both:  # Triton's counters, per model name (classify's run under resnet50-uint8)
        name = stats["name"]
        assert total(m, "nv_inference_request_success_total", model=name) == stats["inference_stats"]["success"]["count"]
        assert total(m, "nv_inference_count_total", model=name) == stats["inference_count"]
        assert total(m, "nv_inference_exec_count_total", model=name) == stats["execution_count"]
    assert total(m, "nv_inference_request_success_total", model="resnet50-uint8") >= 3
    # The front end's own histograms cover every name at once.
    assert total(m, "batch_router_batch_size_count") == sum(s["execution_count"] for s in both)
    assert total(m, "batch_router_request_duration_seconds_count") == sum(s["inference_stats"]["success"]["count"] for s in both)
    assert total(m, "batch_router_http_responses_total", code="404") >= 1
    # The phases of each request add up to no more than the whole of it, and compute,
    # measured on the workers, is really there.
    phases = {p: total(m, f"batch_router_{p}_duration_seconds_sum") for p in ("request", "queue", "transfer", "compute")}
    assert phases["compute"] > 0
    assert all(0 <= phases[p] <= phases["request"] for p in ("queue", "transfer", "compute")), phases
    assert phases["queue"] + phases["transfer"] + phases["compute"] <= phases["request"] * 1.001


def test_per_worker_series_follow_the_workers_endpoint(cluster):
    workers = request(cluster.url, "GET", "/v1/workers").json()["workers"]
    m = scrape(cluster.url)
    assert {s.labels["worker"] for s in m["batch_router_worker_in_flight_batches"]} == {w["name"] for w in workers}
    with_gpu = {w["name"] for w in workers if w["gpu"]}
    assert {s.labels["worker"] for s in m.get("nv_gpu_utilization", [])} == with_gpu  # none here: CPU workers, no fake GPU


def test_a_wrong_method_gets_an_error_in_the_protocols_format(cluster):
    r = request(cluster.url, "POST", "/metrics", b"x")
    assert r.status == 405 and "error" in r.json()


def test_the_dashboard_link(cluster):
    pages = request(cluster.url, "GET", "/v1/dashboard").json()["pages"]
    assert pages["overview"] == f"http://127.0.0.1:{cluster.dashboard_port}/gpu-router"
    assert request(pages["overview"], "GET", "/gpu-router").status == 200


def test_counters_tell_the_truth_about_client_mistakes_and_aborts(cluster):
    """An image that does not decode is the client's failure (OTHER, "invalid"), not the
    backend's; a client that leaves before its answer is counted as 499, and as
    cancelled, never as a 200 or not at all."""
    import socket
    import time

    before = scrape(cluster.url)
    assert classify(cluster.url, b"\xff\xd8 not really a jpeg").status == 400
    for _ in range(3):  # sent whole, then the client leaves
        image = make_image(11)
        head = (f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                f"Content-Length: {len(image)}\r\n\r\n").encode()  # fmt: skip
        with socket.create_connection(("127.0.0.1", cluster.port)) as s:
            s.sendall(head + image)
    time.sleep(1.0)
    after = scrape(cluster.url)
    grew = lambda name, **labels: total(after, name, **labels) - total(before, name, **labels)  # noqa: E731
    uint8 = "resnet50-uint8"
    assert grew("nv_inference_request_failure_total", model=uint8, reason="BACKEND") == 0
    assert grew("nv_inference_request_failure_total", model=uint8, reason="OTHER") == 1
    assert grew("batch_router_http_responses_total", code="499") == 3
    assert grew("nv_inference_request_failure_total", model=uint8, reason="CANCELED") == 3
    assert grew("batch_router_http_responses_total", code="200") == 1  # the first scrape, counted once it was sent
