"""Per-op gradients from what a tap records, an op's (activation, output gradient) pairs: per-item weight
gradients in the op's frame (linear and 1-D/2-D convolutions in closed form, any other op by per-item
vector-Jacobian products) and the K-FAC token factors. Pure torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..traced import ConvSpec, WeightOp


def per_item(op: WeightOp, weight: torch.Tensor, calls: list, args: tuple = (), need_grads: bool = True,
             need_tokens: bool = False):
    """Per-item gradient ``[B, out, in']`` of ``op``'s weight in its frame (``weight``: linear ``[out, in]``),
    summed over the op's ``calls`` (activation, output gradient) of one backward pass (``None`` unless
    ``need_grads``), and, with ``need_tokens``, the K-FAC tokens of every call: inputs ``[in', N]``, one column
    per token (``N`` = items × positions), and output gradients ``[B, out, positions]``. ``args``: a generic
    op's call arguments (its gradient is a per-item vector-Jacobian product)."""
    grads, tokens = None, []
    for x, d in calls:
        if op.kind == "generic":
            g = vjp_per_item(op, weight, args, x, d) if need_grads else None
        elif op.kind == "linear":
            a, dd = items_first(x, op.item_axis).float(), items_first(d, op.item_axis).float()
            a = a.reshape(a.shape[0], -1, a.shape[-1])                  # [B, T, in]
            dd = dd.reshape(dd.shape[0], -1, dd.shape[-1])              # [B, T, out]
            g = torch.einsum("bto,bti->boi", dd, a) if need_grads else None
            if need_tokens:
                tokens.append((a.reshape(-1, a.shape[-1]).T, dd.transpose(1, 2)))
        else:  # conv: unfold input patches; groups handled by splitting channels
            x4 = x if x.dim() == 4 else x.unsqueeze(2)
            d4 = d if d.dim() == 4 else d.unsqueeze(2)
            patches = conv_patches(x4.float(), weight.shape[2:], op.conv)             # [B, C·kk, L]
            groups = op.conv.groups
            b, ckk, L = patches.shape
            out = d4.shape[1]
            g = None
            if need_grads:
                pg = patches.reshape(b, groups, ckk // groups, L)
                dg = d4.float().reshape(b, groups, out // groups, -1)                  # [B, g, out_g, L]
                g = torch.einsum("bgol,bgil->bgoi", dg, pg).reshape(b, out, -1)
            if need_tokens and groups == 1:  # K-FAC factors only for ungrouped convs (see laplace._allocate)
                tokens.append((patches.transpose(0, 1).reshape(ckk, -1), d4.float().reshape(b, out, -1)))
        if g is not None:
            grads = g if grads is None else grads + g
    return grads, tokens


def items_first(t: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``t`` with its item axis first; with no item axis (merged by the exporter), one row per item."""
    if axis is None:
        return t.reshape(-1, 1, t.shape[-1])
    return t.movedim(axis, 0) if axis else t


def vjp_per_item(op: WeightOp, weight: torch.Tensor, args: tuple, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per-item gradient of an op with no closed form, called with ``args``: ``∂⟨op(x_i, W), δ_i⟩/∂W`` for
    each item ``i``, flattened in the frame ``[B, out, numel/out]``."""
    axis = op.item_axis or 0
    out_axis = op.out_item_axis if op.out_item_axis is not None else axis
    _, w0 = op.operands(args)
    grads = []
    with torch.enable_grad():
        w = w0.detach().float().requires_grad_()
        for i in range(x.shape[axis]):
            xi = x.narrow(axis, i, 1).float()
            out = op.call(xi, w, args)
            grads.append(torch.autograd.grad(out, w, d.narrow(out_axis, i, 1).float())[0])
    g = torch.stack(grads)
    return g.reshape(g.shape[0], weight.shape[0], -1)


def conv_patches(x4: torch.Tensor, kernel, conv: ConvSpec) -> torch.Tensor:
    """``F.unfold`` of a 1-D/2-D convolution's input, ``[B, C·kk, L]`` (a 1×1 kernel without padding needs no
    unfold: its patches are the strided input itself, the same values)."""
    two = lambda v: tuple(v) if len(v) == 2 else (1, v[0])  # noqa: E731 - 1-D as 2-D with unit height
    k, st, dl = two(tuple(kernel)), two(conv.stride), two(conv.dilation)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            pad = (0, 0)
        else:  # "same": PyTorch pads (total // 2) before and the rest after
            total = [d * (kk - 1) for d, kk in zip(dl, k)]
            x4 = F.pad(x4, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
            pad = (0, 0)
    else:
        pad = tuple(conv.padding) if len(conv.padding) == 2 else (0, conv.padding[0])
    if k == (1, 1) and pad == (0, 0):
        return x4[:, :, ::st[0], ::st[1]].reshape(x4.shape[0], x4.shape[1], -1)
    return F.unfold(x4, k, dilation=dl, padding=pad, stride=st)


def add_gram(acc: torch.Tensor, p: torch.Tensor) -> None:
    """``acc += p pᵀ`` for ``p [n, N]``, computed on and above the diagonal only, in row blocks (about
    half the work of the full product; :func:`symmetric` fills the lower triangle at the end)."""
    n = p.shape[0]
    blocks = max(1, min(8, n // 128))
    edges = [n * i // blocks for i in range(blocks + 1)]
    for r0, r1 in zip(edges[:-1], edges[1:]):
        acc[r0:r1, r0:].addmm_(p[r0:r1], p[r0:].T)


def symmetric(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is that of ``upper``."""
    return torch.triu(upper) + torch.triu(upper, 1).T
