"""End to end on the real bundled model (all-MiniLM-L6-v2), on a small slice of the text data."""

from __future__ import annotations

import json

import onnx
import pytest

from bayesq_onnx.config import CompileConfig
from bayesq_onnx.pipeline import compile_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm") / "out"
    config = CompileConfig(model="minilm", method="rtn", bits=8, out=out, calib_size=32, eval_size=64, latency_runs=2,
                           memory_loads=1,
                           latency_warmup=1, latency_batch=2, latency_seq=16)
    return compile_model(config), out


def test_minilm_compiles_and_stays_faithful_at_8_bits(compiled):
    result, out = compiled
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["max_abs_diff"] < 1e-4
    assert report["plan"]["method"] == "rtn"
    # every Linear layer of the six transformer blocks (q, k, v, attention output, intermediate, output) and,
    # in the default scope, the word and position embedding tables (the 2-row token-type table is too small)
    names = [t["name"] for t in report["plan"]["tensors"]]
    assert len(names) == report["bits"]["quantized_tensors"] == 38
    assert sorted(n for n in names if "embeddings" in n) == ["encoder.embeddings.position_embeddings.weight",
                                                             "encoder.embeddings.word_embeddings.weight"]
    assert report["bits"]["linear_weights"] == 6 * (4 * 384 * 384 + 2 * 384 * 1536)
    assert report["bits"]["all_in"] == pytest.approx(report["bits"]["all_in_from_file"], rel=1e-12)
    assert 8 < report["bits"]["all_in"] < 8.2
    assert report["fidelity"]["cosine_mean"] > 0.995
    assert report["fidelity"]["items"] == 64
    assert report["latency"]["feed"] == "input_ids 2×16, attention_mask 2×16"
    assert report["sizes"]["artifact_bytes"] < report["sizes"]["fp32_bytes"]
    onnx.checker.check_model(onnx.load(out / "model.onnx"), full_check=True)


def test_minilm_report_markdown_and_plot(compiled):
    _, out = compiled
    md = (out / "report.md").read_text()
    assert "cosine_mean" in md and "all-in" in md
    assert (out / "bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bayesian_quantizer_beats_rtn_on_minilm(tmp_path):
    """At 3 bits the posterior-designed, error-fed-back quantizer must beat round-to-nearest clearly."""
    from bayesq_onnx.models import load_model
    from bayesq_onnx.models.base import SourceOptions

    bundle = load_model("minilm", SourceOptions(calib_size=32, eval_size=64))
    common = dict(model="minilm", bits=3, calib_size=32, eval_size=64, latency_runs=1, memory_loads=1, latency_warmup=0,
                  latency_batch=1, latency_seq=8)
    rtn = compile_model(CompileConfig(out=tmp_path / "rtn", method="rtn", **common), bundle=bundle).report
    bq = compile_model(CompileConfig(out=tmp_path / "bq", method="bayesq-fixed", curvature="kfac", **common),
                       bundle=bundle).report
    assert bq["bits"]["all_in"] == pytest.approx(rtn["bits"]["all_in"])
    assert bq["fidelity"]["cosine_mean"] > rtn["fidelity"]["cosine_mean"] + 0.1
    assert bq["plan"]["method"] == "bayesq-fixed"
    t = next(t for t in bq["plan"]["tensors"] if "embeddings" not in t["name"])  # a Linear weight
    assert t["curvature"] == "kfac" and t["fisher_mass"] > 0 and t["whitened_error"] > 0


def test_minilm_verdict_at_2_5_bits_is_degraded_and_at_8_bits_holds(compiled, tmp_path):
    """docs/reliability.md#verdict on the real model: the 8-bit compile holds; the default compile at 2.5 bits
    (cosine about 0.89) is degraded, neither holding nor collapsed, and its CLI line says so with its figures."""
    result, _ = compiled
    assert result.report["verdict"]["verdict"] == "holds"
    low = compile_model(CompileConfig(model="minilm", bits=2.5, out=tmp_path / "low", calib_size=64, eval_size=128,
                                      latency_runs=1,
                                      memory_loads=1, latency_warmup=0, latency_batch=2, latency_seq=16)).report
    v = low["verdict"]
    print(f"MiniLM 2.5 bits: {v['line']}; floor {low.get('floor')}")
    assert v["measure"] == "cosine_mean" and v["verdict"] == "degraded", v["line"]
    assert v["reference_8bit"]["loss"] < v["loss"] and 0.0 < v["chance"] < 0.9
    assert any(w.startswith("verdict: degraded") for w in low["warnings"])
