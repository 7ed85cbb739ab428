"""The CLI: help, model listing, and bad input -> one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import click
from click.testing import CliRunner

from bayesq_onnx.cli import main
from bayesq_onnx.config import CompileConfig


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _option_lines(help_text: str) -> list[str]:
    return [line for line in help_text.splitlines() if re.match(r"^  (-\w, )?--[a-z]", line)]


def test_help_lists_commands():
    r = invoke("--help")
    assert r.exit_code == 0 and "compile" in r.output and "models" in r.output
    r = invoke("compile", "--help")
    assert r.exit_code == 0 and "--bits" in r.output and "--recipe" in r.output and "--provider" not in r.output
    options = [line for line in _option_lines(r.output) if "--help" not in line]
    assert 5 <= len(options) <= 12, options


def test_every_config_field_is_reachable_from_the_cli():
    """--help-all lists every option, and every CompileConfig field is one (or the MODEL argument)."""
    r = invoke("compile", "--help-all")
    assert r.exit_code == 0 and "--provider" in r.output and "--distill-steps" in r.output
    params = {p.name for p in main.commands["compile"].params}
    missing = [f.name for f in dataclasses.fields(CompileConfig) if f.name != "extra" and f.name not in params]
    assert not missing


def test_option_defaults_are_the_config_defaults():
    """Every option (and MODEL) named after a CompileConfig field defaults to that field's default, and
    --help-all shows exactly it: only typed options reach the config, so a drifted default would show a
    value no compile uses."""
    command = main.commands["compile"]
    defaults = {f.name: f.default for f in dataclasses.fields(CompileConfig) if f.name != "extra"}
    shown, opt = {}, None  # each option's help text, by its long name
    for line in invoke("compile", "--help-all").output.splitlines():
        start = re.match(r"^  (?:-\w, )?(--[a-z-]+)", line)
        if start:
            opt = start.group(1)
            shown[opt] = ""
        if opt:
            shown[opt] += " " + line.strip()
    checked = 0
    for param in command.params:
        if param.name not in defaults:
            continue
        default = defaults[param.name]
        assert param.get_default(click.Context(command), call=False) == default, param.name
        if not isinstance(param, click.Option) or not param.show_default or default is None:
            continue
        text = "".join(shown[max(param.opts, key=len)].split())  # help wraps lines, even inside "no-distill"
        expected = (param.opts if default else param.secondary_opts)[0].lstrip("-") if param.secondary_opts \
            else str(default)
        assert f"[default:{expected}]" in text, (param.name, text)
        checked += 1
    assert checked >= 25


def test_models_lists_minilm():
    r = invoke("models")
    assert r.exit_code == 0 and r.output.startswith("minilm")


def _assert_user_error(result, out, needle):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


def test_console_script_exit_code(tmp_path):
    """The installed entry point, as a user runs it: exit 2 and a single stderr line."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bayesq_onnx", "compile", "--method", "rtn", "--bits", "7",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --bits 7 is not available for --method rtn; "
                                                "choose one of 2, 3, 4, 5, 6, 8"]
    assert not out.exists()


def test_budget_below_the_cheapest_candidates(tmp_path):
    """Below the narrowest code width: refused before the model loads (one line, exit 2, nothing written)."""
    out = tmp_path / "out"
    _assert_user_error(invoke("compile", "--bits", "1.5", "-q", "--calib-size", "8", "--eval-size", "8",
                              "--out", str(out)), out, "--bits 1.5 cannot be met")


def test_help_imports_neither_torch_nor_onnxruntime():
    """`bayesq --help` and `bayesq compile --help` answer without loading the heavy stack."""
    code = ("import sys\nfrom click.testing import CliRunner\nfrom bayesq_onnx.cli import main\n"
            "for args in (['--help'], ['compile', '--help-all']):\n"
            "    assert CliRunner().invoke(main, args).exit_code == 0\n"
            "print(sorted(m for m in ('torch', 'onnxruntime', 'onnx', 'onnx_ir', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
