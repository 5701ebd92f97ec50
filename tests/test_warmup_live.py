"""Warm-up on a real cluster: the front end is not ready until a worker has run every
bucket, and then shows what the warm-up measured. A refused precision stops a start."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.cluster import ROOT, Cluster

pytestmark = pytest.mark.integration


def status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def test_not_ready_until_a_worker_has_warmed_every_bucket(tmp_path):
    # Each run of a slowed worker takes at least 1.5 s: a warm-up of buckets 1, 2, 4
    # takes 4.5 s or more, long enough to watch the front end answer not-ready.
    c = Cluster(workers=1, args=["--max-batch-size", "8"], log=tmp_path / "up.log",
                env={"DASK_BATCH_ROUTER__WORKER__BATCH_TIME": "1.5s"})  # fmt: skip
    c.start_process()
    try:
        seen = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not seen or seen[-1] != 200):
            if status(c.url + "/v2/health/live") == 200:
                seen.append(status(c.url + "/v2/health/ready"))
            time.sleep(0.2)
        assert seen and seen[0] == 400 and seen[-1] == 200, seen  # live first, ready only after warm-up
        (w,) = c.get("/v1/workers")["workers"]
        assert w["buckets"] == [1, 2, 4, 8] and w["precision"] == "fp32"
        warmed = [row for row in w["warmup"] if "steady_ms" in row]
        assert [row["bucket"] for row in warmed] == [1, 2, 4]  # warmup-cpu-max-rows: 4
        assert all(row["first_ms"] >= 1500 for row in warmed)  # through the slowed session, as batches run
        assert w["warmup"][3] == {"bucket": 8, "skipped": "cpu"}
        assert w["options"] == {"io_binding": True} and w["cuda_graphs"] is False
        assert "warm-up of resnet50 on cpu (fp32): 1: " in (tmp_path / "up.log").read_text()
    finally:
        c.stop()


def test_fp16_on_a_cpu_is_refused_at_startup_naming_the_setting():
    out = subprocess.run([sys.executable, "-m", "router_api.cli", "up", "--workers", "1", "--device", "cpu",
                          "--precision", "fp16"], cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode != 0
    assert "batch-router.worker.precision: fp16 needs a CUDA device" in out.stderr + out.stdout
