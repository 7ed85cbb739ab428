"""Shared test helpers: plan every weight of a tiny model with one candidate, run models in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnx.reference.op_run import OpRun

from bayesq_onnx.passes.collect_weights import CollectWeightsPass
from bayesq_onnx.passes.quantize_weights import QuantizeWeightsPass
from bayesq_onnx.passes.upgrade_opset import UpgradeOpsetPass
from bayesq_onnx.plan import Candidate, Plan, QuantizedTensor
from bayesq_onnx.planning.rtn import fit_minmax
from bayesq_onnx.quant import codebook
from bayesq_onnx.weights import canonical_mu


def plan_all(proto: onnx.ModelProto, cand: Candidate, scope: str = "all", seed: int = 0) -> Plan:
    """A plan giving every weight ``cand``: min-max for uniform, random sorted levels for codebooks."""
    model = ir.serde.deserialize_model(proto)
    collect = CollectWeightsPass(scope=scope, min_size=1)
    collect(model)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, w in collect.weights.items():
        lay = w.layout
        if cand.family == "uniform":
            tensors[name] = fit_minmax(w, cand)
        elif cand.family == "codebook":
            per = cand.rows_per_table(lay)
            levels = np.sort(rng.normal(0, w.array.std(), (lay.rows // per, 2**cand.bits)), axis=1)
            levels = levels.astype(np.float16)
            w2 = canonical_mu(w)
            codes = codebook.nearest_codes(w2, torch.from_numpy(levels), per).numpy()
            tensors[name] = QuantizedTensor(name, lay, cand, codes=codes, levels=levels)
        else:
            tensors[name] = QuantizedTensor(name, lay, cand, values=w.array)
    return Plan("test", tensors)


def rewrite(proto: onnx.ModelProto, plan: Plan, target: str = "size") -> tuple[ir.Model, list[bool]]:
    """Upgrade + quantize (in ``target``'s decode form); returns the model and the passes' ``modified`` flags."""
    model = ir.serde.deserialize_model(proto)
    flags = [UpgradeOpsetPass(plan.min_opset)(model).modified, QuantizeWeightsPass(plan, target)(model).modified]
    return model, flags


def reference_model(proto: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    """The FP32 model with every planned weight replaced by the plan's numpy dequantization."""
    ref = onnx.ModelProto()
    ref.CopyFrom(proto)
    for init in ref.graph.initializer:
        if init.name in plan.tensors:
            init.CopyFrom(onnx.numpy_helper.from_array(plan.tensors[init.name].dequantize(), init.name))
    return ref


def run(model: onnx.ModelProto | ir.Model | bytes, feed: dict, config: dict | None = None,
        optimized_path: str | None = None) -> np.ndarray:
    """First output of ``model`` in an ORT CPU session with no options but the session config entries
    ``config`` (none: how users load a model); ``optimized_path`` writes the graph ORT runs (at ORT's default
    optimization level, so it shows what the session folded)."""
    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # no warning for writing a model optimized at ORT_ENABLE_ALL
    for k, v in (config or {}).items():
        options.add_session_config_entry(k, v)
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def fit_parameters(module: torch.nn.Module, batches: list[dict[str, torch.Tensor]], parameters, *,
                   input_names: list[str], likelihood: str = "gaussian", targets=None, **options) -> dict:
    """:func:`~bayesq_onnx.bayes.laplace.fit_laplace` for named parameters of a plain module, keyed by
    parameter (``options``: :class:`~bayesq_onnx.bayes.laplace.LaplaceOptions` fields): traced as a compile
    traces it (axis 0 and every axis whose length differs across ``batches`` dynamic). A parameter several
    ops read (tied) is fitted on each; the first op in graph order is returned."""
    from bayesq_onnx.bayes.laplace import CalibrationData, LaplaceOptions, fit_laplace
    from bayesq_onnx.export import traced_program
    from bayesq_onnx.models.python_module import module_bundle
    from bayesq_onnx.traced import weight_ops

    program = traced_program(module_bundle(module, batches, input_names=input_names))
    wanted = set(parameters)
    ops = [op for op in weight_ops(program) if op.parameter in wanted]
    fitted = fit_laplace(program, CalibrationData(batches, input_names, likelihood, targets), LaplaceOptions(**options),
                         ops=ops)
    out: dict = {}
    for op in ops:
        if op.name in fitted and op.parameter not in out:
            out[op.parameter] = fitted[op.name]
    return out


class MatMulNBits(OpRun):
    """``com.microsoft.MatMulNBits`` as ONNX Runtime documents it: ``Y = A · dequantize(B)ᵀ`` with ``B``
    ``[N, K/block, block·bits/8]`` uint8, each block's codes packed from the lowest bits of each byte up;
    ``dequantize = (q − zero_point)·scale`` per block, ``scales`` ``[N, K/block]``, ``zero_points`` packed the
    same way per row (default ``2^(bits−1)``); ``bias`` ``[N]`` added."""

    op_domain = "com.microsoft"

    def _run(self, a, b, scales, zero_points=None, g_idx=None, bias=None, K=None, N=None, bits=None,
             block_size=None, accuracy_level=None, weight_prepacked=None):
        def unpack(packed: np.ndarray) -> np.ndarray:  # [..., n bytes] -> [..., n·8/bits] codes
            shifts = np.arange(0, 8, bits, dtype=np.uint8)
            return ((packed[..., None] >> shifts) & (2**bits - 1)).reshape(*packed.shape[:-1], -1)

        n_blocks = K // block_size
        q = unpack(b).reshape(N, n_blocks, block_size).astype(np.float32)
        if zero_points is None:
            z = np.full((N, n_blocks), 2 ** (bits - 1), np.float32)
        else:
            z = unpack(zero_points)[:, :n_blocks].astype(np.float32)
        w = ((q - z[..., None]) * scales.reshape(N, n_blocks, 1)).reshape(N, K)
        y = np.matmul(a, w.T) + (0 if bias is None else bias)
        return (y.astype(a.dtype),)
