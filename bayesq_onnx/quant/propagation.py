"""Error propagation across layers (docs/design.md §3.2, issue 14 lever 2): the math of re-rounding one layer
once the layers before it are quantized. Pure torch; nothing here knows about ONNX.

A layer ``y = W x`` of the FP32 model sees inputs ``x``; in the quantized model, whose upstream layers already
carry their rounding errors, it sees ``x̃``. Over the calibration rows (``X``, ``X̃`` as ``[n, cols]``):

* **sequential**: round ``W`` in the metric of the inputs it will really get, ``H̃ = X̃ᵀX̃``;
* **fp-outputs** (GPTAQ-style): make the quantized layer reproduce the *FP32 model's* outputs from those
  inputs, ``min_Ŵ ‖X Wᵀ − X̃ Ŵᵀ‖²``. With ``Δ = X − X̃`` and ``K = ΔᵀX̃``, this equals, up to a constant,
  ``‖X̃ (W* − Ŵ)ᵀ‖²`` with the least-squares target

      W* = W Xᵀ X̃ H̃⁻¹ = W + W K H̃⁻¹,

  so GPTQ on ``W*`` with ``H̃`` minimizes it; the layer absorbs what its upstream layers' errors did to its
  input, as far as a linear map of ``x̃`` can.

``H̃`` is dampened as the posterior metric dampens it (the prior precision): ``H̃/n + δ·mean diag(H̃/n)·I``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..bayes.layerwise import CHUNK_BYTES, conv_patches, conv_positions


@dataclass
class PairedMoments:
    """Running ``Σ x̃ x̃ᵀ`` and ``Σ (x − x̃) x̃ᵀ`` (float64 ``[cols, cols]``) of a layer's input rows in the FP32
    model (``x``) and in the partly quantized one (``x̃``), taken on the same calibration items."""

    cols: int
    cross: bool = True     # keep Σ (x − x̃) x̃ᵀ (fp-outputs); sequential needs only Σ x̃ x̃ᵀ
    h: torch.Tensor = field(init=False)
    k: torch.Tensor | None = field(init=False)
    count: int = field(init=False, default=0)

    def __post_init__(self):
        self.h = torch.zeros(self.cols, self.cols, dtype=torch.float64)
        self.k = torch.zeros(self.cols, self.cols, dtype=torch.float64) if self.cross else None

    def update(self, fp_rows: torch.Tensor | None, q_rows: torch.Tensor) -> None:
        """Add rows ``[n, cols]`` of both models (``fp_rows`` may be ``None`` without ``cross``), converted to
        float64 :data:`CHUNK_BYTES` at a time."""
        step = max(1, CHUNK_BYTES // (16 * self.cols))
        for start in range(0, q_rows.shape[0], step):
            q = q_rows[start:start + step].double()
            self.h.addmm_(q.T, q)
            if self.k is not None:
                self.k.addmm_((fp_rows[start:start + step].double() - q).T, q)
        self.count += q_rows.shape[0]

    def merged(self, other: "PairedMoments") -> "PairedMoments":
        """The moments of both sets of rows."""
        out = PairedMoments(self.cols, cross=self.k is not None)
        out.h, out.count = self.h + other.h, self.count + other.count
        if out.k is not None:
            out.k = self.k + other.k
        return out

    def update_conv(self, fp_x: torch.Tensor | None, q_x: torch.Tensor, kernel: tuple[int, ...], *,
                    strides: tuple[int, ...], pads: tuple[int, ...], dilations: tuple[int, ...]) -> None:
        """Add the input patches (:func:`~bayesq_onnx.bayes.layerwise.conv_patches`, one group) of an
        ungrouped convolution over ``x [B, C, spatial…]``, a few items at a time."""
        conv = dict(strides=tuple(strides), pads=tuple(pads), dilations=tuple(dilations))
        positions = max(1, conv_positions(tuple(q_x.shape[2:]), tuple(kernel), **conv))
        step = max(1, CHUNK_BYTES // (16 * positions * self.cols))
        for start in range(0, q_x.shape[0], step):
            q = conv_patches(q_x[start:start + step].double(), kernel, groups=1, **conv)[:, 0]
            f = None if fp_x is None else conv_patches(fp_x[start:start + step].double(), kernel, groups=1, **conv)[:, 0]
            self.update(f, q)


def dampened(h_sum: torch.Tensor, count: int, relative: float) -> torch.Tensor:
    """``H = Σ x̃x̃ᵀ / n + δ·mean diag(Σ x̃x̃ᵀ / n)·I`` (float64); a column no input ever reaches gets a unit
    diagonal (its weight has no effect, so any code serves)."""
    h = h_sum / max(count, 1)
    dead = torch.diagonal(h) <= 0
    mean_diag = float(torch.diagonal(h)[~dead].mean()) if bool((~dead).any()) else 1.0
    h = h + relative * mean_diag * torch.eye(h.shape[0], dtype=h.dtype)
    h[dead, dead] = 1.0
    return h


def fp_output_target(w2: torch.Tensor, h: torch.Tensor, k_sum: torch.Tensor, count: int) -> torch.Tensor:
    """``W* = W + W K H⁻¹`` (module docstring) for the canonical ``w2 [rows, cols]``, with ``h`` the dampened
    ``H̃`` (:func:`dampened`) and ``k_sum = Σ (x − x̃) x̃ᵀ`` over ``count`` rows; float32."""
    chol = torch.linalg.cholesky(h)
    wk = w2.double() @ (k_sum / max(count, 1))                     # [rows, cols]
    return (w2.double() + torch.cholesky_solve(wk.T.contiguous(), chol).T).float()
