"""Which candidates each weight may take (docs/design.md §3.5): per target, pins, and a user override file.

Targets:
* ``size`` — a small file that loads in less memory than the FP32 model where MatMul weights and tables
  dominate. A weight only MatMul (or a Gemm of the form ``A·W + bias``) reads takes uniform 2/4/8-bit codes
  per block of 32, 64 or 128 input channels (or per row, for a power-of-two row) in the layout of ONNX
  Runtime's ``MatMulNBits`` (``uint4-g32-nbits``), which multiplies from the packed codes in float, or FP16.
  Every other weight (Conv, Gemm, embedding tables) takes everything the rewrite stores exactly: uniform
  2/3/4/5/6/8-bit per row and per group of 128 input channels, per-row codebooks of 2/3/4 bits, and FP16.
  Their decodes are standard-op functions that ORT's default session constant-folds at session start (FP32
  speed); a table only Gather reads is decoded row by row as it is read and stays packed. The 5- and 6-bit
  widths give the knapsack steps between 4 and 8 bits. They are not offered on MatMul weights because a
  folded decode holds the weight in float, and ORT's folding holds every intermediate of every decode until
  it ends: on MiniLM that made the 12 MB artifact peak at 7× the FP32 model's memory (docs/results.md#memory
  says what leaving them out costs in fidelity).
* ``fold`` — what ``size`` offers Conv weights, on every weight: the most fidelity per stored bit (MatMul
  weights keep the 3/5/6-bit widths and codebooks), every weight decoded into float at session start, which
  loads in more memory than the FP32 model (MiniLM at 4.0 bits: see docs/results.md#memory).
* ``speed`` — MatMul (and such Gemm) weights only as uniform 4/8-bit ``MatMulNBits`` blocks, run with
  8-bit activations (``accuracy_level`` 4: faster on CPUs with fast int8 dot products). Every other weight
  (Conv, Gemm) only in forms that still fold at session start: codebooks and FP16. ORT neither fuses a
  DequantizeLinear into Conv or into Gemm with ``transB=1`` (the usual export of ``nn.Linear`` as Gemm)
  nor, with its QDQ handling on, constant-folds it: it would dequantize on every call (measured on
  digits-resnet: 2.5× FP32 latency).
* ``cuda`` — dtypes the CUDA execution provider runs natively: uniform 4/8-bit (per row, per 128) and FP16.

Weights with short rows (fewer than :data:`SHORT_ROW` columns: depthwise kernels, stems, 1×1 convolutions
over few channels) also get grids shared across rows, whose side information is amortized over the whole
tensor: under ``size`` uniform 2/3/4/5/6/8-bit per tensor (``uint4-tensor``) and 2/3/4-bit codebooks shared by 8
or 32 rows and by the whole tensor (``codebook3-8rows``, ``codebook3-tensor``); under ``cuda`` uniform 4/8-bit
per tensor. The knapsack takes them where their lower cost outweighs the lost per-row range.

An override file (JSON, or YAML when PyYAML is installed) maps tensor-name patterns (``fnmatch``) to the
candidate labels allowed for them, e.g. ``{"*.attention.*": ["uint4-g128", "uint8-row"]}``.
"""

from __future__ import annotations

import fnmatch
import functools
import json
from pathlib import Path

from ..choices import CODE_BITS, TARGETS
from ..errors import UserError
from ..plan import KERNELS, NBITS, NBITS_BITS, TENSOR, Candidate, QuantizedTensor
from ..quant.layout import WeightLayout
from ..weights import WeightInfo, graph_order

GROUP = 128
PIN = Candidate("uniform", 8)
# Rows shorter than this get the shared (per-tensor / row-group) candidates. A per-row uniform grid stores an
# fp16 scale and a b-bit zero point per row, (16 + b)/cols bits per weight: at least 0.28 (2-bit) below 64
# columns, 14% of a 2-bit code, and 2.0–2.7 for a 3×3 depthwise row; a per-row codebook costs 2^b·16/cols,
# at least 1 bit below 64 columns. From 64 up — every MiniLM row (384+), a 3×3 conv over 8+ inputs (72+) —
# per-row side information is a few percent of the code and the per-row range is worth it; those weights
# get the per-row and per-128 forms only.
SHORT_ROW = 64
SHARED_ROWS = (8, 32)  # rows per shared codebook table, besides one table for the whole tensor
NBITS_GROUPS = (32, 64, GROUP)  # MatMulNBits blocks offered besides whole rows
UNIFORM_BITS = CODE_BITS  # uniform code widths under `size` (`cuda`: the natively run 4 and 8)
CODEBOOK_BITS = (2, 3, 4)  # codebook widths: 2^b float16 levels per table, so wider tables cost more than they buy


def _label_table() -> dict[str, Candidate]:
    table = {}
    for bits in CODE_BITS:
        for group in (0, 32, 64, 128, TENSOR):
            for sym in (False, True):
                for sdt in ("float16", "float32"):
                    for kernel in KERNELS:
                        if kernel == NBITS and (bits not in NBITS_BITS or group == TENSOR):
                            continue
                        c = Candidate("uniform", bits, group, symmetric=sym, scale_dtype=sdt, kernel=kernel)
                        table[c.label] = c
        for rows in (1, 2, 4, 8, 16, 32, TENSOR):
            c = Candidate("codebook", bits, rows)
            table[c.label] = c
    for bits in (16, 32):
        c = Candidate("float", bits)
        table[c.label] = c
    return table


LABELS = _label_table()


def parse(label: str) -> Candidate:
    """Candidate for a label such as ``uint4-g128``, ``int8-row``, ``uint4-g128-s32``, ``uint4-tensor``,
    ``uint4-g128-nbits``, ``codebook3-row``, ``codebook3-8rows``, ``codebook3-tensor``, ``fp16``."""
    try:
        return LABELS[label]
    except KeyError:
        raise UserError(f"unknown candidate {label!r}; examples: uint4-g128, int8-row, uint4-g32-s32, "
                        f"codebook3-row, fp16") from None


def for_target(weight: WeightInfo, target: str) -> list[Candidate]:
    """The default candidates of one weight under ``target`` (only groups that divide its channels, and
    the shared grids of :func:`short_row_candidates` for short rows)."""
    fits = weight.layout.in_channels % GROUP == 0
    shared = short_row_candidates(weight.layout, target)
    if target == "speed":
        if nbits := nbits_candidates(weight, (4, 8)):
            return nbits
        if _only_matmul(weight):  # ORT fuses DequantizeLinear -> MatMul into MatMulNBits itself
            return [Candidate("uniform", 8, 0, scale_dtype="float32")]
        return [Candidate("codebook", b, 1) for b in CODEBOOK_BITS] + [Candidate("float", 16)]
    if target == "cuda":
        out = [Candidate("uniform", b, g) for b in (4, 8) for g in ([0, GROUP] if fits else [0])]
        return out + shared + [Candidate("float", 16)]
    if target == "size" and (nbits := nbits_candidates(weight, NBITS_BITS)):
        # a MatMul weight stays compressed in memory: a decode would be folded into a float copy at session
        # start, and ORT's folding holds every intermediate of every decode until it ends (docs/results.md#memory)
        return nbits + [Candidate("float", 16)]
    out = [Candidate("uniform", b, g) for b in UNIFORM_BITS for g in ([0, GROUP] if fits else [0])]
    out += [Candidate("codebook", b, 1) for b in CODEBOOK_BITS]
    return out + shared + [Candidate("float", 16)]


def nbits_candidates(weight: WeightInfo, widths: tuple[int, ...]) -> list[Candidate]:
    """``MatMulNBits`` forms of a weight every reader of which can be a MatMulNBits (none otherwise): uniform
    ``widths``-bit codes per block of :data:`NBITS_GROUPS` input channels, and per row where the row length
    is itself a power of two ≥ 16. The smaller blocks give the knapsack steps between the widths (4-bit
    codes cost 4.16, 4.31 and 4.63 bits in blocks of 128, 64 and 32) where the 5/6-bit widths have no
    MatMulNBits form."""
    if not weight.matmul_nbits:
        return []
    cands = [Candidate("uniform", b, g, kernel=NBITS) for b in widths for g in (0, *NBITS_GROUPS)]
    return [c for c in cands if c.fits(weight.layout)]


def short_row_candidates(layout: WeightLayout, target: str) -> list[Candidate]:
    """Grids shared across the rows of a weight with rows shorter than :data:`SHORT_ROW` (none otherwise,
    and none for a single row, where they equal the per-row forms). ``size``: uniform 2/3/4/5/6/8-bit per tensor,
    codebooks of 2/3/4 bits per :data:`SHARED_ROWS` rows (row counts that divide the rows and are fewer than
    all of them) and per tensor; ``cuda``: uniform 4/8-bit per tensor; ``speed``: none."""
    if layout.cols >= SHORT_ROW or layout.rows < 2 or target == "speed":
        return []
    if target == "cuda":
        return [Candidate("uniform", b, TENSOR) for b in (4, 8)]
    groups = [r for r in SHARED_ROWS if r < layout.rows and layout.rows % r == 0] + [TENSOR]
    # grouping-major: the codebook design sorts each table's weights once and reuses the sort for the next
    # bit width of the same grouping
    return ([Candidate("uniform", b, TENSOR) for b in UNIFORM_BITS]
            + [Candidate("codebook", b, g) for g in groups for b in CODEBOOK_BITS])


def _only_matmul(weight: WeightInfo) -> bool:
    """Whether only MatMul reads this weight (ORT fuses DequantizeLinear -> MatMul into MatMulNBits)."""
    return bool(weight.consumers) and all(op == "MatMul" for op in weight.consumers)


def pin_for(weight: WeightInfo, target: str) -> Candidate:
    """What ``keep_first_last`` keeps a layer at: 8-bit, in the form the target runs (a MatMul weight as
    ``MatMulNBits`` where it fits; under speed, FP16 for any other weight, which folds)."""
    if target in ("size", "speed") and (nbits := nbits_candidates(weight, (8,))):
        return nbits[0]
    if target == "speed":
        return Candidate("uniform", 8, 0, scale_dtype="float32") if _only_matmul(weight) else Candidate("float", 16)
    return PIN


def load_overrides(path: Path) -> list[tuple[str, list[Candidate]]]:
    """Parse an override file into (pattern, allowed candidates), in file order."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"`overrides` {path}: cannot read it ({exc.strerror})") from exc
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise UserError(f"`overrides` {path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'} "
                        f"({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict) or not all(isinstance(v, list) and v for v in data.values()):
        raise UserError(f"`overrides` {path}: expected a mapping from name pattern to a non-empty list of "
                        "candidate labels")
    return [(str(pattern), [parse(str(label)) for label in labels]) for pattern, labels in data.items()]


def allowed(weights: dict[str, WeightInfo], *, target: str = "size", keep_first_last: bool = False,
            overrides: list[tuple[str, list[Candidate]]] | None = None) -> dict[str, list[Candidate]]:
    """Candidates per weight after target, pins and overrides; a conflict is a :class:`UserError`.
    ``keep_first_last`` pins the first and last weights in graph order (:func:`~bayesq_onnx.weights.graph_order`).
    """
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    out = {name: for_target(w, target) for name, w in weights.items()}
    for pattern, cands in overrides or []:
        matched = [n for n in weights if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise UserError(f"override pattern {pattern!r} matches no quantized tensor")
        for name in matched:
            usable = [c for c in cands if c.fits(weights[name].layout)
                      and (c.kernel != NBITS or weights[name].matmul_nbits)]
            if not usable:
                raise UserError(f"override {pattern!r}: none of {[c.label for c in cands]} fits {name} "
                                f"({weights[name].layout.rows} rows × {weights[name].layout.in_channels} inputs)")
            out[name] = usable
    if keep_first_last:
        names = graph_order(weights)
        for name in {names[0], names[-1]}:
            pin = pin_for(weights[name], target)
            if overrides and any(fnmatch.fnmatchcase(name, p) for p, _ in overrides) and pin not in out[name]:
                raise UserError(f"`keep_first_last` pins {name} to {pin.label}, but the override file excludes it")
            out[name] = [pin]
    return out


@functools.lru_cache(maxsize=4096)
def cost_bits(layout: WeightLayout, candidate: Candidate) -> int:
    """Exact stored bits of a weight of ``layout`` under ``candidate`` (independent of its values)."""
    return QuantizedTensor.placeholder("", layout, candidate).stored_bits()


def budget_range(weights: dict[str, WeightInfo], allowed: dict[str, list[Candidate]]) -> tuple[float, float]:
    """The least and the most all-in bits per weight any choice of allowed candidates gives."""
    total = sum(w.size for w in weights.values())
    costs = [[cost_bits(weights[n].layout, c) for c in cands] for n, cands in allowed.items()]
    return sum(min(c) for c in costs) / total, sum(max(c) for c in costs) / total


def check_budget(budget: float, weights: dict[str, WeightInfo], allowed: dict[str, list[Candidate]]) -> None:
    """Raise :class:`UserError` unless some choice of allowed candidates meets ``budget`` all-in bits."""
    lo, hi = budget_range(weights, allowed)
    if not lo - 1e-9 <= budget <= hi + 1e-9:
        low, high = range_text(budget, lo, hi)
        raise UserError(f"`bits` {budget:g} cannot be met: the allowed candidates give between {low} and "
                        f"{high} all-in bits per weight for this model; pick a budget in that range")


def range_text(budget: float, lo: float, hi: float) -> tuple[str, str]:
    """``lo`` and ``hi`` printed for a message refusing ``budget``: three decimals, or as many more as it takes
    for the range not to read as containing the budget (pinned overrides can make lo = hi = 3.99970 against a
    budget of 4)."""
    digits = next((d for d in range(3, 10) if f"{budget:.{d}f}" not in (f"{lo:.{d}f}", f"{hi:.{d}f}")), 10)
    return f"{lo:.{digits}f}", f"{hi:.{digits}f}"
