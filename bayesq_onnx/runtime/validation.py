"""Validation in ONNX Runtime: the export against PyTorch, and the artifact against the FP32 model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..export import torch_outputs
from ..models.base import ModelBundle
from ..models.metrics import bootstrap_interval
from ..progress import Reporter
from .latency import latency_versus_fp32
from .load_memory import LOADS, LoadProbeFailed, load_versus_fp32
from ..verdict import judge, measure_for
from .session import make_session, run_batches, session_config_for


def check_export(bundle: ModelBundle, fp_path: Path, bindings: dict, batches: int = 2) -> dict:
    """Max |ONNX − PyTorch| over the first calibration batches (CPU provider), and which parameters the
    exported graph holds as initializers."""
    session, _ = make_session(fp_path, ["CPUExecutionProvider"])
    sample = bundle.calibration[:batches]
    ref = torch_outputs(bundle.module, sample, bundle.input_names)
    got = run_batches(session, sample)
    all_params = [n for n, _ in bundle.module.named_parameters(remove_duplicate=False)]
    bound = {alias for b in bindings.values() for alias in b.aliases}
    return {"max_abs_diff": float(np.abs(ref - got).max()), "batches": len(sample), "items": int(len(ref)),
            "parameters": len(all_params), "parameters_bound": len(bound),
            # parameters the graph does not hold as such: unused, or folded into other constants
            "parameters_unbound": [n for n in all_params if n not in bound]}


def validate(bundle: ModelBundle, fp_path: Path, q_path: Path, providers: list[str], rep: Reporter, *,
             target: str, seed: int, latency_runs: int, latency_warmup: int, memory_loads: int = LOADS,
             undistilled: Path | None = None,
             reference: np.ndarray | None = None, eight_bit: Path | None = None) -> dict:
    """Fidelity of the artifact (and of ``undistilled``, and of ``eight_bit``: the same model with every
    quantized weight rounded to 8 bits, the verdict's reference) against the FP32 outputs on the evaluation
    set (``reference``, when a budget search already computed them) with the headline's bootstrap interval,
    the verdict (:func:`~bayesq_onnx.verdict.judge`), latency, session start, and the memory of loading each
    model in ``memory_loads`` fresh processes (:func:`~bayesq_onnx.runtime.load_memory.load_versus_fp32`, on
    the latency feed); the artifact's sessions take ``target``'s session settings."""
    fp_session, fp_start = make_session(fp_path, providers)
    q_session, q_start = make_session(q_path, providers, session_config_for(target))
    if reference is None:
        reference = run_batches(fp_session, bundle.evaluation, progress=lambda b: rep.track(b, "FP32 outputs"))
    candidate = run_batches(q_session, bundle.evaluation, progress=lambda b: rep.track(b, "quantized outputs"))
    fidelity = bundle.metric(reference, candidate)
    headline = bundle.headline or next(iter(fidelity))
    # the evaluation set is a sample: how far the headline could move on another one of the same size
    ci95 = bootstrap_interval(bundle.metric, reference, candidate, headline, seed=seed)
    eight_bit_out, eight_bit_fidelity = None, None
    if eight_bit is not None:
        session, _ = make_session(eight_bit, providers, session_config_for(target))
        eight_bit_out = run_batches(session, bundle.evaluation, progress=lambda b: rep.track(b, "8-bit reference"))
        eight_bit_fidelity = bundle.metric(reference, eight_bit_out)
        session = None
    measure = measure_for(bundle.metric, headline, categorical=bundle.likelihood == "categorical",
                          higher_is_better=bundle.higher_is_better)
    verdict = judge(measure, reference, candidate, eight_bit_out, seed=seed)
    latency = latency_versus_fp32(fp_session, q_session, bundle.latency_feed, providers[0],
                                  runs=latency_runs, warmup=latency_warmup)
    try:
        memory = load_versus_fp32(fp_path, q_path, bundle.latency_feed, providers, session_config_for(target),
                                  loads=memory_loads)
    except LoadProbeFailed as exc:  # a measurement that could not be made is reported, not fatal
        rep.note(f"[yellow]memory at load not measured: {exc}[/]")
        memory = {"error": str(exc)}
    out = {"fidelity": fidelity, "ci95": ci95, "items": int(len(reference)), "verdict": verdict,
           "reference_8bit": eight_bit_fidelity, "latency": latency,
           "session_start_s": {"fp32": fp_start, "quantized": q_start}, "memory": memory}
    if undistilled is not None:  # the same plan before distillation, on the same evaluation set
        session, _ = make_session(undistilled, providers, session_config_for(target))
        out["undistilled_fidelity"] = bundle.metric(
            reference, run_batches(session, bundle.evaluation, progress=lambda b: rep.track(b, "undistilled outputs")))
    return out
