"""``digits-resnet``: shipped weights and their record, deterministic training, the bundle, and compiles."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bayesq_onnx.cli import main
from bayesq_onnx.config import CompileConfig
from bayesq_onnx.errors import UserError
from bayesq_onnx.models import digits_resnet as dr
from bayesq_onnx.models import load_model
from bayesq_onnx.models.base import SourceOptions
from bayesq_onnx.models.metrics import expected_calibration_error, negative_log_likelihood, top_k_accuracy
from bayesq_onnx.pipeline import compile_model

ROOT = Path(__file__).resolve().parents[1]


def _train_script():
    spec = importlib.util.spec_from_file_location("train_digits_resnet", ROOT / dr.TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def split():
    return dr.digits_split()


def test_weights_file_is_small_and_matches_its_record():
    record = json.loads(dr.RECORD.read_text())
    assert dr.WEIGHTS.stat().st_size <= 2 * 1024 * 1024
    assert record["weights_bytes"] == dr.WEIGHTS.stat().st_size
    assert record["weights_sha256"] == dr.sha256(dr.WEIGHTS)
    assert record["parameters"] == sum(p.numel() for p in dr.DigitsResNet().parameters())
    assert 150_000 <= record["parameters"] <= 450_000
    assert record["fp32_test"]["top1"] >= 0.97


def test_shipped_weights_reproduce_the_recorded_fp32_metrics(split):
    module, record = dr.load_module()
    logits = dr.predict(module, split.test_images)
    recorded = record["fp32_test"]
    assert recorded["items"] == len(split.test_labels) == record["split"]["test"]
    assert top_k_accuracy(logits, split.test_labels) == recorded["top1"]
    assert negative_log_likelihood(logits, split.test_labels) == pytest.approx(recorded["nll"], rel=1e-4)
    assert expected_calibration_error(logits, split.test_labels) == pytest.approx(recorded["ece"], rel=1e-3, abs=1e-6)


def test_folding_batchnorm_keeps_the_function(split):
    from safetensors.torch import load_file

    model = dr.DigitsResNet()
    model.load_state_dict(load_file(dr.WEIGHTS))
    model.eval()
    folded = dr.with_batchnorm_folded(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    np.testing.assert_allclose(dr.predict(folded, split.test_images), dr.predict(model, split.test_images),
                               atol=1e-4)


def test_split_is_fixed_and_stratified(split):
    assert (len(split.train_labels), len(split.test_labels)) == (1347, 450)
    assert split.train_images.shape[1:] == (1, 8, 8) and split.train_images.dtype == np.float32
    assert 0.0 <= split.train_images.min() and split.train_images.max() <= 1.0
    counts = np.bincount(split.test_labels, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47  # ~45 per class
    again = dr.digits_split()
    assert np.array_equal(again.test_labels, split.test_labels)
    assert np.array_equal(again.train_images, split.train_images)


def test_training_is_deterministic():
    train = _train_script().train
    before, threads = torch.get_rng_state(), torch.get_num_threads()
    a, metrics = train(epochs=1, seed=3)
    b, _ = train(epochs=1, seed=3)
    # the caller's RNG and settings are left alone
    assert torch.equal(torch.get_rng_state(), before) and torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()
    assert a.keys() == b.keys() == dr.DigitsResNet().state_dict().keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert set(metrics) == {"top1", "nll", "ece", "items"}
    c, _ = train(epochs=1, seed=4)
    assert not torch.equal(a["head.weight"], c["head.weight"])


def test_bundle_is_consistent(split):
    options = SourceOptions(calib_size=70, eval_size=100, latency_batch=5)
    bundle = load_model("digits-resnet", options)
    assert bundle.input_names == ["pixels"] and bundle.output_names == ["logits"]
    assert bundle.dynamic_axes == {"pixels": {0: "batch"}}
    assert [len(b["pixels"]) for b in bundle.calibration] == [32, 32, 6]
    assert [len(t) for t in bundle.calibration_targets] == [32, 32, 6]
    assert all(t.dtype == np.int64 for t in bundle.calibration_targets)
    assert [len(b["pixels"]) for b in bundle.evaluation] == [64, 36]
    assert bundle.latency_feed["pixels"].shape == (5, 1, 8, 8)
    assert bundle.likelihood == "categorical" and bundle.headline == "top1"
    # calibration items are train items with their own labels, in a fixed order
    calib = np.concatenate([b["pixels"] for b in bundle.calibration])
    labels = np.concatenate(bundle.calibration_targets)
    flat = split.train_images.reshape(len(split.train_images), -1)
    for image, label in zip(calib, labels):
        rows = np.flatnonzero((flat == image.reshape(-1)).all(axis=1))
        assert rows.size and label in split.train_labels[rows]
    again = load_model("digits-resnet", options).calibration
    assert np.array_equal(calib, np.concatenate([b["pixels"] for b in again]))
    # evaluation is the head of the test split; the metric scores the FP32 model as recorded on it
    evaluation = np.concatenate([b["pixels"] for b in bundle.evaluation])
    assert np.array_equal(evaluation, split.test_images[:100])
    logits = dr.predict(bundle.module, evaluation)
    figures = bundle.metric(logits, logits)
    assert figures["items"] == 100 and figures["top1_drop_points"] == 0.0
    assert figures["top1"] == top_k_accuracy(logits, split.test_labels[:100])
    assert bundle.info["weights_sha256"] == dr.sha256(dr.WEIGHTS)
    assert bundle.info["fp32_test_top1_recorded"] >= 0.97


def test_sizes_larger_than_the_splits_are_clipped():
    bundle = load_model("digits-resnet", SourceOptions(calib_size=5000, eval_size=5000, latency_batch=500))
    assert sum(len(b["pixels"]) for b in bundle.calibration) == 1347
    assert sum(len(b["pixels"]) for b in bundle.evaluation) == 450
    assert bundle.latency_feed["pixels"].shape == (500, 1, 8, 8)


def test_missing_weights_are_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(dr, "WEIGHTS", tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="not found.*train_digits_resnet.py"):
        load_model("digits-resnet")


def test_corrupt_weights_are_a_user_error(tmp_path, monkeypatch):
    data = bytearray(dr.WEIGHTS.read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "w.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(dr, "WEIGHTS", tmp_path / "w.safetensors")
    with pytest.raises(UserError, match="do not match their recorded sha256"):
        load_model("digits-resnet")
    # a file matching its record that is not a safetensors file of this architecture
    (tmp_path / "w.safetensors").write_bytes(b"not safetensors")
    record = json.loads(dr.RECORD.read_text())
    record["weights_sha256"] = dr.sha256(tmp_path / "w.safetensors")
    (tmp_path / "r.json").write_text(json.dumps(record))
    monkeypatch.setattr(dr, "RECORD", tmp_path / "r.json")
    with pytest.raises(UserError, match="do not fit the architecture"):
        load_model("digits-resnet")


@pytest.mark.slow
def test_compile_rtn_4_bits_keeps_accuracy(tmp_path):
    config = CompileConfig(model="digits-resnet", bits=4, method="rtn", out=tmp_path / "out", calib_size=64,
                           eval_size=128, latency_runs=2, memory_loads=1, latency_warmup=1)
    report = compile_model(config).report
    fidelity = report["fidelity"]
    assert {"top1", "top1_fp32", "nll", "ece"} <= set(fidelity)
    assert fidelity["items"] == 128
    assert fidelity["top1_fp32"] >= 0.97
    assert fidelity["top1"] >= fidelity["top1_fp32"] - 0.03
    assert report["export"]["parameters_unbound"] == []  # BN is folded in PyTorch: every conv has its parameter
    assert report["bits"]["quantized_tensors"] == 11  # 10 block convs + head; the 288-weight stem stays FP32
    assert 4 < report["bits"]["all_in"] < 4.2


@pytest.mark.slow
def test_cli_compile_rtn_8_bits(tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compile", "digits-resnet", "--method", "rtn", "--bits", "8", "--out", str(out),
                                  "--calib-size", "32", "--eval-size", "64", "--latency-runs", "2",
                                  "--memory-loads", "1", "-q"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["headline"]["metric"] == "top1"
    assert report["fidelity"]["agreement"] == 1.0
