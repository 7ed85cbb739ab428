"""The methods: one frozen config per method and the registered builder of its planner (the config +
handler pattern of torchao's ``quantize_``), so the pipeline plans with ``planner_for(config, inputs)``
whatever the method.

Each config holds only its method's settings and is built from the flat :class:`~bayesq_onnx.config.CompileConfig`
(which stays flat: the CLI and config files fill it) by ``from_compile_config``. A builder gets that config and
the :class:`PlannerInputs` the analysis produced, and returns a planner: a callable ``weights -> Plan``. A new
method is a config, a builder under :func:`register`, and its name in :data:`bayesq_onnx.choices.METHODS`
(which the CLI lists without importing this module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..analysis.mc_risk import MonteCarloRisk
from ..config import CompileConfig
from ..errors import UserError
from ..export import ParameterBinding
from ..models.base import ModelBundle
from ..plan import Candidate, Plan
from ..weights import WeightInfo, WeightPosterior, graph_order
from .bayesq import PlanBayesQ
from .bayesq_fixed import PlanBayesQFixed
from .gptq import PlanGPTQ
from .rtn import PlanRoundToNearest

Planner = Callable[[dict[str, WeightInfo]], Plan]


@dataclass(frozen=True)
class PlannerInputs:
    """What a builder may use besides its config: the weights, their posteriors (``None`` for a method that
    fits none), the allowed candidates (``None`` unless the method chooses among them), the model and its
    parameter ↔ initializer bindings (Monte Carlo risk), and ``track(items, description)``, which reports
    progress over ``items`` and yields them."""

    weights: dict[str, WeightInfo]
    posteriors: dict[str, WeightPosterior] | None
    allowed: dict[str, list[Candidate]] | None
    bundle: ModelBundle
    bindings: dict[str, ParameterBinding]
    track: Callable[[Iterable, str], Iterable]


@dataclass(frozen=True)
class Method:
    config: type
    build: Callable[[Any, PlannerInputs], Planner]


REGISTRY: dict[str, Method] = {}


def register(name: str, config: type) -> Callable:
    """Register the decorated ``build(config, inputs) -> planner`` as method ``name``, configured by ``config``."""
    def decorate(build: Callable[[Any, PlannerInputs], Planner]) -> Callable[[Any, PlannerInputs], Planner]:
        REGISTRY[name] = Method(config, build)
        return build
    return decorate


def planner_for(config: CompileConfig, inputs: PlannerInputs) -> Planner:
    """The planner of ``config.method``, configured from ``config``."""
    if config.method not in REGISTRY:
        raise UserError(f"unknown method {config.method!r}")
    method = REGISTRY[config.method]
    return method.build(method.config.from_compile_config(config), inputs)


@dataclass(frozen=True)
class RTNConfig:
    """Round to nearest on a min-max grid: one code width everywhere, per row or per group."""

    bits: int
    group_size: int = 0

    @classmethod
    def from_compile_config(cls, config: CompileConfig) -> "RTNConfig":
        return cls(int(config.bits), config.group_size)


@register("rtn", RTNConfig)
def _rtn(config: RTNConfig, inputs: PlannerInputs) -> PlanRoundToNearest:
    return PlanRoundToNearest(config.bits, group_size=config.group_size)


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ at ``bits``: a code width, or a fractional budget mixing the two widths around it."""

    bits: float
    group_size: int = 0
    act_order: bool = False
    mix: str = "knapsack"

    @classmethod
    def from_compile_config(cls, config: CompileConfig) -> "GPTQConfig":
        return cls(config.bits, config.group_size, config.act_order, config.gptq_mix)


@register("gptq", GPTQConfig)
def _gptq(config: GPTQConfig, inputs: PlannerInputs) -> PlanGPTQ:
    return PlanGPTQ(config.bits, inputs.posteriors, group_size=config.group_size, act_order=config.act_order,
                    mix=config.mix, order=graph_order(inputs.weights),
                    progress=lambda names: inputs.track(names, "GPTQ layers"))


@dataclass(frozen=True)
class BayesQFixedConfig:
    """One candidate everywhere, each quantizer designed and rounded on the posterior."""

    bits: int
    family: str = "uniform"
    group_size: int = 0      # uniform: input channels per scale
    codebook_rows: int = 1   # codebook: rows per table
    curvature: str = "kfac"
    temperature: float = 0.0
    act_order: bool = False
    rounding: str = "feedback"  # feedback | nearest

    @classmethod
    def from_compile_config(cls, config: CompileConfig) -> "BayesQFixedConfig":
        return cls(int(config.bits), config.family, config.group_size, config.codebook_rows, config.curvature,
                   config.temperature, config.act_order, config.rounding)

    @property
    def candidate(self) -> Candidate:
        group = self.codebook_rows if self.family == "codebook" else self.group_size
        return Candidate(self.family, self.bits, group)


@register("bayesq-fixed", BayesQFixedConfig)
def _bayesq_fixed(config: BayesQFixedConfig, inputs: PlannerInputs) -> PlanBayesQFixed:
    cand = config.candidate
    for w in inputs.weights.values():
        if not cand.fits(w.layout):
            flag = "`codebook_rows`" if config.family == "codebook" else "`group_size`"
            raise UserError(f"{flag} {cand.group_size} does not divide the {w.layout.rows} rows × "
                            f"{w.layout.in_channels} input channels of {w.name}; pick a divisor")
    return PlanBayesQFixed(cand, inputs.posteriors, curvature=config.curvature, temperature=config.temperature,
                           act_order=config.act_order, rounding=config.rounding, progress=lambda names: inputs.track(names, "design quantizers"))


@dataclass(frozen=True)
class BayesQConfig:
    """Mixed precision under an all-in budget: the least-risk choice among the allowed candidates."""

    bits: float
    curvature: str = "kfac"
    temperature: float = 0.0
    act_order: bool = False
    risk: str = "closed"     # closed | rounded | mc
    seed: int = 0            # mc: seeds the posterior samples of each block
    rounding: str = "feedback"  # feedback | nearest

    @classmethod
    def from_compile_config(cls, config: CompileConfig) -> "BayesQConfig":
        return cls(config.bits, config.curvature, config.temperature, config.act_order, config.risk, config.seed,
                   config.rounding)


@register("bayesq", BayesQConfig)
def _bayesq(config: BayesQConfig, inputs: PlannerInputs) -> PlanBayesQ:
    mc = MonteCarloRisk(inputs.bundle, inputs.bindings, temperature=config.temperature, seed=config.seed) \
        if config.risk == "mc" else None
    return PlanBayesQ(config.bits, inputs.posteriors, inputs.allowed, curvature=config.curvature,
                      temperature=config.temperature, act_order=config.act_order, rounding=config.rounding,
                      rounded_risk=config.risk == "rounded", mc_risk=mc,
                      progress=lambda names: inputs.track(names, "risk tables"))
