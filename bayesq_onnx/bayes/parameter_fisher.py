"""The diagonal Laplace posterior of parameters no traced op reads on its own, by autograd through the whole
program (:func:`fit_parameter_fisher`): the fallback of :mod:`bayesq_onnx.bayes.laplace` for weights held
inside an op it has no tap for, on the same scale as its ``diag`` form."""

from __future__ import annotations

from typing import Callable

import torch

from .empirical_bayes import OutputMoments, evidence_prior_precision
from .laplace import CalibrationData, LaplaceOptions, LayerPosterior, fisher_scales, item_rows
from .likelihood import BatchDraws, pseudo_loss


def fit_parameter_fisher(program: torch.nn.Module, parameters: list[str], data: CalibrationData,
                         options: LaplaceOptions = LaplaceOptions(), progress: Callable | None = None
                         ) -> dict[str, LayerPosterior]:
    """Diagonal Laplace posterior of parameters that no traced op reads on its own (a recurrent op's weights,
    which ``torch.export`` keeps inside ``aten.gru``/``aten.lstm``; any weight the program computes with in
    an op :mod:`bayesq_onnx.traced` has no tap for), by autograd through the whole program.

    The same posterior as :func:`~bayesq_onnx.bayes.laplace.fit_laplace`'s ``diag`` form, on the same scale: the true Fisher
    ``F_ii = Σ_items Σ_samples g_i² / (items · samples · σ²)`` where ``g`` is one item's gradient of the
    same pseudo log-likelihood (:func:`~bayesq_onnx.bayes.likelihood.pseudo_loss`, targets drawn from the
    model's own predictive with each batch's generator seeded as :func:`~bayesq_onnx.bayes.laplace.accumulate_statistics` seeds it, or
    the labels), ``σ²`` the Gaussian output's variance over the calibration items (1 for a categorical
    output), ``N`` the calibration items (or ``n_data``) and ``τ`` the per-parameter evidence fixed point
    (or ``prior_precision``). Per-item gradients need one backward per item (a loop over items, not over
    weights): the square of a batch's summed gradient would add the cross terms between items, which the
    Fisher does not have. ``curvature`` kfac and lowrank take this diagonal too (no factors without taps).
    """
    named = dict(program.named_parameters())
    params = [named[p] for p in parameters]
    flags = [p.requires_grad for p in params]
    sums = [torch.zeros(p.shape, dtype=torch.float32) for p in params]
    outputs = OutputMoments(needed=data.likelihood == "gaussian" and options.output_noise is None)
    try:
        for p in params:
            p.requires_grad_(True)
        for bi, batch in enumerate(progress(data.batches) if progress else data.batches):
            inputs = [batch[n] for n in data.input_names]
            gen = torch.Generator().manual_seed(options.seed * 1_000_003 + bi)
            size = int(inputs[0].shape[0])
            draws = BatchDraws(gen, size)
            target = data.targets[bi] if data.targets else None
            for i in range(size):
                rows = slice(i, i + 1)
                part = [item_rows(x, rows, size) for x in inputs]
                with torch.enable_grad():
                    out = program(*part)
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    outputs.append(out.detach().float())
                    for s in range(options.samples):
                        loss = pseudo_loss(out, data.likelihood, options.fisher,
                                           item_rows(target, rows, size) if target is not None else None, draws, s, rows)
                        grads = torch.autograd.grad(loss, params, retain_graph=s < options.samples - 1,
                                                    allow_unused=True)
                        for acc, g in zip(sums, grads):
                            if g is not None:
                                acc += g.detach().float() ** 2
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    n, noise, count = fisher_scales(data, options, outputs)
    result = {}
    for name, p, acc in zip(parameters, params, sums):
        w = p.detach().float().clone()
        fisher_diag = acc / count
        tau = float(options.prior_precision) if options.prior_precision is not None \
            else evidence_prior_precision(w, n * fisher_diag)
        result[name] = LayerPosterior(name, fisher_diag, tau, n,
                                      info={"items": data.items, "samples": options.samples,
                                            "likelihood": data.likelihood, "fisher": options.fisher,
                                            "curvature": "diag", "kind": "parameter",
                                            "output_noise_var": noise, "op": "whole model"},
                                      weight=w, op="whole model")
    return result
