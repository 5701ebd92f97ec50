"""One house, three rooms: ``core`` at the bottom imports no Dask, Tornado or
onnxruntime; ``router_api`` (the front end), ``scheduler_plugins`` and ``worker_setup``
import ``core`` and never each other; and the HTTP front end never loads onnxruntime or
Pillow, not even once it has served requests and Python-API tasks."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import ROOT
from tests.conftest import make_image
from tests.http import classify

ROOMS = ("router_api", "scheduler_plugins", "worker_setup")
# What each package may not import, anywhere in it (functions included).
FORBIDDEN = {
    "core": {"dask", "distributed", "tornado", "onnxruntime", "PIL", "bokeh", *ROOMS},
    "router_api": {"scheduler_plugins", "worker_setup", "onnxruntime", "PIL"},
    "scheduler_plugins": {"router_api", "worker_setup", "onnxruntime"},
    "worker_setup": {"router_api", "scheduler_plugins"},
}


def modules(package: str) -> list[str]:
    return sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / package).rglob("*.py")
    )


def imported(path: Path) -> set[str]:
    """Top-level packages a file imports, wherever the import statement is."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", list(FORBIDDEN))
def test_no_import_statement_points_sideways_or_down_into_heavy_parts(package):
    found = {
        str(p.relative_to(ROOT)): sorted(bad)
        for p in (ROOT / package).rglob("*.py")
        if (bad := imported(p) & FORBIDDEN[package])
    }
    assert found == {}


@pytest.mark.parametrize("package", list(FORBIDDEN))
def test_importing_every_module_in_a_fresh_interpreter_loads_nothing_forbidden(package):
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules(package)!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert set(json.loads(out.stdout)) & FORBIDDEN[package] == set()


@pytest.mark.integration
def test_the_front_end_process_never_loads_onnxruntime_or_pillow(cluster, tmp_path):
    """``batch-router up`` runs the HTTP front end and the scheduler in one process: after
    a classify, an infer and a Python-API task, neither library is mapped into it."""
    from distributed import Client

    from worker_setup import classify as classify_task

    assert classify(cluster.url, make_image(1)).status == 200
    with Client(cluster.scheduler, timeout=30) as client:
        assert len(client.submit(classify_task, [make_image(2)], pure=False).result(timeout=120)) == 1
    front_end = Path(f"/proc/{cluster.proc.pid}/maps").read_text()
    assert "onnxruntime" not in front_end and "PIL" not in front_end
    workers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and parent(p) == cluster.proc.pid]
    assert workers and all("onnxruntime" in (w / "maps").read_text() for w in workers)  # where they belong


def parent(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
