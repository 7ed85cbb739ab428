"""Export: numerics against PyTorch and the parameter -> initializer mapping (tied weights included)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from bayesq_onnx.export import export_model, map_parameters, torch_outputs
from helpers import run
from tiny_torch import tiny_bundle


@pytest.fixture(scope="module")
def exported():
    bundle = tiny_bundle()
    model = export_model(bundle)
    return bundle, model, map_parameters(bundle.module, model)


def test_export_matches_torch(exported):
    bundle, model, _ = exported
    for batch in bundle.evaluation:
        got = run(model, batch, config={})
        want = torch_outputs(bundle.module, [batch], bundle.input_names)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dynamic_axes(exported):
    _, model, _ = exported
    got = run(model, {"ids": np.zeros((3, 11), np.int64)}, config={})
    assert got.shape == (3, 50)


def test_every_parameter_is_bound_with_the_right_values(exported):
    bundle, model, bindings = exported
    params = dict(bundle.module.named_parameters(remove_duplicate=False))
    bound = {alias for b in bindings.values() for alias in b.aliases}
    assert bound == set(params)
    for name, b in bindings.items():
        assert name in model.graph.initializers
        value = model.graph.initializers[name].const_value.numpy()
        p = params[b.parameter].detach().numpy()
        np.testing.assert_array_equal(value, p.T if b.transposed else p)


def test_tied_weights_bind_to_both_names(exported):
    _, model, bindings = exported
    tied = [b for b in bindings.values() if "emb.weight" in b.aliases]
    # the exporter keeps one shared initializer, read by both the Gather and the Gemm
    assert len(tied) == 1 and set(tied[0].aliases) == {"emb.weight", "head.weight"}
    consumers = {node.op_type for node, _ in model.graph.initializers[tied[0].initializer].uses()}
    assert consumers == {"Gather", "Gemm"}
    # generated names are gone: initializers speak the model's parameter names
    assert not any(n.startswith("val_") for n in bindings)


def test_tied_weight_held_twice_gets_two_bindings():
    """A graph holding a tied table as is *and* transposed (Gather + MatMul) binds both copies."""
    import onnx
    from tiny_torch import TinyLM

    m = TinyLM()
    w = m.emb.weight.detach().numpy()
    proto = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [], [
        onnx.numpy_helper.from_array(w.copy(), "val_1"), onnx.numpy_helper.from_array(w.T.copy(), "val_2")]))
    bindings = map_parameters(m, ir.from_proto(proto))
    assert sorted(bindings) == ["emb.weight", "emb.weight.T"]
    assert bindings["emb.weight.T"].transposed and not bindings["emb.weight"].transposed
    assert set(bindings["emb.weight.T"].aliases) == {"emb.weight", "head.weight"}


def test_mapping_is_stable_when_run_again(exported):
    bundle, model, bindings = exported
    again = map_parameters(bundle.module, model)
    assert again == bindings


def test_distinct_equal_parameters_are_not_guessed():
    """Two different parameters holding equal values cannot be told apart by content: leave them unbound."""
    import torch

    class Twins(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4, bias=False)
            self.b = torch.nn.Linear(4, 4, bias=False)
            with torch.no_grad():
                self.b.weight.copy_(self.a.weight)

        def forward(self, x):
            return self.a(x) + self.b(x) * 2

    import onnx

    m = Twins()
    proto = onnx.helper.make_model(onnx.helper.make_graph(
        [], "g", [], [], [onnx.numpy_helper.from_array(m.a.weight.detach().numpy().T.copy(), "val_1")]))
    assert map_parameters(m, ir.from_proto(proto)) == {}


def test_export_with_single_item_example_and_other_argument_names():
    """forward's argument is called `x` while the graph input is `pixels`, and the first batch holds one item:
    the export still has a dynamic batch axis."""
    import numpy as np
    import torch

    from bayesq_onnx.export import export_model
    from bayesq_onnx.models.base import ModelBundle
    from helpers import run

    net = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    one = {"pixels": np.ones((1, 8), np.float32)}
    bundle = ModelBundle(name="t", module=net, input_names=["pixels"], output_names=["y"],
                         dynamic_axes={"pixels": {0: "batch"}}, calibration=[one], evaluation=[one],
                         latency_feed=one, metric=lambda a, b: {}, headline="")
    model = export_model(bundle)
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(model, {"pixels": x}), want, atol=1e-5)
