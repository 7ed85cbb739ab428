"""Models written the ways people write them (tests/written_models.py: a dict return, a hand-written GPT-2
with tied embeddings, a UNet with ConvTranspose, attention as einsum on bare parameters, Conv1d + GRU / LSTM,
Conv3d), each compiled through the Python API at 4.0 bits: no traceback, at least 95 % of the model's float
values quantized (the rest each a `BayesQWarning` naming the tensor), the bits within budget, and a verdict
that is not collapsed (the trained Conv3d classifier: holds)."""

from __future__ import annotations

import warnings

import pytest


import bayesq_onnx
from bayesq_onnx import BayesQWarning, CompileConfig
from written_models import WRITTEN

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = ("dict_output", "video3d")


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in WRITTEN])
def test_written_model_compiles_quantized(name, tmp_path):
    model, calibration, evaluation, likelihood = WRITTEN[name]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = bayesq_onnx.compile(model, calibration, evaluation=evaluation, likelihood=likelihood,
                                     config=CompileConfig(bits=4.0, out=tmp_path / "out", latency_runs=2,
                                                          memory_loads=1,
                                                          latency_warmup=1))
    r = result.report
    # tied parameters count once, as the artifact stores them once
    share = r["bits"]["quantized_weights"] / sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    print(f"WRITTEN {name}: {share:.1%} of the parameters quantized, {r['bits']['all_in']:.3f} bits, "
          f"left {r['left_in_float']}, {r['verdict']['line']}")
    assert share >= 0.95, (share, r["left_in_float"])
    assert r["bits"]["all_in"] <= 4.0 + 1e-9
    said = {str(w.message).split(" ", 1)[0] for w in caught if issubclass(w.category, BayesQWarning)}
    assert set(r["left_in_float"]) <= said, (said, r["left_in_float"])  # every float tensor named
    assert r["verdict"]["verdict"] in ("holds", "degraded"), r["verdict"]["line"]
    if name == "video3d":
        assert r["verdict"]["verdict"] == "holds", r["verdict"]["line"]
