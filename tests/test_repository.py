"""Reading a Triton model repository: layout, versions, config.pbtxt or YAML, and a clear
error for each thing a user gets wrong (pure: no ONNX is opened)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.repository import RepositoryError, memory_need, read_model, scan


def model(root: Path, name: str, versions=(1,), config: str | None = None, config_name: str = "config.pbtxt", filename="model.onnx") -> Path:
    d = root / name
    for v in versions:
        (d / str(v)).mkdir(parents=True)
        (d / str(v) / filename).write_bytes(b"onnx")
    if config is not None:
        (d / config_name).write_text(config)
    return d


def test_a_model_without_config_takes_the_latest_version_and_the_clusters_settings(tmp_path):
    model(tmp_path, "resnet", versions=(1, 3, 2))
    spec = read_model(tmp_path, "resnet")
    assert (spec.version, Path(spec.path)) == ("3", tmp_path / "resnet" / "3" / "model.onnx")
    assert (spec.max_batch_size, spec.buckets, spec.precision, spec.labels) == (None, None, None, None)
    assert spec.batch_limits(32, None) == (32, (1, 2, 4, 8, 16, 32))


def test_config_pbtxt_sets_batching_precision_and_labels(tmp_path):
    d = model(tmp_path, "small", config="""
        name: "small" platform: "onnxruntime_onnx" max_batch_size: 16
        dynamic_batching { preferred_batch_size: [4, 8] max_queue_delay_microseconds: 2000 }
        output [{ name: "scores" dims: [10] label_filename: "labels.txt" }]
        parameters { key: "precision" value { string_value: "fp16" } }
        instance_group [{ kind: KIND_GPU count: 2 }]
    """)
    (d / "labels.txt").write_text("a\nb\n")
    spec = read_model(tmp_path, "small")
    assert spec.max_batch_size == 16
    assert spec.buckets == (4, 8, 16)  # the largest batch is always a shape
    assert spec.max_queue_delay == pytest.approx(0.002)
    assert spec.precision == "fp16"
    assert spec.labels == str(d / "labels.txt")
    assert spec.batch_limits(32, (1, 32)) == (16, (4, 8, 16))


def test_the_same_config_as_yaml(tmp_path):
    model(tmp_path, "y", config="max_batch_size: 8\ndynamic_batching:\n  preferred_batch_size: [2, 8]\n", config_name="config.yaml")
    spec = read_model(tmp_path, "y")
    assert (spec.max_batch_size, spec.buckets) == (8, (2, 8))
    assert spec.batch_limits(32, (1, 32)) == (8, (2, 8))
    model(tmp_path, "z", config="max_batch_size: 8\n", config_name="config.yml")
    assert read_model(tmp_path, "z").batch_limits(32, (1, 32)) == (8, (1, 2, 4, 8))  # the cluster's do not fit 8: the defaults


def test_version_policy_specific_serves_the_version_named(tmp_path):
    model(tmp_path, "m", versions=(1, 2, 5), config="version_policy { specific { versions: [2] } }")
    assert read_model(tmp_path, "m").version == "2"
    model(tmp_path, "n", versions=(1,), config="version_policy { specific { versions: [7] } }")
    with pytest.raises(RepositoryError, match=r"asks for \[7\].*holds \[1\]"):
        read_model(tmp_path, "n")


def test_default_model_filename(tmp_path):
    model(tmp_path, "f", filename="net.onnx", config='default_model_filename: "net.onnx"')
    assert read_model(tmp_path, "f").path.endswith("1/net.onnx")


@pytest.mark.parametrize(
    "config, error",
    [
        ("max_batch_size: eight", r"config.pbtxt.*max_batch_size"),
        ("no_such_field: 1", r"no_such_field"),
        ('name: "other"', r"names the model 'other'"),
        ('platform: "tensorrt_plan"', r"ONNX models"),
        ("max_batch_size: 4 dynamic_batching { preferred_batch_size: [8] }", r"must lie in 1..max_batch_size \(4\)"),
        ('parameters { key: "precision" value { string_value: "int4" } }', r"precision 'int4'"),
        ('output [{ name: "y" label_filename: "missing.txt" }]', r"does not exist"),
        ('output [{ name: "y" label_filename: "../../etc/passwd" }]', r"beside the config"),
    ],
)
def test_a_bad_config_is_an_error_naming_the_file_and_the_field(tmp_path, config, error):
    model(tmp_path, "bad", config=config)
    with pytest.raises(RepositoryError, match=error):
        read_model(tmp_path, "bad")


def test_a_misspelt_yaml_field_is_an_error(tmp_path):
    model(tmp_path, "bad", config="max_batch_sise: 8\n", config_name="config.yaml")
    with pytest.raises(RepositoryError, match="max_batch_sise"):
        read_model(tmp_path, "bad")


def test_scan_lists_every_model_with_its_spec_or_its_error(tmp_path):
    model(tmp_path, "good")
    (tmp_path / "empty").mkdir()
    model(tmp_path, "two_configs", config="")
    (tmp_path / "two_configs" / "config.yaml").write_text("{}")
    (tmp_path / ".hidden").mkdir()
    found = scan(tmp_path)
    assert sorted(found) == ["empty", "good", "two_configs"]
    assert found["good"].version == "1"
    assert "no version directory holds model.onnx" in str(found["empty"])
    assert "more than one config" in str(found["two_configs"])


@pytest.mark.parametrize("name", ["..", "a/b", "", "x" * 200, "-dash"])
def test_a_name_that_is_not_a_directory_name_is_refused(tmp_path, name):
    with pytest.raises(RepositoryError):
        read_model(tmp_path, name)


def test_an_unknown_model_or_a_missing_repository(tmp_path):
    with pytest.raises(RepositoryError, match="no model 'nope'"):
        read_model(tmp_path, "nope")
    with pytest.raises(RepositoryError, match="not a directory"):
        scan(tmp_path / "missing")


def test_memory_need_is_the_weights_three_times_half_in_fp16():
    assert memory_need(100 * 2**20, "fp32") == 300 * 2**20
    assert memory_need(100 * 2**20, "fp16") == 150 * 2**20


def test_a_worker_takes_a_model_only_with_room_in_its_gpu_memory():
    from core.repository import room_for

    gpu = {"memory_total": 16 * 2**30, "memory_used": 10 * 2**30}
    assert room_for(gpu, 4 * 2**30, 0.1) is None  # 16 * 0.9 - 10 = 4.4 GiB free
    assert room_for(gpu, 5 * 2**30, 0.1) == "needs 5120 MiB of GPU memory, 4506 MiB free (after 10% headroom)"
    assert room_for(None, 10**15, 0.1) is None  # a CPU worker: no figures, no limit
    assert room_for({"memory_total": None, "memory_used": None}, 10**15, 0.1) is None
