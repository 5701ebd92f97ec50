"""batch-router's settings: every key has one default and one schema entry, and a wrong
key or value is an error that names it, at startup."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from core.config import DEFAULTS, ConfigError, Settings, nbytes, parse, seconds
from tests.cluster import ROOT


def test_the_defaults_fit_the_schema_and_cover_every_key():
    s = parse()
    assert isinstance(s, Settings)
    assert (s.max_batch_size, s.max_queue_delay, s.http.max_body_size) == (32, 0.0, 64 * 2**20)
    assert (s.placement.policy, s.placement.probe_after, s.compress_beyond) == ("gpu-aware", 2.0, 0.05)
    assert s.worker.gpu_index is None and s.scheduler.public_address is None


def test_overrides_arrive_the_ways_dask_gives_them():
    # dask.config.set / YAML (hyphens) and environment variables (underscores, nested).
    s = parse({"max-batch-size": 8, "placement": {"probe_after": "off"}, "worker": {"gpu_metrics": False}})
    assert s.max_batch_size == 8 and s.placement.probe_after is None
    assert s.worker.gpu_metrics == "off"  # YAML 1.1 reads a bare `off` as false
    s = parse({"scheduler": {"public-address": ""}, "worker": {"intra-op-threads": None}})
    assert s.scheduler.public_address is None and not s.worker.intra_op_threads  # unset, as before


@pytest.mark.parametrize("tree, message", [
    ({"max-batch-size": 0}, "batch-router.max-batch-size: 0 is outside 1"),
    ({"max-batch-size": "32"}, "batch-router.max-batch-size: '32' is not an integer"),
    ({"max-queue-delay": "5 fortnights"}, "batch-router.max-queue-delay: '5 fortnights' is not a duration"),
    ({"placement": {"policy": "fastest"}}, "batch-router.placement.policy: 'fastest' is not one of gpu-aware"),
    ({"placement": {"polcy": "gpu-aware"}}, "batch-router.placement.polcy: no such setting (did you mean 'policy'?)"),
    ({"windw": 2}, "batch-router.windw: no such setting (did you mean 'window'?)"),
    ({"http": {"max-body-size": "lots"}}, "batch-router.http.max-body-size: 'lots' is not a size"),
    ({"http": 8000}, "batch-router.http: expected a mapping"),
    ({"priority-levels": 2, "default-priority-level": 3}, "default-priority-level: 3 exceeds priority-levels (2)"),
])  # fmt: skip
def test_a_bad_setting_is_an_error_naming_its_key(tree, message):
    with pytest.raises(ConfigError) as e:
        parse(tree)
    assert message in str(e.value)


@pytest.mark.parametrize("text", ["0", "0ms", "500ms", "2s", "1.5s", "10m", "1h", "2w", "250us", "3 ms", "2"])
def test_durations_read_as_dask_reads_them(text):
    from dask.utils import parse_timedelta

    assert seconds(text) == pytest.approx(parse_timedelta(text, default="s"))


@pytest.mark.parametrize("text", ["64MiB", "1GB", "512kB", "2GiB", "100", "1.5MB", "64M", "64k", "64Mi"])
def test_sizes_read_as_dask_reads_them(text):
    from dask.utils import parse_bytes

    assert nbytes(text) == parse_bytes(text)


def test_the_defaults_file_is_the_one_the_package_ships():
    with open(ROOT / "core" / "batch-router.yaml") as f:
        assert yaml.safe_load(f) == DEFAULTS


def test_the_command_line_refuses_a_bad_setting_before_starting_anything():
    env = {**os.environ, "DASK_BATCH_ROUTER__PLACEMENT__POLICY": "fastest"}
    out = subprocess.run([sys.executable, "-m", "router_api.cli", "serve", "--scheduler", "tcp://127.0.0.1:1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode != 0 and "bad setting: batch-router.placement.policy: 'fastest'" in out.stderr
    out = subprocess.run([sys.executable, "-m", "router_api.cli", "up", "--max-batch-size", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode != 0 and "batch-router.max-batch-size: 0 is outside 1" in out.stderr
