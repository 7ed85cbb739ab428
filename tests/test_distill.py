"""Calibration-only distillation (bayesq_onnx/distill/): the student is the artifact, the budget does not
move, the loss goes down, the teacher samples the posterior, and it is all deterministic."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from bayesq_onnx.config import CompileConfig
from bayesq_onnx.distill import DistillOptions, PosteriorNoise, Student, distill
from bayesq_onnx.errors import UserError
from bayesq_onnx.export import export_model, map_parameters
from bayesq_onnx.models.base import ModelBundle
from bayesq_onnx.weights import WeightPosterior
from bayesq_onnx.pipeline import compile_model
from helpers import run
from tiny_torch import logits_fidelity, tiny_bundle


class TinyClassifier(nn.Module):
    """Linear → LayerNorm → GELU → residual Linear → Linear head (every weight ≥ 1024 values: quantized)."""

    def __init__(self, dim: int = 32, hidden: int = 64, classes: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.norm(self.fc1(x)))
        return self.head(h + torch.relu(self.fc2(h)))


def classifier_bundle(seed: int = 0) -> ModelBundle:
    torch.manual_seed(seed)
    module = TinyClassifier().eval()
    with torch.no_grad():  # a LayerNorm that is not the identity, so its parameters matter
        module.norm.weight.uniform_(0.5, 1.5)
        module.norm.bias.normal_(0, 0.1)
    rng = np.random.default_rng(seed)
    batch = lambda: {"x": rng.normal(size=(16, 32)).astype(np.float32)}  # noqa: E731
    return ModelBundle(
        name="tiny-classifier", module=module, input_names=["x"], output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}}, calibration=[batch() for _ in range(6)],
        evaluation=[batch() for _ in range(2)], latency_feed=batch(), metric=logits_fidelity,
        headline="top1_agreement", info={"source": "tests"}, likelihood="categorical")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


BUNDLES = {"tiny-lm": tiny_bundle, "tiny-classifier": classifier_bundle}
SETTINGS = {"tiny-lm": dict(method="bayesq", bits=3.0),
            "tiny-classifier": dict(method="bayesq-fixed", family="codebook", bits=2)}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Each tiny model compiled with and without distillation: {(model, distill): CompileResult}."""
    out = {}
    for model, make in BUNDLES.items():
        for on in (False, True):
            config = CompileConfig(model=model, out=tmp_path_factory.mktemp(model) / "out", latency_runs=1,
                                   memory_loads=1,
                                   latency_warmup=0, distill=on, distill_steps=60, **SETTINGS[model])
            out[model, on] = compile_model(config, bundle=make())
    return out


def _artifact_student(bundle: ModelBundle, result) -> Student:
    """A student built only from what the artifact holds: the result's plan, and the float initializers of
    the written file copied into the PyTorch parameters they are bound to."""
    module = copy.deepcopy(bundle.module)
    bindings = map_parameters(module, export_model(bundle))
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(result.artifact).graph.initializer
              if t.data_type == onnx.TensorProto.FLOAT}
    params = dict(module.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, b in bindings.items():
            if name in stored and name not in result.plan.tensors:
                value = torch.from_numpy(stored[name].copy())
                params[b.parameter].copy_(value.T if b.transposed else value)
    return Student(module, result.plan, bindings)


@pytest.mark.parametrize("distilled", [False, True], ids=["before", "after"])
@pytest.mark.parametrize("model", list(BUNDLES))
def test_student_is_the_artifact(compiled, model, distilled):
    bundle = BUNDLES[model]()
    result = compiled[model, distilled]
    student = _artifact_student(bundle, result)
    with torch.no_grad():
        for batch in bundle.evaluation + bundle.calibration[:1]:
            mine = student(*(torch.from_numpy(batch[n]) for n in bundle.input_names)).numpy()
            np.testing.assert_allclose(mine, run(result.artifact.read_bytes(), batch), atol=2e-5, rtol=1e-5)
    if distilled:
        d = result.report["distill"]
        assert d["student_vs_artifact_max_abs_diff"] < 2e-5
        assert d["fidelity_before"] == compiled[model, False].report["fidelity"]  # "before" is the undistilled artifact
        assert d["after"] == result.report["fidelity"][d["headline"]]


@pytest.mark.parametrize("model", list(BUNDLES))
def test_budget_unchanged_and_values_changed(compiled, model):
    before, after = compiled[model, False], compiled[model, True]
    assert after.report["bits"] == before.report["bits"]
    for key in ("quantized_tensor_bytes", "float_tensor_bytes", "all_in_bits_file", "missing_arrays"):
        assert after.report["sizes"][key] == before.report["sizes"][key]
    changed = False
    for name, qb in before.plan.tensors.items():
        qa = after.plan.tensors[name]
        assert qa.candidate == qb.candidate and qa.stored_bits() == qb.stored_bits()
        np.testing.assert_array_equal(qa.codes, qb.codes)  # codes (and zero points) never train
        if qb.zero is not None:
            np.testing.assert_array_equal(qa.zero, qb.zero)
        for role, arr in qb.stored().items():
            assert qa.stored()[role].dtype == arr.dtype and qa.stored()[role].shape == arr.shape
        changed |= any(not np.array_equal(a, b) for a, b in zip(qa.stored().values(), qb.stored().values()))
    assert changed, "distillation moved no stored scale or level"
    # FP16 storage: trained scales / levels are exactly what float16 holds
    for qa in after.plan.tensors.values():
        for arr in (qa.scale, qa.levels):
            if arr is not None and qa.candidate.scale_dtype == "float16":
                np.testing.assert_array_equal(arr.astype(np.float16).astype(arr.dtype), arr)


def _classifier_plan():
    bundle = classifier_bundle()
    from bayesq_onnx.passes.collect_weights import CollectWeightsPass
    from bayesq_onnx.analysis.fit_posterior import FitLaplacePosterior
    from bayesq_onnx.bayes.laplace import LaplaceOptions
    from bayesq_onnx.planning.bayesq_fixed import PlanBayesQFixed
    from bayesq_onnx.plan import Candidate

    model = export_model(bundle)
    bindings = map_parameters(bundle.module, model)
    collect = CollectWeightsPass()
    collect(model)
    posteriors = FitLaplacePosterior(bundle, LaplaceOptions(curvature="kfac", n_data=1e3))(collect.weights)
    plan = PlanBayesQFixed(Candidate("uniform", 2), posteriors, curvature="kfac")(collect.weights)
    return bundle, bindings, posteriors, plan


def test_loss_goes_down_and_is_deterministic():
    bundle, bindings, posteriors, plan = _classifier_plan()
    options = DistillOptions(steps=80, lr=1e-2, seed=3, guard=False)
    kw = dict(likelihood="categorical", posteriors=posteriors, options=options)
    a = distill(bundle.module, plan, bindings, bundle.calibration, bundle.input_names, **kw)
    s = a.stats
    assert s["sampled_weights"] == 3 and s["teacher_samples"] == 4
    assert s["heldout_loss_after"] < 0.85 * s["heldout_loss_before"]
    assert s["train_loss_last"] < s["train_loss_first"]
    assert s["trainable_tensors"] == {"scales": 3, "levels": 0, "floats": 5}  # 3 biases + LayerNorm weight, bias
    b = distill(bundle.module, plan, bindings, bundle.calibration, bundle.input_names, **kw)
    assert a.stats["heldout_loss_after"] == b.stats["heldout_loss_after"]
    for name in plan.tensors:
        np.testing.assert_array_equal(a.plan.tensors[name].scale, b.plan.tensors[name].scale)
    assert a.initializers.keys() == b.initializers.keys()
    for name, v in a.initializers.items():
        np.testing.assert_array_equal(v, b.initializers[name])
    c = distill(bundle.module, plan, bindings, bundle.calibration, bundle.input_names, **{**kw, "options": replace(options, seed=4)})
    assert c.stats["heldout_loss_after"] != a.stats["heldout_loss_after"]


def test_too_wide_posterior_falls_back_to_the_fp_teacher():
    """N = 10³ on a random classifier: posterior samples disagree with the FP32 model more than the 2-bit
    plan does, so the guard distills toward the FP32 model, and says so."""
    bundle, bindings, posteriors, plan = _classifier_plan()
    r = distill(bundle.module, plan, bindings, bundle.calibration, bundle.input_names, likelihood="categorical",
                posteriors=posteriors, options=DistillOptions(steps=6, seed=3))
    s = r.stats
    assert s["teacher_vs_fp"]["agreement"] < s["undistilled_vs_fp"]["agreement"]
    assert s["teacher"] == "fp" and s["teacher_samples"] == 1 and "too wide" in s["teacher_fallback"]


def test_fp_teacher_and_no_steps_keep_the_plan():
    """With the FP32 teacher the targets are the module's own outputs; the held-out-best state includes
    the start, so a step size too small to move any FP16 value returns the plan bit for bit."""
    bundle, bindings, _, plan = _classifier_plan()
    r = distill(bundle.module, plan, bindings, bundle.calibration, bundle.input_names,
                likelihood="categorical", options=DistillOptions(teacher="fp", steps=3, lr=1e-9))
    assert r.stats["teacher"] == "fp" and r.stats["sampled_weights"] == 0
    for name, qt in plan.tensors.items():
        np.testing.assert_array_equal(r.plan.tensors[name].scale, qt.scale)


def _empirical_cov(noise: PosteriorNoise, n: int = 200_000) -> np.ndarray:
    x = noise(torch.Generator().manual_seed(0), n).reshape(n, -1).double()
    return (x.T @ x / n).numpy()


def test_teacher_samples_have_the_posterior_covariance():
    rng = np.random.default_rng(0)
    rows, cols, n, tau = 2, 3, 10.0, 0.5
    b = rng.normal(size=(cols, cols))
    A = torch.tensor(b @ b.T / cols + 0.1 * np.eye(cols), dtype=torch.float32)
    g = torch.tensor([1.0, 3.0])
    # K-FAC, diagonal output factor: Λ = N·(diag(g) ⊗ A) + τ·I (canonical rows outer)
    lam = n * np.kron(np.diag(g.numpy()), A.numpy()) + tau * np.eye(rows * cols)
    post = WeightPosterior("w", "w", torch.ones(rows, cols), tau, n, A=A, G_diag=g)
    sigma = np.linalg.inv(lam)
    np.testing.assert_allclose(_empirical_cov(PosteriorNoise(post)), sigma, atol=0.02 * np.abs(sigma).max())
    # diagonal
    prec = torch.tensor(rng.uniform(0.5, 4.0, (rows, cols)), dtype=torch.float32)
    post = WeightPosterior("w", "w", prec, tau, n)
    sigma = np.diag(1 / prec.numpy().reshape(-1))
    np.testing.assert_allclose(_empirical_cov(PosteriorNoise(post)), sigma, atol=0.02 * sigma.max())
    # diagonal + low rank: precision holds diag(D + UUᵀ)
    d = rng.uniform(1.0, 3.0, rows * cols)
    u = rng.normal(size=(rows * cols, 2))
    prec = torch.tensor((d + (u * u).sum(1)).reshape(rows, cols), dtype=torch.float32)
    post = WeightPosterior("w", "w", prec, tau, n, U=torch.tensor(u, dtype=torch.float32))
    sigma = np.linalg.inv(np.diag(d) + u @ u.T)
    np.testing.assert_allclose(_empirical_cov(PosteriorNoise(post)), sigma, atol=0.02 * np.abs(sigma).max())


def test_onnx_input_refuses_distill(tmp_path):
    bundle = classifier_bundle()
    bundle.module, bundle.onnx_file = None, tmp_path / "model.onnx"
    config = CompileConfig(model="onnx", out=tmp_path / "out", method="bayesq", distill=True)
    with pytest.raises(UserError, match="`distill`"):
        compile_model(config, bundle=bundle)


def test_settings_are_checked():
    from click.testing import CliRunner

    from bayesq_onnx.cli import main

    for bad in ({"distill_steps": 0}, {"teacher_samples": 0}, {"distill_lr": 0.0}, {"teacher": "gp"}):
        with pytest.raises(UserError):
            CompileConfig(**bad).validate()
    r = CliRunner().invoke(main, ["compile", "--distill", "--teacher", "gp"])
    assert r.exit_code == 2 and "gp" in r.output
