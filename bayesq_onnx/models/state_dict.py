"""Loading a user's state dict (``weights``) into a module, with one-line errors for what does not fit."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save``-d state dict (``.pt``/``.pth``/``.bin``), also
    inside a checkpoint's ``"state_dict"``/``"model"`` entry; a DataParallel ``module.`` prefix is dropped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"`weights` {path}: no such file; give a state dict saved with torch.save or safetensors")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip/safetensors raise many types
        raise UserError(f"`weights` {path} is not a readable state dict ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120]})") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"`weights` {path} holds {type(state).__name__}, not a mapping of names to tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load ``path`` into ``module`` strictly: every key present, none extra, every shape equal."""
    state = read_state_dict(path)
    own = module.state_dict()
    # checkpoints from before BatchNorm counted its updates lack `num_batches_tracked`; it is not a weight
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {shapes[0]})")
        raise UserError(f"`weights` {path} does not fit {type(module).__name__}: {'; '.join(parts)}; "
                        "check the architecture (and num_classes) matches the checkpoint")
    module.load_state_dict(state, strict=True)
