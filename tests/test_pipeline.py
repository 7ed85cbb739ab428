"""The whole compile on a tiny PyTorch model: artifact files, honest accounting, determinism."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest

from bayesq_onnx.config import CompileConfig
from bayesq_onnx.errors import UserError
from bayesq_onnx.pipeline import compile_model
from helpers import run
from bayesq_onnx.export import torch_outputs
from tiny_torch import logits_fidelity, tiny_bundle


def _compile(tmp_path, name="out", **kw):
    kw.setdefault("method", "rtn")
    config = CompileConfig(model="tiny", out=tmp_path / name, latency_runs=2, memory_loads=1, latency_warmup=1, **kw)
    return compile_model(config, bundle=tiny_bundle())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_compile_writes_artifact_with_exact_accounting(tmp_path, bits):
    result = _compile(tmp_path, bits=bits)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["bits.png", "model.onnx", "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert report["bits"]["all_in"] == pytest.approx(report["bits"]["all_in_from_file"], rel=1e-12)
    assert bits < report["bits"]["all_in"] < bits + 1  # codes plus per-row scales and zero points
    assert report["sizes"]["artifact_bytes"] == (out / "model.onnx").stat().st_size
    # the three graph weights (proj, conv, tied head/emb table used by Gemm+Gather) are quantized
    assert {t["name"] for t in report["plan"]["tensors"]} == {"proj.weight", "conv.weight", "head.weight"}
    onnx.checker.check_model(onnx.load(out / "model.onnx"), full_check=True)
    # the artifact, run on its own, reproduces the fidelity the report states
    bundle = tiny_bundle()
    got = np.concatenate([run((out / "model.onnx").read_bytes(), b) for b in bundle.evaluation])
    ref = torch_outputs(bundle.module, bundle.evaluation, bundle.input_names)
    assert report["fidelity"] == pytest.approx(logits_fidelity(ref, got), abs=1e-5)
    assert result.report["bits"] == report["bits"]


def test_same_inputs_same_bytes(tmp_path):
    a = _compile(tmp_path, "a", bits=3)
    b = _compile(tmp_path, "b", bits=3)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(a.artifact) == digest(b.artifact)
    assert a.report["plan"] == b.report["plan"]


def test_bayesq_is_deterministic(tmp_path):
    a = _compile(tmp_path, "a", method="bayesq", bits=3.5)
    b = _compile(tmp_path, "b", method="bayesq", bits=3.5)
    assert a.artifact.read_bytes() == b.artifact.read_bytes()


def test_rtn_rejects_fractional_bits_before_writing(tmp_path):
    with pytest.raises(UserError, match="`bits` 3.5"):
        _compile(tmp_path, bits=3.5)
    assert not (tmp_path / "out").exists()


def test_group_size_must_divide_channels(tmp_path):
    with pytest.raises(UserError, match="does not divide"):
        _compile(tmp_path, bits=4, group_size=64)
    assert not (tmp_path / "out").exists()


def test_verify_each_and_dump_dir(tmp_path):
    _compile(tmp_path, bits=4, verify_each=True, dump_dir=tmp_path / "dump")
    dumps = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert dumps == ["00-CollectWeightsPass.onnx", "01-UpgradeOpsetPass.onnx", "02-QuantizeWeightsPass.onnx"]


def test_max_drop_finds_the_least_budget_within_the_drop(tmp_path):
    """--max-drop: the chosen plan validates within the drop, every cheaper validated step that was over it
    is cheaper than the choice, and the report's fidelity is the chosen plan's."""
    result = _compile(tmp_path, method="bayesq", max_drop=0.1)
    search = result.report["search"]
    chosen = result.report["bits"]["all_in"]
    assert chosen == pytest.approx(search["chosen_all_in_bits"])
    assert 1.0 - result.report["fidelity"]["top1_agreement"] <= 0.1 + 1e-12
    assert len(search["steps"]) >= 3
    for step in search["steps"]:
        if step["all_in_bits"] < chosen - 1e-9:
            assert not step["within"] or step["all_in_bits"] >= chosen - search["tolerance_bits"]
    assert "Budget search" in (tmp_path / "out" / "report.md").read_text()


def test_max_drop_needs_bayesq(tmp_path):
    with pytest.raises(UserError, match="`max_drop` needs `method` bayesq"):
        _compile(tmp_path, method="rtn", bits=4, max_drop=0.01)
    assert not (tmp_path / "out").exists()


def test_nan_weights_are_refused(tmp_path):
    import torch

    bundle = tiny_bundle()
    with torch.no_grad():
        bundle.module.proj.weight[0, 0] = float("nan")
    config = CompileConfig(model="tiny", out=tmp_path / "out", method="rtn", bits=4, latency_runs=1, memory_loads=1)
    with pytest.raises(UserError, match="'proj.weight' holds NaN or Inf"):
        compile_model(config, bundle=bundle)
    assert not (tmp_path / "out").exists()


def test_dump_dir_inside_out_is_refused(tmp_path):
    with pytest.raises(UserError, match="is inside `out`"):
        _compile(tmp_path, bits=4, dump_dir=tmp_path / "out" / "passes")
    assert not (tmp_path / "out").exists()
