"""The method registry: one frozen config per method, built from the flat CompileConfig, and a builder that
makes its planner; the names the CLI offers (choices.METHODS, no torch import) are exactly the registered ones."""

from __future__ import annotations

import dataclasses

import pytest

from bayesq_onnx.choices import METHODS
from bayesq_onnx.config import CompileConfig
from bayesq_onnx.errors import UserError
from bayesq_onnx.planning import candidates
from bayesq_onnx.planning.methods import (REGISTRY, BayesQConfig, BayesQFixedConfig, GPTQConfig, PlannerInputs,
                                          RTNConfig, planner_for)


def test_every_offered_method_is_registered():
    assert set(REGISTRY) == set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_method_configs_are_frozen_and_take_their_fields_from_compile_config(method):
    config = CompileConfig(method=method, bits=3, group_size=32, act_order=True, temperature=0.5, seed=7)
    built = REGISTRY[method].config.from_compile_config(config)
    assert dataclasses.is_dataclass(built)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.bits = 4
    for f in dataclasses.fields(built):  # a field named like a CompileConfig field carries its value
        if hasattr(config, f.name) and f.name != "bits":
            assert getattr(built, f.name) == getattr(config, f.name), (method, f.name)
    assert built.bits == 3


def test_method_configs_hold_their_settings():
    config = CompileConfig(method="gptq", bits=3.5, group_size=64, gptq_mix="proportional", risk="mc",
                           family="codebook", codebook_rows=4)
    assert GPTQConfig.from_compile_config(config) == GPTQConfig(3.5, 64, False, "proportional")
    assert RTNConfig.from_compile_config(CompileConfig(bits=4.0, group_size=64)) == RTNConfig(4, 64)
    assert BayesQConfig.from_compile_config(config).risk == "mc"
    fixed = BayesQFixedConfig.from_compile_config(config)
    assert (fixed.candidate.family, fixed.candidate.bits, fixed.candidate.group_size) == ("codebook", 3, 4)


@pytest.fixture(scope="module")
def inputs(tiny_exported):
    bundle, bindings, weights = tiny_exported
    return PlannerInputs(weights, None, candidates.allowed(weights), bundle, bindings, lambda items, _: items)


def test_planner_for_builds_the_method_planner(inputs):
    plan = planner_for(CompileConfig(method="rtn", bits=4), inputs)(inputs.weights)
    assert plan.method == "rtn" and set(plan.tensors) == set(inputs.weights)
    assert {t.candidate.label for t in plan.tensors.values()} == {"uint4-row"}


def test_bayesq_fixed_refuses_a_group_that_does_not_divide(inputs):
    with pytest.raises(UserError, match="`codebook_rows` 7 does not divide"):
        planner_for(CompileConfig(method="bayesq-fixed", bits=4, family="codebook", codebook_rows=7), inputs)


def test_each_method_declares_its_analysis_and_stages_and_the_config_asks_it():
    """Issue 30 item 5: what runs around a planner is the method's registration, not a name test in the
    pipeline or the config check."""
    import inspect

    from bayesq_onnx import config as config_module
    from bayesq_onnx import pipeline
    from bayesq_onnx.planning.stages import STAGES

    assert set(REGISTRY) == set(METHODS)
    for method in REGISTRY.values():
        assert set(method.stages) <= set(STAGES) and method.analysis in ("posterior", "hessians", "none")
    CompileConfig(method="gptq", bits=4, reconstruct=True).validate()
    CompileConfig(method="bayesq-fixed", bits=4, reconstruct=True, propagate="sequential").validate()
    with pytest.raises(UserError, match="not a stage of `method` gptq"):
        CompileConfig(method="gptq", bits=4, propagate="sequential").validate()
    with pytest.raises(UserError, match="not a stage of `method` rtn"):
        CompileConfig(method="rtn", bits=4, reconstruct=True).validate()
    for module in (pipeline, config_module):
        source = inspect.getsource(module)
        assert not any(f'method == "{m}"' in source or f'method != "{m}"' in source for m in METHODS)
    bayesq = REGISTRY["bayesq"]
    assert [s.name for s in bayesq.refinements(CompileConfig(reconstruct=True, propagate="sequential"))] == \
        ["propagate", "floor", "reconstruct"]
    assert [s.name for s in bayesq.refinements(CompileConfig(floor="none"))] == []
