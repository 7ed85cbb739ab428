"""Tiny ONNX models (a few nodes) built in the tests, with float weights of every consumer layout."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def linear_model(seed: int = 0, k: int = 64, n: int = 48, m: int = 32, opset: int = 20) -> onnx.ModelProto:
    """x[b,k] -> MatMul(W1[k,n]) -> Relu -> Gemm(W2[m,n], transB=1) -> y[b,m]."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.1, (k, n)).astype(np.float32)
    w2 = rng.normal(0, 0.1, (m, n)).astype(np.float32)
    b2 = rng.normal(0, 0.1, (m,)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="gemm", transB=1)]
    graph = helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", m])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b2, "b2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def conv_model(seed: int = 0, cin: int = 64, cout: int = 16, opset: int = 20) -> onnx.ModelProto:
    """x[b,cin,8,8] -> Conv(W[cout,cin,3,3]) -> Relu -> GlobalAveragePool -> y."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.1, (cout, cin, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["y"], name="gap")]
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", cin, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", cout, 1, 1])],
        [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def embedding_model(seed: int = 0, vocab: int = 100, dim: int = 64, opset: int = 20) -> onnx.ModelProto:
    """ids[b,s] -> Gather(E[vocab,dim]) -> MatMul(W[dim,dim]) -> ReduceMean over s -> y[b,dim]."""
    rng = np.random.default_rng(seed)
    e = rng.normal(0, 0.5, (vocab, dim)).astype(np.float32)
    w = rng.normal(0, 0.1, (dim, dim)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["e", "ids"], ["h"], name="gather"),
             helper.make_node("MatMul", ["h", "w"], ["p"], name="mm"),
             helper.make_node("ReduceMean", ["p", "axes"], ["y"], name="mean", keepdims=0)]
    graph = helper.make_graph(
        nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", dim])],
        [numpy_helper.from_array(e, "e"), numpy_helper.from_array(w, "w"),
         numpy_helper.from_array(np.array([1], np.int64), "axes")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
