"""CUDA tier: runs only where the CUDA execution provider really works; skipped cleanly elsewhere."""

from __future__ import annotations

import numpy as np
import pytest

from bayesq_onnx.plan import TENSOR, Candidate
from bayesq_onnx.runtime.session import CUDA, cuda_status, make_session, resolve_providers
from helpers import plan_all, reference_model, rewrite
from tiny_models import conv_model, linear_model

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not cuda_status()[0], reason=cuda_status()[1])]


@pytest.mark.parametrize("cand", [Candidate("uniform", 4, 16), Candidate("uniform", 2), Candidate("uniform", 3),
                                  Candidate("codebook", 3, 1), Candidate("codebook", 4, 4),
                                  # the per-tensor grids --target cuda offers for short rows
                                  Candidate("uniform", 4, TENSOR), Candidate("uniform", 8, TENSOR)],
                         ids=lambda c: c.label)
@pytest.mark.parametrize("make", [linear_model, conv_model], ids=["linear", "conv"])
@pytest.mark.parametrize("target", ["size", "cuda"])  # the arithmetic decode and DequantizeLinear
def test_artifact_runs_on_cuda_like_on_cpu(make, cand, target):
    import onnx_ir as ir

    proto = make()
    plan = plan_all(proto, cand)
    model, _ = rewrite(proto, plan, target=target)
    data = ir.serde.serialize_model(model).SerializeToString()
    shape = (2, 64) if make is linear_model else (2, 64, 8, 8)
    feed = {"x": np.random.default_rng(0).normal(size=shape).astype(np.float32)}
    providers, _ = resolve_providers("cuda")
    session, _ = make_session(data, providers)
    assert session.get_providers()[0] == CUDA
    got = session.run(None, feed)[0]
    cpu, _ = make_session(reference_model(proto, plan).SerializeToString(), ["CPUExecutionProvider"])
    np.testing.assert_allclose(got, cpu.run(None, feed)[0], rtol=1e-3, atol=1e-4)
