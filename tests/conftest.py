import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # the README's command runs two workers on a 2-core machine: one intra-op thread each, as two contended
    # thread pools wait ~10 ms per small op for a busy core (test_zoo.py's docstring); the CLI subprocesses
    # some tests start inherit it
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is far faster than two contended ones
    (GPT-2 from a small config plans in 0.3 s instead of 5.8 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
