"""The whole compile, top to bottom: load → export → analyse → plan → rewrite → validate → write.

Each step is an onnx_ir pass on the graph (``bayesq_onnx/passes/``), an analysis of the weights
(``bayesq_onnx/analysis/``), a planner (``bayesq_onnx/planning/``, chosen by the method registry) or a pure
function; this file only wires them together and records what happened for the report.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch

from . import __version__, artifact, artifact_format
from .analysis.fit_layer_posterior import FitLayerPosterior
from .analysis.fit_posterior import FitLaplacePosterior
from .bayes.laplace import LaplaceOptions
from .bayes.layerwise import common_scale
from .config import CompileConfig
from .distill import DistillOptions, DistillResult, DistillUnsupported, distill
from .errors import BayesQError, PassFailure, UserError
from .export import fp32_model
from .models import check_model_spec, load_model
from .models.base import ModelBundle
from .passes.collect_weights import CollectWeightsPass
from .passes.quantize_weights import QuantizeWeightsPass
from .passes.upgrade_opset import UpgradeOpsetPass
from .plan import Plan
from .planning import candidates
from .planning.budget_search import search_budget
from .planning.floor import without_held_out
from .planning.methods import PlannerInputs, method_spec, planner_for
from .planning.stages import STAGES, StageInputs
from .planning.rtn import PlanRoundToNearest
from .progress import Reporter
from .report import (bits_plot, compile_report, file_accounting, float_left_warnings, to_json_bytes, to_markdown,
                     verdict_advice)
from .runtime.memory import release_freed_memory
from .runtime.session import make_session, resolve_providers, run_batches, session_config_for
from .runtime.validation import check_export, validate
from .weights import WeightInfo


@dataclass
class CompileResult:
    artifact: Path      # DIR/model.onnx
    report: dict        # what DIR/report.json holds
    plan: Plan


def compile_model(config: CompileConfig, reporter: Reporter | None = None,
                  bundle: ModelBundle | None = None) -> CompileResult:
    """Compile ``config.model`` (or a ready ``bundle``) into ``config.out``; see docs/design.md §1."""
    # one long function on purpose: the stages read top to bottom, each one's inputs and outputs in view
    config.validate()
    if bundle is None:
        check_model_spec(config.model)
    overrides = candidates.load_overrides(config.overrides) if config.overrides else None
    rep = reporter or Reporter(quiet=True)
    artifact.check_output_dir(config.out)
    providers, provider_note = resolve_providers(config.provider)
    torch.manual_seed(config.seed)

    # ---- load and export --------------------------------------------------------------------------
    if bundle is None:
        with rep.stage(f"load {config.model}"):
            bundle = load_model(config.model, config.source_options())
    _check_source_supports(config, bundle)
    rep.note(f"[dim]{provider_note}[/]")  # printed only once every input has been checked
    warnings = [bundle.info["warning"]] if bundle.info.get("warning") else []
    for warning in warnings:
        rep.note(f"[yellow]warning: {warning}[/]")
    with rep.stage("export to ONNX" if bundle.module is not None else "read ONNX"):
        fp_model, bindings = fp32_model(bundle)
        fp_bytes = _serialize(fp_model)

    with tempfile.TemporaryDirectory(prefix="bayesq-") as tmp:
        fp_path = Path(tmp) / "fp32.onnx"
        fp_path.write_bytes(fp_bytes)
        if bundle.module is not None:
            with rep.stage("check export against PyTorch"):
                export_check = check_export(bundle, fp_path, bindings)
        else:
            export_check = {"source": f"ONNX input {bundle.onnx_file} (no export)"}
        export_check["opset"] = fp_model.opset_imports[""]

        # ---- analyse: which weights, and what the posterior says about them ------------------------
        with rep.stage("analyse weights"):
            collect = CollectWeightsPass(scope=config.scope)
            _check_finite(fp_model)
            _run(collect, fp_model, config, rep)
            weights = collect.weights
            if not weights:
                raise UserError(f"model {bundle.name!r} has no weights in scope {config.scope!r} to quantize")
        float_sizes = _float_sizes(fp_model)
        fp_model = None  # its weights are extracted; each rewrite starts again from fp_bytes
        method = method_spec(config.method)
        stages = method.refinements(config)  # the refinements it declares that the config turns on
        allowed = None
        if method.chooses:
            allowed = candidates.allowed(weights, target=config.target, keep_first_last=config.keep_first_last,
                                         overrides=overrides)
            candidates.check_budget(config.bits, weights, allowed)  # before the expensive analysis
        # the floor compares plans on calibration batches no fit has seen (planning/floor.py)
        fit = without_held_out(bundle) if STAGES["floor"] in stages else bundle
        posteriors, posterior_sources = None, {}
        if method.analysis != "none":
            with rep.stage(_analysis_title(config, bundle)):
                posteriors = _fit_posteriors(config, fit, fp_bytes, weights, rep)
                posterior_sources = {n: p.info.get("posterior", "") for n, p in sorted(posteriors.items())}
            release_freed_memory()

        # ---- plan: one candidate per weight, with the exact values to store -------------------------
        search, reference = None, None
        with rep.stage(f"plan ({config.method})"):
            planner = planner_for(config, PlannerInputs(weights, posteriors, allowed, fit, bindings, rep.track))
            plan = planner(weights) if config.max_drop is None else None
        release_freed_memory()
        if config.max_drop is not None:  # accuracy target: the least budget that validates within it
            with rep.stage(f"search the budget (drop ≤ {config.max_drop:g})"):
                plan, search, reference = search_budget(
                    planner, weights, bundle, fp_path, lambda p: _rewrite(fp_bytes, p, config, rep),
                    providers, session_config_for(config.target), config.max_drop, rep)

        # ---- refine: the stages the method declares (planning/stages.py); candidates and bits stay -----
        refine = StageInputs(config, bundle, fit, weights, posteriors, allowed, bindings, fp_bytes, fp_path, providers,
                             lambda p: _rewrite(fp_bytes, p, _unrecorded(config), rep), rep)
        for stage in stages:
            with rep.stage(stage.title(config)):
                plan = stage.run(plan, refine)
            release_freed_memory()
        for name, t in sorted(plan.tensors.items()):
            rep.debug(f"  {name}: {t.candidate.label}, {t.stored_bits() / t.n_weights:.3f} bits all-in")

        # ---- optional: distill the plan toward the teacher (codes fixed: the budget does not move) -------
        distilled, distill_section, undistilled = None, None, None
        if config.distill:
            distilled, skipped = _distill(config, fit, plan, bindings, posteriors, rep)
            if distilled is not None:
                plan, undistilled = distilled.plan, plan
            else:
                distill_section = {"skipped": skipped}

        # ---- rewrite the ONNX graph --------------------------------------------------------------
        with rep.stage("rewrite ONNX"):
            q_bytes = _rewrite(fp_bytes, plan, config, rep, floats=distilled.initializers if distilled else None)
            accounting = file_accounting(q_bytes, plan)
            undistilled_path = None
            if undistilled is not None:  # the same plan undistilled: the report's "before" figure
                undistilled_path = Path(tmp) / "undistilled.onnx"
                undistilled_path.write_bytes(_rewrite(fp_bytes, undistilled, config, rep))
            # the verdict's reference: the same weights rounded to 8 bits per channel (bayesq_onnx/verdict.py)
            eight_bit_path = Path(tmp) / "reference-8bit.onnx"
            eight_bit_path.write_bytes(_rewrite(
                fp_bytes, PlanRoundToNearest(8)({n: weights[n] for n in plan.tensors}), _unrecorded(config), rep))
        q_path = Path(tmp) / "model.onnx"
        q_path.write_bytes(q_bytes)

        # ---- validate in ONNX Runtime ------------------------------------------------------------
        # the posteriors, the planner's tables, the FP32 bytes and the extracted weights are done with: free
        # them before ORT holds two sessions
        fp_size, left_in_float = len(fp_bytes), collect.skipped
        left_share = {n: float_sizes.get(n, 0) / max(1, sum(float_sizes.values())) for n in left_in_float}
        left_warnings = float_left_warnings(left_in_float, left_share)
        for warning in left_warnings:
            rep.note(f"[yellow]warning: {warning}[/]")
        warnings += left_warnings
        linear = [n for n in plan.tensors if weights[n].in_linear_scope]
        sections = refine.sections
        posteriors = planner = fp_bytes = weights = collect = refine = None  # the FP32 file on disk is what ORT reads
        release_freed_memory()
        with rep.stage("validate in ONNX Runtime") as outcome:
            validation = validate(bundle, fp_path, q_path, providers, rep, target=config.target, seed=config.seed,
                                  latency_runs=config.latency_runs, latency_warmup=config.latency_warmup,
                                  memory_loads=config.memory_loads, undistilled=undistilled_path,
                                  reference=reference, eight_bit=eight_bit_path)
            verdict = validation["verdict"]
            if verdict["verdict"] != "holds":
                advice = verdict_advice(verdict, plan.all_in_bits)
                outcome.warn(advice)
                warnings.append(advice)
        if distilled is not None:
            distill_section = _distill_report(distilled, validation, bundle, q_path)

    sections = {**({"search": search} if search is not None else {}), **sections,
                **({"distill": distill_section} if distill_section is not None else {})}
    report = compile_report(
        config=config, bundle=bundle, export_check=export_check, plan=plan, linear=linear, fp_size=fp_size,
        artifact_bytes=len(q_bytes), accounting=accounting, validation=validation, provider_used=providers[0],
        provider_note=provider_note, left_in_float=left_in_float, left_share=left_share,
        posterior_sources=posterior_sources, sections=sections, warnings=warnings, timings=dict(rep.timings))
    with rep.stage("write artifact"):
        files = artifact.write_files(config.out, {
            artifact.MODEL: q_bytes, artifact.REPORT_JSON: to_json_bytes(report),
            artifact.REPORT_MD: to_markdown(report).encode(), artifact.BITS_PNG: bits_plot(plan)})
    return CompileResult(files[artifact.MODEL], report, plan)


def _analysis_title(config: CompileConfig, bundle: ModelBundle) -> str:
    if method_spec(config.method).analysis == "hessians":
        return "collect GPTQ Hessians (E[x xᵀ] of activations)"
    likelihood = f"{config.fisher} Fisher" if bundle.module is not None else "layer-wise likelihood"
    return f"fit posterior ({config.curvature}, {likelihood})"


def _fit_posteriors(config: CompileConfig, bundle: ModelBundle, fp_bytes: bytes, weights: dict[str, WeightInfo],
                    rep: Reporter) -> dict:
    """Every weight's posterior (its ``info["posterior"]`` says where it came from).

    The Laplace posterior from PyTorch gradients on the traced program; a weight no program op could be
    bound to (and every weight of an ONNX input, or for GPTQ, which needs only its layer inputs' second
    moments) gets the layer-wise likelihood on ORT activations. Mixed, the layer-wise precisions are put on
    the Laplace scale (:func:`~bayesq_onnx.bayes.layerwise.common_scale`) before any planner compares them.
    """
    hessians = method_spec(config.method).analysis == "hessians"  # GPTQ: its layer inputs' E[x xᵀ] only

    def layerwise() -> dict:
        return FitLayerPosterior(
            onnx.load_from_string(fp_bytes), bundle.calibration,
            curvature="kfac" if hessians else config.curvature, n_data=config.n_data,
            prior_precision=config.prior_precision,
            progress=lambda b: rep.track(b, "calibration activations (ORT)"))(weights)

    if bundle.module is None or hessians:
        return layerwise()
    laplace = FitLaplacePosterior(
        bundle, LaplaceOptions(curvature=config.curvature, fisher=config.fisher, samples=config.fisher_samples,
                               rank=config.rank, n_data=config.n_data, prior_precision=config.prior_precision,
                               seed=config.seed),
        progress=lambda b, i: rep.track(b, f"calibration pass {i + 1}"))
    posts = laplace(weights)
    if laplace.unbound:
        if config.curvature == "lowrank":
            raise UserError(f"{len(laplace.unbound)} weights (e.g. {laplace.unbound[0]}) are computed by the "
                            "exporter, not held by a traced op; `curvature` lowrank has no layer-wise form: use kfac or diag")
        rep.note(f"[yellow]{len(laplace.unbound)} of {len(weights)} weights hold no traced op's weight "
                 f"(e.g. {laplace.unbound[0]}): layer-wise posterior for them[/]")
        both = layerwise()
        scale = common_scale([(posts[n].design_weights(), both[n].design_weights()) for n in posts])
        for n in laplace.unbound:
            posts[n] = both[n].rescaled(scale)
    return posts


def _unrecorded(config: CompileConfig) -> CompileConfig:
    """``config`` for a rewrite that is only measured, never shipped (the 8-bit reference, the floor's
    candidates): its passes are not dumped to `dump_dir`."""
    return dataclasses.replace(config, dump_dir=None)


def _rewrite(fp_bytes: bytes, plan: Plan, config: CompileConfig, rep: Reporter,
             floats: dict[str, np.ndarray] | None = None) -> bytes:
    """The FP32 model with the plan's weights stored quantized (and the float initializers named in
    ``floats``, e.g. distilled biases, replaced by their new values), checked, serialized."""
    q_model = ir.serde.deserialize_model(onnx.load_from_string(fp_bytes))
    for name, value in (floats or {}).items():
        init = q_model.graph.initializers[name]
        if tuple(init.shape) != value.shape or init.dtype != ir.DataType.FLOAT:
            raise PassFailure(f"distilled value of {name!r} has shape {value.shape}, the initializer {init.shape}")
        init.const_value = ir.Tensor(np.ascontiguousarray(value, dtype=np.float32), name=name)
    _run(UpgradeOpsetPass(plan.min_opset), q_model, config, rep)
    _run(QuantizeWeightsPass(plan, target=config.target), q_model, config, rep)
    q_model.metadata_props.update(artifact_format.write(plan, session_config_for(config.target), __version__))
    q_bytes = _serialize(q_model)
    onnx.checker.check_model(onnx.load_from_string(q_bytes), full_check=True)
    return q_bytes


def _run(p: ir.passes.PassBase, model: ir.Model, config: CompileConfig,
         rep: Reporter | None = None) -> ir.passes.PassResult:
    """Run one pass; with `verify_each` check the model after it, with `dump_dir` save it."""
    name = type(p).__name__
    start = time.perf_counter()
    try:
        result = p(model)
    except BayesQError:
        raise
    except ir.passes.PassError as exc:
        raise PassFailure(f"{name}: {exc}") from exc
    if config.verify_each:
        try:
            onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise PassFailure(f"{name} produced an invalid model: {str(exc).splitlines()[0]}") from exc
    if config.dump_dir is not None:
        Path(config.dump_dir).mkdir(parents=True, exist_ok=True)
        index = len(list(Path(config.dump_dir).glob("*.onnx")))
        ir.save(result.model, Path(config.dump_dir) / f"{index:02d}-{name}.onnx")
    if rep is not None:
        rep.debug(f"  pass {name}: {'modified' if result.modified else 'no change'} "
                  f"({time.perf_counter() - start:.2f} s)")
    return result


def _serialize(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def _check_source_supports(config: CompileConfig, bundle: ModelBundle) -> None:
    """Settings that need a PyTorch model, refused for an ONNX input before any work is done."""
    if bundle.module is None and config.reconstruct:
        raise UserError("`reconstruct` runs the PyTorch model block by block; an ONNX input has none: drop `reconstruct`")
    if bundle.module is None and config.distill:
        raise UserError("`distill` trains a PyTorch copy of the model; an ONNX input has none: drop `distill`")
    if bundle.module is not None or method_spec(config.method).analysis == "none":
        return
    if config.risk == "mc":
        raise UserError("`risk` mc perturbs a PyTorch model; an ONNX input takes `risk` closed")
    if config.curvature == "lowrank":
        raise UserError("`curvature` lowrank needs per-item gradients of a PyTorch model; "
                        "an ONNX input takes `curvature` kfac or diag")
    if config.fisher != "true":
        raise UserError("`fisher` empirical needs a PyTorch model and labels; an ONNX input uses the layer-wise "
                        "likelihood on activations: drop `fisher`")


def _float_sizes(model: ir.Model) -> dict[str, int]:
    """Values held by each floating-point initializer: the denominator of "share of the model's weights"."""
    return {name: int(np.prod(value.shape)) for name, value in model.graph.initializers.items()
            if value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)
            and value.shape is not None}


def _check_finite(model: ir.Model) -> None:
    """A NaN or Inf in any float initializer makes every metric meaningless: refuse, naming the tensor."""
    for name, value in model.graph.initializers.items():
        if value.const_value is not None and value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
            if not np.isfinite(value.const_value.numpy()).all():
                raise UserError(f"weight {name!r} holds NaN or Inf values; fix the checkpoint before quantizing")


def _distill(config: CompileConfig, bundle: ModelBundle, plan: Plan, bindings: dict, posteriors,
             rep: Reporter) -> tuple[DistillResult | None, str | None]:
    """Distill ``plan`` (docs/design.md §3.6; :mod:`bayesq_onnx.distill`): ``(result, None)``, or ``(None, why)``
    with a note when the student cannot reproduce the artifact exactly (the compile goes on undistilled).

    A method without a posterior (rtn) has no posterior predictive: the teacher falls back to the FP32
    model, said in a note and in the report, rather than failing a compile whose default teacher is the
    posterior one.
    """
    teacher, note = config.teacher, None
    if teacher == "posterior" and not posteriors:
        teacher, note = "fp", f"`method` {config.method} fits no posterior: teacher is the FP32 model"
        rep.note(f"[yellow]distill: {note}[/]")
    label = f"{config.teacher_samples} posterior samples" if teacher == "posterior" else "FP32"
    with rep.stage(f"distill (teacher: {label})"):
        try:
            options = DistillOptions(teacher=teacher, samples=config.teacher_samples, steps=config.distill_steps,
                                     lr=config.distill_lr, seed=config.seed)
            result = distill(bundle.module, plan, bindings, bundle.calibration, bundle.input_names,
                             likelihood=bundle.likelihood, options=options, posteriors=posteriors,
                             progress=rep.track)
        except DistillUnsupported as exc:
            rep.note(f"[yellow]distillation skipped: {exc}[/]")
            return None, str(exc)
    if note:
        result.stats["teacher_note"] = note
    s = result.stats
    if "teacher_fallback" in s:
        rep.note(f"[yellow]distill: {s['teacher_fallback']}[/]")
    rep.note(f"  held-out calibration loss {s['heldout_loss_before']:.4g} → {s['heldout_loss_after']:.4g} "
             f"(best at step {s['best_step']} of {s['steps']})")
    return result, None


def _distill_report(distilled: DistillResult, validation: dict, bundle: ModelBundle, q_path: Path) -> dict:
    """The distill section: training figures, the metric before / after, and how exactly the student
    reproduces the written artifact (max |student − ORT| on the first calibration batch, CPU provider)."""
    session, _ = make_session(q_path, ["CPUExecutionProvider"], session_config_for("size"))
    got = run_batches(session, bundle.calibration[:1])
    headline = bundle.headline or next(iter(validation["fidelity"]))
    before = validation.pop("undistilled_fidelity")
    return {**distilled.stats, "headline": headline, "before": before[headline],
            "after": validation["fidelity"][headline], "fidelity_before": before,
            "student_vs_artifact_max_abs_diff": float(np.abs(got - distilled.student_output).max())}
