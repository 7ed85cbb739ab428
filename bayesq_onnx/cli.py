"""``bayesq`` command line. It parses, builds a :class:`CompileConfig` and calls the pipeline; nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .candidates import TARGETS
from .config import CURVATURES, DEFAULT_METHOD, FAMILIES, FISHERS, METHODS, RISKS, CompileConfig
from .errors import BayesQError, UserError
from .passes.collect_weights import SCOPES
from .runtime.session import PROVIDERS


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="bayesq-onnx")
def main():
    """BayesQ-ONNX: compress a trained model into a standard, validated ONNX file at an exact
    average bits-per-weight budget.

    \b
    Quick start:
      bayesq compile                     # bundled MiniLM, 4.0 all-in bits, into ./bayesq-out
      bayesq compile minilm --bits 3.5 --out out/minilm-3.5
      bayesq models                      # what MODEL can be
    """


@main.command()
@click.argument("model", default="minilm")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="torchvision:/module: a state dict file (.pt/.pth/.safetensors).")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Evaluation data: an ImageFolder dir (torchvision:) or a GLUE task dir (hf: --task glue:NAME).")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration data: an ImageFolder dir (torchvision:) or an .npz of named inputs (onnx:).")
@click.option("--task", default=None, help="hf: the task, e.g. glue:sst2 (reads --data DIR/train.tsv, dev.tsv).")
@click.option("--bits", type=float, default=4.0, show_default=True,
              help="Budget: average all-in bits per weight (codes + scales + zero points + codebooks). "
                   "bayesq takes any reachable value (e.g. 3.5); rtn and bayesq-fixed one of 2, 3, 4, 8.")
@click.option("--method", type=click.Choice(METHODS), default=DEFAULT_METHOD, show_default=True,
              help="Planner: bayesq = Bayesian design + mixed precision by knapsack under the budget; "
                   "bayesq-fixed = one bit-width, Bayesian design; rtn = round-to-nearest baseline.")
@click.option("--target", type=click.Choice(TARGETS), default="size", show_default=True,
              help="bayesq: size (any stored form, decodes fold at load), speed (Linear as 4/8-bit blocks "
                   "ORT fuses to MatMulNBits), cuda (4/8-bit and FP16 only).")
@click.option("--keep-first-last", is_flag=True, help="bayesq: pin the first and last quantized layers to 8-bit.")
@click.option("--overrides", type=click.Path(path_type=Path), default=None,
              help="bayesq: JSON/YAML file mapping tensor-name patterns to allowed candidate labels.")
@click.option("--risk", type=click.Choice(RISKS), default="closed", show_default=True,
              help="bayesq: closed-form posterior risk, or Monte Carlo on calibration data (slower).")
@click.option("--family", type=click.Choice(FAMILIES), default="uniform", show_default=True,
              help="bayesq-fixed: uniform grids (DequantizeLinear) or per-row codebooks (FP16 levels).")
@click.option("--group-size", type=int, default=0, show_default=True,
              help="Uniform: input channels sharing one scale (0: one scale per output row).")
@click.option("--codebook-rows", type=int, default=1, show_default=True, help="Codebook: rows sharing one table.")
@click.option("--curvature", type=click.Choice(CURVATURES), default="kfac", show_default=True,
              help="Posterior precision: diag (Laplace diagonal), kfac (A ⊗ G; GPTQ-style error feedback), "
                   "lowrank (diagonal + top-k GGN directions).")
@click.option("--fisher", type=click.Choice(FISHERS), default="true", show_default=True,
              help="true: targets sampled from the model (no labels); empirical: the data's labels.")
@click.option("--fisher-samples", type=int, default=1, show_default=True, help="Target samples per item.")
@click.option("--rank", type=int, default=8, show_default=True, help="lowrank: directions per layer.")
@click.option("--n-data", type=float, default=1e6, show_default=True,
              help="Effective data size N in Λ = N·F + τ (the pretrained model's data, not the calibration set).")
@click.option("--prior-precision", type=float, default=None,
              help="Prior precision τ [empirical Bayes per layer].")
@click.option("--act-order/--no-act-order", default=False, show_default=True,
              help="kfac: round columns in decreasing curvature order (GPTQ's act-order).")
@click.option("--temperature", type=float, default=0.0, show_default=True,
              help="Posterior temperature in the design objective (0: design on the trained weights alone).")
@click.option("--scope", type=click.Choice(SCOPES), default="linear", show_default=True,
              help="linear: Conv/Gemm/MatMul weights; all: also Gather embedding tables.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bayesq-out"), show_default=True,
              help="Output directory for model.onnx, report.json, report.md, bits.png.")
@click.option("--calib-size", type=int, default=256, show_default=True, help="Calibration items.")
@click.option("--eval-size", type=int, default=1024, show_default=True, help="Held-out evaluation items.")
@click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True,
              help="ONNX Runtime provider for validation; 'cuda' fails if CUDA is not usable.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for every random choice.")
@click.option("--latency-runs", type=int, default=20, show_default=True, help="Timed runs per model.")
@click.option("--latency-batch", type=int, default=8, show_default=True, help="Batch size for latency.")
@click.option("--latency-seq", type=int, default=128, show_default=True, help="Sequence length for latency.")
@click.option("--verify-each", is_flag=True, help="Run onnx.checker after every pass.")
@click.option("--dump-dir", type=click.Path(path_type=Path), default=None, help="Save the model after every pass.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the final summary line.")
def compile(model, weights, data, calib, task, bits, method, target, keep_first_last, overrides, risk, family, group_size, codebook_rows, curvature, fisher, fisher_samples, rank,
            n_data, prior_precision, act_order, temperature, scope, out, calib_size, eval_size, provider, seed,
            latency_runs, latency_batch, latency_seq, verify_each, dump_dir, quiet):
    """Quantize MODEL (default: minilm) and validate it in ONNX Runtime."""
    from .pipeline import compile_model
    from .progress import Reporter

    config = CompileConfig(model=model, weights=weights, data=data, calib=calib, task=task, bits=bits, method=method, target=target, keep_first_last=keep_first_last,
                           overrides=overrides, risk=risk, family=family, group_size=group_size,
                           codebook_rows=codebook_rows, curvature=curvature, fisher=fisher,
                           fisher_samples=fisher_samples, rank=rank, n_data=n_data,
                           prior_precision=prior_precision, act_order=act_order, temperature=temperature,
                           scope=scope, out=out,
                           calib_size=calib_size, eval_size=eval_size, provider=provider, seed=seed,
                           latency_runs=latency_runs, latency_batch=latency_batch, latency_seq=latency_seq,
                           verify_each=verify_each, dump_dir=dump_dir)
    with Reporter(quiet=quiet) as reporter:
        result = _guard(lambda: compile_model(config, reporter))
    r = result.report
    click.echo(f"{result.artifact}: {r['bits']['all_in']:.3f} bits/weight all-in, "
               f"{r['sizes']['artifact_bytes'] / 1e6:.2f} MB ({r['sizes']['fp32_bytes'] / r['sizes']['artifact_bytes']:.1f}x smaller), "
               f"{r['headline']['metric']} {r['headline']['value']:.4f}, latency x{r['latency']['ratio']:.2f} vs FP32")


@main.command()
def models():
    """List the models MODEL can name and what each needs."""
    from .models import SOURCES

    for source in SOURCES.values():
        click.echo(f"{source.usage:34s} {source.needs}")


def _guard(fn):
    """User errors: one line on stderr, exit code 2. Other deliberate errors: one line, exit code 1."""
    try:
        return fn()
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except BayesQError as exc:
        click.echo(f"failed: {exc}", err=True)
        sys.exit(1)
