"""Look at any ONNX file after the fact: what a BayesQ artifact stores per tensor (``bayesq inspect``), and
the artifact's validation against an FP32 reference re-run on any pair of models (``bayesq validate``).

Both work from the files alone: the artifact's metadata (``bayesq.tensors``, written by the pipeline) names
the stored arrays of every quantized tensor, so the accounting of docs/design.md §2 can be redone without the plan.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from . import artifact as artifact_files
from . import artifact_format
from .errors import UserError
from .models.base import Batch, SourceOptions
from .models.metrics import bootstrap_interval, output_fidelity
from .models.onnx_file import batch_size, batches_for, load_proto, read_inputs
from .passes.collect_weights import CollectWeightsPass
from .planning import candidates
from .report import tensor_bytes
from .runtime.latency import latency_versus_fp32
from .runtime.session import make_session, resolve_providers, run_batches, session_config_for
from .verdict import judge, measure_for
from .weights import graph_order

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.DOUBLE}
# the metadata's all-in bits is written with 6 decimals
_METADATA_TOLERANCE = 1e-6


# ---- reading ---------------------------------------------------------------------------------------

def resolve_model_path(path: str | Path, what: str = "artifact") -> Path:
    """``path`` itself when it is a file, ``path/model.onnx`` when it is an artifact directory."""
    path = Path(path)
    if path.is_dir():
        inner = path / artifact_files.MODEL
        if not inner.is_file():
            raise UserError(f"{what} {path} is a directory without {artifact_files.MODEL}; "
                            "pass a model.onnx file or a 'bayesq compile' output directory")
        return inner
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file; pass a model.onnx file or a 'bayesq compile' output directory")
    return path


def load_onnx(path: str | Path, what: str = "artifact") -> tuple[Path, onnx.ModelProto]:
    """The resolved path and the model proto (external data pulled in); one-line errors for a missing,
    unreadable or non-ONNX file."""
    path = resolve_model_path(path, what)
    return path, load_proto(path, f"{what} {path}")


def _opset(proto: onnx.ModelProto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _family_and_bits(label: str) -> tuple[str, int | None]:
    """Family (uniform / codebook / float, as in :mod:`bayesq_onnx.plan`) and code bits of a candidate label."""
    try:
        c = candidates.parse(label)
        return c.family, c.bits
    except UserError:
        # labels outside the named table (e.g. rtn with --group-size 256) follow the same spelling
        m = re.fullmatch(r"(u?int|codebook|fp)(\d+)(-.*)?", label)
        if m is None:
            return "unknown", None
        family = {"uint": "uniform", "int": "uniform", "codebook": "codebook", "fp": "float"}[m.group(1)]
        return family, int(m.group(2))


# ---- inspect ---------------------------------------------------------------------------------------

def inspect_artifact(path: str | Path) -> dict:
    """What an ONNX file holds, as a JSON-ready dict.

    For a BayesQ artifact: per quantized tensor its shape, weights, candidate label, family, nominal code
    bits, stored bytes measured from the initializers its metadata names, and all-in bits = 8·bytes/weights;
    totals over quantized tensors (all-in bits recomputed from the file and as the metadata states them,
    ``accounting_ok`` when they agree and no stored array is missing), the float initializers left as they
    are, file size, opset, method, version and ORT session settings. For any other ONNX file: the float
    weights of MatMul/Gemm/Conv/Gather that ``bayesq compile onnx:FILE`` would consider.
    """
    path, proto = load_onnx(path)
    meta = artifact_format.read(proto.metadata_props, f"artifact {path}")
    sizes = {t.name: tensor_bytes(t) for t in proto.graph.initializer}
    is_float = {t.name: t.data_type in _FLOAT_TYPES for t in proto.graph.initializer}
    out = {"path": str(path), "file_bytes": path.stat().st_size, "opset": _opset(proto),
           "bayesq_artifact": meta is not None}
    if meta is None:
        out["note"] = "not a BayesQ artifact: no bayesq.* metadata; listing the weights 'bayesq compile' would see"
        out.update(_plain_weights(proto, sizes))
        floats = [n for n in sizes if is_float[n]]
        out["float_initializers"] = {"count": len(floats), "bytes": sum(sizes[n] for n in floats)}
        return out

    out.update(method=meta.method, version=meta.version, ort_session_config=meta.session_config)
    tensors, stored, missing = [], set(), []
    for name, entry in sorted(meta.tensors.items()):
        label, shape, arrays = entry.label, entry.shape, entry.arrays
        family, bits = _family_and_bits(label)
        n = max(int(np.prod(shape)), 1)
        missing += [a for a in arrays if a not in sizes]
        nbytes = sum(sizes.get(a, 0) for a in arrays)
        stored.update(arrays)
        tensors.append({"name": name, "shape": shape, "weights": n, "label": label, "family": family,
                        "bits": bits, "bytes": nbytes, "all_in_bits": 8 * nbytes / n, "arrays": arrays})
    weights = sum(t["weights"] for t in tensors)
    q_bytes = sum(t["bytes"] for t in tensors)
    all_in = 8 * q_bytes / max(weights, 1)
    rest = [n for n in sizes if n not in stored]
    floats = [n for n in rest if is_float[n]]
    out.update(
        tensors=tensors,
        totals={"quantized_tensors": len(tensors), "quantized_weights": weights, "quantized_bytes": q_bytes,
                "all_in_bits": all_in, "all_in_bits_metadata": meta.all_in_bits,
                "nominal_bits": sum((t["bits"] or 0) * t["weights"] for t in tensors) / max(weights, 1),
                "missing_arrays": missing,
                "accounting_ok": not missing and abs(all_in - meta.all_in_bits) <= _METADATA_TOLERANCE},
        float_initializers={"count": len(floats), "bytes": sum(sizes[n] for n in floats)},
        other_initializers={"count": len(rest) - len(floats), "bytes": sum(sizes[n] for n in rest if n not in floats)},
    )
    return out


def _plain_weights(proto: onnx.ModelProto, sizes: dict[str, int]) -> dict:
    """The weights CollectWeightsPass finds in a plain model, marked with the ``scope`` that quantizes them."""
    collect = CollectWeightsPass(scope="all")
    collect(ir.serde.deserialize_model(proto))
    weights = [{"name": w.name, "shape": list(w.layout.shape), "weights": w.size, "consumers": sorted(set(w.consumers)),
                "scope": "linear" if w.in_linear_scope else "all", "bytes": sizes[w.name]}
               for w in (collect.weights[n] for n in graph_order(collect.weights))]
    return {"weights": weights,
            "totals": {"weights": sum(w["weights"] for w in weights), "bytes": sum(w["bytes"] for w in weights),
                       "linear_scope_weights": sum(w["weights"] for w in weights if w["scope"] == "linear")}}


# ---- validate --------------------------------------------------------------------------------------

def _signature(proto: onnx.ModelProto) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(name, element type) of the graph inputs (initializers excluded) and of the outputs."""
    inits = {t.name for t in proto.graph.initializer}

    def typed(v: onnx.ValueInfoProto) -> tuple[str, str]:
        if v.type.HasField("tensor_type"):
            return v.name, onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower()
        return v.name, str(v.type.WhichOneof("value"))

    return [typed(v) for v in proto.graph.input if v.name not in inits], [typed(v) for v in proto.graph.output]


def _check_same_signature(q_proto: onnx.ModelProto, fp_proto: onnx.ModelProto) -> None:
    """Raise :class:`UserError` unless both models take and give the same names and element types."""
    spell = lambda sig: "[" + ", ".join(f"{n}: {t}" for n, t in sig) + "]"  # noqa: E731
    for kind, a, b in zip(("inputs", "outputs"), _signature(q_proto), _signature(fp_proto)):
        if a != b:
            raise UserError(f"the artifact's {kind} {spell(a)} differ from the reference's {spell(b)}; "
                            "validate against the FP32 model the artifact was compiled from")


def _session(path: Path, proto: onnx.ModelProto, providers: list[str], default_config: dict[str, str],
             what: str):
    """A session with the settings the model's metadata asks for (else ``default_config``), and its start time."""
    meta = artifact_format.read(proto.metadata_props, f"{what} {path}")
    config = meta.session_config if meta is not None else default_config
    try:
        session, start = make_session(path, providers, config)
    except Exception as exc:  # noqa: BLE001 - ORT reports load failures as several exception types
        raise UserError(f"{what} {path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from exc
    return session, start, config


def npz_evaluation(reference: onnx.ModelProto, data: str | Path) -> list[Batch]:
    """Batches of an .npz checked against the reference's inputs (names, dtypes, fixed dims): batches of
    the model's fixed batch size, else of :data:`~bayesq_onnx.models.onnx_file.BATCH` items."""
    inits = {t.name for t in reference.graph.initializer}
    specs = {i.name: i.type.tensor_type for i in reference.graph.input if i.name not in inits}
    arrays = read_inputs(Path(data), specs, "`data`")
    return batches_for(arrays, batch_size(specs))


def validate_pair(artifact: str | Path, reference: str | Path, *, data: str | Path | None = None,
                  model: str | None = None, options: SourceOptions | None = None, provider: str = "auto",
                  runs: int = 20, warmup: int = 3) -> dict:
    """Re-run the pipeline's validation on ``artifact`` against the FP32 ``reference``, shaped like the
    compile report's: ``fidelity`` (and its ``headline``), ``latency`` (median/p90 per model and their
    ``ratio``), ``session_start_s`` and ``provider``.

    Inputs: ``data`` (an .npz of arrays named like the model inputs; metric: output fidelity of the first
    output), or the evaluation set, metric and latency feed of model source ``model`` loaded with
    ``options`` (pass the compile's `calib_size`/`eval_size` to get its evaluation items). Latency runs on
    the first .npz batch, or the source's latency feed. The artifact runs with the ORT settings its
    metadata stores (default: size mode).
    """
    if data is None and model is None:
        raise UserError("bayesq validate needs evaluation inputs: `data` FILE.npz (arrays named like the model "
                        "inputs) or `model` SPEC (its evaluation set, e.g. minilm)")
    if data is not None and model is not None:
        raise UserError("pass one of `data` FILE.npz and `model` SPEC, not both")
    if runs < 1 or warmup < 0:
        raise UserError("`runs` must be at least 1 (and the warm-up runs at least 0)")
    providers, note = resolve_providers(provider)
    q_path, q_proto = load_onnx(artifact, "artifact")
    fp_path, fp_proto = load_onnx(reference, "reference")
    _check_same_signature(q_proto, fp_proto)

    categorical, higher_is_better = False, True
    if data is not None:
        batches, metric, headline = npz_evaluation(fp_proto, data), output_fidelity, "cosine_mean"
        latency_feed, source = batches[0], f"{data}"
    else:
        from .models import load_model

        bundle = load_model(model, options or SourceOptions())
        batches, metric, headline = bundle.evaluation, bundle.metric, bundle.headline
        latency_feed, source = bundle.latency_feed, f"evaluation set of {bundle.name}"
        categorical, higher_is_better = bundle.likelihood == "categorical", bundle.higher_is_better
        wanted = [name for name, _ in _signature(fp_proto)[0]]
        if not set(wanted) <= set(batches[0]):
            raise UserError(f"`model` {model} feeds inputs {sorted(batches[0])}, but the reference takes {wanted}; "
                            "pass the model the reference was exported from, or `data` FILE.npz")

    fp_session, fp_start, _ = _session(fp_path, fp_proto, providers, {}, "reference")
    q_session, q_start, q_config = _session(q_path, q_proto, providers, session_config_for("size"), "artifact")
    expected = run_batches(fp_session, batches)
    got = run_batches(q_session, batches)
    fidelity = metric(expected, got)
    latency = latency_versus_fp32(fp_session, q_session, latency_feed, providers[0], runs=runs, warmup=warmup)
    headline = headline if headline in fidelity else next(iter(fidelity))
    seed = (options or SourceOptions()).seed
    ci95 = bootstrap_interval(metric, expected, got, headline, seed=seed)
    # the compile's rule without its 8-bit reference (that needs the plan): the fixed tolerance only
    verdict = judge(measure_for(metric, headline, categorical=categorical, higher_is_better=higher_is_better),
                    expected, got, None, seed=seed)
    return {"artifact": str(q_path), "reference": str(fp_path), "inputs": source,
            "fidelity": fidelity, "headline": {"metric": headline, "value": fidelity[headline],
                                               "ci95": list(ci95), "items": int(len(expected))},
            "verdict": verdict,
            "latency": latency, "session_start_s": {"fp32": fp_start, "quantized": q_start},
            "provider": {"requested": provider, "used": providers[0], "note": note,
                         "artifact_session_config": q_config}}
