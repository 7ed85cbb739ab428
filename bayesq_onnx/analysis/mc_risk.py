"""MonteCarloRisk: the risk of one (block, candidate) measured on the model itself (``risk="mc"``).

The block's parameter in the PyTorch model is replaced by its quantized value (nearest codes on the
designed grid), everything else stays FP32, and the output on a calibration slice is compared with the
FP32 output: ``½·‖Δh‖²/σ²`` per item for a Gaussian output, ``KL(p_fp ‖ p_q)`` for a categorical one. The
mean per item is scaled by N and the prior term ``½τ‖Δw‖²`` is added, so the figure is on the same scale
as the closed-form proxy ``½ (ŵ − μ)ᵀΛ(ŵ − μ)``. With a posterior temperature T > 0, ``samples`` weights
``w ~ N(μ, T/Λ)`` are drawn for the block and each is quantized on the grid: R = mean over samples.
A weight no parameter of the PyTorch model holds gets NaN here; the planner then uses the closed-form risk
for it and says so (``risk_source``): no NaN reaches the knapsack.
"""

from __future__ import annotations

import torch

from ..export import ParameterBinding
from ..models.base import ModelBundle
from ..plan import Candidate
from ..weights import WeightInfo, WeightPosterior


class MonteCarloRisk:
    def __init__(self, bundle: ModelBundle, bindings: dict[str, ParameterBinding], *, items: int = 32,
                 samples: int = 2, temperature: float = 0.0, seed: int = 0):
        self.bundle, self.bindings = bundle, bindings
        self.samples = samples if temperature > 0 else 1
        self.temperature = temperature
        self.gen = torch.Generator().manual_seed(seed)
        batches, n = [], 0
        for b in bundle.calibration:
            batches.append(b)
            n += len(next(iter(b.values())))
            if n >= items:
                break
        self.inputs = [[torch.from_numpy(b[k]) for k in bundle.input_names] for b in batches]
        self.forward_passes = 0
        # the FP32 model's outputs on the slice: one copy for every weight (at T = 0 each block's reference is
        # the unperturbed model; an LM's logits per weight would be items × tokens × vocabulary each)
        self._reference: torch.Tensor | None = None

    def _outputs(self) -> torch.Tensor:
        with torch.inference_mode():
            outs = [self.bundle.module(*x) for x in self.inputs]
        self.forward_passes += len(self.inputs)
        return torch.cat([(o[0] if isinstance(o, (tuple, list)) else o).float() for o in outs])

    def _divergence(self, ref: torch.Tensor, out: torch.Tensor, noise: float) -> float:
        if self.bundle.likelihood == "categorical":
            logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(out, -1)
            return float((logp.exp() * (logp - logq)).sum(-1).mean())
        return float(0.5 * ((out - ref) ** 2).sum(-1).mean() / noise)

    def __call__(self, weight: WeightInfo, post: WeightPosterior, cand: Candidate, grid, mu: torch.Tensor) -> float:
        binding = self.bindings.get(weight.name)
        if binding is None:
            return float("nan")
        param = self.bundle.module.get_parameter(binding.parameter)
        original = param.detach().clone()
        noise = float(post.info.get("output_noise_var", 1.0))
        lay = weight.layout
        total = 0.0
        try:
            for _ in range(self.samples):
                if self.temperature > 0:
                    w = mu + torch.randn(mu.shape, generator=self.gen) * torch.sqrt(self.temperature / post.precision)
                    self._set(param, w, lay, binding)
                    ref = self._outputs()
                else:
                    w = mu
                    if self._reference is None:
                        self._reference = self._outputs()
                    ref = self._reference
                if grid is None:
                    q = w.to(torch.float16 if cand.bits == 16 else torch.float32).float()
                else:
                    _, q = grid.quantize(w, slice(0, lay.rows), slice(0, lay.cols))
                self._set(param, q, lay, binding)
                data = post.n_data * self._divergence(ref, self._outputs(), noise)
                total += data + 0.5 * post.prior_precision * float(((q - w) ** 2).sum())
        finally:
            with torch.no_grad():
                param.copy_(original)
        return total / self.samples

    @staticmethod
    def _set(param: torch.nn.Parameter, canonical: torch.Tensor, lay, binding: ParameterBinding) -> None:
        onnx_layout = lay.from_canonical(canonical)
        value = onnx_layout.T if binding.transposed else onnx_layout
        with torch.no_grad():
            param.copy_(value.reshape(param.shape))
