"""ReconstructBlocks: learned rounding across layers, block by block (issue 30; BRECQ, arXiv 2102.05426, with
AdaRound's rounding variables, :mod:`bayesq_onnx.quant.adaround`).

Within-layer error feedback (the planner's, GPTQ's) makes each layer's output close to its FP32 output on
its own; an error no single layer can undo (a 3×3 depthwise kernel has nine weights to compensate with) has
to be absorbed by the layers after it. Here the codes of several consecutive layers are chosen together.

**Blocks** come from the traced program the ONNX graph was exported from (the same ATen ops, BatchNorm
folded): positions in graph order where the fewest activations are live (a residual join, or between two
layers of a plain chain) cut it into spans, and consecutive spans are merged until each holds at least
``min_ops`` quantized ops. A block's inputs are the activations live at its start, its outputs those live at
its end.

**Objective**, per block:

    L(V) = Σ_outputs mean(F ⊙ (f(x̃; Ŵ(V)) − f(x; W))²) / L₀ + λ · mean(1 − |2h(V) − 1|^β)

where ``x̃`` are the block's inputs in the model whose earlier blocks are already reconstructed (quantized),
``f(x; W)`` the FP32 model's outputs on the same items, ``L₀`` the planned codes' error (so λ means the same
for every block), and ``F`` the weight of each output element (``metric``):

* ``mse`` (the default): 1;
* ``fisher``: the diagonal of the likelihood's Fisher at that activation, ``E[g²]`` over the calibration
  items, ``g = ∂ log p(y | x) / ∂ output`` with ``y`` drawn from the model's own predictive (the true Fisher
  whose weight-space form is the posterior's data term ``N·F``; BRECQ's weighting, averaged over items);
* ``fisher-items``: each item's own ``g²`` (BRECQ's per-item form; one target draw per item).

The posterior's curvature is measured *on the calibration data*: on EfficientNet-Lite1 calibrated on photos
unlike the evaluated ones, both Fisher forms lowered the held-out block error more than ``mse`` did and
still lost on the evaluated photos (KL(FP32 ‖ q) at 4.0 bits, 100 steps: ``mse`` 0.103, ``fisher`` 0.138,
``fisher-items`` 0.130, the planned codes 0.118): weighting the outputs by the directions the calibration
photos' classes care about fits those classes. QDrop's mixing of FP32 inputs into the block's inputs (half of
the elements) measured worse too (``mse`` 0.128, ``fisher-items`` 0.115), so the inputs are the quantized
model's alone; so did PD-Quant's final-output KL term added to the objective (0.112 and 0.114 at two weights;
docs/method.md step 4), which was removed.

Each weight chooses between its planned code and the next grid point toward its FP32 value (for a codebook,
the neighbouring level of its table); the grids, scales, codebook levels and bits stay as planned, so the
file and its all-in bits do not move.

**Not fitting the calibration set**: the calibration batches are split, one in eight held out. Every
``steps / 4`` Adam steps the hardened codes are scored on the held-out items by the unregularized error, and
the block keeps the best codes seen, the planned ones included: a block is never worse on held-out items than
the plan it was given. Per block, the error before and after on the fitted and the held-out items goes in the
plan's settings (the report's ``plan.settings.reconstruction``).

Planned weights that are not a parameter of the program read by one op of it (exporter-computed constants,
tied tables held twice) keep their codes and enter the quantized path with their planned values.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import fx

from ..export import ParameterBinding
from ..models.base import Batch
from ..plan import Plan, QuantizedTensor
from ..quant import adaround
from ..quant.uniform import code_range
from ..traced_blocks import Block, Program, ReconstructUnsupported, items_of
from ..weights import WeightInfo, canonical_mu


@dataclass(frozen=True)
class ReconstructOptions:
    steps: int = 100           # Adam steps per block (at most: the best held-out codes are kept)
    min_ops: int = 3           # quantized ops per block, at least (the last block may have fewer)
    lr: float = 0.1            # Adam's step on the rounding logits V (|V| ≈ 2.4 at the start)
    regularizer: float = 0.1   # λ, relative to the planned codes' error
    batch_items: int = 32      # calibration items per step (batches of equal shapes are concatenated)
    held_share: int = 8        # one batch in this many (at least one) is held out for early stopping
    # mse: block outputs unweighted; fisher: weighted by E[g²] per element; fisher-items: by each item's own g².
    # On EfficientNet-Lite1 with photos unlike the calibration ones, KL(FP32 ‖ q) at 4.0 bits: mse 0.103,
    # fisher 0.138, fisher-items 0.130, planned codes 0.118 (module docstring)
    metric: str = "mse"
    seed: int = 0


class ReconstructBlocks:
    """Re-choose ``plan``'s codes block by block (module docstring) on the PyTorch ``program``."""

    def __init__(self, program: fx.GraphModule, bindings: dict[str, ParameterBinding], calibration: list[Batch],
                 input_names: list[str], likelihood: str, options: ReconstructOptions = ReconstructOptions(),
                 progress: Callable | None = None):
        self.program, self.bindings, self.input_names = program, bindings, input_names
        self.calibration, self.likelihood, self.options, self.progress = calibration, likelihood, options, progress

    def __call__(self, plan: Plan, weights: dict[str, WeightInfo]) -> Plan:
        start_time = time.perf_counter()
        opts = self.options
        torch.manual_seed(opts.seed)
        program = Program(self.program)
        params = program.parameter_targets()
        rounding, fixed = _rounding_weights(plan, weights, self.bindings, params)
        if not rounding:
            raise ReconstructUnsupported("no planned weight is a parameter read by one op of the traced program")
        blocks = program.blocks({t: n for n, r in rounding.items() for t in r.targets}, opts.min_ops)
        batches = [program.tensors(b, self.input_names) for b in _rebatched(self.calibration, opts.batch_items)]
        held = max(1, len(batches) // opts.held_share) if len(batches) >= 2 else 0
        train, heldout = batches[:len(batches) - held], batches[len(batches) - held:]
        program.check_runs(batches[0])

        fixed_values = {t: v for qt_values in fixed.values() for t, v in qt_values.items()}
        outputs = {o for b in blocks for o in b.outputs}
        fisher = program.fisher(outputs, batches, self.likelihood, opts.seed, pooled=opts.metric == "fisher") \
            if opts.metric in ("fisher", "fisher-items") else {o: _Ones() for o in outputs}
        # the quantized path's and the FP32 path's live values at the current cut, per batch
        q_env = [program.inputs_env(b) for b in batches]
        fp_env = [dict(e) for e in q_env]
        chosen: dict[str, torch.Tensor] = {}  # weight -> the hardened "moved" mask
        override = dict(fixed_values)  # parameter -> its value in the quantized path (earlier blocks final)
        report = []
        items = self.progress(blocks, "reconstruct blocks") if self.progress else blocks
        for block in items:
            targets = [program.run(block, env, {}) for env in fp_env]
            names = block.weights
            variables = {n: rounding[n] for n in names}
            stats, moved = _fit_block(program, block, variables, override, q_env, targets, fisher, len(train), opts)
            chosen.update(moved)
            for n in names:
                override.update(rounding[n].values(moved[n]))
            q_env = [_live(program.run(block, env, override), env, block) for env in q_env]
            fp_env = [_live(t, env, block) for t, env in zip(targets, fp_env)]
            report.append({"weights": names, **stats})

        tensors = dict(plan.tensors)
        changed = 0
        for n, moved in chosen.items():
            if bool(moved.any()):
                tensors[n] = rounding[n].with_codes(moved)
                changed += 1
        settings = {"metric": opts.metric, "blocks": len(blocks), "weights_reconstructed": len(rounding), "weights_changed": changed,
                    "weights_fixed": sorted(set(plan.tensors) - set(rounding)), "steps_per_block": opts.steps,
                    "train_items": sum(items_of(b) for b in train), "heldout_items": sum(items_of(b) for b in heldout),
                    "seconds": round(time.perf_counter() - start_time, 3), "per_block": report}
        return Plan(plan.method, tensors, {**plan.settings, "reconstruction": settings})


# ---- rounding variables of one weight ----------------------------------------------------------------------
@dataclass
class RoundingWeight:
    """One planned weight's two candidate codes per element: planned ``q`` and ``q′`` one grid point toward
    its FP32 value, and their values (canonical ``[rows, cols]``); ``targets``: the program parameter names
    that read it, ``transposed``/``shape``: how its ONNX layout maps to the parameter."""

    qt: QuantizedTensor
    alternative: np.ndarray      # q′, int16 canonical
    planned_values: torch.Tensor
    alternative_values: torch.Tensor
    targets: tuple[str, ...]
    transposed: bool
    shape: tuple[int, ...]

    def to_parameter(self, canonical: torch.Tensor) -> torch.Tensor:
        w = self.qt.layout.from_canonical(canonical)
        return (w.T if self.transposed else w).reshape(self.shape)

    def soft(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        value = self.to_parameter(adaround.soft_weight(self.planned_values, self.alternative_values, v))
        return dict.fromkeys(self.targets, value)

    def values(self, moved: torch.Tensor) -> dict[str, torch.Tensor]:
        value = self.to_parameter(torch.where(moved, self.alternative_values, self.planned_values))
        return dict.fromkeys(self.targets, value)

    def with_codes(self, moved: torch.Tensor) -> QuantizedTensor:
        codes = np.where(moved.numpy(), self.alternative, self.qt.codes).astype(np.int16)
        info = {**self.qt.info, "reconstruction": {"codes_moved": int(moved.sum())}}
        return dataclasses.replace(self.qt, codes=codes, info=info)


def alternative_codes(qt: QuantizedTensor, mu: torch.Tensor) -> np.ndarray:
    """``q′``: for every weight the code of the grid point next to its planned value on the side of its FP32
    value ``mu`` (canonical); the planned code where there is none (the grid's end, or ``ŵ = w``).

    Uniform grids: ``q ± 1`` within the code range (a positive scale makes values increase with codes).
    Codebooks: the neighbouring level of the row's table in sorted order."""
    c = qt.candidate
    q = torch.from_numpy(qt.codes.astype(np.int64))
    planned = torch.from_numpy(qt.layout.to_canonical(qt.dequantize()))
    direction = torch.sign(mu - planned).long()
    if c.family == "uniform":
        lo, hi = code_range(c.bits, c.symmetric)
        return (q + direction).clamp(lo, hi).numpy().astype(np.int16)
    tables = torch.from_numpy(qt.levels.astype(np.float32))
    per = c.rows_per_table(qt.layout)
    row_table = torch.arange(q.shape[0]) // per
    order = torch.argsort(tables, dim=1, stable=True)            # rank -> code
    rank = torch.argsort(order, dim=1)                            # code -> rank
    r = torch.gather(rank[row_table], 1, q)
    r2 = (r + direction).clamp(0, tables.shape[1] - 1)
    return torch.gather(order[row_table], 1, r2).numpy().astype(np.int16)


def _rounding_weights(plan: Plan, weights: dict[str, WeightInfo], bindings: dict[str, ParameterBinding],
                      params: dict[str, tuple[int, ...]]) -> tuple[dict[str, RoundingWeight], dict[str, dict]]:
    """The planned weights that get rounding variables (uniform or codebook, bound to a parameter that the
    program reads and that no other initializer holds), and the other planned ones that are parameters
    (fixed: name -> {target: planned value})."""
    holders: dict[str, list[str]] = {}
    for init, b in bindings.items():
        holders.setdefault(b.aliases[0] if b.aliases else b.parameter, []).append(init)
    rounding, fixed = {}, {}
    for name, qt in sorted(plan.tensors.items()):
        b = bindings.get(name)
        if b is None:
            continue
        aliases = b.aliases or (b.parameter,)
        targets = tuple(a for a in aliases if a in params)
        if not targets or len(holders.get(aliases[0], [])) != 1:
            continue
        shape = params[targets[0]]
        if qt.candidate.family == "float":
            value = torch.from_numpy(qt.dequantize())
            fixed[name] = dict.fromkeys(targets, (value.T if b.transposed else value).reshape(shape))
            continue
        mu = canonical_mu(weights[name])
        alt = alternative_codes(qt, mu)
        planned = torch.from_numpy(qt.layout.to_canonical(qt.dequantize()))
        alt_values = torch.from_numpy(qt.layout.to_canonical(dataclasses.replace(qt, codes=alt).dequantize()))
        rounding[name] = RoundingWeight(qt, alt, planned, alt_values, targets, b.transposed, shape)
    return rounding, fixed


# ---- one block --------------------------------------------------------------------------------------------
def _fit_block(program: "Program", block: Block, variables: dict[str, RoundingWeight], override: dict,
               q_env: list[dict], targets: list[dict], fisher: dict, n_train: int,
               opts: ReconstructOptions) -> tuple[dict, dict[str, torch.Tensor]]:
    """Adam on the block's rounding logits (module docstring); returns the block's figures and, per weight,
    which elements take the alternative code (the best hardened codes on the held-out batches)."""
    start = time.perf_counter()
    planned = {n: torch.zeros(r.planned_values.shape, dtype=torch.bool) for n, r in variables.items()}
    logits = {n: adaround.start_logits(m).requires_grad_() for n, m in planned.items()}
    train, held = range(n_train), range(n_train, len(q_env))

    def error(i: int, values: dict) -> torch.Tensor:
        out = program.run(block, q_env[i], values)
        return sum((fisher[o][i] * (out[o] - targets[i][o]) ** 2).mean() for o in block.outputs)

    def hard_error(moved: dict, items) -> float:
        values = dict(override)
        for n, m in moved.items():
            values.update(variables[n].values(m))
        with torch.no_grad():
            return float(sum(error(i, values) for i in items)) / max(1, len(items))

    before_train, before_held = hard_error(planned, train), hard_error(planned, held)
    scale = before_train if before_train > 0 else 1.0
    best, best_held = planned, before_held if held else before_train
    if not variables or before_train <= 0:
        return _block_stats(block, before_train, before_train, before_held, before_held, 0, start), best
    optimizer = torch.optim.Adam(list(logits.values()), lr=opts.lr)
    check_every = max(1, opts.steps // 4)
    order = torch.randperm(max(1, n_train * ((opts.steps + n_train - 1) // n_train)))
    for step in range(opts.steps):
        i = int(order[step % len(order)]) % n_train
        values = dict(override)
        for n, v in logits.items():
            values.update(variables[n].soft(v))
        loss = error(i, values) / scale
        beta = adaround.annealed_beta(step, opts.steps)
        if beta is not None and opts.regularizer > 0:
            loss = loss + opts.regularizer * torch.stack(
                [adaround.rounding_regularizer(adaround.rectified_sigmoid(v), beta) for v in logits.values()]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % check_every == 0 or step + 1 == opts.steps:
            moved = {n: adaround.hardened(v.detach()) for n, v in logits.items()}
            score = hard_error(moved, held if held else train)
            if score < best_held:
                best, best_held = moved, score
    after_train = hard_error(best, train)
    after_held = hard_error(best, held) if held else after_train
    return _block_stats(block, before_train, after_train, before_held, after_held,
                        int(sum(int(m.sum()) for m in best.values())), start), best


def _block_stats(block: Block, before_train: float, after_train: float, before_held: float, after_held: float,
                 moved: int, start: float) -> dict:
    return {"ops": len(block.weights), "error_before": before_train, "error_after": after_train,
            "heldout_error_before": before_held, "heldout_error_after": after_held, "codes_moved": moved,
            "seconds": round(time.perf_counter() - start, 3)}


def _live(out: dict, env: dict, block: Block) -> dict:
    """The values live after ``block``: its computed ones and those passed through from ``env``."""
    return {n: out[n] if n in out else env[n] for n in block.live_out}


class _Ones:
    """Unit weights for every batch (``metric`` mse)."""

    def __getitem__(self, i: int) -> float:
        return 1.0


def _rebatched(batches: list[Batch], size: int) -> list[Batch]:
    """Consecutive batches concatenated along the item axis up to ``size`` items, where their arrays agree in
    every other axis (a program's shapes are read once per run, so a run's items must share them)."""
    out: list[Batch] = []
    for batch in batches:
        last = out[-1] if out else None
        if last is not None and set(last) == set(batch) and all(
                last[k].shape[1:] == batch[k].shape[1:] and last[k].dtype == batch[k].dtype for k in batch) \
                and next(iter(last.values())).shape[0] + next(iter(batch.values())).shape[0] <= size:
            out[-1] = {k: np.concatenate([last[k], batch[k]]) for k in batch}
        else:
            out.append(dict(batch))
    return out
