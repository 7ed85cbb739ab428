"""Laplace posterior over the weights of Linear, Conv and Embedding layers, fitted on calibration data.

Posterior ``N(μ, Λ⁻¹)`` with ``μ`` the trained weights and precision ``Λ = N·F + τ`` (DESIGN §3.1):

* ``F`` is the Fisher / GGN, the mean over calibration items of ``g gᵀ`` where ``g`` is one item's gradient
  of the log-likelihood with the target **sampled from the model's own predictive** (true Fisher; no labels):
  a categorical output draws ``y ~ softmax(logits)``; a Gaussian (embedding, regression) output backprops
  ``⟨h, ε⟩`` with ``ε ~ N(0, I)``, whose expected outer product is the GGN ``JᵀJ``. With ``fisher="empirical"``
  the given labels replace the samples.
* ``N`` is the effective data size (default: the number of calibration items) and ``τ`` the prior precision,
  by default chosen per layer by empirical Bayes: MacKay's evidence fixed point ``τ = γ / ‖μ‖²`` with
  ``γ = Σ_i N·F_ii / (N·F_ii + τ)`` the number of parameters the data determine (started from
  ``1 / Var(w_layer)``).
* A Gaussian output's noise variance ``σ²`` (the GGN is ``JᵀJ / σ²``) is by default the output's own
  per-dimension variance over the calibration items (empirical Bayes for the likelihood scale): an embedding
  whose coordinates spread by ``σ`` is hurt by an output change of ``σ``, not by one of size 1.

Per-item gradients come from hooks on each layer's input ``a`` and output gradient ``δ`` (for a Linear,
``g_item = Σ_tokens δ ⊗ a``), so the cost is one backward pass per batch and target sample, not one per weight.
Three curvature forms:

* ``diag``: ``F_ii`` exactly, from per-item gradients squared;
* ``kfac``: ``F ≈ A ⊗ G`` per layer with ``A = mean_tokens a aᵀ`` (the input second moment, GPTQ's H) and
  ``G = mean_items Σ_tokens δ δᵀ`` (K-FAC "expand"); Conv layers use unfolded patches;
* ``lowrank``: ``F ≈ diag + U Uᵀ`` with ``U`` the top-k directions of the per-item gradients, found by a
  randomized range finder (a sketch ``Y = Σ g ωᵀ`` in one pass, then the projection ``Qᵀ g`` in a second
  pass with the same target samples).

Embedding tables get the diagonal only, from per-token gradients (repeats of a token within one item are
treated as independent: the cross term is dropped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

CURVATURES = ("diag", "kfac", "lowrank")
FISHERS = ("true", "empirical")
LIKELIHOODS = ("gaussian", "categorical")


@dataclass
class LayerPosterior:
    """Posterior of one parameter, in the parameter's own (PyTorch) layout."""

    parameter: str
    fisher_diag: torch.Tensor            # F_ii, parameter shape
    prior_precision: float               # τ
    n_data: float                        # N
    A: torch.Tensor | None = None        # K-FAC input factor [in', in'] (Conv: in·k… in unfold order)
    G: torch.Tensor | None = None        # K-FAC output factor [out, out]
    U: torch.Tensor | None = None        # low-rank directions of F, [numel, k] (flattened parameter layout)
    info: dict = field(default_factory=dict)

    def precision_diag(self) -> torch.Tensor:
        """diag Λ = N·F_ii + τ."""
        return self.n_data * self.fisher_diag + self.prior_precision


@dataclass
class _Layer:
    name: str
    module: torch.nn.Module
    kind: str                            # linear | conv | embedding
    fisher: torch.Tensor
    A: torch.Tensor | None = None
    G: torch.Tensor | None = None
    tokens: int = 0
    sketch: torch.Tensor | None = None   # Y = Σ g ωᵀ  [numel, k']
    Q: torch.Tensor | None = None        # orthonormal range basis after the first pass
    proj: list = field(default_factory=list)
    calls: list = field(default_factory=list)   # (input, δ) per call in the current backward


def fit_laplace(
    module: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    parameters: Iterable[str],
    *,
    input_names: list[str],
    likelihood: str = "gaussian",
    fisher: str = "true",
    targets: list[torch.Tensor] | None = None,
    curvature: str = "diag",
    rank: int = 8,
    samples: int = 1,
    n_data: float | None = None,
    prior_precision: float | None = None,
    output_noise: float | None = None,
    seed: int = 0,
    progress: Callable | None = None,
) -> dict[str, LayerPosterior]:
    """Fit the posterior of each named parameter (its module must be Linear, Conv1d/2d or Embedding)."""
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}; expected one of {CURVATURES}")
    if fisher not in FISHERS or likelihood not in LIKELIHOODS:
        raise ValueError(f"fisher must be one of {FISHERS} and likelihood one of {LIKELIHOODS}")
    if fisher == "empirical" and targets is None:
        raise ValueError("the empirical Fisher needs labels (targets) for the calibration batches")
    layers = _layers(module, parameters, curvature)
    hooks = [_hook(layer) for layer in layers.values()]
    items = sum(int(b[input_names[0]].shape[0]) for b in batches)
    outputs: list[torch.Tensor] = []
    was_training = module.training
    module.eval()
    try:
        passes = 2 if curvature == "lowrank" else 1
        for pass_index in range(passes):
            if pass_index == 1:
                for layer in layers.values():
                    if layer.sketch is not None:
                        layer.Q = torch.linalg.qr(layer.sketch).Q
                        layer.sketch = None
            wrapped = progress(batches, pass_index) if progress else batches
            for bi, batch in enumerate(wrapped):
                gen = torch.Generator().manual_seed(seed * 1_000_003 + bi)  # same targets in both passes
                inputs = [batch[n] for n in input_names]
                with torch.enable_grad():
                    out = module(*inputs)
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    if pass_index == 0:
                        outputs.append(out.detach().float().reshape(out.shape[0], -1))
                    for s in range(samples):
                        for layer in layers.values():
                            layer.calls.clear()
                        loss = _pseudo_loss(out, likelihood, fisher, targets[bi] if targets else None, gen)
                        module.zero_grad(set_to_none=True)
                        loss.backward(retain_graph=s < samples - 1)
                        for layer in layers.values():
                            _accumulate(layer, curvature, pass_index, rank, gen)
    finally:
        for h in hooks:
            h.remove()
        module.zero_grad(set_to_none=True)
        module.train(was_training)

    n = float(n_data) if n_data is not None else float(items)
    noise = 1.0
    if likelihood == "gaussian":
        noise = float(output_noise) if output_noise is not None else max(float(torch.cat(outputs).var(dim=0).mean()), 1e-12)
    result = {}
    for name, layer in layers.items():
        w = layer.module.weight.detach().float()
        A = G = None
        if curvature == "kfac" and layer.A is not None:
            A = layer.A / max(layer.tokens, 1)
            G = layer.G / (items * samples * noise)
            # K-FAC "expand": F ≈ G ⊗ A, so its diagonal is diag(G) ⊗ diag(A) (no per-item gradients needed)
            fisher_diag = (torch.diag(G)[:, None] * torch.diag(A)[None, :]).reshape(layer.fisher.shape)
        else:
            fisher_diag = layer.fisher / (items * samples * noise)
        tau = float(prior_precision) if prior_precision is not None else evidence_prior_precision(w, n * fisher_diag)
        post = LayerPosterior(name, fisher_diag, tau, n, A=A, G=G,
                              info={"items": items, "samples": samples, "likelihood": likelihood,
                                    "fisher": fisher, "curvature": curvature, "kind": layer.kind,
                                    "output_noise_var": noise})
        if curvature == "lowrank" and layer.proj:
            b = torch.cat(layer.proj, dim=1)                        # [k', items·samples]
            u_small, sing, _ = torch.linalg.svd(b, full_matrices=False)
            k = min(rank, sing.numel())
            post.U = layer.Q @ (u_small[:, :k] * (sing[:k] / (items * samples * noise) ** 0.5))
        result[name] = post
    return result


def evidence_prior_precision(w: torch.Tensor, data_precision: torch.Tensor, iters: int = 100) -> float:
    """Empirical-Bayes prior precision of one layer (MacKay 1992): the fixed point of
    ``τ = γ / ‖w‖²``, ``γ = Σ_i λ_i / (λ_i + τ)`` with ``λ_i = N·F_ii``, started at ``1 / Var(w)``."""
    sq = float((w.double() ** 2).sum())
    lam = data_precision.double().reshape(-1)
    tau = 1.0 / max(float(w.double().var()), 1e-12)
    for _ in range(iters):
        gamma = float((lam / (lam + tau)).sum())
        new = max(gamma / max(sq, 1e-30), 1e-12)
        if abs(new - tau) <= 1e-6 * tau:
            return new
        tau = new
    return tau


def _layers(module: torch.nn.Module, parameters: Iterable[str], curvature: str) -> dict[str, _Layer]:
    layers = {}
    for pname in parameters:
        mod_name, _, leaf = pname.rpartition(".")
        sub = module.get_submodule(mod_name) if mod_name else module
        if leaf != "weight":
            raise ValueError(f"{pname}: only layer weights get a posterior")
        if isinstance(sub, torch.nn.Linear):
            kind = "linear"
        elif isinstance(sub, (torch.nn.Conv1d, torch.nn.Conv2d)):
            kind = "conv"
        elif isinstance(sub, torch.nn.Embedding):
            kind = "embedding"
        else:
            raise ValueError(f"{pname}: no posterior for {type(sub).__name__} layers")
        w = sub.weight
        layer = _Layer(pname, sub, kind, torch.zeros_like(w, dtype=torch.float32))
        if curvature == "kfac" and kind != "embedding":
            cols = w[0].numel()
            layer.A = torch.zeros(cols, cols)
            layer.G = torch.zeros(w.shape[0], w.shape[0])
        layers[pname] = layer
    return layers


def _hook(layer: _Layer):
    def forward_hook(mod, args, output):
        x = args[0].detach()
        if output.requires_grad:
            output.register_hook(lambda grad: layer.calls.append((x, grad.detach())))
    return layer.module.register_forward_hook(forward_hook)


def _pseudo_loss(out: torch.Tensor, likelihood: str, fisher: str, target, gen: torch.Generator) -> torch.Tensor:
    """Sum over items of the log-likelihood whose gradient is one Fisher sample per item."""
    out = out.float()
    if likelihood == "categorical":
        logits = out.reshape(-1, out.shape[-1])
        if fisher == "empirical":
            y = target.reshape(-1).long()
        else:
            y = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1, generator=gen).squeeze(-1)
        return F.cross_entropy(logits, y, reduction="sum")
    if fisher == "empirical":
        return 0.5 * ((out - target.float()) ** 2).sum()
    eps = torch.randn(out.shape, generator=gen)
    return (out * eps).sum()


def _per_item(layer: _Layer, need_grads: bool = True):
    """Per-item gradient [B, out, in'] (summed over the calls of a layer; ``None`` unless ``need_grads``)
    and the (a, δ) token matrices of every call."""
    grads, tokens = None, []
    for x, d in layer.calls:
        mod = layer.module
        if layer.kind == "linear":
            a = x.reshape(x.shape[0], -1, x.shape[-1]).float()          # [B, T, in]
            dd = d.reshape(d.shape[0], -1, d.shape[-1]).float()         # [B, T, out]
            g = torch.einsum("bto,bti->boi", dd, a) if need_grads else None
        else:  # conv: unfold input patches; groups handled by splitting channels
            x4 = x if x.dim() == 4 else x.unsqueeze(2)
            d4 = d if d.dim() == 4 else d.unsqueeze(2)
            k = mod.kernel_size if len(mod.kernel_size) == 2 else (1, mod.kernel_size[0])
            pad = mod.padding if isinstance(mod.padding, tuple) and len(mod.padding) == 2 else (0, mod.padding[0])
            st = mod.stride if len(mod.stride) == 2 else (1, mod.stride[0])
            dl = mod.dilation if len(mod.dilation) == 2 else (1, mod.dilation[0])
            patches = F.unfold(x4.float(), k, dilation=dl, padding=pad, stride=st)   # [B, C·kk, L]
            groups = mod.groups
            b, ckk, L = patches.shape
            pg = patches.reshape(b, groups, ckk // groups, L)
            dg = d4.float().reshape(b, groups, d4.shape[1] // groups, -1)            # [B, g, out_g, L]
            g = torch.einsum("bgol,bgil->bgoi", dg, pg).reshape(b, d4.shape[1], -1) if need_grads else None
            # K-FAC factors only for ungrouped convs (a grouped conv's A is block-diagonal)
            a = patches.transpose(1, 2) if groups == 1 else None                  # [B, L, C·kk]
            dd = d4.float().reshape(b, d4.shape[1], -1).transpose(1, 2)           # [B, L, out]
        if g is not None:
            grads = g if grads is None else grads + g
        tokens.append((a, dd))
    return grads, tokens


def _accumulate(layer: _Layer, curvature: str, pass_index: int, rank: int, gen: torch.Generator) -> None:
    if not layer.calls:
        return
    if layer.kind == "embedding":  # diagonal only, from per-token gradients
        if pass_index == 0:
            for ids, d in layer.calls:
                d2 = d.reshape(-1, d.shape[-1]).float() ** 2
                layer.fisher.index_add_(0, ids.reshape(-1), d2)
        return
    kfac = curvature == "kfac" and layer.A is not None
    g, tokens = _per_item(layer, need_grads=not kfac)  # K-FAC needs only the token factors
    flat = g.reshape(g.shape[0], -1) if g is not None else None        # [B, numel]
    if pass_index == 0:
        if g is not None:
            layer.fisher += (g * g).sum(dim=0).reshape(layer.fisher.shape)
        if kfac:
            for a, dd in tokens:
                if a is None:
                    continue
                a2 = a.reshape(-1, a.shape[-1])
                layer.A += a2.T @ a2
                layer.tokens += a2.shape[0]
                d2 = dd.reshape(-1, dd.shape[-1])
                layer.G += d2.T @ d2
        if curvature == "lowrank":
            width = rank + 8  # oversampling makes the range finder accurate for the top `rank` directions
            omega = torch.randn(flat.shape[0], width, generator=gen)
            sketch = flat.T @ omega
            layer.sketch = sketch if layer.sketch is None else layer.sketch + sketch
    else:
        layer.proj.append(layer.Q.T @ flat.T)                           # [k', B]
