"""``bayesq`` command line. It parses, builds a :class:`CompileConfig` and calls the pipeline; nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .config import DEFAULT_METHOD, METHODS, CompileConfig
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
      bayesq compile                     # bundled MiniLM, 4-bit, into ./bayesq-out
      bayesq compile minilm --bits 3 --out out/minilm-3b
      bayesq models                      # what MODEL can be
    """


@main.command()
@click.argument("model", default="minilm")
@click.option("--bits", type=float, default=4.0, show_default=True,
              help="Average all-in bits per weight (codes + scales + zero points + codebooks). "
                   "rtn: one of 2, 3, 4, 8.")
@click.option("--method", type=click.Choice(METHODS), default=DEFAULT_METHOD, show_default=True,
              help="Planner: rtn = round-to-nearest baseline, per-row asymmetric min-max.")
@click.option("--group-size", type=int, default=0, show_default=True,
              help="Input channels sharing one scale (0: one scale per output row).")
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
def compile(model, bits, method, group_size, scope, out, calib_size, eval_size, provider, seed,
            latency_runs, latency_batch, latency_seq, verify_each, dump_dir, quiet):
    """Quantize MODEL (default: minilm) and validate it in ONNX Runtime."""
    from .pipeline import compile_model
    from .progress import Reporter

    config = CompileConfig(model=model, bits=bits, method=method, group_size=group_size, scope=scope, out=out,
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
    from .models import MODELS

    for name, (_, needs) in MODELS.items():
        click.echo(f"{name:16s} {needs}")


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
