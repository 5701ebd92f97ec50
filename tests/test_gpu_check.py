"""The GPU check's own arithmetic, on CPU: it runs once on a borrowed GPU, so a wrong
metric name or a crash in its summary would waste that run."""

from __future__ import annotations

from benchmarks.gpu_check import Mode, modes, summary
from benchmarks.gpu_measure import counters, split
from router_api.prometheus import render
from router_api.telemetry import Telemetry
from router_api.triton_stats import ModelStats
from tests.test_telemetry import fake_dispatcher


def metrics_text(stats: ModelStats) -> str:
    d = fake_dispatcher()
    d.stats, d.entry_stats = stats, {stats.name: stats}
    return render(Telemetry().snapshot(d), stats, [], "1")


def test_the_split_reads_the_names_metrics_really_has():
    stats = ModelStats("resnet50")
    before = counters(metrics_text(stats))
    for _ in range(4):
        stats.request_done(True, 300_000_000, 100_000_000)  # 300 ms, 100 ms of it queued
    stats.batch_done(6, 6, 4, 10_000_000, 60_000_000, 5_000_000, padded=2, wait_ns=80_000_000)  # 4 requests, 6 rows
    s = split(before, counters(metrics_text(stats)))
    assert s["requests"] == 4 and s["request_ms"] == 300 and s["queue_ms"] == 100
    assert s["compute_ms"] == 75 and s["device_wait_ms"] == 80 and s["transfer_ms"] == 45
    assert s["padded_fraction"] == 0.25  # 2 rows of padding beside 6 real ones


def test_every_mode_is_named_and_the_summary_survives_failures():
    assert [m.name for m in modes(quick=False)] == ["fp32-b32", "fp32-b128", "fp16-b128", "fp32-b32-graphs", "uint8-fp16-b256"]
    assert [m.name for m in modes(quick=True) if m.uint8] == ["uint8-fp32-b8"]  # a CPU has no fp16
    ok = {"mode": {}, "raw": {"img_per_s": 4500.0}, "router": {"img_per_s": 4100.0}, "ratio": 0.911,
          "split": {"queue_ms": 0.2, "device_wait_ms": 7.0, "transfer_ms": 3.0, "compute_ms": 7.1},
          "gpu": {"utilization_gpu": {"load": 91.0}, "source": ["nvml"]},
          "worker": {"warmup": [{"bucket": 1, "first_ms": 400.0, "steady_ms": 1.8}, {"bucket": 8, "skipped": "cpu"}]},
          "c1": {"error": "Traceback ...\nValueError: boom"}, "tail_70": {"p99_over_p50": 1.4}}  # fmt: skip
    traced = {**ok, "c1": {"delta_ms": 1.5, "trace": {"count": 40, "total_ms": {"p50": 3.3, "mean": 3.4},
                                                      "hops_ms": {"queue": {"p50": 0.1}, "compute": {"p50": 1.8}}}}}  # fmt: skip
    assert "c=1 trace of the last 40 requests, p50 ms a hop: queue 0.1, compute 1.8; whole p50 3.3, mean 3.4" in summary({"modes": {"fp32-b32": traced}})
    report = {"modes": {"fp32-b32": ok, "fp16-b128": {"mode": {}, "error": "Traceback ...\nRuntimeError: precision fp16 needs onnxconverter-common"}},
              "classify": {"error": "Traceback ...\nTimeoutError: x"}}  # fmt: skip
    lines = summary(report)
    assert any(line.startswith("fp32-b32") and "4100.0" in line and "0.911" in line for line in lines)
    assert any("fp16-b128" in line and "FAILED: RuntimeError: precision fp16 needs onnxconverter-common" in line for line in lines)
    assert "c=1: FAILED" in lines and "70 % load: p99/p50 = 1.4 (target <= 2)" in lines
    assert any(line.startswith("classify: FAILED: TimeoutError") for line in lines)
    assert not any(line.startswith("path") for line in lines)  # not run: not reported
    assert "warm-up fp32-b32: 1: 400.0 -> 1.8 ms, 8: skipped (cpu)" in lines
    assert Mode("x", 8).precision == "fp32"
