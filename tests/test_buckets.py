"""Fixed batch shapes as pure logic: which buckets a cluster uses, how a batch is cut
and padded to them, and how placement and service curves reason in them."""

from __future__ import annotations

import pytest

from core.buckets import batch_shapes, bucket_for, check_buckets, chunks, default_buckets, floor_bucket, model_buckets
from core.config import ConfigError, buckets, parse
from core.placement import bucket_rows
from core.service_curve import ServiceCurve
from core.worker_view import WorkerView


def test_default_buckets_are_powers_of_two_up_to_the_largest_batch():
    assert default_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert default_buckets(128) == (1, 2, 4, 8, 16, 32, 64, 128)
    assert default_buckets(24) == (1, 2, 4, 8, 16, 24)  # max-batch-size is always a bucket
    assert default_buckets(1) == (1,)


def test_a_configured_bucket_list_is_sorted_and_must_end_at_max_batch_size():
    assert check_buckets([32, 8, 1, 8], 32) == (1, 8, 32)
    with pytest.raises(ValueError, match=r"largest bucket \(16\) must equal max-batch-size \(32\)"):
        check_buckets([1, 16], 32)
    for bad in ([], [0, 32], [1.5, 32], [True, 32]):
        with pytest.raises(ValueError, match="positive integers"):
            check_buckets(bad, 32)


def test_bucket_settings_are_checked_when_a_role_starts():
    assert buckets(parse()) == (1, 2, 4, 8, 16, 32)
    assert buckets(parse({"max-batch-size": 64, "batching": {"buckets": [1, 8, 64]}})) == (1, 8, 64)
    with pytest.raises(ConfigError, match=r"batch-router.batching.buckets: the largest bucket \(16\)"):
        parse({"batching": {"buckets": [1, 16]}})
    with pytest.raises(ConfigError, match=r"batch-router.batching.buckets: '8' is not a list of integers"):
        parse({"batching": {"buckets": "8"}})


def test_every_new_worker_setting_is_validated_with_its_name():
    cases = {
        "batch-router.worker.precision: 'int8' is not one of fp32, fp16": {"worker": {"precision": "int8"}},
        "batch-router.worker.io-binding: 'yes' is not true or false": {"worker": {"io-binding": "yes"}},
        "batch-router.worker.warmup-cpu-max-rows: -1 is outside": {"worker": {"warmup-cpu-max-rows": -1}},
        "batch-router.worker.cuda.cudnn-conv-algo-search: 'FAST' is not one of EXHAUSTIVE, HEURISTIC, DEFAULT":
            {"worker": {"cuda": {"cudnn-conv-algo-search": "FAST"}}},
        "batch-router.worker.cuda.use-tf32: 1 is not true or false": {"worker": {"cuda": {"use-tf32": 1}}},
        "batch-router.worker.cuda.arena-extend-strategy: 'grow' is not one of": {"worker": {"cuda": {"arena-extend-strategy": "grow"}}},
        "batch-router.worker.cuda.gpu-mem-limit: 'lots' is not a size": {"worker": {"cuda": {"gpu-mem-limit": "lots"}}},
        "batch-router.worker.cuda.graph: no such setting (did you mean 'graphs'?)": {"worker": {"cuda": {"graph": True}}},
        "batch-router.worker.precision: fp16 needs a CUDA device": {"worker": {"precision": "fp16", "device": "cpu"}},
        "batch-router.worker.cuda.graphs: CUDA graphs replay fixed device buffers, so they need worker.io-binding":
            {"worker": {"io-binding": False, "cuda": {"graphs": True}}},
    }  # fmt: skip
    for message, tree in cases.items():
        with pytest.raises(ConfigError) as e:
            parse(tree)
        assert str(e.value).startswith(message), (str(e.value), message)
    cuda = parse({"worker": {"cuda": {"gpu-mem-limit": "8GiB", "graphs": True}}}).worker.cuda
    assert (cuda.gpu_mem_limit, cuda.graphs, cuda.cudnn_conv_algo_search) == (8 * 2**30, True, "EXHAUSTIVE")


def test_a_batch_pads_up_to_the_smallest_bucket_that_holds_it():
    b = (1, 2, 4, 8, 16, 32)
    assert [bucket_for(n, b) for n in (1, 2, 3, 5, 8, 9, 31, 32)] == [1, 2, 4, 8, 8, 16, 32, 32]
    assert [floor_bucket(n, b) for n in (1, 3, 9, 31, 40)] == [1, 2, 8, 16, 32]
    assert floor_bucket(3, (4, 8)) == 4  # nothing below: the smallest


def test_more_rows_than_the_largest_bucket_run_in_bucket_sized_chunks():
    b = (1, 2, 4, 8)
    assert chunks(8, b) == [(0, 8, 8)]
    assert chunks(5, b) == [(0, 5, 8)]
    assert chunks(19, b) == [(0, 8, 8), (8, 8, 8), (16, 3, 4)]
    assert all(c.bucket in b for n in range(1, 40) for c in chunks(n, b))
    assert all(sum(c.rows for c in chunks(n, b)) == n for n in range(1, 40))


def test_a_fixed_batch_dimension_is_the_only_bucket_and_no_batch_dimension_none():
    assert model_buckets(-1, (1, 2, 4)) == (1, 2, 4)
    assert model_buckets(8, (1, 2, 4)) == (8,)
    assert model_buckets(None, (1, 2, 4)) == ()
    # What a front end makes of it: its largest batch, and the cluster's buckets.
    assert batch_shapes(-1, 32, [1, 8, 32]) == (32, (1, 8, 32))
    assert batch_shapes(-1, 16, None) == (16, (1, 2, 4, 8, 16))
    assert batch_shapes(4, 32, [1, 8, 32]) == (4, (4,))


def test_a_curve_reads_a_batch_at_its_bucket_since_padding_costs_the_same():
    c = ServiceCurve(buckets=(1, 8, 32))
    c.observe(8, 0.004)  # the worker reports the padded size it ran
    c.observe(32, 0.010)
    assert c.estimate(5) == c.estimate(8) == pytest.approx(0.004)
    assert c.estimate(9) == c.estimate(32) == pytest.approx(0.010)
    c.observe(1, 0.001)
    assert c.estimate(70) == pytest.approx(2 * 0.010 + 0.004)  # past the largest: two 32s and an 8
    plain = ServiceCurve()  # no bucket set known: linear between powers of two, as before
    plain.observe(8, 0.004)
    plain.observe(32, 0.010)
    assert plain.estimate(20) == pytest.approx(0.004 + (20 - 8) / 24 * 0.006)


def gpu_like(points: dict[int, float]) -> WorkerView:
    v = WorkerView("w")
    v.service = ServiceCurve(buckets=(1, 2, 4, 8, 16, 32), points=dict(points))
    return v


def test_placement_pads_where_rows_are_nearly_free_and_cuts_where_they_cost():
    gpu = gpu_like({4: 0.0020, 8: 0.0022, 16: 0.004, 32: 0.007})  # per batch: flat, then ~linear
    cpu = gpu_like({4: 0.08, 8: 0.16, 16: 0.32, 32: 0.64})  # per row: constant
    assert bucket_rows(gpu, 6, gpu.service.buckets) == 6  # 6 rows padded to 8 cost what 4 do
    assert bucket_rows(cpu, 6, cpu.service.buckets) == 4  # padding would double the time of 4
    assert bucket_rows(cpu, 16, cpu.service.buckets) == 16  # a bucket already
    unmeasured = gpu_like({4: 0.002})
    assert bucket_rows(unmeasured, 6, unmeasured.service.buckets) == 6  # padded, which measures 8
    assert bucket_rows(None, 6, (1, 2, 4, 8)) == 6  # Dask places it: the worker pads
    assert bucket_rows(gpu, 6, ()) == 6  # a model without a batch dimension


def test_a_batch_nearer_the_bucket_above_fills_it_from_the_queue():
    cpu = gpu_like({1: 0.02, 2: 0.04, 4: 0.08, 8: 0.16})
    assert bucket_rows(cpu, 3, cpu.service.buckets, queued=10) == 4  # 3 is as near 4 as 2: a full 4, no padding
    assert bucket_rows(cpu, 6, cpu.service.buckets, queued=10) == 8
    assert bucket_rows(cpu, 5, cpu.service.buckets, queued=10) == 4  # nearer 4: cut, the rest waits
    assert bucket_rows(cpu, 3, cpu.service.buckets, queued=3) == 2  # not queued: the curve decides
