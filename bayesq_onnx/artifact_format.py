"""What a BayesQ artifact records about itself in its ONNX ``metadata_props``: written by the compile, read by
``bayesq inspect`` / ``bayesq validate`` and by the ``onnx:`` source (which refuses to re-quantize an artifact).

Keys: ``bayesq.version``, ``bayesq.method``, ``bayesq.all_in_bits`` (the plan's figure, 6 decimals),
``bayesq.tensors`` (JSON: tensor name → candidate label, shape, and the initializers that store it, which is
what lets ``bayesq inspect`` redo the accounting from the file alone) and ``bayesq.ort_session_config``
(JSON: the ONNX Runtime session settings the artifact is meant for).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import UserError

VERSION, METHOD, ALL_IN_BITS = "bayesq.version", "bayesq.method", "bayesq.all_in_bits"
TENSORS, SESSION_CONFIG = "bayesq.tensors", "bayesq.ort_session_config"


@dataclass(frozen=True)
class TensorEntry:
    label: str             # the candidate, e.g. uint4-g128
    shape: list[int]       # the weight's shape in the FP32 model
    arrays: list[str]      # the initializers holding its codes, scales, zero points or levels


@dataclass(frozen=True)
class ArtifactMetadata:
    version: str
    method: str
    all_in_bits: float
    tensors: dict[str, TensorEntry]
    session_config: dict[str, str]


def write(plan, session_config: dict[str, str], version: str) -> dict[str, str]:
    """The metadata entries of an artifact holding ``plan`` (a :class:`~bayesq_onnx.plan.Plan`)."""
    tensors = {n: {"label": t.candidate.label, "shape": list(t.layout.shape),
                   "arrays": [f"{n}.{role}" for role in t.stored()]} for n, t in sorted(plan.tensors.items())}
    return {VERSION: version, METHOD: plan.method, ALL_IN_BITS: f"{plan.all_in_bits:.6f}",
            TENSORS: json.dumps(tensors, sort_keys=True), SESSION_CONFIG: json.dumps(session_config, sort_keys=True)}


def read(entries: Iterable, where: str) -> ArtifactMetadata | None:
    """The artifact metadata in ``entries`` (a model's ``metadata_props``: items with ``key`` and ``value``);
    ``None`` for a model that is not a BayesQ artifact, a :class:`UserError` naming ``where`` for damaged
    metadata."""
    props = {e.key: e.value for e in entries}
    if METHOD not in props:
        return None
    try:
        tensors = {name: TensorEntry(str(e["label"]), [int(d) for d in e["shape"]], [str(a) for a in e["arrays"]])
                   for name, e in json.loads(props[TENSORS]).items()}
        session_config = {str(k): str(v) for k, v in json.loads(props[SESSION_CONFIG]).items()}
        return ArtifactMetadata(props.get(VERSION, "?"), props[METHOD], float(props[ALL_IN_BITS]), tensors,
                                session_config)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UserError(f"{where}: its bayesq.* metadata is damaged ({type(exc).__name__}); recompile it "
                        "or read its report.json") from exc
