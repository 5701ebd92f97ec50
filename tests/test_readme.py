"""Every code example in the README runs as written, against a live cluster.

Python blocks run with this interpreter, shell blocks with bash, each in a fresh
directory holding the files the examples name (cat.jpg, dog.png, photos/). Only the
ports change: the README's defaults (8000, 8786, 8787) become the test cluster's. A
block that cannot run here (it starts the service itself, installs packages, needs a
GPU or the internet) says so in a comment right above it: ``<!-- not run: why -->``.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import ROOT
from tests.conftest import make_image

pytestmark = pytest.mark.integration

BLOCK = re.compile(r"(?:<!-- not run: (?P<why>.+?) -->\n)?^(?P<indent> *)```(?P<lang>\w*)\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)


def blocks() -> list[tuple[int, str, str, str | None]]:
    """(line, language, code, why it is not run) for every fenced block."""
    text = (ROOT / "README.md").read_text()
    out = []
    for m in BLOCK.finditer(text):
        body = "\n".join(line.removeprefix(m["indent"]) for line in m["body"].splitlines())
        out.append((text.count("\n", 0, m.start("lang")) + 1, m["lang"], body, m["why"]))
    return out


RUNNABLE = [(line, lang, code) for line, lang, code, why in blocks() if lang in ("python", "sh") and why is None]


def test_every_block_is_run_or_says_why_not():
    """Pictures are ``text``; any other block is code, and code runs or says why not."""
    silent = [(line, lang) for line, lang, _, why in blocks() if why is None and lang not in ("python", "sh", "text")]
    assert silent == [] and len(RUNNABLE) >= 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cluster) -> Path:
    """The files the examples name, and a ``curl`` that fails on an HTTP error."""
    d = tmp_path_factory.mktemp("readme")
    (d / "cat.jpg").write_bytes(make_image(1))
    (d / "dog.png").write_bytes(make_image(2, fmt="PNG"))
    (d / "photos").mkdir()
    for i in range(3):
        (d / "photos" / f"p{i}.jpg").write_bytes(make_image(10 + i))
    (d / "bin").mkdir()
    curl = d / "bin" / "curl"
    curl.write_text('#!/bin/sh\nexec /usr/bin/curl --fail-with-body -sS "$@"\n')
    curl.chmod(curl.stat().st_mode | stat.S_IEXEC)
    return d


@pytest.mark.parametrize("line, lang, code", RUNNABLE, ids=[f"line{line}-{lang}" for line, lang, _ in RUNNABLE])
def test_the_readme_example_runs(line, lang, code, cluster, workdir):
    for default, ours in (("localhost:8000", f"127.0.0.1:{cluster.port}"), ("127.0.0.1:8786", f"127.0.0.1:{cluster.scheduler_port}"),
                          ("127.0.0.1:8787", f"127.0.0.1:{cluster.dashboard_port}")):  # fmt: skip
        code = code.replace(default, ours)
    cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-e", "-c", code]
    env = {**os.environ, "PATH": f"{workdir / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"README line {line}:\n{code}\n--- stdout\n{out.stdout}\n--- stderr\n{out.stderr}"
