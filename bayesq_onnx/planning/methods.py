"""The methods: one frozen config per method and the registered builder of its planner (the config +
handler pattern of torchao's ``quantize_``), so the pipeline plans with ``planner_for(config, inputs)``
whatever the method.

Each config holds only its method's settings and is built from the flat :class:`~bayesq_onnx.config.CompileConfig`
(which stays flat: the CLI and config files fill it) by ``from_compile_config``. A builder gets that config and
the :class:`PlannerInputs` the analysis produced, and returns a planner: a callable ``weights -> Plan``. A new
method is a config, a builder under :func:`register`, and its name in :data:`bayesq_onnx.choices.METHODS`
(which the CLI lists without importing this module).

A registration also declares what the pipeline does around the planner, so the pipeline and the config
check ask the method instead of testing its name: which analysis it needs (``posterior``: the Laplace or
layer-wise posterior; ``hessians``: its layers' input second moments only; ``none``), whether it chooses
among allowed candidates under an all-in budget (``chooses``: the budget is checked against them before the
analysis runs, and ``max_drop`` can search it), which refinement stages it takes after planning
(:data:`~bayesq_onnx.planning.stages.STAGES`, in order), and which ``bits`` it can meet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..analysis.mc_risk import MonteCarloRisk
from ..choices import CODE_BITS, LEAST_CODE_BITS
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
    name: str
    config: type
    build: Callable[[Any, PlannerInputs], Planner]
    analysis: str                 # posterior | hessians | none (module docstring)
    chooses: bool                 # picks among allowed candidates under an all-in budget
    stages: tuple[str, ...]       # refinement stages it takes, in the order they run
    bits_problem: Callable[[float, str], str | None]  # (bits, target) -> why they cannot be met, or None

    def refinements(self, config: CompileConfig) -> list:
        """The declared stages ``config`` turns on, in order (:class:`~bayesq_onnx.planning.stages.Stage`)."""
        from .stages import STAGES

        return [STAGES[s] for s in self.stages if STAGES[s].enabled(config)]

    def check(self, config: CompileConfig) -> None:
        """Raise :class:`UserError` for settings this method cannot honour: its ``bits``, a stage it does not
        take, a budget search it cannot do."""
        problem = self.bits_problem(config.bits, config.target)
        if problem:
            raise UserError(problem)
        if config.max_drop is not None and not self.chooses:
            raise UserError(f"`max_drop` needs `method` {_takers('max_drop')}: it searches the least all-in budget, "
                            f"and `method` {self.name} does not choose under a budget")
        from .stages import STAGES

        for stage in STAGES.values():
            if stage.enabled(config) and stage.name not in self.stages and stage.name != "floor":
                raise UserError(f"`{stage.name}` is not a stage of `method` {self.name} (it takes: "
                                f"{', '.join(self.stages) or 'none'}); methods that take it: {_takers(stage.name)}: "
                                f"drop `{stage.name}`")


REGISTRY: dict[str, Method] = {}


def register(name: str, config: type, *, analysis: str, chooses: bool = False, stages: tuple[str, ...] = (),
             bits_problem: Callable[[float, str], str | None]) -> Callable:
    """Register the decorated ``build(config, inputs) -> planner`` as method ``name``, configured by ``config``,
    with what it declares (:class:`Method`)."""
    def decorate(build: Callable[[Any, PlannerInputs], Planner]) -> Callable[[Any, PlannerInputs], Planner]:
        REGISTRY[name] = Method(name, config, build, analysis, chooses, stages, bits_problem)
        return build
    return decorate


def method_spec(name: str) -> Method:
    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def planner_for(config: CompileConfig, inputs: PlannerInputs) -> Planner:
    """The planner of ``config.method``, configured from ``config``."""
    method = method_spec(config.method)
    return method.build(method.config.from_compile_config(config), inputs)


def _takers(stage: str) -> str:
    if stage == "max_drop":
        return ", ".join(n for n, m in REGISTRY.items() if m.chooses)
    return ", ".join(n for n, m in REGISTRY.items() if stage in m.stages)


def _code_width(method: str) -> Callable[[float, str], str | None]:
    """One code width everywhere: ``bits`` must be one."""
    def problem(bits: float, target: str) -> str | None:
        if bits not in CODE_BITS:
            return (f"`bits` {bits:g} is not available for `method` {method}; "
                    f"choose one of {', '.join(map(str, CODE_BITS))}")
        return None
    return problem


def _between_code_widths(bits: float, target: str) -> str | None:
    """GPTQ mixes the two code widths around a fractional budget."""
    if not CODE_BITS[0] <= bits <= CODE_BITS[-1]:
        return (f"`bits` {bits:g} is outside GPTQ's code widths; pick a budget between "
                f"{CODE_BITS[0]} and {CODE_BITS[-1]}")
    return None


def _all_in_budget(bits: float, target: str) -> str | None:
    """Every candidate of the target stores codes of at least its least width per weight (FP32 is 32)."""
    least = LEAST_CODE_BITS.get(target, CODE_BITS[0])
    if not least <= bits <= 32.0:
        return (f"`bits` {bits:g} cannot be met: every candidate of `target` {target} stores at least "
                f"{least}-bit codes per weight (FP32 is 32); pick a budget between {least} and 32")
    return None


@dataclass(frozen=True)
class RTNConfig:
    """Round to nearest on a min-max grid: one code width everywhere, per row or per group."""

    bits: int
    group_size: int = 0

    @classmethod
    def from_compile_config(cls, config: CompileConfig) -> "RTNConfig":
        return cls(int(config.bits), config.group_size)


@register("rtn", RTNConfig, analysis="none", bits_problem=_code_width("rtn"))
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


@register("gptq", GPTQConfig, analysis="hessians", stages=("reconstruct",), bits_problem=_between_code_widths)
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


@register("bayesq-fixed", BayesQFixedConfig, analysis="posterior", stages=("propagate", "reconstruct"),
          bits_problem=_code_width("bayesq-fixed"))
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


@register("bayesq", BayesQConfig, analysis="posterior", chooses=True,
          stages=("propagate", "floor", "reconstruct"), bits_problem=_all_in_budget)
def _bayesq(config: BayesQConfig, inputs: PlannerInputs) -> PlanBayesQ:
    mc = MonteCarloRisk(inputs.bundle, inputs.bindings, temperature=config.temperature, seed=config.seed) \
        if config.risk == "mc" else None
    return PlanBayesQ(config.bits, inputs.posteriors, inputs.allowed, curvature=config.curvature,
                      temperature=config.temperature, act_order=config.act_order, rounding=config.rounding,
                      rounded_risk=config.risk == "rounded", mc_risk=mc,
                      progress=lambda names: inputs.track(names, "risk tables"))
