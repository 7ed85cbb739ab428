"""Block reconstruction (planning/reconstruct.py, quant/adaround.py): the rounding variables' math, the
alternative codes, blocks cut from a traced residual CNN that run in a chain to the program's own output, and
on a trained CNN: only codes move (one grid point, toward FP32), no block worse on its held-out items, the
budget unchanged, the same bytes twice."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from bayesq_onnx.plan import Candidate, QuantizedTensor
from bayesq_onnx.planning.reconstruct import alternative_codes
from bayesq_onnx.traced_blocks import Program
from bayesq_onnx.quant import adaround
from bayesq_onnx.quant.layout import WeightLayout


def test_rectified_sigmoid_reaches_both_ends_and_starts_on_the_given_codes():
    v = torch.linspace(-10, 10, 101)
    h = adaround.rectified_sigmoid(v)
    assert float(h.min()) == 0.0 and float(h.max()) == 1.0
    moved = torch.tensor([True, False, True, False])
    start = adaround.start_logits(moved)
    hs = adaround.rectified_sigmoid(start)
    assert torch.equal(adaround.hardened(start), moved)
    assert float((hs - moved.float()).abs().max()) < 1e-4 and float(hs.min()) > 0 and float(hs.max()) < 1
    start.requires_grad_()
    adaround.rectified_sigmoid(start).sum().backward()
    assert bool((start.grad > 0).all())  # just inside the clamp: a gradient reaches every variable


def test_regularizer_and_its_schedule():
    h = torch.tensor([0.0, 1.0, 0.5])
    assert float(adaround.rounding_regularizer(h[:2], 2.0)) == 0.0
    assert float(adaround.rounding_regularizer(h[2:], 20.0)) == 1.0
    assert adaround.annealed_beta(0, 100) is None and adaround.annealed_beta(19, 100) is None
    assert adaround.annealed_beta(20, 100) == adaround.BETA_START
    assert adaround.annealed_beta(99, 100) == pytest.approx(adaround.BETA_END)


def _uniform_tensor(seed: int, bits: int = 3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 16, generator=g)
    layout = WeightLayout((6, 16), (0, 1))
    scale = (w.abs().amax(1, keepdim=True) / 3).float()
    zero = torch.full_like(scale, 4.0)
    codes = (torch.round(w / scale) + zero).clamp(0, 2**bits - 1).to(torch.int16)
    qt = QuantizedTensor("w", layout, Candidate("uniform", bits, 0, scale_dtype="float32"), codes=codes.numpy(),
                         scale=scale.numpy(), zero=zero.numpy())
    return w, qt


def test_alternative_uniform_code_is_one_step_toward_the_weight():
    w, qt = _uniform_tensor(0)
    alt = alternative_codes(qt, w)
    step = alt.astype(int) - qt.codes.astype(int)
    planned = torch.from_numpy(qt.dequantize())
    assert set(np.unique(step)) <= {-1, 0, 1}
    toward = np.sign((w - planned).numpy()).astype(int)
    inside = (qt.codes + toward >= 0) & (qt.codes + toward <= 7)
    assert np.array_equal(step[inside], toward[inside]) and np.all(step[~inside] == 0)


def test_alternative_codebook_code_is_the_neighbouring_level_toward_the_weight():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 32, generator=g)
    levels = torch.randn(2, 8, generator=g).to(torch.float16)  # unsorted tables, two rows per table
    layout = WeightLayout((4, 32), (0, 1))
    from bayesq_onnx.quant import codebook
    codes = codebook.nearest_codes(w, levels, 2)
    qt = QuantizedTensor("w", layout, Candidate("codebook", 3, 2), codes=codes.numpy(), levels=levels.numpy())
    alt = alternative_codes(qt, w)
    planned = torch.from_numpy(qt.dequantize())
    other = torch.from_numpy(dataclasses.replace(qt, codes=alt).dequantize())
    tables = levels.float()[torch.arange(4) // 2]
    for r in range(4):
        for c in range(32):
            p, o, x = float(planned[r, c]), float(other[r, c]), float(w[r, c])
            if o == p:  # no level beyond the planned one on the weight's side (or the weight is on it)
                assert x == p or not bool(((tables[r] - p) * (x - p) > 0).any())
                continue
            assert (o - p) * (x - p) > 0  # on the weight's side
            between = (tables[r] - p) * (tables[r] - o) < 0
            assert not bool(between.any())  # the neighbouring level: none strictly between


class ResidualCNN(nn.Module):
    """Stem, two residual blocks (the second with a depthwise conv), a stride-2 plain chain, a head."""

    def __init__(self):
        super().__init__()
        # every weight ≥ 1024 values, so the compile quantizes all of them (CollectWeightsPass's min_size)
        self.stem = nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU())
        self.res1 = nn.Sequential(nn.Conv2d(48, 48, 3, padding=1), nn.ReLU(), nn.Conv2d(48, 48, 1))
        self.res2 = nn.Sequential(nn.Conv2d(48, 128, 1), nn.ReLU6(), nn.Conv2d(128, 128, 3, padding=1, groups=128),
                                  nn.ReLU6(), nn.Conv2d(128, 48, 1))
        self.down = nn.Sequential(nn.Conv2d(48, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 1), nn.ReLU())
        self.head = nn.Linear(64, 16)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.res1(x)
        x = x + self.res2(x)
        x = self.down(x)
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def cnn_case():
    """A briefly trained residual CNN, compiled at 3 bits without reconstruction: its program, bindings,
    calibration, weights and plan."""
    from bayesq_onnx.config import CompileConfig
    from bayesq_onnx.models.python_module import module_bundle
    from bayesq_onnx.pipeline import compile_model
    from written_models import fit_briefly

    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 12, 12, generator=g) for _ in range(16)]
    model = fit_briefly(ResidualCNN(), batches, lambda x: (x[:, 0].mean((1, 2)) * 12 + 8).long().clamp(0, 15), steps=60)
    bundle = module_bundle(model, batches, likelihood="categorical", name="residual-cnn")

    def compile_(tmp, **kw):
        config = CompileConfig(model="residual-cnn", out=tmp, method="bayesq", bits=3.0, latency_runs=2, memory_loads=1,
                               latency_warmup=1, **kw)
        return compile_model(config, bundle=dataclasses.replace(bundle, info=dict(bundle.info)))

    return bundle, compile_


def test_blocks_cut_at_residual_joins_and_chain_to_the_output(cnn_case):
    from bayesq_onnx.export import fp32_model

    bundle, _ = cnn_case
    b = dataclasses.replace(bundle, info=dict(bundle.info))
    fp32_model(b)
    program = Program(b.module)
    weight_of = {t: t for t in program.parameter_targets() if t.endswith("weight") and "head" not in t} | {"head.weight": "head.weight"}
    blocks = program.blocks(weight_of, min_ops=3)
    covered = [w for blk in blocks for w in blk.weights]
    assert sorted(covered) == sorted(set(covered)) == sorted(weight_of)
    assert all(len(blk.weights) >= 3 for blk in blocks[:-1])
    # the residual joins are cuts: res1's convs and res2's convs are not split across blocks
    for group in (["res1.0.weight", "res1.2.weight"], ["res2.0.weight", "res2.2.weight", "res2.4.weight"]):
        assert len({i for i, blk in enumerate(blocks) for w in blk.weights if w in group}) == 1
    x = [torch.from_numpy(next(iter(bundle.calibration[0].values())))]
    env = program.inputs_env(x)
    for blk in blocks:
        out = program.run(blk, env, {})
        env = {n: out[n] if n in out else env[n] for n in blk.live_out}
    with torch.no_grad():
        want = b.module(*x)
    got = program.final_output(env)
    assert torch.allclose(got, want, atol=1e-5)


def test_reconstruction_moves_codes_only_never_worse_held_out_and_keeps_the_budget(cnn_case, tmp_path):
    _, compile_ = cnn_case
    base = compile_(tmp_path / "base")
    a = compile_(tmp_path / "a", reconstruct=True, reconstruct_steps=40)
    b = compile_(tmp_path / "b", reconstruct=True, reconstruct_steps=40)
    assert a.artifact.read_bytes() == b.artifact.read_bytes()
    assert a.report["bits"]["all_in"] == base.report["bits"]["all_in"]
    assert a.report["sizes"]["artifact_bytes"] == base.report["sizes"]["artifact_bytes"]
    r = a.report["plan"]["settings"]["reconstruction"]
    assert r["blocks"] >= 2 and r["weights_reconstructed"] == len(a.plan.tensors)
    for blk in r["per_block"]:
        assert blk["heldout_error_after"] <= blk["heldout_error_before"]
    assert sum(blk["heldout_error_after"] for blk in r["per_block"]) < sum(blk["heldout_error_before"] for blk in r["per_block"])
    moved = 0
    for name, qt in a.plan.tensors.items():
        planned = base.plan.tensors[name]
        assert qt.candidate == planned.candidate
        if qt.candidate.family == "uniform":
            assert np.array_equal(qt.scale, planned.scale) and np.array_equal(qt.zero, planned.zero)
            assert np.abs(qt.codes.astype(int) - planned.codes.astype(int)).max() <= 1
        elif qt.candidate.family == "codebook":
            assert np.array_equal(qt.levels, planned.levels)
        moved += int((qt.codes != planned.codes).sum())
    assert moved == sum(blk["codes_moved"] for blk in r["per_block"]) > 0


def test_reconstruction_is_refused_where_it_cannot_run():
    from bayesq_onnx.config import CompileConfig
    from bayesq_onnx.errors import UserError

    with pytest.raises(UserError, match="reconstruct"):
        CompileConfig(method="rtn", bits=4, reconstruct=True).validate()
    with pytest.raises(UserError, match="reconstruct_steps"):
        CompileConfig(reconstruct=True, reconstruct_steps=0).validate()


def test_fisher_weights_are_the_items_mean_of_squared_output_gradients(cnn_case):
    """``fisher``: E[g²] over the items at each position (one value for every item), mean 1 per value;
    ``fisher-items``: each item's own g², mean 1 too."""
    from bayesq_onnx.export import fp32_model

    bundle, _ = cnn_case
    b = dataclasses.replace(bundle, info=dict(bundle.info))
    fp32_model(b)
    program = Program(b.module)
    weight_of = {t: t for t in program.parameter_targets() if t.endswith("weight")}
    outputs = {o for blk in program.blocks(weight_of, 3) for o in blk.outputs}
    batches = [[torch.from_numpy(next(iter(c.values())))] for c in bundle.calibration[:3]]
    pooled = program.fisher(outputs, batches, "categorical", seed=0)
    items = program.fisher(outputs, batches, "categorical", seed=0, pooled=False)
    for o in outputs:
        assert len(pooled[o]) == len(items[o]) == 3
        every = torch.cat(items[o])
        assert float(every.min()) >= 0 and abs(float(every.mean()) - 1) < 1e-4
        assert torch.allclose(pooled[o][0][0], pooled[o][2][-1])  # one weight per position, whatever the item
        assert abs(float(torch.cat(pooled[o]).mean()) - 1) < 1e-4
        # the pooled weight is the items' mean of the per-item weights (both normalized to mean 1)
        assert torch.allclose(pooled[o][0][0], every.mean(0), rtol=1e-4, atol=1e-6)
