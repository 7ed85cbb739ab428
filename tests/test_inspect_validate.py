"""``bayesq inspect`` and ``bayesq validate`` on a compiled tiny model: the accounting redone from the file
equals the report's, validation re-run on the pair reproduces the report's fidelity, bad input is one line."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from bayesq_onnx.cli import main
from bayesq_onnx.config import CompileConfig
from bayesq_onnx.export import export_model
from bayesq_onnx.models.metrics import output_fidelity
from bayesq_onnx.pipeline import compile_model
from helpers import run
from tiny_torch import tiny_bundle


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(artifact dir, report, FP32 reference path, evaluation .npz path) for the tiny LM at 3.5 bits."""
    root = tmp_path_factory.mktemp("inspect")
    bundle = tiny_bundle()
    config = CompileConfig(model="tiny", out=root / "out", method="bayesq", bits=3.5, latency_runs=2, memory_loads=1,
                           latency_warmup=1)
    result = compile_model(config, bundle=bundle)
    reference = root / "fp32.onnx"
    ir.save(export_model(tiny_bundle()), reference)
    data = root / "eval.npz"
    np.savez(data, ids=np.concatenate([b["ids"] for b in bundle.evaluation]))
    return root / "out", result.report, reference, data


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _assert_user_error(result, needle):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_inspect_redoes_the_report_accounting(compiled):
    out, report, _, _ = compiled
    r = invoke("inspect", out, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["bayesq_artifact"] and info["method"] == "bayesq"
    assert info["ort_session_config"] == report["provider"]["artifact_session_config"]
    plan = {t["name"]: t for t in report["plan"]["tensors"]}
    assert [t["name"] for t in info["tensors"]] == sorted(plan)
    for t in info["tensors"]:
        p = plan[t["name"]]
        assert t["all_in_bits"] == p["all_in_bits"]  # exactly: the same integers divided
        assert (t["label"], t["family"], t["bits"], t["weights"], t["shape"]) == (
            p["candidate"]["label"], p["candidate"]["family"], p["candidate"]["bits"], p["weights"], p["shape"])
        assert 8 * t["bytes"] == p["stored_bits"]
    tot = info["totals"]
    assert tot["quantized_bytes"] == report["sizes"]["quantized_tensor_bytes"]
    assert tot["all_in_bits"] == report["bits"]["all_in_from_file"] == pytest.approx(report["bits"]["all_in"])
    assert tot["nominal_bits"] == pytest.approx(report["bits"]["nominal"])
    assert tot["quantized_weights"] == report["bits"]["quantized_weights"]
    assert tot["accounting_ok"] and not tot["missing_arrays"]
    assert info["float_initializers"]["bytes"] + info["other_initializers"]["bytes"] == \
        report["sizes"]["float_tensor_bytes"]
    assert info["file_bytes"] == report["sizes"]["artifact_bytes"]


def test_inspect_table(compiled):
    out, report, _, _ = compiled
    r = invoke("inspect", out / "model.onnx")
    assert r.exit_code == 0, r.output
    assert "all-in bits" in r.stdout and "matches" in r.stdout and "proj.weight" in r.stdout
    assert f"{report['bits']['all_in']:.4f}" in r.stdout


def test_inspect_plain_onnx_lists_weights(compiled):
    _, _, reference, _ = compiled
    r = invoke("inspect", reference, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert not info["bayesq_artifact"] and "not a BayesQ artifact" in info["note"]
    assert len(info["weights"]) == 3  # proj, conv, the tied head/embedding table
    assert {w["weights"] for w in info["weights"]} == {32 * 32, 32 * 32 * 3, 50 * 32}
    assert all(w["bytes"] == 4 * w["weights"] for w in info["weights"])
    r = invoke("inspect", reference)
    assert r.exit_code == 0 and "not a BayesQ artifact" in r.stdout


def test_validate_with_data_reproduces_the_report(compiled):
    out, report, reference, data = compiled
    r = invoke("validate", out, "--reference", reference, "--data", data, "--runs", 2, "--provider", "cpu",
               "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    bundle = tiny_bundle()
    expected = np.concatenate([run(reference.read_bytes(), b) for b in bundle.evaluation])
    got = np.concatenate([run((out / "model.onnx").read_bytes(), b) for b in bundle.evaluation])
    assert result["fidelity"] == pytest.approx(output_fidelity(expected, got), abs=1e-6)
    # the same items as the compile's evaluation: the figures both metrics share agree
    assert result["fidelity"]["argmax_agreement"] == report["fidelity"]["top1_agreement"]
    assert result["fidelity"]["max_abs_diff"] == pytest.approx(report["fidelity"]["max_abs_diff"], abs=1e-5)
    lat = result["latency"]
    assert {"fp32", "quantized", "ratio", "feed"} <= set(lat) and lat["ratio"] > 0
    assert set(result["session_start_s"]) == {"fp32", "quantized"}
    assert result["provider"]["artifact_session_config"] == report["provider"]["artifact_session_config"]
    r = invoke("validate", out, "--reference", reference, "--data", data, "--runs", 1, "--provider", "cpu")
    assert r.exit_code == 0 and "latency ratio" in r.stdout and "cosine_mean" in r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith("verdict: ")


def test_validate_with_model_source_reproduces_the_report(compiled):
    """--model takes the source's evaluation set and metric: the compile report's own figures come back."""
    out, report, reference, _ = compiled
    r = invoke("validate", out, "--reference", reference, "--model", "module:tiny_torch:tiny_bundle", "--runs", 2,
               "--provider", "cpu", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["fidelity"] == pytest.approx(report["fidelity"], abs=1e-6)
    assert result["headline"]["metric"] == report["headline"]["metric"] and result["headline"]["items"] == report["headline"]["items"]
    assert result["headline"]["value"] == pytest.approx(report["headline"]["value"], abs=1e-6)
    assert result["headline"]["ci95"] == pytest.approx(report["headline"]["ci95"], abs=1e-6)
    assert result["latency"]["feed"] == report["latency"]["feed"]
    # the compile's verdict on the same items, measure and loss (validate has no 8-bit reference: its tolerance
    # is the fixed one)
    assert result["verdict"]["measure"] == report["verdict"]["measure"]
    assert result["verdict"]["value"] == pytest.approx(report["verdict"]["value"], abs=1e-6)
    assert result["verdict"]["loss"] == pytest.approx(report["verdict"]["loss"], abs=1e-6)


@pytest.mark.parametrize("case,needle", [
    ("missing", "no such file"),
    ("not_onnx", "not a readable ONNX model"),
    ("other_inputs", "the artifact's inputs"),
    ("bad_npz", "do not match the model inputs"),
    ("no_inputs", "--data FILE.npz"),
])
def test_bad_input_is_one_line(compiled, tmp_path, case, needle):
    out, _, reference, data = compiled
    if case == "missing":
        _assert_user_error(invoke("inspect", tmp_path / "nothing.onnx"), needle)
        _assert_user_error(invoke("validate", tmp_path / "nothing", "--reference", reference, "--data", data), needle)
        return
    if case == "not_onnx":
        junk = tmp_path / "junk.onnx"
        junk.write_bytes(b"\x00\xff not an onnx model \xff" * 10)
        _assert_user_error(invoke("inspect", junk), needle)
        return
    args = ["validate", out, "--reference", reference, "--provider", "cpu", "--runs", 1]
    if case == "other_inputs":
        model = ir.load(reference)
        model.graph.inputs[0].name = "tokens"
        other = tmp_path / "other.onnx"
        ir.save(model, other)
        _assert_user_error(invoke(*args[:3], other, *args[4:], "--data", data), needle)
    elif case == "bad_npz":
        bad = tmp_path / "bad.npz"
        np.savez(bad, tokens=np.zeros((4, 6), np.int64))
        _assert_user_error(invoke(*args, "--data", bad), needle)
    else:
        _assert_user_error(invoke(*args), needle)
