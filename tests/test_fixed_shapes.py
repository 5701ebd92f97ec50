"""On the worker, with real ONNX Runtime (CPU): only bucket shapes ever reach the
session, padding never reaches a reply, and every bucket is warmed before ready."""

from __future__ import annotations

import numpy as np
import pytest

from core.protocol import ImageItem, ItemError, TensorItem
from scheduler_plugins.builtin_models import build_trivial
from tests.conftest import make_image
from worker_setup.execute import execute_items
from core.service_curve import ServiceCurve
from worker_setup.preload import batch_dimension, image_layout, seed_curve, warmup_line
from worker_setup.session import ModelSession
from worker_setup.worker_model import WorkerModel

BUCKETS = (1, 2, 4, 8)


class Recording:
    """A session wrapper that remembers the batch size of every run."""

    def __init__(self, session: ModelSession) -> None:
        self.session, self.sizes = session, []

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, feeds, names=None):
        self.sizes.append({k: v.shape[0] for k, v in feeds.items()})
        return self.session.run(feeds, names)


@pytest.fixture(scope="module", params=[True, False], ids=["io-binding", "session.run"])
def session(request, tmp_path_factory) -> ModelSession:
    """The one-node model (per-channel mean of N x 3 x 224 x 224), both ways of running it."""
    path = build_trivial(tmp_path_factory.mktemp("m") / "trivial.onnx")
    return ModelSession.load(str(path), device="cpu", threads=1, io_binding=request.param)


def model_of(session: ModelSession) -> WorkerModel:
    return WorkerModel(session=Recording(session), name="t", sha256="x", layout=image_layout(session), buckets=BUCKETS)  # type: ignore[arg-type]


def tensor_item(x: np.ndarray) -> TensorItem:
    return TensorItem(rows=len(x), inputs={"input": np.frombuffer(x.tobytes(), np.uint8)}, shapes={"input": x.shape}, outputs=("logits",))


def logits(result) -> np.ndarray:
    out = result.outputs["logits"]
    return np.frombuffer(out.data, np.float32).reshape(out.shape)


def test_batches_of_every_size_reach_the_session_only_at_bucket_sizes(session):
    model = model_of(session)
    rng = np.random.default_rng(0)
    for sizes in ([1], [3], [2, 3], [1, 1, 1, 1, 1], [8], [4, 4, 3], [7, 8, 5]):  # 1 .. 20 rows
        xs = [rng.standard_normal((n, 3, 224, 224)).astype(np.float32) for n in sizes]
        model.session.sizes.clear()
        results, timings = execute_items(model, [tensor_item(x) for x in xs])
        for x, r in zip(xs, results):  # each request gets exactly its own rows back, no padding
            assert logits(r).shape == (len(x), 3)
            np.testing.assert_allclose(logits(r), x.mean(axis=(2, 3)), atol=1e-5)
        ran = [s["input"] for s in model.session.sizes]
        assert all(n in BUCKETS for n in ran), ran
        assert timings.rows == sum(sizes) and timings.rows + timings.padded == sum(ran)


def test_padding_is_counted_beside_the_real_rows(session):
    model = model_of(session)
    x = np.ones((5, 3, 224, 224), np.float32)
    _, timings = execute_items(model, [tensor_item(x)])
    assert (timings.rows, timings.padded) == (5, 3) and model.session.sizes == [{"input": 8}]
    model.session.sizes.clear()
    _, timings = execute_items(model, [tensor_item(np.ones((19, 3, 224, 224), np.float32))])  # over the largest
    assert (timings.rows, timings.padded) == (19, 1) and [s["input"] for s in model.session.sizes] == [8, 8, 4]
    assert model.stats.padded == 0  # the task, not execute_items, counts into the heartbeat's stats


def test_undecodable_images_leave_no_hole_in_the_stacked_rows(session):
    """Images decode on threads; a bad one fails alone and the others keep their order."""
    model = model_of(session)
    session.threads, threads = 2, session.threads  # two decoding threads
    try:
        items = [ImageItem(np.frombuffer(make_image(i), np.uint8), top_k=1) for i in range(3)]
        items.insert(1, ImageItem(np.frombuffer(b"not an image", np.uint8), top_k=1))
        results, timings = execute_items(model, items)
    finally:
        session.threads = threads
    assert isinstance(results[1], ItemError) and results[1].status == 400
    assert [type(r).__name__ for r in results] == ["TopK", "ItemError", "TopK", "TopK"]
    assert (timings.rows, timings.padded) == (3, 1) and model.session.sizes == [{"input": 4}]
    alone = [execute_items(model_of(session), [items[i]])[0][0] for i in (0, 2, 3)]
    assert alone == [results[i] for i in (0, 2, 3)]


def test_warm_up_runs_every_bucket_before_the_worker_is_ready(session):
    recorder = Recording(session)
    table = session.warm_up(BUCKETS, cpu_max_rows=8, runner=recorder)
    assert [s["input"] for s in recorder.sizes] == list(BUCKETS)
    assert [row["bucket"] for row in table] == list(BUCKETS) and all(row["steady_ms"] > 0 for row in table)
    assert session.describe()["warmup"] == table


def test_a_cpu_worker_warms_small_buckets_only_and_says_which_it_skipped(session):
    recorder = Recording(session)
    table = session.warm_up(BUCKETS, cpu_max_rows=2, runner=recorder)
    assert [s["input"] for s in recorder.sizes] == [1, 2]
    assert table[2:] == [{"bucket": 4, "skipped": "cpu"}, {"bucket": 8, "skipped": "cpu"}]
    assert warmup_line(table).endswith("4: not warmed on cpu, 8: not warmed on cpu")


def test_io_binding_hands_out_results_the_next_batch_cannot_overwrite(session):
    a, b = np.full((4, 3, 224, 224), 1.0, np.float32), np.full((4, 3, 224, 224), 2.0, np.float32)
    first = session.run({"input": a})[0]
    session.run({"input": b})
    np.testing.assert_allclose(first, 1.0)
    assert session.describe()["options"]["io_binding"] is session.io_binding


def test_the_batch_dimension_is_read_from_the_model(session):
    assert batch_dimension(session) == -1


def test_a_batch_waiting_for_the_device_does_not_count_the_wait_as_compute(session):
    """Two task threads: the second batch decodes while the first runs, then waits for
    the device. Its compute time is its own run, not the other's."""
    from concurrent.futures import ThreadPoolExecutor

    from worker_setup.slow_device import SlowDevice

    model = WorkerModel(session=SlowDevice(session, batch_time=0.3), name="t", sha256="x", layout=None, buckets=BUCKETS)  # type: ignore[arg-type]
    x = np.ones((2, 3, 224, 224), np.float32)
    with ThreadPoolExecutor(2) as pool:
        timings = [t for _, t in pool.map(lambda _: execute_items(model, [tensor_item(x)]), range(2))]
    assert all(0.3e9 <= t.infer_ns < 0.5e9 for t in timings), [t.infer_ns for t in timings]  # one run each, ~0.3 s
    assert all(t.output_ns < 0.1e9 for t in timings)  # and the wait is not output either
    assert max(t.wait_ns for t in timings) >= 0.2e9  # it is counted as what it is: a wait for the device


def test_the_warm_up_starts_the_workers_curve_at_every_warmed_bucket():
    curve = ServiceCurve()
    seed_curve(curve, [{"bucket": 1, "first_ms": 90.0, "steady_ms": 2.0}, {"bucket": 8, "first_ms": 300.0, "steady_ms": 3.0},
                       {"bucket": 32, "skipped": "cpu"}], (1, 8, 32))  # fmt: skip
    assert curve.as_dict() == {"1": 0.002, "8": 0.003} and curve.buckets == (1, 8, 32)
    none = ServiceCurve()  # a model without a batch dimension: one run, no size
    seed_curve(none, [{"bucket": None, "first_ms": 5.0, "steady_ms": 5.0}], ())
    none.observe(1, 0.004)
    assert none.as_dict() == {"1": 0.004}


def test_on_one_device_thread_every_run_and_the_warm_up_run_on_that_thread(tmp_path):
    """ONNX Runtime keeps CUDA graphs per calling thread: the graph the warm-up captured
    must be the one Dask's task threads replay, so every run goes through one thread."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    class ThreadSpy:
        """The ONNX Runtime session, remembering which threads ran it."""

        def __init__(self, session) -> None:
            self.session, self.threads = session, set()

        def __getattr__(self, name):
            return getattr(self.session, name)

        def run_with_iobinding(self, *args):
            self.threads.add(threading.current_thread().name)
            return self.session.run_with_iobinding(*args)

    s = ModelSession.load(str(build_trivial(tmp_path / "t.onnx")), device="cpu", threads=1, io_binding=True, one_thread=True)
    s.session = spy = ThreadSpy(s.session)  # type: ignore[assignment]
    s.warm_up(BUCKETS, cpu_max_rows=8)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda n: s.run({"input": np.ones((n, 3, 224, 224), np.float32)}), [1, 2, 4, 8]))
    assert len(spy.threads) == 1 and next(iter(spy.threads)).startswith("batch-router-device"), spy.threads
