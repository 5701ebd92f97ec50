"""GET /metrics in Prometheus's text format: Triton's names where Triton has them, read
back by prometheus_client's own parser, so a scraper would take every line."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from router_api.prometheus import batch_bounds, render
from router_api.triton_stats import ModelStats
from router_api.telemetry import Telemetry
from tests.fixtures_dashboard import gpu
from tests.test_telemetry import fake_dispatcher


def worker_entry(name: str, sample: dict | None, simulated: bool = False, **kw) -> dict:
    return {"address": f"tcp://{name}:1", "name": name, "gpu": sample, "simulated": simulated,
            "in_flight": 1, "weight": 0.5, "responsive": True, "rows": 10, **kw}  # fmt: skip


def scrape(stats: ModelStats | None = None, workers: list[dict] | None = None, telemetry: Telemetry | None = None) -> dict:
    d = fake_dispatcher()
    if stats is not None:
        d.stats, d.entry_stats = stats, {stats.name: stats}
    telemetry = telemetry or Telemetry()
    text = render(telemetry.snapshot(d), d.stats, workers or [], "1")
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict, name: str, sample: str | None = None, **labels) -> float:
    for s in families[name].samples:
        if s.name == (sample or name) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((name, sample, labels))


def test_request_counts_and_failures_by_reason():
    stats = ModelStats("resnet50")
    for _ in range(3):
        stats.request_done(True, 2_000_000, 500_000)
    stats.request_done(False, 1_000, 0)
    stats.rejected.update(timeout=2, queue_full=5, cancelled=1)
    stats.batch_done(3, 3, 3, 1000, 4_000_000, 1000)  # 3 one-row requests in one 4 ms batch
    m = scrape(stats)
    assert m["nv_inference_request_success"].type == "counter"
    assert value(m, "nv_inference_request_success", "nv_inference_request_success_total") == 3
    failures = {r: value(m, "nv_inference_request_failure", "nv_inference_request_failure_total", reason=r)
                for r in ("REJECTED", "OTHER", "CANCELED", "BACKEND")}  # fmt: skip
    assert failures == {"REJECTED": 2, "OTHER": 5, "CANCELED": 1, "BACKEND": 1}
    assert value(m, "nv_inference_count", "nv_inference_count_total") == 3
    assert value(m, "nv_inference_exec_count", "nv_inference_exec_count_total") == 1
    assert value(m, "nv_inference_request_duration_us", "nv_inference_request_duration_us_total") == 6000
    # per request, as Triton counts it: each of the 3 requests took the batch's 4 ms
    assert value(m, "nv_inference_compute_infer_duration_us", "nv_inference_compute_infer_duration_us_total") == 12000
    assert m["nv_inference_pending_request_count"].type == "gauge"


def test_padding_and_the_wait_for_a_device_are_counted_beside_tritons_figures():
    stats = ModelStats("resnet50")
    stats.batch_done(5, 5, 2, 1000, 4_000_000, 1000, padded=3, wait_ns=2_000_000)  # 5 rows run as 8, after 2 ms
    m = scrape(stats)
    assert value(m, "nv_inference_count", "nv_inference_count_total") == 5  # real rows only
    assert value(m, "batch_router_padded_rows", "batch_router_padded_rows_total") == 3
    assert value(m, "batch_router_device_wait_duration_us", "batch_router_device_wait_duration_us_total") == 4000  # per request
    assert stats.as_triton()["batch_stats"][0]["batch_size"] == 8  # the batch ran at its bucket


def test_latency_histograms_are_cumulative_and_end_at_inf():
    t = Telemetry()
    for s in (0.004, 0.004, 0.2):
        t.request_served(s, 0.001, s, s / 2)
    m = scrape(telemetry=t)
    h = m["batch_router_request_duration_seconds"]
    assert h.type == "histogram"
    buckets = [(s.labels["le"], s.value) for s in h.samples if s.name.endswith("_bucket")]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and buckets[-1] == ("+Inf", 3)
    assert value(m, "batch_router_request_duration_seconds", "batch_router_request_duration_seconds_count") == 3
    assert value(m, "batch_router_request_duration_seconds", "batch_router_request_duration_seconds_sum") == pytest.approx(0.208)
    for phase in ("queue", "transfer", "compute"):
        assert f"batch_router_{phase}_duration_seconds" in m


def test_batch_sizes_fall_in_power_of_two_buckets():
    stats = ModelStats("resnet50")
    for rows in (1, 3, 3, 8, 20):
        stats.batch_done(rows, rows, 1, 0, 0, 0)
    m = scrape(stats)
    le = {s.labels["le"]: s.value for s in m["batch_router_batch_size"].samples if s.name.endswith("_bucket")}
    assert (le["1"], le["2"], le["4"], le["8"], le["16"], le["32"], le["+Inf"]) == (1, 1, 3, 4, 4, 5, 5)
    assert batch_bounds(5) == [1.0, 2.0, 4.0, 8.0]  # buckets reach max_batch_size (8 here) from the first scrape on


def test_gpu_series_for_gpu_workers_only_and_simulated_ones_say_so():
    workers = [
        worker_entry("t4", gpu(util=73)),
        worker_entry("sim", gpu(util=40, source="simulated"), simulated=True),
        worker_entry("laptop", None),
    ]
    m = scrape(workers=workers)
    util = {s.labels["worker"]: (s.value, s.labels["simulated"]) for s in m["nv_gpu_utilization"].samples}
    assert util == {"t4": (pytest.approx(0.73), "false"), "sim": (pytest.approx(0.40), "true")}  # never a fake GPU for "laptop"
    assert value(m, "nv_gpu_memory_total_bytes", worker="t4") == 15 * 2**30
    assert value(m, "nv_gpu_power_usage", worker="t4") == 40.0
    assert value(m, "batch_router_gpu_temperature_celsius", worker="t4") == 60
    in_flight = {s.labels["worker"] for s in m["batch_router_worker_in_flight_batches"].samples}
    assert in_flight == {"t4", "sim", "laptop"}
    assert value(m, "batch_router_worker_weight", worker="laptop") == 0.5


def test_throttling_is_a_gauge_per_gpu():
    m = scrape(workers=[worker_entry("hot", gpu(throttle=["sw_power_cap"])), worker_entry("cool", gpu())])
    assert value(m, "batch_router_gpu_throttling", worker="hot") == 1
    assert value(m, "batch_router_gpu_throttling", worker="cool") == 0


def test_odd_worker_names_are_escaped_not_breaking_the_format():
    name = 'gpu "0"\\n\nnext'
    m = scrape(workers=[worker_entry(name, gpu())])
    assert {s.labels["worker"] for s in m["nv_gpu_utilization"].samples} == {name}


def test_http_outcomes_by_status():
    t = Telemetry()
    t.responses.update({200: 7, 503: 2, 504: 1})
    m = scrape(telemetry=t)
    assert value(m, "batch_router_http_responses", "batch_router_http_responses_total", code="503") == 2
