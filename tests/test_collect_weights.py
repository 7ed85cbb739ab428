"""CollectWeightsPass on tiny graphs: scope, layouts, and what is left alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from bayesq_onnx.passes.collect_weights import CollectWeightsPass
from tiny_models import conv_model, embedding_model, linear_model


def collect(proto, **kw):
    p = CollectWeightsPass(min_size=1, **kw)
    result = p(ir.serde.deserialize_model(proto))
    assert result.modified is False
    return p.weights


def test_linear_layouts():
    w = collect(linear_model())
    assert set(w) == {"w1", "w2"}  # the bias b2 is 1-D and stays float
    assert (w["w1"].layout.rows, w["w1"].layout.cols) == (48, 64)  # MatMul [K=64, N=48]
    assert (w["w2"].layout.rows, w["w2"].layout.cols) == (32, 48)  # Gemm transB=1 [N=32, K=48]
    assert w["w1"].consumers == ("MatMul",)


def test_conv_layout():
    w = collect(conv_model())["w"]
    assert (w.layout.rows, w.layout.cols, w.layout.in_channels) == (16, 64 * 9, 64)


def test_scope_controls_embeddings():
    assert set(collect(embedding_model())) == {"w"}
    assert set(collect(embedding_model(), scope="all")) == {"e", "w"}


def test_min_size_and_graph_inputs_are_respected():
    proto = linear_model()
    p = CollectWeightsPass(min_size=3000)
    p(ir.serde.deserialize_model(proto))
    assert set(p.weights) == {"w1"}  # 64*48 = 3072 elements; w2 has 1536
    # an initializer that is also a graph input can be overridden at run time: not a constant weight
    proto.graph.input.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [64, 48]))
    assert set(collect(proto)) == {"w2"}


def test_weight_read_as_data_is_left_alone():
    """A tensor that some node reads as an activation (here: Add) is not a weight to quantize."""
    w = np.ones((8, 8), np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 8])],
                              [numpy_helper.from_array(w, "w")])
    assert collect(helper.make_model(graph)) == {}


def test_unknown_scope():
    with pytest.raises(ValueError):
        CollectWeightsPass(scope="everything")
