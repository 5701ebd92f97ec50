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
