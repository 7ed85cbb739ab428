"""The values the compile's settings take: constants only, so that the CLI (``bayesq --help``) and the
config can name them without importing torch, ONNX or ONNX Runtime. The modules that act on a choice
import it from here."""

METHODS = ("bayesq", "bayesq-fixed", "rtn", "gptq")
DEFAULT_METHOD = "bayesq"
GPTQ_MIXES = ("knapsack", "proportional")
RISKS = ("closed", "rounded", "mc")
ROUNDINGS = ("feedback", "nearest")
PROPAGATIONS = ("none", "sequential", "fp-outputs")  # planning/propagate.py
RECONSTRUCT_METRICS = ("mse", "fisher", "fisher-items")  # planning/reconstruct.py
FIXED_FAMILIES = ("uniform", "codebook")
CURVATURES = ("diag", "kfac", "lowrank")
FISHERS = ("true", "empirical")
TEACHERS = ("posterior", "fp")
SCOPES = ("linear", "all")           # linear: Conv/Gemm/MatMul weights; all: also Gather embedding tables
CODE_BITS = (2, 3, 4, 5, 6, 8)       # the code widths of the quantizer families (3/5/6 bit-packed)
FLOORS = ("gptq", "none")  # bayesq: the plan it must beat to ship (planning/floor.py)
FAIL_ON = ("degraded", "collapsed")  # verdicts `fail_on` can stop at (bayesq_onnx/verdict.py)
TARGETS = ("size", "fold", "speed", "cuda")  # which candidates each op may take (planning/candidates.py)
# the narrowest code any candidate of a target stores (planning.candidates.for_target): a budget below it fails
# before a model loads
LEAST_CODE_BITS = {"size": 2, "fold": 2, "speed": 2, "cuda": 4}
PROVIDERS = ("auto", "cpu", "cuda")  # ONNX Runtime execution provider for validation
