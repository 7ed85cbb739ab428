"""The stages that refine a plan after its planner ran, each keeping its candidates and so its all-in bits:
error propagation, the GPTQ floor, block reconstruction. A method declares which it takes in its registration
(:mod:`bayesq_onnx.planning.methods`); the pipeline runs the declared ones the config turns on, in the
declared order, and knows none of them by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from ..config import CompileConfig
from ..export import ParameterBinding
from ..models.base import ModelBundle
from ..plan import Candidate, Plan
from ..progress import Reporter
from ..runtime.session import make_session, run_batches, session_config_for
from ..weights import WeightInfo, WeightPosterior
from .floor import gptq_at_budget, ship_the_better
from .propagate import PropagateErrors
from .reconstruct import ReconstructBlocks, ReconstructOptions, ReconstructUnsupported


@dataclass
class StageInputs:
    """What a stage may read: the compile's config, the bundle and the part of it the fits saw (``fit``), the
    weights, their posteriors and allowed candidates, the parameter bindings, the FP32 model (bytes and
    path), the providers, ``rewrite(plan) -> artifact bytes`` (not recorded in `dump_dir`) and the reporter.
    ``sections``: report sections a stage adds (key -> dict)."""

    config: CompileConfig
    bundle: ModelBundle
    fit: ModelBundle
    weights: dict[str, WeightInfo]
    posteriors: dict[str, WeightPosterior] | None
    allowed: dict[str, list[Candidate]] | None
    bindings: dict[str, ParameterBinding]
    fp_bytes: bytes
    fp_path: Path
    providers: list[str]
    rewrite: Callable[[Plan], bytes]
    rep: Reporter
    sections: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    name: str
    enabled: Callable[[CompileConfig], bool]
    title: Callable[[CompileConfig], str]
    run: Callable[[Plan, StageInputs], Plan]


def _propagate(plan: Plan, s: StageInputs) -> Plan:
    """Codes again, layer by layer, on the inputs the partly quantized model gives (grids and bits fixed)."""
    return PropagateErrors(onnx.load_from_string(s.fp_bytes), s.fit.calibration, mode=s.config.propagate,
                           posteriors=s.posteriors, act_order=s.config.act_order, progress=s.rep.track)(plan, s.weights)


def _floor(plan: Plan, s: StageInputs) -> Plan:
    """``plan``, or GPTQ's at the same all-in budget in the forms ``allowed`` to bayesq when it does better on
    the calibration batches the fits did not see, in ONNX Runtime (:func:`~.floor.ship_the_better`)."""
    held = s.bundle.calibration[len(s.fit.calibration):]
    config, rep = s.config, s.rep
    if not held:
        s.sections["floor"] = {"skipped": "fewer than 4 calibration batches: none held out to compare on"}
        return plan
    budget = plan.settings.get("budget", config.bits)
    gptq = gptq_at_budget(budget, s.weights, s.posteriors, s.allowed,
                          progress=lambda names: rep.track(names, "GPTQ layers"))
    if gptq is None:
        s.sections["floor"] = {"skipped": f"GPTQ's grids in the forms `target` {config.target} allows cannot "
                                          f"meet {budget:g} all-in bits on this model"}
        return plan
    reference = run_batches(make_session(s.fp_path, s.providers)[0], held)

    def run(candidate: Plan) -> np.ndarray:
        path = s.fp_path.with_name(f"floor-{candidate.method}.onnx")
        path.write_bytes(s.rewrite(candidate))
        return run_batches(make_session(path, s.providers, session_config_for(config.target))[0], held)

    shipped, section = ship_the_better(plan, gptq, reference, run, s.bundle.likelihood == "categorical",
                                       seed=config.seed)
    b, g = section["bayesq"]["score"], section["gptq"]["score"]
    rep.note(f"  floor on {section['items']} held-out calibration items ({section['score']}, lower is better): "
             f"bayesq {b:.4g}, GPTQ {g:.4g} → shipping {shipped.method}'s plan")
    s.sections["floor"] = section
    return shipped


def _reconstruct(plan: Plan, s: StageInputs) -> Plan:
    """``plan`` with its codes chosen again block by block (:mod:`.reconstruct`), or as it is, with a note,
    when the traced program cannot be run block by block."""
    config, bundle = s.config, s.fit
    options = ReconstructOptions(steps=config.reconstruct_steps, metric=config.reconstruct_metric, seed=config.seed)
    try:
        out = ReconstructBlocks(bundle.module, s.bindings, bundle.calibration, bundle.input_names,
                                bundle.likelihood, options, progress=s.rep.track)(plan, s.weights)
    except ReconstructUnsupported as exc:
        s.rep.note(f"[yellow]reconstruction skipped: {exc}[/]")
        return Plan(plan.method, plan.tensors, {**plan.settings, "reconstruction": {"skipped": str(exc)}})
    r = out.settings["reconstruction"]
    before = sum(b["heldout_error_before"] for b in r["per_block"])
    after = sum(b["heldout_error_after"] for b in r["per_block"])
    s.rep.note(f"  {r['blocks']} blocks, codes of {r['weights_changed']} of {r['weights_reconstructed']} weights "
               f"moved; held-out block error {before:.4g} → {after:.4g}")
    return out


STAGES: dict[str, Stage] = {
    "propagate": Stage("propagate", lambda c: c.propagate != "none",
                       lambda c: f"propagate errors ({c.propagate})", _propagate),
    # the floor compares plans on calibration batches no fit has seen; K-FAC's input factors are GPTQ's H
    "floor": Stage("floor", lambda c: c.floor == "gptq" and c.max_drop is None and c.curvature == "kfac",
                   lambda c: "floor: GPTQ at the same budget", _floor),
    "reconstruct": Stage("reconstruct", lambda c: c.reconstruct,
                         lambda c: "reconstruct blocks (learned rounding)", _reconstruct),
}
