"""BayesQ-ONNX: uncertainty-guided Bayesian post-training quantization that ships standard ONNX.

``bayesq_onnx.compile(model, calibration, config=CompileConfig(...))`` is the Python API (see
:mod:`bayesq_onnx.api`; ``build_config("best", "my.yaml", bits=3.5)`` layers a recipe, a config file and
fields); the ``bayesq`` command line runs the same pipeline.
"""

__version__ = "0.1.0"
__all__ = ["compile", "CompileConfig", "CompileResult", "build_config", "BayesQWarning", "VerdictFailure",
           "__version__"]


def __getattr__(name):
    # Imported on first use so that `bayesq --help` does not pay for torch and onnx.
    if name == "compile":
        from .api import compile

        return compile
    if name in ("CompileConfig", "build_config"):
        from . import config

        return getattr(config, name)
    if name in ("BayesQWarning", "VerdictFailure"):
        from . import errors

        return getattr(errors, name)
    if name == "CompileResult":
        from .pipeline import CompileResult

        return CompileResult
    raise AttributeError(f"module 'bayesq_onnx' has no attribute {name!r}")
