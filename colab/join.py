"""What the Colab notebook's one cell runs: check the GPU, make sure ONNX Runtime really
uses CUDA, then run a worker that joins with the token, and keep it running.

    python -m colab.join --token 'brt1....'          # or BATCH_ROUTER_JOIN_TOKEN=...

Silent CPU fallback cost the old system days, so a CUDA check that fails stops here,
loudly, before the worker joins and takes batches at CPU speed. The worker rejoins by
itself after a tunnel drop; this loop also restarts it if the process dies.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time


class NoCuda(RuntimeError):
    pass


def check_gpu() -> str:
    """nvidia-smi's list of GPUs; a runtime without one cannot serve CUDA."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise NoCuda("nvidia-smi not found: this runtime has no GPU (Colab: Runtime > Change runtime type > T4 GPU)")
    out = subprocess.run([smi, "-L"], capture_output=True, text=True)
    if out.returncode != 0 or "GPU" not in out.stdout:
        raise NoCuda(f"nvidia-smi sees no GPU: {out.stdout or out.stderr}")
    return out.stdout.strip()


def verify_cuda() -> list[str]:
    """The providers a real session runs with; CUDA must come first."""
    import numpy as np
    import onnxruntime as ort

    from scheduler_plugins.builtin_models import build_trivial

    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "batch-router-cuda-check.onnx")
    build_trivial(__import__("pathlib").Path(path))
    session = ort.InferenceSession(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    session.run(None, {session.get_inputs()[0].name: np.zeros((1, 3, 224, 224), np.float32)})
    providers = session.get_providers()
    if not providers or providers[0] != "CUDAExecutionProvider":
        raise NoCuda(
            f"ONNX Runtime is NOT using CUDA (providers {providers}, available {ort.get_available_providers()}). "
            "Fix: pip uninstall -y onnxruntime && pip install onnxruntime-gpu, then restart the runtime."
        )
    return providers


def supervise(cmd: list[str], max_restarts: int | None = None, pause: float = 5.0) -> int:
    """Run ``cmd`` until it exits 0 or is interrupted; restart it after a crash."""
    restarts = 0
    while True:
        code = subprocess.call(cmd)
        if code == 0 or (max_restarts is not None and restarts >= max_restarts):
            return code
        restarts += 1
        print(f"worker exited with {code}; restarting in {pause:.0f} s (restart {restarts})", flush=True)
        time.sleep(pause)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--token", default=os.environ.get("BATCH_ROUTER_JOIN_TOKEN"))
    p.add_argument("--name", default=None, help="worker name (default: colab-<hostname>)")
    p.add_argument("--skip-checks", action="store_true", help="join even without a working CUDA (not for real use)")
    args = p.parse_args(argv)
    if not args.token:
        p.error("paste the scheduler's JOIN_TOKEN (--token or BATCH_ROUTER_JOIN_TOKEN)")
    if not args.skip_checks:
        print(check_gpu(), flush=True)
        print("ONNX Runtime providers:", verify_cuda(), flush=True)
    name = args.name or f"colab-{os.uname().nodename}"
    cmd = [sys.executable, "-m", "router_api.cli", "worker", "--join", args.token, "--name", name, "--device", "cuda"]
    if args.skip_checks:
        cmd[-1] = "auto"
    return supervise(cmd)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except NoCuda as e:
        print(f"\n*** {e} ***\n", file=sys.stderr, flush=True)
        sys.exit(2)
