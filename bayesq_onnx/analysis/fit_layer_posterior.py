"""FitLayerPosterior: the posterior of every weight in scope from its input activations, collected by
running the ONNX model itself in ONNX Runtime — for inputs with no PyTorch model (``onnx:<file>``).

Each consumer's activation (MatMul/Gemm input A, Conv input X, Gather indices) is exposed as an extra graph
output of a throw-away copy of the model; ORT runs over the calibration batches feed the moment accumulators
of :mod:`bayesq_onnx.bayes.layerwise` (layer-wise Gaussian likelihood, ``Λ = N·(G ⊗ A) + τ``). Every exposed
activation of a run is alive at once (in ORT and as the returned arrays), so a batch whose inputs are batched
along a dynamic axis 0 runs in item chunks of about :data:`FETCH_BYTES` of activations, and the moments take
each run's activations a bounded float64 chunk at a time: the peak memory does not grow with the batch size
or the number of layers tapped, and the moments are the same sums (up to float64 summation order). The result has
the same form as :class:`~bayesq_onnx.analysis.fit_posterior.FitLaplacePosterior`'s, so the planners do not
care where it came from.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx
import torch

from ..bayes.empirical_bayes import shrink_to_diagonal
from ..bayes.layerwise import InputMoments, layerwise_posterior, token_frequency_posterior
from ..models.base import Batch
from ..runtime.activations import (FETCH_BYTES, Tap, conv_geometry, matmul_rows, probe_model, run_in_item_chunks,
                                   splittable_inputs, weight_taps)
from ..runtime.session import CPU, make_session
from ..weights import WeightInfo, WeightPosterior, canonical_mu


class FitLayerPosterior:
    """Fit ``Λ = N·(G ⊗ A) + τ`` per weight from ORT activations on the calibration batches."""

    def __init__(self, model: onnx.ModelProto, calibration: list[Batch], *, curvature: str = "kfac",
                 n_data: float | None = None, prior_precision: float | None = None, progress: Callable | None = None,
                 fetch_bytes: int = FETCH_BYTES):
        if curvature == "lowrank":
            raise ValueError("the layer-wise likelihood has no per-item gradients for a low-rank posterior")
        self.model, self.calibration, self.curvature = model, calibration, curvature
        self.n_data = float(n_data) if n_data is not None else float(sum(len(next(iter(b.values()))) for b in calibration))
        self.prior_precision, self.progress, self.fetch_bytes = prior_precision, progress, fetch_bytes

    def __call__(self, weights: dict[str, WeightInfo]) -> dict[str, WeightPosterior]:
        taps = weight_taps(self.model.graph, weights)
        inputs = {i.name for i in self.model.graph.input}
        fetch = sorted({t.activation for ts in taps.values() for t in ts} - inputs)
        session, _ = make_session(probe_model(self.model, fetch), [CPU])
        feeds = {i.name for i in session.get_inputs()}
        moments: dict[tuple[str, int], InputMoments] = {}
        counts: dict[tuple[str, int], torch.Tensor] = {}
        run_in_item_chunks(self.progress(self.calibration) if self.progress else self.calibration,
                           lambda chunk: self._run(session, fetch, feeds, inputs, chunk, taps, weights, moments, counts),
                           splittable=splittable_inputs(session), fetch_bytes=self.fetch_bytes)

        out = {}
        for name, w in weights.items():
            mu = canonical_mu(w).contiguous()  # row-major: its reductions sum in one order whatever the layout
            measured = [moments[name, i] for i, _ in enumerate(taps.get(name, ())) if (name, i) in moments]
            fitted = [layerwise_posterior(mu, m, self.n_data, self.prior_precision) for m in measured]
            if not fitted:
                looked_up = [counts[name, i] for i, _ in enumerate(taps.get(name, ())) if (name, i) in counts]
                if not looked_up:
                    # no data reaches it: its posterior is the prior, N(μ, Var(w)·I)
                    tau = 1.0 / max(float(mu.double().var()), 1e-12)
                    out[name] = WeightPosterior(name, None, torch.full_like(mu, tau), tau, 0.0,
                                                info={"posterior": "prior only (no activations reach this weight)"})
                    continue
                fitted = [token_frequency_posterior(mu, sum(looked_up[1:], looked_up[0]), self.n_data,
                                                    self.prior_precision)]
            # A tensor read by several consumers (tied) is scored by the first; its other readers see the same
            # decoded values, and summing Fishers of differently scaled layers would need a common noise.
            post = fitted[0]
            rows = int(measured[0].count) if measured else None
            kfac = self.curvature == "kfac" and post.A is not None
            a, shrinkage = shrink_to_diagonal(post.A, rows) if kfac else (None, None)
            out[name] = WeightPosterior(
                name, None, post.precision, post.prior_precision, self.n_data, A=a,
                G_diag=post.G_diag if kfac else None,
                info={"posterior": "layer-wise Gaussian likelihood (ORT activations)",
                      "output_noise_var": post.output_noise_var, "consumers": len(taps.get(name, ())),
                      "calibration_rows": rows,
                      **({} if shrinkage is None else {"input_shrinkage": shrinkage})})
        return out

    @staticmethod
    def _run(session, fetch: list[str], feeds: set[str], inputs: set[str], batch: Batch,
             taps: dict[str, list[Tap]], weights: dict[str, WeightInfo], moments: dict[tuple[str, int], InputMoments],
             counts: dict[tuple[str, int], torch.Tensor]) -> int:
        """One ORT run on ``batch``, its activations added to every consumer's moments (Gather: index counts);
        returns the bytes it fetched. The fetched arrays are released on return."""
        values = dict(zip(fetch, session.run(fetch, {k: v for k, v in batch.items() if k in feeds})))
        size = sum(v.nbytes for v in values.values())
        values.update({k: v for k, v in batch.items() if k in inputs})
        for name, ts in taps.items():
            for i, tap in enumerate(ts):
                x = torch.from_numpy(np.ascontiguousarray(values[tap.activation]))
                key = (name, i)
                if tap.op_type == "Gather":
                    rows = weights[name].layout.shape[0]
                    c = torch.bincount((x.reshape(-1).long() % rows), minlength=rows)
                    counts[key] = counts[key] + c if key in counts else c
                    continue
                x = x.float()
                if tap.op_type in ("MatMul", "Gemm"):
                    rows_x = matmul_rows(x, tap)
                    if key not in moments:
                        moments[key] = InputMoments(rows_x.shape[-1])
                    moments[key].update(rows_x)
                    continue
                kernel, conv = conv_geometry(x, tap, weights[name])
                groups = conv.pop("groups")
                if key not in moments:
                    moments[key] = InputMoments(math.prod(kernel) * (x.shape[1] // groups), groups=groups)
                moments[key].update_conv(x, kernel, **conv)
        return size
