"""A tiny PyTorch language model with tied input/output embeddings, as a ModelBundle for pipeline tests."""

from __future__ import annotations

import numpy as np
import torch

from bayesq_onnx.models.base import ModelBundle


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 32):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.conv = torch.nn.Conv1d(dim, dim, kernel_size=3, padding=1)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.proj(self.emb(ids)))
        h = torch.relu(self.conv(h.transpose(1, 2))).transpose(1, 2)
        return self.head(h.mean(dim=1))


def logits_fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    agree = float((reference.argmax(1) == candidate.argmax(1)).mean())
    return {"top1_agreement": agree, "max_abs_diff": float(np.abs(reference - candidate).max())}


def tiny_bundle(seed: int = 0, calib: int = 4, evaluation: int = 4) -> ModelBundle:
    torch.manual_seed(seed)
    module = TinyLM().eval()
    rng = np.random.default_rng(seed)
    batch = lambda: {"ids": rng.integers(0, 50, size=(8, 6)).astype(np.int64)}  # noqa: E731
    return ModelBundle(
        name="tiny-lm", module=module, input_names=["ids"], output_names=["logits"],
        dynamic_axes={"ids": {0: "batch", 1: "sequence"}},
        calibration=[batch() for _ in range(calib)], evaluation=[batch() for _ in range(evaluation)],
        latency_feed=batch(), metric=logits_fidelity, headline="top1_agreement", info={"source": "tests"},
        likelihood="categorical")
