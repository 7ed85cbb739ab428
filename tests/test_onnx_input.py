"""``onnx:<file>`` inputs: conv patch geometry, the layer-wise posterior from ORT activations, the end-to-end
compile, and bad .npz / model files."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import run
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper

from bayesq_onnx.analysis.fit_layer_posterior import FitLayerPosterior
from bayesq_onnx.bayes.layerwise import InputMoments, conv_patches, layerwise_posterior
from bayesq_onnx.cli import main
from bayesq_onnx.passes.collect_weights import CollectWeightsPass
from bayesq_onnx.quant.layout import WeightLayout


@given(groups=st.sampled_from([1, 2, 4]), nd=st.sampled_from([1, 2]), k=st.integers(1, 3), stride=st.integers(1, 2),
       dilation=st.integers(1, 2), pad=st.tuples(st.integers(0, 2), st.integers(0, 2)), seed=st.integers(0, 99))
def test_conv_patches_times_canonical_weight_is_the_convolution(groups, nd, k, stride, dilation, pad, seed):
    g = torch.Generator().manual_seed(seed)
    c, o = 8, 4 * groups
    x = torch.randn(2, c, *((7, 6) if nd == 2 else (9,)), generator=g)
    kernel = (k,) * nd
    w = torch.randn(o, c // groups, *kernel, generator=g)
    pads = (pad[0],) * nd + (pad[1],) * nd
    padded = F.pad(x, (pad[0], pad[1]) * nd)  # begins/ends alike per axis here
    conv = F.conv2d if nd == 2 else F.conv1d
    ref = conv(padded, w, stride=stride, dilation=dilation, groups=groups)
    patches = conv_patches(x, kernel, strides=(stride,) * nd, pads=pads, dilations=(dilation,) * nd, groups=groups)
    wc = WeightLayout.for_consumer("Conv", tuple(w.shape)).to_canonical(w).reshape(groups, o // groups, -1)
    got = torch.einsum("tgc,goc->tgo", patches, wc).reshape(patches.shape[0], o)
    want = ref.movedim(1, -1).reshape(-1, o)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_layerwise_posterior_is_gaussian_regression_fisher():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g) + 0.5
    w = torch.randn(3, 6, generator=g)
    m = InputMoments(6)
    m.update(x[:200])
    m.update(x[200:])
    post = layerwise_posterior(w, m, n_data=1000.0, prior_precision=2.0)
    A = (x.double().T @ x.double()) / 500
    torch.testing.assert_close(post.A.double(), A, rtol=1e-5, atol=1e-6)
    sigma2 = float((x.double() @ w.double().T).var(dim=0, unbiased=False).mean())
    assert post.output_noise_var == pytest.approx(sigma2, rel=1e-6)
    want = 1000.0 * torch.diagonal(A)[None, :].expand(3, 6) / sigma2 + 2.0
    torch.testing.assert_close(post.precision.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(post.G_diag.double(), torch.full((3,), 1 / sigma2, dtype=torch.float64), rtol=1e-5, atol=0)


def _conv_matmul_model(groups: int = 1) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 8 // groups, 3, 3)).astype(np.float32)
    b = rng.normal(size=(16, 8)).astype(np.float32)  # MatMul weight, canonical [16 rows, 8 inputs]
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 0, 1, 2], strides=[2, 1], group=groups),
             helper.make_node("Transpose", ["y"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["t", "b"], ["out"])]
    graph = helper.make_graph(
        nodes, "conv_matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 6, 5])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b.T.copy(), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("groups", [1, 2])
def test_posterior_from_ort_activations_matches_the_layer_outputs(groups):
    """Σ_tokens y_r² from ORT equals w_rᵀ A w_r with A collected through the pass (the patch geometry
    and column order are right), and the MatMul's A is its input's second moment."""
    proto = _conv_matmul_model(groups)
    model = ir.serde.deserialize_model(proto)
    collect = CollectWeightsPass(min_size=1)
    collect(model)
    rng = np.random.default_rng(1)
    batches = [{"x": rng.normal(size=(3, 8, 6, 5)).astype(np.float32)} for _ in range(2)]
    posts = FitLayerPosterior(proto, batches, n_data=100.0, prior_precision=1.0)(collect.weights)
    # conv: the output energy per channel, from ORT, against the posterior's σ² and A
    conv_only = onnx.ModelProto()
    conv_only.CopyFrom(proto)
    conv_only.graph.output[0].name = "y"
    y = np.concatenate([run(conv_only, b) for b in batches])          # [B, O, H', W']
    y2 = torch.from_numpy(y).movedim(1, -1).reshape(-1, 8).double()
    sigma2 = float(y2.var(dim=0, unbiased=False).mean())
    post = posts["w"]
    assert post.info["output_noise_var"] == pytest.approx(sigma2, rel=1e-4) if groups == 1 else True
    w_c = WeightLayout.for_consumer("Conv", (8, 8 // groups, 3, 3)).to_canonical(
        torch.from_numpy(onnx.numpy_helper.to_array(proto.graph.initializer[0]).copy())).double()
    if groups == 1:
        energy = ((w_c @ post.A.double()) * w_c).sum(1)
        torch.testing.assert_close(energy, (y2 ** 2).mean(0), rtol=1e-4, atol=1e-4)
    else:  # grouped: diagonal precision only, no A
        assert post.A is None and post.precision.shape == (8, 8 // groups * 9)
    # matmul: A = E[t tᵀ] over all tokens of its input
    t = torch.from_numpy(y).movedim(1, -1).reshape(-1, 8).double()
    torch.testing.assert_close(posts["b"].A.double(), t.T @ t / len(t), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small conv + linear classifier exported to ONNX (external data, as torch writes it) and an .npz."""
    d = tmp_path_factory.mktemp("onnx_input")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 64, 3, padding=1, stride=2), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 128),
                              torch.nn.ReLU(), torch.nn.Linear(128, 10)).eval()
    torch.onnx.export(net, (torch.randn(2, 3, 12, 12),), str(d / "net.onnx"), dynamo=True, input_names=["x"],
                      output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    rng = np.random.default_rng(0)
    np.savez(d / "calib.npz", x=rng.normal(size=(80, 3, 12, 12)).astype(np.float32))
    return d


def _invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_onnx_input_compiles_end_to_end(exported, tmp_path):
    out = tmp_path / "out"
    r = _invoke("compile", f"onnx:{exported / 'net.onnx'}", "--calib", str(exported / "calib.npz"), "--bits", "3",
                "--out", str(out), "--latency-runs", "2", "--memory-loads", "1", "--latency-batch", "4", "-q")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["source"].startswith("ONNX input")
    assert report["bits"]["all_in"] <= 3.0 and report["bits"]["all_in"] == pytest.approx(report["bits"]["all_in_from_file"])
    assert report["fidelity"]["items"] == 40 and report["fidelity"]["cosine_mean"] > 0.98
    posts = [t for t in report["plan"]["tensors"]]
    assert len(posts) == 3  # the second conv and both linears; the 3·32·3·3 stem is below the size floor
    # the artifact is self-contained (the input's external data was pulled in)
    model = onnx.load(out / "model.onnx", load_external_data=False)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


@pytest.mark.parametrize("case", ["no_calib", "names", "dtype", "shape", "items", "nan", "not_npz",
                                  "corrupt_model", "artifact_input", "mc_risk", "lowrank"])
def test_onnx_input_bad_input(exported, tmp_path, case):
    model, calib = exported / "net.onnx", tmp_path / "c.npz"
    x = np.zeros((8, 3, 12, 12), np.float32)
    extra = []
    if case == "names":
        np.savez(calib, pixels=x)
    elif case == "dtype":
        np.savez(calib, x=x.astype(np.float64))
    elif case == "shape":
        np.savez(calib, x=x[:, :2])
    elif case == "items":
        np.savez(calib, x=x[:0])
    elif case == "nan":
        x[0, 0, 0, 0] = np.nan
        np.savez(calib, x=x)
    elif case == "not_npz":
        calib.write_text("hello")
    else:
        calib = exported / "calib.npz"
    if case == "corrupt_model":
        model = tmp_path / "bad.onnx"
        model.write_bytes((exported / "net.onnx").read_bytes()[:50])
    if case == "artifact_input":
        r = _invoke("compile", f"onnx:{exported / 'net.onnx'}", "--calib", str(calib), "--method", "rtn",
                    "--bits", "8", "--out", str(tmp_path / "first"), "--latency-runs", "1", "--memory-loads", "1", "-q")
        assert r.exit_code == 0, r.output
        model = tmp_path / "first" / "model.onnx"
    if case == "mc_risk":
        extra = ["--risk", "mc"]
    if case == "lowrank":
        extra = ["--curvature", "lowrank"]
    args = ["compile", f"onnx:{model}", "--out", str(tmp_path / "out"), "-q", *extra]
    if case != "no_calib":
        args += ["--calib", str(calib)]
    r = _invoke(*args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not (tmp_path / "out").exists()


def test_embedding_table_read_twice_gets_its_lookup_counts():
    """A Gather table (read by two Gathers: tied) and the MatMul after it through the ORT pass: the table's
    posterior comes from its row lookups summed over both readers, so rows looked up more often are more
    precise and a row never looked up keeps the prior; the MatMul gets the layer-wise posterior."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(10, 8)).astype(np.float32)
    w = rng.normal(size=(8, 3)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e1"]),
             helper.make_node("Gather", ["table", "ids2"], ["e2"]),
             helper.make_node("Add", ["e1", "e2"], ["e"]),
             helper.make_node("MatMul", ["e", "w"], ["out"])]
    graph = helper.make_graph(
        nodes, "embedding", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 4]),
                             helper.make_tensor_value_info("ids2", TensorProto.INT64, ["n", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(table, "table"), onnx.numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    collect = CollectWeightsPass(min_size=1, scope="all")
    collect(ir.serde.deserialize_model(proto))
    assert set(collect.weights) == {"table", "w"}
    ids = np.array([[1, 1, 1, 2]] * 3, dtype=np.int64)            # row 1: 9 lookups, row 2: 3
    batches = [{"ids": ids, "ids2": np.full((3, 4), 2, dtype=np.int64)}]  # row 2: 12 more
    posts = FitLayerPosterior(proto, batches, n_data=100.0, prior_precision=1.0)(collect.weights)
    lam = posts["table"].precision.sum(1)
    assert lam[2] > lam[1] > lam[0]
    assert float(lam[0]) == pytest.approx(float(lam[5]))            # never looked up: the prior alone
    assert posts["w"].info["posterior"].startswith("layer-wise")


def test_layerwise_rank_deficient_input_factor_gets_the_diagonal_prior():
    """Through the ORT pass as through the torch one: a pooled MatMul (6 rows reach its 16 columns) gets
    A* = (6·A + 10·diag A)/16 and records δ = 1 − 6/16; the token MatMul before it (30 rows, 4 columns) keeps
    the measured A."""
    rng = np.random.default_rng(2)
    w1 = rng.normal(size=(4, 16)).astype(np.float32)
    w2 = rng.normal(size=(16, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("ReduceMean", ["t", "axis"], ["p"], keepdims=0),
             helper.make_node("MatMul", ["p", "w2"], ["out"])]
    graph = helper.make_graph(
        nodes, "pooled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2"),
         onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "axis")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    collect = CollectWeightsPass(min_size=1)
    collect(ir.serde.deserialize_model(proto))
    batches = [{"x": rng.normal(size=(3, 5, 4)).astype(np.float32)} for _ in range(2)]
    posts = FitLayerPosterior(proto, batches, n_data=100.0, prior_precision=1.0)(collect.weights)
    x = torch.from_numpy(np.concatenate([b["x"] for b in batches])).double()
    pooled = torch.tanh(x @ torch.from_numpy(w1).double()).mean(1)     # [6, 16]
    a = pooled.T @ pooled / 6
    torch.testing.assert_close(posts["w2"].A.double(), (6 * a + 10 * torch.diag(torch.diag(a))) / 16,
                               rtol=1e-4, atol=1e-6)
    assert posts["w2"].info["input_shrinkage"] == pytest.approx(1 - 6 / 16)
    assert torch.linalg.eigvalsh(posts["w2"].A.double()).min() > 0
    tokens = x.reshape(-1, 4)
    torch.testing.assert_close(posts["w1"].A.double(), tokens.T @ tokens / 30, rtol=1e-4, atol=1e-6)
    assert posts["w1"].info["input_shrinkage"] == 0.0
