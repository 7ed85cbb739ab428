"""Our methods against the external peers on one model, every row evaluated the same way.

Rows: FP32; ``bayesq`` at each all-in budget; RTN per row at 2/3/4/8 bits and per group of 64/128 input
channels at 3/4 bits; GPTQ at each budget (both ways of mixing 3/4-bit layers at a fractional budget);
onnxruntime's MatMulNBits quantizers (RTN, HQQ, k-quant at 2/4/8 bits, block 32/128), ``quantize_static``
(QDQ, per-channel int8/int4 weights) and NNCF's ``compress_weights`` (INT4 per group / per channel with AWQ and
scale estimation, 4/8 mixed, INT8; in its own venv: ``bash benchmarks/setup_nncf.sh``) at their native points
(benchmarks/peers.py).

Every row: the bundle's metric on the bundle's evaluation set against the same FP32 reference outputs,
ONNX Runtime latency interleaved with the one FP32 session on the bundle's latency feed, session start,
file size, all-in bits (docs/design.md §2, the peers' measured from their files the same way) and the coverage of
our quantization scope. A row that fails (a peer that cannot handle an op, a setting a method refuses)
records the error and the run goes on.

    python benchmarks/compare.py                              # MiniLM, budgets 2.5 3.0 3.5 4.0
    python benchmarks/compare.py --model digits-resnet
    python benchmarks/compare.py --quick --methods bayesq ort-rtn   # small data, few latency runs
    python benchmarks/compare.py --methods bayesq gptq nncf --budgets 3.0 4.0 --out benchmarks/results/compare_minilm_nncf
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import peers as peer_mod

from bayesq_onnx import config as config_mod
from bayesq_onnx.config import CompileConfig
from bayesq_onnx.models import load_model
from bayesq_onnx.models.base import ModelBundle, SourceOptions
from bayesq_onnx.progress import Reporter
from bayesq_onnx.runtime.latency import compare_latency
from bayesq_onnx.runtime.session import (
    make_session,
    resolve_providers,
    run_batches,
    session_config_for,
)

OURS = ("bayesq", "rtn", "gptq")
METHOD_FAMILIES = (*OURS, *peer_mod.FAMILIES)
DEFAULT_METHODS = tuple(m for m in METHOD_FAMILIES if m != "aimet")
BUDGETS = (2.5, 3.0, 3.5, 4.0)
SPEED_BUDGETS = (4.5,)  # uniform 4/8-bit blocks with their scales and zero points cost ≥ 4.19 bits all-in
RTN_ROW_BITS = (2, 3, 4, 8)
RTN_GROUPS = ((64, 4), (128, 4), (64, 3), (128, 3))  # (group size, bits)


@dataclass
class Settings:
    budgets: tuple[float, ...] = BUDGETS
    speed_budgets: tuple[float, ...] = SPEED_BUDGETS  # bayesq --target speed (MatMulNBits form)
    fold_budgets: tuple[float, ...] = BUDGETS  # bayesq --target fold (every width on every weight, folded at load)
    reconstruct_budgets: tuple[float, ...] = ()  # bayesq --reconstruct (block reconstruction after planning)
    methods: tuple[str, ...] = DEFAULT_METHODS
    calib_size: int = 256
    eval_size: int = 1024
    latency_runs: int = 20
    latency_warmup: int = 3
    provider: str = "auto"
    seed: int = 0
    rtn_row_bits: tuple[int, ...] = RTN_ROW_BITS
    rtn_groups: tuple[tuple[int, int], ...] = RTN_GROUPS
    peer_bits: tuple[int, ...] = peer_mod.NBITS      # MatMulNBits peers' bits and blocks
    peer_blocks: tuple[int, ...] = peer_mod.BLOCKS
    rtn_accuracy_levels: tuple[int | None, ...] = (None,)  # ort-rtn MatMulNBits compute; see notes_text
    source: dict = field(default_factory=dict)  # weights/data/calib/task for CompileConfig


@dataclass(frozen=True)
class Job:
    label: str
    family: str      # method family (legend marker)
    series: str      # one line in the plot
    kind: str        # "ours" | "peer"
    config: dict | None = None
    peer: peer_mod.Peer | None = None


def jobs(settings: Settings) -> tuple[list[Job], list[str]]:
    """The rows to run, and notes on rows left out."""
    out: list[Job] = []
    notes: list[str] = []
    methods = settings.methods
    if "bayesq" in methods:
        out += [Job(f"bayesq {b:g}", "bayesq", "bayesq", "ours", {"method": "bayesq", "bits": b})
                for b in settings.budgets]
        out += [Job(f"bayesq speed {b:g}", "bayesq", "bayesq speed", "ours",
                    {"method": "bayesq", "bits": b, "target": "speed"}) for b in settings.speed_budgets]
        out += [Job(f"bayesq fold {b:g}", "bayesq", "bayesq fold", "ours",
                    {"method": "bayesq", "bits": b, "target": "fold"}) for b in settings.fold_budgets]
        out += [Job(f"bayesq reconstruct {b:g}", "bayesq", "bayesq reconstruct", "ours",
                    {"method": "bayesq", "bits": b, "reconstruct": True}) for b in settings.reconstruct_budgets]
    if "rtn" in methods:
        out += [Job(f"rtn b{b} row", "rtn", "rtn row", "ours", {"method": "rtn", "bits": b, "group_size": 0})
                for b in settings.rtn_row_bits]
        out += [Job(f"rtn b{b} g{g}", "rtn", f"rtn g{g}", "ours", {"method": "rtn", "bits": b, "group_size": g})
                for g, b in settings.rtn_groups]
    if "gptq" in methods:
        if "gptq" not in config_mod.METHODS:
            notes.append("gptq skipped: this checkout's bayesq_onnx.config.METHODS has no 'gptq' yet")
        else:
            has_mix = any(f.name == "gptq_mix" for f in dataclasses.fields(CompileConfig))
            mixes = tuple(getattr(config_mod, "GPTQ_MIXES", ("knapsack",))) if has_mix else (None,)
            for b in settings.budgets:
                # at a whole budget every layer gets the same width: the mix does not matter, one row
                for mix in (mixes[:1] if float(b).is_integer() else mixes):
                    kw = {"method": "gptq", "bits": b, "group_size": 0, "act_order": False}
                    if mix is not None:
                        kw["gptq_mix"] = mix
                    name = "gptq" if mix is None or float(b).is_integer() else f"gptq {mix}"
                    out.append(Job(f"{name} {b:g}", "gptq", name, "ours", kw))
    for p in peer_mod.all_peers(tuple(f for f in peer_mod.FAMILIES if f in methods), settings.peer_bits,
                                settings.peer_blocks, settings.rtn_accuracy_levels):
        out.append(Job(p.label, p.family, p.series, "peer", peer=p))
    return out, notes


# ---- one context shared by every row ------------------------------------------------------------------

@dataclass
class Context:
    bundle: ModelBundle
    model_spec: str
    settings: Settings
    providers: list[str]
    provider_note: str
    fp32_bytes: bytes
    export_s: float
    scope: dict[str, int]
    fp_session: object
    fp_start_s: float
    reference: np.ndarray
    headline: str


def make_context(bundle: ModelBundle, model_spec: str, settings: Settings) -> Context:
    providers, note = resolve_providers(settings.provider)
    start = time.perf_counter()
    fp32 = fp32_model_bytes(bundle)
    export_s = time.perf_counter() - start
    fp_session, fp_start = make_session(fp32, providers)
    reference = run_batches(fp_session, bundle.evaluation)
    headline = bundle.headline or next(iter(bundle.metric(reference, reference)))
    return Context(bundle, model_spec, settings, providers, note, fp32, export_s, peer_mod.scope_weights(fp32),
                   fp_session, fp_start, reference, headline)


def fp32_model_bytes(bundle: ModelBundle) -> bytes:
    """The FP32 ONNX model the pipeline starts from (:func:`bayesq_onnx.export.fp32_model`), serialized."""
    import onnx_ir as ir

    from bayesq_onnx.export import fp32_model

    return ir.serde.serialize_model(fp32_model(bundle)[0]).SerializeToString()


def evaluate(ctx: Context, model: bytes, session_config: dict | None) -> dict:
    """The same measurements for every row: metric vs the FP32 reference, latency vs FP32, session start."""
    session, start_s = make_session(model, ctx.providers, session_config)
    candidate = run_batches(session, ctx.bundle.evaluation)
    metrics = ctx.bundle.metric(ctx.reference, candidate)
    s = ctx.settings
    lat = compare_latency({"fp32": ctx.fp_session, "quantized": session}, ctx.bundle.latency_feed,
                          runs=s.latency_runs, warmup=s.latency_warmup)
    return {"metrics": metrics, "latency_ms": lat["quantized"]["median_ms"],
            "latency_p90_ms": lat["quantized"]["p90_ms"],
            "fp32_latency_ms": lat["fp32"]["median_ms"],
            "latency_ratio": lat["quantized"]["median_ms"] / lat["fp32"]["median_ms"], "session_start_s": start_s}


def _row(job: Job, ctx: Context) -> dict:
    return {"method": job.label, "family": job.family, "series": job.series, "all_in_bits": math.nan,
            "coverage": math.nan, "scope_bits": math.nan, "file_mb": math.nan, ctx.headline: math.nan,
            "compile_s": math.nan, "latency_ms": math.nan, "latency_ratio": math.nan, "session_start_s": math.nan,
            "error": ""}


def _fill(row: dict, ctx: Context, ev: dict) -> None:
    row[ctx.headline] = ev["metrics"][ctx.headline]
    for k in ("latency_ms", "latency_ratio", "session_start_s", "latency_p90_ms", "fp32_latency_ms"):
        row[k] = ev[k]
    for k, v in ev["metrics"].items():  # every other figure of the metric goes to the CSV
        if k != ctx.headline and isinstance(v, (int, float)):
            row[f"m:{k}"] = v


def run_fp32(ctx: Context) -> dict:
    row = _row(Job("fp32", "fp32", "fp32", "ours"), ctx)
    ev = evaluate(ctx, ctx.fp32_bytes, None)
    _fill(row, ctx, ev)
    row.update(all_in_bits=32.0, coverage=0.0, scope_bits=32.0, file_mb=len(ctx.fp32_bytes) / 1e6,
               compile_s=ctx.export_s)
    return row


def run_ours(job: Job, ctx: Context, out_dir: Path, row: dict) -> dict:
    from bayesq_onnx.pipeline import compile_model

    s = ctx.settings
    # scope linear: the peers quantize Conv/Gemm/MatMul weights only, so ours does the same here (the CLI's
    # default also quantizes embedding tables)
    config = CompileConfig(model=ctx.model_spec, out=out_dir, calib_size=s.calib_size, eval_size=s.eval_size,
                           provider=s.provider, seed=s.seed, latency_runs=1, latency_warmup=0, scope="linear",
                           **s.source, **job.config)
    start = time.perf_counter()
    with Reporter(quiet=True) as rep:
        result = compile_model(config, rep, bundle=ctx.bundle)
    wall = time.perf_counter() - start
    report = result.report
    # compile time = producing the artifact: the pipeline's own validation stage is not part of it
    validation = sum(v for k, v in report["timings_s"].items() if k.startswith("validate"))
    q = Path(result.artifact).read_bytes()
    session_config = report.get("provider", {}).get("artifact_session_config", session_config_for(config.target))
    bits = report["bits"]
    row.update(all_in_bits=bits["all_in"], all_in_from_file=bits.get("all_in_from_file"), coverage=1.0,
               scope_bits=bits["all_in"], file_mb=len(q) / 1e6, compile_s=wall - validation)
    _fill(row, ctx, evaluate(ctx, q, session_config))
    return row


def run_peer(job: Job, ctx: Context, row: dict) -> dict:
    start = time.perf_counter()
    q, acc = peer_mod.run_peer(job.peer, ctx.fp32_bytes, ctx.scope, ctx.bundle.calibration)
    row["compile_s"] = time.perf_counter() - start
    # accounting first: a peer whose file ORT cannot run still shows what it stored
    row.update(all_in_bits=acc.all_in_bits, coverage=acc.coverage, scope_bits=acc.scope_bits,
               file_mb=len(q) / 1e6, quantized_weights=acc.quantized_weights)
    if acc.notes:
        row["note"] = "; ".join(acc.notes)
    # ORT defaults (MatMulNBits and QDQ need no session settings), but NNCF's DequantizeLinear → MatMul with float
    # compute in the fused kernel (peers.Peer.session_config)
    ev = evaluate(ctx, q, job.peer.session_config)
    _fill(row, ctx, ev)
    return row


def short_error(exc: BaseException, limit: int = 240) -> str:
    """One line: the exception type and its message, the middle of a long ORT message cut out."""
    text = " ".join(str(exc).split()) or repr(exc)
    if "Status Message:" in text:  # ORT kernel failures: the node, then the check that failed
        head, _, tail = text.partition("Status Message:")
        node = head[head.find("Name:"):].strip() if "Name:" in head else head[:80]
        check = tail.rsplit("] ", 1)[-1] if "] " in tail else tail.rsplit(") const ", 1)[-1]  # drop the C++ signature
        text = f"{node} … {check.strip()}"
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit // 2 - 2] + " … " + text[-(limit // 2 - 2):]


def run_compare(bundle: ModelBundle, model_spec: str, settings: Settings,
                log=print) -> tuple[list[dict], Context, list[str]]:
    """Every row for ``bundle``; errors become rows."""
    ctx = make_context(bundle, model_spec, settings)
    todo, notes = jobs(settings)
    for n in notes:
        log(f"note: {n}")
    rows = [run_fp32(ctx)]
    log(_progress(rows[-1], ctx))
    with tempfile.TemporaryDirectory(prefix="bayesq-compare-") as tmp:
        for i, job in enumerate(todo):
            row = _row(job, ctx)
            try:  # the runners fill ``row`` as they go: a peer whose file ORT cannot run keeps its accounting
                if job.kind == "ours":
                    run_ours(job, ctx, Path(tmp) / f"row{i}", row)
                else:
                    run_peer(job, ctx, row)
            except Exception as exc:  # noqa: BLE001 - a failing row is a result: record it and go on
                row["error"] = short_error(exc)
            rows.append(row)
            log(_progress(row, ctx))
    notes += [f"`{r['method']}`: {r['note']}" for r in rows if r.get("note")]
    return rows, ctx, notes


def _progress(row: dict, ctx: Context) -> str:
    if row["error"]:
        return f"  {row['method']}: ERROR {row['error']}"
    return (f"  {row['method']}: {row['all_in_bits']:.3f} bits, coverage {row['coverage']:.2f}, "
            f"{ctx.headline} {row[ctx.headline]:.4f}, {row['compile_s']:.1f} s, latency ×{row['latency_ratio']:.2f}")


# ---- output --------------------------------------------------------------------------------------------

COLUMNS = [("method", "method"), ("all_in_bits", "all-in bits"), ("coverage", "coverage"),
           ("scope_bits", "bits over scope"), ("file_mb", "file MB"), (None, None), ("compile_s", "compile s"),
           ("latency_ms", "latency ms"), ("latency_ratio", "× FP32"), ("session_start_s", "session start s"),
           ("error", "error")]


def _fmt(v, digits: int) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.{digits}f}"
    return "" if v is None else str(v)


def markdown_table(rows: list[dict], headline: str) -> str:
    cols = [(k or headline, h or headline) for k, h in COLUMNS]
    digits = {"all_in_bits": 3, "coverage": 2, "scope_bits": 2, "file_mb": 2, headline: 4, "compile_s": 1,
              "latency_ms": 2, "latency_ratio": 2, "session_start_s": 3}
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), digits.get(k, 3)).replace("|", "\\|") for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def notes_text(ctx: Context, notes: list[str], command: str) -> str:
    b = ctx.bundle
    feed = ", ".join(f"{k} {'×'.join(map(str, v.shape))}" for k, v in b.latency_feed.items())
    s = ctx.settings
    weights = sum(ctx.scope.values())
    lines = [
        f"- command: `{command}`",
        (f"- model {b.name}: {len(ctx.scope)} weight tensors, {weights:,} weights in our scope (Conv/Gemm/MatMul); "
        f"FP32 ONNX {len(ctx.fp32_bytes) / 1e6:.2f} MB; evaluation {len(b.evaluation)} batches, "
        f"calibration {len(b.calibration)} batches (calib_size {s.calib_size}, eval_size {s.eval_size})"),
        (f"- metric `{ctx.headline}`: the bundle's metric on its held-out evaluation set, every row against the same "
        "FP32 reference outputs"),
        (f"- latency: median of {s.latency_runs} runs after {s.latency_warmup} warm-up, interleaved with the FP32 "
        f"session on the latency feed ({feed}); × FP32 = median / FP32 median; {ctx.provider_note}; "
        f"{platform.processor() or platform.machine()}"),
        ("- all-in bits (docs/design.md §2) = 8 · bytes of the stored arrays that encode quantized weights / weights "
        "quantized. Ours: from the report (equal to the file's). Peers: read from their files: MatMulNBits "
        "B + scales + zero_points (+ g_idx) over K·N; QDQ weight DequantizeLinear x + scale + zero point over "
        "the size of x. coverage = fraction of our scope's weights the method quantized; bits over scope counts "
        "the scope weights a peer left in FP32 at 32 bits"),
        ("- compile s: wall time to produce the artifact. Ours: `compile_model` on the loaded bundle (export, "
        "analysis, plan, rewrite, write; its own validation stage subtracted). Peers: the quantizer call on the "
        f"exported FP32 model (the export itself, {ctx.export_s:.1f} s, is not included; FP32 row: the export)"),
        ("- sessions: ours with the session settings the artifact records (size mode: none, a default "
        "session; its decodes fold at session start); peers with ORT defaults (nncf: see below) "
        "(MatMulNBits needs no setting; accuracy_level unset, i.e. float compute, unless the label says accN; "
        "QDQ models run ORT's quantized kernels). Our `--target speed` artifacts store DequantizeLinear → MatMul, "
        "which ORT fuses into MatMulNBits with its session default `session.qdq_matmulnbits_accuracy_level` = 4 "
        "(int8-quantized activations inside the kernel): faster than float compute, and the fidelity shown is "
        "measured with it"),
        ("- ort-static (`quantize_static`) also quantizes activations (uint8, MinMax calibration on the "
        "calibration batches, at the inputs/outputs of quantized MatMul/Gemm/Conv): it is not weight-only. "
        "MatMulNBits peers quantize MatMul weights only (Conv/Gemm stay FP32: coverage < 1)"),
    ]
    if "nncf" in s.methods:
        lines.append(
            "- nncf: `nncf.compress_weights` (ONNX backend) in its own venv (`bash benchmarks/setup_nncf.sh`), run by "
            "benchmarks/nncf_peer.py on the same FP32 model, embeddings (Gather) in its ignored scope as in ours; "
            "data-aware rows get the same calibration batches, one dataset item per example. NNCF's defaults "
            "otherwise: the last MatMul stays INT8_ASYM per channel (all_layers=False; the all-layers row "
            "overrides it), backup INT8_ASYM, sensitivity max activation variance. The FP32 model is converted to "
            "opset 21 first, so NNCF writes "
            "standard blocked DequantizeLinear (UINT4 codes and zero points) that onnxruntime runs as written; "
            "ORT fuses it into MatMulNBits at session start, run with `session.qdq_matmulnbits_accuracy_level` = 0 "
            "(float compute, as NNCF's own MatMulNBits form asks; ORT's default 4 would quantize activations to "
            "int8). Below opset 21 (the pipeline exports 20) NNCF writes MatMulNBits that onnxruntime 1.31.1 "
            "refuses (4-bit zero points one per byte) and "
            "that would add the bias twice: the 'as exported' row is that file with its zero points packed and "
            "the duplicate bias input dropped, stored values unchanged (benchmarks/peers.py)")
    lines += [
        "- peers' calls: " + "; ".join(f"`{p.label}` = `{p.invocation}`" for p in
                                       _representative_peers(ctx.settings.methods)),
    ]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _representative_peers(methods) -> list[peer_mod.Peer]:
    seen, out = set(), []
    # nncf: its data-aware point (the first one is data-free) says more about how it is called
    for p in sorted(peer_mod.all_peers(tuple(f for f in peer_mod.FAMILIES if f in methods)),
                    key=lambda p: p.family == "nncf" and not p.data_aware):
        if p.family not in seen:
            seen.add(p.family)
            out.append(p)
    return out


MARKERS = {"fp32": "*", "bayesq": "o", "gptq": "s", "rtn": "^", "ort-rtn": "v", "ort-hqq": "D",
           "ort-kquant": "P", "ort-static": "X", "nncf": "h", "aimet": "<"}


def plot(rows: list[dict], headline: str, title: str) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    colours = [plt.get_cmap("tab20")(i) for i in (*range(0, 20, 2), *range(1, 20, 2))]  # 20 distinct series
    good = [r for r in rows if not r["error"] and not math.isnan(r[headline]) and r["family"] != "fp32"]
    names = list(dict.fromkeys(r["series"] for r in good))
    if any(n.startswith("gptq ") for n in names) and "gptq" in names:
        names.remove("gptq")  # GPTQ at whole budgets (no mixing) belongs to every mix's line

    def member(r: dict, series: str) -> bool:
        return r["series"] == series or (r["series"] == "gptq" and series.startswith("gptq "))

    for i, series in enumerate(names):
        pts = sorted((r["all_in_bits"], r[headline], r["coverage"]) for r in good if member(r, series))
        family = next(r["family"] for r in good if member(r, series))
        colour = colours[i % len(colours)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colour, lw=1, alpha=0.6)
        full = [p for p in pts if p[2] >= 0.999]
        part = [p for p in pts if p[2] < 0.999]
        marker = MARKERS.get(family, "o")
        if full:
            ax.scatter([p[0] for p in full], [p[1] for p in full], marker=marker, color=colour, label=series, zorder=3)
        if part:  # hollow: the peer left part of our scope in FP32
            ax.scatter([p[0] for p in part], [p[1] for p in part], marker=marker, facecolors="none",
                       edgecolors=colour, label=series if not full else None, zorder=3)
    fp = next((r for r in rows if r["family"] == "fp32" and not r["error"]), None)
    if fp is not None:
        ax.axhline(fp[headline], color="k", ls="--", lw=1, label=f"FP32 ({fp[headline]:.4g})")
    ax.set_xlabel("all-in bits per weight (hollow: coverage of our scope < 1)")
    ax.set_ylabel(f"{headline} (held-out, vs FP32 reference)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def write_outputs(rows: list[dict], ctx: Context, notes: list[str], stem: Path, command: str) -> str:
    """``<stem>.md``, ``<stem>.csv``, ``<stem>.png``; returns the Markdown."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    title = f"{ctx.bundle.name}: {ctx.headline} vs all-in bits"
    text = f"# {title}\n\n" + markdown_table(rows, ctx.headline) + "\n" + notes_text(ctx, notes, command)
    stem.with_suffix(".md").write_text(text)
    header = list(dict.fromkeys(k for r in rows for k in r))
    with open(stem.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
    stem.with_suffix(".png").write_bytes(plot(rows, ctx.headline, title))
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", help="minilm | digits-resnet | any MODEL spec (bayesq models)")
    ap.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS), help="all-in budgets for bayesq/gptq")
    ap.add_argument("--speed-budgets", type=float, nargs="*", default=list(SPEED_BUDGETS),
                    help="budgets for bayesq --target speed rows (none: no such rows)")
    ap.add_argument("--fold-budgets", type=float, nargs="*", default=list(BUDGETS),
                    help="budgets for bayesq --target fold rows (none: no such rows)")
    ap.add_argument("--reconstruct-budgets", type=float, nargs="*", default=[],
                    help="also bayesq --reconstruct at these all-in budgets")
    ap.add_argument("--methods", nargs="+", choices=METHOD_FAMILIES, default=list(DEFAULT_METHODS),
                    help="default: all but aimet (AdaRound takes tens of minutes per model on a CPU; name it to run it)")
    ap.add_argument("--quick", action="store_true", help="32 calibration / 64 evaluation items, 10 latency runs")
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--eval-size", type=int, default=1024)
    ap.add_argument("--latency-runs", type=int, default=20)
    ap.add_argument("--peer-bits", type=int, nargs="+", default=list(peer_mod.NBITS),
                    help="MatMulNBits peers' bit widths")
    ap.add_argument("--peer-blocks", type=int, nargs="+", default=list(peer_mod.BLOCKS),
                    help="MatMulNBits peers' block sizes")
    ap.add_argument("--latency-batch", type=int, help="latency feed batch (default: the model's)")
    ap.add_argument("--latency-seq", type=int, help="latency feed sequence length for text models")
    ap.add_argument("--rtn-accuracy-levels", nargs="+", default=["none"], choices=("none", "0", "1", "2", "3", "4"),
                    help="ort-rtn MatMulNBits accuracy_level(s): none = float compute, 4 = int8 activations")
    ap.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--calib", type=Path)
    ap.add_argument("--task")
    ap.add_argument("--out", type=Path, help="output stem (default benchmarks/results/compare_<model>)")
    args = ap.parse_args(argv)
    calib, evals, runs, warmup = (32, 64, 10, 2) if args.quick else (args.calib_size, args.eval_size,
                                                                    args.latency_runs, 3)
    source = {k: getattr(args, k) for k in ("weights", "data", "calib", "task", "latency_batch", "latency_seq")
              if getattr(args, k) is not None}
    settings = Settings(budgets=tuple(args.budgets), speed_budgets=tuple(args.speed_budgets),
                        fold_budgets=tuple(args.fold_budgets), reconstruct_budgets=tuple(args.reconstruct_budgets),
                        methods=tuple(args.methods), calib_size=calib, eval_size=evals,
                        latency_runs=runs, latency_warmup=warmup, provider=args.provider, source=source,
                        peer_bits=tuple(args.peer_bits), peer_blocks=tuple(args.peer_blocks),
                        rtn_accuracy_levels=tuple(None if a == "none" else int(a) for a in args.rtn_accuracy_levels))
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in args.model)
    stem = args.out or Path("benchmarks/results") / f"compare_{safe}"
    bundle = load_model(args.model, SourceOptions(calib_size=calib, eval_size=evals, **source))
    log = lambda m: print(m, file=sys.stderr, flush=True)
    rows, ctx, notes = run_compare(bundle, args.model, settings, log=log)
    command = "python benchmarks/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write_outputs(rows, ctx, notes, stem, command.strip()))
    log(f"wrote {stem}.md, {stem}.csv, {stem}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
