"""A sentence-transformers model dir's head, read from its ``modules.json``: the Transformer (the dir itself),
one Pooling module, optional Dense layers and an optional Normalize, in that order. Without ``modules.json``:
mean pooling and L2 normalization (what ``minilm`` and most sentence encoders use)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

# sentence-transformers' Pooling config keys, in the order it concatenates the pooled vectors
POOLING_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_PREFIX = "sentence_transformers.models."


@dataclass(frozen=True)
class SentenceHead:
    """What follows the encoder: pooling modes (concatenated), Dense layers (``Linear`` + activation, in
    order), L2 normalization; ``origin`` says where it was read from."""

    pooling: tuple[str, ...] = ("mean",)
    dense: tuple[torch.nn.Module, ...] = ()
    normalize: bool = True
    origin: str = "default: no modules.json"

    def describe(self) -> str:
        """E.g. ``"mean, normalized (default: no modules.json)"``."""
        parts = ["+".join(self.pooling)]
        parts += [f"dense {d[0].in_features}->{d[0].out_features} {type(d[1]).__name__}" for d in self.dense]
        parts += ["normalized"] if self.normalize else []
        return f"{', '.join(parts)} ({self.origin})"


def read_head(path: Path, label: str) -> SentenceHead:
    """The head ``path/modules.json`` describes (the default head when there is none); ``label`` names the
    model in errors. Anything but Transformer (the dir itself), Pooling, Dense and a final Normalize is a
    :class:`UserError`."""
    listing = path / "modules.json"
    if not listing.is_file():
        return SentenceHead()
    entries = _json(listing, label)
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("type"), str)
                                                for e in entries):
        raise UserError(f"{label}: {listing} is not a sentence-transformers module list (a JSON list of "
                        "objects with \"type\" and \"path\")")
    kinds = [e["type"].removeprefix(_PREFIX) for e in entries]
    layout = "Transformer, Pooling, any Dense, then an optional Normalize"
    unsupported = [e["type"] for e, k in zip(entries, kinds)
                   if k not in ("Transformer", "Pooling", "Dense", "Normalize")]
    if unsupported:
        raise UserError(f"{label}: {listing} lists {unsupported[0]}, which is not supported; supported: {layout}")
    if kinds[:2] != ["Transformer", "Pooling"] or "Pooling" in kinds[2:] or "Normalize" in kinds[:-1]:
        raise UserError(f"{label}: {listing} lists {', '.join(kinds)}; supported: {layout}")
    if entries[0].get("path", "") not in ("", "."):
        raise UserError(f"{label}: {listing} keeps the transformer in {entries[0]['path']}/; supported: its "
                        "files in the dir itself (as sentence-transformers saves them)")
    folders = [path / e.get("path", "") for e in entries]
    return SentenceHead(pooling=_pooling(folders[1], label),
                        dense=tuple(_dense(f, label) for f, k in zip(folders, kinds) if k == "Dense"),
                        normalize=kinds[-1] == "Normalize", origin="modules.json")


def _json(file: Path, label: str):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{label}: cannot read {file} ({exc})") from exc


def _pooling(folder: Path, label: str) -> tuple[str, ...]:
    """The pooling modes a Pooling module's ``config.json`` turns on, in sentence-transformers' order."""
    config = _json(folder / "config.json", label)
    if not isinstance(config, dict):
        raise UserError(f"{label}: {folder / 'config.json'} is not a Pooling config (a JSON object)")
    unknown = sorted(k for k, v in config.items() if k.startswith("pooling_mode_") and v is True
                     and k not in POOLING_MODES)
    if unknown:
        raise UserError(f"{label}: {folder / 'config.json'} turns on {unknown[0]}, which is not supported; "
                        f"supported: {', '.join(POOLING_MODES)}")
    modes = tuple(mode for key, mode in POOLING_MODES.items() if config.get(key) is True)
    if not modes:
        raise UserError(f"{label}: {folder / 'config.json'} turns on no pooling mode; set one of "
                        f"{', '.join(POOLING_MODES)} to true")
    return modes


def _dense(folder: Path, label: str) -> torch.nn.Sequential:
    """A Dense module: ``Linear(in_features, out_features, bias)`` with its stored weights, then its
    activation (a ``torch.nn`` module class built without arguments, e.g. ``torch.nn.modules.activation.Tanh``)."""
    config = _json(folder / "config.json", label)
    try:
        linear = torch.nn.Linear(int(config["in_features"]), int(config["out_features"]),
                                 bias=bool(config.get("bias", True)))
        activation = config.get("activation_function") or "torch.nn.modules.linear.Identity"
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{label}: {folder / 'config.json'} is not a Dense config (in_features, out_features, "
                        "bias, activation_function)") from exc
    cls = getattr(torch.nn, activation.rsplit(".", 1)[-1], None) if activation.startswith("torch.nn.") else None
    try:
        act = cls() if isinstance(cls, type) and issubclass(cls, torch.nn.Module) else None
    except TypeError:  # a module that needs arguments
        act = None
    if act is None:
        raise UserError(f"{label}: Dense activation {activation} is not supported; supported: torch.nn modules "
                        "built without arguments, e.g. torch.nn.modules.activation.Tanh")
    state = _dense_weights(folder, label)
    try:
        linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    except RuntimeError as exc:
        raise UserError(f"{label}: the Dense weights in {folder} do not fit its config.json "
                        f"({str(exc).splitlines()[0]})") from exc
    return torch.nn.Sequential(linear, act).eval()


def _dense_weights(folder: Path, label: str) -> dict[str, torch.Tensor]:
    try:
        if (folder / "model.safetensors").is_file():
            from safetensors.torch import load_file

            return load_file(folder / "model.safetensors")
        if (folder / "pytorch_model.bin").is_file():
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - safetensors and pickle raise several types for a bad file
        raise UserError(f"{label}: cannot read the Dense weights in {folder} ({type(exc).__name__})") from exc
    raise UserError(f"{label}: no Dense weights in {folder} (expected model.safetensors or pytorch_model.bin)")
