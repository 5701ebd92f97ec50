"""Worker-side live metrics: GPU sources, the sampler thread, the stats, and what
really arrives in ``ws.metrics["batch-router"]`` on the scheduler."""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

import msgpack
import numpy as np
import pynvml
import pytest

from core.protocol import RUN_BATCH, BatchReply, BatchSpec, ImageItem
from tests.cluster import Cluster
from tests.conftest import ARTIFACTS, make_image
from worker_setup import gpu
from worker_setup.gpu import NvmlSource, NvmlUnavailable, SimulatedSource, device_selector, open_source, throttle_reasons
from worker_setup.metrics import ErrorLog, GpuSampler, guarded, worker_metric
from worker_setup.worker_model import InferenceStats, WorkerModel
from worker_setup.shelf import Shelf
from worker_setup.slow_device import SlowDevice


def _machine_has_nvml() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


no_gpu_here = pytest.mark.skipif(_machine_has_nvml(), reason="this machine has NVML; the no-GPU behaviour is for CPU hosts")


# ---- sources ---------------------------------------------------------------------------


@no_gpu_here
def test_auto_without_a_gpu_reports_no_gpu_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="worker_setup.gpu"):
        assert open_source("auto") is None
    assert any("no GPU metrics" in r.message and "gpu: null" in r.message for r in caplog.records)


@no_gpu_here
def test_nvml_mode_without_a_gpu_raises_a_clear_error():
    with pytest.raises(NvmlUnavailable, match="NVML is unavailable on this machine"):
        open_source("nvml")
    with pytest.raises(NvmlUnavailable, match="NVML"):
        NvmlSource(0)


def test_off_unknown_and_yaml_booleans():
    assert open_source("off") is None
    assert open_source(False) is None  # YAML 1.1 reads a bare `off` as False
    with pytest.raises(ValueError, match="unknown worker.gpu-metrics"):
        open_source("cuda")
    with pytest.raises(ValueError, match="busy_seconds"):
        open_source("simulated")


def test_device_is_gpu_index_else_first_visible_else_zero():
    assert device_selector(3, {"CUDA_VISIBLE_DEVICES": "1"}) == 3
    assert device_selector("GPU-abc", {}) == "GPU-abc"
    assert device_selector(None, {"CUDA_VISIBLE_DEVICES": "2,0"}) == 2
    assert device_selector(None, {"CUDA_VISIBLE_DEVICES": "GPU-1234-aa,GPU-99"}) == "GPU-1234-aa"
    assert device_selector(None, {"CUDA_VISIBLE_DEVICES": "MIG-5678"}) == "MIG-5678"
    assert device_selector(None, {}) == 0
    assert device_selector(None, {"CUDA_VISIBLE_DEVICES": ""}) is None  # every GPU hidden
    assert device_selector(None, {"CUDA_VISIBLE_DEVICES": "-1"}) is None


def test_idle_and_application_clock_bits_are_not_throttling():
    assert throttle_reasons(0x1 | 0x2) == []
    assert throttle_reasons(0x1 | 0x4 | 0x40) == ["sw_power_cap", "hw_thermal_slowdown"]
    assert throttle_reasons(1 << 20) == ["unknown_0x100000"]


def fake_nvml(**overrides) -> SimpleNamespace:
    """A stand-in for the pynvml module: one H100-like device, with NVML's own constants
    and exception classes, so NvmlSource's mapping is tested without a GPU."""

    def unsupported(*a):
        raise pynvml.NVMLError_NotSupported()

    calls = {"init": 0, "shutdown": 0}
    ns = {name: getattr(pynvml, name) for name in dir(pynvml) if name.startswith(("NVML_", "NVMLError"))}
    ns.update(
        calls=calls,
        nvmlInit=lambda: calls.__setitem__("init", calls["init"] + 1),
        nvmlShutdown=lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1),
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: ("h", i),
        nvmlDeviceGetHandleByUUID=lambda u: ("h", u),
        nvmlDeviceGetIndex=lambda h: 0,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3",
        nvmlDeviceGetUUID=lambda h: "GPU-0000",
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=97, memory=41),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=5 * 2**30, total=80 * 2**30, free=75 * 2**30),
        nvmlDeviceGetTemperature=lambda h, s: 57,
        nvmlDeviceGetTemperatureThreshold=unsupported,
        nvmlDeviceGetPowerUsage=lambda h: 633_500,
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
        nvmlDeviceGetClockInfo=lambda h, c: 1755,
        nvmlDeviceGetMaxClockInfo=lambda h, c: 1980,
        nvmlDeviceGetCurrentClocksEventReasons=lambda h: 0x1 | 0x4,
        nvmlDeviceGetCurrentClocksThrottleReasons=lambda h: 0x40,
        nvmlDeviceGetTotalEccErrors=unsupported,
    )
    ns.update(overrides)
    return SimpleNamespace(**ns)


def test_nvml_sample_maps_every_field_and_leaves_unsupported_ones_none(monkeypatch):
    nv = fake_nvml()
    monkeypatch.setattr(gpu, "pynvml", nv)
    src = NvmlSource(0)
    s = src.sample()
    assert src.info == {"source": "nvml", "index": 0, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-0000"}
    assert s["source"] == "nvml" and s["name"] == "NVIDIA H100 80GB HBM3"
    assert (s["utilization_gpu"], s["utilization_memory"]) == (97, 41)
    assert (s["memory_used"], s["memory_total"]) == (5 * 2**30, 80 * 2**30)
    assert s["temperature"] == 57 and s["temperature_slowdown"] is None  # NotSupported, not made up
    assert (s["power"], s["power_limit"]) == (633.5, 700.0)  # mW -> W
    assert (s["sm_clock"], s["sm_clock_max"]) == (1755, 1980)
    assert s["throttle_reasons"] == ["sw_power_cap"]  # the event API, idle bit dropped
    assert s["ecc_errors"] is None
    assert set(s) == set(SAMPLE_KEYS)
    msgpack.packb(s)
    src.close()
    src.close()
    assert nv.calls == {"init": 1, "shutdown": 1}


def test_nvml_uses_the_throttle_api_on_old_bindings_and_reports_ecc(monkeypatch):
    nv = fake_nvml(nvmlDeviceGetTotalEccErrors=lambda h, kind, counter: {0: 3, 1: 0}[kind])
    del nv.nvmlDeviceGetCurrentClocksEventReasons
    monkeypatch.setattr(gpu, "pynvml", nv)
    s = NvmlSource("GPU-0000").sample()
    assert s["throttle_reasons"] == ["hw_thermal_slowdown"]
    assert s["ecc_errors"] == {"volatile_uncorrected": 0, "volatile_corrected": 3}


def test_nvml_falls_back_when_the_driver_lacks_the_event_api(monkeypatch):
    def missing(h):
        raise pynvml.NVMLError_FunctionNotFound()

    monkeypatch.setattr(gpu, "pynvml", fake_nvml(nvmlDeviceGetCurrentClocksEventReasons=missing))
    assert NvmlSource(0).sample()["throttle_reasons"] == ["hw_thermal_slowdown"]


def test_nvml_error_while_opening_is_unavailable_not_a_crash(monkeypatch):
    def lost(h):
        raise pynvml.NVMLError_GpuIsLost()

    nv = fake_nvml(nvmlDeviceGetName=lost)
    monkeypatch.setattr(gpu, "pynvml", nv)
    assert open_source("auto") is None
    with pytest.raises(NvmlUnavailable, match="GPU is lost"):
        open_source("nvml")
    assert nv.calls["init"] == nv.calls["shutdown"] == 2


def test_nvml_device_that_does_not_exist_is_refused_and_nvml_released(monkeypatch):
    nv = fake_nvml()
    monkeypatch.setattr(gpu, "pynvml", nv)
    with pytest.raises(NvmlUnavailable, match="device 3 does not exist"):
        NvmlSource(3)
    assert nv.calls == {"init": 1, "shutdown": 1}
    assert open_source("auto", 3) is None


def test_a_lost_gpu_is_an_error_not_a_sample_of_nones(monkeypatch):
    def lost(h):
        raise pynvml.NVMLError_GpuIsLost()

    monkeypatch.setattr(gpu, "pynvml", fake_nvml(nvmlDeviceGetUtilizationRates=lost))
    sampler = GpuSampler(NvmlSource(0), 1.0)
    assert sampler.sample_once() is None and sampler.latest() is None
    assert sampler.errors.recent() == ["gpu sample failed: NVMLError_GpuIsLost: GPU is lost"]


SAMPLE_KEYS = [
    "source", "index", "name", "uuid", "utilization_gpu", "utilization_memory", "memory_used", "memory_total",
    "temperature", "temperature_slowdown", "power", "power_limit", "sm_clock", "sm_clock_max",
    "throttle_reasons", "ecc_errors", "sampled_at",
]  # fmt: skip


def test_simulated_gpu_follows_real_busy_time_and_says_it_is_simulated():
    t = {"now": 100.0, "busy": 0.0, "rows": 0}
    src = SimulatedSource(lambda: t["busy"], lambda: t["rows"], clock=lambda: t["now"])
    first = src.sample()
    assert first["source"] == "simulated" and "simulated" in first["name"].lower()
    assert set(first) == set(SAMPLE_KEYS)
    utils = []
    for _ in range(4):  # fully busy
        t["now"] += 0.5
        t["busy"] += 0.5
        utils.append(src.sample()["utilization_gpu"])
    assert utils == sorted(utils) and utils[-1] > 90
    busy = src.sample()  # no time passed: unchanged
    t["rows"] = 8
    for _ in range(3):  # idle
        t["now"] += 0.5
        utils.append(src.sample()["utilization_gpu"])
    assert utils[-1] < utils[-2] < utils[-3] < utils[3] and utils[-1] < 10
    idle = src.sample()
    assert idle["temperature"] < busy["temperature"] and idle["power"] < busy["power"]
    assert idle["memory_used"] - first["memory_used"] == 8 * SimulatedSource.MEMORY_PER_ROW
    msgpack.packb(idle)


# ---- stats -----------------------------------------------------------------------------


def test_service_time_is_the_service_curve_and_memory_per_row_needs_a_gpu():
    t = {"now": 0.0}
    s = InferenceStats(clock=lambda: t["now"])
    for rows, seconds in [(3, 1.0), (4, 2.0), (0, 9.0)]:  # one after another
        s.started(rows)
        t["now"] += seconds
        assert s.finished(rows, seconds, errors=0, started_rows=rows) == seconds
    snap = s.snapshot()
    # 3 rows stand for a 4-row batch (4/3 s), then an EWMA step towards 2 s; 0 rows: nothing.
    assert snap["service"] == {"4": pytest.approx(4 / 3 + 0.3 * (2.0 - 4 / 3), abs=1e-6)}
    assert snap["memory_per_row"] is None and snap["in_flight"] == 0 and snap["rows_in_flight"] == 0
    assert snap["batches"] == 3 and snap["rows"] == 7
    msgpack.packb(snap)


def test_a_batch_that_overlapped_another_costs_only_the_time_it_added():
    """Two task threads: batch 2 decodes while batch 1 computes, so the worker's
    capacity, and its curve, count batch 2 from batch 1's end."""
    t = {"now": 0.0}
    s = InferenceStats(clock=lambda: t["now"])
    s.started(8)
    t["now"] = 0.5
    s.started(8)  # batch 2 starts decoding
    t["now"] = 1.0
    assert s.finished(8, 1.0, 0, 8) == 1.0
    t["now"] = 1.8
    assert s.finished(8, 1.3, 0, 8) == pytest.approx(0.8)  # not its 1.3 s of wall time
    assert s.snapshot()["service"] == {"8": pytest.approx(1.0 + 0.3 * (0.8 - 1.0))}


def test_memory_per_row_from_growth_over_the_warm_baseline():
    s = InferenceStats()
    s.observe_memory(1000)  # after warm-up
    assert s.memory_per_row() is None  # nothing ran yet
    s.started(10)
    s.observe_memory(1000 + 10 * 64)
    s.finished(10, 0.1, 0, 10)
    s.observe_memory(1000 + 10 * 64)  # allocators keep what they grew to
    assert s.memory_per_row() == 64


def test_busy_time_counts_overlapping_batches_once():
    t = {"now": 0.0}
    s = InferenceStats(clock=lambda: t["now"])
    s.started(1)
    t["now"] = 1.0
    s.started(1)
    assert s.busy_seconds() == 1.0 and s.snapshot()["rows_in_flight"] == 2
    t["now"] = 2.0
    s.finished(1, 2.0, 0, 1)
    t["now"] = 3.0
    s.finished(1, 2.0, 0, 1)
    t["now"] = 10.0
    assert s.busy_seconds() == 3.0  # not 4: the device was busy for 3 s of wall time


def test_a_slow_device_sleeps_the_extra_time_instead_of_spinning(monkeypatch):
    class Session:
        inputs = ("x",)

        def run(self, feeds, names=None):
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 0.05:  # "the real work takes 50 ms"
                pass
            return ["out"]

    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    assert SlowDevice(Session(), slowdown=4.0).run({}) == ["out"]
    assert len(slept) == 1 and slept[0] >= 3 * 0.05
    assert SlowDevice(Session()).inputs == ("x",)  # otherwise it is the session it wraps
    # A device of fixed speed: a 50 ms batch on a 200 ms device sleeps the other ~150.
    SlowDevice(Session(), batch_time=0.2).run({})
    assert len(slept) == 2 and 0.1 < slept[1] <= 0.15


def test_a_slow_devices_stretch_keeps_the_next_run_waiting(monkeypatch):
    """Two task threads overlap decoding with a run, never two runs: a stretched run
    holds the worker's device while it sleeps, or a slowed worker would serve twice its speed."""
    from core.protocol import TensorInfo, TensorItem
    from worker_setup.execute import execute_items

    events = []

    class Session:
        inputs = outputs = (TensorInfo("n", "float32", (-1, 1)),)

        def run(self, feeds, names=None):
            events.append(("run", float(feeds["n"][0, 0])))
            return [feeds["n"]]

    def sleep(seconds):
        events.append(("sleep", threading.current_thread().name))
        time_sleep(0.05)  # the other thread tries to run meanwhile
        events.append(("woke", threading.current_thread().name))

    time_sleep = time.sleep
    monkeypatch.setattr(time, "sleep", sleep)
    model = WorkerModel(session=SlowDevice(Session(), batch_time=1.0), name="m", sha256="x", layout=None, buckets=(1,))  # type: ignore[arg-type]

    def one_batch(i: int) -> None:
        x = np.full((1, 1), i, np.float32)
        execute_items(model, [TensorItem(rows=1, inputs={"n": np.frombuffer(x.tobytes(), np.uint8)}, shapes={"n": (1, 1)}, outputs=("n",))])

    threads = [threading.Thread(target=one_batch, args=(i,), name=f"t{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kinds = [e[0] for e in events]
    assert kinds == ["run", "sleep", "woke", "run", "sleep", "woke"], events


# ---- sampler and metric ----------------------------------------------------------------


class CountingSource:
    info = {"source": "test", "index": None, "name": "counting", "uuid": None}

    def __init__(self, fail: bool = False) -> None:
        self.n, self.fail, self.closed = 0, fail, False

    def sample(self) -> dict:
        self.n += 1
        if self.fail:
            raise RuntimeError("driver said no")
        return {"n": self.n, "sampled_at": time.time(), "memory_used": 100 * self.n}

    def close(self) -> None:
        self.closed = True


def test_sampler_thread_samples_until_closed_then_closes_the_source():
    src, seen = CountingSource(), []
    sampler = GpuSampler(src, 0.01, on_sample=seen.append)
    sampler.start()
    deadline = time.monotonic() + 30
    while src.n < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    sampler.close(timeout=30)
    assert src.n >= 3 and src.closed and not sampler._thread.is_alive()
    assert sampler.latest()["n"] == src.n and len(seen) == src.n


def test_sampler_errors_are_kept_and_logged_once(caplog):
    sampler = GpuSampler(CountingSource(fail=True), 0.5)
    with caplog.at_level(logging.ERROR, logger="worker_setup.metrics"):
        for _ in range(3):
            sampler.sample_once()
    assert sampler.errors.recent() == ["gpu sample failed: RuntimeError: driver said no"]
    assert sum("driver said no" in r.message for r in caplog.records) == 1


def test_a_stale_sample_is_not_reported_as_current():
    class Old(CountingSource):
        def sample(self) -> dict:
            return {"sampled_at": time.time() - 60}

    sampler = GpuSampler(Old(), 0.5, stale_after=5)
    sampler.sample_once()
    assert sampler.latest() is None
    assert any("stale" in e for e in sampler.errors.recent())


def fake_model(**kw) -> WorkerModel:
    return WorkerModel(session=None, **{"name": "m", "sha256": "x", "layout": None, **kw})  # type: ignore[arg-type]


def shelf_of(*models: WorkerModel) -> Shelf:
    shelf = Shelf()
    for m in models:
        shelf.add(m)
    return shelf


def test_metric_has_the_documented_schema():
    errors = ErrorLog()
    model = fake_model(slowdown=2.0, gpu={"source": "simulated", "index": None, "name": "Simulated GPU", "uuid": "SIM-1"})
    sampler = GpuSampler(SimulatedSource(model.stats.busy_seconds, model.stats.current_rows), 0.5, errors)
    sampler.sample_once()
    other = fake_model(name="n")
    m = worker_metric(shelf_of(model, other), sampler, errors)(None)
    assert set(m) == {"gpu", "simulated", "stats", "models", "slowdown", "errors"}
    assert set(m["models"]) == {"m", "n"} and m["stats"] == m["models"]["m"]  # each model's own; the first's as "stats"
    assert m["simulated"] is True and m["slowdown"] == 2.0 and m["errors"] == []
    assert m["gpu"]["source"] == "simulated"
    assert set(m["stats"]) == {
        "batches", "rows", "padded_rows", "errors", "in_flight", "rows_in_flight", "peak_accepted", "busy_s", "service", "rows_per_s", "memory_per_row"
    }  # fmt: skip
    msgpack.packb(m)
    plain = worker_metric(shelf_of(fake_model()), None, ErrorLog())(None)
    assert plain["gpu"] is None and plain["simulated"] is False and plain["slowdown"] == 1.0


def test_a_failing_metric_reaches_the_scheduler_as_an_error_and_is_logged(caplog, monkeypatch):
    errors = ErrorLog()
    model = fake_model()
    metric = worker_metric(shelf_of(model), None, errors)

    def broken():
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(model.stats, "snapshot", broken)
    with caplog.at_level(logging.ERROR, logger="worker_setup.metrics"):
        assert metric(None) == {"error": "batch-router metric failed: ZeroDivisionError: boom"}
        assert metric(None) == {"error": "batch-router metric failed: ZeroDivisionError: boom"}
    assert sum("boom" in r.message for r in caplog.records) == 1  # once, not every heartbeat
    monkeypatch.undo()
    assert metric(None)["errors"] == ["batch-router metric failed: ZeroDivisionError: boom"]
    assert guarded(lambda w: {"ok": 1}, errors)(None) == {"ok": 1}


def test_describe_carries_gpu_info_and_stays_msgpack_friendly():
    class S:
        device, providers, requested, cuda_fallback, threads = "cpu", ["CPUExecutionProvider"], ["CPUExecutionProvider"], False, 1

        def describe(self):
            return {"options": {"io_binding": True}, "cuda_graphs": False, "warmup": [{"bucket": 1, "first_ms": 3.0, "steady_ms": 3.0}]}

    info = {"source": "simulated", "index": None, "name": "Simulated GPU (not a real device)", "uuid": "SIM-1"}
    d = WorkerModel(session=S(), name="m", sha256="x", layout=None, slowdown=4.0, gpu=info).describe()  # type: ignore[arg-type]
    assert (d["gpu"], d["simulated"], d["slowdown"]) == (info, True, 4.0)
    msgpack.packb(d)


# ---- on a real scheduler ---------------------------------------------------------------


def router_metrics(client) -> dict:
    """{worker name: (ws.metrics["batch-router"], ws.extra["batch-router"])} as the scheduler holds them."""
    return client.run_on_scheduler(
        lambda dask_scheduler: {
            ws.name: (ws.metrics.get("batch-router"), ws.extra.get("batch-router"))
            for ws in dask_scheduler.workers.values()
        }
    )


def wait_for(client, check, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        view = router_metrics(client)
        if check(view) or time.monotonic() > deadline:
            return view
        time.sleep(0.2)


@pytest.mark.integration
def test_default_workers_report_no_gpu_at_the_scheduler(cluster):
    from distributed import Client

    with Client(cluster.scheduler, timeout=30) as client:
        view = wait_for(client, lambda v: len(v) >= 2 and all(m for m, _ in v.values()))
    assert len(view) >= 2
    for metric, extra in view.values():
        assert set(metric) == {"gpu", "simulated", "stats", "models", "slowdown", "errors"}, metric
        assert metric["gpu"] is None and metric["simulated"] is False and metric["slowdown"] == 1.0
        assert metric["stats"]["memory_per_row"] is None and list(metric["errors"]) == []
        assert extra["gpu"] is None and extra["simulated"] is False and extra["slowdown"] == 1.0


@pytest.mark.integration
def test_simulated_gpu_and_slowdown_reach_the_scheduler(model_path):
    from distributed import Client

    ARTIFACTS.mkdir(exist_ok=True)
    args = ["--threads", "1", "--gpu-metrics", "simulated", "--worker-slowdown", "1,4"]
    c = Cluster(workers=2, args=args, log=ARTIFACTS / "worker-metrics.log").start()
    try:
        with Client(c.scheduler, timeout=30) as client:
            view = wait_for(client, lambda v: len(v) == 2 and all(m and m.get("gpu") for m, _ in v.values()))
            for name, (metric, extra) in view.items():
                assert metric["simulated"] is True, (name, metric)
                assert metric["gpu"]["source"] == "simulated" and "Simulated" in metric["gpu"]["name"]
                assert 0 <= metric["gpu"]["utilization_gpu"] <= 100
                assert extra["simulated"] is True and extra["gpu"]["source"] == "simulated"
            assert {n: m["slowdown"] for n, (m, _) in view.items()} == {"local-0": 1.0, "local-1": 4.0}

            # The same one-image batch, run by hand on each worker in turn (no contention).
            addr = client.run_on_scheduler(lambda dask_scheduler: {ws.name: a for a, ws in dask_scheduler.workers.items()})
            image = make_image(7)
            rounds = 4
            for i in range(rounds):
                for name in ("local-0", "local-1"):
                    spec = BatchSpec(f"m-{name}-{i}", "metrics-test", [ImageItem(np.frombuffer(image, np.uint8), top_k=1)])
                    fut = client.submit(RUN_BATCH, spec, workers=[addr[name]], pure=False)
                    assert fut.result(timeout=120) == 1
            view = wait_for(client, lambda v: all(m["stats"]["batches"] >= rounds for m, _ in v.values()))
            fast, slow = (view[n][0]["stats"]["service"]["1"] for n in ("local-0", "local-1"))
            assert slow / fast > 2, (fast, slow)
            assert view["local-1"][0]["stats"]["busy_s"] > view["local-0"][0]["stats"]["busy_s"]

            replies = [BatchReply.from_wire(msg) for _, msg in client.get_events("metrics-test")]
            assert len(replies) == 2 * rounds and all(r.timings.service_s > 0 for r in replies)
            by_worker = {w: [r.timings.service_s for r in replies if r.worker == addr[w]] for w in addr}
            assert min(by_worker["local-1"]) > 2 * min(by_worker["local-0"])
    finally:
        c.stop()


def test_an_error_not_seen_again_leaves_recent_errors(monkeypatch):
    """A transient failure colours a worker's health for a while, not for its life."""
    clock = [1000.0]
    monkeypatch.setattr("worker_setup.metrics.time.monotonic", lambda: clock[0])
    errors = ErrorLog(keep=2, window=60.0)
    errors.add("nvml: timeout")
    clock[0] += 30
    errors.add("sampler: stale")
    assert errors.recent() == ["nvml: timeout", "sampler: stale"]
    clock[0] += 40  # the first is 70 s old, the second 40 s
    assert errors.recent() == ["sampler: stale"]
    errors.add("nvml: timeout")  # again: recent again, and newest
    errors.add("third")  # keep=2: the oldest goes
    assert errors.recent() == ["nvml: timeout", "third"]
