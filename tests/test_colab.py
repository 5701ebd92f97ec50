"""The Colab side: loud checks before joining, a worker that is kept running, and a
notebook whose one cell does it all."""

import json
import sys

import pytest

from colab.join import NoCuda, check_gpu, main, supervise, verify_cuda
from tests.cluster import ROOT


def test_no_gpu_is_said_plainly(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(NoCuda, match="no GPU"):
        check_gpu()


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_cpu_onnxruntime_stops_the_join_loudly():
    """This machine's ONNX Runtime is the CPU build: exactly the silent fallback the
    old system ran on for days. Here it is an error with the fix in it."""
    with pytest.raises(NoCuda, match="NOT using CUDA.*onnxruntime-gpu"):
        verify_cuda()


def test_a_crashing_worker_is_restarted_and_a_clean_exit_is_not(tmp_path):
    runs = tmp_path / "runs"
    crash = [sys.executable, "-c", f"open({str(runs)!r}, 'a').write('x'); raise SystemExit(3)"]
    assert supervise(crash, max_restarts=2, pause=0) == 3
    assert runs.read_text() == "xxx"
    ok = [sys.executable, "-c", "raise SystemExit(0)"]
    assert supervise(ok, pause=0) == 0


def test_join_needs_a_token(monkeypatch):
    monkeypatch.delenv("BATCH_ROUTER_JOIN_TOKEN", raising=False)
    with pytest.raises(SystemExit):
        main([])


def test_notebook_is_one_cell_that_checks_installs_and_joins():
    nb = json.loads((ROOT / "colab" / "worker.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(code) == 1
    src = "".join(code[0]["source"])
    for step in ("JOIN_TOKEN", "nvidia-smi", "uninstall", "onnxruntime", "[gpu]", "colab.join"):
        assert step in src
