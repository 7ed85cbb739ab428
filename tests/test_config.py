"""Config: recipes, config files, precedence, and errors that name config fields (the CLI names flags)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from bayesq_onnx.cli import main
from bayesq_onnx.config import RECIPES, CompileConfig, build_config, read_config_file
from bayesq_onnx.errors import UserError, in_words_of


def test_recipes_are_fields_over_the_defaults():
    assert build_config() == CompileConfig()
    for name, settings in RECIPES.items():
        config = build_config(name)
        for key, value in settings.items():
            assert getattr(config, key) == value
        config.validate()
    assert build_config("fast").calib_size < CompileConfig().calib_size
    assert build_config("fast").memory_loads == 1 < CompileConfig().memory_loads
    assert build_config("best").distill and not CompileConfig().distill
    assert build_config("best").reconstruct and not CompileConfig().reconstruct


def test_precedence_default_recipe_file_arguments(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("recipe: fast\neval_size: 300\nbits: 3\ndata: some/dir\n")
    config = build_config(file=path, eval_size=400)
    assert config.calib_size == RECIPES["fast"]["calib_size"]  # from the recipe the file names
    assert config.eval_size == 400                               # the argument beats the file
    assert config.bits == 3.0 and isinstance(config.bits, float)  # YAML int -> float field
    assert config.data == Path("some/dir")
    # an explicit recipe argument beats the file's
    assert build_config("best", file=path).calib_size == RECIPES["best"]["calib_size"]


def test_json_config_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"method": "gptq", "bits": 3.5, "act_order": True}))
    assert read_config_file(path) == {"method": "gptq", "bits": 3.5, "act_order": True}


@pytest.mark.parametrize("text,needle", [
    ("bitz: 3\n", "unknown field 'bitz'"),
    ("calib_size: many\n", "field 'calib_size' takes int"),
    ("act_order: 1\n", "field 'act_order' takes bool"),
    ("data: 3\n", "field 'data' takes Path"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("bits: [\n", "cannot parse it"),
])
def test_bad_config_files(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=needle) as info:
        build_config(file=path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_bad_recipe_and_field_names():
    with pytest.raises(UserError, match="unknown `recipe` 'slow'"):
        build_config("slow")
    with pytest.raises(UserError, match="unknown config field"):
        build_config(bitz=3)


def test_api_errors_name_fields_not_flags():
    """The library speaks in config fields; no message raised from it spells a flag."""
    cases = [CompileConfig(bits=1.0), CompileConfig(calib_size=0), CompileConfig(method="rtn", bits=3.5),
             CompileConfig(max_drop=-1.0), CompileConfig(group_size=3), CompileConfig(weights=Path("/no/such.pt"))]
    for config in cases:
        with pytest.raises(UserError) as info:
            config.validate()
        message = str(info.value)
        assert "--" not in message and "`" in message, message


def test_cli_speaks_in_flags():
    assert in_words_of("lower `calib_size` or `x`", {"calib_size": "--calib-size"}) == "lower --calib-size or `x`"
    r = CliRunner().invoke(main, ["compile", "--calib-size", "0"])
    assert r.exit_code == 2 and r.stderr.strip() == "error: --calib-size must be at least 1"
    r = CliRunner().invoke(main, ["compile", "--memory-loads", "0"])
    assert r.exit_code == 2 and r.stderr.strip() == "error: --memory-loads must be at least 1"


def test_cli_config_file_and_flags(tmp_path):
    """A --config file's bad value is refused before any model loads; a flag given overrides the file."""
    path = tmp_path / "c.yaml"
    path.write_text("bits: 1.0\n")
    r = CliRunner().invoke(main, ["compile", "--config", str(path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--bits 1 cannot be met" in r.stderr
    path.write_text("bits: 4.0\ncalib_size: 0\n")
    r = CliRunner().invoke(main, ["compile", "--config", str(path), "--calib-size", "-3"])
    assert r.exit_code == 2 and "--calib-size must be at least 1" in r.stderr
    assert not (tmp_path / "o").exists()


def test_every_field_has_a_type_the_file_reader_knows():
    for f in dataclasses.fields(CompileConfig):
        if f.name != "extra":
            assert any(t in str(f.type) for t in ("Path", "bool", "int", "float", "str")), f
