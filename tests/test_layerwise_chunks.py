"""Layer-wise moments in bounded memory: accumulated in chunks (rows, conv patches, items per ORT run) they
equal the one-shot sums, and no ORT run fetches more than its budget (or one item)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper

from bayesq_onnx.analysis import fit_layer_posterior
from bayesq_onnx.analysis.fit_layer_posterior import FitLayerPosterior
from bayesq_onnx.bayes import layerwise
from bayesq_onnx.bayes.layerwise import InputMoments, conv_patches, conv_positions
from bayesq_onnx.passes.collect_weights import CollectWeightsPass


def _one_shot(rows: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ x and Σ x xᵀ (grouped: Σ x² per group) of all rows at once, in float64."""
    r = rows.double().reshape(rows.shape[0], groups, -1)
    return r.sum(0), ((r * r).sum(0) if groups > 1 else r[:, 0].T @ r[:, 0])


@given(groups=st.sampled_from([1, 2, 4]), nd=st.sampled_from([1, 2]), k=st.integers(1, 3), stride=st.integers(1, 2),
       dilation=st.integers(1, 2), pad=st.tuples(st.integers(0, 2), st.integers(0, 2)), split=st.integers(1, 4),
       chunk=st.sampled_from([8, 200, 1 << 20]), seed=st.integers(0, 99))
def test_conv_moments_in_chunks_equal_the_one_shot_sums(groups, nd, k, stride, dilation, pad, split, chunk, seed):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layerwise, "CHUNK_BYTES", chunk)  # down to one item per step
        _check_conv_moments(groups, nd, k, stride, dilation, pad, split, seed)


def _check_conv_moments(groups, nd, k, stride, dilation, pad, split, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 8, *((7, 6) if nd == 2 else (9,)), generator=g) + 0.3
    kernel, pads = (k,) * nd, (pad[0],) * nd + (pad[1],) * nd
    conv = dict(strides=(stride,) * nd, pads=pads, dilations=(dilation,) * nd)
    patches = conv_patches(x, kernel, groups=groups, **conv)
    total, outer = _one_shot(patches, groups)
    m = InputMoments(patches.shape[-1], groups=groups)
    for part in torch.tensor_split(x, split):  # several runs, each in chunks
        m.update_conv(part, kernel, **conv)
    assert m.count == patches.shape[0] == len(x) * conv_positions(tuple(x.shape[2:]), kernel, **conv)
    torch.testing.assert_close(m.total, total, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.outer, outer, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.second_moment, outer / len(patches), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 3])
def test_row_moments_in_chunks_equal_the_one_shot_sums(groups, monkeypatch):
    monkeypatch.setattr(layerwise, "CHUNK_BYTES", 8 * 5 * groups * 7)  # five rows per step
    rows = torch.randn(123, groups, 7, generator=torch.Generator().manual_seed(0))
    m = InputMoments(7, groups=groups)
    m.update(rows[:50])
    m.update(rows[50:])
    total, outer = _one_shot(rows.reshape(123, -1), groups)
    torch.testing.assert_close(m.total, total, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.outer, outer, rtol=1e-12, atol=1e-12)
    assert m.count == 123


def _model(batch: int | str = "n") -> onnx.ModelProto:
    """Conv 3×3 → depthwise Conv (auto_pad) → MatMul, weights big enough to be collected."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(8, 4, 3, 3)).astype(np.float32)
    w2 = rng.normal(size=(8, 1, 3, 3)).astype(np.float32)
    b = rng.normal(size=(8, 16)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["y1"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["y1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["y2"], group=8, auto_pad="SAME_UPPER"),
             helper.make_node("Transpose", ["y2"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["t", "b"], ["out"])]
    graph = helper.make_graph(
        nodes, "chunks", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 10, 9])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (b, "b"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


class _Counting:
    """An ORT session that records the items and the fetched bytes of every run."""

    def __init__(self, session):
        self.session, self.runs = session, []

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, names, feed):
        out = self.session.run(names, feed)
        self.runs.append((len(feed["x"]), sum(o.nbytes for o in out)))
        return out


_make_session = fit_layer_posterior.make_session


def _fit(proto, batches, monkeypatch, **kwargs):
    """The pass's posteriors, and (items, fetched bytes) of each of its ORT runs."""
    sessions = []

    def counting(model, providers):
        session, start = _make_session(model, providers)
        sessions.append(_Counting(session))
        return sessions[-1], start

    monkeypatch.setattr(fit_layer_posterior, "make_session", counting)
    collect = CollectWeightsPass(min_size=1)
    collect(ir.serde.deserialize_model(proto))
    posts = FitLayerPosterior(proto, batches, n_data=50.0, **kwargs)(collect.weights)
    return posts, sessions[0].runs


def test_pass_in_item_chunks_equals_whole_batches(monkeypatch):
    """fetch_bytes=1: one item per ORT run; the posteriors are those of whole-batch runs (float tolerance)."""
    rng = np.random.default_rng(1)
    batches = [{"x": rng.normal(size=(n, 4, 10, 9)).astype(np.float32)} for n in (5, 3, 6)]
    whole, whole_runs = _fit(_model(), batches, monkeypatch, fetch_bytes=1 << 40)
    one, one_runs = _fit(_model(), batches, monkeypatch, fetch_bytes=1)
    assert [n for n, _ in whole_runs] == [1, 4, 3, 6]  # the first item measures, then whole batches
    assert [n for n, _ in one_runs] == [1] * 14
    per_item = one_runs[0][1]
    mid, mid_runs = _fit(_model(), batches, monkeypatch, fetch_bytes=2 * per_item)
    assert max(size for _, size in mid_runs) <= 2 * per_item and len(mid_runs) == 8  # 1+2+2, 2+1, 2+2+2
    assert set(whole) == set(one) == set(mid) == {"w1", "w2", "b"}
    for name in whole:
        for other in (one, mid):
            torch.testing.assert_close(other[name].precision, whole[name].precision, rtol=1e-5, atol=1e-6)
            if whole[name].A is None:
                assert other[name].A is None
            else:
                torch.testing.assert_close(other[name].A, whole[name].A, rtol=1e-5, atol=1e-6)
    assert whole["w2"].A is None and whole["w1"].A.shape == (36, 36)  # depthwise: diagonal only


def test_static_batch_runs_whole(monkeypatch):
    """A model whose batch dimension is fixed runs its batches as they are."""
    rng = np.random.default_rng(2)
    batches = [{"x": rng.normal(size=(4, 4, 10, 9)).astype(np.float32)} for _ in range(2)]
    fixed, runs = _fit(_model(batch=4), batches, monkeypatch, fetch_bytes=1)
    assert [n for n, _ in runs] == [4, 4]
    dynamic, _ = _fit(_model(), batches, monkeypatch, fetch_bytes=1)
    for name in fixed:
        torch.testing.assert_close(dynamic[name].precision, fixed[name].precision, rtol=1e-5, atol=1e-6)
