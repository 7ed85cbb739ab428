"""Models whose ``forward`` returns a dict, a tuple, nested containers or a HuggingFace ``ModelOutput``
compile, with the first tensor (or the one ``output`` names) as the compiled output; calibration outputs are
streamed, not kept; distillation handles tied weights (issue 29)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from written_models import dict_output

import bayesq_onnx
from bayesq_onnx import CompileConfig
from bayesq_onnx.errors import UserError
from bayesq_onnx.models.base import select_output

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::bayesq_onnx.errors.BayesQWarning")]


def _config(tmp_path, name="out", **kw):
    kw.setdefault("bits", 4.0)
    return CompileConfig(out=tmp_path / name, latency_runs=1, memory_loads=1, latency_warmup=0, **kw)


def _artifact_outputs(path, batches) -> tuple[list[str], np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return names, np.concatenate([session.run(None, {"x": b.numpy()})[0] for b in batches])


def _cosine_mean(ref: np.ndarray, got: np.ndarray) -> float:
    a, b = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
    return float((np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


def _check_headline(result, model, evaluation, pick) -> np.ndarray:
    """The artifact has one output; it follows ``pick(model(x))``, and the report's validated cosine is the
    cosine of the artifact's outputs to that tensor on the evaluation batches, computed here from ORT."""
    names, got = _artifact_outputs(result.artifact, evaluation)
    assert len(names) == 1
    with torch.no_grad():
        ref = np.concatenate([pick(model(b)).numpy() for b in evaluation])
    assert got.shape == ref.shape
    assert result.report["headline"]["metric"] == "cosine_mean"
    assert result.report["fidelity"]["cosine_mean"] == pytest.approx(_cosine_mean(ref, got), abs=1e-5)
    assert result.report["fidelity"]["cosine_mean"] > 0.9
    return got


# ---- output structures ------------------------------------------------------------------------------------

def test_dict_output_compiles_with_the_first_tensor_as_the_headline(tmp_path):
    model, calibration, evaluation, likelihood = dict_output()
    result = bayesq_onnx.compile(model, calibration, evaluation=evaluation, likelihood=likelihood,
                                 config=_config(tmp_path))
    got = _check_headline(result, model, evaluation, lambda out: out["logits"])
    assert got.shape[1] == model.head.out_features
    # the plan speaks the module's own parameter names (the output wrapper adds no prefix)
    names = {t["name"] for t in result.report["plan"]["tensors"]}
    assert names and names <= {n for n, _ in model.named_parameters()} | {f"{n}.T" for n, _ in model.named_parameters()}


def test_dict_output_named_output(tmp_path):
    model, calibration, evaluation, likelihood = dict_output()
    result = bayesq_onnx.compile(model, calibration, evaluation=evaluation, output="features",
                                 config=_config(tmp_path, method="rtn"))
    got = _check_headline(result, model, evaluation, lambda out: out["features"])
    assert got.shape[1] == model.conv2.out_channels
    names, _ = _artifact_outputs(result.artifact, evaluation[:1])
    assert names == ["features"]
    # output_names names the graph output, and also picks the mapping's entry of that name
    result = bayesq_onnx.compile(model, calibration, evaluation=evaluation, output_names=["features"],
                                 config=_config(tmp_path, "out2", method="rtn"))
    _check_headline(result, model, evaluation, lambda out: out["features"])


class TupleNested(nn.Module):
    """``(None, {"aux": [hidden], "logits": logits})``: the first tensor is ``hidden``, nested two deep."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(32, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return None, {"aux": [h], "logits": self.head(h)}


def _vectors(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 32, generator=g) for _ in range(n)]


def test_tuple_and_nested_outputs(tmp_path):
    torch.manual_seed(0)
    model, data = TupleNested().eval(), _vectors(1)
    result = bayesq_onnx.compile(model, data[:3], evaluation=data[3:], config=_config(tmp_path, method="rtn"))
    _check_headline(result, model, data[3:], lambda out: out[1]["aux"][0])            # first tensor: hidden
    result = bayesq_onnx.compile(model, data[:3], evaluation=data[3:], output="1.logits",
                                 config=_config(tmp_path, "out2", method="rtn"))
    _check_headline(result, model, data[3:], lambda out: out[1]["logits"])
    assert _artifact_outputs(result.artifact, data[3:])[0] == ["logits"]


class HFStyle(nn.Module):
    """Returns a ``transformers`` ``SequenceClassifierOutput`` (loss ``None``, logits, hidden states)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(32, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        from transformers.modeling_outputs import SequenceClassifierOutput

        h = torch.tanh(self.body(x))
        return SequenceClassifierOutput(logits=self.head(h), hidden_states=(x, h))


def test_huggingface_model_output(tmp_path):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, data = HFStyle().eval(), _vectors(2)
    result = bayesq_onnx.compile(model, data[:3], evaluation=data[3:], likelihood="categorical",
                                 config=_config(tmp_path, method="rtn"))
    _check_headline(result, model, data[3:], lambda out: out.logits)   # the loss is None: logits come first
    result = bayesq_onnx.compile(model, data[:3], evaluation=data[3:], output="hidden_states.1",
                                 config=_config(tmp_path, "out2", method="rtn"))
    _check_headline(result, model, data[3:], lambda out: out.hidden_states[1])


def test_select_output_rules():
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert select_output({"x": None, "y": [a, b]}) is a
    assert select_output({"x": a, "y": b}, "y") is b and select_output({"x": a, "y": b}, 1) is b
    assert select_output((a, (b, c)), "1.1") is c and select_output((a, (b, c)), 1) is b
    assert select_output({"x": a, "y": b}, prefer="y") is b and select_output({"x": a}, prefer="z") is a
    for out, key, needle in [({"x": a}, "z", "no entry 'z'"), ((a, b), 5, "out of range"),
                             ((a, b), "name", "not a position"), ({"x": 3}, None, "returns no tensor")]:
        with pytest.raises(UserError, match=needle) as info:
            select_output(out, key)
        assert "\n" not in str(info.value)


def test_bad_output_name_is_one_line(tmp_path):
    model, calibration, evaluation, likelihood = dict_output()
    with pytest.raises(UserError) as info:
        bayesq_onnx.compile(model, calibration, evaluation=evaluation, output="logitz",
                            config=_config(tmp_path, method="rtn"))
    message = str(info.value)
    assert "\n" not in message and "'logitz'" in message and "logits" in message and "features" in message


def dict_model():
    """``module:test_outputs_streaming:dict_model[:<output>]`` on the command line."""
    return dict_output()[0]


def test_cli_module_spec_picks_an_output(tmp_path):
    from bayesq_onnx.cli import main

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(48, 3, 16, 16)).astype(np.float32))
    common = ["--calib", str(tmp_path / "calib.npz"), "--method", "rtn", "--bits", "8", "--latency-runs", "1",
              "--memory-loads", "1", "-q"]
    runner = CliRunner()
    r = runner.invoke(main, ["compile", "module:test_outputs_streaming:dict_model:features", "--out",
                             str(tmp_path / "out"), *common], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["features"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["fidelity"]["cosine_mean"] > 0.99
    r = runner.invoke(main, ["compile", "module:test_outputs_streaming:dict_model:logitz", "--out",
                             str(tmp_path / "bad"), *common], catch_exceptions=False)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'logitz'" in lines[0], r.stderr
    assert not (tmp_path / "bad").exists()


# ---- calibration outputs streamed ---------------------------------------------------------------------------

def test_output_moments_match_output_variance():
    """The streamed σ² is output_variance's, on equal item shapes and on rows once the shapes differ."""
    from bayesq_onnx.bayes.empirical_bayes import output_variance
    from bayesq_onnx.bayes.empirical_bayes import OutputMoments

    g = torch.Generator().manual_seed(0)
    for shapes in ([(8, 5, 7)] * 4, [(8, 5, 7), (8, 9, 7), (3, 2, 7)], [(1, 3)] * 10, [(16, 384)] * 5):
        outs = [torch.randn(*s, generator=g) * 3 + 5 for s in shapes]
        moments = OutputMoments()
        for o in outs:
            moments.append(o)
        assert moments.variance() == pytest.approx(output_variance(outs), rel=1e-6)
    skipped = OutputMoments(needed=False)
    skipped.append(torch.ones(2, 3))
    assert skipped.item is None and skipped.row is None


_PEAK_SCRIPT = r'''
import gc, json, sys
import torch
torch.set_num_threads(1)
from written_models import TiedLM
from bayesq_onnx.bayes.laplace import CalibrationData, LaplaceOptions, fit_laplace
from bayesq_onnx.export import traced_program
from bayesq_onnx.models.python_module import module_bundle

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

vocab, items, tokens, batch, likelihood = 8192, 512, 16, 8, sys.argv[1]
torch.manual_seed(0)
model = TiedLM(vocab=vocab, d=64, context=tokens, layers=1)
g = torch.Generator().manual_seed(0)
batches = [torch.randint(0, vocab, (batch, tokens), generator=g) for _ in range(items // batch)]
bundle = module_bundle(model, batches, evaluation=batches[:1], likelihood=likelihood)
program = traced_program(bundle)
data = CalibrationData([{"ids": torch.from_numpy(b["ids"])} for b in bundle.calibration], ["ids"], likelihood)
options = LaplaceOptions(curvature="diag")
fit_laplace(program, CalibrationData(data.batches[:1], ["ids"], likelihood), options)  # first-call allocations
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak resident size (VmHWM) to the current one
before = status("VmRSS")
fit_laplace(program, data, options)
print(json.dumps({"peak_growth": status("VmHWM") - before, "outputs": items * tokens * vocab * 4,
                  "batch_outputs": batch * tokens * vocab * 4}))
'''


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_calibration_outputs_are_streamed(likelihood, tmp_path):
    """The Laplace fit (the calibration stage) on an LM with a 8192-word vocabulary and 512 calibration items
    of 16 tokens: its logits over the calibration set are 256 MiB, one batch's 4 MiB. Keeping every output
    (as the fit did for a Gaussian output's σ², and needlessly for a categorical one) grows the process by at
    least the 256 MiB; streamed, the growth is a few batches' worth whatever the calibration size. Measured
    as the peak resident size in a fresh process (torch's allocations are invisible to tracemalloc)."""
    import subprocess
    import sys
    from pathlib import Path

    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident size")
    tests = Path(__file__).parent
    script = tmp_path / "peak.py"
    script.write_text(_PEAK_SCRIPT)
    env = {**__import__("os").environ, "PYTHONPATH": f"{tests}{__import__('os').pathsep}{tests.parent}"}
    done = subprocess.run([sys.executable, str(script), likelihood], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    # bound from the sizes: less than the outputs over the calibration set (the old code's floor)
    assert figures["peak_growth"] < figures["outputs"], figures


# ---- distillation of tied weights -----------------------------------------------------------------------------

def _tied_case(name: str):
    """(model, calibration, evaluation, likelihood, input names) of a tied-embedding LM."""
    if name == "tied_lm":
        from written_models import tied_lm

        return (*tied_lm(), ["ids"])
    pytest.importorskip("transformers")
    from test_zoo import gpt2, token_batches

    torch.manual_seed(0)
    return gpt2(), token_batches(16, 0), token_batches(8, 1), "categorical", ["input_ids", "attention_mask"]


@pytest.mark.parametrize("name,scope", [("tied_lm", "all"), ("gpt2", "all"), ("gpt2", "linear")])
def test_distill_handles_tied_weights(name, scope, tmp_path):
    """`distill` on LMs whose output projection is the token embedding: tied_lm's graph holds the table once
    (a Gather and a Transpose→MatMul read it: one quantized tensor, both uses decode it alike); GPT-2's holds
    it twice (the exporter folds the MatMul's transpose into a copy), each copy planned on its own (scope
    all) or only the MatMul's (scope linear: the Gather's copy stays float). The student reproduces the
    artifact: its output on the first calibration batch differs from ORT's by float round-off only (a
    student that fed either use the other copy's decode is off by ~1 on these logits)."""
    model, calibration, evaluation, likelihood, inputs = _tied_case(name)
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)
            if any(p is q for m, q in model.named_parameters(remove_duplicate=False) if m != n)}
    assert tied, "the model must tie a tensor"
    result = bayesq_onnx.compile(model, calibration, evaluation=evaluation, likelihood=likelihood,
                                 config=_config(tmp_path, scope=scope, distill=True, distill_steps=20))
    report = result.report
    d = report["distill"]
    assert "skipped" not in d, d
    planned = {t["name"] for t in report["plan"]["tensors"]}
    assert planned & tied, (planned, tied)  # a tied tensor is quantized, so the student decodes it
    assert d["steps"] >= 1 and d["trainable"]["scales"] + d["trainable"]["levels"] > 0
    session = ort.InferenceSession(str(result.artifact), providers=["CPUExecutionProvider"])
    first = calibration[0] if isinstance(calibration[0], tuple) else (calibration[0],)
    feed = {n: x.numpy() for n, x in zip(inputs, first)}
    scale = float(np.abs(session.run(None, feed)[0]).max())
    assert d["student_vs_artifact_max_abs_diff"] < 1e-4 * scale
