"""report.json (machine-readable), report.md (human), bits.png (bits per layer), and the accounting check
that the artifact's bytes equal the plan's bits."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx

from . import __version__
from .plan import Plan


def file_accounting(model_bytes: bytes, plan: Plan) -> dict:
    """Measure, from the serialized artifact, the bytes of every array the plan stores.

    all_in_bits_file = 8 · Σ bytes(stored arrays of quantized tensors) / quantized weights, which must equal
    the plan's all-in bits; the remainder of the file is float tensors left as they were and the graph.
    """
    proto = onnx.load_from_string(model_bytes)
    sizes = {t.name: tensor_bytes(t) for t in proto.graph.initializer}
    stored_names = {f"{name}.{role}" for name, qt in plan.tensors.items() for role in qt.stored()}
    quantized = sum(sizes[n] for n in stored_names if n in sizes)
    missing = sorted(n for n in stored_names if n not in sizes)
    other_tensors = sum(v for n, v in sizes.items() if n not in stored_names)
    return {
        "file_bytes": len(model_bytes),
        "quantized_tensor_bytes": quantized,
        "float_tensor_bytes": other_tensors,
        "graph_and_metadata_bytes": len(model_bytes) - quantized - other_tensors,
        "all_in_bits_file": 8 * quantized / max(plan.n_weights, 1),
        "missing_arrays": missing,
    }


# bits per element of the sub-byte integer types, for tensors not stored as raw_data
_SUB_BYTE = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}
for _name in ("INT2", "UINT2"):
    if hasattr(onnx.TensorProto, _name):
        _SUB_BYTE[getattr(onnx.TensorProto, _name)] = 2


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of a stored array at its ONNX element size: ``raw_data`` as is (how the rewrite writes every
    array); a tensor held in a typed field (``quantize_static`` writes scales to ``float_data`` and int4 zero
    points to ``int32_data``) at the size its raw form would have, sub-byte types packed (protobuf's varint
    encoding of typed fields is not counted)."""
    if t.HasField("raw_data"):
        return len(t.raw_data)
    n = int(np.prod(t.dims)) if len(t.dims) else 1
    if t.data_type in _SUB_BYTE:
        return (n * _SUB_BYTE[t.data_type] + 7) // 8
    return int(onnx.numpy_helper.to_array(t).nbytes)


def compile_report(*, config, bundle, export_check: dict, plan: Plan, linear: list[str], fp_size: int,
                   artifact_bytes: int, accounting: dict, validation: dict, provider_used: str, provider_note: str,
                   left_in_float: dict, left_share: dict, posterior_sources: dict, sections: dict,
                   warnings: list[str], timings: dict) -> dict:
    """What report.json holds for one compile (docs/cli.md#report): the config and versions, the export
    check, the bits (all-in over every quantized weight, and over the ``linear`` ones peers quantize), the
    sizes, the validation's figures, the plan, what stayed in float, and each stage's ``sections``."""
    from .runtime.session import session_config_for

    headline = bundle.headline or next(iter(validation["fidelity"]))
    return {
        "bayesq_onnx": __version__,
        "versions": _versions(),
        "config": config.to_json(),
        "model": {"name": bundle.name, **bundle.info},
        "export": export_check,
        "bits": {"budget": plan.settings.get("budget", config.bits), "all_in": plan.all_in_bits,
                 "all_in_from_file": accounting["all_in_bits_file"],
                 "nominal": plan.nominal_bits, "quantized_weights": plan.n_weights,
                 "quantized_tensors": len(plan.tensors),
                 # peers quantize Linear/Conv weights only: the same figure over those, for comparison
                 "linear_all_in": plan.all_in_bits_over(linear),
                 "linear_weights": sum(plan.tensors[n].n_weights for n in linear)},
        "sizes": {"fp32_bytes": fp_size, "artifact_bytes": artifact_bytes, "smaller_x": fp_size / artifact_bytes,
                  **accounting},
        "fidelity": validation["fidelity"],
        "verdict": validation["verdict"],
        "reference_8bit": validation["reference_8bit"],
        "headline": {"metric": headline, "value": validation["fidelity"][headline],
                     "ci95": list(validation["ci95"]), "items": validation["items"]},
        "latency": validation["latency"],
        "session_start_s": validation["session_start_s"],
        "memory": validation["memory"],
        "provider": {"requested": config.provider, "used": provider_used, "note": provider_note,
                     "artifact_session_config": session_config_for(config.target)},
        "plan": plan.to_json(),
        "left_in_float": left_in_float,
        "left_in_float_share": left_share,
        "posterior_sources": posterior_sources,
        **sections,
        "warnings": warnings,
        "timings_s": timings,
        "seed": config.seed,
    }


def _versions() -> dict:
    import platform

    import ml_dtypes
    import onnx_ir as ir
    import onnxruntime
    import onnxscript
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnx_ir": ir.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "ml_dtypes": ml_dtypes.__version__}


def to_markdown(report: dict) -> str:
    """report.md: one section after the other, each a list of lines from the report's own figures."""
    lines = [*_summary(report), *_verdict(report), *_metrics(report), *_latency(report), *_memory(report)]
    if "search" in report:
        lines += _search(report["search"])
    if "propagation" in report["plan"]["settings"]:
        lines += _propagation(report["plan"]["settings"]["propagation"])
    if "reconstruction" in report["plan"]["settings"]:
        lines += _reconstruction(report["plan"]["settings"]["reconstruction"])
    if "distill" in report:
        lines += _distillation(report["distill"], report["fidelity"])
    if report.get("left_in_float"):
        lines += ["## Float tensors left as they are", "", "| tensor | why |", "|---|---|"]
        lines += [f"| `{n}` | {why} |" for n, why in sorted(report["left_in_float"].items())]
        lines.append("")
    lines += _per_tensor(report["plan"]["tensors"])
    return "\n".join(lines) + "\n"


def _summary(report: dict) -> list[str]:
    b, sz = report["bits"], report["sizes"]
    return [
        f"# BayesQ-ONNX report: {report['model']['name']}",
        "",
        *[f"> **WARNING: {w}**\n" for w in report.get("warnings", [])],
        f"- method **{report['plan']['method']}**, all-in **{b['all_in']:.4f}** bits/weight "
        f"(from file: {b['all_in_from_file']:.4f}; nominal code bits {b['nominal']:.3f}) over "
        f"{b['quantized_weights']:,} weights in {len(report['plan']['tensors'])} tensors; "
        f"{b['linear_all_in']:.4f} over the {b['linear_weights']:,} Conv/Gemm/MatMul weights",
        f"- artifact {sz['artifact_bytes'] / 1e6:.2f} MB vs FP32 ONNX {sz['fp32_bytes'] / 1e6:.2f} MB "
        f"({sz['fp32_bytes'] / sz['artifact_bytes']:.2f}× smaller)",
        f"- provider: {report['provider']['note']}",
        f"- export check: max |ONNX − PyTorch| = {report['export']['max_abs_diff']:.2e}"
        if "max_abs_diff" in report["export"] else f"- input: {report['export']['source']}",
        "",
    ]


def _verdict(report: dict) -> list[str]:
    v = report.get("verdict")
    if not v:
        return []
    lines = ["## Verdict", "", f"**{v['verdict']}**: {v['line'].split(' — ', 1)[-1]}", ""]
    if v.get("loss") is not None:
        lines += ["| | " + v["measure"] + " | loss (0 = FP32, 1 = chance) |", "|---|---|---|",
                  f"| artifact | {v['value']:.4f} | {v['loss']:.4f} |"]
        if "reference_8bit" in v:
            lines.append(f"| 8-bit reference | {v['reference_8bit']['value']:.4f} | {v['reference_8bit']['loss']:.4f} |")
        lines += [f"| FP32 | {v['fp32']:.4f} | 0 |", f"| chance (another item's FP32 output) | {v['chance']:.4f} | 1 |",
                  "", "Rule (docs/reliability.md#verdict): collapsed at loss ≥ "
                  f"{v['collapse_loss']}, holds at loss ≤ {v['hold_loss']:.3f} (0.05, or twice the 8-bit "
                  "reference's loss), degraded between.", ""]
    if report.get("reference_8bit"):
        lines += ["The 8-bit reference's figures against FP32:", "", "| metric | value |", "|---|---|",
                  *[f"| {k} | {x:.4f} |" if isinstance(x, float) else f"| {k} | {x} |"
                    for k, x in report["reference_8bit"].items()], ""]
    return lines


def _metrics(report: dict) -> list[str]:
    h = report["headline"]
    return [
        "## Metrics on held-out data (FP32 reference and quantized artifact)",
        "",
        f"Headline {h['metric']} **{h['value']:.4f}**, bootstrap 95 % interval {h['ci95'][0]:.4f}–{h['ci95'][1]:.4f} "
        f"over {h['items']} items." if "ci95" in h else f"Headline {h['metric']} **{h['value']:.4f}**.",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in report["fidelity"].items()],
        "",
    ]


def _latency(report: dict) -> list[str]:
    lat = report["latency"]
    return [f"## Latency ({lat['feed']}, {lat['provider']})", "",
            "| model | median ms | p90 ms | session start s |", "|---|---|---|---|",
            *[f"| {key} | {lat[key]['median_ms']:.2f} | {lat[key]['p90_ms']:.2f} | "
              f"{report['session_start_s'][key]:.3f} |" for key in ("fp32", "quantized")],
            "", f"Latency ratio quantized / FP32 (median): **{lat['ratio']:.3f}**", ""]


def memory_summary(memory: dict) -> str:
    """``", memory x0.65 peak / x0.65 resident"`` for the CLI's last line (nothing when it was not measured)."""
    ratio = memory.get("ratio")
    if not ratio or ratio.get("peak") is None:
        return ""
    resident = f" / x{ratio['resident']:.2f} resident" if ratio.get("resident") is not None else ""
    return f", memory x{ratio['peak']:.2f} peak{resident}"


def _memory(report: dict) -> list[str]:
    mem = report.get("memory")
    if not mem:
        return []
    lines = ["## Memory at load (a fresh process: ONNX Runtime session, then one run)", ""]
    if "error" in mem:
        return lines + [f"Not measured: {mem['error']}", ""]

    def mb(x) -> str:
        return "—" if x is None else f"{x:.1f}"

    loads = mem.get("loads", 1)
    lines += [f"Feed {mem['feed']}, {', '.join(mem['providers'])}. Whole-process figures from /proc/self/status "
              f"(the baseline is the process before its session), the median of {loads} load(s) of each model.", "",
              "| model | baseline MB | peak at session start MB | peak MB | resident after the run MB | session start s |",
              "|---|---|---|---|---|---|"]
    for key in ("fp32", "quantized"):
        m = mem[key]
        lines.append(f"| {key} | {mb(m['baseline']['resident_mb'])} | {mb(m['after_start']['peak_mb'])} | "
                     f"{mb(m['after_run']['peak_mb'])} | {mb(m['after_run']['resident_mb'])} | {m['session_start_s']:.3f} |")
    r, spread = mem["ratio"], mem.get("ratio_range") or {}
    resident = "—" if r["resident"] is None else f"{r['resident']:.3f}"
    ranges = {k: f" ({v[0]:.3f}–{v[1]:.3f} over the pairs of loads)" if v and v[0] != v[1] else ""
              for k, v in ((k, spread.get(k)) for k in ("peak", "resident"))}
    return lines + ["", f"Quantized / FP32: peak **{r['peak']:.3f}**{ranges['peak']}, resident **{resident}**"
                        f"{ranges['resident']}, session start **{r['session_start']:.3f}**", ""]


def _search(sr: dict) -> list[str]:
    return [f"## Budget search: least all-in bits with {sr['headline']} drop ≤ {sr['max_drop']:g}", "",
            f"FP32 {sr['headline']} {sr['fp32_score']:.4f}; chosen {sr['chosen_all_in_bits']:.3f} bits "
            f"after {len(sr['steps'])} validations ({sr['note']}).", "",
            f"| budget | all-in bits | {sr['headline']} | drop | within |", "|---|---|---|---|---|",
            *[f"| {st['budget']:.3f} | {st['all_in_bits']:.3f} | {st[sr['headline']]:.4f} | {st['drop']:.4f} | "
              f"{'yes' if st['within'] else 'no'} |" for st in sr["steps"]],
            ""]


def _propagation(p: dict) -> list[str]:
    return ["## Error propagation (codes re-rounded in graph order, bits unchanged)", "",
            f"Mode **{p['mode']}**: {p['levels']} levels, {p['rerounded']} tensors re-rounded, "
            f"{p['kept_planned_codes']} kept their planned codes (no better in the propagated metric), "
            f"{p['fixed']} not re-roundable (tables, grouped convolutions, shared weights); {p['seconds']:.1f} s.", ""]


def _reconstruction(r: dict) -> list[str]:
    """Per block, the Fisher-weighted output error of the planned and the reconstructed codes on the fitted
    and the held-out calibration items (planning/reconstruct.py)."""
    title = "## Block reconstruction (codes chosen block by block, bits unchanged)"
    if "skipped" in r:
        return [title, "", f"Skipped: {r['skipped']}.", ""]
    lines = [title, "",
             f"{r['blocks']} blocks (objective: {r['metric']} of the block outputs), {r['weights_changed']} of {r['weights_reconstructed']} weights changed "
             f"(fixed: {len(r['weights_fixed'])}); at most {r['steps_per_block']} steps per block on "
             f"{r['train_items']} items, codes kept by their error on {r['heldout_items']} held-out items; "
             f"{r['seconds']:.1f} s.", "",
             "| block | weights | codes moved | error before → after | held-out before → after | s |",
             "|---|---|---|---|---|---|"]
    for i, b in enumerate(r["per_block"]):
        lines.append(f"| {i} | {b['ops']} | {b['codes_moved']} | {b['error_before']:.4g} → {b['error_after']:.4g} "
                     f"| {b['heldout_error_before']:.4g} → {b['heldout_error_after']:.4g} | {b['seconds']:.1f} |")
    return lines + [""]


def _distillation(d: dict, fidelity: dict) -> list[str]:
    lines = ["## Distillation (calibration inputs only)", ""]
    if "skipped" in d:
        return lines + [f"Skipped: {d['skipped']}.", ""]
    return lines + [
        f"Teacher **{d['teacher']}** ({d['teacher_samples']} model(s)); loss {d['loss']}; "
        f"{d['steps']} of {d['max_steps']} steps (best at {d['best_step']}), {d['seconds']:.1f} s; "
        f"held-out calibration loss {d['heldout_loss_before']:.4g} → {d['heldout_loss_after']:.4g}; "
        f"student vs artifact max |Δ| {d['student_vs_artifact_max_abs_diff']:.2e}.", "",
        *[f"Note: {d[k]}.\n" for k in ("teacher_note", "teacher_fallback") if k in d],
        "| metric | without distillation | with |", "|---|---|---|",
        *[f"| {k} | {v:.4f} | {fidelity[k]:.4f} |" for k, v in d["fidelity_before"].items()
          if isinstance(v, float) and isinstance(fidelity.get(k), float)],
        ""]


def _per_tensor(tensors: list[dict]) -> list[str]:
    fmt = lambda v: "" if v is None else f"{v:.3g}"  # noqa: E731 - rtn plans carry no posterior figures
    return ["## Per tensor", "",
            "| tensor | shape | candidate | all-in bits | risk | Fisher mass | whitened error |",
            "|---|---|---|---|---|---|---|",
            *[f"| `{t['name']}` | {'×'.join(map(str, t['shape']))} | {t['candidate']['label']} | "
              f"{t['all_in_bits']:.3f} | {fmt(t.get('risk'))} | {fmt(t.get('fisher_mass'))} | "
              f"{fmt(t.get('whitened_error'))} |" for t in tensors]]


def bits_plot(plan: Plan) -> bytes:
    """PNG: all-in bits of every quantized tensor, in graph order of names, coloured by family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(plan.tensors)
    bits = [plan.tensors[n].stored_bits() / plan.tensors[n].n_weights for n in names]
    colours = {"uniform": "tab:blue", "codebook": "tab:orange", "float": "tab:gray"}
    fams = [plan.tensors[n].candidate.family for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(names)), 3.6), dpi=110)
    ax.bar(np.arange(len(names)), bits, color=[colours[f] for f in fams])
    ax.axhline(plan.all_in_bits, color="k", lw=1, ls="--", label=f"average {plan.all_in_bits:.3f}")
    for fam in sorted(set(fams)):
        ax.bar([0], [0], color=colours[fam], label=fam)
    ax.set_xlabel("quantized tensor (sorted by name)")
    ax.set_ylabel("all-in bits / weight")
    ax.set_title(f"{plan.method}: bits per tensor")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def to_json_bytes(report: dict) -> bytes:
    return (json.dumps(report, indent=2, sort_keys=False) + "\n").encode()


def verdict_advice(verdict: dict, bits: float) -> str:
    """The warning for a verdict that does not hold (bayesq_onnx/verdict.py): its figures and what to try."""
    what = {"collapsed": "do not deploy it",
            "degraded": "check it on your task before deploying",
            "unjudged": "give evaluation items on which the model's outputs differ"}[verdict["verdict"]]
    fix = "" if verdict["verdict"] == "unjudged" else "; try more bits, or `max_drop` to find the budget that holds"
    return f"{verdict['line']} at {bits:.3f} bits/weight: {what}{fix}"


def float_left_warnings(left_in_float: dict[str, str], share: dict[str, float]) -> list[str]:
    """One line per float tensor of at least the quantized size that stays in float for a reason other than
    the user's `scope`: the tensor, what reads it, and the share of the model's weights it leaves unquantized."""
    return [f"{name} stays in float ({share.get(name, 0.0):.1%} of the model's weights): {why}"
            for name, why in sorted(left_in_float.items()) if "outside `scope`" not in why]

