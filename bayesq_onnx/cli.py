"""``bayesq`` command line. It parses, builds a :class:`CompileConfig` and calls the pipeline; nothing else."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click

from .choices import (CURVATURES, FAIL_ON, FISHERS, FIXED_FAMILIES, FLOORS, GPTQ_MIXES, METHODS, PROPAGATIONS,
                      RECONSTRUCT_METRICS, PROVIDERS, RISKS, ROUNDINGS, SCOPES, TARGETS, TEACHERS)
from .config import RECIPES, CompileConfig, build_config
from .errors import BayesQError, UserError, in_words_of


class _OneLineErrors(click.Group):
    """Usage errors (bad option values, unknown options) as one ``error:`` line with exit code 2, like every
    other bad input, instead of click's usage block."""

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as exc:  # --help, --version
            sys.exit(exc.exit_code)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `bayesq`: the help text
            click.echo(exc.format_message())
            sys.exit(0)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        except click.ClickException as exc:
            hint = f" (see 'bayesq {exc.ctx.info_name} --help')" if getattr(exc, "ctx", None) and exc.ctx.parent else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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


def _show_all_options(ctx: click.Context, _param, value) -> None:
    """``--help-all``: the help with every option, the advanced ones included."""
    if not value or ctx.resilient_parsing:
        return
    for param in ctx.command.params:
        param.hidden = False
    click.echo(ctx.get_help())
    ctx.exit()


def _advanced(*names, **kwargs):
    """An option reachable on the command line but listed only by ``--help-all`` (and in docs/cli.md)."""
    return click.option(*names, hidden=True, **kwargs)


def _config_defaults(command: click.Command) -> click.Command:
    """Give every parameter named after a :class:`CompileConfig` field that field's default, so ``--help-all``
    shows the defaults a compile really uses (only typed options reach the config: recipes and config files
    fill the rest)."""
    defaults = {f.name: f.default for f in dataclasses.fields(CompileConfig) if f.default is not dataclasses.MISSING}
    for param in command.params:
        if param.name in defaults:
            param.default = defaults[param.name]
    return command


@_config_defaults
@main.command(epilog="Every other setting: 'bayesq compile --help-all', a --config file, or docs/cli.md.")
@click.argument("model", required=False)
@click.option("--bits", type=float, show_default=True,
              help="Budget: average all-in bits per weight (codes + scales + zero points + codebooks). "
                   "bayesq and gptq take fractional values (e.g. 3.5); rtn and bayesq-fixed one of 2, 3, 4, 5, 6, 8.")
@click.option("--method", type=click.Choice(METHODS), show_default=True,
              help="bayesq = Bayesian design + mixed precision under the budget; bayesq-fixed = one width, "
                   "Bayesian design; rtn = round-to-nearest; gptq = GPTQ (fractional --bits mix two widths).")
@click.option("--recipe", type=click.Choice(tuple(RECIPES)), default="default", show_default=True,
              help="Named settings: fast (a quick look), default, best (distillation toward FP32, more data; "
                   "about 4x slower).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="YAML or JSON file of settings (keys: the names of --help-all's options, with _ for -); "
                   "options given here override it.")
@click.option("--data", type=click.Path(path_type=Path),
              help="Evaluation data: an ImageFolder dir (torchvision:), a GLUE task dir (hf: --task), "
                   "a .txt/.jsonl of texts (minilm, hf: encoders), an .npz of named inputs (onnx:, module:).")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration data, in the same forms as --data.")
@click.option("--task", help="hf: the task, e.g. glue:sst2 (reads --data DIR/train.tsv, dev.tsv).")
@click.option("--weights", type=click.Path(path_type=Path),
              help="torchvision:/module: a state dict file (.pt/.pth/.safetensors).")
@click.option("--target", type=click.Choice(TARGETS), show_default=True,
              help="size (small file, loads in less memory than FP32: MatMul weights stay packed), fold (every "
                   "width on every weight, decoded to float at load: most fidelity per bit, more memory), speed "
                   "(MatMulNBits with 8-bit activations), cuda (4/8-bit and FP16 only).")
@click.option("--max-drop", type=float,
              help="bayesq: instead of --bits, the least budget whose validated headline metric drops by at "
                   "most this (its units: 0.003 = 0.3 points of top-1, 0.01 of cosine).")
@click.option("--out", type=click.Path(path_type=Path), show_default=True,
              help="Output directory for model.onnx, report.json, report.md, bits.png.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the final summary line.")
@click.option("--help-all", is_flag=True, expose_value=False, is_eager=True, callback=_show_all_options,
              help="Show every option and exit.")
@_advanced("-v", "--verbose", is_flag=True, help="Also print each pass's outcome and each tensor's choice.")
@_advanced("--scope", type=click.Choice(SCOPES), show_default=True,
           help="all: Conv/Gemm/MatMul weights and Gather embedding tables; linear: without the tables.")
@_advanced("--floor", type=click.Choice(FLOORS), show_default=True,
           help="bayesq: also plan GPTQ at the same all-in budget and ship whichever does better on held-out "
                "calibration batches (gptq), or ship bayesq's plan unchecked (none).")
@_advanced("--keep-first-last", is_flag=True, help="bayesq: pin the first and last quantized layers to 8-bit "
           "(speed: FP16 where not a MatMul).")
@_advanced("--overrides", type=click.Path(path_type=Path),
           help="bayesq: JSON/YAML file mapping tensor-name patterns to allowed candidate labels.")
@_advanced("--risk", type=click.Choice(RISKS), show_default=True,
           help="bayesq: closed-form posterior risk of nearest rounding, the posterior-metric error of the "
                "codes that ship (rounded), or Monte Carlo on calibration data (slower).")
@_advanced("--family", type=click.Choice(FIXED_FAMILIES), show_default=True,
           help="bayesq-fixed: uniform grids (DequantizeLinear) or per-row codebooks (FP16 levels).")
@_advanced("--group-size", type=int, show_default=True,
           help="Uniform: input channels sharing one scale (0: one scale per output row).")
@_advanced("--codebook-rows", type=int, show_default=True, help="Codebook: rows sharing one table.")
@_advanced("--curvature", type=click.Choice(CURVATURES), show_default=True,
           help="Posterior precision: diag (Laplace diagonal), kfac (A ⊗ G; GPTQ-style error feedback), "
                "lowrank (diagonal + top-k GGN directions).")
@_advanced("--fisher", type=click.Choice(FISHERS), show_default=True,
           help="true: targets sampled from the model (no labels); empirical: the data's labels.")
@_advanced("--fisher-samples", type=int, show_default=True, help="Target samples per item.")
@_advanced("--rank", type=int, show_default=True, help="lowrank: directions per layer.")
@_advanced("--n-data", type=float, show_default=True,
           help="Effective data size N in Λ = N·F + τ (the pretrained model's data, not the calibration set).")
@_advanced("--prior-precision", type=float, help="Prior precision τ [empirical Bayes per layer].")
@_advanced("--act-order/--no-act-order", show_default=True,
           help="kfac and gptq: round columns in decreasing curvature order (GPTQ's act-order).")
@_advanced("--rounding", type=click.Choice(ROUNDINGS), show_default=True,
           help="bayesq and bayesq-fixed: codes by error feedback in the posterior metric (kfac, lowrank), or "
                "nearest on the same designed grid (measures what the feedback buys; it lost on every model "
                "tried, docs/method.md).")
@_advanced("--propagate", type=click.Choice(PROPAGATIONS), show_default=True,
           help="bayesq and bayesq-fixed: after planning, round the codes again layer by layer in graph order on "
                "the inputs of the partly quantized model (sequential), and toward the FP32 model's outputs "
                "(fp-outputs); grids and bits unchanged.")
@_advanced("--reconstruct/--no-reconstruct", show_default=True,
           help="After planning, choose the codes again block by block (several layers at once, AdaRound's "
                "learned rounding) so each block reproduces the FP32 model's block outputs (--reconstruct-metric); "
                "grids and bits unchanged, early stop on held-out calibration items. PyTorch models.")
@_advanced("--reconstruct-steps", type=int, show_default=True,
           help="Reconstruction: Adam steps per block at most.")
@_advanced("--reconstruct-metric", type=click.Choice(RECONSTRUCT_METRICS), show_default=True,
           help="Reconstruction: block-output errors unweighted (mse), or weighted by the likelihood's Fisher "
                "on the calibration data, averaged over items (fisher) or per item (fisher-items, BRECQ's); "
                "the Fisher forms fit calibration data unlike the deployed data (docs/method.md).")
@_advanced("--gptq-mix", type=click.Choice(GPTQ_MIXES), show_default=True,
           help="gptq at a fractional --bits: wider codes by knapsack on GPTQ's layer errors, or to layers "
                "in graph order (proportional).")
@_advanced("--temperature", type=float, show_default=True,
           help="Posterior temperature in the design objective (0: design on the trained weights alone).")
@_advanced("--distill/--no-distill", show_default=True,
           help="After planning, train scales, codebook levels, biases and norm parameters (codes fixed, "
                "budget unchanged) toward the teacher on calibration inputs only.")
@_advanced("--distill-steps", type=int, show_default=True,
           help="Distillation: Adam steps at most (early stop on held-out calibration batches).")
@_advanced("--distill-lr", type=float, show_default=True,
           help="Distillation: relative step size (log-scale for scales, RMS units otherwise).")
@_advanced("--teacher", type=click.Choice(TEACHERS), show_default=True,
           help="Distillation teacher: posterior predictive (average of posterior-sampled models; the FP32 "
                "model for methods without a posterior, e.g. rtn, or when the samples stray farther from it "
                "than the quantized plan) or fp (the FP32 model).")
@_advanced("--teacher-samples", type=int, show_default=True,
           help="Distillation: posterior samples the teacher averages.")
@_advanced("--calib-size", type=int, show_default=True, help="Calibration items.")
@_advanced("--eval-size", type=int, show_default=True,
           help="Held-out evaluation items (the headline's 95 % interval narrows with more).")
@_advanced("--provider", type=click.Choice(PROVIDERS), show_default=True,
           help="ONNX Runtime provider for validation; 'cuda' fails if CUDA is not usable.")
@_advanced("--seed", type=int, show_default=True, help="Seed for every random choice.")
@_advanced("--latency-runs", type=int, show_default=True, help="Timed runs per model.")
@_advanced("--latency-warmup", type=int, show_default=True, help="Untimed runs before timing.")
@_advanced("--latency-batch", type=int, show_default=True, help="Batch size for latency.")
@_advanced("--latency-seq", type=int, show_default=True, help="Sequence length for latency.")
@_advanced("--memory-loads", type=int, show_default=True,
           help="Fresh-process loads of each model for memory at load (the median is reported).")
@_advanced("--fail-on", type=click.Choice(FAIL_ON),
           help="Exit with code 3 (artifact and report written) when the verdict is this or worse: for CI "
                "pipelines (docs/reliability.md#verdict).")
@_advanced("--verify-each", is_flag=True, help="Run onnx.checker after every pass.")
@_advanced("--dump-dir", type=click.Path(path_type=Path), help="Save the model after every pass.")
@click.pass_context
def compile(ctx, model, recipe, config_file, quiet, verbose, **options):
    """Quantize MODEL (default: minilm, bundled) and validate it in ONNX Runtime."""
    from .pipeline import compile_model
    from .progress import Reporter
    from .report import memory_summary
    from .verdict import at_least

    # only what the user typed overrides the recipe and the file; the option defaults shown in --help-all
    # are the dataclass's own
    given = {name: value for name, value in options.items()
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    config = _guard(lambda: build_config(recipe, config_file, model=model, **given))
    wording = _flags(ctx.command)
    with Reporter(quiet=quiet, verbose=verbose, wording=wording) as reporter:
        result = _guard(lambda: compile_model(config, reporter))
    r = result.report
    h = r["headline"]
    interval = f" (95% CI {h['ci95'][0]:.4f}–{h['ci95'][1]:.4f}, {h['items']} items)" if "ci95" in h else ""
    click.echo(f"{result.artifact}: {r['bits']['all_in']:.3f} bits/weight all-in, "
               f"{r['sizes']['artifact_bytes'] / 1e6:.2f} MB ({r['sizes']['smaller_x']:.1f}x smaller), "
               f"{h['metric']} {h['value']:.4f}{interval}, latency x{r['latency']['ratio']:.2f}"
               f"{memory_summary(r.get('memory', {}))} vs FP32")
    for warning in r.get("warnings", []):
        click.echo(f"warning: {wording(warning)}", err=True)
    verdict = r.get("verdict", {})
    click.echo(f"{verdict.get('line', 'verdict: not measured')}")
    if config.fail_on and at_least(verdict.get("verdict", ""), config.fail_on):
        click.echo(f"failed: the verdict is {verdict['verdict']} and --fail-on is {config.fail_on}; the artifact "
                   f"and its report are in {result.artifact.parent}", err=True)
        sys.exit(3)


@main.command()
def models():
    """List the models MODEL can name and what each needs."""
    from .models import SOURCES

    wording = _flags(main.commands["compile"])
    for source in SOURCES.values():
        click.echo(f"{source.usage:34s} {wording(source.needs)}")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a table.")
def inspect(artifact, as_json):
    """Per-tensor family, code bits, all-in bits and size of ARTIFACT (model.onnx or a compile output
    directory), recomputed from the file. On a plain ONNX model: the weights compile would quantize."""
    from .inspection import inspect_artifact

    info = _guard(lambda: inspect_artifact(artifact))
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        _print_inspect(info)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), required=True,
              help="The FP32 ONNX model to compare against (same input and output names).")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Evaluation inputs: an .npz with one array per model input, items along the first axis "
                   "(metric: fidelity of the first output).")
@click.option("--model", default=None,
              help="Instead of --data: the evaluation set and metric of a model source, e.g. minilm.")
@click.option("--calib-size", type=int, default=256, show_default=True,
              help="--model: as given to compile (some sources draw evaluation items after calibration ones).")
@click.option("--eval-size", type=int, default=1024, show_default=True, help="--model: evaluation items.")
@click.option("--seed", type=int, default=0, show_default=True, help="--model: data-sampling seed.")
@click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True,
              help="ONNX Runtime provider; 'cuda' fails if CUDA is not usable.")
@click.option("--runs", type=int, default=20, show_default=True, help="Timed runs per model.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of tables.")
def validate(artifact, reference, data, model, calib_size, eval_size, seed, provider, runs, as_json):
    """Re-run validation of ARTIFACT against an FP32 --reference in ONNX Runtime: fidelity on --data or
    a --model's evaluation set, latency of both, session start times."""
    from .inspection import validate_pair
    from .models.base import SourceOptions

    options = SourceOptions(calib_size=calib_size, eval_size=eval_size, seed=seed)
    result = _guard(lambda: validate_pair(artifact, reference, data=data, model=model, options=options,
                                          provider=provider, runs=runs))
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        _print_validation(result)


def _console():
    """Plain-text rich console: tensor names are not markup, and lines do not wrap."""
    from rich.console import Console

    return Console(highlight=False, markup=False, soft_wrap=True)


def _print_table(console, table) -> None:
    """Print ``table``; piped output gets the table's full width, not rich's 80-column default."""
    if not console.is_terminal:
        from rich.measure import Measurement

        needed = Measurement.get(console, console.options.update(max_width=10**6), table).maximum
        console.width = max(console.width, needed)
    console.print(table)


def _print_inspect(info: dict) -> None:
    from rich.table import Table

    console = _console()
    kb = lambda n: f"{n / 1024:,.1f}"  # noqa: E731
    shape = lambda s: "×".join(map(str, s))  # noqa: E731
    head = f"{info['path']}: {info['file_bytes'] / 1e6:.3f} MB, opset {info['opset']}"
    if not info["bayesq_artifact"]:
        console.print(f"{head}\n{info['note']}")
        table = Table("tensor", "shape", "consumers", "scope", "weights", "KB")
        for w in info["weights"]:
            table.add_row(w["name"], shape(w["shape"]), ",".join(w["consumers"]), w["scope"], f"{w['weights']:,}",
                          kb(w["bytes"]))
        _print_table(console, table)
        t, f = info["totals"], info["float_initializers"]
        console.print(f"{len(info['weights'])} weights, {t['weights']:,} values ({kb(t['bytes'])} KB), "
                      f"{t['linear_scope_weights']:,} in the default --scope linear; "
                      f"float initializers: {f['count']} ({kb(f['bytes'])} KB)")
        return
    console.print(f"{head}, method {info['method']}, bayesq-onnx {info['version']}, "
                  f"ORT session config {json.dumps(info['ort_session_config'])}")
    if "totals" not in info:
        console.print(info["note"])
        return
    table = Table("tensor", "shape", "label", "family", "bits", "all-in bits", "KB")
    for t in info["tensors"]:
        table.add_row(t["name"], shape(t["shape"]), t["label"], t["family"], str(t["bits"]),
                      f"{t['all_in_bits']:.4f}", kb(t["bytes"]))
    tot = info["totals"]
    table.add_section()
    table.add_row(f"total: {tot['quantized_tensors']} tensors", f"{tot['quantized_weights']:,} weights", "", "",
                  f"{tot['nominal_bits']:.3f}", f"{tot['all_in_bits']:.4f}", kb(tot["quantized_bytes"]))
    _print_table(console, table)
    check = "matches" if tot["accounting_ok"] else "MISMATCH"
    missing = f", missing arrays {tot['missing_arrays']}" if tot["missing_arrays"] else ""
    f, o = info["float_initializers"], info["other_initializers"]
    console.print(f"all-in bits from the file {tot['all_in_bits']:.6f}, metadata {tot['all_in_bits_metadata']}: "
                  f"{check}{missing}\nfloat initializers kept as they are: {f['count']} ({kb(f['bytes'])} KB); "
                  f"other initializers: {o['count']} ({kb(o['bytes'])} KB)")


def _print_validation(result: dict) -> None:
    from rich.table import Table

    console = _console()
    console.print(f"{result['artifact']} vs {result['reference']} on {result['inputs']}\n{result['provider']['note']}")
    table = Table("metric", "value", title="fidelity to the reference")
    for k, v in result["fidelity"].items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    _print_table(console, table)
    lat = result["latency"]
    table = Table("model", "median ms", "p90 ms", "session start s", title=f"latency ({lat['feed']})")
    for key in ("fp32", "quantized"):
        table.add_row(key, f"{lat[key]['median_ms']:.2f}", f"{lat[key]['p90_ms']:.2f}",
                      f"{result['session_start_s'][key]:.3f}")
    _print_table(console, table)
    console.print(f"{result['headline']['metric']} {result['headline']['value']:.4f}; "
                  f"latency ratio quantized / FP32 (median): {lat['ratio']:.3f}")
    console.print(result["verdict"]["line"], markup=False, highlight=False)


def _flags(command: click.Command):
    """Library text (fields in backticks, errors.py) in ``command``'s words: `calib_size` → --calib-size,
    an argument's field → its metavar (MODEL)."""
    names = {}
    for param in command.params:
        if isinstance(param, click.Option):
            flag = max(param.opts, key=len)
            names[param.name] = names[flag.lstrip("-").replace("-", "_")] = flag
        elif isinstance(param, click.Argument):
            names[param.name] = param.human_readable_name
    return lambda text: in_words_of(text, names)


def _guard(fn):
    """User errors: one line on stderr, exit code 2. Other deliberate errors: one line, exit code 1."""
    wording = _flags(click.get_current_context().command)
    try:
        return fn()
    except UserError as exc:
        click.echo(f"error: {wording(str(exc))}", err=True)
        sys.exit(2)
    except BayesQError as exc:
        click.echo(f"failed: {wording(str(exc))}", err=True)
        sys.exit(1)
