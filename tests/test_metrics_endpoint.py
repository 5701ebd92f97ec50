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
