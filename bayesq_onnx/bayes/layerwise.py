"""Layer-wise Gaussian likelihood: the posterior of a weight matrix from its input activations alone.

Used when there is no PyTorch model to differentiate (an ``onnx:`` input). Each layer is treated as a
regression of its own output, ``y = W x + ε`` with ``ε ~ N(0, σ² I)``, so for the canonical ``[rows, cols]``
weight the Fisher of the ``N`` data items is exactly Kronecker-factored:

    Λ = N · (G ⊗ A) + τ,    A = E[x xᵀ] (over tokens / conv patches),    G = I / σ²

``A`` is GPTQ's Hessian; ``σ²`` is set by empirical Bayes to the layer output's mean per-coordinate variance,
``σ² = mean_j Var(y_j) = mean_j (w_jᵀ A w_j − (w_j·m)²)`` with ``m = E[x]``, so a change of one output
standard deviation costs the same in every layer (the same rule the PyTorch path uses for a Gaussian output).
``τ`` is MacKay's evidence fixed point (:func:`~bayesq_onnx.bayes.empirical_bayes.evidence_prior_precision`).
Pure torch: nothing here knows about ONNX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .empirical_bayes import evidence_prior_precision


def conv_patches(x: torch.Tensor, kernel: tuple[int, ...], *, strides: tuple[int, ...], pads: tuple[int, ...],
                 dilations: tuple[int, ...], groups: int = 1) -> torch.Tensor:
    """Input patches of a 1-D or 2-D convolution as rows ``[B·L, groups, k… · C/groups]``.

    ``x`` is ``[B, C, spatial…]``; ``pads`` follows ONNX (all begins, then all ends). Columns are ordered
    kernel taps first, input channel (within the group) last — the canonical column order of a Conv weight
    (:class:`~bayesq_onnx.quant.layout.WeightLayout`), so for one group ``patches @ W_canonicalᵀ`` is the
    convolution.
    """
    nd = len(kernel)
    if nd not in (1, 2) or x.dim() != nd + 2:
        raise ValueError(f"conv patches for 1-D and 2-D convolutions only, got kernel {kernel} and input {tuple(x.shape)}")
    if nd == 1:  # treat as 2-D with a unit height
        x, kernel, strides, dilations = x.unsqueeze(2), (1, *kernel), (1, *strides), (1, *dilations)
        pads = (0, pads[0], 0, pads[1])
    c = x.shape[1]
    if kernel == (1, 1) and not any(pads):  # pointwise: the strided input itself, no im2col
        x = x[:, :, ::strides[0], ::strides[1]]
        b, length = x.shape[0], x.shape[2] * x.shape[3]
        return x.reshape(b, groups, c // groups, length).permute(0, 3, 1, 2).reshape(b * length, groups, c // groups)
    # F.pad takes (last-dim begin, last-dim end, previous-dim begin, previous-dim end)
    x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
    patches = F.unfold(x, kernel, dilation=dilations, stride=strides)          # [B, C·kh·kw, L] (c-major)
    b, _, length = patches.shape
    taps = kernel[0] * kernel[1]
    patches = patches.reshape(b, groups, c // groups, taps, length).permute(0, 4, 1, 3, 2)  # [B, L, g, taps, C/g]
    return patches.reshape(b * length, groups, taps * (c // groups))


def conv_positions(spatial: tuple[int, ...], kernel: tuple[int, ...], *, strides: tuple[int, ...],
                   pads: tuple[int, ...], dilations: tuple[int, ...]) -> int:
    """Output positions per item of a convolution over an input of ``spatial`` size (ONNX ``pads``)."""
    nd = len(kernel)
    out = 1
    for i, (size, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations)):
        out *= max((size + pads[i] + pads[nd + i] - d * (k - 1) - 1) // s + 1, 0)
    return out


CHUNK_BYTES = 32 << 20
"""Float64 working set of one step of a moment update: the rows (or conv patches) are converted and
accumulated this many bytes at a time, so the peak does not grow with the batch."""


@dataclass
class InputMoments:
    """Running first and second moments of a layer's input rows (float64), per channel group.

    An ungrouped layer keeps the full ``Σ x xᵀ``; a grouped convolution (each output row reads one group's
    input channels) keeps the diagonal per group, ``[groups, cols]``.
    """

    cols: int
    groups: int = 1

    def __post_init__(self):
        self.diagonal_only = self.groups > 1
        self._total = torch.zeros(self.groups, self.cols, dtype=torch.float64)
        self._outer = torch.zeros((self.groups, self.cols) if self.diagonal_only else (self.cols, self.cols),
                                  dtype=torch.float64)
        self._images: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # grouped conv: geometry → (Σ x, Σ x²)
        self.count = 0

    def update(self, rows: torch.Tensor) -> None:
        """Add input rows ``[tokens, cols]`` (grouped: ``[tokens, groups, cols]``), converted to float64
        :data:`CHUNK_BYTES` at a time."""
        r = rows.reshape(-1, self.groups, self.cols)
        step = max(1, CHUNK_BYTES // (8 * self.groups * self.cols))
        for start in range(0, r.shape[0], step):
            c = r[start:start + step].double()
            self._total += c.sum(0)
            if self.diagonal_only:
                self._outer += (c * c).sum(0)
            else:
                self._outer.addmm_(c[:, 0].T, c[:, 0])
        self.count += r.shape[0]

    def update_conv(self, x: torch.Tensor, kernel: tuple[int, ...], *, strides: tuple[int, ...],
                    pads: tuple[int, ...], dilations: tuple[int, ...]) -> None:
        """Add the input patches of a convolution over ``x [B, C, spatial…]`` (the rows :func:`conv_patches`
        gives, with ``groups`` = this accumulator's) without holding all of them at once.

        Ungrouped: the items' patches in float64, :data:`CHUNK_BYTES` at a time. Grouped (diagonal moments):
        no patches per item at all. Patch extraction is linear and only selects entries (or the zero padding),
        so ``Σ_items Σ_positions patch`` and ``Σ patch²`` are the patches of ``Σ_items x`` and ``Σ_items x²``
        summed over positions: the running sums of ``x`` and ``x²`` (one image each, per input geometry) are
        kept, and turned into patches once, when the moments are read.
        """
        conv = dict(strides=tuple(strides), pads=tuple(pads), dilations=tuple(dilations))
        items = x.shape[0]
        positions = conv_positions(tuple(x.shape[2:]), tuple(kernel), **conv)
        if items == 0:
            return
        if self.diagonal_only:
            key = (tuple(x.shape[1:]), tuple(kernel), tuple(sorted(conv.items())))
            if key not in self._images:
                self._images[key] = (torch.zeros((1, *x.shape[1:]), dtype=torch.float64),
                                     torch.zeros((1, *x.shape[1:]), dtype=torch.float64))
            s1, s2 = self._images[key]
            step = max(1, CHUNK_BYTES // (2 * 8 * x[0].numel()))
            for start in range(0, items, step):
                c = x[start:start + step].double()
                s1 += c.sum(0, keepdim=True)
                s2 += (c * c).sum(0, keepdim=True)
        else:
            step = max(1, CHUNK_BYTES // (8 * positions * self.cols))
            for start in range(0, items, step):
                p = conv_patches(x[start:start + step].double(), kernel, groups=1, **conv)[:, 0]
                self._total += p.sum(0)
                self._outer.addmm_(p.T, p)
        self.count += items * positions

    def _flush(self) -> None:
        """Turn the grouped convolutions' pending image sums into patch moments (see :meth:`update_conv`)."""
        for (_, kernel, conv), (s1, s2) in self._images.items():
            self._total += conv_patches(s1, kernel, groups=self.groups, **dict(conv)).sum(0)
            self._outer += conv_patches(s2, kernel, groups=self.groups, **dict(conv)).sum(0)
        self._images.clear()

    @property
    def total(self) -> torch.Tensor:
        """Σ x, ``[groups, cols]``."""
        self._flush()
        return self._total

    @property
    def outer(self) -> torch.Tensor:
        """Σ x xᵀ ``[cols, cols]``; grouped: its diagonal per group, ``[groups, cols]``."""
        self._flush()
        return self._outer

    @property
    def mean(self) -> torch.Tensor:
        """E[x], ``[groups, cols]``."""
        return self.total / max(self.count, 1)

    @property
    def second_moment(self) -> torch.Tensor:
        """A = E[x xᵀ] ``[cols, cols]``; grouped: its diagonal per group, ``[groups, cols]``."""
        return self.outer / max(self.count, 1)


@dataclass
class LayerwisePosterior:
    """Λ = N·(G ⊗ A) + τ for one canonical weight (``A`` is ``None`` when only its diagonal is kept)."""

    precision: torch.Tensor        # diag Λ, [rows, cols]
    A: torch.Tensor | None         # [cols, cols]
    G_diag: torch.Tensor           # [rows], all 1/σ²
    prior_precision: float
    output_noise_var: float


def layerwise_posterior(w: torch.Tensor, moments: InputMoments, n_data: float,
                        prior_precision: float | None = None) -> LayerwisePosterior:
    """Posterior precision of the canonical weight ``w [rows, cols]`` under the layer-wise Gaussian likelihood
    (module docstring), ``σ²`` by empirical Bayes and ``τ`` by the evidence fixed point unless given.

    Grouped layers (diagonal moments only): row ``r`` reads group ``r // (rows / groups)``, and ``E[y_r²]`` is
    taken as ``Σ_i w_ri² A_ii`` (the cross terms are not kept).
    """
    w64 = w.double()
    per_group = w.shape[0] // moments.groups
    mean = moments.mean.repeat_interleave(per_group, dim=0)                        # [rows, cols]
    if moments.diagonal_only:
        diag_a = moments.second_moment.repeat_interleave(per_group, dim=0)         # [rows, cols]
        energy = (w64 * w64 * diag_a).sum(1)
    else:
        second = moments.second_moment
        diag_a = torch.diagonal(second)[None, :].expand_as(w64)
        energy = ((w64 @ second) * w64).sum(1)
    variance = (energy - (w64 * mean).sum(1) ** 2).clamp_min(0)
    noise = max(float(variance.mean()), 1e-12)
    fisher_diag = diag_a / noise
    tau = float(prior_precision) if prior_precision is not None else evidence_prior_precision(w64, n_data * fisher_diag)
    A = None if moments.diagonal_only else moments.second_moment.float()
    return LayerwisePosterior((n_data * fisher_diag + tau).float(), A,
                              torch.full((w.shape[0],), 1.0 / noise), tau, noise)


def token_frequency_posterior(table: torch.Tensor, counts: torch.Tensor, n_data: float,
                              prior_precision: float | None = None) -> LayerwisePosterior:
    """Embedding table ``[V, D]`` read by lookups: row ``v`` is seen with frequency ``p_v = counts_v / Σ counts``,
    so under ``y = table[v] + ε`` the Fisher diagonal is ``p_v / σ²`` for every coordinate of the row, with
    ``σ²`` the table's mean per-coordinate variance."""
    t = table.double()
    freq = counts.double() / max(float(counts.sum()), 1.0)
    noise = max(float(t.var(dim=0).mean()), 1e-12)
    fisher_diag = (freq[:, None] / noise).expand_as(t)
    tau = float(prior_precision) if prior_precision is not None else evidence_prior_precision(t, n_data * fisher_diag)
    return LayerwisePosterior((n_data * fisher_diag + tau).float(), None, torch.full((t.shape[0],), 1.0 / noise),
                              tau, noise)


def common_scale(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The factor that puts layer-wise precisions on the Laplace scale: ``c = median_t mean(λᴸ_t) / mean(λᵂ_t)``
    over the tensors ``t`` that have both (Laplace ``λᴸ``, loss units; layer-wise ``λᵂ``, units of each
    layer's own output variance). The median keeps one odd layer from moving every other; with no pair, 1."""
    ratios = [float(lap.double().mean() / lw.double().mean()) for lap, lw in pairs
              if float(lw.double().mean()) > 0 and float(lap.double().mean()) > 0]
    return float(torch.tensor(ratios, dtype=torch.float64).median()) if ratios else 1.0


def conv_patches_nd(x: torch.Tensor, kernel: tuple[int, ...], *, strides: tuple[int, ...], pads: tuple[int, ...],
                    dilations: tuple[int, ...], groups: int = 1) -> torch.Tensor:
    """Input patches of a convolution of any spatial rank as rows ``[B·L, groups, k… · C/groups]``, columns
    ordered as :func:`conv_patches` orders them (kernel taps first, input channel within the group last).
    ``pads`` follows ONNX (all begins, then all ends); a negative pad crops. Built from ``Tensor.unfold``
    along each spatial axis (a window of ``d·(k−1)+1`` taken every ``stride``, then every ``d``-th tap)."""
    nd = len(kernel)
    if x.dim() != nd + 2:
        raise ValueError(f"a {nd}-D kernel needs a {nd + 2}-D input, got {tuple(x.shape)}")
    spec = []
    for i in reversed(range(nd)):  # F.pad: last axis first
        spec += [int(pads[i]), int(pads[nd + i])]
    x = F.pad(x, spec)
    for i, (k, s, d) in enumerate(zip(kernel, strides, dilations)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)
        if d > 1:
            x = x[..., ::d]
    b, c = x.shape[0], x.shape[1]
    length = math.prod(x.shape[2:2 + nd])
    taps = math.prod(kernel)
    # [B, C, L…, k…] -> [B, L, g, taps, C/g]
    x = x.reshape(b, groups, c // groups, length, taps).permute(0, 3, 1, 4, 2)
    return x.reshape(b * length, groups, taps * (c // groups))


def conv_transpose_patches(x: torch.Tensor, kernel: tuple[int, ...], *, strides: tuple[int, ...],
                           pads: tuple[int, ...], dilations: tuple[int, ...],
                           output_padding: tuple[int, ...]) -> torch.Tensor:
    """The patches a transposed convolution multiplies its weight by, as rows ``[B·L, k… · C]`` in the
    canonical column order of a ConvTranspose weight (taps, then input channel; ``WeightLayout.for_consumer``).

    ``ConvTranspose(x, W)`` is the direct convolution, stride 1 and the same dilation ``d``, of ``x``
    upsampled by its strides (``s − 1`` zeros between neighbours) and padded by ``d·(k−1) − pad`` at each
    end (plus ``output_padding`` at the end), with the kernel flipped: output ``o`` reads the upsampled input
    at ``o + t·d`` through tap ``k − 1 − t`` of ``W``. So ``y[o, j] = Σ_{t,i} patch_o[t, i] · W[i, j, k−1−t]``,
    and the patch columns, their taps reversed, are the weight's canonical columns; ``E[patch patchᵀ]`` is
    exactly the input factor of the layer-wise likelihood (per output channel, each in its own group).
    """
    nd = len(kernel)
    b, c, *spatial = x.shape
    up = x.new_zeros((b, c, *[(n - 1) * s + 1 for n, s in zip(spatial, strides)]))
    up[(slice(None), slice(None), *[slice(None, None, s) for s in strides])] = x
    full = [d * (k - 1) for k, d in zip(kernel, dilations)]
    pad = [f - p for f, p in zip(full, pads[:nd])] + [f - p + o for f, p, o in zip(full, pads[nd:], output_padding)]
    p = conv_patches_nd(up, kernel, strides=(1,) * nd, pads=tuple(pad), dilations=dilations)[:, 0]
    p = p.reshape(p.shape[0], *kernel, c).flip(tuple(range(1, nd + 1)))
    return p.reshape(p.shape[0], -1)
