"""Compile settings: one frozen dataclass, validated once; named recipes and YAML/JSON files fill it in,
and so does the CLI, which only parses.

Precedence, lowest first: the dataclass defaults, the recipe, the config file, explicit arguments.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .choices import (CURVATURES, DEFAULT_METHOD, FAIL_ON, FISHERS, FIXED_FAMILIES, FLOORS, GPTQ_MIXES, METHODS,
                      PROPAGATIONS, PROVIDERS, RECONSTRUCT_METRICS, RISKS, ROUNDINGS, SCOPES, TARGETS, TEACHERS)
from .errors import UserError


@dataclass(frozen=True)
class CompileConfig:
    """Everything a compile depends on. Same config + same inputs -> byte-identical artifact."""

    model: str = "minilm"
    weights: Path | None = None  # model source: a state dict (torchvision:, module:)
    data: Path | None = None     # model source: evaluation data (ImageFolder dir, GLUE task dir)
    calib: Path | None = None    # model source: calibration data (ImageFolder dir, .npz of named inputs)
    task: str | None = None      # model source: hf: glue:<name>
    bits: float = 4.0
    method: str = DEFAULT_METHOD
    group_size: int = 0          # uniform: input channels per scale (0: one scale per output row)
    family: str = "uniform"      # bayesq-fixed: uniform | codebook
    codebook_rows: int = 1       # codebook: rows sharing one table
    curvature: str = "kfac"      # posterior form: diag | kfac | lowrank
    fisher: str = "true"         # true (targets sampled from the model) | empirical (labels)
    fisher_samples: int = 1      # target samples per calibration item
    rank: int = 8                # low-rank directions per layer
    # Effective data size N in Λ = N·F + τ. The data a pretrained model was fitted to is unknown here and
    # far larger than the calibration set; with N = 256 calibration items the prior outweighs the data term
    # 10–30× and the design degrades (docs/method.md and docs/results.md: sensitivity to N). 10^6 is the
    # order of a training corpus.
    n_data: float | None = 1e6
    prior_precision: float | None = None  # τ (default: empirical Bayes per layer)
    temperature: float = 0.0     # posterior temperature in the design objective (0: design on μ alone)
    act_order: bool = False      # kfac rounding: columns in decreasing curvature order (GPTQ's act-order)
    rounding: str = "feedback"   # bayesq*: codes by error feedback in the posterior metric, or nearest on the grid
    propagate: str = "none"      # bayesq*: re-round codes in graph order on the partly quantized model's inputs
    reconstruct: bool = False    # bayesq*, gptq: re-choose codes block by block in the posterior metric (planning/reconstruct.py)
    reconstruct_steps: int = 100  # Adam steps per block at most (the best held-out codes are kept)
    reconstruct_metric: str = "mse"  # how block-output errors are weighted: mse | fisher | fisher-items
    gptq_mix: str = "knapsack"   # gptq at a fractional budget: which layers get the wider codes
    target: str = "size"         # bayesq: size | speed | cuda (which candidates each op may take)
    floor: str = "gptq"          # bayesq: also plan GPTQ at the budget, ship the better on held-out calibration
    keep_first_last: bool = False  # bayesq: pin the first and last quantized layers to 8-bit
    overrides: Path | None = None  # bayesq: JSON/YAML file, tensor-name pattern -> allowed candidate labels
    risk: str = "closed"         # bayesq: closed-form proxy or Monte Carlo on calibration data
    max_drop: float | None = None  # bayesq: search the least budget whose headline drop is at most this
    scope: str = "all"           # all: Conv/Gemm/MatMul weights and Gather embedding tables; linear: without tables
    # calibration-only distillation of the plan (bayesq_onnx/distill/); off by default: see docs/cli.md
    distill: bool = False
    distill_steps: int = 300     # Adam steps at most (early stopping on held-out calibration batches)
    distill_lr: float = 1e-3     # relative step: log-scale for scales, RMS units for levels / biases / norms
    teacher: str = "posterior"   # posterior (predictive of posterior samples) | fp (the FP32 model)
    teacher_samples: int = 4     # posterior samples the teacher averages
    out: Path = Path("bayesq-out")
    calib_size: int = 256
    eval_size: int = 256         # the headline comes with a bootstrap 95 % interval; more items narrow it
    provider: str = "auto"
    seed: int = 0
    latency_runs: int = 20
    latency_warmup: int = 3
    latency_batch: int = 8
    latency_seq: int = 128
    memory_loads: int = 3        # fresh-process loads of each model for memory at load (figures: the median)
    fail_on: str | None = None   # degraded | collapsed: a verdict this bad fails the compile (CLI exit 3)
    verify_each: bool = False
    dump_dir: Path | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def validate(self) -> "CompileConfig":
        """Raise :class:`UserError` for settings no compile can satisfy."""
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name, allowed in (("family", FIXED_FAMILIES), ("curvature", CURVATURES), ("fisher", FISHERS),
                              ("target", TARGETS), ("risk", RISKS), ("rounding", ROUNDINGS),
                              ("propagate", PROPAGATIONS), ("gptq_mix", GPTQ_MIXES),
                              ("reconstruct_metric", RECONSTRUCT_METRICS)):
            if getattr(self, name) not in allowed:
                raise UserError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if self.max_drop is not None and not self.max_drop >= 0:
            raise UserError("`max_drop` needs a value >= 0 (in the headline metric's units, e.g. 0.003 for 0.3 "
                            "points of top-1)")
        if self.reconstruct_steps < 1:
            raise UserError("`reconstruct_steps` must be at least 1")
        from .planning.methods import method_spec  # the method's own declarations (bits, stages, search)

        method_spec(self.method).check(self)
        if self.codebook_rows < 1:
            raise UserError("`codebook_rows` must be at least 1")
        if self.fisher_samples < 1 or self.rank < 1:
            raise UserError("`fisher_samples` and `rank` must be at least 1")
        if self.temperature < 0 or (self.n_data is not None and self.n_data <= 0) or (
                self.prior_precision is not None and self.prior_precision <= 0):
            raise UserError("`temperature` must be >= 0; `n_data` and `prior_precision` must be > 0")
        if self.teacher not in TEACHERS:
            raise UserError(f"unknown teacher {self.teacher!r}; choose one of {', '.join(TEACHERS)}")
        if self.distill_steps < 1 or self.teacher_samples < 1 or not self.distill_lr > 0:
            raise UserError("`distill_steps` and `teacher_samples` must be at least 1, `distill_lr` > 0")
        if self.floor not in FLOORS:
            raise UserError(f"unknown floor {self.floor!r}; choose one of {', '.join(FLOORS)}")
        if self.fail_on is not None and self.fail_on not in FAIL_ON:
            raise UserError(f"unknown fail_on {self.fail_on!r}; choose one of {', '.join(FAIL_ON)}")
        if self.scope not in SCOPES:
            raise UserError(f"unknown scope {self.scope!r}; choose one of {', '.join(SCOPES)}")
        if self.provider not in PROVIDERS:
            raise UserError(f"unknown provider {self.provider!r}; choose one of {', '.join(PROVIDERS)}")
        if self.group_size < 0 or (self.group_size and self.group_size & (self.group_size - 1)):
            raise UserError(f"`group_size` {self.group_size} must be 0 (per row) or a power of two")
        for name in ("calib_size", "eval_size", "latency_runs", "latency_batch", "latency_seq", "memory_loads"):
            if getattr(self, name) < 1:
                raise UserError(f"`{name}` must be at least 1")
        if self.latency_warmup < 0:
            raise UserError("`latency_warmup` must be at least 0")
        dump = Path(self.dump_dir).resolve() if self.dump_dir is not None else None
        if dump is not None and Path(self.out).resolve() in (dump, *dump.parents):
            raise UserError(f"`dump_dir` {self.dump_dir} is inside `out` {self.out}, which is replaced as a unit; "
                            f"use a directory beside it, e.g. `dump_dir` {Path(self.out).name}-passes")
        for name in ("weights", "data", "calib", "overrides"):  # before any model loads
            path = getattr(self, name)
            if path is not None and not Path(path).expanduser().exists():
                raise UserError(f"`{name}` {path}: no such file or directory")
        if self.eval_size < 2:
            raise UserError("`eval_size` must be at least 2 (fidelity compares items against each other)")
        return self

    def source_options(self):
        """What the model source takes from this config (a :class:`~bayesq_onnx.models.base.SourceOptions`)."""
        from .models.base import SourceOptions

        return SourceOptions(weights=self.weights, data=self.data, calib=self.calib, task=self.task,
                             calib_size=self.calib_size, eval_size=self.eval_size,
                             latency_batch=self.latency_batch, latency_seq=self.latency_seq, seed=self.seed)

    def to_json(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        d["dump_dir"] = str(self.dump_dir) if self.dump_dir else None
        for name in ("overrides", "weights", "data", "calib"):
            d[name] = str(getattr(self, name)) if getattr(self, name) else None
        return d


# Named settings over the defaults. fast: a quick look (fewer calibration and evaluation items, fewer latency
# runs); best: the most faithful artifact the method reaches (block reconstruction, then distillation toward
# the FP32 model, on more calibration items, a larger evaluation set for a tighter interval), at several times
# the default's time. On MiniLM the FP32 teacher beat the posterior-predictive one at every budget tried, and
# reconstruction added to distillation at 4.0 and 3.0 bits (docs/results.md).
RECIPES: dict[str, dict] = {
    "fast": {"calib_size": 64, "eval_size": 128, "latency_runs": 5, "memory_loads": 1},
    "default": {},
    "best": {"calib_size": 512, "eval_size": 1024, "reconstruct": True, "distill": True, "teacher": "fp"},
}


def build_config(recipe: str = "default", file: Path | str | None = None, **fields_) -> CompileConfig:
    """The config of ``recipe`` (:data:`RECIPES`), overridden by the fields of ``file`` (YAML or JSON,
    field names as keys; a ``recipe`` key names the recipe when the argument leaves it at default), then
    by ``fields_``. Unknown recipes and fields are a :class:`UserError` naming them."""
    from_file = read_config_file(file) if file is not None else {}
    file_recipe = from_file.pop("recipe", None)
    if recipe == "default" and file_recipe is not None:
        recipe = file_recipe
    if recipe not in RECIPES:
        raise UserError(f"unknown `recipe` {recipe!r}; choose one of {', '.join(RECIPES)}")
    unknown = sorted(set(fields_) - _FIELD_TYPES.keys())
    if unknown:
        raise UserError(f"unknown config field(s) {', '.join(unknown)}; fields: {', '.join(_FIELD_TYPES)}")
    return CompileConfig(**{**RECIPES[recipe], **from_file, **fields_})


def read_config_file(path: Path | str) -> dict:
    """A config file's fields, each checked against the field's type (a path field takes a string, a float
    field an int or float, ...); YAML (.yaml/.yml) or JSON (.json)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"`config` {path}: no such file")
    text = path.read_text(encoding="utf-8", errors="replace")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise UserError(f"`config` {path}: expected a .yaml, .yml or .json file")
    import yaml

    try:
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise UserError(f"`config` {path}: cannot parse it ({' '.join(str(exc).split())[:160]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"`config` {path}: expected a mapping of field names to values, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        if key == "recipe":
            out[key] = str(value)
            continue
        if key not in _FIELD_TYPES or key == "extra":
            raise UserError(f"`config` {path}: unknown field {key!r}; fields: {', '.join(_FIELD_TYPES)}")
        out[key] = _coerce(key, value, path)
    return out


# what a config file's value may be for each field type (a bool is not a number here)
_ACCEPTS = {"Path": str, "bool": bool, "int": int, "float": (int, float), "str": str}
_CONVERT = {"Path": Path, "float": float}


def _coerce(key: str, value, path: Path):
    """``value`` as field ``key``'s type, or a UserError naming the file and field."""
    kind = _FIELD_TYPES[key]
    base = kind.split(" |")[0]
    if value is None and "None" in kind:
        return None
    if not isinstance(value, _ACCEPTS[base]) or (isinstance(value, bool) and base != "bool"):
        raise UserError(f"`config` {path}: field {key!r} takes {kind}, got {value!r}")
    return _CONVERT.get(base, lambda v: v)(value)


_FIELD_TYPES = {f.name: str(f.type) for f in fields(CompileConfig) if f.name != "extra"}
