"""``onnx:<file>``: a plain FP32 ONNX model with calibration inputs in an ``.npz`` (``calib``).

There is no PyTorch model behind it, so the posterior comes from the layer-wise Gaussian likelihood on
activations collected in ONNX Runtime (:mod:`bayesq_onnx.analysis.fit_layer_posterior`). Evaluation is fidelity
to the input model's first output, on ``data`` (FILE.npz) or else on items of ``calib`` held out from
calibration.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import onnx

from .. import artifact_format
from ..errors import UserError
from ..runtime.session import CPU, make_session
from .base import Batch, ModelBundle, SourceOptions
from .metrics import output_fidelity

BATCH = 32


def load(argument: str, options: SourceOptions) -> ModelBundle:
    path = Path(argument)
    model = read_model(path)
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    specs = {i.name: i.type.tensor_type for i in graph.input if i.name not in initializers}
    if options.calib is None:
        raise UserError(f"onnx:{path} needs calibration inputs: `calib` FILE.npz with one array per model input "
                        f"({', '.join(specs)}), items along the first axis")
    calib_arrays = read_inputs(options.calib, specs, "`calib`")
    batch = batch_size(specs)
    if options.data is not None:
        eval_arrays = read_inputs(options.data, specs, "`data`")
        calibration = _take(calib_arrays, 0, options.calib_size)
        evaluation = _take(eval_arrays, 0, options.eval_size)
        held_out = f"{options.data}"
    else:
        n = _items(calib_arrays)
        if n < 4:
            raise UserError(f"`calib` {options.calib} holds {n} items; hold-out evaluation needs at least 4 "
                            "(or pass evaluation inputs with `data` FILE.npz)")
        n_eval = min(options.eval_size, n // 2)
        calibration = _take(calib_arrays, 0, min(options.calib_size, n - n_eval))
        evaluation = _take(calib_arrays, n - n_eval, n_eval)
        held_out = f"last {n_eval} items of {options.calib}"
    latency = {k: np.resize(v, (options.latency_batch if batch is None else batch, *v.shape[1:]))
               for k, v in evaluation.items()}
    return ModelBundle(
        name=f"onnx:{path.name}",
        module=None,
        onnx_file=path,
        input_names=list(specs),
        output_names=[o.name for o in graph.output],
        dynamic_axes={},
        calibration=batches_for(calibration, batch),
        evaluation=batches_for(evaluation, batch),
        latency_feed=latency,
        metric=output_fidelity,
        headline="cosine_mean",
        info={"source": str(path), "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
              "calibration": str(options.calib), "calibration_items": _items(calibration),
              "evaluation": held_out, "evaluation_items": _items(evaluation),
              "fidelity_output": graph.output[0].name},
    )


def load_proto(path: Path, label: str) -> onnx.ModelProto:
    """The ONNX model at ``path`` (external data pulled in); one-line errors, naming it ``label``, for an
    unreadable or non-ONNX file."""
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for garbage
        raise UserError(f"{label} is not a readable ONNX model ({type(exc).__name__}); "
                        "check the file is complete") from exc
    # protobuf parses many non-ONNX byte strings into an empty message without complaint
    if not proto.graph.node:
        raise UserError(f"{label} has no graph nodes; it is not an ONNX model or it is truncated")
    return proto


def read_model(path: Path) -> onnx.ModelProto:
    """Load and check an FP32 input model; one-line errors for what a user can fix."""
    if not path.is_file():
        raise UserError(f"onnx:{path}: no such file; give the path of an .onnx model")
    model = load_proto(path, f"onnx:{path}")
    meta = artifact_format.read(model.metadata_props, f"onnx:{path}")
    if meta is not None:
        raise UserError(f"onnx:{path} is already a BayesQ artifact ({meta.method}, {meta.all_in_bits:g} bits); "
                        "compile the FP32 original instead")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise UserError(f"onnx:{path} fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    try:  # the FP32 model must run: it is the reference every figure is measured against
        make_session(path, [CPU])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise UserError(f"onnx:{path}: ONNX Runtime cannot run the model ({str(exc).splitlines()[0][:160]}); "
                        "quantize a model that runs in ONNX Runtime") from exc
    return model


def read_inputs(path: Path, specs: dict, flag: str) -> dict[str, np.ndarray]:
    """Arrays of an .npz, checked against the model's inputs: names, and for ONNX tensor specs (``specs``
    values not ``None``) dtype, rank and fixed dims."""
    if not Path(path).is_file():
        raise UserError(f"{flag} {path}: no such file; give an .npz with one array per model input")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{flag} {path} is not a readable .npz ({exc}); write it with numpy.savez") from exc
    missing, extra = sorted(set(specs) - set(arrays)), sorted(set(arrays) - set(specs))
    if missing or extra:
        raise UserError(f"{flag} {path}: arrays {sorted(arrays)} do not match the model inputs {sorted(specs)}"
                        + (f" (missing {missing})" if missing else "") + (f" (unexpected {extra})" if extra else ""))
    for name, t in specs.items():
        if t is None:
            continue
        a = arrays[name]
        want = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if a.dtype != want:
            raise UserError(f"{flag} {path}: input {name!r} is {a.dtype}, the model wants {want}; convert it with astype")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if t.HasField("shape") and (len(dims) != a.ndim or any(
                d is not None and d != s for d, s in list(zip(dims, a.shape))[1:])):
            raise UserError(f"{flag} {path}: input {name!r} has shape {a.shape}, the model wants "
                            f"{['?' if d is None else d for d in dims]} (items along the first axis)")
    if len({a.shape[0] for a in arrays.values()}) != 1:
        raise UserError(f"{flag} {path}: arrays hold different numbers of items "
                        f"({ {k: a.shape[0] for k, a in arrays.items()} }); the first axis must match")
    if _items(arrays) == 0:
        raise UserError(f"{flag} {path} holds no items")
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise UserError(f"{flag} {path}: input {name!r} contains NaN or Inf values")
    return arrays


def batch_size(specs: dict) -> int | None:
    """A fixed first dimension shared by the inputs (the model takes exactly that batch), else None."""
    fixed = {t.shape.dim[0].dim_value for t in specs.values()
             if t.HasField("shape") and t.shape.dim and t.shape.dim[0].HasField("dim_value")}
    return fixed.pop() if len(fixed) == 1 else None


def _items(arrays: dict[str, np.ndarray]) -> int:
    return int(next(iter(arrays.values())).shape[0])


def _take(arrays: dict[str, np.ndarray], start: int, count: int) -> dict[str, np.ndarray]:
    return {k: v[start:start + count] for k, v in arrays.items()}


def batches_for(arrays: dict[str, np.ndarray], fixed: int | None) -> list[Batch]:
    """Consecutive batches of the model's ``fixed`` batch size (only full ones), else of ``BATCH`` items."""
    size = fixed or BATCH
    n = _items(arrays)
    stop = n - n % size if fixed else n
    if stop == 0:
        raise UserError(f"the model takes batches of exactly {size} items; give at least {size} in the .npz")
    return [{k: np.ascontiguousarray(v[i:i + size]) for k, v in arrays.items()} for i in range(0, stop, size)]
