"""Factories for ``module:user_models:<factory>`` in the CLI tests (the tests directory is on sys.path)."""

from __future__ import annotations

import numpy as np
import torch

from bayesq_onnx.models.python_module import module_bundle


class TwoInput(torch.nn.Module):
    """Token ids and a mask, variable sequence length: exercises named, dynamic inputs."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(40, 32)
        self.proj = torch.nn.Linear(32, 64)
        self.head = torch.nn.Linear(64, 5)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.proj(self.emb(ids))) * mask.unsqueeze(-1)
        return self.head(h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1))


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10))


def deep_tanh() -> torch.nn.Module:
    """Twelve tanh layers with orthogonal weights of gain 1.5 (the chaotic regime: small weight errors grow
    layer by layer), so that 2-bit rounding collapses it while 8-bit holds."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 128), torch.nn.Tanh()]
    for _ in range(10):
        layer = torch.nn.Linear(128, 128)
        torch.nn.init.orthogonal_(layer.weight, gain=1.5)
        layers += [layer, torch.nn.Tanh()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(128, 64))


def bundle():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    batches = [torch.from_numpy(rng.normal(size=(16, 64)).astype(np.float32)) for _ in range(6)]
    return module_bundle(mlp(), batches, name="user-bundle")


def broken():
    raise RuntimeError("cannot build")
