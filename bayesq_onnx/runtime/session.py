"""ONNX Runtime sessions: provider choice (CUDA when usable, told loudly when asked for and absent)."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import UserError

from ..choices import PROVIDERS  # noqa: F401 (re-exported)
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"

# ORT's default QDQ handling leaves DequantizeLinear nodes unfolded (to look for quantized kernels); with it
# off, every DequantizeLinear over an initializer folds to a plain float weight when the session starts.
FOLD_DEQUANTIZE_LINEAR_CONFIG = {"session.disable_quant_qdq": "1"}


def session_config_for(target: str) -> dict[str, str]:
    """Session settings an artifact of ``target`` is meant to run with.

    size: none -- its decodes use no DequantizeLinear and fold in a default session
    (``ort.InferenceSession(path)``); speed: none -- ORT's QDQ handling must stay on to fuse
    DequantizeLinear → MatMul into MatMulNBits; cuda: uniform weights stay behind DequantizeLinear (the CUDA
    execution provider runs it natively), folded at session start with QDQ handling off.
    """
    return dict(FOLD_DEQUANTIZE_LINEAR_CONFIG) if target == "cuda" else {}


@functools.lru_cache(maxsize=1)
def cuda_status() -> tuple[bool, str]:
    """Whether the CUDA EP really runs here (not just whether this ORT build lists it), and why not."""
    if CUDA not in ort.get_available_providers():
        return False, f"this onnxruntime build ({ort.__version__}) has no CUDA execution provider"
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    # A failed CUDA load is expected on CPU machines and ORT logs it through its default logger;
    # silence that for the probe and say it once, in our own words, below.
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=[CUDA, CPU])
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable", with the reason
        return False, f"the CUDA execution provider failed to start: {str(exc).splitlines()[0]}"
    finally:
        ort.set_default_logger_severity(3)
    if session.get_providers()[0] != CUDA:
        return False, "the CUDA execution provider could not start (no CUDA GPU or driver on this machine)"
    return True, "CUDA execution provider available"


def resolve_providers(requested: str) -> tuple[list[str], str]:
    """Providers for ``provider`` and a one-line note of what was chosen and why."""
    if requested not in PROVIDERS:
        raise UserError(f"unknown provider {requested!r}; choose one of {', '.join(PROVIDERS)}")
    if requested == "cpu":
        return [CPU], "CPU execution provider (requested)"
    usable, why = cuda_status()
    if requested == "cuda":
        if not usable:
            raise UserError(f"`provider` cuda: {why}; use `provider` cpu or auto")
        return [CUDA, CPU], "CUDA execution provider (requested)"
    if usable:
        return [CUDA, CPU], "CUDA execution provider (auto)"
    return [CPU], f"CPU execution provider (auto: {why})"


def make_session(model: str | Path | bytes, providers: list[str],
                 config: dict[str, str] | None = None, threads: int = 0) -> tuple[ort.InferenceSession, float]:
    """Create a session; returns it with its start time in seconds (load + graph optimization)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    start = time.perf_counter()
    session = ort.InferenceSession(str(model) if isinstance(model, Path) else model, options, providers=providers)
    return session, time.perf_counter() - start


def run_batches(session: ort.InferenceSession, batches: list[dict[str, np.ndarray]], progress=None) -> np.ndarray:
    """First output on every batch, concatenated (:func:`concat_items`).

    Whole arrays on purpose: its callers score the evaluation set (validation, the budget search,
    ``bayesq validate``), and a metric and its bootstrap interval need every item's output at once (the kNN
    overlap compares items with each other). That set is bounded by ``eval_size``; the calibration set's
    outputs are never gathered like this (the posterior fit and distillation take them a batch at a time).
    """
    names = {i.name for i in session.get_inputs()}
    batches = progress(batches) if progress else batches
    return concat_items([session.run(None, {k: v for k, v in b.items() if k in names})[0] for b in batches])


def concat_items(outputs: list[np.ndarray]) -> np.ndarray:
    """Batches' outputs joined along the item axis. Where a later axis differs in length across batches (one
    row per token, batches of different lengths), each is zero-padded at its end to the longest: two models
    compared on the same batches get the same padding, and zeros add nothing to any per-item dot product,
    norm or difference, so the fidelity figures are those of the unpadded outputs."""
    if len({o.shape[1:] for o in outputs}) <= 1:
        return np.concatenate(outputs)
    longest = np.max([o.shape[1:] for o in outputs], axis=0)
    return np.concatenate([np.pad(o, [(0, 0)] + [(0, int(m) - d) for m, d in zip(longest, o.shape[1:])])
                           for o in outputs])
