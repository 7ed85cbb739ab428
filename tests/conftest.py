import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hypothesis import settings

# First calls pay torch's lazy initialization; timing deadlines would make property tests flaky.
settings.register_profile("bayesq", deadline=None, max_examples=60)
settings.load_profile("bayesq")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_exported():
    """The tiny PyTorch LM exported to ONNX: (bundle, parameter bindings, weights in scope)."""
    from bayesq_onnx.export import export_model, map_parameters
    from bayesq_onnx.passes.collect_weights import CollectWeightsPass
    from tiny_torch import tiny_bundle

    bundle = tiny_bundle()
    model = export_model(bundle)
    bindings = map_parameters(bundle.module, model)
    collect = CollectWeightsPass(min_size=1)
    collect(model)
    return bundle, bindings, collect.weights
