"""Laplace posterior over every weight a traced program's linear, matmul, convolution and embedding ops
consume (:mod:`bayesq_onnx.traced`), fitted on calibration data.

Posterior ``N(μ, Λ⁻¹)`` with ``μ`` the trained weights and precision ``Λ = N·F + τ`` (docs/design.md §3.1):

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

Per-item gradients come from taps on each op's input ``a`` and output gradient ``δ`` (for a linear op,
``g_item = Σ_tokens δ ⊗ a``), so the cost is one backward pass per batch and target sample, not one per weight.
An op whose activation has no axis of its own for the calibration items (the exporter merged it with the
tokens) takes each row as an item (the cross-token terms of ``g gᵀ`` are dropped, as K-FAC's "expand" does).
Ops with no closed form (transposed and 3-D convolutions) take per-item vector-Jacobian products.
Three curvature forms:

* ``diag``: ``F_ii`` exactly, from per-item gradients squared;
* ``kfac``: ``F ≈ A ⊗ G`` per layer with ``A = mean_tokens a aᵀ`` (the input second moment, GPTQ's H) and
  ``G = mean_items Σ_tokens δ δᵀ`` (K-FAC "expand"); Conv layers use unfolded patches. By default only
  ``diag G`` is accumulated (``G`` is returned as that diagonal matrix): the posterior metric uses the output
  factor only to weigh rows (docs/design.md §3.2), and the full matrix would cost a second Gram product per layer
  (``kfac_output="full"`` computes it). Where fewer tokens than ``A`` has columns reach a layer, ``A`` is the
  posterior mean under a prior centred on its diagonal (:func:`~bayesq_onnx.bayes.empirical_bayes.shrink_to_diagonal`).
  Grouped/depthwise convs take the exact diagonal instead;
* ``lowrank``: ``F ≈ diag + U Uᵀ`` with ``U`` the top-k directions of the per-item gradients, found by a
  randomized range finder (a sketch ``Y = Σ g ωᵀ`` in one pass, then the projection ``Qᵀ g`` in a second
  pass with the same target samples).

Embedding tables get the diagonal only, from per-token gradients (repeats of a token within one item are
treated as independent: the cross term is dropped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch.fx as fx

import torch

from ..choices import CURVATURES, FISHERS
from ..traced import WeightOp, insert_taps, remove_taps, weight_ops
from .empirical_bayes import OutputMoments, evidence_prior_precision, shrink_to_diagonal
from .likelihood import LIKELIHOODS, BatchDraws, pseudo_loss
from .op_gradients import add_gram, per_item, symmetric

@dataclass
class LayerPosterior:
    """Posterior of one parameter, in the parameter's own (PyTorch) layout."""

    parameter: str                       # the op's weight parameter, or the op's name for a computed weight
    fisher_diag: torch.Tensor            # F_ii, in the frame of `weight`
    prior_precision: float               # τ
    n_data: float                        # N
    A: torch.Tensor | None = None        # K-FAC input factor [in', in'] (Conv: in·k… in unfold order)
    G: torch.Tensor | None = None        # K-FAC output factor: its diagonal [out], or [out, out] (kfac_output="full")
    U: torch.Tensor | None = None        # low-rank directions of F, [numel, k] (flattened parameter layout)
    info: dict = field(default_factory=dict)
    weight: torch.Tensor | None = None   # the weight value: [out, in] for a linear op, the op's own layout else
    op: str = ""                         # the program op it was fitted on

    def precision_diag(self) -> torch.Tensor:
        """diag Λ = N·F_ii + τ."""
        return self.n_data * self.fisher_diag + self.prior_precision


@dataclass
class LayerStatistics:
    """One op's running sums over the calibration data (:func:`accumulate_statistics` adds to them,
    :func:`finalize_posteriors` reads them), and the hooked pairs of the current backward."""

    name: str
    op: WeightOp
    kind: str                            # linear | conv | embedding | generic
    fisher: torch.Tensor | None = None   # allocated when the op first runs (its weight's shape is known then)
    weight: torch.Tensor | None = None   # in the frame (linear: [out, in])
    args: tuple = ()                     # generic ops: the call's other arguments, to take VJPs
    A: torch.Tensor | None = None
    G: torch.Tensor | None = None
    tokens: int = 0
    sketch: torch.Tensor | None = None   # Y = Σ g ωᵀ  [numel, k']
    Q: torch.Tensor | None = None        # orthonormal range basis after the first pass
    proj: list = field(default_factory=list)
    calls: list = field(default_factory=list)   # (input, δ) per call in the current backward
    kfac: bool = False
    kfac_output: str = "diag"
    outputs: list = field(default_factory=list)  # the layer's outputs in the current forward (autograd targets)


@dataclass(frozen=True)
class CalibrationData:
    """What a fit runs on: the calibration batches (named input tensors), the program's inputs in call
    order, how its output is read as a likelihood, and each batch's labels (the empirical Fisher's)."""

    batches: list[dict[str, torch.Tensor]]
    input_names: list[str]
    likelihood: str = "gaussian"                # gaussian | categorical
    targets: list[torch.Tensor] | None = None

    def __post_init__(self):
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, not {self.likelihood!r}")

    @property
    def items(self) -> int:
        return sum(int(b[self.input_names[0]].shape[0]) for b in self.batches)


@dataclass(frozen=True)
class LaplaceOptions:
    """How :func:`fit_laplace` fits (the forms: module docstring)."""

    curvature: str = "diag"                     # diag | kfac | lowrank
    fisher: str = "true"                        # true: targets sampled from the model; empirical: the labels
    samples: int = 1                            # target samples per item
    rank: int = 8                               # lowrank: directions of U
    n_data: float | None = None                 # N (default: the number of calibration items)
    prior_precision: float | None = None        # τ (default: empirical Bayes per layer)
    output_noise: float | None = None           # σ² of a Gaussian output (default: its variance over the items)
    seed: int = 0                               # seeds the targets and sketches, per batch
    # Items per forward/backward (``None``: whole batches), so that the autograd graph and the hooked
    # (input, output-gradient) pairs stay small. The random targets are drawn for the whole batch, from the
    # batch's own generator and in the same order as an unsplit run, and sliced per micro-batch: the result
    # equals the whole-batch fit up to float round-off (kernels may sum in another order for another size).
    micro_batch: int | None = 8
    # ``"diag"`` accumulates only the diagonal of the K-FAC output factor ``G`` (returned as a diagonal
    # matrix; all that the rounding and the diagonal ``F`` use), ``"full"`` the whole matrix.
    kfac_output: str = "diag"

    def __post_init__(self):
        if self.curvature not in CURVATURES:
            raise ValueError(f"unknown curvature {self.curvature!r}; expected one of {CURVATURES}")
        if self.fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {FISHERS}, not {self.fisher!r}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1 (or None), not {self.micro_batch}")
        if self.kfac_output not in ("diag", "full"):
            raise ValueError(f"kfac_output must be 'diag' or 'full', not {self.kfac_output!r}")


def fit_laplace(program: fx.GraphModule, data: CalibrationData, options: LaplaceOptions = LaplaceOptions(), *,
                ops: Iterable[WeightOp] | None = None, progress: Callable | None = None) -> dict[str, LayerPosterior]:
    """Fit the posterior of the weight of each op in ``ops`` (default: every :func:`~bayesq_onnx.traced.weight_ops`
    of ``program``, a traced program); keyed by op name, each in its op's frame (``LayerPosterior.weight``).
    ``progress(batches, pass_index)`` wraps each pass's batches.

    Two steps, as GPTQ's ``add_batch`` / ``fasterquant``: :func:`accumulate_statistics` runs the batches and
    sums each op's statistics into its :class:`LayerStatistics`; :func:`finalize_posteriors` turns the sums into
    posteriors, with the empirical-Bayes prior precision per layer (:func:`evidence_prior_precision`).
    """
    if options.fisher == "empirical" and data.targets is None:
        raise ValueError("the empirical Fisher needs labels (targets) for the calibration batches")
    ops = list(weight_ops(program) if ops is None else ops)
    layers = {op.name: LayerStatistics(op.name, op, op.kind, kfac=options.curvature == "kfac",
                                       kfac_output=options.kfac_output) for op in ops}
    outputs = accumulate_statistics(program, layers, data, options, progress)
    return finalize_posteriors(layers, outputs, data, options)


def accumulate_statistics(program: fx.GraphModule, layers: dict[str, LayerStatistics], data: CalibrationData,
                          options: LaplaceOptions, progress: Callable | None = None) -> OutputMoments:
    """Run the calibration batches forward and backward through ``program`` with a tap on each layer's op,
    adding the op's statistics into its layer (``lowrank``: a second pass projects the per-item gradients on
    the first pass's sketch). Returns the moments of the program's outputs in the first pass (a Gaussian
    output's σ²; streamed: no batch's output outlives its backward)."""
    taps = insert_taps(program, list(layers), _recorder(layers))
    outputs = OutputMoments(needed=data.likelihood == "gaussian" and options.output_noise is None)
    full_backward = None  # unknown until the first backward: see _backward
    try:
        for pass_index in range(2 if options.curvature == "lowrank" else 1):
            if pass_index == 1:
                for layer in layers.values():
                    if layer.sketch is not None:
                        layer.Q = torch.linalg.qr(layer.sketch).Q
                        layer.sketch = None
            for bi, batch in enumerate(progress(data.batches, pass_index) if progress else data.batches):
                inputs = [batch[n] for n in data.input_names]
                gen = torch.Generator().manual_seed(options.seed * 1_000_003 + bi)  # same targets in both passes
                draws = BatchDraws(gen, int(inputs[0].shape[0]))
                target = data.targets[bi] if data.targets else None
                full_backward = _add_batch(program, layers, inputs, target, draws, data.likelihood, options,
                                           pass_index, outputs, full_backward)
    finally:
        remove_taps(program, taps)
        for layer in layers.values():
            layer.calls.clear()
            layer.outputs.clear()
        program.zero_grad(set_to_none=True)
    return outputs


def _add_batch(program: fx.GraphModule, layers: dict[str, LayerStatistics], inputs: list[torch.Tensor], target,
               draws: BatchDraws, likelihood: str, options: LaplaceOptions, pass_index: int,
               outputs: OutputMoments, full_backward: bool | None) -> bool | None:
    """One calibration batch into ``layers``, a micro-batch at a time (first pass: its outputs added to
    ``outputs``); returns ``full_backward`` as :func:`_backward` left it."""
    size = draws.size
    step = size if options.micro_batch is None else min(options.micro_batch, size)
    for start in range(0, size, step):
        rows = slice(start, min(start + step, size))
        part = [item_rows(x, rows, size) for x in inputs]
        part_target = item_rows(target, rows, size) if target is not None else None
        full_backward = _add_rows(program, layers, part, part_target, draws, rows, likelihood, options, pass_index,
                                  outputs, full_backward)
        for layer in layers.values():  # free this micro-batch's activations before the next
            layer.calls.clear()
            layer.outputs.clear()
    return full_backward


def _add_rows(program: fx.GraphModule, layers: dict[str, LayerStatistics], part: list[torch.Tensor], target,
              draws: BatchDraws, rows: slice, likelihood: str, options: LaplaceOptions, pass_index: int,
              outputs: OutputMoments, full_backward: bool | None) -> bool | None:
    """One micro-batch ``rows`` (inputs ``part``): a forward, then per target sample a backward whose hooked
    pairs each layer accumulates. Its activations and graph are released on return."""
    leaves = []
    if not full_backward:  # the targeted backward must reach the first layers (see _backward)
        leaves = [x.detach().requires_grad_() for x in part if x.is_floating_point()]
        # the model gets a non-leaf copy, so an in-place op on its input stays legal
        fed = iter(leaves)
        part = [next(fed) * 1 if x.is_floating_point() else x for x in part]
    samples = options.samples
    with torch.enable_grad():
        out = program(*part)
        out = out[0] if isinstance(out, (tuple, list)) else out
        if pass_index == 0:
            outputs.append(out.detach().float())
        for s in range(samples):
            for layer in layers.values():
                layer.calls.clear()
            loss = pseudo_loss(out, likelihood, options.fisher, target, draws, s, rows)
            program.zero_grad(set_to_none=True)
            full_backward = _backward(loss, leaves, layers.values(), s < samples - 1, full_backward)
            for layer in layers.values():
                _accumulate(layer, options.curvature, pass_index, options.rank, draws, s, rows)
    return full_backward


def fisher_scales(data: CalibrationData, options: LaplaceOptions, outputs: OutputMoments) -> tuple[float, float, float]:
    """``(N, σ², count)``: the effective data size (``n_data``, else the calibration items), the output's noise
    variance (Gaussian: given, else the outputs' variance; categorical: 1) and what the Fisher sums are divided
    by, items · samples · σ²."""
    n = float(options.n_data) if options.n_data is not None else float(data.items)
    noise = 1.0
    if data.likelihood == "gaussian":
        noise = float(options.output_noise) if options.output_noise is not None else outputs.variance()
    return n, noise, data.items * options.samples * noise


def finalize_posteriors(layers: dict[str, LayerStatistics], outputs: OutputMoments, data: CalibrationData,
                        options: LaplaceOptions) -> dict[str, LayerPosterior]:
    """Each layer's accumulated sums as its posterior: the Fisher is the sum over items and target samples
    over (items · samples · σ²), with σ² the Gaussian output's noise variance (1 for a categorical output)."""
    n, noise, count = fisher_scales(data, options, outputs)
    result = {}
    for name, layer in layers.items():
        if layer.weight is None:
            continue  # the op never ran on the calibration data (a branch not taken): no posterior from it
        w = layer.weight.float()
        fisher_diag, A, G, shrinkage = _fisher(layer, options.curvature, count)
        tau = float(options.prior_precision) if options.prior_precision is not None \
            else evidence_prior_precision(w, n * fisher_diag)
        curvature = "diag" if options.curvature == "kfac" and A is None else options.curvature
        post = LayerPosterior(layer.op.parameter or name, fisher_diag, tau, n, A=A, G=G,
                              info={"items": data.items, "samples": options.samples, "likelihood": data.likelihood,
                                    "fisher": options.fisher, "curvature": curvature, "kind": layer.kind,
                                    "output_noise_var": noise, "op": name,
                                    **({} if shrinkage is None else {"input_shrinkage": shrinkage}),
                                    **({} if layer.op.item_axis is not None else {"items_from": "rows"})},
                              weight=w, op=name)
        if options.curvature == "lowrank" and layer.proj:
            post.U = _top_directions(layer, options.rank, count)
        result[name] = post
    return result


def _fisher(layer: LayerStatistics, curvature: str, count: float):
    """``(diag F, A, G, δ)`` of one layer from its sums (``count``: what they are divided by; δ: ``A``'s
    shrinkage, :func:`shrink_to_diagonal`); ``A``, ``G``, δ ``None`` but for K-FAC (embeddings and grouped convs
    take the exact diagonal instead)."""
    if curvature == "kfac" and layer.A is not None:
        # rank-deficient (fewer tokens than columns): the posterior mean under a diagonal prior (diag F unchanged)
        A, shrinkage = shrink_to_diagonal(symmetric(layer.A) / max(layer.tokens, 1), layer.tokens)
        # a diagonal output factor stays a vector: as a dense [out, out] matrix an LM head's would be out² floats
        G = (layer.G if layer.G.dim() == 1 else symmetric(layer.G)) / count
        g = G if G.dim() == 1 else torch.diag(G)
        # K-FAC "expand": F ≈ G ⊗ A, so its diagonal is diag(G) ⊗ diag(A) (no per-item gradients needed)
        return (g[:, None] * torch.diag(A)[None, :]).reshape(layer.weight.shape), A, G, shrinkage
    return layer.fisher / count, None, None, None


def _top_directions(layer: LayerStatistics, rank: int, count: float) -> torch.Tensor:
    """``U`` of ``F ≈ diag + U Uᵀ``: the top ``rank`` directions of the per-item gradients projected on the
    sketch's range, scaled by their singular values over √count."""
    b = torch.cat(layer.proj, dim=1)                        # [k', items·samples]
    u_small, sing, _ = torch.linalg.svd(b, full_matrices=False)
    k = min(rank, sing.numel())
    return layer.Q @ (u_small[:, :k] * (sing[:k] / count ** 0.5))


def _recorder(layers: dict[str, LayerStatistics]) -> Callable:
    """What a tap does for a fitted op: record its weight (once, allocating the layer), its activation, and a
    hook that pairs the activation with the output gradient in the backward pass."""
    def record(key: str, out: torch.Tensor, args: tuple) -> None:
        layer = layers[key]
        x, w = layer.op.operands(args)
        if layer.weight is None:
            _allocate(layer, w.detach())
        if layer.kind == "generic":
            layer.args = args
        if out.requires_grad:
            layer.outputs.append(out)
            xd = x.detach()
            out.register_hook(lambda grad: layer.calls.append((xd, grad.detach())))
    return record


def _allocate(layer: LayerStatistics, w: torch.Tensor) -> None:
    """The layer's weight in its frame and its accumulators, allocated on the op's first call."""
    frame = w.T if layer.op.transposed else w
    layer.weight = frame.float().clone()
    # K-FAC factors for linear ops and ungrouped 1-D/2-D convs; a grouped conv's input factor would be
    # block-diagonal (per group), so grouped/depthwise convs take the exact diagonal like embeddings. A
    # factored layer's diagonal comes from its factors at the end: no weight-sized accumulator for it.
    if layer.kfac and (layer.kind == "linear" or (layer.kind == "conv" and layer.op.conv.groups == 1)):
        cols = frame[0].numel()
        layer.A = torch.zeros(cols, cols)
        layer.G = torch.zeros(frame.shape[0]) if layer.kfac_output == "diag" else torch.zeros(frame.shape[0], frame.shape[0])
    else:
        layer.fisher = torch.zeros_like(layer.weight)


def _backward(loss: torch.Tensor, inputs: list[torch.Tensor], layers, retain: bool, full: bool | None) -> bool:
    """The backward pass that fires the layers' output-gradient hooks; returns whether it had to be the full
    ``loss.backward()`` (``full``: the answer so far, ``None`` before the first pass; ``inputs``: the float
    model inputs, as leaves that require grad).

    The targeted pass asks autograd only for the gradients of the hooked layer outputs and of the float
    model inputs, so the weights' own gradients (a third of a backward pass) are never computed. A hook
    registered on an output that is later modified in place (a conv followed by ``ReLU(inplace=True)``
    once BatchNorm is folded) stays on the node *before* the in-place op, which a targeted pass runs only
    if something upstream is asked for: the float inputs are, so image models keep every hook. If a hook
    is still missed (an integer-input model), the pass is redone as ``loss.backward()``, used from then on.
    The first targeted pass keeps the graph for that retry; later ones free it as a plain backward would.
    """
    if not full:
        wanted = [o for layer in layers for o in layer.outputs] + list(inputs)
        if wanted:
            torch.autograd.grad(loss, wanted, retain_graph=retain or full is None, allow_unused=True)
        if full is False or all(len(layer.calls) == len(layer.outputs) for layer in layers):
            return False
        for layer in layers:
            layer.calls.clear()
    loss.backward(retain_graph=retain)
    return True


def item_rows(t: torch.Tensor, rows: slice, size: int) -> torch.Tensor:
    """The micro-batch's items of a batched tensor (one whose leading dimension is the batch)."""
    return t[rows] if t.dim() > 0 and t.shape[0] == size and (rows.start, rows.stop) != (0, size) else t


def _accumulate(layer: LayerStatistics, curvature: str, pass_index: int, rank: int, draws: BatchDraws, sample: int,
                rows: slice) -> None:
    if not layer.calls:
        return
    if layer.kind == "embedding":  # diagonal only, from per-token gradients
        if pass_index == 0 and layer.op.kind == "embedding":
            for ids, d in layer.calls:
                d2 = d.reshape(-1, d.shape[-1]).float() ** 2
                layer.fisher.index_add_(0, ids.reshape(-1), d2)
        return
    kfac = curvature == "kfac" and layer.A is not None
    # K-FAC needs only the token factors, the other forms only the per-item gradients
    g, tokens = per_item(layer.op, layer.weight, layer.calls, layer.args, need_grads=not kfac,
                         need_tokens=kfac and pass_index == 0)
    flat = g.reshape(g.shape[0], -1) if g is not None else None        # [B, numel]
    if pass_index == 0:
        if g is not None:
            layer.fisher += (g * g).sum(dim=0).reshape(layer.fisher.shape)
        for a, dd in tokens:
            add_gram(layer.A, a)
            layer.tokens += a.shape[1]
            if layer.G.dim() == 1:
                layer.G += (dd * dd).sum((0, 2))
            else:
                add_gram(layer.G, dd.transpose(0, 1).reshape(dd.shape[1], -1))
        if curvature == "lowrank":
            width = rank + 8  # oversampling makes the range finder accurate for the top `rank` directions
            omega = draws.get(("omega", sample, layer.name), lambda g: torch.randn(draws.size, width, generator=g))
            sketch = flat.T @ omega[rows]
            layer.sketch = sketch if layer.sketch is None else layer.sketch + sketch
    else:
        layer.proj.append(layer.Q.T @ flat.T)                           # [k', B]

