"""The tunnel benchmark runs end to end: near and far settings, bytes on the link."""

import json
import subprocess
import sys

import pytest

from tests.cluster import ROOT

pytestmark = pytest.mark.integration


def test_tunnel_benchmark_smoke(tmp_path):
    out = tmp_path / "tunnel.json"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.tunnel", "--rtt-ms", "0,60", "--batch-time", "30ms",
         "--duration", "3s", "--warmup", "2s", "--concurrency", "16", "--quiet", "--json", str(out)],
        cwd=ROOT, check=True, timeout=300,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert [r["rtt_ms"] for r in result["runs"]] == [0, 60]
    for r in result["runs"]:
        assert r["router"]["img_per_s"] > 0 and not r["router"]["errors"]
        # Images cross as the JPEG the client sent, plus framing: never re-encoded.
        assert 1.0 < r["to_worker_over_jpeg"] < 1.2
    assert result["runs"][1]["overhead_ms"] > result["runs"][0]["overhead_ms"]  # it saw the tunnel
    assert {t["name"] for t in result["targets"]} >= {"bytes per image to the worker <= 1.05 x JPEG"}


def test_tensors_to_a_far_worker_cross_compressed(tmp_path):
    """A 602 KB image-derived tensor to a worker 80 ms away crosses the link at well
    under half its size (zlib where a sample shows it pays), and every request is answered."""
    out = tmp_path / "tunnel-infer.json"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.tunnel", "--mode", "infer", "--rtt-ms", "80", "--batch-time", "30ms",
         "--duration", "3s", "--warmup", "2s", "--concurrency", "8", "--quiet", "--json", str(out)],
        cwd=ROOT, check=True, timeout=300,
    )  # fmt: skip
    (run,) = json.loads(out.read_text())["runs"]
    assert run["router"]["img_per_s"] > 0 and not run["router"]["errors"]
    assert run["to_worker_over_request"] < 0.5
